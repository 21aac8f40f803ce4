"""What the scripts leave for reading: the events stream (``started``/``ended``), the samples
stream, the per-tag minute tallies, and the end hook's payloads, each decoded here, once.

Adding a field to an event: the script that writes it (``service/store/save.lua`` for
``started``, ``service/store/ending.lua`` for ``ended`` and the end hook's payload), ``Event``
(and ``Ending``) here, docs/operating.md's list of event fields, and a test (docs/design.md:
"Adding a field to an event").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .clock import duration, now_ms
from .handler import END_REASONS
from .keys import Keys
from .live import iso
from .redis_client import Client

READ_BATCH = 1000
# The per-minute tallies the scripts keep per tag (sms:minutes:{NN}), and their codes there
# (field ``<minute><code>``, as service/store/tally.lua says).
TALLY = ("messages", "started", *END_REASONS, "duration_ms", "ended_messages")
TALLY_CODES = "mseoxhdn"
TALLIED = re.compile(r"([0-9]+)([a-z])")
ENDING_FIELDS = ("from", "to", "reason", "messages", "started_at", "ended_at", "state")  # an earlier order


@dataclass(frozen=True)
class Event:
    """One entry of the events stream."""

    id: str
    type: str  # started | ended
    sender: str
    recipient: str
    messages: int
    started_at: int  # epoch ms
    conversation: str
    reason: str | None = None  # ended: expired | operator | opt-out | handler
    ended_at: int | None = None

    @classmethod
    def parse(cls, entry_id: str, fields: dict[str, str]) -> Event:
        return cls(
            id=entry_id,
            type=fields.get("type", ""),
            sender=fields.get("from", ""),
            recipient=fields.get("to", ""),
            messages=_int(fields.get("messages")),
            started_at=_int(fields.get("started_at")),
            conversation=fields.get("conversation", ""),
            reason=fields.get("reason"),
            ended_at=_int(fields["ended_at"]) if "ended_at" in fields else None,
        )

    @property
    def duration_s(self) -> float | None:
        return (self.ended_at - self.started_at) / 1000 if self.ended_at is not None else None

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "type": self.type,
            "from": self.sender,
            "to": self.recipient,
            "messages": self.messages,
            "started_at": self.started_at,
            "conversation": self.conversation,
        }
        if self.type == "ended":
            data.update(reason=self.reason, ended_at=self.ended_at)
        return data

    def line(self) -> str:
        """One human-readable line (``sms-sessions events``)."""
        at = iso(int(self.id.split("-")[0]))
        text = f"{at}  {self.type:<7}  {self.sender} → {self.recipient}  messages={self.messages}"
        if self.type == "ended":
            text += f"  reason={self.reason}  lasted={duration(self.duration_s or 0)}"
        return text


@dataclass(frozen=True)
class Ending:
    """An ended conversation waiting for the end hook: its payload in ``sms:ending:{NN}``,
    written by ``finish`` in service/store/ending.lua."""

    sender: str
    recipient: str
    reason: str
    messages: int
    started_at: int  # epoch ms
    ended_at: int
    state: str  # JSON, as stored
    timers: str = ""  # the timers pending when it ended, as stored (service/timers.py)

    @classmethod
    def decode(cls, raw: str) -> Ending | None:
        """The payload, or None if this version cannot read it. A JSON map is read by its
        names (fields it does not know, a later version's, are ignored); a 7-element array is
        what versions before service/store/ (scripts in service/conversations.py) wrote, read
        until their entries are gone (the first sweep once every worker runs service/store/'s
        version or later): then that branch can go."""
        try:
            payload = json.loads(raw)
            if isinstance(payload, list) and len(payload) == 7:
                payload = dict(zip(ENDING_FIELDS, payload))
            return cls(
                sender=payload["from"],
                recipient=payload["to"],
                reason=payload["reason"],
                messages=_int(str(payload["messages"])),
                started_at=_int(str(payload["started_at"])),
                ended_at=_int(str(payload["ended_at"])),
                state=payload["state"],
                timers=payload.get("timers") or "",
            )
        except (ValueError, TypeError, KeyError, RecursionError):
            return None


@dataclass(frozen=True)
class Sample:
    at: int  # epoch ms
    live: int
    messages: int  # saved in the minute before ``at``


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


class History:
    """Reads the events and samples streams, and the per-tag minute tallies."""

    def __init__(self, client: Client, keys: Keys):
        self.client = client
        self.keys = keys

    def since(self, start_ms: int) -> Iterator[Event]:
        """Every event from ``start_ms`` on, oldest first, read in batches."""
        lowest = str(start_ms)
        while True:
            batch = self.client.xrange(self.keys.events, lowest, "+", count=READ_BATCH)
            for entry_id, fields in batch:
                yield Event.parse(entry_id, fields)
            if len(batch) < READ_BATCH:
                return
            lowest = "(" + batch[-1][0]

    def recent(self, limit: int = 50, kind: str = "ended") -> list[Event]:
        """The last ``limit`` events of one type, newest first (reads at most 20 × limit)."""
        found: list[Event] = []
        highest = "+"
        for _ in range(20):
            batch = self.client.xrevrange(self.keys.events, highest, "-", count=limit)
            found += [event for event in (Event.parse(i, f) for i, f in batch) if event.type == kind]
            if len(found) >= limit or len(batch) < limit:
                break
            highest = "(" + batch[-1][0]
        return found[:limit]

    def stats(self) -> dict[str, Any]:
        """The last hour: conversations started and ended (by reason), and the ended ones'
        average duration and messages, from each tag's per-minute tallies (100 reads,
        whatever the traffic)."""
        totals = [0] * len(TALLY)
        minute = now_ms() // 60000
        for tally in self.minute_tallies(minute - 59, minute):
            totals = [total + value for total, value in zip(totals, tally)]
        figures = dict(zip(TALLY, totals))
        ended = {reason: figures[reason] for reason in END_REASONS if figures[reason]}
        count = sum(ended.values())
        return {
            "started": figures["started"],
            "ended": ended,
            "average_duration_s": round(figures["duration_ms"] / count / 1000, 1) if count else None,
            "average_messages": round(figures["ended_messages"] / count, 2) if count else None,
        }

    def minute_tallies(self, first: int, last: int) -> Iterator[list[int]]:
        """Every tag's tallies (in ``TALLY``'s order) of the minutes ``first`` to ``last``.

        A tag's hash holds one field per minute and tally, ``<minute><code>`` (``TALLY_CODES``);
        an earlier version wrote one record per minute, ``minute % 60`` = ``"<minute> <the
        tallies in TALLY's order>"``, read here too until the scripts clear it.
        """
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hgetall(self.keys.minutes(shard))
        for fields in pipe.execute():
            by_minute: dict[int, list[int]] = {}
            for field, value in fields.items():
                counted = TALLIED.fullmatch(field)
                if counted and value.isdigit():
                    minute, code = int(counted[1]), counted[2]
                    if first <= minute <= last and code in TALLY_CODES:
                        by_minute.setdefault(minute, [0] * len(TALLY))[TALLY_CODES.index(code)] += int(value)
                elif field.isdigit():  # an earlier version's record
                    numbers = value.split()
                    if len(numbers) == len(TALLY) + 1 and all(n.isdigit() for n in numbers):
                        minute, *tally = (int(n) for n in numbers)
                        if first <= minute <= last:
                            yield tally
            yield from by_minute.values()

    def messages_in(self, minute: int) -> int:
        """Messages saved in ``minute`` over every tag: one field of each tag's tallies (and an
        earlier version's record of that minute), not the whole hour ``minute_tallies`` reads."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hmget(self.keys.minutes(shard), f"{minute}m", str(minute % 60))
        total = 0
        for counted, record in pipe.execute():
            if counted and counted.isdigit():
                total += int(counted)
            numbers = (record or "").split()
            old = len(numbers) == len(TALLY) + 1 and all(n.isdigit() for n in numbers)
            if old and int(numbers[0]) == minute:  # an earlier version's record: messages first
                total += int(numbers[1])
        return total

    def samples(self, since_ms: int) -> list[Sample]:
        entries = self.client.xrange(self.keys.samples, str(since_ms), "+")
        return [
            Sample(int(i.split("-")[0]), _int(f.get("live")), _int(f.get("messages"))) for i, f in entries
        ]

    def follow(self, after: str, block_ms: int = 5000) -> list[Event]:
        """Events after the id ``after``, waiting up to ``block_ms`` for one."""
        reply = self.client.xread({self.keys.events: after}, block=block_ms, count=READ_BATCH)
        return [Event.parse(i, f) for _, entries in reply for i, f in entries]
