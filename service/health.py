"""Liveness and readiness for orchestrators and load balancers.

``/healthz``: the process serves requests; it never touches Redis, so a Redis outage does not
get healthy workers restarted. ``/readyz``: a message could be saved now, i.e. Redis takes a
write (confirmed by ``REDIS_WAIT_REPLICAS`` replicas, when set); 503 while it does not, so
traffic (and docker-compose's healthcheck) waits for it.

A PING is not enough: a Redis out of memory under ``noeviction`` (OOM), a read-only replica
(READONLY) or a master short of its ``min-replicas-to-write`` (NOREPLICAS) answers PING and
refuses every save (only a failed snapshot, MISCONF, refuses PING too). So the probe writes
one key and deletes it (two commands, not pipelined, so that Redis' refusal comes
back as it is; the key expires within a second should the DEL never arrive).
"""

import logging

import redis
from flask import Blueprint, Flask

from .logs import report
from .redis_client import is_outage
from .wiring import current

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    wired = current()
    key, store = wired.keys.readiness, wired.store
    try:
        # SET is refused under OOM (DEL alone would not be). With REDIS_WAIT_REPLICAS, a save
        # needs that many replicas to confirm it (else 503): WAIT on the connection that wrote
        # (on a Cluster, that of the master owning the key).
        confirmed = 0
        if store.wait_replicas:
            pipe = store.confirming(key)
            pipe.set(key, "1", px=1000)
            pipe.delete(key)
            pipe.wait(store.wait_replicas, store.wait_ms)
            confirmed = pipe.execute()[-1]
        else:
            wired.redis.set(key, "1", px=1000)
            wired.redis.delete(key)
    except Exception as error:  # redis_client.is_outage: redis-py's own failures too
        if not is_outage(error):
            raise
        wired.metrics.count_redis_error()
        report(log, f"not ready: Redis {refusal(error)}")
        return {"status": "unavailable", "redis": refusal(error)}, 503
    if confirmed < store.wait_replicas:
        report(log, f"not ready: {confirmed} of REDIS_WAIT_REPLICAS={store.wait_replicas} replicas confirmed")
        return {"status": "unavailable", "replicas": f"{confirmed} of {store.wait_replicas} confirmed"}, 503
    return {"status": "ready"}


def refusal(error: Exception) -> str:
    """The error's class, and for a plain ResponseError Redis' own code (``MISCONF``…)."""
    name = type(error).__name__
    if type(error) is redis.ResponseError and str(error):
        return f"{name} {str(error).split()[0]}"
    return name


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
