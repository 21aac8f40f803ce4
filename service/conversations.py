"""The app's conversations: the store, key names and operators' view it wires."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

from . import callers, handler, metrics, redis_client
from .clock import now_ms
from .keys import Keys
from .redis_client import is_cluster
from .store import ConversationStore, decode_state

if TYPE_CHECKING:
    from .active import ActiveConversations

__all__ = ["decode_state", "now_ms"]


def init_app(app: Flask) -> None:
    """The conversations' key names, store, operators' view and Flask session interface."""
    from .active import ActiveConversations
    from .sessions import ConversationSessionInterface

    config = app.config
    client = redis_client.client(app)
    keys = Keys(config["REDIS_KEY_PREFIX"], cluster=is_cluster(config["REDIS_URL"]))
    store = ConversationStore.from_config(
        client,
        config,
        hooks=handler.end_hook(app) is not None,
        on_lock_wait=metrics.current(app).lock_wait.observe,
    )
    store.preload()
    app.extensions["sms.keys"] = keys
    app.extensions["sms.store"] = store
    ended = metrics.current(app).conversations_ended.labels("operator")
    app.extensions["sms.active"] = ActiveConversations(client, keys, store, callers.directory(app), ended.inc)
    app.session_interface = ConversationSessionInterface(store, keys, config["CONVERSATION_TTL"])


def keys(app: Flask | None = None) -> Keys:
    return (app or current_app).extensions["sms.keys"]


def store(app: Flask | None = None) -> ConversationStore:
    return (app or current_app).extensions["sms.store"]


def active(app: Flask | None = None) -> ActiveConversations:
    """The operators' view of live conversations (CLI, API, metrics)."""
    return (app or current_app).extensions["sms.active"]
