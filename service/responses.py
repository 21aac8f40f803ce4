"""The service's own answers: TwiML replies and the short error responses."""

from __future__ import annotations

import logging
from xml.sax.saxutils import escape

from flask import Flask, Response
from twilio.twiml.messaging_response import MessagingResponse
from werkzeug.exceptions import HTTPException

from .logs import report
from .redis_client import UNAVAILABLE, is_outage
from .store import ConversationBusy, LockLost
from .wiring import current

log = logging.getLogger(__name__)


XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>'
NO_REPLY = XML_HEAD + "<Response />"


def render(reply: str | MessagingResponse | None) -> str:
    """The TwiML of a handler's reply: text, a ``MessagingResponse``, or None (no reply).

    Text is written directly, the way twilio's builder would write it, without building an
    ElementTree for one element.
    """
    if reply is None:
        return NO_REPLY
    if isinstance(reply, str):
        return f"{XML_HEAD}<Response><Message>{escape(reply)}</Message></Response>"
    if isinstance(reply, MessagingResponse):
        return reply.to_xml()
    raise TypeError(
        f"the handler returned a {type(reply).__name__}; expected text, a MessagingResponse or None"
    )


def memo(reply: str | MessagingResponse | None) -> str:
    """The reply as kept for a redelivery: short, so that the conversation's hash stays in
    Redis' compact encoding (``t`` text, ``n`` no reply, ``x`` TwiML)."""
    if reply is None:
        return "n"
    if isinstance(reply, str):
        return "t" + reply
    return "x" + render(reply)


def recall(kept: str) -> str:
    """TwiML from ``memo``'s form (a value stored by an older version is its reply text)."""
    kind, payload = kept[:1], kept[1:]
    if kind == "t":
        return render(payload)
    if kind == "n":
        return NO_REPLY
    if kind == "x":
        return payload
    return render(kept)


class Reply(Response):
    """The service's own answers: a body of one string and headers set here and by the
    session's cookie. Handed to the server as they are, without werkzeug's general
    ``get_wsgi_response`` (a copy of the headers, Location fixes, the length counted again, a
    closing iterator: work these answers never need), except for a HEAD, a body replaced by a
    stream or an iterator, or anything to call on close. docs/design.md's overrides table says
    what it is worth and the test that pins it."""

    def get_wsgi_response(self, environ):
        if environ.get("REQUEST_METHOD") == "HEAD" or type(self.response) is not list or self._on_close:
            return super().get_wsgi_response(environ)
        return self.response, self.status, self.headers.to_wsgi_list()


def twiml(body: str) -> Response:
    return Reply(body, mimetype="text/xml")


def problem(status: int, reason: str) -> Response:
    """A 4xx/5xx with a one-line plain-text reason."""
    return Reply(reason + "\n", status=status, mimetype="text/plain")


def unavailable() -> Response:
    """The 503 a client (Twilio) should retry."""
    response = problem(503, "Service temporarily unavailable, retry shortly.")
    response.headers["Retry-After"] = "1"
    return response


def http_error(error: HTTPException) -> Response:
    """The exception's own headers (a 405's ``Allow``) with a plain-text reason."""
    response = problem(error.code or 500, error.description or error.name)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Short answers instead of Flask's HTML pages, and 503 for every Redis failure."""

    def redis_failed(error):
        current().metrics.count_redis_error()
        report(log, f"Redis unavailable: {type(error).__name__}")
        return unavailable()

    for error_class in UNAVAILABLE:
        app.register_error_handler(error_class, redis_failed)

    @app.errorhandler(Exception)
    def anything_else(error):
        """redis-py failing in a way of its own (a failover) is Redis failing: 503. Anything
        else is a bug: raised again, for Flask's 500 and its traceback in the log."""
        if is_outage(error):
            return redis_failed(error)
        raise error

    @app.errorhandler(ConversationBusy)
    def conversation_busy(error):
        report(log, "conversation stayed locked past LOCK_WAIT")
        return unavailable()

    @app.errorhandler(LockLost)
    def lock_lost(error):
        report(log, "could not save the conversation: its lock lapsed or it was ended meanwhile")
        return unavailable()

    app.register_error_handler(HTTPException, http_error)
