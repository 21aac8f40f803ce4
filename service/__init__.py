"""SMS conversations on server-side sessions: the application factory."""

from __future__ import annotations

from flask import Flask

from . import (
    console,
    delivery,
    health,
    lifecycle,
    limits,
    logs,
    metrics,
    ops,
    redis_client,
    responses,
    sender,
    settings,
    signature,
    status,
    webhook,
    wiring,
)
from . import handler as handlers
from .accounts import Accounts
from .callers import Callers
from .handler import Conversation, EndHook, Handler, Message
from .outbox import Refused
from .sending import Sent, send

__all__ = ["Conversation", "Message", "Refused", "Sent", "check_environment", "create_app", "send"]


def create_app(
    test_config: dict | None = None, *, handler: Handler | None = None, on_end: EndHook | None = None
) -> Flask:
    """Builds the app from the environment; ``test_config`` overrides single settings,
    ``handler`` is the conversation logic (else ``SMS_HANDLER``, else the counter) and
    ``on_end`` its end hook (else the handler module's ``on_end``, if it has one).

    Raises ``settings.ConfigError`` (one line naming the variable) on a setting it refuses.
    """
    app = Flask(__name__, static_folder=None)  # service/static is the console's, served by it
    settings.init_app(app, test_config)
    logs.init_app(app)  # after the settings: it needs LOG_FORMAT
    limits.init_app(app)
    redis = redis_client.init_app(app)
    callers = Callers.from_file(app.config["CALLERS_FILE"])
    handle, end_hook = handlers.choose(app.config, handler, on_end)
    on_status = handlers.status_hook(handle)
    webhook.init_app(app)  # before signature's ProxyFix, so that its layer sees the client's address
    known = Accounts.from_config(app.config)
    signature.init_app(app, known)
    wired = wiring.init_app(app, redis, callers, handle, end_hook, known, on_status)
    metrics.init_app(app, wired.metrics)
    lifecycle.init_app(app)
    responses.init_app(app)
    health.init_app(app)
    status.init_app(app)
    sender.init_app(app)
    ops.init_app(app)
    console.init_app(app)
    return app


def check_environment() -> dict:
    """What ``create_app`` would refuse, found without building the app (gunicorn's master
    runs it once, so a refusal is one line instead of a traceback per worker); the settings."""
    config = settings.load()
    settings.check(config)
    redis_client.check(config)
    if config["APP_ENV"] == "production":  # in development each worker warns instead
        redis_client.check_credentials(config)
    Callers.from_file(config["CALLERS_FILE"])
    handlers.load(config["SMS_HANDLER"])
    if config["TWILIO_ACCOUNT_SID"]:  # the workers' senders would each fail on it
        delivery.client(config)
    return config
