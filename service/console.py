"""The operators' console at ``/console/``: live conversations to look at, search and end.

Server-rendered pages over the same operators' view as the CLI and the JSON API
(``wiring.current().live``): count, list, search, show and end have one implementation.
Off until ``OPS_TOKEN`` is set: then no route exists, so every method answers 404.

Each safeguard, and why:
- Operators sign in by posting the ops token in a form, never in a URL. The console's cookie
  is its own, not Flask's session (``app.session_interface`` is the conversations', bound by
  the webhook), signed by itsdangerous with a key derived from ``OPS_TOKEN``: rotating the
  token signs everyone out. ``HttpOnly``, ``SameSite=Strict``, ``Secure`` with
  ``SESSION_COOKIE_SECURE``, valid for ``CONSOLE_SESSION_TTL`` from sign-in. Only a signed-in
  operator gets it: nothing a visitor gets is keyed by the token, which could then be
  guessed offline against it.
- The cookie carries a CSRF token that every POST echoes in its form; the sign-in form's is
  a random cookie of its own. Wrong tokens are slowed per client address (``throttle``).
- A Content-Security-Policy without ``unsafe-inline`` (no inline script or style at all),
  no framing, no referrer, and ``no-store``: the pages hold full numbers and state.
- Numbers travel in query strings, never in paths: gunicorn's access log writes the path only
  and the dev server's request lines lose their query (``logs``), so no log line has them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from flask import Blueprint, Flask, current_app, g, redirect, render_template, request, url_for
from itsdangerous import BadData, URLSafeTimedSerializer

from . import sending
from .clock import duration, now_ms
from .handoff import Busy, NotLive
from .live import BadCursor, BadSearch, iso
from .masking import mask
from .ops import DEFAULT_LIMIT, MAX_REPLY, finite, operator_reply
from .outbound_view import OutboundView
from .outbox import Refused
from .store import ConversationBusy, LockLost
from .wiring import current

log = logging.getLogger(__name__)
PREFIX = "/console"
bp = Blueprint("console", __name__, url_prefix=PREFIX, static_folder="static", template_folder="templates")

COOKIE = "sms_console"  # a signed-in operator's, signed with a key derived from OPS_TOKEN
SIGN_IN_COOKIE = "sms_console_csrf"  # the sign-in form's CSRF token: random, signed by nothing
REFRESH_SECONDS = 5
RECENT_ENDED = 20
CHART_HOURS = 6
CHART_BOX = (600, 150)  # the SVG's viewBox: width, height
PLOT = (44, 10, 590, 124)  # its plot area: left, top, right, bottom
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _signer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(
        current_app.config["OPS_TOKEN"],
        salt="sms-sessions console",
        signer_kwargs={"digest_method": hashlib.sha256},
    )


def _new_session() -> dict:
    return {"csrf": secrets.token_urlsafe(24), "in": True}


@bp.before_request
def load_session():
    """Reads the cookie; refuses a POST whose form lacks its CSRF token; sends whoever is not
    signed in to the sign-in page."""
    if request.endpoint == "console.static":
        return None
    try:
        g.console = _signer().loads(
            request.cookies.get(COOKIE, ""), max_age=current_app.config["CONSOLE_SESSION_TTL"]
        )
    except BadData:  # none, forged, or signed with another token, or too old
        g.console = None
    if not (isinstance(g.console, dict) and g.console.get("in") is True):
        # A visitor's cookie ("in": false) from before sms_console_csrf; this check can go
        # once CONSOLE_SESSION_TTL has passed since that version was replaced.
        g.console = None
    if request.method == "POST":
        if g.console:
            expected = g.console["csrf"]
        elif request.endpoint == "console.sign_in":
            expected = request.cookies.get(SIGN_IN_COOKIE, "")
        else:
            expected = ""
        given = request.form.get("csrf", "")
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("console %s refused: missing or wrong CSRF token", request.path)
            return page(
                "message.html",
                403,
                title="Refused",
                message="This form was not sent by the console page (its CSRF token is "
                "missing or out of date). Reload the page and try again.",
            )
    if request.endpoint != "console.sign_in" and not g.console:
        return redirect(url_for("console.sign_in"), 303)
    return None


@bp.after_request
def remember(response):
    if g.get("new_console_session") is not None:
        _set_cookie(response, g.new_console_session)
    if g.get("sign_in_csrf") is not None:
        response.set_cookie(SIGN_IN_COOKIE, g.sign_in_csrf, **_cookie_options())
    return response


class Guarded:
    """WSGI layer: every answer under ``/console``, the app's own included (a 404, a 405,
    werkzeug's 308 that adds a slash: routing errors run no blueprint hook), gets the
    security headers, and ``no-store`` but for static files; a redirect's ``Location`` is a
    path, never a URL built from the request's ``Host`` header. A layer rather than an
    app-wide ``after_request``, which every webhook message would pay for."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict, start_response):
        path = environ.get("PATH_INFO") or ""
        if not (path == PREFIX or path.startswith(f"{PREFIX}/")):
            return self.wsgi_app(environ, start_response)
        added = {**SECURITY_HEADERS}
        if not path.startswith(f"{PREFIX}/static/"):
            added["Cache-Control"] = "no-store"
        replaced = {name.lower() for name in added}

        def start(status: str, headers: list, exc_info=None):
            kept = [
                (name, _as_path(value) if name.lower() == "location" else value)
                for name, value in headers
                if name.lower() not in replaced
            ]
            return start_response(status, kept + list(added.items()), exc_info)

        return self.wsgi_app(environ, start)


def _as_path(location: str) -> str:
    parts = urlsplit(location)
    return urlunsplit(("", "", parts.path or "/", parts.query, ""))


def _cookie_options() -> dict:
    return dict(
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=current_app.config["SESSION_COOKIE_SECURE"],
        max_age=current_app.config["CONSOLE_SESSION_TTL"],
    )


def _set_cookie(response, session: dict | None) -> None:
    options = _cookie_options()
    if session is None:
        del options["max_age"]
        response.delete_cookie(COOKIE, **options)
    else:
        response.set_cookie(COOKIE, _signer().dumps(session), **options)


def page(template: str, status: int = 200, **context):
    """A console page, with the CSRF token its forms echo."""
    session = g.get("new_console_session") or g.get("console") or {}
    csrf = session.get("csrf") or g.get("sign_in_csrf") or request.cookies.get(SIGN_IN_COOKIE, "")
    return render_template(
        f"console/{template}",
        csrf=csrf,
        signed_in=bool(session.get("in")),
        refresh=REFRESH_SECONDS,
        **context,
    ), status


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    if request.method == "GET":
        if g.console:
            return redirect(url_for("console.index"), 303)
        if not request.cookies.get(SIGN_IN_COOKIE):
            g.sign_in_csrf = secrets.token_urlsafe(24)  # the form's CSRF token, keyed by nothing
        return page("sign_in.html")
    address, guard = request.remote_addr or "-", current().throttle
    wait = guard.wait(address)
    if wait:
        log.warning("console sign-in refused: too many wrong tokens from %s", address)
        response = page("sign_in.html", 429, error=f"Too many wrong tokens: try again in {wait} s.")
        return (*response, {"Retry-After": str(wait)})
    given = request.form.get("token", "")
    if not hmac.compare_digest(given.encode(), current_app.config["OPS_TOKEN"].encode()):
        guard.failed(address, "console")
        log.warning("console sign-in refused: wrong ops token")
        return page("sign_in.html", 401, error="Wrong token.")
    guard.succeeded(address)
    log.info("console: an operator signed in")
    g.new_console_session = _new_session()  # a fresh CSRF token, too
    return redirect(url_for("console.index"), 303)


@bp.post("/sign-out")
def sign_out():
    response = redirect(url_for("console.sign_in"), 303)
    _set_cookie(response, None)
    return response


@bp.get("/")
def index():
    """Overview, the live list (a page of it, ``cursor``, or a number search, ``q``) and the
    conversations that ended last."""
    query = request.args.get("q", "").strip()
    cursor = request.args.get("cursor") or None
    context = {"query": query, "ended": request.args.get("ended") == "1", **overview()}
    try:
        if query:
            found = current().live.search(query, DEFAULT_LIMIT + 1)
            context.update(conversations=found[:DEFAULT_LIMIT], more=len(found) > DEFAULT_LIMIT)
        else:
            listed = current().live.page(DEFAULT_LIMIT, cursor)
            context.update(
                conversations=listed.conversations, next_cursor=listed.next_cursor, paged=cursor is not None
            )
    except BadSearch as error:
        log.warning("console search refused: %s", error)
        return page("index.html", 400, error=str(error), conversations=[], **context)
    except BadCursor:
        log.warning("console list refused: malformed cursor")
        return page(
            "index.html",
            400,
            conversations=[],
            **context,
            error="This page link is not valid any more: start from the first page.",
        )
    return page("index.html", **context)


@bp.get("/conversation")
def conversation():
    sender, recipient = request.args.get("from", ""), request.args.get("to", "")
    if not (sender and recipient):
        log.warning("console conversation refused: from and to are required")
        return page(
            "message.html",
            400,
            title="Which conversation?",
            message="A conversation is named by its two numbers, from and to.",
        )
    return show(sender, recipient)


def show(sender: str, recipient: str, status: int = 200, **extra):
    """The conversation's page (``extra``: the send box's error and text)."""
    found = current().live.get(sender, recipient)
    thread = current().transcripts.read(sender, recipient)
    if found is None:
        return page("conversation.html", 404, sender=sender, recipient=recipient, found=None, thread=thread)
    state = json.dumps(finite(found.state), indent=2, sort_keys=True, ensure_ascii=False)
    wired = current()
    outbound = OutboundView(wired.redis, wired.keys).conversation(sender, recipient)
    return page(
        "conversation.html",
        status,
        sender=sender,
        recipient=recipient,
        found=found,
        state=state,
        thread=thread,
        paused_until=current().handoffs.paused_until(sender, recipient),
        notice=request.args.get("notice", ""),
        outbound=outbound,
        **extra,
    )


@bp.post("/conversation/send")
def send_message():
    """The send box: the same ``service.send`` as ``POST /ops/messages`` and ``sms-sessions
    send`` (under the conversation's lock), to the conversation's number from ours; back to the
    page, where the message shows with its status."""
    sender, recipient = request.form.get("from", ""), request.form.get("to", "")
    text = request.form.get("text", "").replace("\r\n", "\n")
    if not (sender and recipient) or current().live.get(sender, recipient) is None:
        return page("conversation.html", 404, sender=sender, recipient=recipient, found=None)
    if not text.strip():
        return show(sender, recipient, 400, send_error="Type a message first.", send_text=text)
    try:
        sent = sending.send(sender, text, sender=recipient)
    except Refused as refused:
        log.warning("console send refused: %s", refused.code)
        return show(
            sender, recipient, 422, send_error=f"Not sent: {refused} ({refused.code}).", send_text=text
        )
    except ValueError as bad:
        log.warning("console send refused: %s", bad)
        return show(sender, recipient, 400, send_error=f"Not sent: {bad}", send_text=text)
    except (ConversationBusy, LockLost):
        log.warning("console send refused: the conversation stayed busy")
        return show(
            sender, recipient, 503, send_error="The conversation stayed busy: try again.", send_text=text
        )
    log.info("console: an operator queued outbound message %s", sent.id)
    query = urlencode({"from": sender, "to": recipient})
    return redirect(url_for("console.conversation") + "?" + query, 303)


NOTICES = {
    "taken": "You hold this conversation: the bot is paused. Reply below; hand it back when done.",
    "back": "Handed back: the bot answers the next message.",
    "sent": "Reply sent.",
    "not-sent": "The reply was not sent: this number opted out, or its WhatsApp window is closed.",
    "busy": "Messages kept the conversation busy: try again.",
    "bad-state": "The values to set must be a JSON object.",
    "empty": "Type a reply first.",
}


def _back_to(sender: str, recipient: str, notice: str):
    query = urlencode({"from": sender, "to": recipient, "notice": notice})
    return redirect(url_for("console.conversation") + "?" + query, 303)


@bp.post("/conversation/take")
def take_over():
    """Take over (the same as ``sms-sessions handoff take``): the bot is paused."""
    sender, recipient = request.form.get("from", ""), request.form.get("to", "")
    try:
        current().handoffs.take_over(sender, recipient)
    except NotLive:
        return page("conversation.html", 404, sender=sender, recipient=recipient, found=None, thread=[])
    log.info("console: an operator took over the conversation of %s", mask(sender))
    return _back_to(sender, recipient, "taken")


@bp.post("/conversation/reply")
def reply():
    sender, recipient = request.form.get("from", ""), request.form.get("to", "")
    body = request.form.get("body", "").strip()
    if not body:
        return _back_to(sender, recipient, "empty")
    queued, _ = operator_reply(sender, recipient, body[:MAX_REPLY])
    return _back_to(sender, recipient, "sent" if queued else "not-sent")


@bp.post("/conversation/back")
def hand_back():
    """Hand back, with the values the operator typed (a JSON object) merged into the state."""
    sender, recipient = request.form.get("from", ""), request.form.get("to", "")
    raw = request.form.get("state", "").strip()
    try:
        values = json.loads(raw) if raw else None
    except ValueError:
        values = []
    if values is not None and not isinstance(values, dict):
        return _back_to(sender, recipient, "bad-state")
    try:
        current().handoffs.hand_back(sender, recipient, values)
    except NotLive:
        return page("conversation.html", 404, sender=sender, recipient=recipient, found=None, thread=[])
    except Busy:
        return _back_to(sender, recipient, "busy")
    log.info("console: an operator handed the conversation of %s back to the bot", mask(sender))
    return _back_to(sender, recipient, "back")


@bp.post("/conversation/end")
def end():
    """The same end as ``conversations expire`` and ``DELETE /ops/conversations/…``."""
    sender, recipient = request.form.get("from", ""), request.form.get("to", "")
    if not (sender and recipient and current().live.end(sender, recipient)):
        return page("conversation.html", 404, sender=sender, recipient=recipient, found=None, thread=[])
    return redirect(url_for("console.index", ended=1), 303)


def overview() -> dict:
    """What the overview shows: live now, the last hour's lifecycle, the sampled charts and
    the conversations that ended last (``wiring.current().history``)."""
    history, now = current().history, now_ms()
    samples = history.samples(now - CHART_HOURS * 3600_000)
    return {
        "live": current().live.count(),
        "last_hour": history.stats(),
        "per_minute": samples[-1].messages if samples else None,
        "charts": [
            chart("live", "Live conversations", [(s.at, s.live) for s in samples], now),
            chart("messages", "Messages per minute", [(s.at, s.messages) for s in samples], now),
        ],
        "recent": history.recent(RECENT_ENDED),
        "waiting": current().handoffs.waiting(),
    }


@dataclass
class Chart:
    """A series over the last ``CHART_HOURS`` as SVG coordinates, drawn by the template: no
    script, so nothing for the Content-Security-Policy to allow."""

    id: str
    title: str
    line: str  # polyline points
    area: str  # polygon points: the line closed along the bottom
    last: tuple[float, float] | None  # the latest point, marked
    peak: int
    summary: str  # the chart in words, for screen readers


def chart(chart_id: str, title: str, series: list[tuple[int, int]], now: int) -> Chart:
    """``series`` of (epoch ms, value): x is time from ``CHART_HOURS`` ago to now, y the value
    from 0 to the peak."""
    left, top, right, bottom = PLOT
    start = now - CHART_HOURS * 3600_000
    shown = [(at, value) for at, value in series if start <= at <= now]
    peak = max((value for _, value in shown), default=0)
    xy = [
        (left + (at - start) / (now - start) * (right - left), bottom - value / max(peak, 1) * (bottom - top))
        for at, value in shown
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    area = f"{xy[0][0]:.1f},{bottom} {line} {xy[-1][0]:.1f},{bottom}" if xy else ""
    summary = (
        f"{title} over the last {CHART_HOURS} hours, one point a minute: highest "
        f"{peak}, latest {shown[-1][1]}."
        if shown
        else f"{title}: no samples yet."
    )
    return Chart(chart_id, title, line, area, xy[-1] if xy else None, peak, summary)


def ago(epoch_ms: int) -> str:
    seconds = time.time() - epoch_ms / 1000
    return "just now" if seconds < 1 else duration(seconds) + " ago"


@bp.context_processor
def helpers():
    return {
        "ago": ago,
        "duration": duration,
        "iso": iso,
        "chart_box": CHART_BOX,
        "plot": PLOT,
        "chart_hours": CHART_HOURS,
        "notices": NOTICES,
    }


def init_app(app: Flask) -> None:
    if app.config["OPS_TOKEN"]:  # off: no route at all, so every method on /console is a 404
        app.register_blueprint(bp)
        # Flask's documented way to wrap its WSGI app (mypy sees a method being replaced).
        app.wsgi_app = Guarded(app.wsgi_app)  # type: ignore[method-assign]
