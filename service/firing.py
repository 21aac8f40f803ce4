"""Firing due timers: the sweeper's part (service/lifecycle.py runs it under its lease).

Each tag's due index (``<prefix>timers:{NN}``) scores a conversation by its earliest pending
timer, so a pass reads only what is due (``ZRANGEBYSCORE … -inf <now>``): its cost grows with
the timers due, never with those pending. For each due conversation, earliest first:

1. OPEN, as a message would (one try: a conversation a message holds is left for the next
   pass), takes the lock and reads the conversation and its timers. "Now" is Redis' clock
   there, so no timer fires before it is due, whatever the hosts' clocks say.
2. The handler runs with ``message.kind == "timer"``; the fired timer is gone from
   ``conversation.timers`` (it may set it again).
3. FIRE (``fire.lua``) writes the effect and drops the fired timer in one atomic step, then
   releases or hands over the lock. A crash before it: the lock lapses and the timer fires
   again (at least once); after it the timer is gone (its effect commits once).
4. The reply goes to ``send`` (``send_reply`` by default).

A conversation with several timers due fires them one after another, in due order, in the same
pass. Two sweepers at once (the lease lapsing mid-pass) fire each timer once: the second finds
the lock taken, or the timer gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask

from . import handler, timers
from .delivery import Accepted, Delivery
from .handler import Conversation, Message, Reply
from .keys import ConversationKeys
from .masking import mask
from .responses import render
from .sessions import JsonSerializer, count_timers
from .settings import ConfigError
from .simulator import replies
from .store import Opened, Waiting, decode_state
from .store.store import new_token
from .wiring import Wiring, current

log = logging.getLogger(__name__)

FIRE_PER_SHARD = 1000  # due conversations one pass reads per tag (the rest: the next pass)
MOST_IN_A_ROW = 100  # timers one conversation fires in a pass
TURN = "timer"  # the MessageSid part of a firing's token: no answer is ever stored under it

# Where a timer's reply goes: (the conversation's keys, the reply's TwiML).
Send = Callable[[ConversationKeys, str], None]


class TimerFiring:
    """Fires the due timers of every tag; ``send`` takes each reply."""

    def __init__(self, app: Flask, send: Send | None = None):
        self.app = app
        self.wired: Wiring = current(app)
        self.send = send if send is not None else DeliverySend(app)
        self.serializer = JsonSerializer()
        self.ttl = app.config["CONVERSATION_TTL"]

    def due(self, now_ms: int, per_shard: int = FIRE_PER_SHARD) -> list[tuple[float, str]]:
        """(earliest due, member) of the conversations with a timer due at ``now_ms``, earliest
        first: one pipelined read of every tag's due index."""
        keys = self.wired.keys
        pipe = self.wired.redis.pipeline(transaction=False)
        for shard in keys.shards():
            pipe.zrangebyscore(keys.timers(shard), "-inf", now_ms, start=0, num=per_shard, withscores=True)
        return sorted((score, member) for found in pipe.execute() for member, score in found)

    def fire_due(self) -> int:
        """One pass; returns how many timers fired."""
        fired = 0
        for _, member in self.due(redis_now_ms(self.wired.redis)):
            fired += self.fire(self.wired.keys.from_member(member))
        return fired

    def fire(self, keys: ConversationKeys) -> int:
        """Fires one conversation's due timers, earliest first; how many fired."""
        fired = 0
        for _ in range(MOST_IN_A_ROW):
            token = new_token(TURN)
            turn = self.wired.store.ask(keys, TURN, token)
            if isinstance(turn, Waiting):  # a message holds it: the next pass tries again
                self.wired.store.release(keys, token)
                return fired
            if not self._fire_one(keys, turn):
                return fired
            fired += 1
        return fired

    def _fire_one(self, keys: ConversationKeys, opened: Opened) -> bool:
        """Under the lock ``opened`` holds: fires its next due timer (True), or sets its due
        index right and lets go (False: nothing was due)."""
        store, metrics = self.wired.store, self.wired.metrics
        loaded = timers.decode(opened.timers) if opened.sid else {}
        timer = timers.next_due(loaded, opened.now)
        state = decode_state(opened.state) if opened.state else None
        if timer is None or state is None:
            # Cancelled or fired meanwhile, its conversation gone or unreadable: the due index
            # is set right (its earliest, or no entry) and nothing fires.
            left = loaded if state is not None else {}
            store.fire(keys, opened, timers=(timers.encode(left), timers.earliest(left), ""))
            return False
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
        answer: str | None = None
        try:
            reply: Reply = self.wired.handler(message, conversation)
            answer = render(reply) if reply is not None else None
            encoded = self.serializer.encode(conversation)
        except Exception as error:  # the developer's code: the timer is spent, nothing else changes
            where, frames = handler.failure(error)
            log.error("timer %r: the handler failed: %s\n%s", timer.name, where, frames)
            left = dict(loaded)
            del left[timer.name]
            result = store.fire(
                keys, opened, timer=timer.name, timer_id=timer.id, state=opened.state,
                timers=(timers.encode(left), timers.earliest(left), opened.ttl),
            )  # fmt: skip
            return result in ("fired", "ended")
        own_ms = conversation.own_ttl * 1000 if conversation.own_ttl is not None else ""
        result = store.fire(
            keys,
            opened,
            timer=timer.name,
            timer_id=timer.id,
            state=encoded,
            timers=(timers.encode(conversation.pending), timers.earliest(conversation.pending), own_ms),
            end_reason=conversation.end_reason,
        )
        if result not in ("fired", "ended"):
            return False
        metrics.timers_fired.inc()
        metrics.timer_late.observe(max(0, opened.now - timer.due_ms) / 1000)
        count_timers(
            metrics,
            {k: v for k, v in loaded.items() if k != timer.name},
            conversation.pending,
            0,
            result == "ended",
        )
        if result == "ended":
            metrics.conversations_ended.labels("handler").inc()
        if answer is not None and replies(answer):
            self.send(keys, answer)
        return True


class DeliverySend:
    """The outbound sender's stand-in until it lands: each message of a timer's reply goes
    through Twilio's REST API (service/delivery.py) from the conversation's number to its
    sender, once, after the firing committed. Without an account to send from, the reply is
    logged as not sent."""

    def __init__(self, app: Flask):
        self.config = app.config
        self.delivery: Delivery | None = None

    def __call__(self, keys: ConversationKeys, answer: str) -> None:
        if self.delivery is None:
            try:
                self.delivery = Delivery.from_config(self.config)
            except ConfigError as error:
                log.warning("timer reply to %s not sent: %s", mask(keys.sender), error)
                return
        for message in replies(answer):
            outcome = self.delivery.send(
                keys.sender, message.text or None, from_=keys.recipient, media_urls=message.media
            )
            if not isinstance(outcome, Accepted):
                log.warning("timer reply to %s not sent: %s", mask(keys.sender), outcome)


def redis_now_ms(client) -> int:
    """Redis' clock (the one the timers' dues are on) in epoch ms; a Cluster asks every
    primary and this takes the latest (a master whose clock is behind then finds nothing due yet
    on a conversation, and its OPEN's own clock decides)."""
    reply = client.time()
    readings = reply.values() if isinstance(reply, dict) else [reply]
    return max(int(seconds) * 1000 + int(micros) // 1000 for seconds, micros in readings)


def _moment(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)
