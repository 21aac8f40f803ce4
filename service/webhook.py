"""``/sms``: Twilio's inbound-message webhook.

Order matters: everything that can refuse a request (size, encoding, signature, fields) runs
before the conversation is bound, so a bad or forged request costs no Redis round trip.

Every webhook request ends in one JSON log line and its metrics (outcome, latency), written
once Flask has finished the response, whatever answered it (the view, or an error handler:
a Redis failure or a lost lock while saving is a 503).
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import cast
from urllib.parse import parse_qsl, unquote_to_bytes

from flask import Blueprint, Flask, Response, current_app, g, request_finished
from flask.globals import app_ctx, request_ctx
from werkzeug.exceptions import MethodNotAllowed, RequestURITooLarge

from . import callers, handler, logs, signature
from .handler import Message
from .masking import mask
from .metrics import Outcome
from .metrics import current as current_metrics
from .responses import memo, problem, recall, render, twiml
from .sessions import ConversationSession

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)

MAX_FIELD = 64
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

    The stdlib's ``parse_qsl``, the parser werkzeug's form and args use, but strict about
    UTF-8: checking and parsing are one pass, where ``request.form`` after ``_decodable``
    went over the body twice (and through werkzeug's stream and form machinery).
    """
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return None


def _fields(req) -> list[tuple[str, str]] | None:
    """The message's fields in arrival order (a query string's for a GET), or None when one is
    not valid UTF-8. A body that is not Twilio's urlencoded form goes through werkzeug."""
    query = req.query_string
    if req.method != "POST":
        return _parsed(query)
    if query and not _decodable(query):  # the signed URL carries it
        return None
    body = req.get_data(cache=True)
    if req.mimetype == FORM:
        return _parsed(body)
    return list(req.form.items(multi=True)) if _decodable(body) else None


def _field_problem(name: str, value: str) -> str | None:
    if not value:
        return f"missing {name}"
    if len(value) > MAX_FIELD or "|" in value or not value.isprintable() or " " in value:
        return f"malformed {name}"
    return None


def _refuse(status: int, reason: str) -> Response:
    logs.annotate(reason=reason)
    return problem(status, reason[0].upper() + reason[1:] + ".")


def _start():
    """Opens the summary line of every request to ``/sms``, whatever its method (routed to the
    webhook, or refused by routing on its path: a 405 is the webhook's too).

    Methods other than GET and POST are refused here, before routing would answer OPTIONS
    itself or run the handler for a HEAD (a message counted that nobody reads the reply of).
    A query string is the GET form of a body, so it gets the same bound.
    """
    req = request_ctx.request  # once: each use of the `request` proxy costs a lookup
    if req.path != PATH:
        return
    g.started = time.perf_counter()
    logs.open_summary(method=req.method, remote=req.remote_addr)
    if req.method not in METHODS:
        logs.annotate(reason="method not allowed")
        raise MethodNotAllowed(valid_methods=METHODS)
    if len(req.query_string) > current_app.config["MAX_BODY_BYTES"]:
        logs.annotate(reason="query string over MAX_BODY_BYTES")
        raise RequestURITooLarge()


@bp.route(PATH, methods=METHODS)
def sms():
    """A message's whole life: refuse → bind (round trip 1) → handler → save (round trip 2)."""
    req, app = request_ctx.request, app_ctx.app  # once each, as in _start
    fields = _fields(req)
    if fields is None:
        return _refuse(400, "request is not valid UTF-8 form data")
    params: dict[str, str] = {}
    for name, value in fields:  # the first of a repeated field, as werkzeug's MultiDict.get
        params.setdefault(name, value)
    sender, recipient = params.get("From", ""), params.get("To", "")
    message_sid = params.get("MessageSid", "")
    logs.annotate(message_sid=message_sid[:MAX_FIELD], **{"from": mask(sender), "to": mask(recipient)})
    if not signature.check(app).is_valid(req, fields if req.method == "POST" else ()):
        return _refuse(403, "invalid or missing Twilio signature")
    for name, value in (("From", sender), ("To", recipient), ("MessageSid", message_sid)):
        reason = _field_problem(name, value)
        if reason:
            return _refuse(400, reason)
    message = Message.from_params(params, callers.directory(app).name(sender))

    conversation = cast(ConversationSession, request_ctx.session).bind(message)  # sessions.py's
    if conversation.answered is not None:  # a redelivery: its first answer, no handler
        g.outcome = Outcome.DUPLICATE
        return twiml(recall(conversation.answered))
    try:
        reply = _reply(message, conversation, handler.current(app))
        answer = render(reply)
    except Exception as error:  # the developer's code: its failure is a 500, nothing saved
        conversation.release()
        logs.annotate(
            reason=f"the handler failed: {type(error).__name__}: {error}", error=traceback.format_exc()
        )
        return problem(500, "The conversation handler failed.")
    conversation.save(memo(reply))
    return twiml(answer)


def _reply(message: Message, conversation, handle: handler.Handler):
    """The handler's reply, except to an opt-out: that ends the conversation unanswered
    (Twilio confirms the opt-out itself and would refuse any reply)."""
    if message.opt_out == "STOP":
        conversation.end_reason = "opt-out"
        return None
    return handle(message, conversation)


def outcome(status: int, state) -> Outcome:
    """How the request ended, by its status (and ``g``'s ``outcome`` for a 200)."""
    if status == 200:
        return getattr(state, "outcome", Outcome.REPLIED)
    if status == 403:
        return Outcome.REJECTED_SIGNATURE
    if status == 503:
        return Outcome.UNAVAILABLE
    if 400 <= status < 500:
        return Outcome.BAD_REQUEST
    return Outcome.ERROR


def _finished(app: Flask, response: Response, **_) -> None:
    """The request's metrics and its one log line, once the response is final."""
    state = g._get_current_object()
    started = getattr(state, "started", None)  # set by _start for requests to /sms
    if started is None:
        return
    seconds = time.perf_counter() - started
    status = response.status_code
    result = outcome(status, state)
    metrics = current_metrics(app)
    metrics.by_outcome[result].inc()
    metrics.latency.observe(seconds)
    level = logging.ERROR if result is Outcome.ERROR else logging.INFO
    fields = {
        **logs.summary_fields(),
        "outcome": result,
        "status": status,
        "latency_ms": round(seconds * 1000, 2),
    }
    logs.write(log, level, "webhook " + result.value, fields)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start)  # the app's, not the blueprint's: it must see routing's 405s
    request_finished.connect(_finished, app)
