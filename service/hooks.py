"""The end hook (``on_end``): run for every ended conversation, once, with a time limit, beside
the sweep rather than inside it.

The scripts that end a conversation keep its final state in its tag's ``sms:ending:{NN}``
(``service/store/ending.lua``). Every process that has the hook (each gunicorn worker,
``sms-sessions run``, ``sms-sessions sweep`` with ``SMS_HANDLER``) runs ``EndHooks`` in a thread
of its own, whoever holds the sweeper's lease:

- It announces itself in ``sms:hooks`` (a day, renewed every ``SWEEP_INTERVAL``), so that a
  process without the hook (the CLI's ``conversations expire``, a ``sms-sessions sweep``
  started with only ``REDIS_URL``) still keeps what it ends for the hook: the choice is the
  deployment's, read from Redis, not the process's (``ConversationStore.follow_hooks``).
- It claims each entry (``SET NX PX`` on ``sms:hook:{NN}:<id>``, END_HOOK_TIMEOUT and a margin)
  before calling the hook, and deletes it once the call returned, raised or ran out of time:
  however many processes run hooks, and however slow a hook, each ending gets one call. A
  process killed meanwhile leaves the entry, and its claim lapses: that hook runs again
  (at-least-once, only then).
- Each call runs in a thread of its own, at most ``AT_ONCE`` at a time, given
  ``END_HOOK_TIMEOUT``: one still running then is counted as failed and left to finish (Python
  cannot stop a thread); while ``AT_ONCE`` of them hang, this process calls no more hooks and
  the entries wait. The sweep, its ``ended`` events, the samples and the trimming never wait
  for a hook.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import UTC, datetime

from flask import Flask

from . import timers
from .handler import Conversation, EndHook, failure
from .history import Ending
from .redis_client import is_outage
from .store import decode_state
from .wiring import current

log = logging.getLogger(__name__)

AT_ONCE = 4  # hook calls one process runs at a time
CLAIM_MARGIN = 10.0  # seconds a claim outlives END_HOOK_TIMEOUT: the entry is deleted before it lapses
ANNOUNCED_FOR_MS = 24 * 3600 * 1000  # as long as an ended conversation's entry is kept


class EndHooks:
    """Runs the end hook for the conversations waiting in ``sms:ending:{NN}``."""

    def __init__(self, app: Flask, hook: EndHook):
        self.app = app
        self.hook = hook
        wired = current(app)
        self.client, self.keys, self.metrics = wired.redis, wired.keys, wired.metrics
        self.interval = app.config["SWEEP_INTERVAL"]
        self.timeout = app.config["END_HOOK_TIMEOUT"]
        self.claim_ms = int((self.timeout + CLAIM_MARGIN) * 1000)
        self.name = f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', '?')}"
        self.token = secrets.token_hex(8)
        self.running: list[threading.Thread] = []  # calls not returned yet, timed-out ones included
        self.unreadable: set[str] = set()  # entries reported as unreadable
        self.stopping = threading.Event()

    def announce(self) -> None:
        self.client.set(self.keys.hooks, self.name, px=ANNOUNCED_FOR_MS)

    def run_once(self) -> int:
        """Announces this process, then calls the hook for every entry waiting that no other
        process has claimed; returns how many calls it made."""
        self.announce()
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hgetall(self.keys.ending(shard))
        waiting = [
            (shard, conversation_id)
            for shard, entries in zip(self.keys.shards(), pipe.execute())
            for conversation_id, raw in entries.items()
            if self._readable(conversation_id, raw)
        ]
        called = 0
        while waiting and not self.stopping.is_set():
            self.running = [thread for thread in self.running if thread.is_alive()]
            room = AT_ONCE - len(self.running)
            if room <= 0:
                log.warning("end hooks wait: %d calls are still running past END_HOOK_TIMEOUT", AT_ONCE)
                break
            batch, waiting = waiting[:room], waiting[room:]
            calls = [call for call in (self._start(*entry) for entry in batch) if call]
            for thread, shard, conversation_id, deadline in calls:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    self.metrics.end_hook_failures.inc()
                    log.error(
                        "end hook timed out after %gs (END_HOOK_TIMEOUT) for conversation %s; left running",
                        self.timeout,
                        conversation_id,
                    )
                self.client.hdel(self.keys.ending(shard), conversation_id)
            called += len(calls)
        return called

    def _readable(self, conversation_id: str, raw: str) -> bool:
        """An entry this version cannot read is left for one that can (a rolling deploy's
        other version) or for an operator, and reported once per process: it is neither the
        developer's hook failing nor lost."""
        if Ending.decode(raw) is not None:
            return True
        if conversation_id not in self.unreadable:
            self.unreadable.add(conversation_id)
            log.error(
                "end hook not run: the payload of conversation %s is unreadable; left in place",
                conversation_id,
            )
        return False

    def _start(self, shard: str, conversation_id: str) -> tuple[threading.Thread, str, str, float] | None:
        """Claims the entry and starts its call; None if another process claimed it or it
        is gone (its hook ran since it was listed)."""
        pipe = self.client.pipeline(transaction=False)  # one slot: the claim and the entry share the tag
        pipe.set(self.keys.hook_claim(shard, conversation_id), self.token, nx=True, px=self.claim_ms)
        pipe.hget(self.keys.ending(shard), conversation_id)
        claimed, raw = pipe.execute()
        ended = Ending.decode(raw) if claimed and raw else None
        if ended is None:
            return None
        thread = threading.Thread(
            target=self._call, args=(conversation_id, ended), name="sms-end-hook", daemon=True
        )
        deadline = time.monotonic() + self.timeout
        thread.start()
        self.running.append(thread)
        return thread, shard, conversation_id, deadline

    def _call(self, conversation_id: str, ended: Ending) -> None:
        try:
            with self.app.app_context():
                final = Conversation(
                    decode_state(ended.state) or {},
                    sid=conversation_id,
                    sender=ended.sender,
                    recipient=ended.recipient,
                    messages=ended.messages,
                    started_at=_moment(ended.started_at),
                )
                final.ended_at = _moment(ended.ended_at)
                final.pending = timers.decode(ended.timers)  # those pending when it ended
                if self.app.config["TRANSCRIPTS"]:
                    final.transcript = current(self.app).transcripts.read(
                        ended.sender, ended.recipient, conversation_id
                    )
                self.hook(final, ended.reason)
        except Exception as error:  # the developer's code: logged and counted, never blocking
            self.metrics.end_hook_failures.inc()
            where, frames = failure(error)  # never the text, which may quote a body or the state
            log.error("end hook failed: %s", where, extra={"error": frames})

    def run(self) -> None:
        """Every ``SWEEP_INTERVAL`` until stopped; a Redis outage only delays the next round."""
        while not self.stopping.is_set():
            try:
                self.run_once()
            except Exception as error:  # the thread goes on: a bug is logged, an outage waits
                if not is_outage(error):
                    log.exception("end hooks failed")
                else:
                    log.warning("end hooks skipped: Redis %s", type(error).__name__)
            self.stopping.wait(self.interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sms-end-hooks", daemon=True)
        thread.start()
        return thread


def _moment(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)
