"""Outbound messages as the conversation store queues them: what a message is, its id, and how
a save carries it (the per-conversation outbox itself is ``service/store/outbound.lua``).

Queueing is part of a SAVE: a message is committed with the state that decided it, or not at
all. Any feature that saves a conversation queues through here:

- a handler calls ``conversation.send(text, media=[...])`` (``handler.Conversation.send``);
- code holding a ``Conversation`` does the same, and passes ``encode(conversation.outbound)``
  as the ``outbound`` of ``ConversationStore.save``'s ``Commit`` (the webhook's session does
  exactly this);
- a Lua script of the store that saves a conversation puts ``outbound.lua`` in its ``uses:``
  line and calls ``queue_outbound(member, payload, now)`` with the same ``encode`` payload.

The sender (``service/sender.py``) delivers them; ``service/sending.py`` sends from outside a
webhook, under the conversation's lock.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_BODY = 1600  # Twilio's longest message body (its error 21617)
MAX_MEDIA = 10  # Twilio's most media per message
WHATSAPP = "whatsapp:"


class Refused(ValueError):
    """A message the service will not queue or send: the text names the rule (and Twilio's
    error code, ``code``)."""

    def __init__(self, reason: str, code: int | None = None):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Outgoing:
    """One outbound message: from our number ``sender`` to the conversation's ``to``."""

    id: str
    to: str
    sender: str
    body: str | None = None
    media: tuple[str, ...] = ()
    content_sid: str | None = None  # a template (WhatsApp outside its 24 h window)
    content_variables: str | None = None  # its variables, JSON
    extra: dict = field(default_factory=dict)  # what a feature wants kept on the record

    def to_json(self) -> dict:
        data: dict = {"id": self.id, "to": self.to, "from": self.sender, "media": list(self.media)}
        for name in ("body", "content_sid", "content_variables"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_json(cls, data: dict) -> Outgoing:
        return cls(
            id=data["id"],
            to=data["to"],
            sender=data["from"],
            body=data.get("body"),
            media=tuple(data.get("media") or ()),
            content_sid=data.get("content_sid"),
            content_variables=data.get("content_variables"),
            extra=data.get("extra") or {},
        )


class Doorbell:
    """Wakes a process' sender: every save of the process that queued outbound messages rings
    it, so that the sender starts a pass at once rather than after ``SENDER_INTERVAL`` (which
    messages other processes queue still wait at most)."""

    def __init__(self) -> None:
        self._rung = threading.Event()

    def ring(self) -> None:
        self._rung.set()

    def wait(self, seconds: float) -> bool:
        """Whether it rang within ``seconds`` (or had rung since the last wait)."""
        rung = self._rung.wait(seconds)
        self._rung.clear()
        return rung


class WebhookLoad:
    """The webhook requests a process is serving (``webhook.Webhook`` counts them). Its sender
    yields to them: it hands Twilio a message in the webhook's pauses (no request for
    ``PAUSE``), and one every ``SENDER_YIELD`` however busy the webhook is. An inbound message
    Twilio cannot deliver within 15 s is lost, an outbound one waits in its outbox, so on cores
    both share the webhook comes first (docs/outbound.md, "The webhook first")."""

    # No request for this long is a pause: the gaps between a busy worker's requests are
    # shorter, and a message sent in them would take the cores its next requests need.
    PAUSE = 0.01
    POLL = 0.005  # seconds between two looks at a busy webhook

    def __init__(self) -> None:
        self._requests: deque[None] = deque()  # one item a request: append and pop are atomic
        self._last = 0.0  # when (monotonic) a request last came or went
        self._turn = threading.Lock()  # one sender thread waits for a pause, the others behind it
        self._anyway = 0.0  # when the next message may go however busy the webhook is

    def enter(self) -> None:
        self._requests.append(None)
        self._last = time.monotonic()

    def leave(self) -> None:
        self._requests.pop()
        self._last = time.monotonic()

    @property
    def serving(self) -> int:
        return len(self._requests)

    def paused(self) -> bool:
        return not self._requests and time.monotonic() - self._last >= self.PAUSE

    def turn(self, patience: float, stopping: threading.Event) -> None:
        """Returns in a pause of the webhook, or when ``patience`` seconds have passed since
        the last message that went while it was busy (at once the first time); ``patience`` 0
        returns at once."""
        if patience <= 0 or self.paused():
            return
        with self._turn:
            while not self.paused() and not stopping.is_set():
                now = time.monotonic()
                if now >= self._anyway:
                    self._anyway = now + patience
                    return
                stopping.wait(min(self.POLL, self._anyway - now))


def new_id() -> str:
    """An outbound message's id: 16 random bytes, URL-safe (it travels in the status callback's
    URL)."""
    return secrets.token_urlsafe(16)


def message(
    to: str,
    sender: str,
    text: str | None = None,
    media: Iterable[str] = (),
    *,
    content_sid: str | None = None,
    content_variables: dict | str | None = None,
) -> Outgoing:
    """A checked outbound message (``ValueError`` for one Twilio would refuse: empty, too long,
    too many media, a template's variables that are not a JSON object)."""
    if text is not None and not isinstance(text, str):
        raise TypeError(f"a message's text is a str, not {type(text).__name__}")
    attached = tuple(media)
    if not all(isinstance(url, str) and url for url in attached):
        raise ValueError("each media item is a URL (a non-empty str)")
    if len(attached) > MAX_MEDIA:
        raise ValueError(f"{len(attached)} media: Twilio takes at most {MAX_MEDIA} per message")
    if text is not None and len(text) > MAX_BODY:
        raise ValueError(f"a message's text is at most {MAX_BODY} characters (this one: {len(text)})")
    variables = content_variables
    if isinstance(variables, dict):
        variables = json.dumps(variables, ensure_ascii=False)
    elif variables is not None:
        parsed = json.loads(variables)
        if not isinstance(parsed, dict):
            raise ValueError("content_variables is a JSON object")
    if variables is not None and not content_sid:
        raise ValueError("content_variables without content_sid")
    if not (text or attached or content_sid):
        raise ValueError("a message needs text, media or a template (content_sid)")
    return Outgoing(new_id(), to, sender, text or None, attached, content_sid or None, variables)


def encode(messages: Sequence[Outgoing]) -> str:
    """What a SAVE carries to queue ``messages`` (``outbound.lua``'s payload: id, JSON, …), or
    '' for none (then the save costs nothing more)."""
    if not messages:
        return ""
    flat: list[str] = []
    for outgoing in messages:
        flat += [outgoing.id, json.dumps(outgoing.to_json(), ensure_ascii=False, separators=(",", ":"))]
    return json.dumps(flat, ensure_ascii=False)


def is_whatsapp(number: str) -> bool:
    return number.startswith(WHATSAPP)


WHATSAPP_WINDOW_MS = 24 * 3600 * 1000


def refusal(outgoing: Outgoing, opted_out: str, last_inbound: str, now: int) -> Refused | None:
    """The rule that keeps ``outgoing`` from leaving, if any: its number opted out (STOP, until
    START; Twilio's 21610), or free text to a WhatsApp number more than 24 hours after its last
    inbound message (only a template may go then; Twilio's 63016). ``opted_out`` and
    ``last_inbound``: the contacts' fields (ms, or ''); ``now``: Redis' clock (ms)."""
    if opted_out:
        return Refused("the number opted out (STOP): nothing is sent to it until it texts START", 21610)
    window_open = bool(last_inbound) and now - int(last_inbound) <= WHATSAPP_WINDOW_MS
    if is_whatsapp(outgoing.to) and not outgoing.content_sid and not window_open:
        return Refused(
            "outside WhatsApp's 24-hour window (no inbound message in the last 24 hours): "
            "only a template (content_sid) may be sent",
            63016,
        )
    return None
