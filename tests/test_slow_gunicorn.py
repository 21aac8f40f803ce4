"""Slow handlers under gunicorn with the repository's config (config/gunicorn.conf.py), replies
delivered by the workers' outbound senders to the Twilio stand-in: Twilio's request answered at
once with an empty answer, the reply arriving later through the REST API, messages meanwhile
handled after in order, each once; ``kill -9`` of the process running a handler: the message is
handled again (the sweeper claims it once its lease lapses) and its state commits once."""

from __future__ import annotations

import json
import os
import signal

import pytest

from service.keys import Keys
from service.responses import NO_REPLY
from service.simulator import TwilioSimulator
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import FINN, OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN, StandinServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow
KEYS = Keys().conversation(REY, OURS)


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


def serve(redis_url: str, standin: StandinServer, **settings: str) -> Gunicorn:
    return Gunicorn(
        {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM_NUMBER": OURS,
            "TWILIO_API_BASE_URL": standin.base,
            "REDIS_URL": redis_url,
            "SMS_HANDLER": "tests.support.sleeping_handler:handle",
            "HANDLER_INLINE_BUDGET": "0.2",
            "LOCK_TTL": "1",
            "SWEEP_INTERVAL": "0.2",
            **settings,
        },
        workers=2,
        config=GUNICORN_CONF,
    )


def calls(redis_client) -> list[dict]:
    return [json.loads(call) for call in redis_client.lrange("handler-calls", 0, -1)]


def bodies(redis_client) -> list[str]:
    return json.loads(redis_client.hget(KEYS.conversation, "state") or "{}").get("bodies", [])


def replies(standin: StandinServer) -> list[str]:
    return [message["body"] for message in standin.inbox(REY)]


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
