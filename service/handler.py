"""The handler API: what a developer's conversation logic receives, and how it is chosen.

A handler is a function ``handle(message, conversation)``, plain or ``async def``, that returns
the reply: text, a twilio ``MessagingResponse`` (several messages, media) or ``None`` (no
reply). The service runs it with the conversation locked, so it may read and change
``conversation`` freely: whatever it holds when the handler returns is saved, nested changes
included. One that takes longer than ``HANDLER_INLINE_BUDGET`` gets its reply sent later
(service/runs.py).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeAlias

from flask_session.base import ServerSideSession
from twilio.twiml.messaging_response import MessagingResponse

from . import timers as timing
from .outbox import Outgoing
from .outbox import message as outgoing_message
from .settings import ConfigError
from .timers import Timer

Reply: TypeAlias = str | MessagingResponse | None
Handler = Callable[["Message", "Conversation"], Any]  # the Reply, or an awaitable of it
EndHook = Callable[["Conversation", str], None]
StatusHook = Callable[[Any], None]  # on_status(update): service/status.py's StatusUpdate
END_REASONS = ("expired", "operator", "opt-out", "handler")  # what on_end's ``reason`` can be

# Twilio's default keywords (its Advanced Opt-Out sends OptOutType instead, when configured).
OPT_OUT = {
    "STOP": {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"},
    "START": {"START", "YES", "UNSTOP"},
    "HELP": {"HELP", "INFO"},
}
KEYWORDS = {word: kind for kind, words in OPT_OUT.items() for word in words}
MAX_MEDIA = 10  # Twilio's limit per message
# Where Python's and installed packages' code lives: not the developer's.
LIBRARIES = tuple({sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")})


@dataclass(frozen=True)
class Message:
    """One inbound message, as Twilio sent it."""

    sender: str
    recipient: str
    body: str
    sid: str
    media: tuple[str, ...] = ()
    caller_name: str = "Friend"
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    opt_out: str | None = None
    """``"STOP"``, ``"START"`` or ``"HELP"`` when Twilio treats the message as that keyword."""
    kind: str = "message"
    """``"message"`` for an inbound message, ``"timer"`` when a timer fired (``body`` is empty)."""
    timer: str | None = None
    """The fired timer's name (``kind == "timer"``)."""
    data: Any = None
    """The fired timer's data, as ``remind`` was given it."""

    @classmethod
    def from_params(cls, params: Mapping[str, str], caller_name: str) -> Message:
        """The message a webhook's fields describe. Its fields are set at once: a frozen
        dataclass' ``__init__`` sets each through ``object.__setattr__``, a call per field, on
        every message."""
        message = object.__new__(cls)
        message.__dict__.update(
            sender=params.get("From", ""),
            recipient=params.get("To", ""),
            body=params.get("Body", ""),
            sid=params.get("MessageSid", ""),
            media=_media(params),
            caller_name=caller_name,
            params=MappingProxyType(dict(params)),
            opt_out=keyword(params),
            kind="message",
            timer=None,
            data=None,
        )
        return message


def keyword(params: Mapping[str, str]) -> str | None:
    """The opt-out family Twilio saw: its ``OptOutType`` when sent, else the body's keyword."""
    given = params.get("OptOutType", "").strip().upper()
    if given in OPT_OUT:
        return given
    return KEYWORDS.get(params.get("Body", "").strip().upper())


def _media(params: Mapping[str, str]) -> tuple[str, ...]:
    number = params.get("NumMedia", "0")
    if number == "0":  # most messages
        return ()
    try:
        count = min(int(number), MAX_MEDIA)
    except ValueError:
        count = 0
    return tuple(params[name] for name in (f"MediaUrl{n}" for n in range(count)) if name in params)


class Conversation(ServerSideSession):
    """The conversation's state, a dict of JSON values, and what the service knows of it.

    ``messages`` counts this conversation's messages, the current one included; ``is_new`` is
    true on its first; ``started_at`` is when that first message was saved. ``end()`` makes the
    current message the last: the state goes once the reply is saved, and the next message
    starts a new conversation. The end hook gets the final one, with ``sender``, ``recipient``,
    ``sid`` (the conversation's id, as in its events), ``ended_at``, ``timers`` (those pending
    when it ended, dropped with it) and, with ``TRANSCRIPTS=1``, ``transcript`` (what was said,
    ``transcripts.Entry`` each). ``send()`` queues an outbound message with the state;
    ``handoff(reason)`` asks for a person.

    Timers (docs/timers.md): ``remind`` sets one, ``cancel`` drops one, ``timers`` lists the
    pending ones; ``expire_after`` gives this conversation its own time to live. Like the
    state, they change with the save of the handler's answer, or not at all.
    """

    sid: str | None

    def __init__(
        self,
        initial: dict[str, Any] | None = None,
        sid: str | None = None,
        *,
        sender: str = "",
        recipient: str = "",
        messages: int = 1,
        started_at: datetime | None = None,
        ttl: int = 14400,
        now_ms: int | None = None,
        timers: dict[str, Timer] | None = None,
        own_ttl: int | None = None,
    ):
        super().__init__(initial, sid=sid)
        self.sender = sender
        self.recipient = recipient
        self.messages = messages
        self.started_at = started_at or datetime.now(UTC)
        self.end_reason: str | None = None
        # The end hook's: the conversation's transcript entries (service/transcripts.py), oldest
        # first, when TRANSCRIPTS=1.
        self.transcript: list[Any] = []
        self.ended_at: datetime | None = None  # set for the end hook
        self.handoff_reason: str | None = None  # handoff(): the handler asks for a person
        self.outbound: list[Outgoing] = []  # queued by send(), committed with the state
        self.default_ttl = ttl  # CONVERSATION_TTL
        if own_ttl is not None:
            self.own_ttl = own_ttl
        self._now_ms = now_ms
        self.pending: dict[str, Timer] = dict(timers) if timers else {}

    # Defaults kept on the class: a message pays for no attribute it does not set.
    own_ttl: int | None = None  # expire_after's, in seconds
    timer_fired = False  # this call is a timer's, not a message's

    @property
    def now_ms(self) -> int:
        """This message's (or timer firing's) time, epoch ms on Redis' clock: what ``remind``
        counts from."""
        if self._now_ms is None:
            self._now_ms = int(self.started_at.timestamp() * 1000)
        return self._now_ms

    @now_ms.setter
    def now_ms(self, value: int) -> None:
        self._now_ms = value

    @property
    def timers(self) -> Mapping[str, Timer]:
        """The pending timers by name, as they will be saved (read-only)."""
        return MappingProxyType(dict(self.pending))

    @property
    def ttl(self) -> int:
        """Seconds this conversation lives after this message (its own, else CONVERSATION_TTL)."""
        return self.own_ttl if self.own_ttl is not None else self.default_ttl

    def remind(
        self,
        after: timedelta | float | datetime,
        name: str,
        data: Any = None,
        cancel_on_reply: bool = True,
    ) -> Timer:
        """Calls the handler again with ``message.kind == "timer"``, ``message.timer == name``
        and ``message.data == data`` once ``after`` (a ``timedelta`` or seconds from now, or an
        aware ``datetime``) has come, unless the conversation ends first, ``cancel(name)`` is
        called, or (``cancel_on_reply``) a message arrives first. A timer of the same name is
        replaced. ``ValueError`` if it would be due after the conversation's end (call
        ``expire_after`` first), or its name or data cannot be stored."""
        due_ms = timing.due_at(after, self.now_ms)
        timing.checked(name, data, len(self.pending) - (name in self.pending))
        end_ms = self.now_ms + self.ttl * 1000
        if due_ms > end_ms:
            raise ValueError(
                f"remind: {name!r} would be due after the conversation ends ({self.ttl} s after "
                "this message); conversation.expire_after(seconds) lets it live longer"
            )
        timer = Timer(name, due_ms, data, bool(cancel_on_reply), timing.new_id())
        self.pending[name] = timer
        return timer

    def cancel(self, name: str) -> bool:
        """Drops the pending timer ``name``; False if there was none."""
        return self.pending.pop(name, None) is not None

    def expire_after(self, seconds: float | timedelta) -> None:
        """This conversation lives ``seconds`` (1 s to 30 days) after this message instead of
        ``CONVERSATION_TTL``, and after each later message and timer firing. ``ValueError`` out of
        range, or if a pending timer would then be due after its end."""
        value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
        if not 1 <= value <= timing.MAX_TTL:
            raise ValueError(f"expire_after: 1 to {timing.MAX_TTL} seconds, not {seconds!r}")
        end_ms = self.now_ms + int(value) * 1000
        late = [timer.name for timer in self.pending.values() if timer.due_ms > end_ms]
        if late:
            raise ValueError(f"expire_after: timers {late} would be due after the conversation ends")
        self.own_ttl = int(value)

    def send(
        self,
        text: str | None = None,
        media: Iterable[str] = (),
        *,
        content_sid: str | None = None,
        content_variables: dict | str | None = None,
    ) -> str:
        """Queues a message to the other party, from our number: it is committed with the
        conversation's state (if the state is not saved, nothing is sent; if it is, the message
        goes out, also after a crash), then delivered through Twilio's REST API in the order
        sent. In a handler past ``HANDLER_INLINE_BUDGET`` it leaves at once instead ("one
        moment…"), those sent so far with Twilio's empty answer, while the handler's run holds
        the conversation (docs/outbound.md). ``content_sid`` and ``content_variables``: a
        template instead of free text (what WhatsApp takes outside its 24-hour window). Returns
        the message's id; ``ValueError`` for a message Twilio would refuse (empty, over 1,600
        characters, over 10 media); ``RuntimeError`` in the end hook, whose conversation has
        ended and saves nothing."""
        if self.ended_at is not None:
            raise RuntimeError("an ended conversation saves nothing, so sends nothing: use service.send(...)")
        queued = outgoing_message(
            self.sender,
            self.recipient,
            text,
            media,
            content_sid=content_sid,
            content_variables=content_variables,
        )
        self._queue(queued)
        return queued.id

    def _queue(self, queued: Outgoing) -> None:
        """Where a sent message goes: with the state, at its save."""
        self.outbound.append(queued)

    @property
    def is_new(self) -> bool:
        """True on the conversation's first message (not on the reply to an outbound message
        that started it: that conversation began with the message sent; never for a timer's
        call)."""
        return self.messages == 1 and not self.started_by_us and not self.timer_fired

    started_by_us = False  # the conversation began with an outbound message (service.send)

    def end(self) -> None:
        self.end_reason = "handler"

    def handoff(self, reason: str = "asked for a person") -> None:
        """Asks for a person: once this message is saved the conversation is flagged on the
        console's overview until an operator takes it over (or it ends). The bot goes on
        answering until then."""
        self.handoff_reason = (reason or "asked for a person")[:200]

    def clear(self) -> None:
        """All state goes (Flask-Session's ``clear`` would keep a ``_permanent`` key)."""
        dict.clear(self)
        self.modified = True


def load(spec: str) -> Handler:
    """``package.module:function`` → the function; ``ConfigError`` naming ``SMS_HANDLER`` if not
    (nor when the module's ``on_end`` is not a function of two arguments).

    The working directory is importable, as under gunicorn and ``flask run``.
    """
    module_name, colon, attribute = spec.partition(":")
    if not (module_name and colon and attribute):
        raise ConfigError(f"SMS_HANDLER={spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # any import-time failure is this setting's problem
        raise ConfigError(
            f"SMS_HANDLER={spec!r}: cannot import {module_name}: {type(error).__name__}: {error}"
        ) from None
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ConfigError(f"SMS_HANDLER={spec!r}: {module_name} has no function {attribute}")
    if not _takes(handler, 2):
        raise ConfigError(f"SMS_HANDLER={spec!r}: {attribute} must take (message, conversation)")
    _end_hook_of(handler, spec)
    return handler


def _takes(function: Callable, count: int) -> bool:
    """Whether ``function`` can be called with ``count`` positional arguments."""
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature to read (some built-ins): cannot tell, so trusted
        return True
    return True


def _end_hook_of(handler: Handler, spec: str | None) -> EndHook | None:
    """The handler's module's ``on_end``, if it has one; ``ConfigError`` if that is not a
    function of ``(conversation, reason)`` (ignored, it would never run)."""
    module_name = getattr(handler, "__module__", "") or ""
    found = getattr(sys.modules.get(module_name), "on_end", None)
    if found is None:
        return None
    if not callable(found) or not _takes(found, 2):
        setting = f"SMS_HANDLER={spec!r}: " if spec else ""
        raise ConfigError(f"{setting}{module_name}.on_end must be a function of (conversation, reason)")
    return found


class HandlerFailed(Exception):
    """The developer's code raised what is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``, ``CancelledError``, ``GeneratorExit``): held as an ordinary failure
    of that one call, since let through it reaches the server's own code and stops a worker
    (gunicorn's, on SystemExit or KeyboardInterrupt, the whole service). The original is its
    ``__cause__``."""


class Unkeepable(ValueError):
    """The handler's reply or state is one the service cannot send or keep (too large, or a
    character XML or UTF-8 cannot carry); the text says why without quoting it."""


def contained(function: Callable) -> Callable:
    """``function`` whose every exception is an ``Exception`` (``HandlerFailed`` for others);
    an ``async def`` stays one, and the cancellation of a call past ``HANDLER_TIMEOUT`` goes
    through as the cancellation it is."""
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def call_async(*args):
            try:
                return await function(*args)
            except Exception:
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # cancelled from outside: the timeout
                    raise
                raise HandlerFailed("CancelledError") from None
            except BaseException as error:
                raise HandlerFailed(type(error).__name__) from error

        return call_async

    @functools.wraps(function)
    def call(*args):
        try:
            return function(*args)
        except Exception:
            raise
        except BaseException as error:
            raise HandlerFailed(type(error).__name__) from error

    return call


def failure(error: BaseException) -> tuple[str, str]:
    """What the developer's code raised, for the logs: its type and where (``KeyError at
    bot.py:12 in handle``), and its frames; never its text, which may quote a message's body
    or the state (an ``int(message.body)``'s ``ValueError``, a ``KeyError``)."""
    if isinstance(error, Unkeepable):
        return str(error), "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)))
    if isinstance(error, HandlerFailed) and error.__cause__ is not None:
        error = error.__cause__
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if not frame.filename.startswith(LIBRARIES)]
    where = type(error).__name__
    if own or frames:  # the developer's line rather than the library it called
        last = (own or frames)[-1]
        where += f" at {os.path.basename(last.filename)}:{last.lineno} in {last.name}"
    return where, "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + where


def status_hook(handler: Handler) -> StatusHook | None:
    """The handler's module's ``on_status``, if it has one (``contained``); ``ConfigError`` if
    that is not a function of one argument (the ``StatusUpdate``)."""
    module_name = getattr(handler, "__module__", "") or ""
    found = getattr(sys.modules.get(module_name), "on_status", None)
    if found is None:
        return None
    if not callable(found) or not _takes(found, 1):
        raise ConfigError(f"{module_name}.on_status must be a function of (update)")
    return contained(found)


def choose(
    config: Mapping[str, Any], handler: Handler | None = None, on_end: EndHook | None = None
) -> tuple[Handler, EndHook | None]:
    """``handler`` if given, else ``SMS_HANDLER`` (the counter by default); ``on_end`` if given,
    else the handler's module's ``on_end`` function, if it has one. Both run ``contained``."""
    spec = None if handler is not None else config["SMS_HANDLER"]
    handler = handler or load(config["SMS_HANDLER"])
    if on_end is None:
        on_end = _end_hook_of(handler, spec)
    return contained(handler), contained(on_end) if on_end is not None else None
