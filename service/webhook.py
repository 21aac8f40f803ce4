"""``/sms``: Twilio's inbound-message webhook.

Order matters: everything that can refuse a request (size, encoding, signature, fields) runs
before the conversation is bound, so a bad or forged request costs no Redis round trip.

Every webhook request ends in one JSON log line and its metrics (outcome, latency), written
when Flask has finished the response, i.e. after the session was saved (which can still turn
a reply into a 503).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Flask, Response, current_app, g, request, request_finished, session

from . import logs
from .masking import mask
from .responses import problem, twiml

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)

MAX_FIELD = 64


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


def _field_problem(name: str, value: str) -> str | None:
    if not value:
        return f"missing {name}"
    if len(value) > MAX_FIELD or "|" in value or not value.isprintable() or " " in value:
        return f"malformed {name}"
    return None


def _refuse(status: int, reason: str) -> Response:
    logs.annotate(reason=reason)
    return problem(status, reason[0].upper() + reason[1:] + ".")


@bp.before_request
def _start():
    g.started = time.perf_counter()
    logs.open_summary()


@bp.route("/sms", methods=["GET", "POST"])
def sms():
    body = request.get_data(cache=True) if request.method == "POST" else b""
    if not (_decodable(request.query_string) and _decodable(body)):
        return _refuse(400, "request is not valid UTF-8 form data")

    params = request.form if request.method == "POST" else request.args
    sender, recipient = params.get("From", ""), params.get("To", "")
    message_sid = params.get("MessageSid", "")
    logs.annotate(message_sid=message_sid[:MAX_FIELD], **{"from": mask(sender), "to": mask(recipient)})
    if not current_app.extensions["signature"].is_valid(request):
        return _refuse(403, "invalid or missing Twilio signature")
    for name, value in (("From", sender), ("To", recipient), ("MessageSid", message_sid)):
        reason = _field_problem(name, value)
        if reason:
            return _refuse(400, reason)

    keys = current_app.extensions["keys"].conversation(sender, recipient)
    conversation = session._get_current_object()
    stored = current_app.session_interface.bind(conversation, keys, message_sid)
    if stored is not None:
        g.duplicate = True
        return twiml(stored)

    previous = conversation.get("messages", 0)
    count = (previous if isinstance(previous, int) and previous >= 0 else 0) + 1  # hand-edited state
    conversation["messages"] = count
    name = current_app.extensions["callers"].name(sender)
    if count == 1:
        conversation.reply = f"Thanks for the message, {name}!"
    else:
        conversation.reply = f"{name} has messaged {recipient} {count} times."
    return twiml(conversation.reply)


def outcome(status: int) -> str:
    if status == 200:
        return "duplicate" if g.get("duplicate") else "replied"
    if status == 403:
        return "rejected_signature"
    if status == 503:
        return "unavailable"
    if 400 <= status < 500:
        return "bad_request"
    return "error"


def _finished(app: Flask, response: Response, **_) -> None:
    """The request's metrics and its one log line, once the response is final."""
    if request.blueprint != bp.name or "started" not in g:
        return
    seconds = time.perf_counter() - g.started
    result = outcome(response.status_code)
    metrics = app.extensions["metrics"]
    metrics.messages.labels(result).inc()
    metrics.latency.observe(seconds)
    log.info("webhook %s", result, extra={"fields": {
        **logs.summary_fields(), "outcome": result, "status": response.status_code,
        "latency_ms": round(seconds * 1000, 2)}})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    request_finished.connect(_finished, app)
