"""REDIS_WAIT_REPLICAS on a Redis Cluster whose masters each have a replica: a master killed
(``kill -9``) fails over to its replica without losing a message answered 200, nor one whose
handler runs past the webhook across the failover.

Each script is pipelined with ``WAIT`` on the connection of the master that ran it, so a 200
is only sent once the replica holds the write; the promoted replica then has every message
answered 200. It has no replica of its own until the old master comes back as one, and
answers 503 meanwhile (as Sentinel with ``min-replicas-to-write``): Twilio redelivers.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from redis.cluster import RedisCluster

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.simulator import TwilioSimulator, new_message_sid
from tests.support import redis_servers
from tests.support.app import TOKEN, make_app
from tests.support.app_servers import LiveServer
from tests.support.numbers import OURS
from tests.support.programs import require_redis_tools
from tests.support.waiting import wait_until
from tests.test_webhook import count_in

pytestmark = pytest.mark.slow  # six redis-server processes, a failover

KEYS = Keys()
SENDERS = [f"+1555986{tag:04d}" for tag in range(0, 100, 9)]  # 12 tags, over every master
RETRIES = 160  # a redelivery every 0.25 s for 40 s at most


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory):
    require_redis_tools()
    with redis_servers.redis_cluster(tmp_path_factory.mktemp("cluster-replicated"), replicas=1) as cluster:
        yield cluster


def owner(client: RedisCluster, sender: str) -> int | None:
    """The port of the master that owns ``sender``'s slot, as the Cluster says now."""
    try:
        client.nodes_manager.initialize()
    except Exception:  # noqa: BLE001 (mid-failover, any node may fail to answer)
        return None
    return client.get_node_from_key(KEYS.conversation(sender, OURS).conversation).port


def deliver(twilio: TwilioSimulator, sender: str, attempts: list[int]) -> int:
    """One message, redelivered with the same MessageSid on 503 as Twilio does."""
    message_sid = new_message_sid()
    for _ in range(RETRIES):
        delivery = twilio.send(sender, OURS, "hello", message_sid=message_sid)
        attempts.append(delivery.status)
        if delivery.status != 503:
            assert delivery.status == 200, delivery.body
            return count_in(delivery.reply)
        time.sleep(0.25)
    raise AssertionError("still 503 after every redelivery")


def test_a_master_failover_loses_no_message_answered_200(replicated_cluster):
    cluster = replicated_cluster
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
    victim_port = owner(client, SENDERS[0])
    victim = next(node for node in cluster.nodes if node.port == victim_port)
    app = make_app(REDIS_URL=cluster.url, REDIS_WAIT_REPLICAS=1)
    counts: dict[str, list[int]] = {sender: [] for sender in SENDERS}
    attempts: list[int] = []
    failures: list[AssertionError] = []
    failed_over = threading.Event()
    with LiveServer(app) as server:

        def converse(sender: str) -> None:
            twilio = TwilioSimulator(server.url, TOKEN)
            try:
                while not failed_over.is_set() or len(counts[sender]) < 40:
                    counts[sender].append(deliver(twilio, sender, attempts))
                    assert len(counts[sender]) < 2000, "the failover never ended"
            except AssertionError as failure:
                failures.append(failure)
                failed_over.set()

        threads = [threading.Thread(target=converse, args=(sender,)) for sender in SENDERS]
        for thread in threads:
            thread.start()
        wait_until(lambda: min(len(c) for c in counts.values()) >= 5, seconds=60, what="5 messages each")
        victim.kill()  # kill -9: its replica is promoted after cluster-node-timeout
        promoted = lambda: owner(client, SENDERS[0]) not in (None, victim_port)  # noqa: E731
        wait_until(promoted, seconds=60, what="the replica promoted")
        victim.start()  # back, as the new master's replica
        synced = lambda: redis_servers.replicas_in_sync(victim) == 0  # noqa: E731
        wait_until(synced, seconds=60, what="the old master syncing as a replica")
        failed_over.set()
        for thread in threads:
            thread.join(timeout=120)
    assert all(not thread.is_alive() for thread in threads)
    assert failures == []
    assert 503 in attempts  # the failover was felt
    for sender, replies in counts.items():
        assert replies == list(range(1, len(replies) + 1)), sender  # no 200 lost, none doubled
        stored = client.hget(KEYS.conversation(sender, OURS).conversation, "seq")
        assert int(stored) == len(replies), sender
    client.close()


def test_readiness_waits_for_the_replicas_of_a_cluster_master(replicated_cluster):
    """/readyz confirms its write with WAIT on the master that took it: ready with as many
    replicas as each master has, not with more."""
    for wanted, status in ((1, 200), (2, 503)):
        app = make_app(REDIS_URL=replicated_cluster.url, REDIS_WAIT_REPLICAS=wanted)
        assert app.test_client().get("/readyz").status_code == status, wanted


def test_a_slow_handler_across_a_failover_commits_once_and_the_next_message_follows(replicated_cluster):
    """A handler past its budget while the master of its conversation's slot is killed and its
    replica promoted: its message and the one queued behind it were confirmed by the replica
    before Twilio was answered, so the new master has them; the run's save either lands or,
    refused (its lease lapsed) or failed, the sweeper runs the message again. Either way each
    commits once, in order."""
    cluster = replicated_cluster
    go = threading.Event()
    calls: list[str] = []

    def handle(message, conversation):
        calls.append(message.body)
        if message.body == "slow":
            go.wait(60)
        conversation.setdefault("bodies", []).append(message.body)
        return "ok"

    sender = "+15559870042"
    keys = KEYS.conversation(sender, OURS)
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
    victim_port = owner(client, sender)
    victim = next(node for node in cluster.nodes if node.port == victim_port)
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": cluster.url,
            "REDIS_WAIT_REPLICAS": 1,
            "HANDLER_INLINE_BUDGET": 0.1,
            "LOCK_TTL": 2.0,
        },
        handler=handle,
    )
    twilio = TwilioSimulator.for_app(app)
    assert twilio.send(sender, OURS, "slow").body.endswith("<Response />")
    assert twilio.send(sender, OURS, "after").body.endswith("<Response />")
    victim.kill()  # kill -9: its replica is promoted after cluster-node-timeout
    promoted = lambda: owner(client, sender) not in (None, victim_port)  # noqa: E731
    wait_until(promoted, seconds=60, what="the replica promoted")
    victim.start()  # back, as the new master's replica: writes are confirmed again
    wait_until(lambda: redis_servers.replicas_in_sync(victim) == 0, seconds=60, what="the old master synced")
    go.set()

    def both_saved() -> bool:
        try:
            Sweeper(app).sweep()  # claims the message if its save was lost to the failover
            client.nodes_manager.initialize()
            stored = client.hget(keys.conversation, "state")
        except Exception:  # noqa: BLE001 (mid-failover: ask again)
            return False
        return stored is not None and len(json.loads(stored)["bodies"]) == 2

    wait_until(both_saved, seconds=60, what="both messages saved on the new master")
    assert json.loads(client.hget(keys.conversation, "state"))["bodies"] == ["slow", "after"]
    assert client.hget(keys.conversation, "seq") == "2"
    assert not client.exists(keys.inbound)
    assert calls[-1] == "after"
    client.close()
