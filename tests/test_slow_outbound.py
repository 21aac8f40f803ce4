"""A slow handler's replies leave through the outbound sender (tests/test_outbound.py's stand-in
of Twilio's API): Twilio's webhook request gets an empty answer at once, the handler's sends
leave while it runs, the reply arrives later through the REST API, in order with the replies of
the messages queued behind it; past HANDLER_TIMEOUT, or once its lock lapsed, a run sends
nothing more."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from service.lifecycle import Sweeper
from service.responses import NO_REPLY
from service.sender import Sender
from service.store import ConversationStore
from tests.support.numbers import OURS, REY
from tests.support.standin import StandinServer
from tests.support.waiting import wait_until
from tests.test_console import OPS, sign_in
from tests.test_outbound import bodies, drain, make, records, text
from tests.test_slow_handlers import KEYS, settled, state


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


def slow(standin, redis_url, handler, **overrides):
    return make(standin, redis_url, handler, HANDLER_INLINE_BUDGET=0.1, LOCK_TTL=1.0, **overrides)


def test_a_slow_handlers_sends_leave_at_once_and_its_reply_after_the_acknowledgement(
    standin, redis_url, redis_client
):
    """'One moment…' (sent within the budget) leaves with the deferral, 'Almost there…' (sent
    past it) at once, both while the handler is still blocked; the reply when it returns, then
    the replies of the messages queued behind it, in order."""
    go_on, finish, sent = threading.Event(), threading.Event(), threading.Event()

    def handle(message, conversation):
        if message.body == "plan my trip":
            conversation.send("One moment…")
            go_on.wait(5)
            conversation.send("Almost there…")
            sent.set()
            finish.wait(5)
        conversation.setdefault("asked", []).append(message.body)
        return f"Here is your answer to: {message.body}"

    app = slow(standin, redis_url, handle, TRANSCRIPTS=True)
    client = app.test_client()
    answer = text(client, "plan my trip")
    assert answer.get_data(as_text=True) == NO_REPLY
    for body in ("and hotels", "and a car"):
        assert text(client, body).get_data(as_text=True) == NO_REPLY
    drain(Sender(app))
    assert bodies(standin, REY) == ["One moment…"]  # while the handler is blocked
    go_on.set()
    sent.wait(5)

    def almost_there() -> bool:
        drain(Sender(app))
        return bodies(standin, REY) == ["One moment…", "Almost there…"]

    wait_until(almost_there, seconds=5, what="the interim message delivered")
    assert not finish.is_set() and state(redis_client) == {}  # the handler still runs
    finish.set()
    wait_until(lambda: settled(redis_client), seconds=10, what="the three saved")
    drain(Sender(app))
    assert bodies(standin, REY) == [
        "One moment…",
        "Almost there…",
        "Here is your answer to: plan my trip",
        "Here is your answer to: and hotels",
        "Here is your answer to: and a car",
    ]
    assert state(redis_client) == {"asked": ["plan my trip", "and hotels", "and a car"]}
    assert redis_client.hget(KEYS.conversation, "seq") == "3"
    transcript = [json.loads(raw)["body"] for raw in redis_client.lrange(KEYS.transcript, 0, 4)]
    assert transcript == [  # the interim messages with their message, in the order they left
        "plan my trip",
        "One moment…",
        "Almost there…",
        "Here is your answer to: plan my trip",
        "and hotels",
    ]


def test_past_handler_timeout_a_send_is_dropped_and_the_timeout_reply_goes_out(
    standin, redis_url, redis_client
):
    """What it sent before the timeout went out (not recalled); what the abandoned handler
    sends after it goes nowhere, and nothing of its state is saved."""
    release, after = threading.Event(), threading.Event()

    def handle(message, conversation):
        conversation.send("working on it")
        conversation["touched"] = True
        release.wait(5)
        conversation.send("too late to say")
        after.set()
        return "too late"

    app = slow(
        standin, redis_url, handle, HANDLER_TIMEOUT=0.5, HANDLER_TIMEOUT_REPLY="Sorry, that took too long."
    )
    assert text(app.test_client(), "hello").get_data(as_text=True) == NO_REPLY
    wait_until(lambda: settled(redis_client), seconds=10, what="the timeout")
    release.set()
    assert after.wait(5)
    drain(Sender(app))
    assert bodies(standin, REY) == ["working on it", "Sorry, that took too long."]
    assert len(records(redis_client)) == 2
    assert state(redis_client) == {}


@pytest.mark.parametrize("fails", ["timeout", "error"])
@pytest.mark.parametrize("first", [True, False], ids=["first-message", "in-a-conversation"])
def test_a_failed_runs_message_and_what_went_out_are_in_the_transcript_once(
    standin, redis_url, redis_client, fails, first
):
    """Past HANDLER_TIMEOUT, or raising past the webhook, a run saves no state, but its message,
    what it sent within the budget and past it, and the timeout's reply went out: each is in
    the transcript once, in order, the message marked with the outcome; the next message's
    entries follow. As a conversation's first message (none stored) or within one (kept to its
    end plus the retention)."""
    release = threading.Event()

    def handle(message, conversation):
        if message.body in ("hi", "next"):
            return f"reply to {message.body}"
        conversation.send("one moment")
        time.sleep(0.3)  # past the budget
        conversation.send("almost there")
        if fails == "error":
            raise RuntimeError("the booking system is down")
        release.wait(5)
        return "too late"

    app = slow(
        standin,
        redis_url,
        handle,
        TRANSCRIPTS=True,
        OPS_TOKEN=OPS,
        HANDLER_TIMEOUT=1.0,
        HANDLER_TIMEOUT_REPLY="Sorry, that took too long.",
    )
    client, sid = app.test_client(), "SM" + "1" * 32
    before = [] if first else [("in", "hi", None), ("out", "reply to hi", None)]
    if not first:
        assert "reply to hi" in text(client, "hi").get_data(as_text=True)
        conversation_ends = redis_client.zscore(KEYS.index_shard, KEYS.member)
    assert text(client, "book it", message_sid=sid).get_data(as_text=True) == NO_REPLY
    wait_until(lambda: settled(redis_client), seconds=10, what="the failed run's save")
    release.set()
    assert text(client, "book it", message_sid=sid).get_data(as_text=True) == NO_REPLY  # a redelivery
    if not first:  # kept to the conversation's end plus the retention (30 days)
        retention_ms = 30 * 86400 * 1000
        assert (
            redis_client.pttl(KEYS.transcript)
            >= conversation_ends + retention_ms - time.time() * 1000 - 60_000
        )
    assert "reply to next" in text(client, "next").get_data(as_text=True)  # inline
    drain(Sender(app))
    went_out = ["one moment", "almost there"] + (["Sorry, that took too long."] if fails == "timeout" else [])
    assert bodies(standin, REY) == went_out
    entries = [json.loads(raw) for raw in redis_client.lrange(KEYS.transcript, 0, -1)]
    written = [
        (entry["dir"], entry.get("body"), entry.get("outcome"))
        for entry in entries
        if entry["dir"] != "status"
    ]
    assert written == [
        *before,
        ("in", "book it", fails),
        *[("out", body, None) for body in went_out],
        ("in", "next", None),
        ("out", "reply to next", None),
    ]
    assert redis_client.pttl(KEYS.transcript) > 0
    shown = app.test_cli_runner().invoke(args=["transcript", REY, OURS])
    assert f"<- book it (handler {fails}: nothing saved)" in shown.output
    console = app.test_client()
    sign_in(console, OPS)
    page = console.get("/console/conversation", query_string={"from": REY, "to": OURS})
    assert f"handler {fails}: nothing saved" in page.get_data(as_text=True)


def test_a_run_that_lost_its_lock_sends_nothing_more(standin, redis_url, redis_client, caplog):
    """The first run's lease lapses (its process stalled) and the sweeper runs the message again:
    the first run's later send is refused by its token; the interim message both runs sent
    within the budget goes twice (at least once), the reply once."""
    first_started, first_go = threading.Event(), threading.Event()
    runs = []

    def handle(message, conversation):
        runs.append(message.body)
        conversation.send("one moment")
        if len(runs) == 1:
            first_started.set()
            first_go.wait(5)
            conversation.send("from the stalled run")
            return "answer of the stalled run"
        return "answer of the second run"

    app = slow(standin, redis_url, handle)
    assert text(app.test_client(), "hello").get_data(as_text=True) == NO_REPLY
    first_started.wait(5)
    redis_client.delete(KEYS.lock)  # the lease lapses
    redis_client.zadd(KEYS.pending, {KEYS.member: 0})
    Sweeper(app).sweep()
    wait_until(lambda: settled(redis_client), seconds=5, what="the second run's save")
    first_go.set()
    # Its save writes nothing, and says so: the message's answer is the second run's.
    wait_until(
        lambda: "handler superseded" in [record.getMessage() for record in caplog.records],
        seconds=5,
        what="the stalled run's save",
    )
    lines = [record.getMessage() for record in caplog.records]
    assert lines.count("handler replied") == 1  # the second run's
    [late] = [record for record in caplog.records if record.getMessage() == "handler superseded"]
    assert late.levelname == "WARNING"
    assert late.fields["outcome"] == "superseded" and "saved already" in late.fields["reason"]
    assert "handler send dropped" in lines
    drain(Sender(app))
    assert bodies(standin, REY) == ["one moment", "one moment", "answer of the second run"]


def test_an_interim_send_redis_did_not_take_goes_with_the_next_one_in_order(
    standin, redis_url, redis_client, monkeypatch
):
    """Redis unavailable for a send's INTERIM: the message is kept, ahead of the next send, and
    both leave in order when Redis takes that one."""
    first_sent, second = threading.Event(), threading.Event()
    failed = []
    interim = ConversationStore.interim

    def once_unavailable(self, *args, **kwargs):
        if not failed:
            failed.append(True)
            first_sent.set()
            raise redis.ConnectionError("Redis went away")
        return interim(self, *args, **kwargs)

    monkeypatch.setattr(ConversationStore, "interim", once_unavailable)

    def handle(message, conversation):
        time.sleep(0.3)  # past the budget: its sends leave through INTERIM
        conversation.send("first")
        second.wait(5)
        conversation.send("second")
        return "answer"

    app = slow(standin, redis_url, handle)
    assert text(app.test_client(), "hello").get_data(as_text=True) == NO_REPLY
    assert first_sent.wait(5)
    second.set()
    wait_until(lambda: settled(redis_client), seconds=5, what="the save")
    drain(Sender(app))
    assert bodies(standin, REY) == ["first", "second", "answer"]
