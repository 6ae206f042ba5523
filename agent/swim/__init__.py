"""SWIM gossip membership with the Lifeguard refinements, as a sans-I/O core.

One module per concept: `config` (settings and profiles), `member` (who and in which
state), `messages` (the values exchanged), `suspicion` (Lifeguard suspicion timers),
`awareness` (local health), `reach` (what a silent member's host says to a TCP connect),
`broadcast` (transmit-limited gossip queue), `node` (the `Swim` state machine) and `sim`
(a deterministic simulator for tests and benchmarks).
Nothing here does I/O, reads a clock or uses the global random; the event-loop shell owns
the sockets and the clock and drives `Swim` through `step`, `tick` and `ready`.
"""

from shoal.agent.swim.config import Config
from shoal.agent.swim.member import Address, Member, Meta, State, make_meta
from shoal.agent.swim.node import EventKind, MemberEvent, Outbound, Ready, Stream, Swim
from shoal.agent.swim.reach import Reach, ReachCheck

__all__ = [
    "Address",
    "Config",
    "EventKind",
    "Member",
    "MemberEvent",
    "Meta",
    "Outbound",
    "Reach",
    "ReachCheck",
    "Ready",
    "State",
    "Stream",
    "Swim",
    "make_meta",
]
