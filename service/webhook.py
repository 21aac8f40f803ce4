"""``/sms``: Twilio's inbound-message webhook.

Order matters: everything that can refuse a request (size, encoding, signature, fields) runs
before the conversation is bound, so a bad or forged request costs no Redis round trip.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Flask, current_app, request, session

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


@bp.route("/sms", methods=["GET", "POST"])
def sms():
    body = request.get_data(cache=True) if request.method == "POST" else b""
    if not (_decodable(request.query_string) and _decodable(body)):
        log.info("webhook refused: undecodable input")
        return problem(400, "Request is not valid UTF-8 form data.")
    if not current_app.extensions["signature"].is_valid(request):
        log.warning("webhook refused: missing or invalid X-Twilio-Signature")
        return problem(403, "Invalid or missing Twilio signature.")

    params = request.form if request.method == "POST" else request.args
    sender, recipient = params.get("From", ""), params.get("To", "")
    message_sid = params.get("MessageSid", "")
    for name, value in (("From", sender), ("To", recipient), ("MessageSid", message_sid)):
        reason = _field_problem(name, value)
        if reason:
            log.info("webhook refused: %s", reason)
            return problem(400, reason[0].upper() + reason[1:] + ".")

    keys = current_app.extensions["keys"].conversation(sender, recipient)
    conversation = session._get_current_object()
    stored = current_app.session_interface.bind(conversation, keys, message_sid)
    if stored is not None:
        log.info("redelivery of %s from %s answered from memory", message_sid, mask(sender))
        return twiml(stored)

    count = int(conversation.get("messages", 0)) + 1
    conversation["messages"] = count
    name = current_app.extensions["callers"].name(sender)
    if count == 1:
        conversation.reply = f"Thanks for the message, {name}!"
    else:
        conversation.reply = f"{name} has messaged {recipient} {count} times."
    return twiml(conversation.reply)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
