"""The transmit-limited broadcast queue that feeds gossip and piggybacking.

Rules:
- Each queued message is keyed by the member it is about; a newer message about the same
  member replaces the older one (the core only queues changes it accepted, so the newer
  one always supersedes).
- A message is sent at most `retransmit_limit(mult, N)` times,

      limit = retransmit_mult * ceil(log10(N + 1))

  which is enough for an epidemic to reach every member with high probability
  (SWIM, §4.1: O(log N) rounds) while keeping the load per member constant.
- Messages that were sent the fewest times go first; among equals, the newest first.
- `get(budget)` packs messages until the byte budget (datagram size minus what is already
  in it) is used, measuring each with the injected size function; a message that does
  not fit is skipped, a smaller one after it may still go.

How it works: items sit in buckets by transmit count, each bucket a dict in insertion
order, so `get` walks buckets from the lowest count, each newest-first (bucket 0 is in
queue order already; later buckets are sorted by queue id); a picked item moves to the
next bucket or is dropped at the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shoal.agent.swim.messages import Broadcast

__all__ = ["retransmit_limit", "BroadcastQueue"]


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one broadcast is sent in a group of `n`: mult * ceil(log10(n + 1))."""
    return mult * math.ceil(math.log10(n + 1))


class _Item:
    __slots__ = ("key", "message", "size", "transmits", "id")

    def __init__(self, key: str, message: Broadcast, size: int, id: int) -> None:
        self.key = key
        self.message = message
        self.size = size
        self.transmits = 0
        self.id = id


def _newest(item: _Item) -> int:
    return -item.id


class BroadcastQueue:
    """Broadcasts waiting to be gossiped, each with its transmit count."""

    __slots__ = ("_size_of", "_items", "_buckets", "_ids")

    def __init__(self, size_of: Callable[[Broadcast], int]) -> None:
        self._size_of = size_of
        self._items: dict[str, _Item] = {}
        self._buckets: dict[int, dict[str, _Item]] = {}
        self._ids = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def queue(self, key: str, message: Broadcast) -> None:
        """Queue `message` about member `key`, replacing any older one about it."""
        self._remove(key)
        self._ids += 1
        item = _Item(key, message, self._size_of(message), self._ids)
        self._items[key] = item
        self._buckets.setdefault(0, {})[key] = item

    def get(self, budget: int, limit: int, overhead: int = 0) -> list[Broadcast]:
        """Messages fitting in `budget` bytes (each costing its size plus `overhead`).

        Counts one transmit for each message returned; drops those that reach `limit`.
        """
        picked: list[_Item] = []
        for count in sorted(self._buckets):
            bucket = self._buckets[count]
            if count >= limit:  # the group shrank: these were sent enough
                for key in list(bucket):
                    self._remove(key)
                continue
            # Newest first: a fresh bucket is in queue order; one that items moved into is not.
            items = reversed(bucket.values()) if count == 0 else sorted(bucket.values(), key=_newest)
            for item in items:
                cost = item.size + overhead
                if cost <= budget:
                    picked.append(item)
                    budget -= cost
            if budget <= overhead:
                break
        for item in picked:
            bucket = self._buckets[item.transmits]
            del bucket[item.key]
            if not bucket:
                del self._buckets[item.transmits]
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            else:
                self._buckets.setdefault(item.transmits, {})[item.key] = item
        return [item.message for item in picked]

    def transmits(self, key: str) -> int | None:
        """How often the message about `key` was sent, or None if none is queued."""
        item = self._items.get(key)
        return None if item is None else item.transmits

    def prune(self, max_items: int) -> int:
        """Keep at most `max_items`, dropping the most-transmitted (oldest) first."""
        dropped = 0
        for count in sorted(self._buckets, reverse=True):
            bucket = self._buckets[count]
            for key in list(bucket):
                if len(self._items) <= max_items:
                    return dropped
                self._remove(key)
                dropped += 1
        return dropped

    def _remove(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        bucket = self._buckets[item.transmits]
        del bucket[key]
        if not bucket:
            del self._buckets[item.transmits]
