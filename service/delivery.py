"""Outbound messages through Twilio's REST API, with twilio-python's own ``Client``.

``send`` answers with one of three outcomes: ``Accepted`` (Twilio's SID and status),
``RetryLater`` (429, 5xx, a timeout or a lost connection: try again after ``backoff``) or
``Permanent`` (Twilio's error code and message: 21211 invalid number, 21610 opted out, 21608
unverified number on a trial account, …). A message Twilio accepted can still fail later:
its status callbacks (or a fetch) say so, and ``failure`` reads them (63016, outside
WhatsApp's 24 h window, arrives that way).

``TWILIO_API_BASE_URL`` points the client at the stand-in (service/twilio_standin.py). The
library is used unmodified: its documented extension point, a custom ``HttpClient`` handed to
``Client(http_client=…)`` (Twilio's "Custom HTTP clients" guide, and the maintainers' answer
to twilio/twilio-python#521), wraps twilio's own ``TwilioHttpClient`` and swaps Twilio's
origin for the base URL on every request, list pages' ``next_page_uri`` included. Setting
``client.api.base_url`` would also work, but it is an attribute of a generated class that no
document promises, and it would cover one domain only.

When a create's answer is lost (``RetryLater.maybe_accepted``) Twilio may hold the message
anyway: ``find_sent`` looks it up before a resend. What it cannot settle is in its docstring.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from twilio.base import values
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import NewConnectionError

from . import accounts
from .settings import ConfigError

# twilio's HTTP client logs every request's URL, query and headers at INFO: only its
# warnings reach the service's log.
HTTP_LOG = logging.getLogger(__name__ + ".http")
HTTP_LOG.setLevel(logging.WARNING)

# How much Twilio's clock may differ from ours when ``find_sent`` compares date_created.
CLOCK_SKEW = timedelta(seconds=60)
# Most messages ``find_sent`` reads before it gives up (Twilio lists the newest first).
LOOKUP_LIMIT = 200
TWILIO_API = "https://api.twilio.com"  # the host twilio's client calls for messages


@dataclass(frozen=True)
class Accepted:
    """Twilio holds the message: its SID and status (``queued``, ``accepted``, …)."""

    sid: str
    status: str


@dataclass(frozen=True)
class RetryLater:
    """Twilio did not take the message now. ``maybe_accepted``: the request may have reached
    Twilio and been stored (a lost answer, a read timeout, a 5xx), so look it up
    (``find_sent``) before sending again."""

    reason: str
    code: int | None = None
    maybe_accepted: bool = False


@dataclass(frozen=True)
class Permanent:
    """Twilio refused the message for good: sending it again would fail again."""

    code: int | None
    message: str


Outcome = Accepted | RetryLater | Permanent


def backoff(attempt: int, jitter: float, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first): ``base`` doubled at
    each attempt up to ``cap``, of which the upper half is drawn by ``jitter`` in [0, 1)
    ("equal jitter": retries of many messages spread out, none comes back at once)."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 64))
    return ceiling / 2 + ceiling / 2 * jitter


def classify(status: int, code: int | None, message: str) -> RetryLater | Permanent:
    """An error answer of Twilio's REST API as an outcome.

    429 and 5xx are retried (a 5xx may have stored the message). A refused credential (401,
    20003) is retried too: it is the operator's to fix, and the messages must wait for it, not
    be dropped. Any other 4xx is Twilio's final word on that message.
    """
    if status == 429:
        return RetryLater(f"HTTP {status}", code)
    if status >= 500:
        return RetryLater(f"HTTP {status}", code, maybe_accepted=True)
    if status in (401, 403):
        return RetryLater("credentials refused", code)
    return Permanent(code, message)


def failure(status: str, error_code: str | int | None, error_message: str | None = None) -> Permanent | None:
    """A status callback's ``MessageStatus`` and ``ErrorCode`` (or a fetched message's
    ``status`` and ``error_code``) as a failure, or None while the message is on its way or
    delivered."""
    if status not in ("failed", "undelivered"):
        return None
    code = int(error_code) if error_code not in (None, "") else None
    return Permanent(code, error_message or status)


def callback_url(base: str, marker: str) -> str:
    """``base`` (the StatusCallback URL) with ``m=marker`` in its query string: each callback
    then names the outbound message it is about, even when its create's answer was lost."""
    parts = urlsplit(base)
    query = (parts.query + "&" if parts.query else "") + urlencode({"m": marker})
    return urlunsplit(parts._replace(query=query))


class RedirectedHttpClient(TwilioHttpClient):
    """twilio's HTTP client, calling ``base_url`` wherever the library calls a Twilio host."""

    def __init__(self, base_url: str, timeout: float):
        super().__init__(timeout=timeout, logger=HTTP_LOG)
        self.base_url = urlsplit(base_url)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any):
        parts = urlsplit(url)
        if parts.hostname and (parts.hostname == "twilio.com" or parts.hostname.endswith(".twilio.com")):
            prefix = self.base_url.path.rstrip("/")
            url = urlunsplit(
                parts._replace(
                    scheme=self.base_url.scheme, netloc=self.base_url.netloc, path=prefix + parts.path
                )
            )
        return super().request(method, url, *args, **kwargs)


def client(config: Mapping[str, Any]) -> Client:
    """twilio's ``Client`` for the one account the settings name (API key and secret when set,
    else the account SID and that account's primary auth token, as ``accounts`` reads it for
    signatures too), at ``TWILIO_API_BASE_URL`` when set.

    Raises ``ConfigError`` when the settings name no account to send from.
    """
    account_sid = config["TWILIO_ACCOUNT_SID"]
    if not account_sid:
        raise ConfigError("TWILIO_ACCOUNT_SID is not set: outbound messages need the account that sends them")
    token = accounts.Accounts.from_config(config).auth_token(account_sid)
    if config["TWILIO_API_KEY"]:
        username, password = config["TWILIO_API_KEY"], config["TWILIO_API_SECRET"]
    elif token:
        username, password = account_sid, token
    else:
        raise ConfigError(
            "no auth token for TWILIO_ACCOUNT_SID: outbound messages need TWILIO_AUTH_TOKEN (its "
            "primary), the account in TWILIO_ACCOUNTS, or TWILIO_API_KEY and TWILIO_API_SECRET"
        )
    timeout = config["TWILIO_API_TIMEOUT"]
    base_url = config["TWILIO_API_BASE_URL"]
    http = (
        RedirectedHttpClient(base_url, timeout)
        if base_url
        else TwilioHttpClient(timeout=timeout, logger=HTTP_LOG)
    )
    keep_connections(http, config["SENDER_THREADS"])
    read_environment_once(http, base_url or TWILIO_API)
    return Client(username, password, account_sid=account_sid, http_client=http)


def keep_connections(http: TwilioHttpClient, connections: int) -> None:
    """Keeps ``connections`` connections alive to each host (requests' ``HTTPAdapter``, mounted
    for both schemes on the client's one session): one for each of the sender's threads.
    twilio's default pool keeps ``os.cpu_count() + 4`` for HTTPS, requests' 10 for HTTP; a
    sender with more threads than that would open, and close, a connection (a TLS handshake
    with Twilio) for every message past them."""
    if http.session is None:
        return
    for scheme in ("https://", "http://"):
        http.session.mount(scheme, HTTPAdapter(pool_maxsize=max(connections, 1)))


def read_environment_once(http: TwilioHttpClient, url: str) -> None:
    """Takes the environment's settings for ``url`` (``HTTPS_PROXY``, ``NO_PROXY``,
    ``REQUESTS_CA_BUNDLE``, …) onto the client's session once, where requests would read them
    again for every request, scanning the whole environment twice each time."""
    session = http.session
    if session is None:
        return
    found = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(found["proxies"])
    session.verify = found["verify"]
    session.trust_env = False


def _network_outcome(error: requests.RequestException) -> RetryLater:
    """A request that got no answer: it may have reached Twilio unless it never connected."""
    never_connected = isinstance(error, requests.ConnectTimeout) or isinstance(
        getattr(error.args[0] if error.args else None, "reason", None), NewConnectionError
    )
    return RetryLater(type(error).__name__, maybe_accepted=not never_connected)


def _twilio_outcome(error: TwilioException) -> RetryLater | Permanent:
    if isinstance(error, TwilioRestException):
        # twilio prefixes Twilio's message with what it was doing ("Unable to create record: ").
        message = error.msg.split(": ", 1)[1] if ": " in error.msg else error.msg
        return classify(error.status, error.code, message)
    if isinstance(error, TwilioServiceException):
        return classify(error.status, error.code, error.detail or error.title)
    return RetryLater(str(error.args[0]) if error.args else type(error).__name__)


class Delivery:
    """Sends outbound messages from one account (``from_config``), classifying each answer."""

    def __init__(
        self,
        twilio: Client,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
    ):
        self.twilio = twilio
        self.from_number = from_number
        self.messaging_service_sid = messaging_service_sid
        self.retry_base = retry_base
        self.retry_max = retry_max

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Delivery:
        return cls(
            client(config),
            config["TWILIO_FROM_NUMBER"],
            config["TWILIO_MESSAGING_SERVICE_SID"],
            config["DELIVERY_RETRY_BASE"],
            config["DELIVERY_RETRY_MAX"],
        )

    def retry_delay(self, attempt: int, jitter: float | None = None) -> float:
        """``backoff`` with the settings' base and cap (``jitter`` drawn when not given)."""
        return backoff(
            attempt, random.random() if jitter is None else jitter, self.retry_base, self.retry_max
        )

    def send(
        self,
        to: str,
        body: str | None = None,
        *,
        from_: str | None = None,
        media_urls: Sequence[str] = (),
        status_callback: str | None = None,
        content_sid: str | None = None,
        content_variables: str | None = None,
    ) -> Outcome:
        """Creates the message (From: ``from_``, else ``TWILIO_FROM_NUMBER``; through
        ``TWILIO_MESSAGING_SERVICE_SID`` when set) and classifies Twilio's answer."""
        arguments: dict[str, Any] = {"to": to}
        for name, value in (
            ("from_", from_ or self.from_number),
            ("messaging_service_sid", self.messaging_service_sid),
            ("body", body),
            ("media_url", list(media_urls) or None),
            ("status_callback", status_callback),
            ("content_sid", content_sid),
            ("content_variables", content_variables),
        ):
            if value is not None:
                arguments[name] = value
        try:
            message = self.twilio.messages.create(**arguments)
        except TwilioException as error:
            return _twilio_outcome(error)
        except requests.RequestException as error:
            return _network_outcome(error)
        return Accepted(message.sid, message.status)

    def find_sent(
        self,
        to: str,
        body: str,
        since: datetime,
        *,
        from_: str | None = None,
        exclude: Iterable[str] = (),
    ) -> Accepted | RetryLater | None:
        """The message to ``to`` with this ``body`` Twilio created since ``since`` (the moment
        before the first attempt), if any, for a create whose answer was lost; ``exclude``:
        SIDs already known to be other messages. ``RetryLater`` when the lookup itself failed.

        Lists the account's messages to ``to`` (and from ``from_`` or ``TWILIO_FROM_NUMBER``,
        unless a Messaging Service picks the sender), sent on or after ``since``'s day, newest
        first, and compares body and ``date_created`` (less ``CLOCK_SKEW``) itself. What that
        cannot settle (the same body twice in the window, a message not listed yet, an
        altered body, more than ``LOOKUP_LIMIT`` newer messages) is in docs/outbound.md,
        "A lost answer"; the StatusCallback marker (``callback_url``) closes most of it.
        """
        known = set(exclude)
        earliest = since.astimezone(UTC) - CLOCK_SKEW
        sender = None if self.messaging_service_sid else (from_ or self.from_number)
        try:
            for message in self.twilio.messages.stream(
                to=to,
                from_=sender or values.unset,
                date_sent_after=earliest.date(),
                limit=LOOKUP_LIMIT,
                page_size=50,
            ):
                created = message.date_created
                if created is not None and created < earliest:
                    continue
                if message.body == body and message.sid not in known:
                    return Accepted(message.sid, message.status)
        except TwilioException as error:
            outcome = _twilio_outcome(error)
            return outcome if isinstance(outcome, RetryLater) else RetryLater(outcome.message, outcome.code)
        except requests.RequestException as error:
            return _network_outcome(error)
        return None
