"""SMS conversations on server-side sessions: the application factory."""

from __future__ import annotations

from flask import Flask

from . import callers, health, logs, metrics, ops, redis_client, responses, settings, signature, webhook
from .conversations import ConversationStore
from .keys import Keys
from .sessions import ConversationSessionInterface


def create_app(test_config: dict | None = None) -> Flask:
    """Builds the app from the environment; ``test_config`` overrides single settings.

    Raises ``settings.ConfigError`` (one line naming the variable) on a setting it refuses.
    """
    app = Flask(__name__)
    logs.init_app(app)
    app.config.from_mapping(settings.load())
    if test_config:
        app.config.from_mapping(test_config)
    settings.check(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    app.config["SESSION_COOKIE_NAME"] = "sms_session"

    redis_client.init_app(app)
    client = app.extensions["redis"]
    app.extensions["keys"] = Keys(app.config["REDIS_KEY_PREFIX"])
    metrics.init_app(app)
    app.extensions["conversations"] = ConversationStore(
        client,
        ttl=app.config["CONVERSATION_TTL"],
        lock_ttl=app.config["LOCK_TTL"],
        lock_wait=app.config["LOCK_WAIT"],
        replies_kept=app.config["REPLIES_KEPT"],
        on_lock_wait=app.extensions["metrics"].lock_wait.observe,
        wait_replicas=app.config["REDIS_WAIT_REPLICAS"],
        wait_ms=max(1, int(app.config["REDIS_TIMEOUT"] * 500)),  # answers before the read timeout
    )
    app.extensions["conversations"].preload()
    app.session_interface = ConversationSessionInterface(app, client, app.extensions["conversations"])

    callers.init_app(app)
    signature.init_app(app)
    responses.init_app(app)
    health.init_app(app)
    webhook.init_app(app)
    ops.init_app(app)
    return app


def check_environment() -> None:
    """What ``create_app`` would refuse, found without building the app (gunicorn's master
    runs it once, so a refusal is one line instead of a traceback per worker)."""
    config = settings.load()
    settings.check(config)
    redis_client.check(config)
    callers.Callers.from_file(config["CALLERS_FILE"])
