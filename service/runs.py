"""Where handlers run, and what happens when one takes its time (docs/design.md, "Handlers
that take their time").

Every handler call is a ``Run`` in a background task: a plain function in a thread of this
process' pool, an ``async def`` on the process' one event loop (a thread of its own). The
webhook waits ``HANDLER_INLINE_BUDGET`` for it: done, it answers inline (TwiML) as ever;
not done, the message is first made durable among the conversation's inbound messages
(``ConversationSession.defer``), Twilio gets an empty answer, and the run finishes here: its
save commits the state with the reply, queued as outbound messages, takes the message off
the inbound messages and passes the lock to the next one, whose run starts at once. What the
handler sends (``conversation.send``) waits for the save while the webhook waits; once it is
deferred, what it sent so far goes with ``DEFER`` and each later send leaves at once
(``INTERIM``), in order, under the run's token.

While a run holds its conversation its lock is renewed (every third of ``LOCK_TTL``); every
save carries the run's token, the lock's, so a save from a run whose lock lapsed is refused.
Past ``HANDLER_TIMEOUT`` an async handler is cancelled and a plain one abandoned (its thread
runs on, its result ignored): nothing is saved, ``HANDLER_TIMEOUT_REPLY`` goes out if set, and
the next message goes on. The sweeper claims a pending conversation whose lease lapsed (the
process running its handler died) and runs its first inbound message again here: a handler
may run twice, its effects commit once.

Under gunicorn's gevent worker (the standard library patched) the pool's threads are greenlets,
which suits plain handlers (a blocking call yields). The event loop is not: asyncio keeps one
running loop per OS thread, which every greenlet shares, so it runs on a real thread of its
own, and hands each outcome back to the gevent hub's thread (gevent's primitives, which the
webhook waits on, belong to it).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor  # the finishing threads
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree

from twilio.twiml.messaging_response import MessagingResponse

from . import handler as handlers
from .callers import Callers
from .handler import Handler, Message, Reply
from .keys import ConversationKeys, Keys
from .logs import write
from .masking import mask
from .outbox import Outgoing
from .outbox import message as outgoing_message
from .redis_client import is_outage
from .sessions import ConversationSession, ConversationSessionInterface
from .store import ConversationStore, Inbound, LockLost, SavedAlready

log = logging.getLogger(__name__)

# Threads a process runs plain-function handlers in: a slow one holds its thread, so these
# bound how many slow plain handlers one process runs at once (async ones need none). Under
# gevent they are greenlets, as cheap as the connections a worker holds, and as many
# (serving.WORKER_CONNECTIONS).
HANDLER_THREADS = 64
HANDLER_GREENLETS = 1000
FINISHING_THREADS = 4  # saves of runs that finished past the webhook
PENDING_PER_SHARD = 100  # conversations one sweep claims per tag


class RunOutcome(StrEnum):
    """How a run ended: its settled kind (the first three) and, past the webhook, its save's
    ``handler <outcome>`` log line (and a failed run's transcript entry)."""

    REPLIED = "replied"  # the handler returned: its state and reply saved
    ERROR = "error"  # it raised: nothing of it saved
    TIMEOUT = "timeout"  # past HANDLER_TIMEOUT: nothing of it saved
    FENCED = "fenced"  # its save refused: its lock lapsed, another run took the message
    SUPERSEDED = "superseded"  # its save found the message saved already (a rerun's): nothing written
    UNSAVED = "unsaved"  # Redis unavailable: the message runs again


class Run:
    """One handler call on one message. Its outcome is settled once: ``(REPLIED, reply)``,
    ``(ERROR, exception)`` or ``(TIMEOUT, None)`` (``RunOutcome``); whatever comes after is
    ignored.

    The handler's sends (``conversation.send``) come here: until the webhook's budget runs out
    they wait for the save, as the state does; from ``defer`` on they leave at once, in order,
    each under the run's token, so that a run whose lock lapsed sends nothing; once the outcome
    is settled, none leaves (an abandoned handler's)."""

    def __init__(self, runs: Runs, message: Message, conversation: ConversationSession, inbound: bool):
        self.runs = runs
        self.message = message
        self.conversation = conversation
        binding = conversation.binding
        assert binding is not None
        self.keys: ConversationKeys = binding.keys
        self.token: str = binding.opened.token  # the fencing token: the lock's while it is ours
        self.inbound = inbound  # among the inbound messages: no webhook waits for it
        self.live = inbound  # its sends leave at once
        self.sending: list[Outgoing] = []  # sent, not yet queued in Redis
        self.driving = False  # a finishing thread queues its sends or saves it
        self.started = time.monotonic()
        self.deadline = self.started + runs.timeout
        self.renew_at = self.started + runs.renew_every
        self.outcome: tuple[RunOutcome, Any] | None = None
        self.is_async = False
        self._lock = threading.Lock()
        # Held until the outcome comes: plain locks, the cheapest way to wait across threads.
        self._settled = threading.Lock()
        self._settled.acquire()
        conversation.sends_to = self.sent

    def settle(self, kind: RunOutcome, value: Any = None) -> None:
        with self._lock:
            if self.outcome is not None:
                return
            self.outcome = (kind, value)
            drives = self._drives()
        self._settled.release()
        if drives:
            self.runs.drive_later(self)

    def wait(self, seconds: float) -> bool:
        """Whether the outcome came within ``seconds`` (one waiter: the webhook)."""
        if self.outcome is not None:
            return True
        acquired = self._settled.acquire(True, seconds) if seconds > 0 else self._settled.acquire(False)
        if acquired:
            self._settled.release()  # for a later wait
        return acquired

    def sent(self, queued: Outgoing) -> None:
        """``conversation.send``'s message, from the handler."""
        if self.runs.on_loop_off_hub():  # the lock is the hub's: taken there, sends in order
            self.runs.to_hub(self.sent, queued)
            return
        with self._lock:
            if not self.live:
                self.conversation.outbound.append(queued)
                return
            over = self.outcome is not None
            if not over:
                self.sending.append(queued)
            drives = self._drives()
        if over:
            write(
                log,
                logging.WARNING,
                "handler send dropped",
                {
                    "message_sid": self.message.sid,
                    "reason": "the handler sent after its run ended (past HANDLER_TIMEOUT, or failed)",
                },
            )
        elif drives:
            self.runs.drive_later(self)

    def defer(self) -> bool:
        """The webhook's budget ran out: the message becomes durable among the inbound messages,
        with what the handler sent so far (``ConversationSession.defer``); from then on its
        sends leave at once, and the run finishes here. False, nothing done, if the outcome
        came meanwhile (the webhook answers it inline). Raises as ``defer`` does (the run is
        then abandoned)."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.live = True
            early, self.conversation.outbound = self.conversation.outbound, []
        self.conversation.defer(early)
        with self._lock:
            self.inbound = True
            drives = self._drives()
        if drives:
            self.runs.drive_later(self)
        return True

    def _drives(self) -> bool:
        """Whether the caller starts the finishing thread's work on this run (under the lock):
        past the webhook, with sends to queue or the outcome to save, and none started yet."""
        if self.driving or not self.inbound or not (self.sending or self.outcome is not None):
            return False
        self.driving = True
        return True

    def kept(self, sending: list[Outgoing]) -> bool:
        """Puts back ``sending``, which Redis did not take, ahead of later sends, to be tried
        with the next send or before the save; False, not kept, once the outcome is settled."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.sending[:0] = sending
            self.driving = False
            return True

    def next_sends(self) -> list[Outgoing] | None:
        """The sends to queue next, in order; None once there are none and the outcome is
        settled (the save is next); [] when there are none yet (the work stops here, until the
        next send or the outcome starts it again)."""
        with self._lock:
            sending, self.sending = self.sending, []
            if sending:
                return sending
            if self.outcome is None:
                self.driving = False
                return []
            return None


class HandlerThreads:
    """Threads for plain-function handlers, started as needed up to ``most``, each taking the
    next call from one queue. Lighter than ``ThreadPoolExecutor`` (no future per call: a run
    settles itself), and daemons: a process that exits does not wait for an abandoned handler."""

    def __init__(self, most: int):
        self.most = most
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.started = self.idle = 0
        self.guard = threading.Lock()

    def submit(self, function: Callable, *args: Any) -> None:
        self.calls.put((function, args))
        with self.guard:
            if self.idle:
                self.idle -= 1  # that one takes it
                return
            if self.started >= self.most:
                return  # it waits for the first thread free
            self.started += 1
        threading.Thread(target=self._work, name=f"sms-handler-{self.started}", daemon=True).start()

    def _work(self) -> None:
        while True:
            function, args = self.calls.get()
            try:
                function(*args)
            except BaseException:  # a run settles its own failures; this is a bug of ours
                log.exception("a handler thread's call failed")
            with self.guard:
                self.idle += 1


class Runs:
    """A process' handler runs: the pool, the event loop, and a supervisor thread that renews
    leases and stops runs past ``HANDLER_TIMEOUT``. Threads start on first use, so that a
    process forked after the app was built (gunicorn's workers) starts its own."""

    def __init__(
        self,
        handler_of: Callable[[], Handler],
        config: dict[str, Any],
        store: ConversationStore,
        sessions: ConversationSessionInterface,
        keys: Keys,
        callers: Callers,
        on_timeout: Callable[[], None] = lambda: None,
    ):
        self.handler_of = handler_of  # the wiring's handler, read at each call
        self.budget: float = config["HANDLER_INLINE_BUDGET"]
        self.timeout: float = config["HANDLER_TIMEOUT"]
        self.timeout_reply: str = config["HANDLER_TIMEOUT_REPLY"]
        lock_ttl: float = config["LOCK_TTL"]
        self.renew_every = lock_ttl / 3
        self.tick = min(lock_ttl / 6, 0.1)
        self.store, self.sessions, self.keys, self.callers = store, sessions, keys, callers
        self.on_timeout = on_timeout
        self.running: set[Run] = set()
        self._guard = threading.Lock()
        self._pid = 0
        self._pool: HandlerThreads | None = None
        self._finishers: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hub: Any = None  # gevent's hub, when the standard library is patched
        self._supervising = False

    # -- starting ---------------------------------------------------------------------------

    def _started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._guard:
            if self._pid == os.getpid():
                return
            self.running = set()
            self._pool = HandlerThreads(HANDLER_THREADS if _gevent_hub() is None else HANDLER_GREENLETS)
            self._finishers = ThreadPoolExecutor(FINISHING_THREADS, thread_name_prefix="sms-finish")
            self._loop = None
            self._supervising = False
            self._pid = os.getpid()

    def start(self, message: Message, conversation: ConversationSession, inbound: bool = False) -> Run:
        """Starts the handler on ``message`` (bound ``conversation``)."""
        self._started()
        run = Run(self, message, conversation, inbound)
        with self._guard:
            self.running.add(run)
            if not self._supervising:  # it stops whenever nothing runs
                self._supervising = True
                threading.Thread(target=self._supervise, name="sms-handler-supervisor", daemon=True).start()
        # A conversation an operator holds is recorded unanswered (human handoff): no handler.
        handle = _held if conversation.paused else self.handler_of()
        run.is_async = inspect.iscoroutinefunction(handle)
        # The handler sees the context it was called from (a webhook's: Flask's request and app).
        context = contextvars.copy_context()
        if run.is_async:
            loop = self._event_loop()

            def schedule() -> None:
                task = loop.create_task(self._call_async(run, handle), context=context)
                task.add_done_callback(lambda done: self._settle_async(run, done))

            loop.call_soon_threadsafe(schedule)
        else:
            assert self._pool is not None
            self._pool.submit(context.run, self._call, run, handle)
        return run

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The process' event loop for async handlers, in a thread of its own (started once):
        a real OS thread under gevent's patching (``_gevent_hub``)."""
        with self._guard:
            if self._loop is None:
                self._hub = _gevent_hub()
                if self._hub is None:
                    loop = asyncio.new_event_loop()
                    threading.Thread(target=loop.run_forever, name="sms-handler-loop", daemon=True).start()
                else:  # the OS' selector, not gevent's (which waits on a hub of that thread)
                    from gevent import monkey

                    loop = asyncio.SelectorEventLoop(monkey.get_original("selectors", "DefaultSelector")())
                    monkey.get_original("_thread", "start_new_thread")(loop.run_forever, ())
                self._loop = loop
            return self._loop

    def _call(self, run: Run, handle: Handler) -> None:
        try:
            run.settle(RunOutcome.REPLIED, handle(run.message, run.conversation))
        except Exception as error:  # contained: every failure of the developer's is an Exception
            run.settle(RunOutcome.ERROR, error)

    async def _call_async(self, run: Run, handle: Handler) -> tuple[RunOutcome, Any]:
        scope = asyncio.timeout(max(0.0, run.deadline - time.monotonic()))
        try:
            async with scope:
                reply = await handle(run.message, run.conversation)
        except TimeoutError as error:
            return (RunOutcome.TIMEOUT, None) if scope.expired() else (RunOutcome.ERROR, error)
        except Exception as error:
            return RunOutcome.ERROR, error
        return RunOutcome.REPLIED, reply

    def _settle_async(self, run: Run, done: asyncio.Task) -> None:
        try:
            outcome = done.result()
        except BaseException as error:  # the loop's own failure: the run's too
            outcome = (RunOutcome.ERROR, handlers.HandlerFailed(type(error).__name__))
        if self._hub is None:
            run.settle(*outcome)
        else:  # the loop's thread is not the hub's: the run settles in a greenlet there
            self.to_hub(run.settle, *outcome)

    def on_loop_off_hub(self) -> bool:
        """Whether the caller is on the event loop's thread under gevent (not the hub's)."""
        return self._hub is not None and _running_loop() is self._loop

    def to_hub(self, function: Callable, *args: Any) -> None:
        """Calls ``function`` in a greenlet of the hub's thread, after those asked for before."""
        from gevent import spawn

        self._hub.loop.run_callback_threadsafe(spawn, function, *args)

    def done(self, run: Run) -> None:
        """The run is over (answered inline, or saved past the webhook)."""
        with self._guard:
            self.running.discard(run)

    # -- past the webhook ---------------------------------------------------------------------

    def drive_later(self, run: Run) -> None:
        """Has a finishing thread queue ``run``'s sends, then save it once it is settled."""
        assert self._finishers is not None
        self._finishers.submit(self._drive, run)

    def _drive(self, run: Run) -> None:
        while (sending := run.next_sends()) is not None:
            if not sending:
                return  # the next send or the outcome drives it again
            unavailable = self._send_now(run, sending)
            if unavailable and run.kept(sending):
                return  # they go with the next send, or before the save
            if unavailable:
                self._dropped(run, sending, f"Redis unavailable: {unavailable}; not sent")
        self._finish(run)

    def _send_now(self, run: Run, sending: list[Outgoing]) -> str:
        """Queues ``sending``; the Redis error's name if Redis was unavailable (nothing queued),
        else ''."""
        try:
            run.conversation.send_now(sending)
        except LockLost:
            self._dropped(run, sending, "the lock lapsed (another run took the message): nothing sent")
        except Exception as error:
            if is_outage(error):
                return type(error).__name__
            log.exception("a running handler's sends failed")
        return ""

    def _dropped(self, run: Run, sending: list[Outgoing], reason: str) -> None:
        fields = {"message_sid": run.message.sid, "messages": len(sending), "reason": reason}
        write(log, logging.WARNING, "handler send dropped", fields)

    def _finish(self, run: Run) -> None:
        """Saves a run that finished past the webhook, then starts the next inbound message."""
        following = None
        try:
            following = self._save(run)
        except Exception:  # a bug of ours: the lease lapses and the sweeper claims the message again
            log.exception("a finished handler's save failed")
        finally:
            self.done(run)
        if following is not None:
            self.resume(following)

    def _save(self, run: Run) -> Inbound | None:
        kind, value = run.outcome or (RunOutcome.ERROR, None)
        conversation, message = run.conversation, run.message
        fields: dict[str, Any] = {
            "message_sid": message.sid,
            "from": mask(message.sender),
            "to": mask(message.recipient),
            "lasted_ms": round((time.monotonic() - run.started) * 1000, 1),
        }
        state = ""
        if kind == RunOutcome.REPLIED:
            try:
                state = conversation.encoded()
                sends = outbound(value)
            except Exception as error:  # what Twilio or Redis cannot take: the handler's failure
                kind, value = RunOutcome.ERROR, error
        if kind == RunOutcome.REPLIED:
            try:
                for text, media in sends:
                    conversation.outbound.append(_message(conversation, text, media))
            except ValueError as error:  # what Twilio would refuse (empty, too long)
                kind, value = RunOutcome.ERROR, error
        if kind != RunOutcome.REPLIED:
            conversation.outbound.clear()  # nothing of it is committed
            if kind == RunOutcome.TIMEOUT:
                self.on_timeout()
                fields["reason"] = f"the handler ran past HANDLER_TIMEOUT ({self.timeout:g} s): nothing saved"
                if self.timeout_reply:
                    conversation.outbound.append(_message(conversation, self.timeout_reply))
            else:
                where, frames = handlers.failure(value) if value is not None else ("unknown", "")
                fields["reason"] = f"the handler failed: {where}"
                fields["error"] = frames
        try:
            following = conversation.save_inbound(state, failed="" if kind == RunOutcome.REPLIED else kind)
        except SavedAlready:
            fields["reason"] = (
                "its message was saved already (by a rerun after its lease lapsed, or by an earlier try of"
                " this save whose reply was lost): nothing written"
            )
            kind = RunOutcome.SUPERSEDED
            following = None
        except LockLost:
            fields["reason"] = "its save was refused: the lock lapsed (another run took the message)"
            kind = RunOutcome.FENCED
            following = None
        except Exception as error:
            if not is_outage(error):
                raise
            fields["reason"] = f"Redis unavailable: {type(error).__name__}; the message runs again"
            kind = RunOutcome.UNSAVED
            following = None
        fields["outcome"] = kind
        write(log, logging.INFO if kind == RunOutcome.REPLIED else logging.WARNING, "handler " + kind, fields)
        return following

    def resume(self, inbound: Inbound) -> Run:
        """Starts the run of an inbound message whose turn came (the lock is its own)."""
        params = inbound.params
        message = Message.from_params(params, self.callers.name(params.get("From", "")))
        keys = self.keys.conversation(message.sender, message.recipient)
        conversation = ConversationSession.resumed(self.sessions, message, keys, inbound.opened)
        return self.start(message, conversation, inbound=True)

    def recover(self, now: int) -> int:
        """The sweeper's pass at ``now`` (Redis' clock, ms): claims pending conversations whose
        lease lapsed and runs their first inbound message again here; returns how many it
        claimed."""
        client = self.store.client
        pipe = client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.zrangebyscore(self.keys.pending(shard), "-inf", now, start=0, num=PENDING_PER_SHARD)
        claimed = 0
        for members in pipe.execute():
            for member in members:
                inbound = self.store.recover(self.keys.from_member(member))
                if inbound is not None:
                    self.resume(inbound)
                    claimed += 1
        return claimed

    # -- the supervisor -------------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            time.sleep(self.tick)
            with self._guard:
                if not self.running:
                    self._supervising = False
                    return
            try:
                self._tend()
            except Exception as error:
                if is_outage(error):
                    log.warning("handler leases not renewed: Redis %s", type(error).__name__)
                else:
                    log.exception("the handler supervisor failed a round")

    def _tend(self) -> None:
        now = time.monotonic()
        with self._guard:
            running = list(self.running)
        for run in running:
            # An async handler is cancelled at its deadline by its own scope; one that ignores
            # the cancellation, or a plain one, is abandoned a moment later.
            if now >= run.deadline + (0.5 if run.is_async else 0):
                run.settle(RunOutcome.TIMEOUT)
        # Until its save, also while it waits for a finishing thread: a lease lapsing then would
        # have the sweeper run the message again for nothing.
        due = [run for run in running if run.renew_at <= now]
        if not due:
            return
        renewed = self.store.renew([(run.keys, run.token) for run in due], cluster=self.keys.cluster)
        for run, held in zip(due, renewed):
            run.renew_at = now + self.renew_every
            if not held:
                log.warning("a running handler lost its conversation's lock; its save will be refused")


def _gevent_hub() -> Any:
    """The calling thread's gevent hub if gevent patched ``threading`` (a gevent worker), else
    None."""
    if "gevent" not in sys.modules:
        return None
    from gevent import get_hub, monkey

    return get_hub() if monkey.is_module_patched("threading") else None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in the calling OS thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _message(conversation: ConversationSession, text: str, media: tuple[str, ...] = ()) -> Outgoing:
    """An outbound message of a run's save (its reply, ``HANDLER_TIMEOUT_REPLY``), committed with
    it whatever the handler's sends do."""
    return outgoing_message(conversation.sender, conversation.recipient, text, media)


def _held(message: Message, conversation: ConversationSession) -> Reply:
    """The handler of a message to a conversation an operator holds: no reply."""
    return None


def outbound(reply: Reply) -> list[tuple[str, tuple[str, ...]]]:
    """A handler's reply as the outbound messages that carry it: (text, media URLs) each."""
    if reply is None:
        return []
    if isinstance(reply, str):
        return [(reply, ())]
    if not isinstance(reply, MessagingResponse):
        raise TypeError(
            f"the handler returned a {type(reply).__name__}; expected text, a MessagingResponse or None"
        )
    sends = []
    for element in ElementTree.fromstring(reply.to_xml()).iter("Message"):
        body = element.find("Body")
        text = (body.text if body is not None else element.text) or ""
        media = tuple(found.text or "" for found in element.iter("Media"))
        sends.append((text.strip() if body is None else text, media))
    return sends
