"""The service's own answers: TwiML replies and the short error responses."""

from __future__ import annotations

import logging

from flask import Flask, Response
from twilio.twiml.messaging_response import MessagingResponse
from werkzeug.exceptions import HTTPException

from .conversations import ConversationBusy
from .logs import report
from .metrics import count_redis_error
from .redis_client import UNAVAILABLE

log = logging.getLogger(__name__)


def twiml(message: str | None) -> Response:
    """A TwiML answer; ``None`` answers ``<Response/>`` (no reply sent)."""
    reply = MessagingResponse()
    if message is not None:
        reply.message(message)
    return Response(reply.to_xml(), mimetype="text/xml")


def problem(status: int, reason: str) -> Response:
    """A 4xx/5xx with a one-line plain-text reason."""
    return Response(reason + "\n", status=status, mimetype="text/plain")


def unavailable(response: Response | None = None) -> Response:
    """The 503 a client should retry; rewrites ``response`` in place when given.

    In place because ``save_session`` runs after the view and cannot raise into Flask's
    error handlers.
    """
    response = response if response is not None else Response()
    response.status_code = 503
    response.set_data("Service temporarily unavailable, retry shortly.\n")
    response.mimetype = "text/plain"
    response.headers["Retry-After"] = "1"
    return response


def init_app(app: Flask) -> None:
    """Short answers instead of Flask's HTML pages, and 503 for every Redis failure."""
    def redis_failed(error):
        count_redis_error()
        report(log, f"Redis unavailable: {type(error).__name__}")
        return unavailable()

    for error_class in UNAVAILABLE:
        app.register_error_handler(error_class, redis_failed)

    @app.errorhandler(ConversationBusy)
    def conversation_busy(error):
        report(log, "conversation stayed locked past LOCK_WAIT")
        return unavailable()

    @app.errorhandler(HTTPException)
    def http_error(error):
        return problem(error.code or 500, error.description or error.name)
