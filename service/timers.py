"""A conversation's timers: what ``conversation.remind`` sets, as stored and read back.

A conversation's pending timers live in its hash, field ``timers``: one JSON object, name ->
``{"id", "due", "data", "reply"}`` (``due`` in epoch ms on Redis' clock; ``reply``: cancelled by
the next inbound message), and its entry in its tag's due index (``<prefix>timers:{NN}``,
service/keys.py) is scored by the earliest due. Both are computed here, in the handler's
process, while the conversation is locked, and stored by the script that saves the handler's
effect (``save.lua`` for a message, ``fire.lua`` for a timer): no timer changes but with the
conversation. A relative time counts from the message's (or the firing's) time, Redis' clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

MAX_TIMERS = 50  # pending per conversation
MAX_NAME = 64
MAX_DATA_BYTES = 4096  # a timer's data, as JSON
MAX_TTL = 30 * 24 * 3600  # expire_after's longest, CONVERSATION_TTL's too
# One encoder (json.dumps with options other than the defaults builds one per call).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class Timer(NamedTuple):
    """A pending timer: ``due`` is when it fires (at the earliest; the sweeper fires it within
    ``SWEEP_INTERVAL`` of it), ``data`` what the handler gets back as ``message.data``. (A
    named tuple: a sweep decodes every timer of each conversation it fires.)"""

    name: str
    due_ms: int
    data: Any = None
    cancel_on_reply: bool = True
    id: str = ""

    @property
    def due(self) -> datetime:
        return datetime.fromtimestamp(self.due_ms / 1000, UTC)

    def to_json(self) -> dict[str, Any]:
        """As the operators' API and ``show --json`` give it."""
        return {
            "name": self.name,
            "due": self.due_ms,
            "data": self.data,
            "cancel_on_reply": self.cancel_on_reply,
        }


def new_id() -> str:
    """A timer's id: 12 hex digits, new for every ``remind`` (a timer set again under its name
    is another timer: the firing of the one it replaced can never apply to it)."""
    return f"{random.getrandbits(48):012x}"


def decode(raw: str) -> dict[str, Timer]:
    """The ``timers`` field as stored; ``{}`` for none, or for what this version cannot read
    (a hand edit: then its timers are dropped with the next save rather than failing it)."""
    if not raw:
        return {}
    try:
        stored = json.loads(raw)
        return {
            name: Timer(
                name, int(entry["due"]), entry.get("data"), bool(entry.get("reply", True)), str(entry["id"])
            )
            for name, entry in stored.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def encode(timers: Mapping[str, Timer]) -> str:
    """As stored: ``{}`` for none."""
    return json.dumps(
        {
            timer.name: {
                "id": timer.id,
                "due": timer.due_ms,
                "data": timer.data,
                "reply": timer.cancel_on_reply,
            }
            for timer in timers.values()
        },
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def earliest(timers: Mapping[str, Timer]) -> int | str:
    """The earliest due (ms), the due index's score; ``''`` for none."""
    return min((timer.due_ms for timer in timers.values()), default="")


def next_due(timers: Mapping[str, Timer], now_ms: int) -> Timer | None:
    """The timer to fire at ``now_ms``: the earliest due, the first by name on a tie."""
    due = [timer for timer in timers.values() if timer.due_ms <= now_ms]
    return min(due, key=lambda timer: (timer.due_ms, timer.name)) if due else None


def due_at(after: timedelta | float | datetime, now_ms: int) -> int:
    """``after`` (a ``timedelta`` or seconds from ``now_ms``, or an absolute, timezone-aware
    ``datetime``) in epoch ms; ``ValueError`` for a naive datetime or a negative delay."""
    if isinstance(after, datetime):
        if after.tzinfo is None:
            raise ValueError("remind: a datetime must carry its timezone (datetime.now(UTC) + …)")
        return int(after.timestamp() * 1000)
    seconds = after.total_seconds() if isinstance(after, timedelta) else float(after)
    if not seconds >= 0:  # also NaN
        raise ValueError(f"remind: after must be 0 or more seconds, not {after!r}")
    return now_ms + int(seconds * 1000)


def checked(name: str, data: Any, pending: int) -> None:
    """``ValueError`` for a name or data that cannot be stored, or one timer too many."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise ValueError(f"remind: a timer's name is 1 to {MAX_NAME} printable characters")
    if pending >= MAX_TIMERS:
        raise ValueError(f"remind: at most {MAX_TIMERS} timers pending per conversation")
    try:
        size = len(json.dumps(data, allow_nan=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"remind: data must be JSON ({error})") from None
    if size > MAX_DATA_BYTES:
        raise ValueError(f"remind: data is {size} bytes of JSON, over {MAX_DATA_BYTES}")
