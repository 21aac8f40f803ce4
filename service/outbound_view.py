"""Outbound messages as operators see them: a conversation's, with their statuses (``sms-sessions
conversations show``, ``GET /ops/conversations/…`` and the console's conversation page), and
the outbox across tags (``sms-sessions outbox``, ``GET /ops/outbox``): what is queued, being
sent, retrying or failed.

What waits is found through the tags' due indexes (``<prefix>due:{NN}``, the sender's own);
what failed through ``<prefix>failed:{NN}``, where the sender (a message it gave up on) and
``POST /sms/status`` (one Twilio reported ``failed`` or ``undelivered``) note each failure:
per tag the latest ``FAILURES_KEPT`` of the last day, the time the records are kept. The note
is written after the record, in its own command: a process that dies between the two leaves
the record without its note (the message's status still says failed; only the list misses it).
Every read names single keys, one pipeline per step: the same code runs on a Cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .clock import now_ms
from .keys import SEPARATOR, ConversationKeys, Keys, shard_of
from .redis_client import Client

FAILURES_KEPT = 100  # per tag
FAILURES_KEEP_MS = 24 * 3600 * 1000  # a day: the records' own keep past the conversation's end
FAILED_STATUSES = frozenset({"failed", "undelivered"})
SHOWN_PER_CONVERSATION = 100  # records a conversation shows: its latest
PREVIEW = 60  # characters of a body the outbox's table shows


def iso(epoch_ms: int | None) -> str | None:
    """``2026-01-02T03:04:05.678Z``, or None."""
    if not epoch_ms:
        return None
    moment = datetime.fromtimestamp(int(epoch_ms) / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(message_id: str, raw_message: str | None, raw_state: str | None) -> dict[str, Any]:
    """One outbound message as operators see it (its two fields of the ``sent`` hash): what it
    says and where it stands. Times ISO-8601 UTC."""
    message = _json(raw_message)
    state = _json(raw_state)
    data: dict[str, Any] = {
        "id": message_id,
        "to": message.get("to"),
        "from": message.get("from"),
        "body": message.get("body"),
        "media": message.get("media") or [],
        "stage": state.get("stage", "queued"),
        "status": state.get("status", "pending"),
        "attempts": int(state.get("attempts") or 0),
        "queued_at": iso(state.get("queued_at")),
    }
    if message.get("content_sid"):
        data["content_sid"] = message["content_sid"]
        data["content_variables"] = message.get("content_variables")
    for name in ("sid", "error_code", "error_message", "reason"):
        if state.get(name):
            data[name] = state[name]
    if state.get("stage") == "retrying" and state.get("next_at"):
        data["next_at"] = iso(state["next_at"])
    data["updated_at"] = iso(state.get("updated_at"))
    return data


def _json(raw: str | None) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:  # a hand edit: shown empty rather than failing the page
        return {}
    return value if isinstance(value, dict) else {}


def _order(state: dict) -> tuple[int, int]:
    """Commit order: when the message was queued (records queued before ``queued_at`` was kept
    fall back on their first attempt, then their last change), then its place in its save."""
    at = state.get("queued_at") or state.get("first_attempt_at") or state.get("updated_at") or 0
    return int(at), int(state.get("n") or 0)


def conversation_records(fields: dict[str, str]) -> list[dict[str, Any]]:
    """A conversation's outbound records (its ``sent`` hash, as HGETALL returns it), oldest
    first: its latest ``SHOWN_PER_CONVERSATION``."""
    ids = [name for name in fields if not name.endswith(":s")]
    ids.sort(key=lambda message_id: _order(_json(fields.get(message_id + ":s"))))
    return [record(i, fields[i], fields.get(i + ":s")) for i in ids[-SHOWN_PER_CONVERSATION:]]


@dataclass(frozen=True)
class Outbox:
    """``pending``: queued messages (queued, claimed while a sender holds them, retrying) of the
    conversations due soonest, in the order the sender takes them; ``failed``: the latest
    failures, newest first; ``more``: whether either was cut at the limit."""

    pending: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    more: bool

    def to_json(self) -> dict[str, Any]:
        return {"pending": self.pending, "failed": self.failed, "more": self.more}


class OutboundView:
    def __init__(self, client: Client, keys: Keys):
        self.client = client
        self.keys = keys

    def conversation(self, sender: str, recipient: str) -> list[dict[str, Any]]:
        """The conversation's outbound messages with their statuses, oldest first."""
        return conversation_records(self.client.hgetall(self.keys.conversation(sender, recipient).sent))

    def note_failure(self, keys: ConversationKeys, message_id: str) -> None:
        """Lists a failed message in its tag's failures (the latest ``FAILURES_KEPT`` of the
        last day)."""
        now = now_ms()
        failed = self.keys.failed(shard_of(keys.sender))
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(failed, {message_id + SEPARATOR + keys.member: now})
        pipe.zremrangebyscore(failed, "-inf", now - FAILURES_KEEP_MS)
        pipe.zremrangebyrank(failed, 0, -FAILURES_KEPT - 1)
        pipe.pexpire(failed, FAILURES_KEEP_MS)
        pipe.execute()

    def backlog(self) -> tuple[int, float]:
        """Conversations whose next outbound message is due now (not being sent, not waiting to
        retry), and how long the one due longest has waited, in seconds (the metrics'): one
        ZCOUNT and one ZRANGE per tag, in one pipeline."""
        now = now_ms()
        pipe = self.client.pipeline(transaction=False)
        for due in self.keys.dues():
            pipe.zcount(due, "-inf", now)
            pipe.zrange(due, 0, 0, withscores=True)
        replies = pipe.execute()
        count = sum(replies[0::2])
        oldest = min((int(first[0][1]) for first in replies[1::2] if first), default=now)
        return count, max(0, now - oldest) / 1000

    def outbox(self, limit: int) -> Outbox:
        """Up to ``limit`` waiting messages and up to ``limit`` failures, across every tag, in
        at most four pipelined round trips (indexes, outboxes, and the two lists' records)."""
        pipe = self.client.pipeline(transaction=False)
        for due in self.keys.dues():
            pipe.zrange(due, 0, limit, withscores=True)
        for index in self.keys.failures():
            pipe.zrevrange(index, 0, limit, withscores=True)
        replies = pipe.execute()
        waiting = sorted((score, member) for reply in replies[: len(replies) // 2] for member, score in reply)
        failures = sorted(
            ((score, entry) for reply in replies[len(replies) // 2 :] for entry, score in reply),
            reverse=True,
        )
        more = len(waiting) > limit or len(failures) > limit
        conversations = [self.keys.from_member(member) for _, member in waiting[:limit]]
        pipe = self.client.pipeline(transaction=False)
        for keys in conversations:
            pipe.lrange(keys.outbound, 0, limit)
        queued: list[tuple[ConversationKeys, str]] = []
        for keys, ids in zip(conversations, pipe.execute()):
            queued += [(keys, message_id) for message_id in ids[: limit + 1 - len(queued)]]
        failed: list[tuple[ConversationKeys, str]] = []
        for _, entry in failures[:limit]:
            message_id, _, member = entry.partition(SEPARATOR)
            failed.append((self.keys.from_member(member), message_id))
        pending, gone = self._records(queued), self._records(failed)
        return Outbox(pending[:limit], gone, more or len(pending) > limit)

    def _records(self, wanted: list[tuple[ConversationKeys, str]]) -> list[dict[str, Any]]:
        """The records of ``wanted`` (conversation, message id), in that order; one no longer
        kept is left out."""
        if not wanted:
            return []
        pipe = self.client.pipeline(transaction=False)
        for keys, message_id in wanted:
            pipe.hmget(keys.sent, [message_id, message_id + ":s"])
        return [
            record(message_id, raw_message, raw_state)
            for (_, message_id), (raw_message, raw_state) in zip(wanted, pipe.execute())
            if raw_message is not None
        ]
