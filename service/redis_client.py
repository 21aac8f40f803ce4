"""The Redis client, built once per app from ``REDIS_URL``; its scheme picks the topology.

- ``redis://``, ``rediss://``, ``unix://``: one server (``redis.Redis.from_url``).
- ``redis+sentinel://host:port[,host:port…]/service_name[/db]``: the master that Sentinel names
  (``Sentinel.master_for``); after a failover new connections ask Sentinel again.
- ``redis+cluster://host:port[,host:port…]``: ``RedisCluster``, which routes each script by
  the hash tag its keys share.

Short socket timeouts turn a dead or stalled Redis into a fast 503 instead of a hung worker.
One retry on a connection error lets a pooled
connection that Redis closed (restart, failover) reconnect transparently. Timeouts are not
retried, since a script may already have run (RedisCluster retries them once on its own; the
scripts are safe to run twice).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import redis
from flask import Flask
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Encoder, parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .settings import ConfigError

# What every module that talks to Redis is handed: a redis.Redis (one server, a Sentinel-managed
# master, or fakeredis, a subclass) or a RedisCluster. Any to mypy: redis-py's stubs give every
# command's reply as `Awaitable[Any] | Any` (sync and asyncio clients share them), which would
# take a cast at each call; the name is for the reader and the signatures.
Client: TypeAlias = Any

log = logging.getLogger(__name__)

# What a Redis outage can raise: RedisCluster's own exceptions (no node reachable, slot not
# covered) do not derive from RedisError. Every one of them answers 503 (and so does whatever
# else redis-py raises from its own code: ``is_outage``).
UNAVAILABLE = (redis.RedisError, RedisClusterException)
REDIS_PY = os.path.dirname(os.path.abspath(redis.__file__)) + os.sep


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` is Redis failing, not a bug of the caller's: one of ``UNAVAILABLE``, or
    any other exception raised inside redis-py's own code. A failover closes connections under
    other threads (RedisCluster resets its nodes' pools, in-use connections included), and
    redis-py then fails in ways of its own: hiredis' reader gone in the middle of a read is
    ``AttributeError: 'NoneType' object has no attribute 'feed'`` (redis-py issue 2967). The
    one place such errors are told from a bug: a request answers 503 for them (``responses``),
    the sweeper and the end hooks skip a round."""
    if isinstance(error, UNAVAILABLE):
        return True
    if not isinstance(error, Exception):
        return False
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and os.path.abspath(trace.tb_frame.f_code.co_filename).startswith(REDIS_PY)


SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_PORTS = {SENTINEL_SCHEME: 26379, CLUSTER_SCHEME: 6379}


class SentinelMasterConnection(SentinelManagedConnection):
    """A connection to Sentinel's master that also leaves a master refusing NOREPLICAS.

    redis-py already re-asks Sentinel when the old master answers READONLY (demoted). With
    ``min-replicas-to-write`` set, a master whose replica was just promoted refuses writes with
    NOREPLICAS for the seconds before Sentinel demotes it: that too means "ask Sentinel again",
    so it becomes a ConnectionError, which the retry policy turns into a fresh connection.
    """

    def read_response(self, *args, **kwargs):
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as error:
            if self.connection_pool.is_master and str(error).startswith("NOREPLICAS"):
                self.disconnect()
                raise redis.ConnectionError("the master lost its replicas") from error
            raise


def connect(url: str | None, timeout: float) -> Client:
    """A client for ``url`` (its form already passed ``check``); ``None`` means the embedded
    in-memory store (fakeredis)."""
    if not url:
        import fakeredis

        log.warning(
            "REDIS_URL is not set: using the embedded in-memory store (state is lost "
            "on exit and not shared between processes)"
        )
        return fakeredis.FakeRedis(decode_responses=True, encoding_errors="replace")
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "replace",  # bytes planted by hand must not crash a decode
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    scheme = url.partition("://")[0].lower()
    if scheme in SINGLE_SCHEMES:
        return redis.Redis.from_url(url, retry=retry, **options)
    if scheme == SENTINEL_SCHEME:
        nodes, credentials, path = _parse_multi_host(url)
        service, db = _sentinel_path(path)
        sentinel = Sentinel(
            nodes, sentinel_kwargs={k: v for k, v in options.items() if k.startswith("socket_")}
        )
        return sentinel.master_for(
            service, connection_class=SentinelMasterConnection, db=db, retry=retry, **credentials, **options
        )
    if scheme == CLUSTER_SCHEME:
        nodes, credentials, _ = _parse_multi_host(url)
        lazy = LazyCluster(
            lambda: RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                retry=retry,
                **credentials,
                **options,
            )
        )
        try:
            return lazy.client()
        except redis.AuthenticationError:
            return lazy  # not an outage: check_credentials says what it is
        except UNAVAILABLE as error:
            log.warning(
                "no Redis Cluster node answered at start (%s); answering 503 until one does",
                type(error).__name__,
            )
            return lazy
    raise AssertionError("check lets no other scheme through")


class LazyCluster:
    """A RedisCluster that is built on first use, for a worker started during a Cluster outage.

    redis-py's RedisCluster must reach a node to be built. Failing the worker's boot instead
    would stop gunicorn altogether; this way the worker serves 503s (and ``/healthz``) and
    builds the client when a node answers. Scripts are registered here so that their SHA needs
    no connection (the encoder matches the client's options).
    """

    def __init__(self, build):
        self._build = build
        self._client = None
        self._lock = threading.Lock()

    def client(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    def get_encoder(self) -> Encoder:
        return Encoder(encoding="utf-8", encoding_errors="replace", decode_responses=True)

    def register_script(self, script: str) -> Script:
        return Script(cast(redis.Redis, self), script)  # Script only asks for get_encoder()

    def close(self) -> None:
        """Closes the client if it was built (never builds one to close it)."""
        with self._lock:
            if self._client is not None:
                self._client.close()

    def __getattr__(self, name):
        return getattr(self.client(), name)


def _parse_multi_host(url: str) -> tuple[list[tuple[str, int]], dict[str, Any], str]:
    """``scheme://[user:password@]host:port,host:port/path`` → nodes, credentials, path.

    Messages never repeat the URL: it may hold a password.
    """
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if "?" in rest or "#" in rest:
        raise ConfigError(f"REDIS_URL: {scheme}:// takes no query options")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    credentials: dict[str, Any] = {}
    if at:
        username, colon, password = userinfo.partition(":")
        if username:
            credentials["username"] = unquote(username)
        if colon:
            credentials["password"] = unquote(password)
    nodes = []
    for item in hosts.split(","):
        try:
            parts = urlsplit("//" + item.strip())
            host, port = parts.hostname, parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            host = None
        if not host:
            raise ConfigError(f"REDIS_URL: {scheme}:// needs host:port[,host:port…], got {item!r}")
        nodes.append((host, port))
    return nodes, credentials, slash + path


def _cluster_path(path: str) -> None:
    if path.strip("/") not in ("", "0"):
        raise ConfigError("REDIS_URL: a Redis Cluster has only database 0")


def _sentinel_path(path: str) -> tuple[str, int]:
    parts = [part for part in path.split("/") if part]
    if not parts or len(parts) > 2:
        raise ConfigError("REDIS_URL: redis+sentinel:// needs /service_name[/db] after the hosts")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ConfigError("REDIS_URL: the database after the service name must be a number") from None
    return unquote(parts[0]), db


def is_cluster(url: str | None) -> bool:
    return url is not None and url.partition("://")[0].lower() == CLUSTER_SCHEME


def check(config) -> None:
    """What ``connect`` would refuse about ``REDIS_URL`` (and ``REDIS_WAIT_REPLICAS`` with it),
    found without connecting: gunicorn's master runs it once, so a bad URL is one line."""
    url = config["REDIS_URL"]
    scheme = url.partition("://")[0].lower() if url else ""
    if not url:
        try:
            import fakeredis  # noqa: F401  (a development extra: not in the production image)
        except ImportError:
            raise ConfigError(
                "REDIS_URL is not set and the embedded in-memory store is not "
                "installed (pip install 'sms-sessions[dev]')"
            ) from None
    elif scheme in SINGLE_SCHEMES:
        try:
            parse_url(url)
        except ValueError as error:
            raise ConfigError(f"REDIS_URL: {error}") from None
        database = urlsplit(url).path.strip("/") if scheme != "unix" else ""  # unix: ?db=N
        if database and not (database.isascii() and database.isdigit()):
            # redis-py would quietly use db 0 for a path it cannot read as a number
            raise ConfigError("REDIS_URL: the database after the host must be a number, as in /0")
    elif scheme == SENTINEL_SCHEME:
        _sentinel_path(_parse_multi_host(url)[2])
    elif scheme == CLUSTER_SCHEME:
        _cluster_path(_parse_multi_host(url)[2])
    elif url:
        raise ConfigError(
            f"REDIS_URL: unknown scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in (*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME))
        )
    if config["REDIS_WAIT_REPLICAS"] and not scheme:
        raise ConfigError("REDIS_WAIT_REPLICAS: needs a REDIS_URL (the embedded store has no replicas)")


def check_credentials(config, client: Client | None = None) -> None:
    """Credentials Redis turns down (wrong or missing password, unknown user) are a bad
    setting, not an outage: refused in production (one line naming ``REDIS_URL``, never the
    password), a warning in development. Without this the service started and answered 503
    forever. A Redis that does not answer at all is not judged: 503s until it does.

    Pings with ``client``, or (gunicorn's master) with a client of its own, closed before
    any worker is forked.
    """
    if not config["REDIS_URL"]:
        return
    own = client is None
    if client is None:
        client = connect(config["REDIS_URL"], config["REDIS_TIMEOUT"])
    try:
        client.ping()
    except redis.AuthenticationError as error:
        problem = f"REDIS_URL: Redis refused the credentials ({error})"
        if config["APP_ENV"] == "production":
            raise ConfigError(problem) from None
        log.warning(problem)
    except UNAVAILABLE:
        pass
    finally:
        if own:
            client.close()


def init_app(app: Flask) -> Client:
    """The app's client: ``redis.Redis``, a Sentinel-managed one, or ``RedisCluster``."""
    check(app.config)
    client = connect(app.config["REDIS_URL"], app.config["REDIS_TIMEOUT"])
    check_credentials(app.config, client)
    return client
