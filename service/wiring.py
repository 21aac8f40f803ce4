"""What the app is wired from, in one typed object: ``app.extensions["sms"]``, read through
``current()`` (by the views, the sweeper, the CLI, tests and bench/ alike).

Imports run one way: the parts (store, keys, metrics, the operators' view, history, callers,
handler, Redis client, accounts, signature check) know nothing of this module; what reads the wiring
(webhook, health, ops, console, lifecycle) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask, current_app

from .accounts import Accounts
from .callers import Callers
from .forget import Forgetting
from .handler import EndHook, Handler, StatusHook
from .handoff import Handoffs
from .history import History
from .keys import Keys
from .live import LiveConversations
from .metrics import Metrics, multiprocess
from .numbers_hash import NumberHash
from .outbound_view import OutboundView
from .outbox import Doorbell, WebhookLoad
from .redis_client import Client, is_cluster
from .runs import Runs
from .sessions import ConversationSessionInterface
from .signature import SignatureCheck
from .store import ConversationStore
from .throttle import Throttle
from .transcripts import Settings as TranscriptSettings
from .transcripts import Transcripts

EXTENSION = "sms"


@dataclass
class Wiring:
    """Everything a request, the sweeper or a command needs, built once per app."""

    redis: Client
    keys: Keys
    store: ConversationStore
    live: LiveConversations  # the operators' view of live conversations (CLI, API, console)
    history: History  # events, samples, the minute tallies
    handler: Handler
    on_end: EndHook | None
    metrics: Metrics
    callers: Callers
    accounts: Accounts  # each Twilio account's tokens and signing keys
    signature: SignatureCheck
    throttle: Throttle  # wrong operators' tokens, slowed per client address
    runs: Runs  # where handlers run; slow ones finish past the webhook
    transcripts: Transcripts  # what was said, when TRANSCRIPTS=1
    number_hash: NumberHash  # EVENTS_NUMBERS=hashed's hash of a number (None when plain)
    forgetting: Forgetting  # forget a number on request
    handoffs: Handoffs  # operators taking conversations over from the bot
    on_status: StatusHook | None = None  # the handler module's on_status (service/status.py)
    doorbell: Doorbell = field(default_factory=Doorbell)  # rung when this process queues outbound
    webhook_load: WebhookLoad = field(default_factory=WebhookLoad)  # what the sender yields to


def current(app: Flask | None = None) -> Wiring:
    """The wiring of ``app`` (default: the current app)."""
    return (app or current_app).extensions[EXTENSION]


def init_app(
    app: Flask,
    redis: Client,
    callers: Callers,
    handler: Handler,
    on_end: EndHook | None,
    accounts: Accounts,
    on_status: StatusHook | None = None,
) -> Wiring:
    """Builds the app's parts from its config and Redis client, and Flask's session interface
    on the store (the conversation is ``flask.session`` during a webhook)."""
    config = app.config
    keys = Keys(config["REDIS_KEY_PREFIX"], cluster=is_cluster(config["REDIS_URL"]))
    # The gauges read the operators' view and the history when scraped, once both are built.
    metrics = Metrics(
        lambda: live.count(),
        lambda: history.stats(),
        multiprocess(),
        lambda: handoffs.waiting_gauge(),
        OutboundView(redis, keys).backlog,
    )
    number_hash = NumberHash.from_config(config)
    store = ConversationStore.from_config(
        redis,
        config,
        hooks=on_end is not None,
        on_lock_wait=metrics.lock_wait.observe,
        number_hash=number_hash,
    )
    store.preload()
    operator_ended = metrics.conversations_ended.labels("operator")
    live = LiveConversations(redis, keys, store, callers, operator_ended.inc)
    history = History(redis, keys)
    handoffs = Handoffs(redis, keys, store, metrics, config)
    signature = SignatureCheck(config, accounts, metrics.signature_keys)
    doorbell = Doorbell()
    sessions = ConversationSessionInterface(
        store, keys, config["CONVERSATION_TTL"], metrics, TranscriptSettings.from_config(config), doorbell
    )
    wiring = Wiring(
        redis,
        keys,
        store,
        live,
        history,
        handler,
        on_end,
        metrics,
        callers,
        accounts,
        signature,
        Throttle(metrics.sign_in_failures),
        Runs(lambda: wiring.handler, config, store, sessions, keys, callers, metrics.handler_timeouts.inc),
        Transcripts(redis, keys),
        number_hash,
        Forgetting(redis, keys, number_hash, config["SWEEP_INTERVAL"] * 2),
        handoffs,
        on_status,
        doorbell,
    )
    app.extensions[EXTENSION] = wiring
    app.session_interface = sessions
    return wiring
