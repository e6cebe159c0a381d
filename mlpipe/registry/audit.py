"""The registry's history: every alias move, stored in the tracking server next to the model.

Each event is a registered-model tag ``mlpipe.history.<seq:06d>`` holding one JSON object
(time, who, action, alias, from, to, reason, gates). The sequence number is assigned while the
model's registry lock is held (``mlpipe.registry.locks``), so the order is the order of the
moves. Tags live in the tracking server's database: the record survives any client machine
and shows in the MLflow UI on the model's page.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

HISTORY_PREFIX = "mlpipe.history."
MAX_EVENT_CHARS = 4500
"""MLflow validates registered-model tag values up to 100,000 characters, but its SQL stores
keep them in ``VARCHAR(5000)``: PostgreSQL refuses longer values. Events stay below that."""


@dataclass(frozen=True)
class HistoryEvent:
    """One alias move. ``from_version`` is None when the alias was not set before."""

    seq: int
    time: str
    who: str
    action: str
    alias: str
    from_version: str | None
    to_version: str
    reason: str | None = None
    gates: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["from"] = data.pop("from_version")
        data["to"] = data.pop("to_version")
        text = json.dumps(data, sort_keys=True)
        if len(text) <= MAX_EVENT_CHARS:
            return text
        # Too long to store: shorten the free text first, then the gate list.
        data["reason"] = _clip(data["reason"] or "", 1000)
        data["gates"] = [_clip(g, 200) for g in data["gates"][:10]]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, seq: int, text: str) -> HistoryEvent:
        data = json.loads(text)
        return cls(
            seq=seq,
            time=str(data.get("time", "")),
            who=str(data.get("who", "")),
            action=str(data.get("action", "")),
            alias=str(data.get("alias", "")),
            from_version=data.get("from"),
            to_version=str(data.get("to", "")),
            reason=data.get("reason"),
            gates=list(data.get("gates") or []),
        )


def event_key(seq: int) -> str:
    return f"{HISTORY_PREFIX}{seq:06d}"


def parse_history(tags: Mapping[str, str]) -> list[HistoryEvent]:
    """The events in a registered model's tags, oldest first; unreadable tags are skipped."""
    events = []
    for key, value in tags.items():
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            seq = int(key[len(HISTORY_PREFIX) :])
            events.append(HistoryEvent.from_json(seq, value))
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    return sorted(events, key=lambda e: e.seq)


def next_seq(events: Iterable[HistoryEvent]) -> int:
    return max((e.seq for e in events), default=0) + 1


def rollback_target(events: Iterable[HistoryEvent], alias: str) -> str | None:
    """The version ``alias`` held before its last move that was not undone, or None.

    Promotions push onto a stack and rollbacks pop it, so repeated rollbacks walk back
    through the promotions: 1 -> 2 -> 3, rollback to 2, rollback to 1.
    """
    stack: list[HistoryEvent] = []
    for event in events:
        if event.alias != alias:
            continue
        if event.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event)
    return stack[-1].from_version if stack else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
