"""The webhook on a 3-master Redis Cluster started by the suite: same code, same exactness.

Every key of a conversation, and its index shard, carry the sender's two-digit hash tag, so
each script runs on the one master that owns that slot.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from redis.cluster import RedisCluster

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.sender import Sender
from service.simulator import TwilioSimulator, new_message_sid
from service.wiring import current
from tests.support.app import TOKEN, make_app
from tests.support.app_servers import LiveServer
from tests.support.numbers import OURS
from tests.support.ports import free_cluster_port
from tests.support.redis_servers import NOT_DURABLE
from tests.support.replies import count_reply, thanks
from tests.support.standin import AUTH_TOKEN as STANDIN_TOKEN
from tests.support.standin import StandinServer
from tests.support.waiting import wait_until
from tests.test_webhook import count_in

pytestmark = pytest.mark.slow  # a Redis Cluster of three processes

KEYS = Keys()
SENDERS = [f"+1555987{tag:04d}" for tag in range(100)]  # tags {00}..{99}
BURST = 4


@pytest.fixture
def cluster_app(redis_cluster):
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port, decode_responses=True)
    client.flushall()
    client.script_flush()
    app = make_app(REDIS_URL=redis_cluster.url)
    yield app, client
    client.close()


def test_scripts_are_preloaded_on_every_primary(cluster_app, redis_cluster):
    import hashlib

    store = current(cluster_app[0]).store
    scripts = [script.source.text for script in store.scripts]
    shas = [hashlib.sha1(script.encode()).hexdigest() for script in scripts]
    for node in redis_cluster.nodes:
        assert node.client().script_exists(*shas) == [True] * len(scripts)


def test_conversations_spread_over_every_master(cluster_app, redis_cluster):
    app, client = cluster_app
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        for sender in SENDERS:
            assert twilio.send(sender, OURS, "hi").reply == thanks("Friend")
        assert twilio.send(SENDERS[7], OURS, "again").reply == count_reply("Friend", 2)
    owners = {client.get_node_from_key(KEYS.conversation(s, OURS).conversation).port for s in SENDERS}
    assert owners == {node.port for node in redis_cluster.nodes}


def test_lifecycle_events_reach_the_stream_from_every_master(redis_cluster):
    """Scripts cannot reach the stream's slot on a Cluster: they write to their tag's outbox,
    and the sweeper relays every event to the one stream."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port, decode_responses=True)
    client.flushall()
    app = make_app(REDIS_URL=redis_cluster.url, CONVERSATION_TTL=1, OPS_TOKEN="ops")
    # The operator's conversation is started with an hour's TTL: with the others' one second,
    # a loaded machine could let it run out before the DELETE, which then (rightly) ends it
    # as 'expired'.
    lasting = make_app(REDIS_URL=redis_cluster.url, CONVERSATION_TTL=3600)
    assert TwilioSimulator.for_app(lasting).send(SENDERS[0], OURS, "hi").status == 200
    twilio = TwilioSimulator.for_app(app)
    for sender in SENDERS[1:40]:
        assert twilio.send(sender, OURS, "hi").status == 200
    ended_by_operator = app.test_client().delete(
        f"/ops/conversations/{SENDERS[0]}/{OURS}", headers={"Authorization": "Bearer ops"}
    )
    assert ended_by_operator.status_code == 200
    time.sleep(1.1)
    Sweeper(app).sweep()
    entries = [fields for _, fields in client.xrange(KEYS.events)]
    started = [e["conversation"] for e in entries if e["type"] == "started"]
    ended = {e["conversation"]: e["reason"] for e in entries if e["type"] == "ended"}
    assert len(started) == len(set(started)) == 40
    assert set(ended) == set(started)
    assert sorted(ended.values()) == ["expired"] * 39 + ["operator"]
    assert all(client.xlen(KEYS.outbox(shard)) == 0 for shard in KEYS.shards())
    client.close()


def test_timers_on_every_master_fire(redis_cluster):
    """Each tag's due index lives on the master of its slot: one sweep fires them all."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port, decode_responses=True)
    client.flushall()

    def handler(message, conversation):
        if message.kind == "timer":
            conversation["fired"] = conversation.get("fired", 0) + 1
            return None
        conversation.remind(0, "now", cancel_on_reply=False)
        return "set"

    app = create_app({"REDIS_URL": redis_cluster.url, "TWILIO_AUTH_TOKEN": TOKEN}, handler=handler)
    twilio = TwilioSimulator.for_app(app)
    for sender in SENDERS:
        assert twilio.send(sender, OURS, "hi").status == 200
    owners = {client.get_node_from_key(KEYS.timers(shard)).port for shard in KEYS.shards()}
    assert owners == {node.port for node in redis_cluster.nodes}
    Sweeper(app).sweep()
    for sender in SENDERS:
        keys = KEYS.conversation(sender, OURS)
        assert json.loads(client.hget(keys.conversation, "state"))["fired"] == 1
    assert sum(client.zcard(KEYS.timers(shard)) for shard in KEYS.shards()) == 0
    client.close()


def test_concurrent_bursts_over_all_100_tags_keep_exact_counts(cluster_app):
    app, client = cluster_app
    with LiveServer(app) as server:
        sims = [TwilioSimulator(server.url, TOKEN) for _ in range(len(SENDERS) * BURST)]
        jobs = [(sims[n], SENDERS[n % len(SENDERS)]) for n in range(len(sims))]
        with ThreadPoolExecutor(max_workers=32) as pool:
            deliveries = list(pool.map(lambda job: job[0].send(job[1], OURS, "burst"), jobs))
    assert [d.status for d in deliveries] == [200] * len(deliveries)
    replies: dict[str, list[int]] = {}
    for (_, sender), delivery in zip(jobs, deliveries):
        replies.setdefault(sender, []).append(count_in(delivery.reply))
    assert all(sorted(counts) == list(range(1, BURST + 1)) for counts in replies.values())
    for sender in SENDERS:
        keys = KEYS.conversation(sender, OURS)
        assert client.hget(keys.conversation, "seq") == str(BURST)
        assert client.zscore(keys.index_shard, keys.member) is not None  # in its shard's index
    assert sum(client.zcount(index, "-inf", "+inf") for index in KEYS.indexes()) == len(SENDERS)


def test_operators_count_list_show_and_expire_across_every_master(cluster_app, redis_cluster):
    """The ops commands merge the index shards of all three masters."""
    app, client = cluster_app
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        for sender in SENDERS:
            twilio.send(sender, OURS, "hi")
        twilio.send(SENDERS[42], OURS, "latest")  # the most recent conversation
        runner = app.test_cli_runner()
        count = runner.invoke(args=["conversations", "count", "--json"])
        assert json.loads(count.output) == {"active": len(SENDERS)}
        listed, cursor = [], None
        while True:
            args = ["conversations", "list", "--json", "--limit", "30"]
            page = runner.invoke(args=args + (["--cursor", cursor] if cursor else []))
            assert page.exit_code == 0, page.output
            rows = json.loads(page.stdout)
            listed += rows
            cursor = next(
                (
                    line.split(": ", 1)[1]
                    for line in page.stderr.splitlines()
                    if line.startswith("next cursor: ")
                ),
                None,
            )
            if cursor is None:
                break
        assert sorted(row["from"] for row in listed) == sorted(SENDERS)
        assert listed[0]["from"] == SENDERS[42]
        assert listed[0]["messages"] == 2
        show = runner.invoke(args=["conversations", "show", SENDERS[42], OURS, "--json"])
        assert json.loads(show.stdout)["messages"] == 2
        assert runner.invoke(args=["conversations", "expire", SENDERS[42], OURS]).exit_code == 0
        count = runner.invoke(args=["conversations", "count", "--json"])
        assert json.loads(count.output) == {"active": len(SENDERS) - 1}
        assert twilio.send(SENDERS[42], OURS, "old cookie").reply == thanks("Friend")


def test_slot_migration_answers_503_meanwhile_then_follows_moved(cluster_app, redis_cluster):
    """While a slot migrates (ASK, TRYAGAIN) its conversations answer 503; afterwards MOVED."""
    app, client = cluster_app
    sender = SENDERS[7]
    keys = KEYS.conversation(sender, OURS)
    slot = client.keyslot(keys.conversation)
    source = next(
        n for n in redis_cluster.nodes if n.port == client.get_node_from_key(keys.conversation).port
    )
    target = next(n for n in redis_cluster.nodes if n is not source)
    ids = {n.port: n.client().execute_command("CLUSTER MYID") for n in (source, target)}
    statuses = []
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        statuses += [twilio.send(sender, OURS, "before").status for _ in range(3)]
        target.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
        source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
        migrating = twilio.send(sender, OURS, "during")
        moving = source.client().execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving)
        for node in redis_cluster.nodes:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port])
        after = [twilio.send(sender, OURS, "after") for _ in range(2)]
    assert statuses == [200] * 3
    assert migrating.status == 503  # the lock key is missing on the source: ASK, then TRYAGAIN
    assert [count_in(d.reply) for d in after] == [4, 5]  # redis-py followed MOVED
    counted = [n.client().execute_command("CLUSTER COUNTKEYSINSLOT", slot) for n in (source, target)]
    assert {keys.conversation, keys.index_shard} <= set(moving)
    assert counted == [0, len(moving)]  # the conversation, its index shard and tag's keys moved
    assert client.hget(keys.conversation, "seq") == "5"


def test_slow_handlers_on_every_master_commit_once_in_order(cluster_app, redis_cluster):
    """Handlers past their budget in conversations of every tag: each message and the one
    queued behind it are kept, leased and saved on the master of their tag, in order."""
    _, client = cluster_app

    def handle(message, conversation):
        if message.body == "slow":
            time.sleep(0.3)
        conversation.setdefault("bodies", []).append(message.body)
        return "ok"

    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_cluster.url, "HANDLER_INLINE_BUDGET": 0.05},
        handler=handle,
    )
    twilio = TwilioSimulator.for_app(app)
    senders = SENDERS[::10]  # ten tags, over the three masters
    for sender in senders:
        assert twilio.send(sender, OURS, "slow").body.endswith("<Response />")
        assert twilio.send(sender, OURS, "after").body.endswith("<Response />")

    def saved(sender: str) -> list[str]:
        stored = client.hget(KEYS.conversation(sender, OURS).conversation, "state")
        return json.loads(stored)["bodies"] if stored else []

    wait_until(lambda: all(len(saved(s)) == 2 for s in senders), seconds=30, what="every conversation saved")
    assert {s: saved(s) for s in senders} == {s: ["slow", "after"] for s in senders}
    owners = {client.get_node_from_key(KEYS.conversation(s, OURS).inbound).port for s in senders}
    assert len(owners) == 3


def add_replica(redis_cluster, master):
    """A new node, made a replica of ``master`` and in sync with it."""
    replica = redis_cluster.start(
        "--cluster-enabled", "yes", "--cluster-node-timeout", "2000", *NOT_DURABLE, port=free_cluster_port()
    )
    replica.client().execute_command("CLUSTER MEET", "127.0.0.1", master.port)
    master_id = master.client().execute_command("CLUSTER MYID")
    wait_until(
        lambda: master_id in str(replica.client().execute_command("CLUSTER NODES")),
        what="the replica knows the master",
    )
    replica.client().execute_command("CLUSTER REPLICATE", master_id)
    wait_until(
        lambda: replica.client().info("replication").get("master_link_status") == "up",
        what="the replica in sync",
    )
    return replica


def test_outbound_delivery_keeps_working_through_a_failover(cluster_app, redis_cluster):
    """One master gets a replica, then hands over to it (CLUSTER FAILOVER) while handlers queue
    outbound messages in its conversations and a sender delivers them to the Twilio stand-in:
    every message reaches its phone once, each conversation's in commit order. A message
    refused during the switch (503) is redelivered with its MessageSid, as Twilio does, and so
    queued once."""
    _, client = cluster_app
    master = redis_cluster.nodes[1]  # not nodes[0]: the last test stops that one
    senders = [
        s
        for s in SENDERS
        if client.get_node_from_key(KEYS.conversation(s, OURS).conversation).port == master.port
    ][:4]
    replica = add_replica(redis_cluster, master)
    with StandinServer() as standin:
        config = {
            **standin.config(),
            "REDIS_URL": redis_cluster.url,
            "SENDER_LEASE": 2,
            "TWILIO_API_TIMEOUT": 0.5,
            "DELIVERY_RETRY_BASE": 0.1,
            "DELIVERY_RETRY_MAX": 1,
        }
        app = create_app(
            config, handler=lambda message, conversation: conversation.send(f"out {message.body}")
        )
        sender = Sender(app)
        sender.start()
        queued: dict[str, list[str]] = {s: [] for s in senders}
        try:
            with LiveServer(app) as server:
                twilio = TwilioSimulator(server.url, STANDIN_TOKEN)

                def queue_one() -> int:
                    """Queues the next message, round robin over the conversations; how many
                    are queued."""
                    n = sum(len(bodies) for bodies in queued.values())
                    phone, body, message_sid = senders[n % len(senders)], f"m{n}", new_message_sid()
                    for _ in range(120):
                        if twilio.send(phone, OURS, body, message_sid=message_sid).status == 200:
                            queued[phone].append(f"out {body}")
                            return n + 1
                        time.sleep(0.25)
                    raise AssertionError("still refused after every redelivery")

                for _ in range(20):
                    queue_one()
                replica.client().execute_command("CLUSTER FAILOVER")
                during = 0
                while replica.client().info("replication")["role"] != "master" or during < 20:
                    during += 1
                    assert queue_one() < 500, "the replica never took over"
                for _ in range(20):
                    queue_one()
            wait_until(
                lambda: (
                    all(len(standin.inbox(s)) >= len(queued[s]) for s in senders)
                    and sum(client.llen(KEYS.conversation(s, OURS).outbound) for s in senders) == 0
                ),
                seconds=60,
                what="every queued message delivered",
            )
            delivered = {s: [message["body"] for message in standin.inbox(s)] for s in senders}
        finally:
            sender.stop()
    assert master.client().info("replication")["role"] == "slave"  # the switch happened
    assert delivered == queued
    assert sum(len(bodies) for bodies in queued.values()) >= 60


class ReaderGone:
    """What a hiredis parser's reader is to a read that another thread's disconnect overtook:
    no data yet, and no ``feed`` (redis-py issue 2967, seen under a Cluster failover)."""

    def gets(self, *args):
        from redis._parsers.hiredis import NOT_ENOUGH_DATA

        return NOT_ENOUGH_DATA


def test_redis_py_failing_in_its_own_way_is_a_503_never_a_500(cluster_app):
    """A failover resets connections under other threads, and redis-py then raises what is no
    RedisError (``AttributeError … 'feed'`` from its hiredis parser): a 503, like any outage,
    and the next message, on a fresh connection, is served."""
    app, _ = cluster_app
    twilio = TwilioSimulator.for_app(app)
    sender = SENDERS[7]
    assert twilio.send(sender, OURS, "before").status == 200
    node = current(app).redis.get_node_from_key(KEYS.conversation(sender, OURS).conversation)
    pooled = node.redis_connection.connection_pool._available_connections
    assert pooled
    for connection in pooled:
        connection._parser._reader = ReaderGone()
    failed = twilio.send(sender, OURS, "during")
    assert failed.status == 503
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'sms_redis_errors_total{source="webhook"} 1.0' in metrics
    assert twilio.send(sender, OURS, "after").reply == count_reply("Friend", 2)


def test_a_master_going_down_answers_503_never_500(cluster_app, redis_cluster):
    """Last in this module: it stops one master for good."""
    app, _ = cluster_app
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        assert {twilio.send(s, OURS, "before").status for s in SENDERS} == {200}
        redis_cluster.nodes[0].kill()
        statuses = [twilio.send(s, OURS, "after").status for s in SENDERS]
    assert set(statuses) <= {200, 503}
    assert 503 in statuses
