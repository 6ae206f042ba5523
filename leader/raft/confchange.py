"""Single-server membership changes, and the entries that bootstrap a new cluster.

Rules:
- One change at a time: a leader does not propose a change while another is in its
  log and not yet applied, and a new leader waits until its no-op has been applied
  (which fixes the single-server-change bug Ongaro described on raft-dev in 2015).
- A change takes effect on each node when that node *applies* it (`Node.apply_conf_change`),
  the same on every node because every node applies the same log in order.
- `ADD_LEARNER` adds a non-voting member (it replicates but does not count); used to
  let a new server catch up before it can affect quorums.
- `ADD_VOTER` adds a voter, or promotes a learner. `REMOVE_NODE` removes a voter or
  learner. Changes that mean nothing (adding an existing voter, removing a stranger)
  are no-ops when applied; changes that would break the cluster (removing the last
  voter, turning a voter into a learner) are refused by `validate` at proposal time and
  are no-ops if one reaches the log anyway, so application never fails.
- A new cluster's voters are written as committed `CONF_CHANGE` entries at term 1, the
  same bytes on every initial server (`bootstrap_entries`); a server added later starts
  empty and learns the membership from the log or a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import ConfChangeRefused
from .messages import ConfChange, ConfChangeKind, ConfState, Entry, EntryKind, HardState

__all__ = ["validate", "apply", "bootstrap_entries"]


def validate(conf: ConfState, cc: ConfChange) -> None:
    """Raise `ConfChangeRefused` if `cc` cannot be proposed against `conf`."""
    if cc.node_id <= 0:
        raise ConfChangeRefused(f"node id must be positive, got {cc.node_id}")
    if cc.kind is ConfChangeKind.ADD_LEARNER and cc.node_id in conf.voters:
        raise ConfChangeRefused(
            f"node {cc.node_id} is a voter; demoting a voter to a learner is not supported "
            "(remove it and add it back as a learner)"
        )
    if cc.kind is ConfChangeKind.REMOVE_NODE and conf.voters == frozenset({cc.node_id}):
        raise ConfChangeRefused(f"node {cc.node_id} is the last voter and cannot be removed")


def apply(conf: ConfState, cc: ConfChange) -> ConfState:
    """The membership after `cc`; a change `validate` would refuse is a no-op."""
    try:
        validate(conf, cc)
    except ConfChangeRefused:
        return conf
    voters, learners = set(conf.voters), set(conf.learners)
    if cc.kind is ConfChangeKind.ADD_VOTER:
        learners.discard(cc.node_id)
        voters.add(cc.node_id)
    elif cc.kind is ConfChangeKind.ADD_LEARNER:
        learners.add(cc.node_id)
    else:
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)
    return ConfState(voters=frozenset(voters), learners=frozenset(learners))


def bootstrap_entries(voters: Iterable[int] | Mapping[int, str]) -> tuple[list[Entry], HardState]:
    """The log and hard state every initial server of a new cluster starts with.

    Persist both on each initial server before creating its `Node`; the entries come
    back as committed entries in the first Ready and the application applies them like
    any other membership change. Given a mapping id → address, each entry carries the
    address as its context, as a later ADD_VOTER/ADD_LEARNER does.
    """
    addresses = dict(voters) if isinstance(voters, Mapping) else {}
    ids = sorted(set(voters))
    if not ids or ids[0] <= 0:
        raise ConfChangeRefused("a cluster needs at least one voter, with positive ids")
    entries = [
        Entry(
            term=1,
            index=i,
            kind=EntryKind.CONF_CHANGE,
            data=ConfChange(
                kind=ConfChangeKind.ADD_VOTER, node_id=id, context=addresses.get(id, "").encode()
            ).encode(),
        )
        for i, id in enumerate(ids, start=1)
    ]
    return entries, HardState(term=1, commit=len(entries))
