"""Lifeguard local health awareness: an agent that misses its own evidence slows down.

Rules:
- The score is an integer in [0, max_multiplier - 1]; 0 is healthy.
- It rises when the agent has reason to doubt *itself*: a probe failed and the helpers
  it asked did not even send the nacks it expected (+1 per missing nack, or +1 when there
  were no helpers to ask), it had to refute a suspicion about itself (+1), or its own
  timers fired late because it was not running (+1).
- It falls by 1 on every probe that is acked.
- Probe timeouts and the probe interval are multiplied by (score + 1): a slow or
  overloaded agent waits longer before accusing anyone, and probes less often.

How it works: `scale_timeout` is the pure formula; `Awareness` just keeps the clamped
score.
"""

from __future__ import annotations

__all__ = ["scale_timeout", "Awareness"]


def scale_timeout(timeout: float, score: int) -> float:
    """A timeout stretched by local health: timeout * (score + 1)."""
    return timeout * (score + 1)


class Awareness:
    """The local health score of one agent."""

    __slots__ = ("max_multiplier", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be at least 1")
        self.max_multiplier = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """0 when healthy, up to max_multiplier - 1."""
        return self._score

    def apply_delta(self, delta: int) -> int:
        """Add `delta` (clamped to the range) and return the new score."""
        self._score = min(self.max_multiplier - 1, max(0, self._score + delta))
        return self._score

    def scale(self, timeout: float) -> float:
        """`timeout` stretched by the current score."""
        return scale_timeout(timeout, self._score)
