"""Testing a bot's timers without waiting: a clock the test moves (docs/testing.md).

``Clock(twilio)`` takes a ``TwilioSimulator`` that runs the service in-process
(``for_handler``, ``for_app``). ``clock.advance(minutes=30)`` makes thirty minutes pass for
what is stored: every timer's due time, every conversation's end (and Twilio's cookies in the
simulator) come thirty minutes closer, step by step, and at each step the sweeper runs as
deployed (``service.lifecycle.Sweeper``), so that timers fire in due order, a timer set by a
firing fires within the same advance if it falls due in it, and conversations whose time runs
out end (their ``on_end`` runs). It returns what the timers sent: their handlers' replies and
``send()`` calls, as queued for the outbound sender (which delivers them where one runs).

Redis' clock cannot be moved, so the stored times are moved instead: the conversations' index
and due-index scores, their timers' dues and their first and last message times. Real time
passes as well (milliseconds); the keys' own expiries (a day after a conversation's end) do
not move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta

from .clock import redis_now_ms
from .keys import ConversationKeys
from .lifecycle import Sweeper
from .outbox import Outgoing
from .simulator import TwilioSimulator
from .wiring import current

MOST_STEPS = 10_000  # sweeps one advance runs (a bot that keeps setting timers due at once)


@dataclass(frozen=True)
class Sent:
    """A message a timer's handler sent: to the conversation's sender, from its number."""

    to: str
    from_: str
    text: str
    media: list[str] = field(default_factory=list)


class Clock:
    """A simulated service's clock, moved by ``advance``; ``sent`` holds every message its
    timers sent so far."""

    def __init__(self, twilio: TwilioSimulator):
        if twilio.app is None:
            raise ValueError("Clock needs a simulator that runs the app in-process (for_handler, for_app)")
        self.twilio = twilio
        self.app = twilio.app
        self.wired = current(self.app)
        self.sent: list[Sent] = []
        self.sweeper = Sweeper(self.app, on_queued=self._capture)

    def advance(self, delta: timedelta | None = None, **parts: float) -> list[Sent]:
        """Lets ``delta`` (or ``timedelta(**parts)``: ``minutes=30``) pass; returns what the
        timers sent meanwhile, in order."""
        left = int((delta or timedelta(**parts)).total_seconds() * 1000)
        if left < 0:
            raise ValueError("a clock moves forward only")
        before = len(self.sent)
        for _ in range(MOST_STEPS):
            step = int(min(left, max(0, self._next_due() - self._now())))
            self._shift(step)
            left -= step
            self.sweeper.sweep()
            if left == 0 and self._next_due() > self._now():
                break
        return self.sent[before:]

    def _capture(self, keys: ConversationKeys, queued: list[Outgoing]) -> None:
        for message in queued:
            self.sent.append(Sent(message.to, message.sender, message.body or "", list(message.media)))

    def _now(self) -> int:
        return redis_now_ms(self.wired.redis)

    def _next_due(self) -> float:
        """The earliest timer's due or conversation's end (ms), or infinity."""
        pipe = self.wired.redis.pipeline(transaction=False)
        for shard in self.wired.keys.shards():
            pipe.zrange(self.wired.keys.timers(shard), 0, 0, withscores=True)
            pipe.zrange(self.wired.keys.index(shard), 0, 0, withscores=True)
        return min((score for found in pipe.execute() for _, score in found), default=float("inf"))

    def _shift(self, ms: int) -> None:
        """Moves every stored time ``ms`` earlier (as if ``ms`` had passed)."""
        if ms <= 0:
            return
        redis, keys = self.wired.redis, self.wired.keys
        for shard in keys.shards():
            for index in (keys.timers(shard), keys.index(shard)):
                entries = redis.zrange(index, 0, -1, withscores=True)
                if entries:
                    redis.zadd(index, {member: score - ms for member, score in entries})
            for member in redis.zrange(keys.index(shard), 0, -1):
                conversation = keys.from_member(member).conversation
                raw, first, last = redis.hmget(conversation, "timers", "first_seen", "last_seen")
                moved = {}
                if raw:
                    stored = json.loads(raw)
                    for timer in stored.values():
                        timer["due"] -= ms
                    moved["timers"] = json.dumps(stored, separators=(",", ":"), ensure_ascii=False)
                if first and first.isdigit():
                    moved["first_seen"] = str(int(first) - ms)
                if last and last.isdigit():
                    moved["last_seen"] = str(int(last) - ms)
                if moved:
                    redis.hset(conversation, mapping=moved)
        cookies = self.twilio.cookies
        for pair, (value, stored_at) in list(cookies.items()):
            cookies[pair] = (value, stored_at - ms / 1000)
