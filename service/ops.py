"""Operators' JSON API under ``/ops`` and ``sms-sessions conversations`` (the console,
``console.py``, is the third way in).

Both read the same ``LiveConversations`` and print the same JSON objects. The API is off
until ``OPS_TOKEN`` is set (no route at all: 404 whatever the method, so nothing reveals it)
and then wants ``Authorization: Bearer <OPS_TOKEN>``. It never opens a conversation's
session: the session interface binds only in the webhook.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import sys
from typing import NoReturn

import click
from flask import Blueprint, Flask, abort, current_app, jsonify, make_response, request
from flask.cli import AppGroup, with_appcontext

from . import sending
from .clock import duration, now_ms
from .handoff import Busy, NotLive
from .live import BadCursor, LiveConversation, iso
from .masking import mask
from .outbound_view import PREVIEW, OutboundView
from .outbox import Refused
from .redis_client import is_outage
from .timers import Timer
from .wiring import current

log = logging.getLogger(__name__)
bp = Blueprint("ops", __name__, url_prefix="/ops")

DEFAULT_LIMIT = 50
MAX_REPLY = 1600  # Twilio's longest message body, in characters
MAX_LIMIT = 1000


@bp.before_request
def authorize():
    address, guard = request.remote_addr or "-", current().throttle
    wait = guard.wait(address)
    if wait:
        log.warning("ops request refused: too many wrong tokens from %s", address)
        return error(429, f"Too many wrong tokens: retry in {wait} s.", {"Retry-After": str(wait)})
    token = current_app.config["OPS_TOKEN"]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        guard.failed(address, "api")
        log.warning("ops request refused: missing or wrong bearer token")
        return error(401, "Missing or wrong bearer token.", {"WWW-Authenticate": "Bearer"})
    guard.succeeded(address)
    return None


def error(status: int, reason: str, headers: dict | None = None):
    return jsonify({"error": reason}), status, headers or {}


def limit_arg() -> int:
    """The request's ``limit`` (``DEFAULT_LIMIT`` when absent); a 400 answers a request whose
    limit is not a whole number from 1 to ``MAX_LIMIT``."""
    try:
        limit = int(request.args.get("limit", DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        abort(make_response(error(400, f"limit must be a whole number from 1 to {MAX_LIMIT}.")))
    return limit


def limit_option(meaning: str):
    """The CLI's ``--limit``, as the API's ``limit``: ``meaning`` is its help."""
    return click.option(
        "--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(1, MAX_LIMIT), help=meaning
    )


@bp.get("/stats")
def stats():
    """Live and indexed conversations, and the last hour's lifecycle (started, ended by
    reason, the ended ones' average duration and messages)."""
    return {**current().live.stats(), "last_hour": current().history.stats()}


@bp.get("/conversations")
def conversations():
    limit = limit_arg()
    try:
        page = current().live.page(limit, request.args.get("cursor") or None)
    except BadCursor:
        return error(400, "Malformed cursor.")
    return {"conversations": [c.to_json() for c in page.conversations], "next_cursor": page.next_cursor}


@bp.get("/conversations/<sender>/<recipient>")
def conversation(sender, recipient):
    found = current().live.get(sender, recipient)
    if found is None:
        return error(404, "No live conversation for this pair.")
    return conversation_json(found)


def conversation_json(found: LiveConversation) -> dict:
    """A conversation as operators read it: its state and its outbound messages with their
    statuses (``outbound``, oldest first)."""
    wired = current()
    outbound = OutboundView(wired.redis, wired.keys).conversation(found.sender, found.recipient)
    return finite({**found.to_json(with_state=True), "outbound": outbound})


@bp.get("/outbox")
def outbox():
    """What waits to be sent (queued, claimed, retrying) and what failed, across tags."""
    limit = limit_arg()
    wired = current()
    return OutboundView(wired.redis, wired.keys).outbox(limit).to_json()


@bp.get("/timers")
def timers():
    """The next due timers across conversations, earliest first (``limit``, default 50)."""
    limit = limit_arg()
    return {"timers": [timer_json(*found) for found in current().live.next_timers(limit)]}


def timer_json(sender: str, recipient: str, timer: Timer) -> dict:
    return finite({"from": sender, "to": recipient, **timer.to_json(), "due": iso(timer.due_ms)})


def finite(data):
    """``data`` as JSON can carry it: stored state may hold NaN or an infinity (a hand edit;
    Python's JSON reads them, no other parser does), shown as null."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [finite(value) for value in data]
    return data


@bp.get("/transcripts/<sender>/<recipient>")
def transcript(sender, recipient):
    """The pair's transcript, oldest first (empty when none is kept)."""
    entries = current().transcripts.read(sender, recipient)
    return {"from": sender, "to": recipient, "entries": [entry.to_json() for entry in entries]}


@bp.get("/handoffs")
def handoffs():
    """Conversations waiting for a person, longest first."""
    return {"waiting": [w.to_json() for w in current().handoffs.waiting()]}


@bp.post("/conversations/<sender>/<recipient>/handoff")
def take_over(sender, recipient):
    """Take over: the bot is paused for the conversation (``HANDOFF_TIMEOUT`` at most)."""
    try:
        current().handoffs.take_over(sender, recipient)
    except NotLive:
        return error(404, "No live conversation for this pair.")
    return {
        "from": sender,
        "to": recipient,
        "paused_until": current().handoffs.paused_until(sender, recipient),
    }


@bp.delete("/conversations/<sender>/<recipient>/handoff")
def hand_back(sender, recipient):
    """Hand back: the bot resumes; a JSON body's ``state`` (an object) is merged into the state."""
    body = request.get_json(silent=True) if request.data else {}
    values = body.get("state") if isinstance(body, dict) else None
    if values is not None and not isinstance(values, dict) or not isinstance(body, dict):
        return error(400, "The body, if any, is a JSON object whose state is an object.")
    try:
        current().handoffs.hand_back(sender, recipient, values)
    except NotLive:
        return error(404, "No live conversation for this pair.")
    except Busy:
        return error(409, "Messages kept the conversation busy: try again.")
    return {"from": sender, "to": recipient, "resumed": True}


@bp.post("/conversations/<sender>/<recipient>/reply")
def reply(sender, recipient):
    """An operator's reply (JSON ``{"body": "…"}``), queued for the sender, in the transcript."""
    body = request.get_json(silent=True)
    text = body.get("body") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_REPLY:
        return error(
            400, f"The body is a JSON object with a non-empty body of at most {MAX_REPLY} characters."
        )
    queued, detail = operator_reply(sender, recipient, text)
    if not queued:
        return error(409, f"Not sent: {detail}.")
    return {"queued": True, "id": detail}


def operator_reply(sender: str, recipient: str, body: str) -> tuple[bool, str]:
    """An operator's reply to ``sender`` from ``recipient``: an outbound message marked
    ``operator`` (the sender delivers it; its transcript entry is written as it is queued).
    (True, its id), or (False, why it was refused: an opt-out, a closed WhatsApp window)."""
    try:
        return True, sending.send(sender, body, sender=recipient, by="operator").id
    except Refused as refused:
        return False, str(refused)


@bp.delete("/numbers/<number>")
def forget_number(number):
    """Removes everything the service holds of ``number`` (service/forget.py); what went.
    ``?opt_out=1``: its opt-out record too."""
    done = current().forgetting.forget(number, opt_out=request.args.get("opt_out") == "1")
    log.info("forgot a number on request: %s", done.line().replace(number, mask(number)))
    return done.to_json()


MESSAGE_FIELDS = {"to", "from", "text", "media", "state", "content_sid", "content_variables"}


@bp.post("/messages")
def send_message():
    """Queues an outbound message (service/sending.py): 201 with its id, 422 when a rule
    refuses it (opt-out, WhatsApp window: the error and Twilio's code), 400 for bad input."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "Expected a JSON object.")
    unknown = set(body) - MESSAGE_FIELDS
    if unknown:
        return error(400, f"Unknown field {sorted(unknown)[0]!r}.")
    to, sender, text = body.get("to"), body.get("from"), body.get("text")
    media = body.get("media") or []
    if not isinstance(to, str) or not to:
        return error(400, "to: the number to text.")
    if sender is not None and not isinstance(sender, str):
        return error(400, "from: one of our numbers.")
    if not isinstance(media, list):
        return error(400, "media: a list of URLs.")
    try:
        sent = sending.send(
            to,
            text,
            sender=sender,
            media=media,
            state=body.get("state"),
            content_sid=body.get("content_sid"),
            content_variables=body.get("content_variables"),
        )
    except Refused as refused:
        return jsonify({"error": str(refused), "code": refused.code}), 422
    except sending.NoSender:
        return error(400, str(sending.NoSender('"from"')))
    except (ValueError, TypeError) as bad:
        return error(400, str(bad))
    log.info("outbound message %s queued by an operator", sent.id)
    return sent.to_json(), 201


@bp.delete("/conversations/<sender>/<recipient>")
def end_conversation(sender, recipient):
    if not current().live.end(sender, recipient):
        return error(404, "No live conversation for this pair.")
    return {"ended": True, "from": sender, "to": recipient}


conversations_cli = AppGroup("conversations", help="See, read and end live conversations (REDIS_URL).")


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def run(command):
    """Runs a CLI command, turning a Redis failure into one stderr line and exit status 1."""
    if not current_app.config["REDIS_URL"]:
        click.echo(
            "warning: REDIS_URL is not set; this process sees only its own empty in-memory "
            "store, not a running `make run` (use the /ops API there)",
            err=True,
        )
    try:
        return command()
    except Exception as failure:  # redis_client.is_outage: redis-py's own failures too
        if not is_outage(failure):
            raise
        detail = str(failure).strip().splitlines()
        click.echo(
            f"Redis unavailable: {type(failure).__name__}" + (f": {detail[0]}" if detail else ""), err=True
        )
        sys.exit(1)


def emit(data, text: str, as_json: bool) -> None:
    click.echo(json.dumps(data, ensure_ascii=False) if as_json else text)


@conversations_cli.command("count")
@json_option
def count_command(as_json):
    """Number of live conversations."""
    active_now = run(current().live.count)
    emit({"active": active_now}, str(active_now), as_json)


@conversations_cli.command("list")
@limit_option("Conversations per page.")
@click.option("--cursor", help="Continue after the page that printed this cursor.")
@json_option
def list_command(limit, cursor, as_json):
    """Live conversations, most recent first, a page at a time."""
    try:
        page = run(lambda: current().live.page(limit, cursor))
    except BadCursor:
        raise click.BadParameter("not a cursor this command printed", param_hint="--cursor") from None
    rows = [c.to_json() for c in page.conversations]
    emit(rows, table(rows), as_json)
    if page.next_cursor:  # on stderr, so that stdout stays one JSON list or one table
        click.echo(f"next cursor: {page.next_cursor}", err=True)


@conversations_cli.command("show")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
@json_option
def show_command(sender, recipient, as_json):
    """One conversation with its full session state."""
    found: LiveConversation | None = run(lambda: current().live.get(sender, recipient))
    if found is None:
        unknown(sender, recipient)
    data = run(lambda: conversation_json(found))
    text = "\n".join(
        f"{key}: {json.dumps(value, ensure_ascii=False) if key == 'state' else value}"
        for key, value in data.items()
        if key not in ("timers", "ttl", "outbound")
    )
    text += f"\nttl: {found.ttl if found.ttl is not None else 'CONVERSATION_TTL'}"
    text += "".join(
        f"\ntimer: {timer['name']}  due {timer['due']}  data={json.dumps(timer['data'], ensure_ascii=False)}"
        f"{'  cancelled by a reply' if timer['cancel_on_reply'] else ''}"
        for timer in data["timers"]
    )
    lines = [outbound_line(message) for message in data["outbound"]]
    text += "\noutbound:" + ("".join("\n  " + line for line in lines) if lines else " none")
    emit(data, text, as_json)


def outbound_line(message: dict) -> str:
    """An outbound message on one line: when queued, stage and status, attempts, Twilio's SID
    and error, and what it says (a preview)."""
    said = message["body"] or (f"template {message['content_sid']}" if message.get("content_sid") else "")
    if message["media"]:
        said = (said + " " if said else "") + f"[{len(message['media'])} media]"
    if len(said) > PREVIEW:
        said = said[: PREVIEW - 1] + "…"
    parts = [message["queued_at"] or "-", f"{message['stage']}/{message['status']}"]
    if message["attempts"] > 1:
        parts.append(f"attempts={message['attempts']}")
    if message.get("next_at"):
        parts.append(f"next={message['next_at']}")
    if message.get("sid"):
        parts.append(message["sid"])
    if message.get("error_code") or message.get("error_message"):
        parts.append(
            f"error={message.get('error_code') or '-'} {message.get('error_message') or ''}".rstrip()
        )
    return "  ".join(parts) + f"  {json.dumps(said, ensure_ascii=False)}"


@click.command("outbox")
@limit_option("Most messages listed in each part (waiting, failed).")
@json_option
@with_appcontext
def outbox_command(limit, as_json):
    """Outbound messages waiting to be sent (queued, being sent, retrying), in the order the
    sender takes them, and the latest failures (the last day's), across every conversation."""
    wired = current()
    found = run(lambda: OutboundView(wired.redis, wired.keys).outbox(limit))
    if found.more:
        click.echo(f"more than {limit} in a part: --limit shows more (up to {MAX_LIMIT})", err=True)
    if as_json:
        emit(found.to_json(), "", True)
        return
    lines = [f"waiting: {len(found.pending) or 'none'}"]
    lines += [f"  {m['from']} -> {m['to']}  {outbound_line(m)}" for m in found.pending]
    lines.append(f"failed (the last day's): {len(found.failed) or 'none'}")
    lines += [f"  {m['from']} -> {m['to']}  {outbound_line(m)}" for m in found.failed]
    click.echo("\n".join(lines))


@conversations_cli.command("expire")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
@json_option
def expire_command(sender, recipient, as_json):
    """End a conversation now: its next message starts afresh, whatever cookie Twilio sends."""
    if not run(lambda: current().live.end(sender, recipient)):
        unknown(sender, recipient)
    emit(
        {"ended": True, "from": sender, "to": recipient},
        f"ended the conversation from {sender} to {recipient}",
        as_json,
    )


@click.command("transcript")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
@json_option
@with_appcontext
def transcript_command(sender, recipient, as_json):
    """What was said between FROM and TO, oldest first (TRANSCRIPTS=1)."""
    if not current_app.config["TRANSCRIPTS"]:
        click.echo(
            "note: TRANSCRIPTS is off here; showing what was kept while it was on, if anything", err=True
        )
    entries = run(lambda: current().transcripts.read(sender, recipient))
    text = "\n".join(entry.line() for entry in entries) or f"no transcript from {sender} to {recipient}"
    emit([entry.to_json() for entry in entries], text, as_json)


@click.command("forget")
@click.argument("number")
@click.option(
    "--opt-out", "opt_out", is_flag=True, help="Its opt-out record (STOP) too: it may be sent to again."
)
@json_option
@with_appcontext
def forget_command(number, opt_out, as_json):
    """Remove everything held of NUMBER (a sender): its conversations live and ended, their
    transcripts, outbound messages and pending end hooks, its events. Safe while its messages
    arrive."""
    done = run(lambda: current().forgetting.forget(number, opt_out))
    emit(done.to_json(), done.line(), as_json)


handoff_cli = AppGroup("handoff", help="Take conversations over from the bot, reply, hand them back.")


@handoff_cli.command("take")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
def handoff_take(sender, recipient):
    """Pause the bot for a conversation (HANDOFF_TIMEOUT at most)."""
    try:
        run(lambda: current().handoffs.take_over(sender, recipient))
    except NotLive:
        unknown(sender, recipient)
    click.echo(f"took over the conversation from {sender} to {recipient}: the bot is paused")


@handoff_cli.command("reply")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
@click.argument("body")
def handoff_reply(sender, recipient, body):
    """Send BODY to FROM from TO, as the operator (through the outbound sender; in the transcript)."""
    queued, detail = run(lambda: operator_reply(sender, recipient, body))
    if not queued:
        click.echo(f"not sent: {detail}", err=True)
        sys.exit(1)
    click.echo(f"queued {detail}: the sender delivers it")


@handoff_cli.command("back")
@click.argument("sender", metavar="FROM")
@click.argument("recipient", metavar="TO")
@click.option(
    "--set", "assignments", multiple=True, metavar="NAME=JSON", help="A state value to resume with."
)
def handoff_back(sender, recipient, assignments):
    """Resume the bot, with the state as it was plus each --set NAME=JSON."""
    values = {}
    for assignment in assignments:
        name, equals, raw = assignment.partition("=")
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
        if not (name and equals):
            raise click.BadParameter("expected NAME=JSON", param_hint="--set")
    try:
        run(lambda: current().handoffs.hand_back(sender, recipient, values or None))
    except NotLive:
        unknown(sender, recipient)
    except Busy:
        click.echo("messages kept the conversation busy: try again", err=True)
        sys.exit(1)
    click.echo(f"handed the conversation from {sender} to {recipient} back to the bot")


@handoff_cli.command("waiting")
@json_option
def handoff_waiting(as_json):
    """Conversations whose handler asked for a person, longest first."""
    waiting = run(current().handoffs.waiting)
    text = "\n".join(f"{w.sender} -> {w.recipient}: {w.reason}" for w in waiting) or "nobody waits"
    emit([w.to_json() for w in waiting], text, as_json)


# How Twilio writes a number: E.164 with its +, maybe behind a channel (whatsapp:+1…); or a
# short code. Anything else cannot match a conversation.
NUMBER = re.compile(r"^(?:[a-z]+:)?\+[1-9]\d{6,14}$|^\d{3,8}$")


def unknown(sender: str, recipient: str) -> NoReturn:
    hint = (
        ""
        if NUMBER.match(sender) and NUMBER.match(recipient)
        else " (numbers are written as Twilio sends them: E.164 with the +, e.g. +15551230001)"
    )
    click.echo(f"no live conversation from {sender} to {recipient}{hint}", err=True)
    sys.exit(1)


@click.command("timers")
@with_appcontext
@limit_option("How many timers.")
@json_option
def timers_command(limit, as_json):
    """The next due timers across conversations, earliest first (overdue ones too)."""
    found = run(lambda: current().live.next_timers(limit))
    rows = [timer_json(*entry) for entry in found]
    now = now_ms()
    lines = [
        f"{row['due']}  {_when(entry[2].due_ms - now)}  {row['from']} → {row['to']}  {row['name']}"
        for row, entry in zip(rows, found)
    ]
    emit(rows, "\n".join(lines) or "no pending timers", as_json)


def _when(ms: int) -> str:
    return f"in {duration(ms / 1000)}" if ms >= 0 else f"{duration(-ms / 1000)} late"


COLUMNS = ("from", "to", "name", "messages", "first_seen", "last_seen", "expires_in")


def table(rows: list[dict]) -> str:
    """A plain aligned table; an empty page says so."""
    if not rows:
        return "no live conversations"
    cells = [[column.upper().replace("_", " ") for column in COLUMNS]]
    cells += [
        [duration(row[column]) if column == "expires_in" else str(row[column]) for column in COLUMNS]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells
    )


def init_app(app: Flask) -> None:
    current(app).live.preload()
    if app.config["OPS_TOKEN"]:  # off: no route at all, so every method on /ops is a 404
        app.register_blueprint(bp)
    app.cli.add_command(conversations_cli)
    app.cli.add_command(timers_command)
    app.cli.add_command(outbox_command)
    app.cli.add_command(transcript_command)
    app.cli.add_command(forget_command)
    app.cli.add_command(handoff_cli)
