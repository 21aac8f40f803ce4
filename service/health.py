"""Liveness and readiness for orchestrators and load balancers.

``/healthz``: the process serves requests; it never touches Redis, so a Redis outage does not
get healthy workers restarted. ``/readyz``: Redis answers a PING; 503 while it does not, so
traffic (and docker-compose's healthcheck) waits for it.
"""

import logging

from flask import Blueprint, Flask

from . import redis_client
from .logs import report
from .metrics import count_redis_error
from .redis_client import UNAVAILABLE

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    try:
        redis_client.client().ping()
    except UNAVAILABLE as error:
        count_redis_error()
        report(log, f"not ready: Redis {type(error).__name__}")
        return {"status": "unavailable", "redis": type(error).__name__}, 503
    return {"status": "ready"}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
