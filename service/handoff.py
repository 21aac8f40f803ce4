"""Human handoff: an operator takes a live conversation over from the bot, replies, and hands it
back; the console, the API and ``sms-sessions handoff`` share this one implementation.

- Take over (``HANDOFF_TIMEOUT`` at most): the bot is paused for the conversation. Its inbound
  messages are still saved (counted, in the transcript) but not answered by the handler; the
  conversation does not expire while held.
- Reply: an outbound message (``sending.send(..., by="operator")``: ``ops.operator_reply``)
  from the conversation's number, written to the transcript by the step that queues it.
- Hand back (or the hold's end): the bot answers the next message, with the state as it was
  plus the values the operator set.
- The handler may ask for a person (``conversation.handoff(reason)``): the conversation is
  listed as waiting (the console's overview, a gauge) until an operator takes it over, which
  observes how long it waited.

The scripts: ``store/handoff.lua`` (take over, hand back) and ``store/person.lua`` (SAVE's part).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .clock import now_ms
from .keys import SEPARATOR, Keys
from .metrics import Metrics
from .redis_client import Client
from .store import ConversationStore, decode_state
from .transcripts import Settings as TranscriptSettings

BACK_TRIES = 50  # a hand back waits this many times for a message in progress to be saved
BACK_PAUSE = 0.1


class NotLive(Exception):
    """No live conversation for the pair."""


class Busy(Exception):
    """Messages kept the conversation busy: try again."""


@dataclass(frozen=True)
class Waiting:
    """A conversation waiting for a person."""

    sender: str
    recipient: str
    since: int  # ms
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"from": self.sender, "to": self.recipient, "since_ms": self.since, "reason": self.reason}


class Handoffs:
    def __init__(
        self,
        client: Client,
        keys: Keys,
        store: ConversationStore,
        metrics: Metrics,
        config: Mapping[str, Any],
    ):
        self.client, self.keys, self.store, self.metrics = client, keys, store, metrics
        self.hold_ms = config["HANDOFF_TIMEOUT"] * 1000
        self.transcripts = TranscriptSettings.from_config(config)
        self.config = config

    def take_over(self, sender: str, recipient: str) -> None:
        """Pauses the bot for the conversation (``HANDOFF_TIMEOUT`` at most)."""
        waited = self.store.take_over(self.keys.conversation(sender, recipient), self.hold_ms)
        if waited is None:
            raise NotLive(sender + SEPARATOR + recipient)
        if waited >= 0:
            self.metrics.handoff_wait.observe(waited / 1000)

    def hand_back(self, sender: str, recipient: str, values: Mapping[str, Any] | None = None) -> None:
        """The bot resumes with the state as it was, plus ``values`` (the operator's)."""
        keys = self.keys.conversation(sender, recipient)
        for _ in range(BACK_TRIES):
            seen, state = "", ""
            if values:
                seen = self.client.hget(keys.conversation, "state") or ""
                current = decode_state(seen) if seen else {}
                state = json.dumps({**(current or {}), **values}, separators=(",", ":"), ensure_ascii=False)
            result = self.store.hand_back(keys, seen, state)
            if result == 1:
                return
            if result == 0:
                raise NotLive(keys.member)
            time.sleep(BACK_PAUSE)  # a message in progress, or the state changed: again
        raise Busy(keys.member)

    def paused_until(self, sender: str, recipient: str) -> int | None:
        """Until when (ms) an operator holds the conversation, or None."""
        raw = self.client.hget(self.keys.conversation(sender, recipient).conversation, "paused")
        until = int(raw) if raw and raw.isdigit() else 0
        return until if until > now_ms() else None

    def waiting(self) -> list[Waiting]:
        """Every conversation waiting for a person, longest first."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.zrange(self.keys.waiting(shard), 0, -1, withscores=True)
        found = sorted(
            ((int(score), member) for members in pipe.execute() for member, score in members),
        )
        if not found:
            return []
        pipe = self.client.pipeline(transaction=False)
        for _, member in found:
            pipe.hget(self.keys.from_member(member).conversation, "wants")
        waiting = []
        for (since, member), wants in zip(found, pipe.execute()):
            sender, _, recipient = member.partition(SEPARATOR)
            waiting.append(Waiting(sender, recipient, since, (wants or "").partition(" ")[2]))
        return waiting

    def waiting_gauge(self) -> tuple[int, float]:
        """How many wait for a person, and the longest wait in seconds (the metrics'): one
        ZRANGE per tag, in one pipeline (few wait at any time)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.zrange(self.keys.waiting(shard), 0, -1, withscores=True)
        tags = [members for members in pipe.execute() if members]
        oldest = min((int(members[0][1]) for members in tags), default=None)
        count = sum(len(members) for members in tags)
        return count, (max(0, now_ms() - oldest) / 1000 if oldest is not None else 0.0)
