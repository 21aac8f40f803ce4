"""Handlers that take their time (service/runs.py): past HANDLER_INLINE_BUDGET Twilio gets an
empty answer at once, the message is durable among the conversation's inbound messages, the
reply is committed with the state, messages that come meanwhile are handled after it in
order, each once; a run past HANDLER_TIMEOUT is stopped; a late save is refused.

Waits are shortened by the settings (a budget of 0.1 s, handlers of a fraction of a second):
the same paths as a 1 s budget and a 30 s handler."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.responses import NO_REPLY
from tests.support.app import TOKEN, post_signed, webhook_params
from tests.support.numbers import OURS, REY
from tests.support.prometheus import scrape
from tests.support.waiting import wait_until

KEYS = Keys().conversation(REY, OURS)
BUDGET = 0.1


def slow_app(redis_url, handler, **config):
    return create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "HANDLER_INLINE_BUDGET": BUDGET,
            "LOCK_TTL": 1.0,
            **config,
        },
        handler=handler,
    )


class Notebook:
    """A handler that notes each body it is called with (in call order) and in the state; a
    body ``slow`` waits until ``go`` is set (at most 5 s)."""

    def __init__(self):
        self.calls: list[str] = []
        self.go = threading.Event()

    def __call__(self, message, conversation):
        self.calls.append(message.body)
        if message.body.startswith("slow"):
            self.go.wait(5)
        conversation.setdefault("bodies", []).append(message.body)
        return f"noted {message.body}"


def settled(redis_client) -> bool:
    """No inbound message left and the lock free: every run saved."""
    return not redis_client.exists(KEYS.inbound) and not redis_client.exists(KEYS.lock)


def state(redis_client) -> dict:
    return json.loads(redis_client.hget(KEYS.conversation, "state") or "{}")


def test_a_slow_handler_gets_twilio_an_empty_answer_and_saves_once(redis_url, redis_client):
    notebook = Notebook()
    client = slow_app(redis_url, notebook).test_client()
    params = webhook_params(body="slow one")
    answer = post_signed(client, params)
    assert answer.status_code == 200
    assert answer.get_data(as_text=True) == NO_REPLY
    assert redis_client.lrange(KEYS.inbound, 0, -1)[0].startswith(params["MessageSid"] + " ")  # durable
    notebook.go.set()
    wait_until(lambda: settled(redis_client), seconds=5, what="the slow run's save")
    assert state(redis_client) == {"bodies": ["slow one"]}
    assert redis_client.hget(KEYS.conversation, "seq") == "1"
    assert notebook.calls == ["slow one"]
    assert redis_client.zcard(KEYS.pending) == 0


def test_a_fast_handler_still_answers_inline(redis_url, redis_client):
    client = slow_app(redis_url, Notebook()).test_client()
    answer = post_signed(client, webhook_params(body="quick"))
    assert "<Message>noted quick</Message>" in answer.get_data(as_text=True)
    assert not redis_client.exists(KEYS.inbound)


def test_an_async_handler_answers_inline_or_later(redis_url, redis_client):
    calls = []

    async def handle(message, conversation):
        calls.append(message.body)
        if message.body == "slow":
            await asyncio.sleep(0.5)
        conversation["last"] = message.body
        return f"async {message.body}"

    client = slow_app(redis_url, handle).test_client()
    assert "<Message>async quick</Message>" in post_signed(client, webhook_params(body="quick")).get_data(
        as_text=True
    )
    assert post_signed(client, webhook_params(body="slow")).get_data(as_text=True) == NO_REPLY
    wait_until(lambda: settled(redis_client), seconds=5, what="the async run's save")
    assert state(redis_client) == {"last": "slow"}
    assert redis_client.hget(KEYS.conversation, "seq") == "2"
    assert calls == ["quick", "slow"]


def test_messages_during_a_slow_handler_are_acknowledged_and_handled_after_in_order(redis_url, redis_client):
    notebook = Notebook()
    client = slow_app(redis_url, notebook).test_client()
    assert post_signed(client, webhook_params(body="slow first")).get_data(as_text=True) == NO_REPLY
    later = [webhook_params(body=body) for body in ("a", "b", "c")]
    for params in later:
        answer = post_signed(client, params)
        assert answer.get_data(as_text=True) == NO_REPLY
    assert post_signed(client, later[1]).get_data(as_text=True) == NO_REPLY  # a redelivery meanwhile
    assert notebook.calls == ["slow first"]  # the others wait their turn
    notebook.go.set()
    wait_until(lambda: settled(redis_client), seconds=5, what="all four saved")
    assert state(redis_client) == {"bodies": ["slow first", "a", "b", "c"]}
    assert notebook.calls == ["slow first", "a", "b", "c"]
    assert redis_client.hget(KEYS.conversation, "seq") == "4"
    assert post_signed(client, later[2]).get_data(as_text=True) == NO_REPLY  # its reply went out already
    assert notebook.calls == ["slow first", "a", "b", "c"]


def test_a_redelivery_of_the_running_message_does_not_run_it_again(redis_url, redis_client):
    notebook = Notebook()
    client = slow_app(redis_url, notebook).test_client()
    params = webhook_params(body="slow")
    post_signed(client, params)
    assert post_signed(client, params).get_data(as_text=True) == NO_REPLY
    notebook.go.set()
    wait_until(lambda: settled(redis_client), seconds=5, what="the save")
    assert post_signed(client, params).get_data(as_text=True) == NO_REPLY
    assert notebook.calls == ["slow"]
    assert redis_client.hget(KEYS.conversation, "seq") == "1"


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_handler_past_handler_timeout_is_stopped_and_the_next_message_goes_on(
    redis_url, redis_client, caplog, kind
):
    cancelled = threading.Event()
    release = threading.Event()

    def plain(message, conversation):
        conversation["seen"] = message.body
        if message.body == "hang":
            release.wait(5)
        return "done"

    async def in_loop(message, conversation):
        conversation["seen"] = message.body
        if message.body == "hang":
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "done"

    app = slow_app(redis_url, plain if kind == "plain" else in_loop, HANDLER_TIMEOUT=0.5)
    client = app.test_client()
    post_signed(client, webhook_params(body="before"))
    post_signed(client, webhook_params(body="hang"))
    post_signed(client, webhook_params(body="after"))  # queued behind it
    wait_until(lambda: settled(redis_client), seconds=5, what="the timeout and the next message")
    assert state(redis_client) == {"seen": "after"}  # 'hang' saved nothing
    assert redis_client.hget(KEYS.conversation, "seq") == "2"
    if kind == "async":
        assert cancelled.is_set()
    release.set()
    samples = scrape(app.test_client().get("/metrics").get_data(as_text=True))
    assert samples["sms_handler_timeouts_total"] == 1
    lines = [record for record in caplog.records if "HANDLER_TIMEOUT" in str(getattr(record, "fields", ""))]
    assert len(lines) == 1


def test_a_late_save_is_refused_and_the_message_commits_once(redis_url, redis_client):
    """The first run's lock lapses (as if its process had stopped renewing): the sweeper claims
    the message and runs it again; the first run's save comes last and is refused."""
    first_started, first_go = threading.Event(), threading.Event()
    calls = []

    def handle(message, conversation):
        calls.append(message.body)
        if len(calls) == 1:
            first_started.set()
            first_go.wait(5)
            conversation["by"] = "first run"
        else:
            conversation["by"] = "second run"
        return "ok"

    app = slow_app(redis_url, handle)
    post_signed(app.test_client(), webhook_params(body="twice"))
    first_started.wait(5)
    redis_client.delete(KEYS.lock)  # the lease lapses
    redis_client.zadd(KEYS.pending, {KEYS.member: 0})
    Sweeper(app).sweep()
    wait_until(lambda: settled(redis_client), seconds=5, what="the second run's save")
    first_go.set()
    time.sleep(0.3)  # the first run's save, refused
    assert calls == ["twice", "twice"]
    assert state(redis_client) == {"by": "second run"}
    assert redis_client.hget(KEYS.conversation, "seq") == "1"


def test_handler_settings_are_checked(redis_url):
    from service.settings import ConfigError, load

    with pytest.raises(ConfigError, match="HANDLER_INLINE_BUDGET=5: must stay under HANDLER_TIMEOUT"):
        create_app({"REDIS_URL": redis_url, "HANDLER_INLINE_BUDGET": 5.0, "HANDLER_TIMEOUT": 2.0})
    with pytest.raises(ConfigError, match=r"^HANDLER_TIMEOUT='0': must be a number of seconds, from 0.1"):
        load({"HANDLER_TIMEOUT": "0"})


def test_a_reply_past_the_webhook_becomes_the_outbound_messages_that_carry_it():
    from twilio.twiml.messaging_response import MessagingResponse

    from service.runs import outbound

    reply = MessagingResponse()
    reply.message("first")
    second = reply.message("second & more")
    second.media("https://example.com/a.png")
    assert outbound(reply) == [("first", ()), ("second & more", ("https://example.com/a.png",))]
    assert outbound("plain text") == [("plain text", ())]
    assert outbound(None) == []
    with pytest.raises(TypeError, match="returned a int"):
        outbound(3)  # type: ignore[arg-type]


def test_a_due_timer_waits_for_a_slow_run_and_the_run_keeps_the_timers_it_sets(redis_url, redis_client):
    """A timer falls due while a slow handler's run holds the conversation: the sweeper's pass
    fires nothing and leaves no ticket in the line (the run's save is not held up); the run's
    save stores the timer it set; the next pass fires both, after the slow message."""
    go = threading.Event()

    def handle(message, conversation):
        log = conversation.setdefault("log", [])
        if message.kind == "timer":
            log.append(f"timer:{message.timer}")
            return None
        log.append(message.body)
        if message.body == "early":
            conversation.remind(0.1, "early", cancel_on_reply=False)
        if message.body == "slow":
            go.wait(5)
            conversation.remind(0, "late")
        return "ok"

    app = slow_app(redis_url, handle)
    client = app.test_client()
    assert "<Message>ok</Message>" in post_signed(client, webhook_params(body="early")).get_data(as_text=True)
    assert post_signed(client, webhook_params(body="slow")).get_data(as_text=True) == NO_REPLY
    time.sleep(0.15)  # "early" is due
    sweeper = Sweeper(app)
    sweeper.sweep()
    assert sweeper.fired == 0
    assert redis_client.get(KEYS.lock).startswith(redis_client.lindex(KEYS.inbound, 0).split(" ")[0])
    assert redis_client.zcard(KEYS.queue) == 0  # the pass's ticket given back
    go.set()
    wait_until(lambda: settled(redis_client), seconds=5, what="the slow run's save")
    assert set(json.loads(redis_client.hget(KEYS.conversation, "timers"))) == {"early", "late"}
    sweeper.sweep()
    log = state(redis_client)["log"]
    assert log[:2] == ["early", "slow"] and sorted(log[2:]) == ["timer:early", "timer:late"]
    assert redis_client.hget(KEYS.conversation, "timers") is None
