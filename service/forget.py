"""Forgetting a number on request: ``sms-sessions forget <number>`` and ``DELETE /ops/numbers/<number>``.

Removes what the service holds of a sender's number: its conversations, live and ended (their
hashes, locks, lines, transcripts, pending timers and inbound messages), their outbound messages
(queued and sent records, due and failed entries, WhatsApp windows), their end hooks' pending
payloads, its entries in the events stream and a Cluster's outboxes, plain or hashed
(``EVENTS_NUMBERS=hashed``), and, when asked, its opt-out record.

Safe while the number's messages arrive: a fence (``<prefix>forgetting:{NN}:<number>``) is set
first, and while it stands SAVE refuses the number's messages (answered 503, nothing written),
so none commits half-way through; Twilio retries them, and once the fence is gone they start a
new conversation. The tag's keys go in one script (``store/forget.lua``), twice: once before
the events stream is read, once after, for the locks and lines of messages that arrived
meanwhile. The events stream is read in batches (it can hold millions of entries, which one
script would block Redis for). On a Cluster the sweeper may be relaying an event of the number
from an outbox while the stream is read, so the stream is read again after a sweep interval.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

from .keys import Keys, shard_of
from .numbers_hash import NumberHash
from .redis_client import Client
from .store import Script

READ_BATCH = 1000
SCAN_COUNT = 1000
FENCE_MS = 120_000  # the fence outlives a forget that died half-way, then lapses
GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass
class Forgotten:
    """What ``forget`` removed."""

    number: str
    live_conversations: int = 0  # live ones ended (their index entries)
    keys: int = 0  # conversation hashes, locks, lines, wake-ups and transcripts deleted
    transcripts: int = 0  # of those keys, transcripts
    end_hooks: int = 0  # pending end hook payloads
    events: int = 0  # entries of the events stream and the outboxes

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"forgot {self.number}: {self.live_conversations} live conversation(s), {self.keys} key(s) "
            f"({self.transcripts} transcript(s)), {self.end_hooks} pending end hook(s), "
            f"{self.events} event(s)"
        )


class Forgetting:
    """Runs ``forget`` on one Redis or a Cluster."""

    def __init__(self, client: Client, keys: Keys, number_hash: NumberHash, settle_seconds: float):
        """``settle_seconds``: on a Cluster, how long to wait before reading the stream again
        (a sweep interval: a relay in progress has then finished)."""
        self.client, self.keys, self.number_hash = client, keys, number_hash
        self.settle_seconds = settle_seconds
        self._forget = Script(client, "forget.lua")

    def forget(self, number: str, opt_out: bool = False) -> Forgotten:
        """Removes what is held of ``number``; ``opt_out``: its opt-out record too (a STOP it
        sent: without it, the service may send to the number again)."""
        fence = self.keys.forgetting(number)
        done = Forgotten(number)
        self.client.set(fence, "1", px=FENCE_MS)
        try:
            self._tag(number, done, opt_out)
            done.events += self._events(number)
            if self.keys.cluster:
                time.sleep(self.settle_seconds)
                done.events += self._events(number)
            self._tag(number, done, opt_out)
        finally:
            self.client.delete(fence)
        return done

    def _tag(self, number: str, done: Forgotten, opt_out: bool) -> None:
        """One FORGET of the number's hash tag: every key of its conversations (a keyspace
        SCAN: a name holds the pair after the tag), and its members of the index and of the
        waiting set (ZSCANs)."""
        shard, literal = shard_of(number), GLOB_SPECIAL.sub(r"\\\1", number)
        pattern = GLOB_SPECIAL.sub(r"\\\1", self.keys.prefix) + f"*:{{{shard}}}:{literal}|*"
        found = sorted(set(self.client.scan_iter(match=pattern, count=SCAN_COUNT)))
        index = self.keys.index(shard)
        waiting, due, contacts = self.keys.waiting(shard), self.keys.due(shard), self.keys.contacts(shard)
        timers, pending = self.keys.timers(shard), self.keys.pending(shard)
        members = sorted(
            {
                member
                for indexed in (index, waiting, due, timers, pending)
                for member, _ in self.client.zscan_iter(indexed, match=literal + "|*")
            }
            | {name[2:] for name, _ in self.client.hscan_iter(contacts, match="w:" + literal + "|*")}
        )
        prefix_of_transcript = f"{self.keys.prefix}transcript:"
        live, deleted, hooks, relayed = self._forget(
            [
                self.keys.forgetting(number),
                index,
                self.keys.ending(shard),
                self.keys.outbox(shard),
                waiting,
                due,
                contacts,
                timers,
                pending,
                self.keys.failed(shard),
                *found,
            ],
            [number, self.number_hash(number) or "", "1" if opt_out else "0", *members],
        )
        done.live_conversations += live
        done.keys += deleted
        done.transcripts += sum(1 for key in found if key.startswith(prefix_of_transcript))
        done.end_hooks += hooks
        done.events += relayed

    def _events(self, number: str) -> int:
        """Deletes the stream's events that name the number (or its hash), reading it in
        batches; returns how many."""
        names = {number, self.number_hash(number) or number}
        removed = 0
        lowest = "-"
        while True:
            batch = self.client.xrange(self.keys.events, lowest, "+", count=READ_BATCH)
            doomed = [
                entry_id
                for entry_id, fields in batch
                if fields.get("from") in names or fields.get("to") in names
            ]
            if doomed:
                removed += self.client.xdel(self.keys.events, *doomed)
            if len(batch) < READ_BATCH:
                return removed
            lowest = "(" + batch[-1][0]
