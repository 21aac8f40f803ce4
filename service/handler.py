"""The handler API: what a developer's conversation logic receives, and how it is chosen.

A handler is a plain function ``handle(message, conversation)`` that returns the reply: text, a
twilio ``MessagingResponse`` (several messages, media) or ``None`` (no reply). The service runs
it with the conversation locked, so it may read and change ``conversation`` freely: whatever
it holds when the handler returns is saved, nested changes included.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeAlias

from flask_session.base import ServerSideSession
from twilio.twiml.messaging_response import MessagingResponse

from .outbox import Outgoing
from .outbox import message as outgoing_message
from .settings import ConfigError

Reply: TypeAlias = str | MessagingResponse | None
Handler = Callable[["Message", "Conversation"], Reply]
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

    @classmethod
    def from_params(cls, params: Mapping[str, str], caller_name: str) -> Message:
        return cls(
            sender=params.get("From", ""),
            recipient=params.get("To", ""),
            body=params.get("Body", ""),
            sid=params.get("MessageSid", ""),
            media=_media(params),
            caller_name=caller_name,
            params=MappingProxyType(dict(params)),
            opt_out=keyword(params),
        )


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
    ``sid`` (the conversation's id, as in its events), ``ended_at`` and, with ``TRANSCRIPTS=1``,
    ``transcript`` (what was said, ``transcripts.Entry`` each). ``send()`` queues an outbound
    message with the state; ``handoff(reason)`` asks for a person.
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
        sent. ``content_sid`` and ``content_variables``: a template instead of free text (what
        WhatsApp takes outside its 24-hour window). Returns the message's id; ``ValueError``
        for a message Twilio would refuse (empty, over 1,600 characters, over 10 media);
        ``RuntimeError`` in the end hook, whose conversation has ended and saves nothing."""
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
        self.outbound.append(queued)
        return queued.id

    @property
    def is_new(self) -> bool:
        """True on the conversation's first message (not on the reply to an outbound message
        that started it: that conversation began with the message sent)."""
        return self.messages == 1 and not self.started_by_us

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
    """``function`` whose every exception is an ``Exception`` (``HandlerFailed`` for others)."""

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
