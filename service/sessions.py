"""Flask's session seam for conversations: during a webhook, ``flask.session`` is the message's
conversation.

What differs from Flask-Session's Redis backend, each for a reason in docs/design.md:
- Opening a session touches no Redis: the cookie is only a hint. The webhook binds the
  session to its conversation (round trip 1) once the request is proven to come from Twilio,
  and saves it (round trip 2) once the handler has answered. Other routes never bind.
- The conversation, not the cookie, finds the state: it lives under the (From, To) pair, so
  a stale, forged or other-pair cookie can neither split nor leak a conversation.
- State is JSON only (Flask-Session's serializers fall back to pickle).
- The cookie is set only once the state is saved; a session bound but never saved (the view
  failed) gives its lock back.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from flask_session.base import Serializer, ServerSideSession
from werkzeug.http import dump_cookie, parse_cookie

from . import timers
from .handler import Conversation, Message, Unkeepable
from .keys import ConversationKeys, Keys
from .logs import annotate, report
from .metrics import Metrics
from .outbox import Doorbell, Outgoing, encode
from .redis_client import is_outage
from .store import NO_CHANGE, Commit, ConversationStore, Inbound, Opened, Queued, Timing, decode_state
from .timers import Timer
from .transcripts import OFF as TRANSCRIPTS_OFF
from .transcripts import Settings as TranscriptSettings
from .transcripts import payload as transcript_payload

log = logging.getLogger(__name__)
COOKIE_NAME = "sms_session"
URLSAFE = re.compile(r"[A-Za-z0-9_-]+")  # token_urlsafe's alphabet: a cookie value unquoted
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A conversation's id: 128 random bits (22 characters), unique however many conversations there
# are. It only names the conversation (its events, the end hook, the cookie's hint) and grants
# nothing: the signed (From, To) pair finds the state. Stored twice (the hash and the started
# event), so 256 bits cost 42 bytes per conversation for nothing.
SESSION_ID_BYTES = 16


class JsonSerializer(Serializer):
    """Flask-Session's serializer slot, JSON only."""

    # One encoder: json.dumps with options other than the defaults builds one per call. NaN
    # and infinities are not JSON (the operators' API and the CLI serve the state as JSON).
    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

    def encode(self, session: ServerSideSession) -> str:
        return self.dumps(dict(session))

    def dumps(self, state: dict) -> str:
        """``state`` as stored; ``ValueError`` for what JSON or UTF-8 (Redis) cannot carry."""
        text = self._encode(state)
        if not text.isascii() and LONE_SURROGATE.search(text):
            raise Unkeepable("its state holds a lone surrogate, which UTF-8 cannot carry")
        return text

    def decode(self, serialized_data: str) -> dict:
        state = decode_state(serialized_data)
        if state is None:
            raise ValueError("session state is not a JSON object")
        return state


@dataclass
class Binding:
    """What ``bind`` found for the request's message: the conversation's keys and ``OPEN``'s
    answer."""

    message: Message
    keys: ConversationKeys
    opened: Opened
    sid: str = ""  # the conversation's id, whatever the handler does to ``session.sid``
    replaces: bool = False  # a stored conversation it could not read, which its save ends


class ConversationSession(Conversation):
    """The session of one webhook request: unbound until ``bind``, then the conversation."""

    loaded_timers: dict[str, Timer] = {}  # as OPEN found them (replaced, never changed in place)
    reply_cancelled = 0  # cancel_on_reply timers this message cancelled
    # Where the handler's sends go while its run lasts (``runs.Run.sent``), else with the state.
    sends_to: Callable[[Outgoing], None] | None = None
    # What its run queued past the webhook (DEFER, INTERIM): gone already, in the transcript at
    # the save.
    left: tuple[Outgoing, ...] = ()

    def __init__(self, interface: ConversationSessionInterface, cookie: str | None):
        super().__init__(sid=cookie, ttl=interface.ttl)
        self.interface = interface
        self.binding: Binding | None = None
        self.settled = False  # saved, or given up: nothing left to release
        self.saved = False
        self.queued = False  # among the inbound messages a handler's run takes in turn

    def bind(self, message: Message) -> ConversationSession:
        """Round trip 1: waits for the conversation's turn and loads it into this session.

        ``answered`` is then the stored answer of a redelivered ``MessageSid`` (nothing locked),
        else None with the conversation held until ``save`` or ``release``.
        """
        keys = self.interface.keys.conversation(message.sender, message.recipient)
        self.sender, self.recipient = message.sender, message.recipient
        opened = self.interface.store.open_or_queue(keys, message.sid, lambda: entry(message))
        if isinstance(opened, Queued):  # acknowledged: a handler's run takes it in turn
            self.queued = self.settled = True
            return self
        self.binding = Binding(message, keys, opened)
        if opened.answered is not None:
            self.sid = opened.sid or self.sid
        else:
            self._load(opened)
        return self

    @property
    def answered(self) -> str | None:
        return self.binding.opened.answered if self.binding else None

    @property
    def paused(self) -> bool:
        """An operator holds the conversation (human handoff): the bot does not answer."""
        if not self.binding or not self.binding.opened.paused.isdigit():
            return False
        return int(self.binding.opened.paused) > self.binding.opened.now

    def encoded(self) -> str:
        """The state as it is stored; ``ValueError`` (``Unkeepable`` for what JSON takes but
        Redis cannot, or an ``end_reason`` set by hand that is not one) when it cannot be."""
        if self.end_reason not in (None, "handler", "opt-out"):
            raise Unkeepable("its end_reason is not one a message can end with: call conversation.end()")
        return self.interface.serializer.encode(self)

    def save(self, answer: str, state: str) -> None:
        """Round trip 2: ``state`` (``encoded()``; or the conversation's end) and ``answer``,
        kept for a redelivery. Raises ``LockLost`` or a Redis error (the view answers 503)."""
        bound = self._bound()
        commit = self._commit(
            bound,
            bound.sid,
            state,
            answer,
            end_reason=self.end_reason,
            timers=self.timing(),
            sent=self.outbound,
        )
        ended = self.interface.store.save(bound.keys, bound.opened, commit)
        self.settled = self.saved = True  # else save_session releases the lock (a no-op if not ours)
        self._count(bound, ended)

    def _commit(
        self,
        bound: Binding,
        sid: str,
        state: str,
        answer: str,
        *,
        end_reason: str | None,
        timers: Timing,
        sent: Sequence[Outgoing],
        outcome: str = "",
    ) -> Commit:
        """What the save of ``bound``'s message writes; ``sent``: the messages its transcript
        entries show (queued now, or sent while the handler ran), ``outcome``: a failed run's."""
        transcript = transcript_payload(
            self.interface.transcripts,
            bound.message,
            answer,
            bound.opened.now,
            self.sid or "",
            sent,
            outcome=outcome,
        )
        return Commit(
            sid=sid,
            state=state,
            is_new=self.is_new,
            message_sid=bound.message.sid,
            answer=answer,
            end_reason=end_reason,
            transcript=transcript,
            handoff=self.handoff_reason or "",
            outbound=encode(self.outbound) if self.outbound else "",
            keyword=bound.message.opt_out,
            timers=timers,
        )

    def _count(self, bound: Binding, ended: bool) -> None:
        counters = self.interface.metrics
        if self.loaded_timers or self.pending:
            count_timers(counters, self.loaded_timers, self.pending, self.reply_cancelled, ended)
        if bound.opened.ended_overdue:
            counters.conversations_ended.labels("expired").inc()
        if bound.replaces and self.end_reason != "opt-out":  # else ``ended`` counts it
            counters.conversations_ended.labels("operator").inc()
        if self.is_new and self.end_reason != "opt-out":
            counters.conversations_started.inc()
        if ended:
            counters.conversations_ended.labels(self.end_reason).inc()
        if self.outbound:
            counters.outbound.labels("pending").inc(len(self.outbound))
            self.interface.doorbell.ring()

    def _queue(self, queued: Outgoing) -> None:
        if self.sends_to is None:
            self.outbound.append(queued)
        else:
            self.sends_to(queued)

    def defer(self, early: Sequence[Outgoing] = ()) -> None:
        """The handler runs past the webhook: the message becomes the conversation's first
        inbound message (durable before Twilio is answered) and the lock a renewed lease;
        ``early``, what the handler sent so far, is queued with it. Raises ``LockLost`` or a
        Redis error (the view answers 503)."""
        bound = self._bound()
        self.interface.store.defer(
            bound.keys, bound.opened.token, bound.message.sid, entry(bound.message), encode(early)
        )
        self.settled = True
        self._gone(early)

    def send_now(self, messages: Sequence[Outgoing]) -> None:
        """Queues ``messages`` at once, under the lock its run holds past the webhook. Raises
        ``LockLost`` (the lock is no longer the run's: nothing queued) or a Redis error."""
        bound = self._bound()
        self.interface.store.interim(bound.keys, bound.opened.token, encode(messages))
        self._gone(messages)

    def _gone(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            self.left = (*self.left, *messages)
            self.interface.metrics.outbound.labels("pending").inc(len(messages))
            self.interface.doorbell.ring()

    def save_inbound(self, state: str, failed: str = "") -> Inbound | None:
        """The save of an inbound message (its handler ran past the webhook): ``state`` and the
        queued outbound messages, or, ``failed`` (the run's outcome: ``timeout``, ``error``),
        nothing but the answer's memory, the outbound messages and the transcript's entries, the
        message's marked with that outcome; returns the next inbound message, whose turn it now
        is, if one waits. Raises ``LockLost`` (a late save: fenced off) or a Redis error."""
        bound = self._bound()
        keeps = bool(failed)
        self.settled = True
        commit = self._commit(
            bound,
            self.sid or "",
            state,
            "n",  # the reply goes out as outbound messages: a redelivery gets none
            end_reason=None if keeps else self.end_reason,
            timers=NO_CHANGE if keeps else self.timing(),
            sent=[*self.left, *self.outbound],
            outcome=failed,
        )
        ended, following = self.interface.store.save_inbound(bound.keys, bound.opened, commit, keeps)
        self.saved = True
        if not keeps:
            self._count(bound, ended)
        elif self.outbound:
            self.interface.metrics.outbound.labels("pending").inc(len(self.outbound))
            self.interface.doorbell.ring()
        return following

    @classmethod
    def resumed(
        cls, interface: ConversationSessionInterface, message: Message, keys: ConversationKeys, opened: Opened
    ) -> ConversationSession:
        """The session of an inbound message whose turn came outside a webhook."""
        session = cls(interface, None)
        session.sender, session.recipient = message.sender, message.recipient
        session.binding = Binding(message, keys, opened)
        session._load(opened)
        return session

    def timing(self) -> Timing:
        """The timers and own TTL to save: the timers only when they changed."""
        if not self.pending and not self.loaded_timers and self.own_ttl is None:
            return NO_CHANGE
        return timing_of(self, self.loaded_timers)

    def release(self) -> None:
        """Gives the conversation back unsaved; Redis failing here only delays the next
        message until the lock lapses."""
        bound = self._bound()
        try:
            self.interface.store.release(bound.keys, bound.opened.token)
        except Exception as error:
            if not is_outage(error):
                raise
            self.interface.metrics.count_redis_error()
            report(log, f"could not release the lock (it lapses by itself): {type(error).__name__}")
        self.settled = True

    def _bound(self) -> Binding:
        if self.binding is None:
            raise RuntimeError("this session was never bound to a conversation")
        return self.binding

    def _load(self, opened: Opened) -> None:
        self._now_ms = opened.now
        self._load_state(opened)
        if opened.timers or opened.ttl:  # most conversations have neither
            self._load_timers(opened)

    def _load_timers(self, opened: Opened) -> None:
        if not opened.sid:  # nothing stored: no timers, no own TTL
            return
        self.own_ttl = int(opened.ttl) // 1000 if opened.ttl.isdigit() else None
        self.loaded_timers = timers.decode(opened.timers) if opened.timers else {}
        if self.messages == 1:  # unreadable, started afresh: its timers go with the rest
            self.own_ttl = None
            return
        # A message cancels the timers set to wait for one, before its handler runs.
        self.pending = {
            name: timer for name, timer in self.loaded_timers.items() if not timer.cancel_on_reply
        }
        self.reply_cancelled = len(self.loaded_timers) - len(self.pending)

    def _load_state(self, opened: Opened) -> None:
        state = decode_state(opened.state) if opened.sid and opened.state else None
        if state is not None and not self._keepable(opened.state, state):
            state = None
        # seq is 0 for a conversation an outbound message started (service.send): no message yet.
        messages = int(opened.seq) if opened.seq.isdigit() else None
        first_seen = opened.first_seen.isdigit() and int(opened.first_seen)
        if state is None or messages is None or not first_seen:
            if opened.sid or opened.state or opened.seq:
                report(log, "stored conversation is unreadable; started afresh")
            self._bound().replaces = bool(opened.sid)
            self.sid = self._bound().sid = secrets.token_urlsafe(SESSION_ID_BYTES)
            self.messages = 1
            self.started_at = _moment(opened.now)
            return
        if self.sid and self.sid != opened.sid:
            annotate(cookie="not this conversation's; ignored")
        self.sid = self._bound().sid = opened.sid
        self.update(state)
        self.messages = messages + 1
        self.started_by_us = messages == 0
        self.started_at = _moment(first_seen)
        self.modified = False

    def _keepable(self, raw: str, state: dict) -> bool:
        """Whether stored ``state`` could be saved again: a hand edit may hold what JSON reads
        but this service never writes (a lone surrogate, NaN), which would fail every message
        of the conversation until it expired."""
        if "\\u" not in raw and "NaN" not in raw and "Infinity" not in raw:
            return True
        try:
            self.interface.serializer.dumps(state)
        except ValueError:
            return False
        return True


class ConversationSessionInterface(SessionInterface):
    """Opens an unbound ``ConversationSession`` per request; sets Twilio's cookie once saved."""

    serializer = JsonSerializer()

    def __init__(
        self,
        store: ConversationStore,
        keys: Keys,
        ttl: int,
        metrics: Metrics,
        transcripts: TranscriptSettings = TRANSCRIPTS_OFF,
        doorbell: Doorbell | None = None,
    ):
        self.store = store
        self.doorbell = doorbell or Doorbell()  # the process' sender's (service/outbox.py)
        self.transcripts = transcripts
        self.keys = keys
        self.ttl = ttl
        self.metrics = metrics
        self._attributes = (0, "")  # (second, the cookie's attributes written in that second)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE_NAME

    def open_session(self, app: Flask, request: Request) -> ConversationSession:
        return ConversationSession(self, _cookie(request))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ConversationSession)  # this interface opens no other kind
        if session.binding is not None and session.answered is None and not session.settled:
            session.release()  # the view failed before it could save
        sid = session.binding.sid if session.saved and session.binding else session.sid
        if sid and (session.saved or session.answered is not None):
            response.headers.add("Set-Cookie", self.cookie(app, sid))

    def cookie(self, app: Flask, sid: str) -> str:
        """The ``Set-Cookie`` value for ``sid``, as werkzeug's ``dump_cookie`` writes it.

        Only Expires changes, once a second, so the attributes are written by ``dump_cookie``
        once a second and the id put in front, instead of on every response. An id that would
        need quoting (a hand-edited one) gets the full call.
        """
        if not URLSAFE.fullmatch(sid):
            return self._dump(app, sid, int(time.time()))
        second = int(time.time())
        written, attributes = self._attributes
        if written != second:
            attributes = self._dump(app, "x", second)[len(COOKIE_NAME) + 2 :]
            self._attributes = (second, attributes)
        return f"{COOKIE_NAME}={sid}{attributes}"

    def _dump(self, app: Flask, value: str, second: int) -> str:
        return dump_cookie(
            COOKIE_NAME,
            value,
            max_age=self.ttl,
            expires=second + self.ttl,
            httponly=True,
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
        )


def timing_of(conversation: Conversation, loaded: dict[str, Timer]) -> Timing:
    """What a script stores of ``conversation``'s timers (``loaded``: as they were found):
    their JSON only when they changed, their earliest due, its own TTL in ms."""
    own = conversation.own_ttl * 1000 if conversation.own_ttl is not None else ""
    if conversation.pending == loaded:
        return ("", "", own)
    return (timers.encode(conversation.pending), timers.earliest(conversation.pending), own)


def count_timers(
    metrics: Metrics, loaded: dict[str, Timer], pending: dict[str, Timer], by_reply: int, ended: bool
) -> None:
    """Counts the timers a save set and dropped (``by_reply`` of them by the message itself)."""
    if loaded is pending or (not loaded and not pending):
        return
    kept = {timer.id for timer in loaded.values()}
    now = {timer.id for timer in pending.values()}
    if added := len(now - kept):
        metrics.timers_set.inc(added)
    if dropped := len(kept - now) - by_reply:
        metrics.timers_cancelled.labels("handler").inc(dropped)
    if by_reply:
        metrics.timers_cancelled.labels("reply").inc(by_reply)
    if ended and pending:
        metrics.timers_cancelled.labels("ended").inc(len(pending))


def _cookie(request: Request) -> str | None:
    """The conversation's cookie, as ``request.cookies`` reads it. werkzeug finds the header by
    walking the whole environ (``headers.getlist``), where a WSGI server gives it as the one
    ``HTTP_COOKIE`` (PEP 3333); an ASCII one (Twilio echoes ours, ``token_urlsafe``) is parsed
    from there by werkzeug's ``parse_cookie``, which reads ASCII as ``request.cookies`` does.
    Any other goes to ``request.cookies`` itself."""
    header = request.environ.get("HTTP_COOKIE")
    if header is not None and not header.isascii():
        return request.cookies.get(COOKIE_NAME)
    return parse_cookie(header).get(COOKIE_NAME)


def _moment(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def entry(message: Message) -> str:
    """The message's fields as the conversation's inbound messages hold them (JSON)."""
    return json.dumps(dict(message.params), ensure_ascii=False, separators=(",", ":"))
