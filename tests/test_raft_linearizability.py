"""The linearizability checker on known-good and known-bad histories, and against a
brute-force oracle on thousands of small random histories."""

from __future__ import annotations

import itertools
import random

import pytest

from shoal.leader.raft.linearizability import KVInput, KVModel, Operation, OpKind, Verdict, check

GET, PUT, CAS = OpKind.GET, OpKind.PUT, OpKind.CAS


def op(
    client: int,
    kind: OpKind,
    call: float,
    ret: float | None,
    *,
    key: str = "x",
    value: str | None = None,
    expected: str | None = None,
    output: object = None,
) -> Operation:
    return Operation(
        client=client,
        input=KVInput(kind=kind, key=key, value=value, expected=expected),
        call=call,
        ret=ret,
        output=output,
    )


def put(c: int, v: str, call: float, ret: float | None, key: str = "x") -> Operation:
    return op(c, PUT, call, ret, key=key, value=v)


def get(c: int, out: str | None, call: float, ret: float | None, key: str = "x") -> Operation:
    return op(c, GET, call, ret, key=key, output=out)


def cas(c: int, exp: str | None, v: str, ok: bool | None, call: float, ret: float | None) -> Operation:
    return op(c, CAS, call, ret, value=v, expected=exp, output=ok)


GOOD = {
    "empty": [],
    "sequential": [put(1, "a", 0, 1), get(2, "a", 2, 3), put(1, "b", 4, 5), get(2, "b", 6, 7)],
    "initially absent": [get(1, None, 0, 1), put(1, "a", 2, 3)],
    "read overlapping a write sees old": [put(1, "a", 0, 10), get(2, None, 1, 2)],
    "read overlapping a write sees new": [put(1, "a", 0, 10), get(2, "a", 1, 2)],
    "concurrent writes, one order": [
        put(1, "a", 0, 10),
        put(2, "b", 0, 10),
        get(3, "a", 11, 12),
        get(3, "a", 13, 14),
    ],
    "reads pin an order of overlapping writes": [
        put(1, "a", 0, 10),
        put(2, "b", 0, 10),
        get(3, "b", 1, 2),
        get(4, "a", 3, 4),
    ],
    "pending write observed later": [put(1, "a", 0, None), get(2, "a", 50, 51)],
    "pending write never observed": [put(1, "a", 0, None), get(2, None, 50, 51)],
    "pending write observed, then overwritten": [
        put(1, "a", 0, None),
        get(2, "a", 5, 6),
        put(2, "b", 7, 8),
        get(2, "b", 9, 10),
    ],
    "equal times overlap": [put(1, "a", 0, 5), get(2, None, 5, 6)],
    "cas succeeds then fails": [put(1, "a", 0, 1), cas(1, "a", "b", True, 2, 3), cas(2, "a", "c", False, 4, 5)],
    "cas on absent": [cas(1, None, "a", True, 0, 1), get(1, "a", 2, 3)],
    "pending cas may have applied": [put(1, "a", 0, 1), cas(2, "a", "b", None, 2, None), get(3, "b", 9, 10)],
    "keys are independent": [
        put(1, "a", 0, 1, key="x"),
        put(1, "z", 2, 3, key="y"),
        get(2, "a", 4, 5, key="x"),
        get(2, None, 0, 1, key="y"),
    ],
}

BAD = {
    "stale read after a completed write": [put(1, "a", 0, 1), get(2, None, 2, 3)],
    "read of a value never written": [get(1, "ghost", 0, 1)],
    "new then old (real-time order)": [put(1, "a", 0, 100), get(2, "a", 1, 2), get(3, None, 3, 4)],
    "lost write": [put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "a", 4, 5)],
    "cas succeeded against another value": [put(1, "a", 0, 1), cas(2, "b", "c", True, 2, 3)],
    "two cas from one value both succeed": [
        put(1, "a", 0, 1),
        cas(2, "a", "b", True, 2, 3),
        cas(3, "a", "c", True, 4, 5),
    ],
    "cas failed although the value matched": [put(1, "a", 0, 1), cas(2, "a", "b", False, 2, 3)],
    "pending write observed, then unobserved": [put(1, "a", 0, None), get(2, "a", 5, 6), get(2, None, 7, 8)],
    "one bad key among good ones": [
        put(1, "a", 0, 1, key="x"),
        get(2, "a", 2, 3, key="x"),
        put(1, "b", 0, 1, key="y"),
        get(2, None, 2, 3, key="y"),
    ],
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_known_good_histories(name: str) -> None:
    result = check(GOOD[name])
    assert result.verdict is Verdict.OK, result.explain()


@pytest.mark.parametrize("name", sorted(BAD))
def test_known_bad_histories(name: str) -> None:
    result = check(BAD[name])
    assert result.verdict is Verdict.ILLEGAL


def test_explanation_names_the_key_and_the_operation_that_cannot_be_placed() -> None:
    result = check(BAD["one bad key among good ones"])
    text = result.explain()
    assert "key 'y'" in text and "get(y) = None" in text and "key 'x'" not in text


def test_budget_exhaustion_is_unknown_not_a_verdict() -> None:
    history = [put(i, str(i), 0, 100) for i in range(8)] + [get(9, "3", 101, 102)]
    assert check(history, max_steps=3).verdict is Verdict.UNKNOWN
    assert check(history).verdict is Verdict.OK


def test_a_return_before_the_call_is_rejected() -> None:
    with pytest.raises(ValueError):
        check([put(1, "a", 5, 4)])


def test_many_concurrent_clients_check_quickly() -> None:
    # 200 operations, 10 clients always overlapping: the cache keeps this fast.
    rng = random.Random(1)
    state: str | None = None
    history = []
    for t in range(200):
        c = t % 10
        if rng.random() < 0.5:
            state = f"v{t}"
            history.append(put(c, state, t, t + 9.5))
        else:
            history.append(get(c, state, t, t + 9.5))
    assert check(history).verdict is Verdict.OK


# --- brute force oracle ----------------------------------------------------------------


def brute_force(history: list[Operation]) -> bool:
    """Try every real-time-respecting order of every choice of pending ops to include."""
    model = KVModel()
    done = [o for o in history if o.ret is not None]
    pending = [o for o in history if o.ret is None]
    for k in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, k):
            ops = done + list(chosen)
            for order in itertools.permutations(ops):
                if any(
                    b.ret is not None and b.ret < a.call
                    for i, a in enumerate(order)
                    for b in order[i + 1 :]
                ):
                    continue  # b returned before a was called, but comes after it
                state = model.init()
                for o in order:
                    ok, state = model.step(state, o)
                    if not ok:
                        break
                else:
                    return True
    return False


def random_history(rng: random.Random) -> list[Operation]:
    values = ["a", "b", None]
    history = []
    for c in range(rng.randint(1, 5)):
        call = rng.randint(0, 8)
        ret: int | None = call + rng.randint(0, 6)
        if rng.random() < 0.15:
            ret = None
        kind = rng.choice([GET, PUT, CAS])
        if kind is GET:
            history.append(get(c, rng.choice(values), call, ret))
        elif kind is PUT:
            history.append(put(c, rng.choice(["a", "b"]), call, ret))
        else:
            history.append(cas(c, rng.choice(values), rng.choice(["a", "b"]), rng.random() < 0.5, call, ret))
    return history


def test_agrees_with_brute_force_on_random_histories() -> None:
    rng = random.Random(20240605)
    verdicts = {True: 0, False: 0}
    for _ in range(3000):
        history = random_history(rng)
        expected = brute_force(history)
        verdicts[expected] += 1
        got = check(history).verdict
        assert got is (Verdict.OK if expected else Verdict.ILLEGAL), history
    assert min(verdicts.values()) > 300  # both outcomes well represented
