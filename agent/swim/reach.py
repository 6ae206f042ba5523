"""Reachability checks: what a member's host says when its agent does not answer a probe.

Rules:
- When the direct `Ping` of a probe times out, the core asks the shell to check the
  target's host (`ReachCheck` in `Ready.checks`): the shell opens a TCP connection to the
  member's gossip address (the push-pull listener every running agent keeps open) and
  closes it at once, sending nothing. The outcome comes back through
  `Swim.reachability(check, outcome, now)`; no answer at all is the same as `NO_ANSWER`.
- Three outcomes, each a different piece of evidence (`VERDICTS`):
  - `REFUSED` (a RST, ECONNREFUSED): the host's kernel is up and nothing listens on the
    gossip port, so the agent is gone (crashed, killed, stopped). Positive evidence of
    death: the member is suspected with the short `refused_suspicion_timeout`.
  - `ACCEPTED` (the handshake completed): the host is up and the agent's listening
    socket exists; a stopped (SIGSTOP), swapping or overloaded process still completes
    handshakes in its kernel. The missed probe is excused instead of raising a
    suspicion, for at most `host_up_patience` of continuous excuses (a wedged agent is
    still found).
  - `NO_ANSWER` (timed out, host or network unreachable): nothing is known; the probe
    goes the ordinary SWIM/Lifeguard way.
- A result counts only for the life it was asked about: the member must still be live
  at the same incarnation and address (a restarted agent announces a higher incarnation,
  and a late RST about its previous life changes nothing).

How it works: `ReachCheck` is the effect, `Reach` the outcome, `VERDICTS` the table the
core consults; the decisions themselves live in `Swim` next to the probe they belong to.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from shoal.agent.swim.member import Address

__all__ = ["Reach", "Verdict", "VERDICTS", "ReachCheck"]


class Reach(enum.Enum):
    """What the target's host answered to a TCP connection on its gossip port."""

    ACCEPTED = "accepted"  # handshake completed: host up, agent's socket listening
    REFUSED = "refused"  # RST: host up, nothing listening
    NO_ANSWER = "no_answer"  # timeout or unreachable: nothing known


class Verdict(enum.Enum):
    """What the core makes of a `Reach` outcome."""

    AGENT_GONE = "agent_gone"  # suspect now, with the short refused timeout
    HOST_UP = "host_up"  # excuse the missed probe (within host_up_patience)
    UNKNOWN = "unknown"  # ordinary SWIM: the failed probe raises a suspicion


VERDICTS: Mapping[Reach, Verdict] = {
    Reach.REFUSED: Verdict.AGENT_GONE,
    Reach.ACCEPTED: Verdict.HOST_UP,
    Reach.NO_ANSWER: Verdict.UNKNOWN,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReachCheck:
    """Check whether anything listens at `address` (TCP), within `timeout` seconds.

    `seq` is the probe it belongs to; `name` and `incarnation` the member's life it is
    about. Hand it back unchanged with the outcome.
    """

    seq: int
    name: str
    incarnation: int
    address: Address
    timeout: float
