"""Lifeguard suspicion: a timeout that starts long and shrinks with independent confirmations.

Rules:
- A member that could not reach X marks X SUSPECT and starts a timer. If X does not
  refute (announce a higher incarnation) before the timer fires, X is declared DEAD.
- The timer starts at `max_timeout` and shrinks toward `min_timeout` as *independent*
  accusers (distinct members other than X) confirm the suspicion, log-scaled so the first
  confirmations count most (Lifeguard, "dynamic suspicion timeout"):

      timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

  where c is the number of confirmations so far and k the number expected. With k < 1
  the timer is simply `min_timeout`.
- `min_timeout` itself scales with the log of the group size, because a refutation needs
  O(log N) gossip rounds to reach everyone:

      min = suspicion_mult * max(1, log10(N)) * probe_interval
      max = suspicion_max_timeout_mult * min

- Only the first k distinct confirmations count; repeats and the suspect itself do not.
- Positive evidence of death (the suspect's host refused a connection: nothing listens
  on its gossip port, see `reach.py`) caps the timer at a short, fixed deadline; the
  cap only ever moves the deadline earlier.

How it works: `Suspicion` is a small record (start, accusers, bounds); `deadline()` is
recomputed from the formula whenever a confirmation arrives, so the shell-facing core
only has to compare it with `now`. `shift()` moves the timer when the local agent itself
was stalled (its silence is not evidence against X).
"""

from __future__ import annotations

import math

__all__ = [
    "suspicion_timeout",
    "remaining_suspicion_time",
    "expected_confirmations",
    "Suspicion",
]


def suspicion_timeout(mult: float, n: int, interval: float) -> float:
    """The minimum suspicion timeout for a group of `n`: mult * max(1, log10(n)) * interval."""
    node_scale = max(1.0, math.log10(max(1, n)))
    return mult * node_scale * interval


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Seconds left on a suspicion timer after `elapsed` with `confirmations` of `k`.

    Negative when the timer has already expired.
    """
    if k < 1:
        timeout = min_timeout
    else:
        frac = math.log(confirmations + 1) / math.log(k + 1)
        timeout = max(min_timeout, max_timeout - frac * (max_timeout - min_timeout))
    return timeout - elapsed


def expected_confirmations(k: int, n: int) -> int:
    """Confirmations to expect in a group of `n` live members: at most n - 2 can give one.

    The suspect cannot confirm its own suspicion and the first accuser has already spoken,
    so a 4-member group can give at most 2 even if `k` asks for 3.
    """
    return max(0, min(k, n - 2))


class Suspicion:
    """One running suspicion timer about one member."""

    __slots__ = ("start", "k", "min_timeout", "max_timeout", "cap", "_accusers", "_confirmations")

    def __init__(
        self, *, accuser: str, k: int, min_timeout: float, max_timeout: float, start: float
    ) -> None:
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max(max_timeout, min_timeout)
        self.cap: float | None = None  # a deadline set by positive evidence, if any
        self._accusers = {accuser}
        self._confirmations = 0

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (at most k)."""
        return self._confirmations

    def confirm(self, accuser: str) -> bool:
        """Count a confirmation from `accuser`; True if it was new and counted."""
        if self._confirmations >= self.k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self._confirmations += 1
        return True

    def confirm_all(self) -> None:
        """Count every expected confirmation (a peer already declared the member dead)."""
        self._confirmations = self.k

    def deadline(self) -> float:
        """The local time at which the member is declared dead."""
        t = self.start + remaining_suspicion_time(
            self._confirmations, self.k, 0.0, self.min_timeout, self.max_timeout
        )
        return t if self.cap is None else min(t, self.cap)

    def limit(self, deadline: float) -> bool:
        """Declare the member dead no later than `deadline`; True if that moved the timer."""
        if deadline >= self.deadline():
            return False
        self.cap = deadline
        return True

    def shift(self, delta: float) -> None:
        """Push the timer back by `delta` seconds (the local agent was not running)."""
        self.start += delta
        if self.cap is not None:
            self.cap += delta
