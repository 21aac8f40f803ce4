"""The sender: delivers queued outbound messages through Twilio's REST API (service/delivery.py).

Every serving process runs one in a background thread (like the sweeper), and
``sms-sessions sender`` runs one in the foreground; any number may run at once. Each pass reads
the due index of every tag (one pipelined round trip) and, per due conversation, claims its
first queued message (``claim.lua``: the conversation is held for ``SENDER_LEASE``, so no two
senders deliver one conversation's messages at once, and its order holds), delivers it and
records the outcome (``finish.lua``): handed to Twilio (its SID and status), to retry after
``backoff`` (429, 5xx, a timeout), or failed for good (Twilio's error code, or a rule's).
Before each message it yields to the webhook requests its process is serving
(``outbox.WebhookLoad``, ``SENDER_YIELD``).

A message goes out at most once, except in the lost-answer window: a create Twilio stored
whose answer never came back (a timeout, a dropped connection, a 5xx, or this process killed
between the create and its answer). Such a message is marked ``maybe_accepted``, and before
it is sent again the sender looks for it: the SID a status callback already brought (its URL
names the message), else ``Delivery.find_sent`` (the same body to the same number since the
first attempt). docs/outbound.md says what is left of that window.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from flask import Flask
from flask.cli import ScriptInfo

from .clock import now_ms
from .delivery import Accepted, Delivery, Outcome, Permanent, RetryLater, callback_url
from .handler import failure
from .keys import ConversationKeys
from .outbound_view import OutboundView
from .outbox import Outgoing, Refused, refusal
from .redis_client import is_outage
from .settings import ConfigError
from .wiring import Wiring, current

log = logging.getLogger(__name__)

DUE_PER_TAG = 200  # conversations one pass takes per tag (the rest, next pass)
PER_CONVERSATION = 20  # messages one pass sends per conversation before turning to others
STATUS_PATH = "/sms/status"


def status_callback_base(config: Any) -> str | None:
    """Where Twilio posts the status callbacks: ``PUBLIC_BASE_URL`` + ``/sms/status``, when set."""
    base = config["PUBLIC_BASE_URL"]
    return base.rstrip("/") + STATUS_PATH if base else None


def marker(message_id: str, keys: ConversationKeys) -> str:
    """The status callback URL's ``m``: the message's id and its conversation's pair."""
    return f"{message_id}|{keys.member}"


def read_marker(value: str) -> tuple[str, str, str] | None:
    """``marker``'s (id, from, to), or None when it is not one."""
    message_id, _, member = value.partition("|")
    sender, _, recipient = member.partition("|")
    return (message_id, sender, recipient) if message_id and sender and recipient else None


@dataclass(frozen=True)
class StatusUpdate:
    """What ``on_status(update)`` in the handler's module hears: an outbound message reached
    ``status`` (from ``previous``), with Twilio's ``error_code`` and ``error_message`` for a
    failure. ``to`` and ``sender`` are the conversation's ``From`` and ``To``; ``id`` is what
    ``conversation.send`` returned, ``sid`` Twilio's."""

    id: str
    sid: str
    status: str
    previous: str
    to: str
    sender: str
    error_code: str = ""
    error_message: str = ""


def notify(wired: Wiring, update: StatusUpdate) -> None:
    """Counts the status and tells ``on_status``; the hook's failure is logged, never raised."""
    wired.metrics.outbound.labels(update.status).inc()
    if wired.on_status is None:
        return
    try:
        wired.on_status(update)
    except Exception as error:  # the developer's code: logged, never failing the caller
        where, frames = failure(error)  # never the text, which may quote a number or the state
        log.error("on_status failed: %s", where, extra={"error": frames})


class Sender:
    """Delivers due outbound messages, one pass at a time (``run`` loops)."""

    def __init__(self, app: Flask, delivery: Delivery | None = None):
        self.app = app
        self.wired = current(app)
        config = app.config
        self.delivery = delivery or Delivery.from_config(config)
        self.interval = config["SENDER_INTERVAL"]
        # A create and a lookup must fit in a claim, or a slow call would outlive it.
        self.lease_ms = int(max(config["SENDER_LEASE"], 3 * config["TWILIO_API_TIMEOUT"]) * 1000)
        self.callbacks = status_callback_base(config)
        self.patience = config["SENDER_YIELD"]
        self.pool = ThreadPoolExecutor(config["SENDER_THREADS"], thread_name_prefix="sms-sender")
        self.stopping = threading.Event()

    def due(self) -> tuple[list[ConversationKeys], bool]:
        """The conversations whose next outbound message is due now (by this host's clock;
        the claim checks Redis'), and whether a tag had more than one pass takes."""
        keys = self.wired.keys
        pipe = self.wired.redis.pipeline(transaction=False)
        now = now_ms()
        for index in keys.dues():
            pipe.zrangebyscore(index, "-inf", now, start=0, num=DUE_PER_TAG)
        tags = pipe.execute()
        due = [keys.from_member(member) for members in tags for member in members]
        return due, any(len(members) == DUE_PER_TAG for members in tags)

    def send_due(self) -> int:
        """One pass: every due conversation's queued messages, in order; how many attempts
        it made."""
        return self.one_pass()[0]

    def one_pass(self) -> tuple[int, bool]:
        """``send_due``'s attempts, and whether the pass left due messages behind (a tag's or
        a conversation's share taken): the next pass then starts at once."""
        due, more = self.due()
        if not due:
            return 0, False
        attempts = list(self.pool.map(self.send_conversation, due))
        return sum(attempts), more or PER_CONVERSATION in attempts

    def send_conversation(self, keys: ConversationKeys) -> int:
        attempts = 0
        try:
            while attempts < PER_CONVERSATION and not self.stopping.is_set():
                self.wired.webhook_load.turn(self.patience, self.stopping)  # the webhook first
                token = secrets.token_hex(8)
                claimed = self.wired.store.claim(keys, token, self.lease_ms)
                if claimed is None:
                    break
                attempts += 1
                if self.attempt(keys, token, claimed) == "retry":
                    break
        except Exception as error:  # the claim's lease lets another pass retry the message
            if is_outage(error):
                log.warning("outbound delivery paused: Redis %s", type(error).__name__)
            else:
                log.exception("outbound delivery failed")
        return attempts

    def attempt(self, keys: ConversationKeys, token: str, claimed: dict) -> str:
        """Delivers one claimed message and records the outcome: 'sent', 'failed' or 'retry'."""
        outgoing = Outgoing.from_json(json.loads(claimed["message"]))
        state = json.loads(claimed["state"])
        refused = refusal(outgoing, claimed["opted_out"], claimed["last_inbound"], state["updated_at"])
        if refused is not None:
            return self.record(keys, outgoing, token, Permanent(refused.code, str(refused)), state)
        outcome: Outcome | None = None
        if state.get("maybe_accepted"):
            outcome = self.look_up(keys, outgoing, state)
        if outcome is None:
            outcome = self.delivery.send(
                outgoing.to,
                outgoing.body,
                from_=outgoing.sender,
                media_urls=outgoing.media,
                status_callback=callback_url(self.callbacks, marker(outgoing.id, keys))
                if self.callbacks
                else None,
                content_sid=outgoing.content_sid,
                content_variables=outgoing.content_variables,
            )
        return self.record(keys, outgoing, token, outcome, state)

    def look_up(self, keys: ConversationKeys, outgoing: Outgoing, state: dict) -> Outcome | None:
        """A message an earlier attempt may have handed to Twilio: its SID if a status callback
        brought it, else what ``find_sent`` finds (None: not found, send it)."""
        if state.get("sid"):
            return Accepted(state["sid"], state.get("status") or "queued")
        if outgoing.content_sid or not outgoing.body:
            return None  # no body to compare: docs/outbound.md, "A lost answer"
        since = datetime.fromtimestamp(int(state["first_attempt_at"]) / 1000, UTC)
        return self.delivery.find_sent(
            outgoing.to, outgoing.body, since, from_=outgoing.sender, exclude=self.known_sids(keys)
        )

    def known_sids(self, keys: ConversationKeys) -> set[str]:
        """The Twilio SIDs of the conversation's other outbound messages."""
        found = set()
        for name, raw in self.wired.redis.hgetall(keys.sent).items():
            if name.endswith(":s"):
                sid = json.loads(raw).get("sid")
                if sid:
                    found.add(sid)
        return found

    def record(
        self, keys: ConversationKeys, outgoing: Outgoing, token: str, outcome: Outcome, state: dict
    ) -> str:
        """Records ``outcome`` (FINISH): 'sent', 'retry', 'failed' or 'lost' (the claim was no
        longer this sender's: nothing written); a status the message reaches is counted and
        told to ``on_status``."""
        store, message_id = self.wired.store, outgoing.id
        if isinstance(outcome, Accepted):
            before, after = store.finish(keys, message_id, token, "accepted", outcome.sid, outcome.status)
            if before != "lost" and after != before:
                notify(
                    self.wired,
                    StatusUpdate(message_id, outcome.sid, after, before, outgoing.to, outgoing.sender),
                )
            return "lost" if before == "lost" else "sent"
        if isinstance(outcome, RetryLater):
            delay = self.delivery.retry_delay(int(state.get("attempts", 1)))
            retry = "1" if outcome.maybe_accepted else "0"
            before, _ = store.finish(
                keys, message_id, token, "retry", outcome.reason, retry, int(delay * 1000)
            )
            if before == "lost":
                return "lost"
            self.wired.metrics.outbound.labels("retried").inc()
            log.info("outbound message %s: retry in %.1f s (%s)", message_id, delay, outcome.reason)
            return "retry"
        code = "" if outcome.code is None else str(outcome.code)
        before, _ = store.finish(keys, message_id, token, "failed", code, outcome.message)
        if before == "lost":
            return "lost"
        log.warning("outbound message %s failed: %s %s", message_id, code, outcome.message)
        OutboundView(self.wired.redis, self.wired.keys).note_failure(keys, message_id)
        sid = state.get("sid") or ""
        notify(
            self.wired,
            StatusUpdate(
                message_id, sid, "failed", before, outgoing.to, outgoing.sender, code, outcome.message
            ),
        )
        return "failed"

    def run(self) -> None:
        """Passes until stopped: the next one at once after a pass that left due messages
        behind, else when this process queues a message (its doorbell) or after
        ``SENDER_INTERVAL``; a Redis outage only delays the next pass."""
        while not self.stopping.is_set():
            more = False
            try:
                with self.app.app_context():
                    _, more = self.one_pass()
            except Exception as error:  # the thread goes on: a bug is logged, an outage waits
                if is_outage(error):
                    log.warning("outbound pass skipped: Redis %s", type(error).__name__)
                else:
                    log.exception("outbound pass failed")
            if not more:
                self.wired.doorbell.wait(self.interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sms-sender", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.wired.doorbell.ring()
        self.pool.shutdown(wait=True)


def start_sender(app: Flask) -> Sender | None:
    """The background sender of a serving process (gunicorn's ``post_worker_init``,
    ``sms-sessions run``); none, with one log line, when no account is set to send from
    (messages then wait in their outboxes)."""
    if not app.config["TWILIO_ACCOUNT_SID"]:
        log.info("outbound sender off: TWILIO_ACCOUNT_SID is not set (queued messages wait)")
        return None
    sender = Sender(app)
    sender.start()
    return sender


@click.command("sender")
def sender_command():
    """Deliver queued outbound messages in the foreground (serving processes do it too)."""
    app = click.get_current_context().ensure_object(ScriptInfo).load_app()
    if not app.config["TWILIO_ACCOUNT_SID"]:
        raise ConfigError("TWILIO_ACCOUNT_SID is not set: the sender needs the account that sends")
    Sender(app).run()


def init_app(app: Flask) -> None:
    app.cli.add_command(sender_command)


__all__ = ["Refused", "Sender", "StatusUpdate", "notify", "sender_command", "start_sender"]
