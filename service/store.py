"""The Redis client, built once per app from ``REDIS_URL``.

Short socket timeouts turn a dead or stalled Redis into a fast 503 instead of a hung worker;
one retry on a connection error lets a pooled connection that Redis closed (restart) reconnect
transparently. Timeouts are not retried: a script may already have run.
"""

from __future__ import annotations

import logging

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def connect(url: str | None, timeout: float):
    """A client for ``url``; ``None`` means the embedded in-memory store (fakeredis)."""
    if not url:
        import fakeredis

        log.warning("REDIS_URL is not set: using the embedded in-memory store (state is lost "
                    "on exit and not shared between processes)")
        return fakeredis.FakeRedis(decode_responses=True, encoding_errors="replace")
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="replace",  # bytes planted by hand must not crash a decode
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


def init_app(app) -> None:
    app.extensions["redis"] = connect(app.config["REDIS_URL"], app.config["REDIS_TIMEOUT"])
