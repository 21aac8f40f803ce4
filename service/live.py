"""Live conversations as operators see them: count, page, search, read and end, from the
index (``<prefix>active:{NN}``).

The index is 100 sorted sets (one per hash tag) of ``<from>|<to>`` scored by expiry in epoch
ms, so "live" means score > now. Every command here names a single key (or, for ``index_drop.lua``,
keys of one hash tag), and the per-shard commands go in one pipeline: the same code
runs on one Redis and on a Cluster, and never needs ``KEYS`` or a keyspace ``SCAN`` (a search
``ZSCAN``s the one shard its digits name).

Order is most recent first: expiry descending, then shard descending, then member descending
(Redis' own order inside a shard). The cursor is the last entry returned, so paging is keyset
paging: every shard is read strictly after the cursor's (expiry, shard, member), each in one
atomic step, so an entry that stays put is listed exactly once, whatever arrives, moves or
ends around it meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from .callers import Callers
from .clock import now_ms
from .keys import SEPARATOR, SHARDS, ConversationKeys, Keys, shard_of
from .masking import mask
from .redis_client import UNAVAILABLE, Client
from .store import ConversationStore, Script, decode_state
from .timers import Timer
from .timers import decode as decode_timers

log = logging.getLogger(__name__)
SEARCHABLE = re.compile(r"\+?[0-9]+")
SCAN_COUNT = 1000  # index entries a search's ZSCAN step reads
FIELDS = ("state", "seq", "first_seen", "last_seen", "ttl", "timers")
MAX_FILL_ROUNDS = 4  # a page refetches this often when entries vanished under it


class BadCursor(ValueError):
    """A cursor that this service did not hand out."""


class BadSearch(ValueError):
    """A number search that names no single index shard; the message says what to type."""


def search_number(text: str) -> str:
    """An operator's search as the end of a sender's number: ``+15551230001`` or ``0001``
    (spaces, dashes, dots and brackets dropped), at least two digits.

    Why two: the last two digits are the hash tag, so they name one index shard of 100. One
    digit would name ten shards, a tenth of every conversation, which is the list itself
    rather than a search; refused with a reason instead of scanning them.
    """
    number = re.sub(r"[\s().-]", "", text)
    if not SEARCHABLE.fullmatch(number) or len(number) > 64:
        raise BadSearch("Search by number: digits, with + for a full number (+15551230001).")
    if len(number.lstrip("+")) < 2:
        raise BadSearch("Type at least the last two digits of the number.")
    return number


class Entry(NamedTuple):
    """One index entry. As a tuple it sorts in list order when reversed: expiry, shard, member
    (str order is UTF-8 byte order, Redis' order inside a shard)."""

    score: int
    shard: int
    member: str

    @property
    def tag(self) -> str:
        return f"{self.shard:02d}"

    def cursor(self) -> str:
        raw = f"{self.score}{SEPARATOR}{self.member}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, cursor: str) -> Entry:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            score, sender, recipient = raw.split(SEPARATOR)
            if not (sender and recipient):
                raise ValueError(raw)
            return cls(int(score), int(shard_of(sender)), sender + SEPARATOR + recipient)
        except (ValueError, binascii.Error):
            raise BadCursor(cursor) from None


@dataclass
class LiveConversation:
    """What an operator sees of one live conversation (``service.handler.Conversation`` is
    the handler's)."""

    sender: str
    recipient: str
    name: str
    messages: int
    first_seen: int
    last_seen: int
    expires_in: int
    state: dict = field(default_factory=dict)
    ttl: int | None = None  # its own time to live (expire_after), seconds; None: CONVERSATION_TTL
    timers: list[Timer] = field(default_factory=list)  # pending, earliest first

    def to_json(self, with_state: bool = False) -> dict:
        """Times as ISO-8601 UTC with milliseconds; ``expires_in`` in whole seconds. With the
        state come its own TTL (``ttl``, null for ``CONVERSATION_TTL``) and its pending timers
        (``due`` as ISO-8601 too)."""
        data = {
            "from": self.sender,
            "to": self.recipient,
            "name": self.name,
            "messages": self.messages,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "expires_in": self.expires_in,
        }
        if with_state:
            data["state"] = self.state
            data["ttl"] = self.ttl
            data["timers"] = [{**timer.to_json(), "due": iso(timer.due_ms)} for timer in self.timers]
        return data


@dataclass
class Page:
    conversations: list[LiveConversation]
    next_cursor: str | None


class LiveConversations:
    """Queries over the index; ending reuses the store's END script."""

    def __init__(
        self,
        client: Client,
        keys: Keys,
        store: ConversationStore,
        callers: Callers,
        on_end: Callable[[], None] = lambda: None,
    ):
        """``on_end`` hears of each conversation an operator ended (metrics)."""
        self.client = client
        self.keys = keys
        self.store = store
        self.callers = callers
        self.on_end = on_end
        self._drop = Script(client, "index_drop.lua")
        self._page = Script(client, "index_page.lua")

    def preload(self) -> None:
        """Loads the paging script, so that a page costs the same from the first one on (best
        effort, like the store's: without Redis it loads on first use)."""
        try:
            self._page.redis.sha = self.client.script_load(self._page.source.text)
        except UNAVAILABLE as error:
            log.warning(
                "could not preload the paging script (%s); it loads on first use", type(error).__name__
            )

    def count(self) -> int:
        """Live conversations: one ``ZCOUNT (now +inf`` per shard, O(log N) each, one pipeline."""
        now = now_ms()
        pipe = self.client.pipeline(transaction=False)
        for index in self.keys.indexes():
            pipe.zcount(index, f"({now}", "+inf")
        return sum(pipe.execute())

    def stats(self) -> dict[str, int]:
        """``active`` as ``count``, and ``indexed``: entries including lapsed ones not yet
        pruned (``ZCARD``, O(1) per shard); one pipeline for both."""
        now = now_ms()
        pipe = self.client.pipeline(transaction=False)
        for index in self.keys.indexes():
            pipe.zcount(index, f"({now}", "+inf")
            pipe.zcard(index)
        replies = pipe.execute()
        return {"active": sum(replies[0::2]), "indexed": sum(replies[1::2])}

    def page(self, limit: int, cursor: str | None = None) -> Page:
        """Up to ``limit`` live conversations after ``cursor``, most recent first.

        Entries whose state is gone are pruned and skipped; the page is refilled a bounded
        number of times, so it may come back short but ``next_cursor`` still leads on.
        """
        after = Entry.from_cursor(cursor) if cursor else None
        found: list[LiveConversation] = []
        more = True
        for _ in range(MAX_FILL_ROUNDS):
            entries, more = self._entries_after(after, limit - len(found))
            found += self._read_entries(entries)
            if entries:
                after = entries[-1]
            if not more or len(found) == limit:
                break
        return Page(found, after.cursor() if more and after else None)

    def get(self, sender: str, recipient: str) -> LiveConversation | None:
        """A live conversation: state stored, expiry (its index score) still ahead."""
        keys = self.keys.conversation(sender, recipient)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.conversation, FIELDS)
        pipe.zscore(keys.index_shard, keys.member)
        values, expiry = pipe.execute()
        now = now_ms()
        if values[0] is None or expiry is None or expiry <= now:
            return None
        return self._conversation(keys, values, math.ceil((expiry - now) / 1000))

    def next_timers(self, limit: int) -> list[tuple[str, str, Timer]]:
        """The ``limit`` next due timers across conversations, earliest first, as (from, to,
        timer), overdue ones included: each tag's due index read from its start (the ``limit``
        earliest conversations of each, in one pipeline), then their timers."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.zrange(self.keys.timers(shard), 0, limit - 1, withscores=True)
        first = heapq.nsmallest(
            limit, ((score, member) for found in pipe.execute() for member, score in found)
        )
        pipe = self.client.pipeline(transaction=False)
        for _, member in first:
            pipe.hget(self.keys.from_member(member).conversation, "timers")
        pending = []
        for (_, member), raw in zip(first, pipe.execute()):
            keys = self.keys.from_member(member)
            pending += [(keys.sender, keys.recipient, timer) for timer in decode_timers(raw or "").values()]
        return heapq.nsmallest(limit, pending, key=lambda found: (found[2].due_ms, found[0], found[2].name))

    def end(self, sender: str, recipient: str) -> bool:
        """Ends the conversation now (state, lock, index entry); False if it was not live. Its
        final state is kept for the deployment's end hook, whether or not this process has it."""
        self.store.follow_hooks(self.keys.hooks)
        ended = self.store.end(self.keys.conversation(sender, recipient))
        if ended:
            self.on_end()
            log.info("conversation of %s ended by an operator", mask(sender))
        return ended

    def search(self, number: str, limit: int) -> list[LiveConversation]:
        """Up to ``limit`` live conversations whose sender ends with ``number`` (see
        ``search_number``: an exact E.164 number or its last digits), most recent first.

        Those senders all share one hash tag, so only that index shard is read: ``ZSCAN …
        MATCH *<number>|*`` in steps of ``SCAN_COUNT`` (O(N/100) for N live conversations,
        never the whole keyspace), keeping the ``limit`` latest matches in a heap.
        """
        number = search_number(number)
        shard, now = shard_of(number), now_ms()
        scanned = self.client.zscan_iter(
            self.keys.index(shard), match=f"*{number}{SEPARATOR}*", count=SCAN_COUNT
        )
        matches = (Entry(int(score), int(shard), member) for member, score in scanned if score > now)
        return self._read_entries(heapq.nlargest(limit, matches))

    def _entries_after(self, after: Entry | None, limit: int) -> tuple[list[Entry], bool]:
        """The next ``limit`` live entries after ``after`` across shards, and whether more exist.

        Round 1 asks every shard for a fair share of the page (a few entries, O(log N) each) in
        one pipeline. Round 2, only when needed, asks for ``limit + 1`` the shards whose share
        ran out above the page's cut. Each answer is exact for its shard at the moment it was
        read, so the union is too: an entry that moved meanwhile is listed at most once.
        """
        now, want = now_ms(), limit + 1
        share = min(want, 2 * want // SHARDS + 2)
        shards = list(range(SHARDS))
        replies = self._after_cursor(after, shards, share, now)
        candidates = {
            Entry(int(score), shard, member)
            for shard, reply in zip(shards, replies)
            for member, score in reply
        }
        cut = heapq.nlargest(want, candidates)[-1] if len(candidates) >= want else None
        again = [
            shard
            for shard, reply in zip(shards, replies)
            if len(reply) == share < want
            and (cut is None or Entry(int(reply[-1][1]), shard, reply[-1][0]) > cut)
        ]
        if again:
            for shard, reply in zip(again, self._after_cursor(after, again, want, now)):
                candidates.update(Entry(int(score), shard, member) for member, score in reply)
        top = heapq.nlargest(want, candidates)
        return top[:limit], len(top) > limit

    def _after_cursor(self, after: Entry | None, shards: list[int], count: int, now: int) -> list:
        """Per shard, up to ``count`` live (member, expiry) after the cursor.

        Each shard is read in one step: ``ZRANGE … BYSCORE REV LIMIT`` below an expiry bound
        (one pipeline for all), and the cursor's own shard, whose bound is (expiry, member),
        by ``index_page.lua`` (on its own: redis-py runs no script in a Cluster pipeline).
        """
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            if after is None or shard != after.shard:
                pipe.zrange(
                    self.keys.index(f"{shard:02d}"),
                    self._bound(after, shard),
                    f"({now}",
                    desc=True,
                    byscore=True,
                    offset=0,
                    num=count,
                    withscores=True,
                )
        replies = iter(pipe.execute())
        return [
            self._after_in_shard(after, count, now)
            if after is not None and shard == after.shard
            else next(replies)
            for shard in shards
        ]

    def _after_in_shard(self, after: Entry, count: int, now: int) -> list[tuple[str, float]]:
        flat = self._page([self.keys.index(after.tag)], [after.score, after.member, now, count])
        return list(zip(flat[0::2], map(float, flat[1::2])))

    @staticmethod
    def _bound(after: Entry | None, shard: int):
        """The highest expiry a shard may still list after the cursor (``(`` = exclusive)."""
        if after is None:
            return "+inf"
        if shard < after.shard:
            return after.score  # its entries tied with the cursor's expiry come after the cursor
        return f"({after.score}"

    def _read_entries(self, entries: list[Entry]) -> list[LiveConversation]:
        """One pipelined ``HMGET`` for the page; entries whose state is gone are pruned."""
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry in entries:
            pipe.hmget(self.keys.from_member(entry.member).conversation, FIELDS)
        now = now_ms()
        found = []
        for entry, values in zip(entries, pipe.execute()):
            keys = self.keys.from_member(entry.member)
            if values[0] is None:
                self._drop([keys.conversation, keys.index_shard], [keys.member])
                continue
            found.append(self._conversation(keys, values, math.ceil((entry.score - now) / 1000)))
        return found

    def _conversation(self, keys: ConversationKeys, values: list, expires_in: int) -> LiveConversation:
        raw_state, seq, first_seen, last_seen, own_ttl, raw_timers = values
        pending = sorted(
            decode_timers(raw_timers or "").values(), key=lambda timer: (timer.due_ms, timer.name)
        )
        return LiveConversation(
            sender=keys.sender,
            recipient=keys.recipient,
            name=self.callers.name(keys.sender),
            messages=_number(seq),
            first_seen=_number(first_seen),
            # An outbound message started it (service.send) and no message came yet: its start.
            last_seen=_number(last_seen) or _number(first_seen),
            expires_in=max(expires_in, 0),
            state=decode_state(raw_state or "{}") or {},
            ttl=int(own_ttl) // 1000 if own_ttl and own_ttl.isdigit() else None,
            timers=pending,
        )


def _number(value: str | None) -> int:
    """A stored count or time; 0 for what a hand edit made unreadable."""
    return int(value) if value and value.isdigit() else 0


def iso(epoch_ms: int) -> str:
    """``2026-01-02T03:04:05.678Z``."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
