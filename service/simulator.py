"""A Twilio stand-in for developers and tests: it talks to the webhook the way Twilio does.

Each message is a form POST with Twilio's parameters, signed with the auth token
(``X-Twilio-Signature`` computed by twilio's own ``RequestValidator``). Like Twilio it keeps
one cookie per (From, To) pair and forgets it four hours after it was set. It talks over HTTP
to a running service, or in-process to an app (``TwilioSimulator.for_app``): a handler can be
tried, or tested, without a server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import requests
from twilio.request_validator import RequestValidator

from . import accounts
from .wiring import current

if TYPE_CHECKING:
    from flask import Flask

    from .handler import EndHook, Handler

COOKIE_LIFETIME = 4 * 3600


def new_message_sid() -> str:
    return "SM" + secrets.token_hex(16)


@dataclass
class Reply:
    """One ``<Message>`` of a TwiML answer: its text and its media URLs."""

    text: str
    media: list[str] = field(default_factory=list)


@dataclass
class Delivery:
    """One webhook call: what was sent and what came back (``reply``: the first message's
    text, ``replies``: every message)."""

    message_sid: str
    status: int
    body: str
    reply: str | None
    cookie_sent: str | None
    replies: list[Reply] = field(default_factory=list)


def replies(twiml: str) -> list[Reply]:
    """Every ``<Message>`` of a TwiML answer, in order (none if it is not TwiML)."""
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError:
        return []
    found = []
    for message in root.iter("Message"):
        body = message.find("Body")
        text = (body.text if body is not None else message.text) or ""
        found.append(Reply(text, [media.text or "" for media in message.iter("Media")]))
    return found


def reply_text(twiml: str) -> str | None:
    """The text of the first ``<Message>`` in a TwiML answer, or None."""
    found = replies(twiml)
    return found[0].text if found else None


class TwilioSimulator:
    def __init__(
        self,
        url: str,
        auth_token: str | None,
        *,
        cookie_name: str = "sms_session",
        clock: Callable[[], float] = time.time,
        timeout: float = 20.0,
        app: Flask | None = None,
        account_sid: str | None = None,
    ):
        self.url = url
        self.app = app
        self.app_client = app.test_client(use_cookies=False) if app is not None else None
        # Signed like Twilio, with the primary of TWILIO_AUTH_TOKEN's tokens.
        self.validator = RequestValidator(accounts.tokens(auth_token)[0]) if auth_token else None
        self.cookie_name = cookie_name
        self.clock = clock
        self.timeout = timeout
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.cookies: dict[tuple[str, str], tuple[str, float]] = {}
        self.http = requests.Session()
        # Twilio's jar is per pair (self.cookies), never requests' per-host jar.
        self.http.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    def params(
        self, sender: str, recipient: str, body: str, media: list[str], message_sid: str
    ) -> dict[str, str]:
        params = {
            "ToCountry": "US",
            "ToState": "CA",
            "SmsMessageSid": message_sid,
            "NumMedia": str(len(media)),
            "ToCity": "",
            "FromZip": "",
            "SmsSid": message_sid,
            "FromState": "CA",
            "SmsStatus": "received",
            "FromCity": "",
            "Body": body,
            "FromCountry": "US",
            "To": recipient,
            "ToZip": "",
            "NumSegments": "1",
            "MessageSid": message_sid,
            "AccountSid": self.account_sid,
            "From": sender,
            "ApiVersion": "2010-04-01",
        }
        for index, url in enumerate(media):
            params[f"MediaUrl{index}"] = url
            params[f"MediaContentType{index}"] = "image/jpeg"
        return params

    def cookie_for(self, sender: str, recipient: str) -> str | None:
        stored = self.cookies.get((sender, recipient))
        if stored is None:
            return None
        value, stored_at = stored
        if self.clock() - stored_at >= COOKIE_LIFETIME:
            del self.cookies[(sender, recipient)]
            return None
        return value

    def send(
        self,
        sender: str,
        recipient: str,
        body: str = "",
        *,
        media: list[str] | None = None,
        message_sid: str | None = None,
        cookie: str | None = None,
    ) -> Delivery:
        """Delivers one message; ``message_sid`` repeats an earlier one (a redelivery).

        ``cookie`` overrides the jar for this call (tests of stale or forged cookies).
        """
        message_sid = message_sid or new_message_sid()
        params = self.params(sender, recipient, body, media or [], message_sid)
        headers = {}
        if self.validator is not None:
            headers["X-Twilio-Signature"] = self.validator.compute_signature(self.url, params)
        sent = cookie if cookie is not None else self.cookie_for(sender, recipient)
        if sent:
            headers["Cookie"] = f"{self.cookie_name}={sent}"
        status, text, value = self._post(params, headers)
        if value:
            self.cookies[(sender, recipient)] = (value, self.clock())
        messages = replies(text) if status == 200 else []
        return Delivery(message_sid, status, text, messages[0].text if messages else None, sent, messages)

    @classmethod
    def for_app(cls, app: Flask, url: str = "http://localhost/sms") -> TwilioSimulator:
        """Talks to ``app`` in-process (Flask's test client), as its first account: signing
        with that account's primary auth token, sending its AccountSid (when it has one)."""
        account = next(iter(current(app).accounts), None)
        if account is None:
            return cls(url, None, app=app)
        return cls(url, account.auth_token, app=app, account_sid=account.sid)

    @classmethod
    def for_handler(cls, handler: Handler, on_end: EndHook | None = None, **settings: Any) -> TwilioSimulator:
        """Talks in-process to the service running ``handler`` (and ``on_end``) on an embedded
        store of its own (each call a new, empty one), or on ``REDIS_URL=…`` if given: a bot's
        tests need no server. ``settings`` override single settings (``CONVERSATION_TTL=60``);
        ``.app`` is the app (for ``Sweeper(twilio.app).sweep()``, ``app.test_client()``)."""
        from . import create_app

        config = {"TWILIO_AUTH_TOKEN": "simulated", "REDIS_URL": None, **settings}
        return cls.for_app(create_app(config, handler=handler, on_end=on_end))

    def _post(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, str, str | None]:
        """Status, body and the cookie set, over HTTP or through the app's test client."""
        if self.app_client is None:
            response = self.http.post(self.url, data=params, headers=headers, timeout=self.timeout)
            return response.status_code, response.text, response.cookies.get(self.cookie_name)
        answer = self.app_client.post(self.url, data=params, headers=headers)
        cookie = next(
            (
                c.split(";", 1)[0].partition("=")[2]
                for c in answer.headers.getlist("Set-Cookie")
                if c.startswith(self.cookie_name + "=")
            ),
            None,
        )
        return answer.status_code, answer.get_data(as_text=True), cookie


class Phone:
    """The simulated phone's inbox at the Twilio stand-in (``GET /_standin/messages``): the
    messages the service sent ``number`` from ``ours`` through Twilio's REST API, each once,
    as the stand-in delivers them. Those delivered before it was made are not news."""

    def __init__(self, standin: str, number: str, ours: str, session: requests.Session | None = None):
        self.url = standin.rstrip("/") + "/_standin/messages"
        self.number, self.ours = number, ours
        self.session = session or requests.Session()
        self.seen: set[str] = {message["sid"] for message in self._delivered()}

    def _delivered(self) -> list[dict[str, Any]]:
        response = self.session.get(self.url, params={"to": self.number}, timeout=5)
        response.raise_for_status()
        return [message for message in response.json() if message["from"] == self.ours]

    def news(self) -> list[Reply]:
        """Messages delivered since the last call, oldest first."""
        fresh = [message for message in self._delivered() if message["sid"] not in self.seen]
        self.seen.update(message["sid"] for message in fresh)
        return [Reply(message["body"] or "", list(message["media_urls"])) for message in fresh]
