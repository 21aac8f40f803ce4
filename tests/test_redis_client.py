"""Choosing the topology from REDIS_URL, and failing at start rather than guessing."""

from __future__ import annotations

import select

import pytest
import redis
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.sentinel import SentinelConnectionPool

from service.redis_client import SentinelMasterConnection, connect
from service.settings import ConfigError
from service.wiring import current
from tests.support.app import make_app, post_signed, webhook_params
from tests.support.ports import BUS_OFFSET, ephemeral_range, free_cluster_port
from tests.support.programs import require_redis_tools
from tests.support.waiting import wait_until


@pytest.mark.parametrize(
    "url, connection",
    [
        ("redis://127.0.0.1:6390/0", Connection),
        ("rediss://127.0.0.1:6390/0", SSLConnection),
        ("unix:///tmp/redis.sock?db=0", UnixDomainSocketConnection),
    ],
)
def test_single_server_schemes_build_a_plain_client(url, connection):
    client = connect(url, 0.5)
    assert type(client) is redis.Redis
    assert client.connection_pool.connection_class is connection
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.5
    assert kwargs["decode_responses"] is True


def test_a_stalled_redis_times_out_without_a_retry_and_the_connection_serves_again(redis_url, redis_client):
    """A stalled Redis is a TimeoutError within REDIS_TIMEOUT, not retried (a script may have
    run), and the connection serves again once Redis answers."""
    client = connect(redis_url, 0.3)
    assert client.ping()
    connections = redis_client.info("stats")["total_connections_received"]
    redis_client.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    with pytest.raises(redis.TimeoutError):
        client.get("paused")
    redis_client.execute_command("CLIENT", "UNPAUSE")
    # a ConnectionError would have been retried on a fresh connection
    assert redis_client.info("stats")["total_connections_received"] == connections
    assert client.set("after", "1")
    assert client.get("after") == "1"


def test_a_pooled_connection_with_unread_data_is_replaced(redis_url):
    """redis-py checks a pooled connection before lending it: one left with an unread reply is
    dropped for a fresh one, not read from."""
    client = connect(redis_url, 0.3)
    client.mset({"k": "v", "stale": "left unread"})
    connection = client.connection_pool.get_connection()
    connection.send_command("GET", "stale")  # its reply left unread
    assert select.select([connection._sock], [], [], 5)[0]  # and already there to be found
    client.connection_pool.release(connection)
    assert client.get("k") == "v"  # read from that connection, this would be "left unread"


def test_sentinel_url_names_sentinels_service_db_and_credentials():
    client = connect("redis+sentinel://:s%40cret@127.0.0.1:26390,[::1]:26391/sms/2", 0.25)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "sms"
    assert pool.connection_class is SentinelMasterConnection
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "s@cret"
    assert pool.connection_kwargs["socket_timeout"] == 0.25
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("127.0.0.1", 26390), ("::1", 26391)]
    assert all(s.get("password") is None and s["socket_timeout"] == 0.25 for s in sentinels)


def test_sentinel_default_port_and_db():
    pool = connect("redis+sentinel://127.0.0.1/sms", 0.5).connection_pool
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["port"] == 26379
    assert pool.connection_kwargs["db"] == 0


@pytest.mark.parametrize(
    "url, says",
    [
        ("memcached://127.0.0.1:11211", "unknown scheme"),
        ("redis+sentinel://127.0.0.1:26379", "/service_name"),
        ("redis+sentinel://127.0.0.1:26379/sms/x", "must be a number"),
        ("redis+sentinel://127.0.0.1:26379/a/1/extra", "/service_name"),
        ("redis+sentinel://127.0.0.1:notaport/sms", "host:port"),
        ("redis+sentinel://127.0.0.1:26379,/sms", "host:port"),
        ("redis+sentinel://127.0.0.1:26379/sms?ssl=1", "no query"),
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis://127.0.0.1:notaport/0", "REDIS_URL"),
    ],
)
def test_malformed_url_stops_start_up_naming_redis_url(url, says):
    with pytest.raises(ConfigError) as raised:
        make_app(REDIS_URL=url.replace("127.0.0.1", "user:hunter2@127.0.0.1", 1))
    message = str(raised.value)
    assert message.startswith("REDIS_URL")
    assert says in message
    assert "\n" not in message
    assert "hunter2" not in message


@pytest.mark.slow
def test_cluster_test_ports_and_their_bus_ports_are_below_the_ephemeral_range():
    """The suite's Cluster nodes listen on a port and its bus port (+10000): both must stay out
    of the range every outgoing connection takes its port from, or another suite's client can
    hold one between the check and redis-server's bind."""
    low, _ = ephemeral_range()
    ports = [free_cluster_port() for _ in range(50)]
    assert all(port + BUS_OFFSET < low for port in ports)


def test_a_worker_started_while_no_cluster_node_answers_serves_503_then_recovers(redis_processes):
    """Failing the boot would stop gunicorn; instead the worker answers 503 until a node does."""
    require_redis_tools()
    port = free_cluster_port()
    app = make_app(REDIS_URL=f"redis+cluster://127.0.0.1:{port}")
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert post_signed(client, webhook_params()).status_code == 503

    node = redis_processes("--cluster-enabled", "yes", "--save", "", "--appendonly", "no", port=port)
    node.client().execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)  # a one-node cluster
    wait_until(
        lambda: node.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok",
        what="cluster_state:ok",
    )
    assert client.get("/readyz").status_code == 200
    assert b"Thanks" in post_signed(client, webhook_params()).data
    assert b"2 times" in post_signed(client, webhook_params()).data


@pytest.mark.parametrize(
    "error",
    [
        SlotNotCoveredError("slot 7 is not covered"),
        RedisClusterException("all nodes failed"),
        redis.ConnectionError("refused"),
    ],
)
@pytest.mark.parametrize("step", ["_open", "_save"])
def test_cluster_and_connection_errors_answer_503_not_500(fake_app, monkeypatch, error, step):
    store = current(fake_app).store
    script, evalsha = getattr(store, step), store.client.evalsha

    def fail(sha, *args):  # the client fails running this step's script
        if sha == script.sha:
            raise error
        return evalsha(sha, *args)

    monkeypatch.setattr(store.client, "evalsha", fail)
    response = post_signed(fake_app.test_client(), webhook_params())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"


def test_waiting_for_replicas_needs_redis():
    with pytest.raises(ConfigError, match="^REDIS_WAIT_REPLICAS"):
        make_app(REDIS_WAIT_REPLICAS=1)  # the embedded store has no replicas


def test_a_save_no_replica_confirms_answers_503_and_is_not_counted(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, REDIS_WAIT_REPLICAS=1, REDIS_TIMEOUT=0.2)
    response = post_signed(app.test_client(), webhook_params())
    assert response.status_code == 503  # the session server has no replica: WAIT returns 0
    assert redis_client.keys("sms:conv:*") == []
