"""Sending from outside a webhook: scripts and jobs (``service.send``), ``sms-sessions send``
and ``POST /ops/messages``.

Each takes the conversation's lock exactly as an inbound message does (OPEN, in arrival order
with the messages waiting for it), so an outbound message and an inbound one never interleave
inside one conversation's state; then ``push.lua`` queues the message in the same step that
starts the conversation when none is live (its ``started`` event and the given state: the
user's reply continues it), and releases the lock. The sender delivers it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import click
from flask import Flask, current_app, has_app_context
from flask.cli import with_appcontext

from .outbox import Refused, encode, message
from .redis_client import is_outage
from .sessions import SESSION_ID_BYTES, JsonSerializer
from .store import ConversationBusy, LockLost, decode_state
from .transcripts import Settings as TranscriptSettings
from .transcripts import pushed
from .wiring import current

REFUSALS = {
    21610: "the number opted out (STOP): nothing is sent to it until it texts START",
    63016: "outside WhatsApp's 24-hour window (no inbound message in the last 24 hours): only a "
    "template (content_sid) may be sent",
}


class NoSender(ValueError):
    """No number of ours to send from: none given, and no ``TWILIO_FROM_NUMBER``.

    A conversation is keyed by its two numbers, and the user's reply comes to the number the
    message came from, so that number must be known when the message is queued. A Messaging
    Service alone does not say it: Twilio picks the sender from its pool per message (sticky
    sender, area code), after the message was queued, and the reply would come to a number
    this conversation is not keyed by. With a number named, a Messaging Service still applies:
    the create carries both, and Twilio sends from that number (docs/outbound.md)."""

    def __init__(self, argument: str = "sender="):
        super().__init__(
            f"no number to send from: give {argument} (one of our numbers; the conversation and "
            "the reply are keyed by it) or set TWILIO_FROM_NUMBER. A Messaging Service alone "
            "(TWILIO_MESSAGING_SERVICE_SID) picks its sender only once the message is sent"
        )


@dataclass(frozen=True)
class Sent:
    """A message queued for delivery: its ``id`` (``on_status`` and the records name it), the
    conversation's id, and whether this message started the conversation."""

    id: str
    conversation: str
    started: bool

    def to_json(self) -> dict:
        return {"id": self.id, "conversation": self.conversation, "started": self.started}


def send(
    to: str,
    text: str | None = None,
    *,
    sender: str | None = None,
    media: Iterable[str] = (),
    state: dict[str, Any] | None = None,
    content_sid: str | None = None,
    content_variables: dict | str | None = None,
    app: Flask | None = None,
    by: str | None = None,
) -> Sent:
    """Queues a message to ``to`` from our number ``sender`` (default ``TWILIO_FROM_NUMBER``)
    in the conversation (``to``, ``sender``), under its lock; the sender delivers it. With no
    live conversation for the pair it starts one, with ``state`` (a JSON object; ignored when
    one is live) and its ``started`` event, so that the reply continues it.

    ``app``: the service's app (default: the current one); ``by``: who sends it, when not the
    service (``operator``). Raises ``Refused`` (with Twilio's
    ``code``) for a number that opted out or a WhatsApp window that is closed, ``NoSender`` (a
    ``ValueError``) with no number to send from, ``ValueError`` for a message Twilio would
    refuse or state that is not JSON, ``ConversationBusy`` when the
    conversation stayed locked past ``LOCK_WAIT``, and Redis' errors.
    """
    app = app or (current_app._get_current_object() if has_app_context() else None)  # type: ignore[attr-defined]
    if app is None:
        raise RuntimeError("service.send needs the app: send(..., app=create_app()) or an app context")
    wired = current(app)
    sender = sender or app.config["TWILIO_FROM_NUMBER"]
    if not sender:
        raise NoSender()
    if state is not None and not isinstance(state, dict):
        raise ValueError("state is a JSON object (a dict)")
    outgoing = message(to, sender, text, media, content_sid=content_sid, content_variables=content_variables)
    if by:  # who sent it, kept on its record and in the transcript (an operator: service/handoff.py)
        outgoing = replace(outgoing, extra={"by": by})
    encoded_state = JsonSerializer().dumps(state or {})
    keys = wired.keys.conversation(to, sender)
    store = wired.store
    opened = store.open(keys, "OB" + outgoing.id)
    try:
        live = bool(opened.sid) and decode_state(opened.state) is not None and opened.seq.isdigit()
        start = None if live else secrets.token_urlsafe(SESSION_ID_BYTES)
        result, code = store.push(
            keys,
            opened,
            start=start,
            state=encoded_state,
            outbound=encode([outgoing]),
            template=bool(outgoing.content_sid),
            transcript=pushed(TranscriptSettings.from_config(app.config), outgoing, start or opened.sid),
        )
    except BaseException:
        store.release(keys, opened.token)
        raise
    if result == "lost":
        raise LockLost(keys.member)
    if result == "refused":
        raise Refused(REFUSALS.get(code or 0, "refused"), code)
    if opened.ended_overdue:
        wired.metrics.conversations_ended.labels("expired").inc()
    if start:
        wired.metrics.conversations_started.inc()
    wired.metrics.outbound.labels("pending").inc()
    wired.doorbell.ring()
    return Sent(outgoing.id, start or opened.sid, start is not None)


@click.command("send")
@click.option("--from", "sender", metavar="NUMBER", help="Our number (default: TWILIO_FROM_NUMBER).")
@click.option("--to", "to", required=True, metavar="NUMBER", help="The number to text.")
@click.option("--media", multiple=True, metavar="URL", help="Attach this media URL (repeat for several).")
@click.option("--state", "state", metavar="JSON", help="State of the conversation it starts (a JSON object).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.argument("text")
@with_appcontext
def send_command(sender, to, media, state, as_json, text):
    """Queue a message to a number, in its conversation (started when none is live)."""
    initial = None
    if state is not None:
        try:
            initial = json.loads(state)
        except ValueError:
            raise click.BadParameter("not JSON", param_hint="--state") from None
        if not isinstance(initial, dict):
            raise click.BadParameter("a JSON object ({...})", param_hint="--state")
    try:
        sent = send(to, text, sender=sender, media=media, state=initial, app=current_app)
    except Refused as refused:
        _fail(f"refused ({refused.code}): {refused}", as_json, {"error": str(refused), "code": refused.code})
    except NoSender:
        missing = str(NoSender("--from"))
        _fail(missing, as_json, {"error": missing})
    except ValueError as error:
        _fail(str(error), as_json, {"error": str(error)})
    except (ConversationBusy, LockLost):
        _fail("the conversation stayed busy; try again", as_json, {"error": "busy"})
    except Exception as error:  # redis_client.is_outage: redis-py's own failures too
        if not is_outage(error):
            raise
        _fail(f"Redis unavailable: {type(error).__name__}", as_json, {"error": "redis unavailable"})
    if as_json:
        click.echo(json.dumps(sent.to_json()))
    else:
        click.echo(
            f"queued {sent.id} in {'a new' if sent.started else 'the live'} conversation {sent.conversation}"
        )


def _fail(line: str, as_json: bool, data: dict):
    if as_json:
        click.echo(json.dumps(data), err=True)
    else:
        click.echo(f"sms-sessions send: {line}", err=True)
    raise SystemExit(1)
