"""Forgetting a number (``sms-sessions forget``, ``DELETE /ops/numbers/<number>``): afterwards no
key, stream entry or transcript holds it, in plain or hashed form, while other numbers' data is
untouched; safe while its messages arrive; on one Redis and on a Cluster."""

from __future__ import annotations

import json
import threading
import time

import pytest
from redis.cluster import RedisCluster

from service import create_app
from service.keys import Keys, shard_of
from service.simulator import TwilioSimulator
from service.wiring import current
from tests.support.app import TOKEN
from tests.support.app_servers import LiveServer
from tests.support.numbers import OTHER, OURS

KEYS = Keys()
OPS = "ops-token-for-forget"
FORGOTTEN = "+15554240042"
OTHERS = ["+15554240043", "+15554240142", "+15554240007", "+15554240099", "+15554240011"]
HASH_KEY = "a-secret-key-for-the-events-hash"


def bot(message, conversation):
    conversation["seen"] = conversation.get("seen", 0) + 1
    if message.body == "human":
        conversation.handoff("asks for a person")
    if message.body == "bye":
        conversation.end()
    return f"n{conversation['seen']}"


def make(redis_url, **config):
    return create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "TRANSCRIPTS": True,
            "OPS_TOKEN": OPS,
            **config,
        },
        handler=bot,
        on_end=lambda conversation, reason: None,  # ended conversations wait for their hook
    )


def holders(client, needles: set[str]) -> list[str]:
    """Every key whose name, or any value, member, field or stream entry, holds a needle."""
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "string":
            texts = [client.get(key) or ""]
        elif kind == "hash":
            texts = [text for pair in client.hgetall(key).items() for text in pair]
        elif kind == "zset":
            texts = client.zrange(key, 0, -1)
        elif kind == "list":
            texts = client.lrange(key, 0, -1)
        elif kind == "set":
            texts = list(client.smembers(key))
        elif kind == "stream":
            texts = [text for _, fields in client.xrange(key) for pair in fields.items() for text in pair]
        else:
            texts = []
        texts.append(key)
        if any(needle in text for text in texts for needle in needles):
            found.append(key)
    return found


def forget_under_load(app, client, hashed: bool, hooks_pending: int = 1):
    """Messages for the number and five others, ~200 a second, while it is forgotten
    (``hooks_pending``: its end hooks not yet run, none where a sweeper runs them)."""
    wired = current(app)
    needles = {FORGOTTEN} | ({wired.number_hash(FORGOTTEN)} if hashed else set())
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN, timeout=30)
        # Before: an ended conversation (pending end hook, events), and a live one waiting for a
        # person.
        for body in ("hi", "bye"):
            assert twilio.send(FORGOTTEN, OURS, body).status == 200
        assert twilio.send(FORGOTTEN, OTHER, "human").status == 200  # waiting for a person too
        assert holders(client, needles)

        stop_all, stop_forgotten, stopped = threading.Event(), threading.Event(), threading.Event()
        answered: dict[str, int] = {number: 0 for number in OTHERS}
        statuses: list[int] = []

        def send(sender: str, recipient: str) -> None:
            sim = TwilioSimulator(server.url, TOKEN, timeout=30)
            while not stop_all.is_set():
                if sender == FORGOTTEN and stop_forgotten.is_set():
                    stopped.set()
                    return
                status = sim.send(sender, recipient, "load").status
                statuses.append(status)
                if status == 200 and sender != FORGOTTEN:
                    answered[sender] += 1
                time.sleep(0.01)  # seven senders: about 200 messages a second in all

        threads = [threading.Thread(target=send, args=(FORGOTTEN, OURS))]
        threads += [threading.Thread(target=send, args=(FORGOTTEN, OTHER))]
        threads += [threading.Thread(target=send, args=(number, OURS)) for number in OTHERS]
        load_started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(1.0)

        # Its messages keep arriving through the fence, the first pass and the events pass; they
        # stop before the last pass, which removes the locks and lines they left.
        real_tag = wired.forgetting._tag
        passes = []

        def tag(number, done, opt_out):
            passes.append(number)
            if len(passes) == 2:
                stop_forgotten.set()
                assert stopped.wait(10)
                threads[0].join(10)
                threads[1].join(10)
            real_tag(number, done, opt_out)

        wired.forgetting._tag = tag
        started = time.monotonic()
        answer = app.test_client().delete(
            f"/ops/numbers/{FORGOTTEN}", headers={"Authorization": f"Bearer {OPS}"}
        )
        forgetting_took = time.monotonic() - started
        time.sleep(0.5)
        stop_all.set()
        for thread in threads:
            thread.join(30)
        rate = len(statuses) / (time.monotonic() - load_started)
        print(f"forget took {forgetting_took:.2f} s; {rate:.0f} messages a second arrived around it")
        wired.forgetting._tag = real_tag

    assert answer.status_code == 200
    report = answer.get_json()
    assert report["number"] == FORGOTTEN
    assert report["live_conversations"] >= 1
    assert report["transcripts"] >= 2
    assert report["end_hooks"] == hooks_pending
    assert report["events"] >= 3
    assert len(passes) == 2
    assert set(statuses) <= {200, 503}
    assert forgetting_took > 0
    assert holders(client, needles) == []

    for number in OTHERS:  # untouched: every message answered 200 is there, once
        conversation = KEYS.conversation(number, OURS)
        assert int(client.hget(conversation.conversation, "seq")) == answered[number]
        entries = [json.loads(raw) for raw in client.lrange(conversation.transcript, 0, -1)]
        assert len([e for e in entries if e["dir"] == "in"]) == answered[number]

    # Afterwards the number starts afresh.
    assert TwilioSimulator.for_app(app).send(FORGOTTEN, OURS, "again").reply == "n1"


@pytest.mark.parametrize("hashed", [False, True], ids=["plain-events", "hashed-events"])
def test_forget_while_messages_arrive(redis_url, redis_client, hashed):
    config = {"EVENTS_NUMBERS": "hashed", "EVENTS_HASH_KEY": HASH_KEY} if hashed else {}
    app = make(redis_url, **config)
    forget_under_load(app, redis_client, hashed)


def test_forget_reports_and_the_cli(redis_url, redis_client):
    app = make(redis_url)
    twilio = TwilioSimulator.for_app(app)
    assert twilio.send(FORGOTTEN, OURS, "hi").status == 200
    assert twilio.send(OTHERS[0], OURS, "hi").status == 200
    result = app.test_cli_runner().invoke(args=["forget", FORGOTTEN, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["live_conversations"] == 1
    assert report["transcripts"] == 1
    assert report["keys"] == 2  # the hash and the transcript
    assert report["events"] == 1  # its started event
    assert holders(redis_client, {FORGOTTEN}) == []
    assert holders(redis_client, {OTHERS[0]})
    text = app.test_cli_runner().invoke(args=["forget", FORGOTTEN]).output
    assert text.startswith(f"forgot {FORGOTTEN}: 0 live conversation(s), 0 key(s)")


@pytest.mark.slow
def test_forget_on_a_cluster(redis_cluster):
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port, decode_responses=True)
    client.flushall()
    client.script_flush()
    try:
        app = make(redis_cluster.url, EVENTS_NUMBERS="hashed", EVENTS_HASH_KEY=HASH_KEY, SWEEP_INTERVAL=0.2)
        from service.lifecycle import start_sweeper

        sweeper = start_sweeper(app)  # relays the outboxes to the stream meanwhile
        try:
            forget_under_load(app, client, hashed=True, hooks_pending=0)
        finally:
            sweeper.stop()  # it and its end hooks thread: not left logging into later tests
    finally:
        client.close()


def test_outbound_messages_go_and_the_opt_out_only_when_asked(redis_url, redis_client):
    """Its queued and sent outbound messages and due entry go; the opt-out record (a STOP,
    which keeps the service from sending to it) stays unless asked for."""
    from tests.support.standin import StandinServer
    from tests.test_outbound import make as outbound_app
    from tests.test_outbound import text

    def sends(message, conversation):
        conversation.send("a follow-up")
        return "ok"

    with StandinServer() as standin:
        app = outbound_app(standin, redis_url, sends, TRANSCRIPTS=True)
        client = app.test_client()
        assert text(client, "hi", sender=FORGOTTEN).status_code == 200
        assert text(client, "STOP", sender=FORGOTTEN).status_code == 200
        keys = KEYS.conversation(FORGOTTEN, OURS)
        assert redis_client.exists(keys.sent, keys.outbound) == 2
        assert redis_client.zscore(keys.due, keys.member) is not None
        assert app.test_cli_runner().invoke(args=["forget", FORGOTTEN]).exit_code == 0
        assert holders(redis_client, {FORGOTTEN}) == [keys.contacts]  # its opt-out, kept
        assert app.test_cli_runner().invoke(args=["forget", FORGOTTEN, "--opt-out"]).exit_code == 0
        assert holders(redis_client, {FORGOTTEN}) == []


def test_its_pending_timers_and_failed_messages_go(redis_url, redis_client):
    """A pending timer (the tag's timers index names the pair) and an outbound message Twilio
    refused for good (the tag's failures list names it): both entries go; another number's stay."""
    from service.sender import Sender
    from tests.support.standin import StandinServer
    from tests.test_outbound import drain, text
    from tests.test_outbound import make as outbound_app

    def reminds(message, conversation):
        conversation.remind(3600, "nudge")
        conversation.send("a follow-up")
        return "ok"

    kept = OTHERS[0]
    with StandinServer() as standin:
        standin.fault(to=FORGOTTEN, error=21211)  # its message fails for good
        standin.fault(to=kept, error=21211)
        app = outbound_app(standin, redis_url, reminds, TRANSCRIPTS=True)
        client = app.test_client()
        for number in (FORGOTTEN, kept):
            assert text(client, "hi", sender=number).status_code == 200
        drain(Sender(app))
        keys = KEYS.conversation(FORGOTTEN, OURS)
        failed = KEYS.failed(shard_of(FORGOTTEN))
        assert redis_client.zscore(keys.timers, keys.member) is not None
        assert any(FORGOTTEN in member for member in redis_client.zrange(failed, 0, -1))
        assert app.test_cli_runner().invoke(args=["forget", FORGOTTEN]).exit_code == 0
    assert holders(redis_client, {FORGOTTEN}) == []
    other = KEYS.conversation(kept, OURS)
    assert redis_client.zscore(other.timers, other.member) is not None
    assert any(kept in member for member in redis_client.zrange(KEYS.failed(shard_of(kept)), 0, -1))
