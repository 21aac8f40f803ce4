"""Operators see outbound messages: each conversation's with its status (``conversations show``,
the /ops API's conversation) and the outbox across tags (``sms-sessions outbox``,
``GET /ops/outbox``): queued, retrying and failed, bounded. The sender delivers to the Twilio
stand-in (a real socket) on a real redis-server; status callbacks come back over a real socket."""

from __future__ import annotations

import json
import time

import pytest

from service import create_app
from service.keys import Keys
from service.outbound_view import FAILURES_KEPT, OutboundView
from service.sender import Sender
from tests.support.app import sign, webhook_params
from tests.support.app_servers import LiveServer
from tests.support.numbers import FINN, OURS, POE, REY
from tests.support.standin import AUTH_TOKEN
from tests.support.waiting import wait_until

OPS = "outbound-view-ops-token"
AUTH = {"Authorization": f"Bearer {OPS}"}


def sends_what_it_is_told(message, conversation):
    """Each word of the message is one outbound message, in order."""
    for word in message.body.split():
        conversation.send(word)
    return None


def make(standin, redis_url, **overrides):
    config = {
        **standin.config(),
        "REDIS_URL": redis_url,
        "OPS_TOKEN": OPS,
        "DELIVERY_RETRY_BASE": 30,
        **overrides,
    }
    return create_app(config, handler=sends_what_it_is_told)


def text(app, body, sender=REY):
    params = webhook_params(sender=sender, recipient=OURS, body=body)
    base = app.config["PUBLIC_BASE_URL"] or "http://localhost"
    headers = {"X-Twilio-Signature": sign(base + "/sms", params, AUTH_TOKEN)}
    assert app.test_client().post("/sms", data=params, headers=headers).status_code == 200


def drain(app) -> None:
    sender = Sender(app)
    for _ in range(50):
        if not sender.send_due():
            return
    raise AssertionError("still sending")


def shown(app, sender=REY) -> dict:
    response = app.test_client().get(f"/ops/conversations/{sender}/{OURS}", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture
def served(standin, redis_url):
    """The app on a real socket with PUBLIC_BASE_URL, so that the stand-in's status callbacks
    reach it."""
    routed = {}
    with LiveServer(lambda environ, start_response: routed["app"](environ, start_response)) as server:
        routed["app"] = make(standin, redis_url, PUBLIC_BASE_URL=server.url.removesuffix("/sms"))
        yield routed["app"]


def test_a_conversation_shows_its_messages_in_commit_order_with_their_statuses(served, standin):
    app = served
    standin.fault(to=REY, count=1, fail=30003)  # the first is accepted, then undelivered
    text(app, "one two")
    text(app, "three")
    drain(app)
    wait_until(
        lambda: [m["status"] for m in shown(app)["outbound"]] == ["undelivered", "delivered", "delivered"],
        what="the callbacks' statuses",
    )
    outbound = shown(app)["outbound"]
    assert [m["body"] for m in outbound] == ["one", "two", "three"]
    assert [m["stage"] for m in outbound] == ["handed"] * 3
    assert outbound[0]["error_code"] == "30003"
    assert [m["sid"] for m in outbound] == [m["sid"] for m in standin.inbox()]
    assert all(m["queued_at"].endswith("Z") for m in outbound)

    cli = app.test_cli_runner()
    as_json = cli.invoke(args=["conversations", "show", REY, OURS, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["outbound"] == outbound
    as_text = cli.invoke(args=["conversations", "show", REY, OURS]).output
    lines = as_text.split("outbound:\n", 1)[1].splitlines()
    assert len(lines) == 3
    assert "handed/undelivered" in lines[0]
    assert "error=30003" in lines[0]
    assert lines[0].endswith('"one"')
    assert "handed/delivered" in lines[2]
    assert lines[2].endswith('"three"')


def test_a_conversation_that_sent_nothing_shows_none(standin, redis_url):
    app = make(standin, redis_url)
    text(app, "")
    assert shown(app)["outbound"] == []
    assert (
        app.test_cli_runner()
        .invoke(args=["conversations", "show", REY, OURS])
        .output.endswith("outbound: none\n")
    )


def outbox(app, *args):
    result = app.test_cli_runner().invoke(args=["outbox", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_outbox_lists_queued_retrying_and_failed_across_tags(standin, redis_url):
    app = make(standin, redis_url)
    standin.fault(to=FINN, count=1, answer=503)  # FINN's first waits for a retry (30 s)
    standin.fault(to=POE, error=21211)  # POE's fails for good
    text(app, "finn-1 finn-2", sender=FINN)
    text(app, "poe-1", sender=POE)
    drain(app)
    text(app, "rey-1", sender=REY)  # queued, no sender ran since

    found = outbox(app)
    assert [(m["to"], m["body"], m["stage"]) for m in found["pending"]] == [
        (REY, "rey-1", "queued"),  # due now: before FINN's, due after the backoff
        (FINN, "finn-1", "retrying"),
        (FINN, "finn-2", "queued"),  # behind its conversation's first, never before it
    ]
    assert found["pending"][1]["next_at"] > found["pending"][1]["queued_at"]
    assert [(m["to"], m["body"], m["status"], m["error_code"]) for m in found["failed"]] == [
        (POE, "poe-1", "failed", "21211")
    ]
    assert found["more"] is False
    api = app.test_client().get("/ops/outbox", headers=AUTH)
    assert api.status_code == 200
    assert api.get_json() == found

    table = app.test_cli_runner().invoke(args=["outbox"]).output
    assert "waiting: 3" in table
    assert f"{OURS} -> {FINN}" in table
    assert "queued/pending" in table
    assert "failed (the last day's): 1" in table
    assert "error=21211" in table


def test_the_outbox_is_bounded_and_says_so(standin, redis_url):
    app = make(standin, redis_url)
    text(app, "a b c", sender=REY)
    text(app, "d", sender=FINN)
    result = app.test_cli_runner().invoke(args=["outbox", "--json", "--limit", "2"])
    found = json.loads(result.stdout)
    assert len(found["pending"]) == 2
    assert found["more"] is True
    assert "--limit shows more" in result.stderr
    assert app.test_client().get("/ops/outbox?limit=0", headers=AUTH).status_code == 400
    assert app.test_client().get("/ops/outbox", headers={}).status_code == 401


def test_a_tags_failures_keep_the_latest(standin, redis_url, redis_client):
    app = make(standin, redis_url)
    view = OutboundView(redis_client, Keys())
    keys = Keys().conversation(REY, OURS)
    for n in range(FAILURES_KEPT + 5):
        view.note_failure(keys, f"id{n}")
        time.sleep(0.002)  # each its own ms: the order is by time
    entries = redis_client.zrange(Keys().failed("01"), 0, -1)
    assert len(entries) == FAILURES_KEPT
    assert entries[0] == f"id5|{REY}|{OURS}"
    assert redis_client.pttl(Keys().failed("01")) > 0
    assert outbox(app)["failed"] == []  # their records are gone (never written): left out
