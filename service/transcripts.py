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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from .handler import Message
from .keys import Keys
from .live import iso
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


def payload(settings: Settings, message: Message, answer: str) -> str:
    """SAVE's last argument: '' when transcripts are off, else the message and its reply
    (``answer`` as ``responses.memo`` keeps it) as ``transcript.lua`` reads them."""
    if not settings.enabled:
        return ""
    inbound = ["dir", "in", "sid", message.sid, "body", message.body]
    if message.media:
        inbound += ["media", " ".join(message.media)]
    return _encode([settings.max_entries, settings.retention_ms, inbound, *replies(answer)])


def replies(answer: str) -> list[list[str]]:
    """The messages of a reply as transcript entries: text (``t``), none (``n``), or each
    ``<Message>`` of TwiML (``x``) with its body and media."""
    kind, kept = answer[:1], answer[1:]
    if kind == "n":
        return []
    if kind != "x":
        return [["dir", "out", "body", kept if kind == "t" else answer]]
    entries = []
    for element in ElementTree.fromstring(kept).iter("Message"):
        body = element.find("Body")
        text = body.text if body is not None else element.text
        media = [m.text.strip() for m in element.iter("Media") if m.text]
        entry = ["dir", "out", "body", (text or "").strip()]
        if media:
            entry += ["media", " ".join(media)]
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class Entry:
    """One transcript entry."""

    id: str  # the stream entry's id
    at: int  # epoch ms
    conversation: str
    direction: str  # in | out
    body: str
    media: tuple[str, ...] = ()
    sid: str = ""  # an inbound message's MessageSid, an operator's reply's Twilio SID
    by: str = ""  # 'operator' for an operator's reply (service/handoff.py)
    status: str = ""  # an operator's reply: Twilio's status, or why it was not sent

    @classmethod
    def parse(cls, entry_id: str, fields: Mapping[str, str]) -> Entry:
        media = fields.get("media", "")
        return cls(
            entry_id,
            int(fields.get("at", "0") or 0),
            fields.get("conv", ""),
            fields.get("dir", ""),
            fields.get("body", ""),
            tuple(media.split()) if media else (),
            fields.get("sid", ""),
            fields.get("by", ""),
            fields.get("status", ""),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": iso(self.at),
            "direction": self.direction,
            "body": self.body,
            "media": list(self.media),
            "conversation": self.conversation,
        }
        for name in ("sid", "by", "status"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        return data

    def line(self) -> str:
        arrow = "<-" if self.direction == "in" else "->"
        media = "".join(f" [media] {url}" for url in self.media)
        by = f" ({self.by}: {self.status})" if self.by else ""
        return f"{iso(self.at)} {arrow} {self.body}{media}{by}"


class Transcripts:
    """Reads the pairs' transcripts."""

    def __init__(self, client: Client, keys: Keys):
        self.client, self.keys = client, keys

    def read(self, sender: str, recipient: str, conversation: str | None = None) -> list[Entry]:
        """The pair's entries, oldest first; only conversation ``conversation``'s if given."""
        key = self.keys.conversation(sender, recipient).transcript
        entries: list[Entry] = []
        lowest = "-"
        while True:
            batch = self.client.xrange(key, lowest, "+", count=READ_BATCH)
            entries += [Entry.parse(entry_id, fields) for entry_id, fields in batch]
            if len(batch) < READ_BATCH:
                break
            lowest = "(" + batch[-1][0]
        if conversation is not None:
            entries = [entry for entry in entries if entry.conversation == conversation]
        return entries
