"""Slow handlers under gunicorn with the repository's config (config/gunicorn.conf.py), replies
delivered by the workers' outbound senders to the Twilio stand-in: Twilio's request answered at
once with an empty answer (within a second with the shipped settings), the reply arriving later
through the REST API, an interim message while the handler runs, messages meanwhile handled
after in order, each once; ``kill -9`` of the process running a handler: the message is
handled again (the sweeper claims it once its lease lapses) and its state commits once."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from service.keys import Keys
from service.responses import NO_REPLY
from service.simulator import Delivery, TwilioSimulator
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import FINN, OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN, StandinServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow
KEYS = Keys().conversation(REY, OURS)


def serve(redis_url: str, standin: StandinServer, defaults: bool = False, **settings: str) -> Gunicorn:
    """The service under gunicorn; with ``defaults`` the handler settings, ``LOCK_TTL`` and the
    sweeper's interval are the shipped ones, else shortened."""
    shortened = {"HANDLER_INLINE_BUDGET": "0.2", "LOCK_TTL": "1", "SWEEP_INTERVAL": "0.2"}
    return Gunicorn(
        {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM_NUMBER": OURS,
            "TWILIO_API_BASE_URL": standin.base,
            "REDIS_URL": redis_url,
            "SMS_HANDLER": "tests.support.sleeping_handler:handle",
            **({} if defaults else shortened),
            **settings,
        },
        workers=2,
        config=GUNICORN_CONF,
    )


def calls(redis_client) -> list[dict]:
    return [json.loads(call) for call in redis_client.lrange("handler-calls", 0, -1)]


def bodies(redis_client, sender: str = REY) -> list[str]:
    keys = Keys().conversation(sender, OURS)
    return json.loads(redis_client.hget(keys.conversation, "state") or "{}").get("bodies", [])


def replies(standin: StandinServer, to: str = REY) -> list[str]:
    return [message["body"] for message in standin.inbox(to)]


# Twilio's request answered within this (the product's promise; Twilio itself waits 15 s):
# the default HANDLER_INLINE_BUDGET (0.8 s) and the deferral's round trip.
ANSWERED_WITHIN = 1.0


def timed(twilio: TwilioSimulator, sender: str, body: str) -> tuple[float, Delivery]:
    started = time.monotonic()
    delivery = twilio.send(sender, OURS, body)
    return time.monotonic() - started, delivery


def test_a_5_s_and_a_30_s_handler_are_answered_within_a_second_and_replied_to_later(
    redis_url, redis_client, standin
):
    """The issue's case, with the shipped settings: two conversations whose handlers take 5 s
    and 30 s at once; Twilio's requests answered within a second, empty; each reply arrives
    through the REST API, the 5 s one while the 30 s one still runs; three messages sent during
    the 30 s are handled after it, in order, each once; each message's state saved once."""
    with serve(redis_url, standin, defaults=True) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)
        answers = [timed(twilio, REY, "sleep 30"), timed(twilio, FINN, "sleep 5")]
        answers += [timed(twilio, REY, body) for body in ("one", "two", "three")]
        for seconds, delivery in answers:
            assert delivery.status == 200 and delivery.body == NO_REPLY
            assert seconds < ANSWERED_WITHIN, f"Twilio's request answered in {seconds:.2f} s"
        wait_until(lambda: replies(standin, FINN) == ["done: sleep 5"], seconds=15, what="the 5 s reply")
        assert replies(standin, REY) == []  # the 30 s handler still runs, the three wait
        wait_until(
            lambda: len(replies(standin, REY)) == 4, seconds=45, what="the 30 s conversation's replies"
        )
    assert replies(standin, REY) == ["done: sleep 30", "done: one", "done: two", "done: three"]
    assert replies(standin, FINN) == ["done: sleep 5"]
    called = [call["body"] for call in calls(redis_client)]
    assert [body for body in called if body != "sleep 5"] == ["sleep 30", "one", "two", "three"]
    assert called.count("sleep 5") == 1
    assert bodies(redis_client, REY) == ["sleep 30", "one", "two", "three"]
    assert bodies(redis_client, FINN) == ["sleep 5"]
    assert redis_client.hget(KEYS.conversation, "seq") == "4"
    assert redis_client.hget(Keys().conversation(FINN, OURS).conversation, "seq") == "1"
    assert not redis_client.exists(KEYS.inbound)


def test_a_slow_handlers_interim_message_arrives_while_it_runs(redis_url, redis_client, standin):
    """``conversation.send("one moment")`` in a handler that then blocks (until the test pushes
    to ``handler-release``): the stand-in receives it while the handler is blocked, the answer
    once it is released."""
    with serve(redis_url, standin, defaults=True) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)
        assert twilio.send(REY, OURS, "hold").body == NO_REPLY
        wait_until(lambda: replies(standin) == ["one moment"], seconds=10, what="the interim message")
        assert bodies(redis_client) == []  # still blocked: nothing saved
        redis_client.rpush("handler-release", "go")
        wait_until(lambda: len(replies(standin)) == 2, seconds=10, what="the answer")
    assert replies(standin) == ["one moment", "done: hold"]
    assert bodies(redis_client) == ["hold"]


def test_messages_during_a_slow_handler_are_handled_after_it_in_order_each_once(
    redis_url, redis_client, standin
):
    with serve(redis_url, standin) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)
        first = twilio.send(REY, OURS, "sleep 3")
        assert first.status == 200
        assert first.body == NO_REPLY
        later = [twilio.send(REY, OURS, body) for body in ("one", "two", "three")]
        assert [delivery.body for delivery in later] == [NO_REPLY] * 3
        assert [call["body"] for call in calls(redis_client)] == ["sleep 3"]  # they wait their turn
        again = twilio.send(REY, OURS, "two", message_sid=later[1].message_sid)  # a redelivery
        assert again.body == NO_REPLY
        wait_until(lambda: len(replies(standin)) == 4, seconds=20, what="all four replies delivered")
    assert replies(standin) == ["done: sleep 3", "done: one", "done: two", "done: three"]
    assert bodies(redis_client) == ["sleep 3", "one", "two", "three"]
    assert [call["body"] for call in calls(redis_client)] == ["sleep 3", "one", "two", "three"]
    assert redis_client.hget(KEYS.conversation, "seq") == "4"
    assert not redis_client.exists(KEYS.inbound)


def test_kill_9_of_the_process_running_a_handler_runs_it_again_and_commits_once(
    redis_url, redis_client, standin
):
    with serve(redis_url, standin) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)
        assert twilio.send(REY, OURS, "sleep 30").body == NO_REPLY
        queued = twilio.send(REY, OURS, "after")
        assert queued.body == NO_REPLY
        [running] = calls(redis_client)
        os.kill(running["pid"], signal.SIGKILL)
        wait_until(lambda: len(replies(standin)) == 2, seconds=30, what="both replies delivered")
    assert replies(standin) == ["done: sleep 30", "done: after"]
    again = calls(redis_client)
    assert [call["body"] for call in again] == ["sleep 30", "sleep 30", "after"]
    assert again[1]["pid"] != running["pid"]
    assert bodies(redis_client) == ["sleep 30", "after"]
    assert redis_client.hget(KEYS.conversation, "seq") == "2"


def test_async_handlers_under_the_shipped_worker_class_answer_inline_and_past_the_webhook(
    redis_url, redis_client, standin
):
    """The shipped class (gevent, the standard library patched): the process' event loop runs
    on a thread of its own, a fast async handler is answered inline, a slow one past the webhook
    with the messages after it in order."""
    assert "WORKER_CLASS" not in os.environ  # the shipped default
    with serve(redis_url, standin, SMS_HANDLER="tests.support.sleeping_handler:handle_async") as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)
        assert twilio.send(REY, OURS, "sleep 2").body == NO_REPLY
        other = twilio.send(FINN, OURS, "hi")
        assert other.status == 200
        assert "done: hi" in other.body  # inline: the loop is free while the other one sleeps
        assert twilio.send(REY, OURS, "after").body == NO_REPLY
        wait_until(lambda: len(replies(standin)) == 2, seconds=20, what="both replies delivered")
    assert replies(standin) == ["done: sleep 2", "done: after"]
    assert bodies(redis_client) == ["sleep 2", "after"]
    assert not redis_client.exists(KEYS.inbound)
