"""The webhook behind Sentinel (master + replica + one Sentinel, started by the suite).

``SENTINEL FAILOVER`` promotes the replica while the old master is still up: Sentinel only
demotes the old master about ten seconds later. Writes it accepted meanwhile would be thrown
away, so the data nodes run with ``min-replicas-to-write 1``: the deposed master refuses
(NOREPLICAS), the app asks Sentinel again, and the switch costs 503s, never a lost count.
``config/sentinel-reconfig.sh`` demotes the old master right after the switch, so the new
master has its replica back, and accepts writes, within a second or two.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.sender import Sender
from service.simulator import TwilioSimulator, new_message_sid
from service.wiring import current
from tests.support.app import TOKEN, make_app
from tests.support.app_servers import LiveServer
from tests.support.numbers import OURS, REY
from tests.support.replies import thanks
from tests.support.standin import AUTH_TOKEN as STANDIN_TOKEN
from tests.support.standin import StandinServer
from tests.support.waiting import wait_until
from tests.test_webhook import count_in

pytestmark = pytest.mark.slow  # master, replica and Sentinel processes

RETRIES = 120  # a redelivery every 0.25 s for half a minute at most


def deliver(twilio: TwilioSimulator, attempts: list[int]) -> int:
    """One message, redelivered with the same MessageSid on 503 as Twilio does with ``#rc``."""
    message_sid = new_message_sid()
    for _ in range(RETRIES):
        delivery = twilio.send(REY, OURS, "hello", message_sid=message_sid)
        attempts.append(delivery.status)
        if delivery.status != 503:
            assert delivery.status == 200, delivery.body
            return count_in(delivery.reply)
        time.sleep(0.25)
    raise AssertionError("still 503 after every redelivery")


def master_port(setup) -> int:
    return int(setup.sentinel.client().execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME sms")[1])


def test_conversation_keeps_its_count_through_sentinel_failover(redis_sentinel):
    app = make_app(REDIS_URL=redis_sentinel.url, REDIS_WAIT_REPLICAS=1)
    old_master = master_port(redis_sentinel)
    attempts: list[int] = []
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        counts = [deliver(twilio, attempts) for _ in range(10)]
        wait_until(
            lambda: redis_sentinel.sentinel.client().execute_command("SENTINEL FAILOVER sms"),
            what="SENTINEL FAILOVER accepted",
        )
        while master_port(redis_sentinel) == old_master or len(counts) < 20:
            counts.append(deliver(twilio, attempts))
            assert len(counts) < 500, "Sentinel never switched"
        for _ in range(10):
            counts.append(deliver(twilio, attempts))
    new_master = next(n for n in redis_sentinel.nodes if n.port == master_port(redis_sentinel))
    assert new_master.port != old_master
    stored = new_master.client().hget(Keys().conversation(REY, OURS).conversation, "seq")
    assert counts == list(range(1, len(counts) + 1))  # each message counted once, in order
    assert int(stored) == attempts.count(200)
    assert attempts[:10] == attempts[-10:] == [200] * 10  # 503s only during the switch
    assert attempts.count(503) <= 40  # a few; without the reconfig script it is about 60


def test_scripts_missing_on_the_master_are_reloaded_in_the_waiting_pipeline(redis_sentinel):
    """A newly promoted master may lack the scripts: NOSCRIPT inside the pipeline reloads them."""
    app = make_app(REDIS_URL=redis_sentinel.url, REDIS_WAIT_REPLICAS=1)
    master = next(n for n in redis_sentinel.nodes if n.port == master_port(redis_sentinel))
    master.client().script_flush()
    with LiveServer(app) as server:
        delivery = TwilioSimulator(server.url, TOKEN).send("+15551230099", OURS, "hi")
    assert delivery.status == 200
    assert delivery.reply == thanks("Friend")


def test_lifecycle_events_exactly_once_behind_sentinel(redis_sentinel):
    app = make_app(REDIS_URL=redis_sentinel.url, REDIS_WAIT_REPLICAS=1, CONVERSATION_TTL=1)
    master = current(app).redis
    master.delete(Keys().events)
    twilio = TwilioSimulator.for_app(app)
    senders = [f"+1555777{n:04d}" for n in range(10)]  # new conversations
    for sender in senders:
        wait_until(lambda: twilio.send(sender, OURS, "hi").status == 200, what="a saved message")
    time.sleep(1.1)
    Sweeper(app).sweep()
    Sweeper(app).sweep()
    entries = [fields for _, fields in master.xrange(Keys().events)]
    for kind in ("started", "ended"):
        ids = [e["conversation"] for e in entries if e["type"] == kind]
        assert len(ids) == len(set(ids)) == 10, kind


def test_a_slow_handler_across_a_failover_commits_once_and_the_next_message_follows(redis_sentinel):
    """A handler past its budget while Sentinel switches masters: its message and the one queued
    behind it were confirmed by the replica before Twilio was answered, so the new master has
    them; the run's save either lands or, refused or failed, the sweeper runs the message again.
    Either way each commits once, in order."""
    go = threading.Event()
    calls: list[str] = []

    def handle(message, conversation):
        calls.append(message.body)
        if message.body == "slow":
            go.wait(30)
        conversation.setdefault("bodies", []).append(message.body)
        return "ok"

    sender = "+15551230042"
    keys = Keys().conversation(sender, OURS)
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_sentinel.url,
            "REDIS_WAIT_REPLICAS": 1,
            "HANDLER_INLINE_BUDGET": 0.1,
            "LOCK_TTL": 2.0,
        },
        handler=handle,
    )
    twilio = TwilioSimulator.for_app(app)
    old_master = master_port(redis_sentinel)
    assert twilio.send(sender, OURS, "slow").body.endswith("<Response />")
    assert twilio.send(sender, OURS, "after").body.endswith("<Response />")
    wait_until(
        lambda: redis_sentinel.sentinel.client().execute_command("SENTINEL FAILOVER sms"),
        what="SENTINEL FAILOVER accepted",
    )
    wait_until(lambda: master_port(redis_sentinel) != old_master, seconds=30, what="the switch")
    go.set()

    def both_saved() -> bool:
        try:
            Sweeper(app).sweep()  # claims the message if its save was lost to the switch
            stored = current(app).redis.hget(keys.conversation, "state")
        except Exception:  # the switch: ask again
            return False
        return stored is not None and len(json.loads(stored)["bodies"]) == 2

    wait_until(both_saved, seconds=60, what="both messages saved on the new master")
    new_master = next(n for n in redis_sentinel.nodes if n.port == master_port(redis_sentinel))
    assert json.loads(new_master.client().hget(keys.conversation, "state"))["bodies"] == ["slow", "after"]
    assert new_master.client().hget(keys.conversation, "seq") == "2"
    assert calls[-1] == "after"


def test_outbound_delivery_keeps_working_through_a_failover(redis_sentinel):
    """Messages queued (by a handler, each with its inbound message) before, during and after
    SENTINEL FAILOVER, a sender delivering all along to the Twilio stand-in: every one reaches
    the phone once, in commit order. A redelivered MessageSid is answered from memory, so a
    message retried through the switch queues its outbound message once."""
    with StandinServer() as standin:
        config = {
            **standin.config(),
            "REDIS_URL": redis_sentinel.url,
            "REDIS_WAIT_REPLICAS": 1,
            "SENDER_LEASE": 2,
            "TWILIO_API_TIMEOUT": 0.5,
            "DELIVERY_RETRY_BASE": 0.1,
            "DELIVERY_RETRY_MAX": 1,
        }
        app = create_app(
            config, handler=lambda message, conversation: conversation.send(f"out {message.body}")
        )
        old_master = master_port(redis_sentinel)
        sender = Sender(app)
        sender.start()
        queued: list[str] = []
        try:
            with LiveServer(app) as server:
                twilio = TwilioSimulator(server.url, STANDIN_TOKEN)

                def queue_one() -> None:
                    body = f"m{len(queued)}"
                    message_sid = new_message_sid()
                    for _ in range(RETRIES):
                        if twilio.send(REY, OURS, body, message_sid=message_sid).status == 200:
                            queued.append(f"out {body}")
                            return
                        time.sleep(0.25)
                    raise AssertionError("still refused after every redelivery")

                for _ in range(10):
                    queue_one()
                wait_until(
                    lambda: redis_sentinel.sentinel.client().execute_command("SENTINEL FAILOVER sms"),
                    what="SENTINEL FAILOVER accepted",
                )
                while master_port(redis_sentinel) == old_master or len(queued) < 20:
                    queue_one()
                    assert len(queued) < 500, "Sentinel never switched"
                for _ in range(10):
                    queue_one()
            keys = Keys().conversation(REY, OURS)
            redis = current(app).redis
            wait_until(
                lambda: len(standin.inbox(REY)) >= len(queued) and redis.llen(keys.outbound) == 0,
                seconds=60,
                what="every queued message delivered",
            )
            delivered = [message["body"] for message in standin.inbox(REY)]
        finally:
            sender.stop()
    assert delivered == queued
    assert len(queued) >= 30
