"""Redis round trips per message, counted at the client socket: at most two, none for refusals."""

from __future__ import annotations

import pytest
from redis.connection import AbstractConnection

from service import create_app
from tests.support.app import TOKEN, post_signed, webhook_params


@pytest.fixture
def round_trips(monkeypatch):
    """Counts every packed command (a command or a whole pipeline) sent to Redis."""
    sent = []
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sent


def trips(round_trips, send):
    before = len(round_trips)
    response = send()
    return response, len(round_trips) - before


def test_first_later_and_redelivered_message(client, round_trips):
    first_params = webhook_params()
    first, first_trips = trips(round_trips, lambda: post_signed(client, first_params))
    later, later_trips = trips(round_trips, lambda: post_signed(client, webhook_params()))
    again, again_trips = trips(round_trips, lambda: post_signed(client, first_params))
    assert [first.status_code, later.status_code, again.status_code] == [200, 200, 200]
    assert b"Thanks" in first.data
    assert b"2 times" in later.data
    assert again.data == first.data
    assert (first_trips, later_trips, again_trips) == (2, 2, 1)


def test_message_with_a_stale_cookie_costs_two(client, round_trips):
    post_signed(client, webhook_params())
    response, count = trips(round_trips, lambda: post_signed(client, webhook_params(), cookie="stale"))
    assert b"2 times" in response.data
    assert count == 2


def test_refusals_and_health_cost_none(client, round_trips):
    params = webhook_params()
    for expected, send in (
        (403, lambda: client.post("/sms", data=params)),  # unsigned
        (403, lambda: client.post("/sms", data=params, headers={"X-Twilio-Signature": "forged"})),
        (400, lambda: post_signed(client, {**params, "From": ""})),
        (413, lambda: post_signed(client, {**params, "Body": "x" * 70000})),
        (200, lambda: client.get("/healthz")),
    ):
        response, count = trips(round_trips, send)
        assert (response.status_code, count) == (expected, 0)


def test_a_message_that_sets_and_cancels_timers_costs_two(redis_url, round_trips):
    """Timers are stored by the save itself: setting, replacing, a reply cancelling them and an
    own TTL add no round trip."""

    def handler(message, conversation):
        conversation.remind(60, "nudge")
        conversation.remind(120, "kept", cancel_on_reply=False)
        conversation.expire_after(3600)
        return "ok"

    client = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=handler).test_client()
    counts = [trips(round_trips, lambda: post_signed(client, webhook_params()))[1] for _ in range(3)]
    assert counts == [2, 2, 2]


def test_a_handler_that_sends_still_costs_two(redis_url, round_trips):
    """The outbound messages go with the state in SAVE: no round trip of their own."""

    def sending(message, conversation):
        conversation.send("queued with the state")
        conversation.send("and another")
        return "ok"

    client = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=sending).test_client()
    response, count = trips(round_trips, lambda: post_signed(client, webhook_params()))
    assert response.status_code == 200
    assert count == 2
