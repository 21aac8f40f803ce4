"""A local stand-in for Twilio's Messages API, for development and tests (Twilio is not
reachable from them): ``python -m service.twilio_standin --port 8765``.

It answers twilio-python 9's calls (``twilio.rest.Client`` pointed at it by
``service.delivery``) with Twilio's shapes: create, fetch and list messages under
``/2010-04-01/Accounts/{AccountSid}/``, basic auth by auth token or API key, Twilio's error
bodies and codes. A background thread moves each message through its statuses and posts them
to its StatusCallback, signed as Twilio signs them. Faults a test asks for (Twilio's magic
numbers, rules posted to ``/_standin/faults``) are deterministic; ``/_standin/messages`` is
the inbox of each simulated phone. docs/outbound.md describes all of it.

The control endpoints have no authentication: the stand-in listens on 127.0.0.1 unless told
otherwise. ``python -m service.twilio_standin`` serves on werkzeug's threaded server; gunicorn
serves ``create_standin(...)`` too (``make bench`` does, for connections kept alive).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import queue
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import requests
from flask import Flask, Response, jsonify, request
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from . import logs
from .masking import mask

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
MORE_INFO = "https://www.twilio.com/docs/errors/{code}"
# Twilio's errors at create: code → (HTTP status, message; {to} is the destination).
REFUSALS: dict[int, tuple[int, str]] = {
    20429: (429, "Too Many Requests"),
    20500: (500, "An internal server error has occurred"),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' or 'MessagingServiceSid' parameter is required to send a message."),
    21608: (
        400,
        "The number {to} is unverified. Trial accounts cannot send messages to unverified "
        "numbers; verify {to} at twilio.com/user/account/phone-numbers/verified, or purchase a "
        "Twilio number to send messages to unverified numbers.",
    ),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21614: (400, "'To' number is not a valid mobile number"),
    21617: (400, "The concatenated message body exceeds the 1600 character limit."),
    21656: (400, "The ContentVariables Parameter is invalid."),
}
PERMANENT_REFUSALS = (21211, 21602, 21608, 21610, 21614, 21617)
# Twilio's errors after a message was accepted: code → (final status, error message).
DELIVERY_FAILURES: dict[int, tuple[str, str]] = {
    30003: ("undelivered", "Unreachable destination handset"),
    30005: ("undelivered", "Unknown destination handset"),
    30006: ("undelivered", "Landline or unreachable carrier"),
    30007: ("undelivered", "Message filtered"),
    30008: ("failed", "Unknown error"),
    63016: (
        "failed",
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template.",
    ),
}
# Twilio's magic To numbers for test credentials, and the error each gets.
MAGIC_NUMBERS = {"+15005550001": 21211, "+15005550004": 21610}
# E.164 (at least 7 digits), optionally behind a channel prefix (``whatsapp:+1…``).
NUMBER = re.compile(r"^(?:[a-z]+:)?\+[1-9]\d{6,14}$")
MAX_BODY = 1600
# The account ``python -m service.twilio_standin`` serves unless told another.
DEV_ACCOUNT_SID = "AC" + "0" * 32
PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000


def twilio_error(code: int, message: str, status: int, **extra: str) -> Response:
    """Twilio's error body for ``code`` with HTTP ``status`` (and ``extra`` fields)."""
    response = jsonify(
        {
            "code": code,
            "message": message,
            "more_info": MORE_INFO.format(code=code),
            "status": status,
            **extra,
        }
    )
    response.status_code = status
    return response


def refusal(code: int, to: str = "", status: int | None = None) -> Response:
    """Twilio's refusal ``code`` (with its usual HTTP status unless ``status`` is given)."""
    usual, message = REFUSALS[code]
    return twilio_error(code, message.format(to=to), status or usual)


def rfc2822(moment: datetime | None) -> str | None:
    """Twilio's timestamps: ``Mon, 07 Dec 2026 06:14:30 +0000``."""
    return format_datetime(moment) if moment else None


def segments(body: str) -> int:
    """SMS segments of ``body``: 160 (153 when split) characters in GSM's 7 bits, which this
    takes as printable ASCII, else 70 (67) in UCS-2."""
    if not body:
        return 1
    single, part = (160, 153) if all(" " <= c <= "~" or c in "\n\r" for c in body) else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // part)


@dataclass
class Fault:
    """A rule of ``POST /_standin/faults``: ``effect`` for the next ``count`` creates to ``to``."""

    effect: dict[str, Any]
    to: str | None = None
    count: int | None = None
    id: int = 0

    EFFECTS = ("answer", "error", "lose_answer", "delay", "fail", "window_closed", "callbacks")

    @classmethod
    def parse(cls, rule: Any, id: int) -> Fault:
        """The rule, or ``ValueError`` saying what is wrong with it."""
        if not isinstance(rule, dict):
            raise ValueError("a fault is a JSON object")
        unknown = set(rule) - {"to", "count", *cls.EFFECTS}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        effects = {name: rule[name] for name in cls.EFFECTS if name in rule}
        if len(effects) != 1:
            raise ValueError("a fault has exactly one of " + ", ".join(cls.EFFECTS))
        [(name, value)] = effects.items()
        valid = {
            "answer": value in (429, 500, 503),
            "error": value in PERMANENT_REFUSALS,
            "lose_answer": value is True,
            "delay": isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 60,
            "fail": value in DELIVERY_FAILURES,
            "window_closed": value is True,
            "callbacks": value == "reversed",
        }[name]
        if not valid:
            raise ValueError(f"{name}={value!r} is not one the stand-in knows (see its docs)")
        to, count = rule.get("to"), rule.get("count")
        if to is not None and not isinstance(to, str):
            raise ValueError("to is a phone number")
        if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count > 0):
            raise ValueError("count is a positive whole number")
        return cls(effects, to, count, id)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "to": self.to, "count": self.count, **self.effect}


@dataclass
class Plan:
    """What the matching faults make of one create."""

    refused: Response | None = None
    lose_answer: bool = False
    delay: float = 0.0
    fail: int | None = None
    window_closed: bool = False
    reversed_callbacks: bool = False


@dataclass
class Message:
    resource: dict[str, Any]
    status_callback: str | None
    statuses: list[tuple[str, int | None]] = field(default_factory=list)  # each posted in turn
    media_urls: list[str] = field(default_factory=list)
    reversed_callbacks: bool = False


class Standin:
    """The stand-in's state: one account, its messages and fault rules, the callback thread."""

    def __init__(self, account_sid: str, auth_token: str, api_keys: dict[str, str] | None = None):
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys = dict(api_keys or {})
        self.validator = RequestValidator(auth_token)
        self.lock = threading.Lock()
        self.messages: dict[str, Message] = {}  # by SID, in creation order
        self.faults: list[Fault] = []
        self.next_fault = 1
        self.callbacks: queue.Queue[Message | None] = queue.Queue()  # None: stop
        self.session = requests.Session()  # the callback thread's
        threading.Thread(target=self._deliver_forever, name="standin-callbacks", daemon=True).start()

    # -- authentication ------------------------------------------------------------------

    def authenticated(self, account_sid: str) -> bool:
        """Whether the request's basic auth is this account's (token, or an API key's secret)
        and the path names this account."""
        auth = request.authorization
        if auth is None or auth.type != "basic" or account_sid != self.account_sid:
            return False
        secret = (
            self.auth_token if auth.username == self.account_sid else self.api_keys.get(auth.username or "")
        )
        return secret is not None and hmac.compare_digest((auth.password or "").encode(), secret.encode())

    # -- faults --------------------------------------------------------------------------

    def add_fault(self, rule: Any) -> Fault:
        with self.lock:
            fault = Fault.parse(rule, self.next_fault)
            self.next_fault += 1
            self.faults.append(fault)
            return fault

    def plan(self, to: str) -> Plan:
        """The faults this create to ``to`` meets, each used up once."""
        plan = Plan()
        if to in MAGIC_NUMBERS:
            plan.refused = refusal(MAGIC_NUMBERS[to], to)
            return plan
        with self.lock:
            for fault in list(self.faults):
                if fault.to is not None and fault.to != to:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                [(name, value)] = fault.effect.items()
                if name == "answer":
                    plan.refused = refusal(20429 if value == 429 else 20500, status=value)
                elif name == "error":
                    plan.refused = refusal(value, to)
                elif name == "lose_answer":
                    plan.lose_answer = True
                elif name == "delay":
                    plan.delay += value
                elif name == "fail":
                    plan.fail = value
                elif name == "window_closed":
                    plan.window_closed = True
                elif name == "callbacks":
                    plan.reversed_callbacks = True
                if plan.refused is not None:
                    break
        return plan

    # -- messages ------------------------------------------------------------------------

    def create(self, form: MultiDict) -> Response:
        to = form.get("To", "")
        sender, service = form.get("From"), form.get("MessagingServiceSid")
        body, media = form.get("Body", ""), form.getlist("MediaUrl")
        content_sid, variables = form.get("ContentSid"), form.get("ContentVariables")
        if not NUMBER.match(to):
            return refusal(21211, to)
        if not sender and not service:
            return refusal(21603)
        if content_sid and variables:
            try:
                if not isinstance(json.loads(variables), dict):
                    raise ValueError
            except ValueError:
                return refusal(21656)
        if not body and not media and not content_sid:
            return refusal(21602)
        if len(body) > MAX_BODY:
            return refusal(21617)
        plan = self.plan(to)
        if plan.refused is not None:
            return plan.refused
        if content_sid:  # no templates here: the body says which one, with its variables
            body = f"{content_sid} {variables or '{}'}"
        now = datetime.now(UTC)
        sid = ("MM" if media else "SM") + uuid.uuid4().hex
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        first = "accepted" if service and not sender else "queued"
        resource = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": rfc2822(now),
            "date_sent": None,
            "date_updated": rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": service,
            "num_media": str(len(media)),
            "num_segments": "0" if first == "accepted" else str(segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": first,
            "subresource_uris": {"media": uri + "/Media.json", "feedback": uri + "/Feedback.json"},
            "to": to,
            "uri": uri + ".json",
        }
        fail = plan.fail
        if plan.window_closed and to.startswith("whatsapp:") and not content_sid:
            fail = 63016
        statuses: list[tuple[str, int | None]] = [(first, None)]
        if first == "accepted":
            statuses.append(("queued", None))
        if fail is not None and DELIVERY_FAILURES[fail][0] == "failed":
            statuses.append(("failed", fail))
        else:
            statuses.append(("sent", None))
            statuses.append(("undelivered", fail) if fail is not None else ("delivered", None))
        message = Message(
            resource,
            form.get("StatusCallback") or None,
            statuses,
            media,
            plan.reversed_callbacks,
        )
        answer = dict(resource)  # as created: the callback thread moves the stored one on
        with self.lock:
            self.messages[sid] = message
        self.callbacks.put(message)
        log.info("created %s to %s (%s)", sid, mask(to), first)
        if plan.delay:
            time.sleep(plan.delay)
        if plan.lose_answer:
            self._drop_connection()
        response = jsonify(answer)
        response.status_code = 201
        return response

    def fetch(self, sid: str) -> Response:
        with self.lock:
            message = self.messages.get(sid)
            resource = dict(message.resource) if message else None
        if resource is None:
            return twilio_error(20404, f"The requested resource {request.path} was not found", 404)
        return jsonify(resource)

    def page(self, args: MultiDict) -> Response:
        """A page of the account's messages, newest first, in Twilio's list shape."""
        try:
            size = min(int(args.get("PageSize", PAGE_SIZE)), MAX_PAGE_SIZE)
            number = int(args.get("Page", 0))
            on = _day_or_moment(args["DateSent"][:10]) if args.get("DateSent") else None
            before, after = (_day_or_moment(args.get(name)) for name in ("DateSent<", "DateSent>"))
            if size < 1 or number < 0:
                raise ValueError
        except ValueError:
            return twilio_error(20001, "Invalid paging or DateSent parameter", 400)
        to, sender = args.get("To"), args.get("From")
        with self.lock:
            resources = [dict(m.resource) for m in self.messages.values()]
        chosen = []
        for resource in reversed(resources):
            moment = parsedate_to_datetime(resource["date_sent"] or resource["date_created"])
            if to and resource["to"] != to or sender and resource["from"] != sender:
                continue
            if on and not on[0] <= moment <= on[1]:
                continue
            if before and moment > before[1] or after and moment < after[0]:
                continue
            chosen.append(resource)
        start = number * size
        records = chosen[start : start + size]
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"
        filters = [
            (name, args[name])
            for name in ("To", "From", "DateSent", "DateSent<", "DateSent>")
            if name in args
        ]

        def page_uri(page: int) -> str:
            return base + "?" + urlencode([*filters, ("PageSize", size), ("Page", page)])

        has_next = start + size < len(chosen)
        return jsonify(
            {
                "end": start + max(len(records) - 1, 0),
                "first_page_uri": page_uri(0),
                "messages": records,
                "next_page_uri": (
                    page_uri(number + 1) + f"&PageToken=PASM{records[-1]['sid'][2:]}" if has_next else None
                ),
                "page": number,
                "page_size": size,
                "previous_page_uri": page_uri(number - 1) if number > 0 else None,
                "start": start,
                "uri": page_uri(number),
            }
        )

    def inbox(self, to: str | None) -> list[dict[str, Any]]:
        with self.lock:
            messages = list(self.messages.values())
        return [
            {
                "sid": m.resource["sid"],
                "from": m.resource["from"] or m.resource["messaging_service_sid"],
                "to": m.resource["to"],
                "body": m.resource["body"],
                "media_urls": m.media_urls,
                "status": m.resource["status"],
                "date_sent": m.resource["date_sent"],
            }
            for m in messages
            if to is None or (m.resource["to"] == to and m.resource["status"] == "delivered")
        ]

    def reset(self) -> None:
        with self.lock:
            self.messages.clear()
            self.faults.clear()

    @staticmethod
    def _drop_connection() -> None:
        """Closes this request's socket: the client gets no answer (the server then drops the
        response it cannot write, as it does when a client hangs up)."""
        environ = request.environ
        sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
        if sock is None:
            raise RuntimeError("lose_answer needs the request's socket (werkzeug's server or gunicorn)")
        sock.shutdown(socket.SHUT_RDWR)

    # -- statuses and their callbacks ----------------------------------------------------

    def close(self) -> None:
        """Stops the callback thread once the statuses already due are posted."""
        self.callbacks.put(None)

    def _deliver_forever(self) -> None:
        while (message := self.callbacks.get()) is not None:
            try:
                self._advance(message)
            except Exception:  # one message's trouble must not stop the others' callbacks
                log.exception("status callbacks of %s failed", message.resource["sid"])

    def _advance(self, message: Message) -> None:
        """Moves ``message`` through its statuses, posting each to its StatusCallback (all at
        once in reverse order when asked: the resource then already shows the final one)."""
        posts = []
        for status, error_code in message.statuses:
            with self.lock:
                resource = message.resource
                now = datetime.now(UTC)
                resource["status"] = status
                resource["date_updated"] = rfc2822(now)
                if status == "sent":
                    resource["date_sent"] = rfc2822(now)
                if error_code is not None:
                    resource["error_code"] = error_code
                    resource["error_message"] = DELIVERY_FAILURES[error_code][1]
                if message.status_callback:
                    posts.append(self._callback_form(resource, status, error_code))
            if posts and not message.reversed_callbacks:
                self._post(message, posts.pop())
        for form in reversed(posts):
            self._post(message, form)

    def _callback_form(self, resource: dict[str, Any], status: str, error_code: int | None) -> dict[str, str]:
        """Twilio's status callback parameters for an outbound message."""
        form = {
            "ApiVersion": API_VERSION,
            "AccountSid": self.account_sid,
            "MessageSid": resource["sid"],
            "SmsSid": resource["sid"],
            "MessageStatus": status,
            "SmsStatus": status,
            "To": resource["to"],
        }
        if resource["from"]:
            form["From"] = resource["from"]
        if resource["messaging_service_sid"]:
            form["MessagingServiceSid"] = resource["messaging_service_sid"]
        if error_code is not None:
            form["ErrorCode"] = str(error_code)
        return form

    def _post(self, message: Message, form: dict[str, str]) -> None:
        url = message.status_callback
        if not url:
            return
        signature = self.validator.compute_signature(url, form)
        try:
            self.session.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=15)
        except requests.RequestException as error:
            log.warning("status callback of %s not delivered: %s", form["MessageSid"], type(error).__name__)


def _day_or_moment(value: str | None) -> tuple[datetime, datetime] | None:
    """A DateSent filter's value as the span it names: a day (``YYYY-MM-DD``) or a moment
    (``YYYY-MM-DDTHH:MM:SSZ``, what twilio-python sends for a datetime, and for a date at
    its midnight). ``DateSent`` itself always names the day of its value."""
    if not value:
        return None
    if len(value) == 10:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        return day, day.replace(hour=23, minute=59, second=59, microsecond=999999)
    moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return moment, moment


def create_standin(
    account_sid: str,
    auth_token: str,
    api_keys: dict[str, str] | None = None,
    log_format: str | None = None,
) -> Flask:
    """The stand-in as a Flask app (its state in ``app.extensions["twilio_standin"]``):
    ``auth_token`` authenticates the account and signs its status callbacks, ``api_keys``
    maps API key SIDs (``SK…``) to their secrets; ``log_format`` (``json`` or ``text``), when
    given, installs the service's log lines (phone numbers masked, request lines without their
    query strings) on the process, as ``python -m`` does."""
    app = Flask(__name__, static_folder=None)
    if log_format:
        app.config["LOG_FORMAT"] = log_format
        logs.init_app(app)
    standin = Standin(account_sid, auth_token, api_keys)
    app.extensions["twilio_standin"] = standin
    messages = f"/{API_VERSION}/Accounts/<account_sid>/Messages"

    def authenticate(account_sid: str) -> Response | None:
        if standin.authenticated(account_sid):
            return None
        response = twilio_error(
            20003, "Authenticate", 401, detail="Your AccountSid or AuthToken was incorrect."
        )
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return response

    @app.route(messages + ".json", methods=["GET", "POST"])
    def message_list(account_sid: str):
        refused = authenticate(account_sid)
        if refused is not None:
            return refused
        if request.method == "POST":
            return standin.create(request.form)
        return standin.page(request.args)

    @app.get(messages + "/<sid>.json")
    def message(account_sid: str, sid: str):
        return authenticate(account_sid) or standin.fetch(sid)

    @app.route("/_standin/faults", methods=["GET", "POST", "DELETE"])
    def faults():
        if request.method == "POST":
            try:
                fault = standin.add_fault(request.get_json(force=True, silent=True))
            except ValueError as error:
                return jsonify({"error": str(error)}), 400
            return jsonify(fault.describe()), 201
        if request.method == "DELETE":
            with standin.lock:
                standin.faults.clear()
            return "", 204
        with standin.lock:
            return jsonify([fault.describe() for fault in standin.faults])

    @app.get("/_standin/messages")
    def inbox():
        return jsonify(standin.inbox(request.args.get("to")))

    @app.post("/_standin/reset")
    def reset():
        standin.reset()
        return "", 204

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        code = {404: 20404, 405: 20004}.get(error.code or 500, 20001)
        return twilio_error(code, error.description or error.name, error.code or 400)

    return app


def serve_in_background(host: str, port: int, auth_token: str, account_sid: str = DEV_ACCOUNT_SID) -> str:
    """The stand-in on ``host``:``port`` (0: a free one) in a daemon thread of this process
    (``sms-sessions run --twilio-standin``); its base URL. ``OSError`` when the port is taken."""
    server = make_server(host, port, create_standin(account_sid, auth_token), threaded=True)
    threading.Thread(target=server.serve_forever, name="twilio-standin", daemon=True).start()
    return f"http://{host}:{server.server_port}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.twilio_standin", description="A local stand-in for Twilio's Messages API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    parser.add_argument("--account-sid", default=DEV_ACCOUNT_SID, help="the account's SID (AC…)")
    parser.add_argument("--auth-token", default="dev-auth-token", help="the account's auth token")
    parser.add_argument(
        "--api-key", action="append", default=[], metavar="SK…:SECRET", help="an API key and its secret"
    )
    options = parser.parse_args(argv)
    if any(":" not in key for key in options.api_key):
        parser.error("--api-key is SK…:SECRET")
    keys = dict(key.split(":", 1) for key in options.api_key)
    app = create_standin(options.account_sid, options.auth_token, keys, log_format="text")
    server = make_server(options.host, options.port, app, threaded=True)
    print(
        f"Twilio stand-in on http://{options.host}:{server.server_port} for account "
        f"{options.account_sid}; point the service at it with "
        f"TWILIO_API_BASE_URL=http://{options.host}:{server.server_port}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
