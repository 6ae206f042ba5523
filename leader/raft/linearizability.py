"""A linearizability checker for key-value histories (Wing & Gong search, Lowe's cache).

A history is a list of operations, each with the time its client invoked it (`call`),
the time the client saw it complete (`ret`, or None if it never did: it may or may
not have taken effect), its input and its output. The history is linearizable if some
total order of the operations (1) respects real time — an operation that returned
before another was invoked comes first — and (2) replays on the sequential model with
every completed operation returning what the client saw.

Rules:
- Operations that overlap in time may be ordered either way. Equal times count as
  overlapping (a return at t and a call at t are not ordered), which never rejects a
  correct system.
- A pending operation (`ret is None`) may take effect at any point after its call, or
  never; its output is not checked. Pending reads are dropped (they change nothing).
- Keys are independent registers, so the history is checked per key (P-compositionality,
  Horn & Kroening): the search is exponential in concurrency, not in history length.

How it works (Porcupine's shape): call and return events of one key sit in a doubly
linked list in time order. Walk it; at a call, try to linearize that operation now:
step the model, and if the output matches and (set of linearized operations, state) was
not seen before, remove the operation from the list (remember it on a stack) and start
again from the head. Reaching a return means the operation it closes cannot be placed
after everything still pending: undo the last choice and try the next call after it.
The list empties when a linearization exists; the stack empties when none does. The
cache of (bitset, state) pairs makes this polynomial for the histories we produce.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "OpKind",
    "KVInput",
    "Operation",
    "Model",
    "KVModel",
    "Verdict",
    "PartitionResult",
    "CheckResult",
    "check",
]


class OpKind(enum.Enum):
    GET = "get"
    PUT = "put"
    CAS = "cas"


@dataclass(frozen=True, slots=True, kw_only=True)
class KVInput:
    """get(key); put(key, value); cas(key, expected, value) — expected None = absent."""

    kind: OpKind
    key: str
    value: str | None = None
    expected: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One client operation. Output: get → value or None; put → None; cas → bool."""

    client: int
    input: KVInput
    call: float
    ret: float | None
    output: object = None

    def __str__(self) -> str:
        i = self.input
        args = {
            OpKind.GET: f"get({i.key})",
            OpKind.PUT: f"put({i.key}, {i.value!r})",
            OpKind.CAS: f"cas({i.key}, {i.expected!r} -> {i.value!r})",
        }[i.kind]
        out = "?" if self.ret is None else repr(self.output)
        end = "..." if self.ret is None else f"{self.ret:g}"
        return f"client {self.client}: {args} = {out} [{self.call:g}, {end}]"


class Model(Protocol):
    """A sequential specification: how one operation moves the state."""

    def init(self) -> Hashable: ...

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """(does `op`'s output agree with `state`?, the state after `op`)."""
        ...

    def partition(self, ops: Sequence[Operation]) -> dict[str, list[Operation]]:
        """Split into independent sub-histories (one per key)."""
        ...


class KVModel:
    """A map of independent registers; each key starts absent (None)."""

    def init(self) -> Hashable:
        return None

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        i = op.input
        if i.kind is OpKind.GET:
            return (op.ret is None or op.output == state), state
        if i.kind is OpKind.PUT:
            return True, i.value
        swapped = state == i.expected
        if op.ret is not None and op.output != swapped:
            return False, state
        return True, (i.value if swapped else state)

    def partition(self, ops: Sequence[Operation]) -> dict[str, list[Operation]]:
        parts: dict[str, list[Operation]] = {}
        for op in ops:
            parts.setdefault(op.input.key, []).append(op)
        return parts


class Verdict(enum.Enum):
    OK = "linearizable"
    ILLEGAL = "not linearizable"
    UNKNOWN = "unknown (search budget exhausted)"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionResult:
    key: str
    verdict: Verdict
    operations: int
    steps: int
    explanation: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    verdict: Verdict
    partitions: tuple[PartitionResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    def explain(self) -> str:
        bad = [p for p in self.partitions if p.verdict is not Verdict.OK]
        if not bad:
            return f"{self.verdict.value}: {sum(p.operations for p in self.partitions)} operations"
        return "\n".join(f"key {p.key!r}: {p.verdict.value}\n{p.explanation}" for p in bad)


class _Node:
    __slots__ = ("op", "is_call", "match", "prev", "next")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op = op
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _build_list(ops: Sequence[Operation]) -> _Node:
    inf = float("inf")
    events: list[tuple[float, int, int, _Node]] = []
    for i, op in enumerate(ops):
        call = _Node(i, True)
        ret = _Node(i, False)
        call.match = ret
        # Calls sort before returns at equal times: equal times overlap.
        events.append((op.call, 0, i, call))
        events.append((op.ret if op.ret is not None else inf, 1, i, ret))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    head = _Node(-1, False)
    prev = head
    for _, _, _, node in events:
        prev.next = node
        node.prev = prev
        prev = node
    return head


def _lift(call: _Node) -> None:
    assert call.prev is not None and call.match is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret = call.match
    assert ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node) -> None:
    ret = call.match
    assert ret is not None and ret.prev is not None and call.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


def _check_partition(key: str, ops: list[Operation], model: Model, max_steps: int) -> PartitionResult:
    ops = [op for op in ops if not (op.ret is None and op.input.kind is OpKind.GET)]
    head = _build_list(ops)
    state = model.init()
    linearized = 0
    cache: dict[int, set[Hashable]] = {}
    stack: list[tuple[_Node, Hashable]] = []
    steps = 0
    best: list[int] = []  # the longest linearization found, for the explanation
    entry = head.next
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            return PartitionResult(key=key, verdict=Verdict.UNKNOWN, operations=len(ops), steps=steps)
        assert entry is not None
        if entry.is_call:
            ok, new_state = model.step(state, ops[entry.op])
            if ok:
                bits = linearized | (1 << entry.op)
                seen = cache.setdefault(bits, set())
                if new_state not in seen:
                    seen.add(new_state)
                    stack.append((entry, state))
                    state = new_state
                    linearized = bits
                    _lift(entry)
                    if len(stack) > len(best):
                        best = [n.op for n, _ in stack]
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return PartitionResult(
                    key=key,
                    verdict=Verdict.ILLEGAL,
                    operations=len(ops),
                    steps=steps,
                    explanation=_explain(ops, best, model),
                )
            call, state = stack.pop()
            linearized &= ~(1 << call.op)
            _unlift(call)
            entry = call.next
    return PartitionResult(key=key, verdict=Verdict.OK, operations=len(ops), steps=steps)


def _explain(ops: list[Operation], best: list[int], model: Model) -> str:
    done = set(best)
    lines = ["longest linearizable prefix:"]
    state = model.init()
    for i in best:
        _, state = model.step(state, ops[i])
        lines.append(f"  {ops[i]}    -> state {state!r}")
    rest = sorted((i for i in range(len(ops)) if i not in done), key=lambda i: (ops[i].ret is None, ops[i].ret or 0))
    if rest:
        lines.append("cannot be placed next (earliest return first):")
        lines.extend(f"  {ops[i]}" for i in rest[:5])
    return "\n".join(lines)


def check(history: Sequence[Operation], model: Model | None = None, *, max_steps: int = 2_000_000) -> CheckResult:
    """Is `history` linearizable with respect to `model` (default: `KVModel`)?

    `max_steps` bounds the search per key; past it the verdict is UNKNOWN.
    """
    m: Model = model if model is not None else KVModel()
    for op in history:
        if op.ret is not None and op.ret < op.call:
            raise ValueError(f"operation returns before it is called: {op}")
    results = tuple(
        _check_partition(key, ops, m, max_steps) for key, ops in sorted(m.partition(history).items())
    )
    if any(r.verdict is Verdict.ILLEGAL for r in results):
        verdict = Verdict.ILLEGAL
    elif any(r.verdict is Verdict.UNKNOWN for r in results):
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.OK
    return CheckResult(verdict=verdict, partitions=results)
