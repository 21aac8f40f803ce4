"""EVENTS_NUMBERS=hashed: events carry a keyed hash (HMAC-SHA256 with EVENTS_HASH_KEY) of each
number instead of the number, the same every time, so that consumers can still join on it."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.settings import ConfigError
from tests.support.app import TOKEN, post_signed, webhook_params
from tests.support.numbers import FINN, OURS, REY

KEY = "events-hash-key-of-this-test"


def hashed(number: str) -> str:
    return hmac.new(KEY.encode(), number.encode(), hashlib.sha256).hexdigest()[:32]


def test_events_carry_the_keyed_hash_of_each_number(redis_url, redis_client):
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "EVENTS_NUMBERS": "hashed",
            "EVENTS_HASH_KEY": KEY,
            "CONVERSATION_TTL": 1,
            "OPS_TOKEN": "ops",
        }
    )
    client = app.test_client()
    for sender in (REY, FINN, REY):
        assert post_signed(client, webhook_params(sender=sender)).status_code == 200
    client.delete(f"/ops/conversations/{FINN}/{OURS}", headers={"Authorization": "Bearer ops"})
    time.sleep(1.1)
    assert Sweeper(app).sweep() == 1  # REY's, expired
    events = [fields for _, fields in redis_client.xrange(Keys().events)]
    assert [(e["type"], e["from"], e["to"]) for e in events] == [
        ("started", hashed(REY), hashed(OURS)),
        ("started", hashed(FINN), hashed(OURS)),
        ("ended", hashed(FINN), hashed(OURS)),
        ("ended", hashed(REY), hashed(OURS)),
    ]
    shown = app.test_cli_runner().invoke(args=["events", "--json"]).output
    assert REY not in shown
    assert hashed(REY) in shown


def test_plain_by_default(redis_url, redis_client):
    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url})
    assert post_signed(app.test_client(), webhook_params(sender=REY)).status_code == 200
    [(_, started)] = redis_client.xrange(Keys().events)
    assert started["from"] == REY


@pytest.mark.parametrize("key", [None, "short"])
def test_hashed_needs_a_key_of_16_characters(key):
    with pytest.raises(ConfigError, match="EVENTS_HASH_KEY"):
        create_app({"TWILIO_AUTH_TOKEN": TOKEN, "EVENTS_NUMBERS": "hashed", "EVENTS_HASH_KEY": key})
