"""A slow handler's replies leave through the outbound sender (tests/test_outbound.py's stand-in
of Twilio's API): Twilio's webhook request gets an empty answer at once, the reply arrives later
through the REST API, in order with the replies of the messages queued behind it; past
HANDLER_TIMEOUT only HANDLER_TIMEOUT_REPLY goes out."""

from __future__ import annotations

import threading

import pytest

from service.responses import NO_REPLY
from service.sender import Sender
from tests.support.numbers import REY
from tests.support.standin import StandinServer
from tests.support.waiting import wait_until
from tests.test_outbound import bodies, drain, make, text
from tests.test_slow_handlers import KEYS, settled, state


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


def slow(standin, redis_url, handler, **overrides):
    return make(standin, redis_url, handler, HANDLER_INLINE_BUDGET=0.1, LOCK_TTL=1.0, **overrides)


def test_a_slow_reply_arrives_through_the_rest_api_after_the_acknowledgement(
    standin, redis_url, redis_client
):
    go = threading.Event()

    def handle(message, conversation):
        if message.body == "plan my trip":
            conversation.send("One moment…")
            go.wait(5)
        conversation.setdefault("asked", []).append(message.body)
        return f"Here is your answer to: {message.body}"

    app = slow(standin, redis_url, handle)
    client = app.test_client()
    answer = text(client, "plan my trip")
    assert answer.get_data(as_text=True) == NO_REPLY
    for body in ("and hotels", "and a car"):
        assert text(client, body).get_data(as_text=True) == NO_REPLY
    drain(Sender(app))
    assert bodies(standin) == []  # nothing leaves before the handler returned
    go.set()
    wait_until(lambda: settled(redis_client), seconds=10, what="the three saved")
    drain(Sender(app))
    assert bodies(standin, REY) == [
        "One moment…",
        "Here is your answer to: plan my trip",
        "Here is your answer to: and hotels",
        "Here is your answer to: and a car",
    ]
    assert state(redis_client) == {"asked": ["plan my trip", "and hotels", "and a car"]}
    assert redis_client.hget(KEYS.conversation, "seq") == "3"


def test_past_handler_timeout_only_the_timeout_reply_goes_out(standin, redis_url, redis_client):
    release = threading.Event()

    def handle(message, conversation):
        conversation.send("working on it")  # not committed: the run saves nothing
        conversation["touched"] = True
        release.wait(5)
        return "too late"

    app = slow(
        standin, redis_url, handle, HANDLER_TIMEOUT=0.5, HANDLER_TIMEOUT_REPLY="Sorry, that took too long."
    )
    assert text(app.test_client(), "hello").get_data(as_text=True) == NO_REPLY
    wait_until(lambda: settled(redis_client), seconds=10, what="the timeout")
    release.set()
    drain(Sender(app))
    assert bodies(standin, REY) == ["Sorry, that took too long."]
    assert state(redis_client) == {}
