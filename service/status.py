"""``POST /sms/status``: Twilio's status callbacks for outbound messages, and ``on_status``.

A callback is signed like a webhook and checked by the same ``SignatureCheck`` (the
request's account's tokens or SharedKey): an invalid or missing signature is a 403 before any
Redis work. Its URL names the outbound message (``m=<id>|<from>|<to>``, the sender's marker),
so a callback finds its message even when the create's answer was lost. Statuses are ranked
(``service/store/outbound.lua``): callbacks arrive in any order, a terminal status wins, and a
later ``sent`` never overwrites ``delivered``. Each status a message reaches is counted
(``sms_outbound_messages_total{status}``) and told to the handler module's ``on_status``, if it
has one.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Flask, request

from .outbound_view import FAILED_STATUSES, OutboundView
from .responses import problem
from .sender import STATUS_PATH, StatusUpdate, notify, read_marker
from .wiring import current

log = logging.getLogger(__name__)
bp = Blueprint("status", __name__)

# Twilio's MessageStatus values for an outbound message.
STATUSES = frozenset(
    {
        "accepted",
        "scheduled",
        "queued",
        "sending",
        "sent",
        "delivered",
        "undelivered",
        "failed",
        "canceled",
        "read",
        "partially_delivered",
    }
)


@bp.post(STATUS_PATH)
def status_callback():
    wired = current()
    fields = list(request.form.items(multi=True))
    params = request.form
    refused = wired.signature.refusal(request, fields, params.get("AccountSid"))
    if refused:
        log.warning("status callback refused: %s", refused)
        return problem(403, refused[0].upper() + refused[1:] + ".")
    marked = read_marker(request.args.get("m", ""))
    status, message_sid = params.get("MessageStatus", ""), params.get("MessageSid", "")
    if marked is None:
        return _bad("the URL names no outbound message (m=<id>|<from>|<to>)")
    if status not in STATUSES:
        return _bad("unknown MessageStatus")
    if not message_sid:
        return _bad("missing MessageSid")
    message_id, sender, recipient = marked
    keys = wired.keys.conversation(sender, recipient)
    error_code = params.get("ErrorCode", "")
    before, after = wired.store.status(keys, message_id, message_sid, status, error_code)
    if not before:
        log.info("status callback for an outbound message no longer kept (%s)", status)
        return problem(404, "No such outbound message.")
    if after != before:
        if after in FAILED_STATUSES:
            OutboundView(wired.redis, wired.keys).note_failure(keys, message_id)
        notify(wired, StatusUpdate(message_id, message_sid, after, before, sender, recipient, error_code))
    return "", 204


def _bad(reason: str):
    log.warning("status callback refused: %s", reason)
    return problem(400, reason[0].upper() + reason[1:] + ".")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
