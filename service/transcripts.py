"""Transcripts (``TRANSCRIPTS=1``): what was said in a pair's conversations, in and out, in order.

Written by the store's SAVE script (``service/store/transcript.lua``) in the same atomic step as
the message's state, from the payload built here: a message is in the transcript exactly when
its state is saved, and a redelivered ``MessageSid`` (answered from memory) is never written
twice. Read here for the CLI (``sms-sessions transcript``), the API, the console and the end
hook (``ops.py`` and ``console.py`` show it). The key and its entries' fields are in
``service/keys.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from xml.etree import ElementTree

from .handler import Message
from .keys import Keys
from .live import iso
from .outbox import Outgoing
from .redis_client import Client

READ_BATCH = 1000

# One encoder, as sessions.py's: json.dumps with options builds one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Settings:
    """What a transcript keeps: on or off, its retention after the end (ms), its cap."""

    enabled: bool
    retention_ms: int
    max_entries: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(config["TRANSCRIPTS"], config["TRANSCRIPT_RETENTION"] * 1000, config["TRANSCRIPT_MAX"])


OFF = Settings(False, 0, 0)


def payload(
    settings: Settings,
    message: Message,
    answer: str,
    at: int,
    conversation: str,
    outbound: Sequence[Outgoing] = (),
    outcome: str = "",
) -> str:
    """SAVE's argument: '' when transcripts are off, else the message, its reply (``answer``
    as ``responses.memo`` keeps it) and the outbound messages the handler sent, written at
    ``at`` (ms) in ``conversation``, as ``transcript.lua`` reads them: a line of the cap and the
    retention, then a JSON line per entry. ``outcome``: a run that saved no state (``timeout``,
    ``error``: service/runs.py), on the message's entry."""
    if not settings.enabled:
        return ""
    inbound = {"at": at, "conv": conversation, "dir": "in", "sid": message.sid, "body": message.body}
    if message.media:
        inbound["media"] = list(message.media)
    if outcome:
        inbound["outcome"] = outcome
    lines = [f"{settings.max_entries} {settings.retention_ms}", _encode(inbound)]
    lines += [_encode({"at": at, "conv": conversation, "dir": "out", **reply}) for reply in replies(answer)]
    lines += [_encode({"at": at, "conv": conversation, **sent_entry(queued)}) for queued in outbound]
    return "\n".join(lines)


def pushed(settings: Settings, queued: Outgoing, conversation: str) -> str:
    """PUSH's argument (a message sent from outside a webhook): '' when off, else its entry
    without a time, which the script puts first (Redis' clock)."""
    if not settings.enabled:
        return ""
    entry = _encode({"conv": conversation, **sent_entry(queued)})
    return f"{settings.max_entries} {settings.retention_ms}\n{entry}"


def fired(settings: Settings, timer: str, outgoing: Sequence[Outgoing], at: int, conversation: str) -> str:
    """FIRE's argument (a timer's firing): '' when off, else the firing (the timer's name) and
    the messages it queued (its ``send`` calls, then its reply's), written at ``at`` (ms, the
    firing's time) in ``conversation``, as ``payload`` writes SAVE's."""
    if not settings.enabled:
        return ""
    lines = [f"{settings.max_entries} {settings.retention_ms}"]
    lines.append(_encode({"at": at, "conv": conversation, "dir": "timer", "timer": timer}))
    lines += [_encode({"at": at, "conv": conversation, **sent_entry(queued)}) for queued in outgoing]
    return "\n".join(lines)


def sent_entry(queued: Outgoing) -> dict[str, Any]:
    """An outbound message's entry: its id (its statuses name it), body (or template) and media."""
    body = queued.body if queued.body is not None else f"[template {queued.content_sid}]"
    entry: dict[str, Any] = {"dir": "out", "id": queued.id, "body": body, "status": "pending"}
    if queued.extra.get("by"):
        entry["by"] = queued.extra["by"]
    if queued.media:
        entry["media"] = list(queued.media)
    return entry


def entry(fields: dict[str, Any]) -> str:
    """An entry written outside SAVE (an operator's reply), as SAVE writes them."""
    return _encode(fields)


def replies(answer: str) -> list[dict[str, Any]]:
    """The messages of a reply as transcript entries: text (``t``), none (``n``), or each
    ``<Message>`` of TwiML (``x``) with its body and media."""
    kind, kept = answer[:1], answer[1:]
    if kind == "n":
        return []
    if kind != "x":
        return [{"body": kept if kind == "t" else answer}]
    entries = []
    for element in ElementTree.fromstring(kept).iter("Message"):
        body = element.find("Body")
        text = body.text if body is not None else element.text
        media = [m.text.strip() for m in element.iter("Media") if m.text]
        sent: dict[str, Any] = {"body": (text or "").strip()}
        if media:
            sent["media"] = media
        entries.append(sent)
    return entries


@dataclass(frozen=True)
class Entry:
    """One transcript entry."""

    at: int  # epoch ms
    conversation: str
    direction: str  # in | out | timer (a timer fired: its name is ``timer``)
    body: str
    media: tuple[str, ...] = ()
    sid: str = ""  # an inbound message's MessageSid, an operator's reply's Twilio SID
    by: str = ""  # 'operator' for an operator's reply (service/handoff.py)
    id: str = ""  # an outbound message's id (service/outbox.py)
    status: str = ""  # an operator's reply: Twilio's status, or why it was not sent
    timer: str = ""  # the timer that fired (direction ``timer``)
    outcome: str = ""  # an inbound message whose handler saved nothing: ``timeout``, ``error``

    @classmethod
    def parse(cls, raw: str) -> Entry | None:
        """An entry as stored (JSON), or None when it is not one (a hand edit)."""
        try:
            fields = json.loads(raw)
            return cls(
                at=int(fields["at"]),
                conversation=str(fields.get("conv", "")),
                direction=str(fields["dir"]),
                body=str(fields.get("body", "")),
                media=tuple(str(url) for url in fields.get("media", ())),
                sid=str(fields.get("sid", "")),
                by=str(fields.get("by", "")),
                id=str(fields.get("id", "")),
                status=str(fields.get("status", "")),
                timer=str(fields.get("timer", "")),
                outcome=str(fields.get("outcome", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": iso(self.at),
            "direction": self.direction,
            "body": self.body,
            "media": list(self.media),
            "conversation": self.conversation,
        }
        for name in ("sid", "by", "status", "id", "timer", "outcome"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        return data

    def line(self) -> str:
        if self.direction == "timer":
            return f"{iso(self.at)} -- timer {self.timer} fired"
        arrow = "<-" if self.direction == "in" else "->"
        media = "".join(f" [media] {url}" for url in self.media)
        by = f" ({self.by}: {self.status})" if self.by else (f" ({self.status})" if self.status else "")
        outcome = f" (handler {self.outcome}: nothing saved)" if self.outcome else ""
        return f"{iso(self.at)} {arrow} {self.body}{media}{by}{outcome}"


class Transcripts:
    """Reads the pairs' transcripts."""

    def __init__(self, client: Client, keys: Keys):
        self.client, self.keys = client, keys

    def read(self, sender: str, recipient: str, conversation: str | None = None) -> list[Entry]:
        """The pair's entries, oldest first; only conversation ``conversation``'s if given."""
        key = self.keys.conversation(sender, recipient).transcript
        entries: list[Entry] = []
        start = 0
        while True:
            batch = self.client.lrange(key, start, start + READ_BATCH - 1)
            entries += [found for found in map(Entry.parse, batch) if found is not None]
            if len(batch) < READ_BATCH:
                break
            start += READ_BATCH
        entries = folded(entries)
        if conversation is not None:
            entries = [entry for entry in entries if entry.conversation == conversation]
        return entries


def folded(entries: list[Entry]) -> list[Entry]:
    """Status entries shown on their outbound message's entry (its latest status), not apart."""
    shown: list[Entry] = []
    by_id: dict[str, int] = {}
    for found in entries:
        if found.direction == "status":
            if found.id in by_id:
                position = by_id[found.id]
                shown[position] = replace(shown[position], status=found.status)
            continue
        if found.id:
            by_id[found.id] = len(shown)
        shown.append(found)
    return shown
