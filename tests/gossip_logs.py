"""Every agent's own membership view, read from its log (netns clusters).

A client agent has no Control API, so its view of the membership cannot be asked for;
but every change it sees is logged by the gossip shell (`agent/gossip.py` `_deliver`):

    timestamp=2026-11-25T12:35:09.149261Z level=warning event=gossip.member_dead node=h2 name=h3 incarnation=0 ...

`member_events(text)` parses those lines, `views(cluster)` folds them into each agent's
current view: observer -> member -> (state, incarnation). `core_events(text, "swim.x")`
finds the SWIM core's own events (`event=swim.agent_gone node=h2 member=h4 ...`). An agent does not log itself,
and a restarted agent's log restarts at the harness's `--- HH:MM:SS starting agent` line.
Used by tests/test_netns_gossip.py and bench/gossip_detect.py; nothing in the product.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

_LINE = re.compile(
    r"^timestamp=(?P<ts>\S+) level=\w+ event=gossip\.member_(?P<kind>\w+) node=(?P<node>\S+) "
    r"name=(?P<name>\S+) incarnation=(?P<inc>\d+)"
)
_DROP = re.compile(r"^timestamp=(?P<ts>\S+) level=\w+ event=gossip\.packet_dropped .*?reason=(?P<reason>\w+)")
_CORE = re.compile(r"^timestamp=(?P<ts>\S+) level=\w+ event=(?P<event>swim\.\w+) (?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")
START_MARK = "--- "


@dataclass(frozen=True, slots=True)
class MemberEvent:
    time: float  # unix seconds (the agent's log timestamp, UTC)
    kind: str  # join, alive, suspect, dead, leave, update...
    observer: str
    name: str
    incarnation: int


def _unix(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def member_events(text: str) -> list[MemberEvent]:
    out = []
    for line in text.splitlines():
        if (m := _LINE.match(line)) is not None:
            out.append(MemberEvent(_unix(m["ts"]), m["kind"], m["node"], m["name"], int(m["inc"])))
    return out


def drops(text: str) -> list[tuple[float, str]]:
    """(time, reason) of every `gossip.packet_dropped` warning in the log text."""
    return [(_unix(m["ts"]), m["reason"]) for line in text.splitlines() if (m := _DROP.match(line))]


def core_events(text: str, event: str) -> list[tuple[float, dict[str, str]]]:
    """(time, key=value fields) of every `event` (e.g. "swim.agent_gone") in the log text."""
    return [(_unix(m["ts"]), dict(_FIELD.findall(m["rest"])))
            for line in text.splitlines() if (m := _CORE.match(line)) and m["event"] == event]


def current_run(text: str) -> str:
    """The part of a log written by the agent's latest start."""
    i = text.rfind("\n" + START_MARK)
    return text[i + 1:] if i >= 0 else text


def view(text: str) -> dict[str, tuple[str, int]]:
    """member -> (state, incarnation) as the agent that wrote `text` sees it now."""
    state: dict[str, tuple[str, int]] = {}
    for ev in member_events(current_run(text)):
        st = "alive" if ev.kind in ("join", "alive", "update") else ("left" if ev.kind == "leave" else ev.kind)
        state[ev.name] = (st, ev.incarnation)
    return state


def views(cluster: Any, hosts: Any = None) -> dict[str, dict[str, tuple[str, int]]]:
    """observer -> its view, for every host (default) of a `tests.netns.NetnsCluster`."""
    return {h.name: view(cluster.log(h)) for h in (hosts if hosts is not None else cluster.hosts)}


def events(cluster: Any, since: float = 0.0, kinds: tuple[str, ...] = ()) -> list[MemberEvent]:
    """Every member event logged by any host at or after `since`, oldest first."""
    out = [ev for h in cluster.hosts for ev in member_events(cluster.log(h))
           if ev.time >= since and (not kinds or ev.kind in kinds)]
    return sorted(out, key=lambda e: e.time)
