"""Firing due timers: the sweeper's part (service/lifecycle.py runs it under its lease).

Each tag's due index (``<prefix>timers:{NN}``) scores a conversation by its earliest pending
timer, so a pass reads only what is due (``ZRANGEBYSCORE … -inf <now>``): its cost grows with
the timers due, never with those pending. For each due conversation, earliest first:

1. OPEN, as a message would (one try: a conversation a message holds is left for the next
   pass), takes the lock and reads the conversation and its timers. "Now" is Redis' clock
   there, so no timer fires before it is due, whatever the hosts' clocks say.
2. The handler runs with ``message.kind == "timer"``; the fired timer is gone from
   ``conversation.timers`` (it may set it again).
3. FIRE (``fire.lua``) writes the effect, queues the messages the handler sent and its reply
   for the outbound sender (service/outbox.py), and drops the fired timer, in one atomic step,
   then releases or hands over the lock. A crash before it: the lock lapses and the timer
   fires again (at least once); after it the timer is gone (its effect, messages included,
   commits once).
4. ``on_queued``, if given, hears what was queued (the tests' clock, service/testing.py).

A conversation with several timers due fires them one after another, in due order, in the same
pass. Two sweepers at once (the lease lapsing mid-pass) fire each timer once: the second finds
the lock taken, or the timer gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flask import Flask

from . import handler, timers
from .clock import redis_now_ms
from .handler import Conversation, Message, Reply
from .keys import ConversationKeys
from .outbox import Outgoing, encode
from .outbox import message as outgoing_message
from .responses import render
from .sessions import JsonSerializer, count_timers
from .simulator import replies
from .store import Opened, Timing, decode_state, decode_turn
from .store.store import new_token
from .timers import Timer
from .transcripts import Settings as TranscriptSettings
from .transcripts import fired
from .wiring import Wiring, current

log = logging.getLogger(__name__)

FIRE_PER_SHARD = 1000  # due conversations one pass reads per tag (the rest: the next pass)
BATCH = 200  # conversations fired together (one pipeline of OPENs, one of FIREs)
THREADS = 4  # batches fired at once
MOST_IN_A_ROW = 100  # timers one conversation fires in a pass
TURN = "timer"  # the MessageSid part of a firing's token: no answer is ever stored under it

# Hears, once a firing committed, what it queued for the conversation's sender.
Queued = Callable[[ConversationKeys, list[Outgoing]], None]


class TimerFiring:
    """Fires the due timers of every tag; ``on_queued`` hears what each firing queued."""

    def __init__(self, app: Flask, on_queued: Queued | None = None):
        self.app = app
        self.wired: Wiring = current(app)
        self.on_queued = on_queued
        self.serializer = JsonSerializer()
        self.transcripts = TranscriptSettings.from_config(app.config)
        self.ttl = app.config["CONVERSATION_TTL"]

    def due(self, now_ms: int, per_shard: int = FIRE_PER_SHARD) -> list[tuple[float, str]]:
        """(earliest due, member) of the conversations with a timer due at ``now_ms``, earliest
        first: one pipelined read of every tag's due index."""
        keys = self.wired.keys
        pipe = self.wired.redis.pipeline(transaction=False)
        for shard in keys.shards():
            pipe.zrangebyscore(keys.timers(shard), "-inf", now_ms, start=0, num=per_shard, withscores=True)
        return sorted((score, member) for found in pipe.execute() for member, score in found)

    def next_due(self) -> float | None:
        """The earliest pending timer's due (ms) across tags, or None: each tag's first."""
        keys = self.wired.keys
        pipe = self.wired.redis.pipeline(transaction=False)
        for shard in keys.shards():
            pipe.zrange(keys.timers(shard), 0, 0, withscores=True)
        return min((score for found in pipe.execute() for _, score in found), default=None)

    def fire_due(self) -> int:
        """One pass; returns how many timers fired."""
        due = [self.wired.keys.from_member(member) for _, member in self.due(redis_now_ms(self.wired.redis))]
        batches = [due[start : start + BATCH] for start in range(0, len(due), BATCH)]
        if len(batches) <= 1:
            return sum(self.fire(batch) for batch in batches)
        # Batches of different conversations, a few at once: one's handlers run while Redis
        # runs another's scripts.
        with ThreadPoolExecutor(min(THREADS, len(batches)), thread_name_prefix="sms-timers") as pool:
            return sum(pool.map(self._fire_in_app, batches))

    def _fire_in_app(self, batch: list[ConversationKeys]) -> int:
        with self.app.app_context():
            return self.fire(batch)

    def fire(self, conversations: list[ConversationKeys]) -> int:
        """Fires the due timers of ``conversations``, each one's earliest first; how many fired.
        A batch costs two pipelined round trips (OPEN for all, FIRE for all) per timer due on
        one conversation, instead of two per timer; a Cluster, where redis-py pipelines no
        script, makes them one at a time."""
        fired = 0
        for _ in range(MOST_IN_A_ROW):
            if not conversations:
                break
            tokens = [new_token(TURN) for _ in conversations]
            turns = self._open_all(conversations, tokens)
            busy = [
                (keys, token)
                for keys, token, turn in zip(conversations, tokens, turns)
                if not isinstance(turn, Opened)
            ]
            # A message holds it, or a slow handler's run (OPEN's 'deferred': the conversation
            # has inbound messages): the ticket is given back and the next pass tries again.
            for keys, token in busy:
                self.wired.store.release(keys, token)
            firings = [
                self._prepare(keys, turn)
                for keys, turn in zip(conversations, turns)
                if isinstance(turn, Opened)
            ]
            results = self._fire_all(firings)
            conversations = []
            for firing, result in zip(firings, results):
                if firing.timer is not None and result in ("fired", "ended"):
                    fired += 1
                    self._committed(firing, result)
                    if result == "fired" and firing.more:
                        conversations.append(firing.keys)
        return fired

    def _open_all(self, conversations: list[ConversationKeys], tokens: list[str]) -> list:
        store = self.wired.store
        if self.wired.keys.cluster:
            return [store.ask(keys, TURN, token) for keys, token in zip(conversations, tokens)]
        pipe = self.wired.redis.pipeline(transaction=False)
        for keys, token in zip(conversations, tokens):
            store.open_script(*store.open_call(keys, TURN, token), client=pipe)
        return [decode_turn(token, raw) for token, raw in zip(tokens, pipe.execute())]

    def _fire_all(self, firings: list[Firing]) -> list[str]:
        store = self.wired.store
        if self.wired.keys.cluster:
            return [store.fire(*firing.call) for firing in firings]
        pipe = self.wired.redis.pipeline(transaction=False)
        for firing in firings:
            store.fire_script(*store.fire_call(*firing.call), client=pipe)
        return pipe.execute() if firings else []

    def _prepare(self, keys: ConversationKeys, opened: Opened) -> Firing:
        """Under the lock ``opened`` holds: runs the handler for the next due timer, and returns
        what FIRE is to write (with no timer: the due index set right, as nothing is due)."""
        loaded = timers.decode(opened.timers) if opened.sid else {}
        held = int(opened.paused) if opened.paused.isdigit() else 0
        if held > opened.now and loaded:
            # An operator holds it (service/handoff.py): the bot's timers wait for the hold's
            # end, their due index entry moved there.
            later = max(timers.earliest(loaded) or held, held)
            return Firing(keys, (keys, opened, "", "", "", (timers.encode(loaded), later, ""), None))
        timer = timers.next_due(loaded, opened.now)
        state = decode_state(opened.state) if opened.state else None
        if timer is None or state is None:
            # Cancelled or fired meanwhile, its conversation gone or unreadable: the due index
            # is set right (its earliest, or no entry) and nothing fires.
            left = loaded if state is not None else {}
            return Firing(
                keys, (keys, opened, "", "", "", (timers.encode(left), timers.earliest(left), ""), None)
            )
        conversation = Conversation(
            state,
            sid=opened.sid,
            sender=keys.sender,
            recipient=keys.recipient,
            messages=int(opened.seq) if opened.seq.isdigit() else 1,
            started_at=_moment(int(opened.first_seen)) if opened.first_seen.isdigit() else None,
            ttl=self.ttl,
            now_ms=opened.now,
            timers=loaded,
            own_ttl=int(opened.ttl) // 1000 if opened.ttl.isdigit() else None,
        )
        conversation.timer_fired = True
        del conversation.pending[timer.name]
        left = dict(conversation.pending)
        message = Message(
            sender=keys.sender,
            recipient=keys.recipient,
            body="",
            sid=f"{TURN}:{timer.id}",
            caller_name=self.wired.callers.name(keys.sender),
            kind="timer",
            timer=timer.name,
            data=timer.data,
        )
        try:
            reply: Reply = self.wired.handler(message, conversation)
            outgoing = [*conversation.outbound, *self._messages(keys, reply)]
            encoded = self.serializer.encode(conversation)
        except Exception as error:  # the developer's code: the timer is spent, nothing else changes
            where, frames = handler.failure(error)
            log.error("timer %r: the handler failed: %s", timer.name, where, extra={"error": frames})
            spent: Timing = (timers.encode(left), timers.earliest(left), opened.ttl)
            unchanged: tuple = (keys, opened, timer.name, timer.id, opened.state, spent, None)
            more = timers.next_due(left, opened.now) is not None
            return Firing(keys, unchanged, timer, opened.now, left, left, [], more)
        pending = conversation.pending
        own_ms = conversation.own_ttl * 1000 if conversation.own_ttl is not None else ""
        timing = (timers.encode(pending), timers.earliest(pending), own_ms)
        call = (
            keys,
            opened,
            timer.name,
            timer.id,
            encoded,
            timing,
            conversation.end_reason,
            encode(outgoing),
            fired(self.transcripts, timer.name, outgoing, opened.now, opened.sid),
        )
        more = timers.next_due(pending, opened.now) is not None
        return Firing(keys, call, timer, opened.now, left, dict(pending), outgoing, more)

    def _committed(self, firing: Firing, result: str) -> None:
        """Once FIRE wrote a firing's effect: its metrics, and what it queued told."""
        metrics = self.wired.metrics
        assert firing.timer is not None
        metrics.timers_fired.inc()
        metrics.timer_late.observe(max(0, firing.now - firing.timer.due_ms) / 1000)
        count_timers(metrics, firing.before, firing.after, 0, result == "ended")
        if result == "ended":
            metrics.conversations_ended.labels("handler").inc()
        if firing.outgoing:
            metrics.outbound.labels("pending").inc(len(firing.outgoing))
            if self.on_queued is not None:
                self.on_queued(firing.keys, firing.outgoing)

    @staticmethod
    def _messages(keys: ConversationKeys, reply: Reply) -> list[Outgoing]:
        """The handler's reply as outbound messages to the conversation's sender: text, or each
        ``<Message>`` of a ``MessagingResponse`` (its text and media)."""
        if reply is None:
            return []
        if isinstance(reply, str):
            return [outgoing_message(keys.sender, keys.recipient, reply)]
        return [
            outgoing_message(keys.sender, keys.recipient, found.text or None, found.media)
            for found in replies(render(reply))
        ]


@dataclass
class Firing:
    """One timer's firing, prepared under the lock: FIRE's arguments (``ConversationStore.fire``'s,
    in order) and what follows its commit. Without ``timer``, nothing fires."""

    keys: ConversationKeys
    call: tuple
    timer: Timer | None = None
    now: int = 0
    before: dict[str, Timer] = field(default_factory=dict)  # pending besides the fired one
    after: dict[str, Timer] = field(default_factory=dict)  # pending once the handler returned
    outgoing: list[Outgoing] = field(default_factory=list)  # queued with it: sends, then the reply
    more: bool = False  # another timer of the conversation is due already


def _moment(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)
