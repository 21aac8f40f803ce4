"""``/sms``: Twilio's inbound-message webhook.

Order matters: everything that can refuse a request (size, encoding, signature, fields) runs
before the conversation is bound, so a bad or forged request costs no Redis round trip.

Every webhook request ends in one log line and its metrics (outcome, latency), written
by its WSGI layer (``Webhook``) once the response is final, whatever answered it (the view,
an error handler: a Redis failure or a lost lock while saving is a 503, or the layer itself).
"""

from __future__ import annotations

import logging
import re
import time
from typing import cast
from urllib.parse import parse_qsl, unquote_to_bytes
from xml.etree import ElementTree

from flask import Blueprint, Flask, Response, session
from flask.globals import app_ctx, request_ctx
from werkzeug.exceptions import MethodNotAllowed, RequestURITooLarge

from . import handler, logs
from .handler import Message
from .masking import mask
from .metrics import Metrics, Outcome
from .responses import NO_REPLY, http_error, memo, problem, recall, render, twiml
from .runs import Run, RunOutcome
from .serving import SLOTS_KEY
from .sessions import ConversationSession
from .wiring import current

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)

MAX_FIELD = 64
MAX_REPLY_BYTES = 64_000  # Twilio's largest webhook answer (64 kB: its error 11750)
# Characters XML 1.0 excludes (control characters but tab, LF and CR; U+FFFE, U+FFFF) and lone
# surrogates, which UTF-8 cannot encode.
NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
PATH = "/sms"
METHODS = ["GET", "POST"]  # Twilio calls a webhook with the one configured: no other runs it
FORM = "application/x-www-form-urlencoded"  # how Twilio posts


def _decodable(raw: bytes) -> bool:
    """True when ``raw`` is form/query data whose every name and value is valid UTF-8.

    One pass over the whole percent-decoded input instead of parsing it into fields: the
    separators ``&`` and ``=`` are ASCII, so the whole is valid UTF-8 exactly when every name
    and value is.
    """
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _parsed(raw: bytes) -> list[tuple[str, str]] | None:
    """``name=value&…`` as (name, value) pairs, or None unless every one is valid UTF-8.

    What the stdlib's ``parse_qsl`` (the parser werkzeug's form and args use) reads, strict
    about UTF-8. Twilio's bodies (ASCII, percent-encoded, no ``&`` or ``=`` encoded, so that
    decoding cannot move a separator) are percent-decoded in one pass and split after:
    ``parse_qsl`` decodes each name and value in Python calls of their own. Anything else goes
    to ``parse_qsl``.
    """
    if not raw.isascii() or b"%26" in raw or b"%3D" in raw or b"%3d" in raw:
        try:
            return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return None
    try:
        text = unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields = []
    for item in text.split("&"):
        if item:
            name, _, value = item.partition("=")
            fields.append((name, value))
    return fields


def _fields(req) -> list[tuple[str, str]] | None:
    """The message's fields in arrival order (a query string's for a GET), or None when one is
    not valid UTF-8. A body that is not Twilio's urlencoded form goes through werkzeug."""
    query = req.query_string
    if req.method != "POST":
        return _parsed(query)
    if query and not _decodable(query):  # the signed URL carries it
        return None
    body = req.get_data(cache=True)  # read at once (BoundedRequest.stream)
    if req.mimetype == FORM:
        return _parsed(body)
    return list(req.form.items(multi=True)) if _decodable(body) else None


def _problem(sender: str, recipient: str, message_sid: str) -> str | None:
    """What is wrong with the first of From, To and MessageSid that is missing or malformed.
    The three are checked at once, one pass over them joined (a property of each character),
    and alone only to name the one at fault, rather than three calls of four checks each on
    every message."""
    if 0 < len(sender) <= MAX_FIELD and 0 < len(recipient) <= MAX_FIELD and 0 < len(message_sid) <= MAX_FIELD:
        joined = sender + recipient + message_sid
        if "|" not in joined and " " not in joined and joined.isprintable():
            return None
    for name, value in (("From", sender), ("To", recipient), ("MessageSid", message_sid)):
        reason = _field_problem(name, value)
        if reason:
            return reason
    return None


def _field_problem(name: str, value: str) -> str | None:
    if not value:
        return f"missing {name}"
    if len(value) > MAX_FIELD or "|" in value or not value.isprintable() or " " in value:
        return f"malformed {name}"
    return None


def _refuse(status: int, reason: str) -> Response:
    logs.annotate(reason=reason)
    return problem(status, reason[0].upper() + reason[1:] + ".")


class Webhook:
    """The webhook's WSGI layer, around Flask: every request to ``/sms``, whatever its method
    (routed to the view, refused here, or answered by an error handler), gets its one summary
    line and its metrics once the response is final. One wrapper instead of a
    ``before_request`` hook and a ``request_finished`` signal, whose dispatch every message
    would pay.

    Methods other than GET and POST are refused here, before routing would answer OPTIONS
    itself or run the handler for a HEAD (a message counted that nobody reads the reply of).
    A query string is the GET form of a body, so it gets the same bound.
    """

    def __init__(self, app: Flask, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict, start_response):
        path = environ.get("PATH_INFO") or ""
        if path != PATH and path.lstrip("/") != PATH[1:]:  # what werkzeug's request.path would be
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        fields = {"method": method, "remote": environ.get("REMOTE_ADDR")}  # ProxyFix ran outside
        token = logs.open_summary(fields)
        statuses: list[str] = []
        wired = current(self.app)
        wired.webhook_load.enter()  # the process' sender yields while it counts any

        def start(status: str, headers, exc_info=None):
            statuses.append(status)
            return start_response(status, headers, exc_info)

        try:
            if method not in METHODS:
                logs.annotate(reason="method not allowed")
                return http_error(MethodNotAllowed(valid_methods=METHODS))(environ, start)
            if len(environ.get("QUERY_STRING", "")) > self.app.config["MAX_BODY_BYTES"]:
                logs.annotate(reason="query string over MAX_BODY_BYTES")
                return http_error(RequestURITooLarge())(environ, start)
            return self.wsgi_app(environ, start)
        finally:  # an exception Flask let through (testing, a bug of its own) is a 500
            wired.webhook_load.leave()
            logs.close_summary(token)
            _finished(wired.metrics, int(statuses[-1][:3]) if statuses else 500, fields, started)


@bp.route(PATH, methods=METHODS)
def sms():
    """A message's whole life: refuse → bind (round trip 1) → handler → save (round trip 2);
    a handler past ``HANDLER_INLINE_BUDGET`` is left to finish and save on its own."""
    req, app = request_ctx.request, app_ctx.app  # once each: each use of a proxy costs a lookup
    fields = _fields(req)
    if fields is None:
        return _refuse(400, "request is not valid UTF-8 form data")
    params = dict(fields)  # in C; with a repeated field, the first one, as werkzeug's MultiDict.get:
    if len(params) != len(fields):
        params = {}
        for name, value in fields:
            params.setdefault(name, value)
    sender, recipient = params.get("From", ""), params.get("To", "")
    message_sid = params.get("MessageSid", "")
    logs.annotate(message_sid=message_sid[:MAX_FIELD], **{"from": mask(sender), "to": mask(recipient)})
    wired = current(app)
    signed = fields if req.method == "POST" else ()  # a GET's fields are in its signed URL
    refused = wired.signature.refusal(req, signed, params.get("AccountSid"))
    if refused:
        return _refuse(403, refused)
    reason = _problem(sender, recipient, message_sid)
    if reason:
        return _refuse(400, reason)
    message = Message.from_params(params, wired.callers.name(sender))

    conversation = cast(ConversationSession, session).bind(message)  # sessions.py's session
    if conversation.queued:  # among the inbound messages: a handler's run takes it in turn
        logs.annotate(outcome=Outcome.QUEUED)
        return twiml(NO_REPLY)
    if conversation.answered is not None:  # a redelivery: its first answer, no handler
        logs.annotate(outcome=Outcome.DUPLICATE)  # Webhook's, for the line and the metric
        return twiml(recall(conversation.answered))
    run = None
    # An opt-out ends the conversation unanswered, and a conversation an operator holds is
    # recorded unanswered: no handler for either.
    if message.opt_out != "STOP" and not conversation.paused:
        run = wired.runs.start(message, conversation)
        if not _finished_within(run, wired.runs.budget, req.environ):  # its reply goes out later
            try:
                deferred = run.defer()  # durable, with what it sent so far, before Twilio hears anything
            except BaseException:
                wired.runs.done(run)  # abandoned: nothing of it is saved
                raise
            if deferred:
                logs.annotate(outcome=Outcome.DEFERRED)
                return twiml(NO_REPLY)
        wired.runs.done(run)
    try:
        reply = _reply(message, conversation, run)
        answer = _sendable(reply)
        state = conversation.encoded()
    except Exception as error:  # the developer's code: its failure is a 500, nothing saved
        conversation.release()
        where, frames = handler.failure(error)
        logs.annotate(reason=f"the handler failed: {where}", error=frames)
        return problem(500, "The conversation handler failed.")
    conversation.save(memo(reply), state)
    return twiml(answer)


def _sendable(reply: handler.Reply) -> str:
    """The TwiML of ``reply`` if Twilio can take it: well-formed XML in UTF-8 (a lone
    surrogate would fail in the Redis client once the save had begun), at most Twilio's 64 kB.
    Else ``Unkeepable``: the handler's failure."""
    answer = render(reply)
    is_ascii = answer.isascii()
    size = len(answer) if is_ascii else len(answer.encode("utf-8", "surrogatepass"))
    if size > MAX_REPLY_BYTES:
        raise handler.Unkeepable(f"its reply is {size} bytes of TwiML, over Twilio's {MAX_REPLY_BYTES}")
    # Printable ASCII holds none of NOT_IN_XML's characters: one C pass instead of the pattern's.
    unsendable = None if is_ascii and answer.isprintable() else NOT_IN_XML.search(answer)
    if unsendable:
        raise handler.Unkeepable(
            f"its reply holds U+{ord(unsendable.group()):04X}, which TwiML (XML 1.0 in UTF-8) cannot carry"
        )
    if reply is not None and not isinstance(reply, str):  # ElementTree writes a lone surrogate as &#…;
        try:
            ElementTree.fromstring(answer)
        except ElementTree.ParseError:
            raise handler.Unkeepable("its reply is not well-formed XML") from None
    return answer


# How long a webhook keeps its place among the app's slots while its handler runs: a handler
# running is CPU at work, one still running after this is most likely waiting on I/O.
HOLD_SLOT = 0.01


def _finished_within(run: Run, budget: float, environ: dict) -> bool:
    """Whether the handler finished within ``budget``. Past ``HOLD_SLOT`` the request gives up
    its place among the worker's app slots (``serving.BodyFirst``) until it is done waiting,
    so that requests waiting for slow handlers do not keep others from running."""
    slots = environ.get(SLOTS_KEY)
    if slots is None:  # no slots to give up (gevent, sync): one wait
        return run.wait(budget)
    if run.wait(min(budget, HOLD_SLOT)):
        return True
    if budget <= HOLD_SLOT:
        return False
    slots.release()
    try:
        return run.wait(budget - HOLD_SLOT)
    finally:
        slots.acquire()


def _reply(message: Message, conversation, run: Run | None):
    """The handler's reply (its exception raised here), except to an opt-out: that ends the
    conversation unanswered (Twilio confirms the opt-out itself and would refuse any reply);
    and none while an operator holds the conversation (human handoff)."""
    if message.opt_out == "STOP":
        conversation.end_reason = "opt-out"
        return None
    if run is None:  # an operator holds it: recorded, not answered by the bot
        logs.annotate(handoff="held by an operator")
        return None
    kind, value = run.outcome or (RunOutcome.ERROR, RuntimeError("the run has no outcome"))
    if kind == RunOutcome.ERROR:
        raise value
    return value


def outcome(status: int, told: Outcome | None) -> Outcome:
    """How the request ended, by its status (and what the view ``told`` for a 200)."""
    if status == 200:
        return told or Outcome.REPLIED
    if status == 403:
        return Outcome.REJECTED_SIGNATURE
    if status == 503:
        return Outcome.UNAVAILABLE
    if 400 <= status < 500:
        return Outcome.BAD_REQUEST
    return Outcome.ERROR


def _finished(metrics: Metrics, status: int, fields: dict, started: float) -> None:
    """The request's metrics and its one log line, once the response is final."""
    seconds = time.perf_counter() - started
    result = outcome(status, fields.pop("outcome", None))
    metrics.by_outcome[result].inc()
    metrics.latency.observe(seconds)
    level = logging.ERROR if result is Outcome.ERROR else logging.INFO
    fields["outcome"], fields["status"], fields["latency_ms"] = result, status, round(seconds * 1000, 2)
    logs.write(log, level, "webhook " + result.value, fields)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    # Flask's documented way to wrap its WSGI app (mypy sees a method being replaced).
    app.wsgi_app = Webhook(app, app.wsgi_app)  # type: ignore[method-assign]
