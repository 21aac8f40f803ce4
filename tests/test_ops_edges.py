"""Operators' views at their edges, on a real Redis: senders whose digits are not ASCII, and
the ``/ops`` API's answers to methods it does not serve, with and without ``OPS_TOKEN``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.keys import Keys, shard_of
from tests.support.app import make_app, post_signed, webhook_params
from tests.support.numbers import OURS
from tests.support.prometheus import scrape

OPS = "ops-test-token"
AUTH = {"Authorization": f"Bearer {OPS}"}
TAGS = {f"{n:02d}" for n in range(100)}


@given(st.text())
def test_every_sender_gets_one_of_the_100_tags(sender):
    assert shard_of(sender) in TAGS


def test_only_ascii_digits_form_the_tag():
    assert shard_of("+1555123٤٥") == "23"  # Arabic-Indic digits are skipped
    assert shard_of("+1555１２") == "55"
    assert shard_of("+1555²") == "55"
    assert shard_of("٤٥") == "00"


# Arabic-Indic, fullwidth and superscript digits: each str.isdigit(), none ASCII.
ODD_SENDERS = ["+1555123٤٥", "+1555１２３４", "+1555123²³"]


def test_senders_with_non_ascii_digits_are_counted_listed_and_gauged(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS)
    client = app.test_client()
    for sender in ODD_SENDERS:
        assert post_signed(client, webhook_params(sender=sender)).status_code == 200
    tags = {re.search(r"\{(.*?)\}", key).group(1) for key in redis_client.keys("*{*")}  # tagged keys
    assert tags <= TAGS
    assert client.get("/ops/stats", headers=AUTH).get_json()["active"] == len(ODD_SENDERS)
    listed = client.get("/ops/conversations", headers=AUTH).get_json()["conversations"]
    assert sorted(row["from"] for row in listed) == sorted(ODD_SENDERS)
    gauge = scrape(client.get("/metrics").get_data(as_text=True))["sms_active_conversations"]
    assert gauge == len(ODD_SENDERS)
    for sender in ODD_SENDERS:  # and each is found, shown and ended by its number
        keys = Keys().conversation(sender, OURS)
        assert redis_client.zscore(keys.index_shard, keys.member) is not None
        assert client.delete(f"/ops/conversations/{sender}/{OURS}", headers=AUTH).status_code == 200
    assert client.get("/ops/stats", headers=AUTH).get_json()["active"] == 0


OPS_PATHS = (
    "/ops",
    "/ops/stats",
    "/ops/conversations",
    f"/ops/conversations/+15551230001/{OURS}",
    "/ops/nothing-here",
)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def test_without_ops_token_every_method_on_ops_is_404(app):
    client = app.test_client()
    for path in OPS_PATHS:
        for method in METHODS:
            for headers in ({}, AUTH):
                response = client.open(path, method=method, headers=headers)
                assert response.status_code == 404, (method, path)
                assert "Allow" not in response.headers


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("POST", "/ops/stats", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/ops/conversations", {"GET", "HEAD", "OPTIONS"}),
        ("POST", f"/ops/conversations/+15551230001/{OURS}", {"GET", "HEAD", "OPTIONS", "DELETE"}),
    ],
)
def test_with_ops_token_a_405_says_what_is_allowed(redis_url, method, path, allowed):
    client = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS).test_client()
    for headers in ({}, AUTH):
        response = client.open(path, method=method, headers=headers)
        assert response.status_code == 405
        assert set(response.headers["Allow"].split(", ")) == allowed


@pytest.mark.parametrize("page", ["conversations", "outbox", "timers"])
def test_every_paged_view_takes_a_limit_from_1_to_1000_and_refuses_others(redis_url, page):
    client = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS).test_client()
    for good in ("1", "1000"):
        assert client.get(f"/ops/{page}?limit={good}", headers=AUTH).status_code == 200
    assert client.get(f"/ops/{page}", headers=AUTH).status_code == 200  # the default
    for bad in ("0", "1001", "ten", "2.5"):
        answer = client.get(f"/ops/{page}?limit={bad}", headers=AUTH)
        assert answer.status_code == 400
        assert answer.get_json() == {"error": "limit must be a whole number from 1 to 1000."}
