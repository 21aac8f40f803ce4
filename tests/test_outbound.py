"""Outbound messages from a handler: queued in the same SAVE as the state, delivered by the
sender through twilio-python's client to the Twilio stand-in (a real socket), on a real
redis-server; retries, permanent errors and per-conversation order."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from flask import request

from service import create_app, send
from service.handler import Conversation
from service.keys import Keys
from service.sender import Sender
from service.wiring import current
from tests.support import status_handler
from tests.support.app import sign, webhook_params
from tests.support.app_servers import LiveServer
from tests.support.numbers import FINN, OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN
from tests.support.waiting import wait_until


def make(standin, redis_url, handler, **overrides):
    config = {**standin.config(), "REDIS_URL": redis_url, "DELIVERY_RETRY_BASE": 0.1, **overrides}
    return create_app(config, handler=handler)


def text(client, body, sender=REY, recipient=OURS, **extra):
    """A signed inbound message (signed with the stand-in account's token, the app's)."""
    params = webhook_params(sender=sender, recipient=recipient, body=body, **extra)
    base = client.application.config["PUBLIC_BASE_URL"] or "http://localhost"
    headers = {"X-Twilio-Signature": sign(base + "/sms", params, AUTH_TOKEN)}
    return client.post("/sms", data=params, headers=headers)


def records(redis_client, sender=REY, recipient=OURS) -> list[dict]:
    """The conversation's outbound records (message and state), in queue order by id order of
    the queue's commit: sorted by the state's first time."""
    keys = Keys().conversation(sender, recipient)
    raw = redis_client.hgetall(keys.sent)
    found = []
    for name, value in raw.items():
        if not name.endswith(":s"):
            found.append({**json.loads(value), **json.loads(raw[name + ":s"])})
    return found


def drain(sender: Sender, passes: int = 50) -> None:
    """Passes until one finds nothing due (bounded)."""
    for _ in range(passes):
        if not sender.send_due():
            return
    raise AssertionError(f"still sending after {passes} passes")


def held(standin, to=REY) -> list[dict]:
    """Every message the stand-in holds for ``to`` (whatever its status), oldest first."""
    return [message for message in standin.inbox() if message["to"] == to]


def bodies(standin, to=REY) -> list[str]:
    return [message["body"] for message in held(standin, to)]


def test_a_handler_that_sends_and_raises_sends_nothing(standin, redis_url, redis_client):
    def handler(message, conversation):
        conversation.send("You are booked for 3 pm")
        raise RuntimeError("after sending")

    app = make(standin, redis_url, handler)
    assert text(app.test_client(), "book").status_code == 500
    drain(Sender(app))
    assert standin.inbox() == []
    assert records(redis_client) == []


def test_a_handler_that_sends_and_saves_sends_exactly_once(standin, redis_url, redis_client):
    def handler(message, conversation):
        conversation["n"] = conversation.get("n", 0) + 1
        conversation.send(f"Reminder {conversation['n']}", media=["https://example.com/a.png"])
        return "ok"

    app = make(standin, redis_url, handler)
    client = app.test_client()
    params = webhook_params(sender=REY, recipient=OURS, body="hi")
    headers = {"X-Twilio-Signature": sign("http://localhost/sms", params, AUTH_TOKEN)}
    assert client.post("/sms", data=params, headers=headers).status_code == 200
    assert client.post("/sms", data=params, headers=headers).status_code == 200  # a redelivery
    sender = Sender(app)
    drain(sender)
    drain(sender)
    [delivered] = held(standin, REY)
    assert delivered["body"] == "Reminder 1"
    assert delivered["from"] == OURS
    assert delivered["media_urls"] == ["https://example.com/a.png"]
    [record] = records(redis_client)
    assert record["sid"] == delivered["sid"]
    assert record["stage"] == "handed"
    assert record["attempts"] == 1


def test_per_conversation_order_is_commit_order(standin, redis_url):
    def handler(message, conversation):
        for n in range(3):
            conversation.send(f"{message.body}-{n}")
        return None

    app = make(standin, redis_url, handler)
    client = app.test_client()
    for body in ("a", "b", "c"):
        assert text(client, body).status_code == 200
        assert text(client, body, sender=FINN).status_code == 200
    drain(Sender(app))
    expected = [f"{body}-{n}" for body in "abc" for n in range(3)]
    assert bodies(standin, REY) == expected
    assert bodies(standin, FINN) == expected


def test_429_then_success(standin, redis_url, redis_client):
    app = make(standin, redis_url, lambda message, conversation: conversation.send("after a 429"))
    standin.fault(to=REY, count=1, answer=429)
    assert text(app.test_client(), "hi").status_code == 200
    sender = Sender(app)
    sender.send_due()
    [waiting] = records(redis_client)
    assert waiting["stage"] == "retrying"
    assert held(standin, REY) == []
    for _ in range(100):
        if bodies(standin, REY):
            break
        sender.stopping.wait(0.05)
        sender.send_due()
    assert bodies(standin, REY) == ["after a 429"]
    [record] = records(redis_client)
    assert record["attempts"] == 2
    assert record["stage"] == "handed"


def test_a_permanent_error_is_recorded_with_twilios_code(standin, redis_url, redis_client):
    def handler(message, conversation):
        conversation.send("to nowhere")
        conversation.send("next one still goes")

    app = make(standin, redis_url, handler)
    standin.fault(to=REY, count=1, error=21211)
    assert text(app.test_client(), "hi").status_code == 200
    drain(Sender(app))
    first, second = sorted(records(redis_client), key=lambda record: record["body"] != "to nowhere")
    assert (first["status"], first["error_code"]) == ("failed", "21211")
    assert first["stage"] == "failed"
    assert second["stage"] == "handed"
    assert bodies(standin, REY) == ["next one still goes"]


def test_nothing_is_queued_without_a_send_and_the_save_stays_one_round_trip(standin, redis_url, redis_client):
    app = make(standin, redis_url, lambda message, conversation: "no send")
    assert text(app.test_client(), "hi").status_code == 200
    keys = Keys().conversation(REY, OURS)
    assert redis_client.exists(keys.outbound, keys.sent) == 0
    assert redis_client.zcard(keys.due) == 0


@pytest.fixture
def served(standin, redis_url):
    """The app on a real socket, built with PUBLIC_BASE_URL pointing at that socket: the
    stand-in posts its signed status callbacks there. ``updates``: what the handler module's
    ``on_status`` heard; ``app.callbacks``: each callback's answer."""
    routed = {}
    with LiveServer(lambda environ, start_response: routed["app"](environ, start_response)) as server:
        public = server.url.removesuffix("/sms")
        app = make(standin, redis_url, status_handler.handle, PUBLIC_BASE_URL=public)
        app.callbacks = []

        @app.after_request
        def count(response):
            if request.path == "/sms/status":
                app.callbacks.append(response.status_code)
            return response

        routed["app"] = app
        status_handler.UPDATES.clear()
        yield app, Sender(app), status_handler.UPDATES


def test_status_callbacks_reach_the_record_and_on_status(served, standin, redis_client):
    app, sender, updates = served
    assert text(app.test_client(), "hi").status_code == 200
    drain(sender)
    # The three callbacks answered: on_status runs after the record is written.
    wait_until(lambda: len(app.callbacks) == 3, what="the three callbacks")
    [record] = records(redis_client)
    assert record["status"] == "delivered"
    assert [update.status for update in updates] == ["queued", "sent", "delivered"]
    assert {update.sid for update in updates} == {record["sid"]}
    assert updates[0].to == REY
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'sms_outbound_messages_total{status="delivered"} 1.0' in metrics


def test_callbacks_out_of_order_end_on_the_terminal_status(served, standin, redis_client):
    app, sender, updates = served
    standin.fault(to=REY, callbacks="reversed")
    assert text(app.test_client(), "hi").status_code == 200
    drain(sender)
    wait_until(lambda: len(standin.state.messages) == 1, what="the message stored")
    sid = records(redis_client)[0]["sid"]
    wait_until(lambda: len(app.callbacks) == 3, what="the three callbacks")
    assert app.callbacks == [204, 204, 204]
    assert records(redis_client)[0]["status"] == "delivered"
    assert records(redis_client)[0]["sid"] == sid
    # 'delivered' came first; the later 'sent' and 'queued' were ignored. The create's own
    # answer, 'queued', may have been recorded before it, and then told by the sender's thread
    # before or after the callback's request tells 'delivered' (docs/outbound.md): what was
    # told is each move up once, pending -> queued -> delivered or pending -> delivered.
    told = sorted((update.previous, update.status) for update in updates)
    assert told in ([("pending", "queued"), ("queued", "delivered")], [("pending", "delivered")])


def test_a_failure_callback_records_twilios_error_code(served, standin, redis_client):
    app, sender, updates = served
    standin.fault(to=REY, fail=30003)
    assert text(app.test_client(), "hi").status_code == 200
    drain(sender)
    wait_until(lambda: updates and updates[-1].status == "undelivered", what="undelivered told")
    assert records(redis_client)[0]["status"] == "undelivered"
    assert records(redis_client)[0]["error_code"] == "30003"
    assert updates[-1].error_code == "30003"


def test_an_unsigned_or_forged_status_callback_is_403(served, redis_client):
    app, _, updates = served
    client = app.test_client()
    form = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered", "AccountSid": ACCOUNT_SID}
    url = f"/sms/status?m=x|{REY}|{OURS}"
    assert client.post(url, data=form).status_code == 403
    forged = client.post(url, data=form, headers={"X-Twilio-Signature": "forged"})
    assert forged.status_code == 403
    signed = sign(app.config["PUBLIC_BASE_URL"] + url, form, AUTH_TOKEN)
    assert client.post(url, data=form, headers={"X-Twilio-Signature": signed}).status_code == 404
    unmarked = sign(app.config["PUBLIC_BASE_URL"] + "/sms/status", form, AUTH_TOKEN)
    assert client.post("/sms/status", data=form, headers={"X-Twilio-Signature": unmarked}).status_code == 400
    assert updates == []


def test_a_conversation_keeps_the_records_of_its_latest_messages(standin, redis_url, redis_client):
    """Records of messages handed over go once a conversation holds 200, down to its latest
    100; a conversation that sends on and on does not grow without bound."""

    def chatty(message, conversation):
        for n in range(70):
            conversation.send(f"{message.body}-{n}")

    app = make(standin, redis_url, chatty)
    for body in ("a", "b", "c"):
        assert text(app.test_client(), body).status_code == 200
    drain(Sender(app), passes=100)
    assert len(held(standin)) == 210
    kept = records(redis_client)
    assert 100 <= len(kept) < 200
    assert {record["body"] for record in kept} >= {f"c-{n}" for n in range(70)}


def test_a_conversation_with_a_longer_ttl_of_its_own_keeps_its_records_to_its_end(
    standin, redis_url, redis_client
):
    """expire_after(2 days): the records of its outbound messages live at least as long as its
    hash, past its end, when queued and when the sender records the outcome."""

    def handler(message, conversation):
        conversation.expire_after(timedelta(days=2))
        conversation.send("see you in two days")

    app = make(standin, redis_url, handler)
    assert text(app.test_client(), "hi").status_code == 200
    keys = Keys().conversation(REY, OURS)
    two_days = 2 * 86400 * 1000

    def kept_to_the_end() -> None:
        records_left = redis_client.pttl(keys.sent)
        end_left = redis_client.zscore(keys.index_shard, keys.member) - time.time() * 1000
        assert records_left >= redis_client.pttl(keys.conversation) > end_left > two_days - 60_000

    kept_to_the_end()  # queued with the save
    drain(Sender(app))
    assert bodies(standin) == ["see you in two days"]
    kept_to_the_end()  # the sender's outcome


def test_the_end_hook_cannot_queue_into_the_ended_conversation():
    """Its conversation is never saved again: a send there would be silently lost."""
    ended = Conversation({}, sid="x", sender=REY, recipient=OURS)
    ended.ended_at = datetime.now(UTC)
    with pytest.raises(RuntimeError, match="service.send"):
        ended.send("too late")
    assert ended.outbound == []


def _busy_webhook(app, released: threading.Event) -> threading.Thread:
    """A webhook request held in flight (its handler waits for ``released``), from FINN."""
    answered = []
    thread = threading.Thread(target=lambda: answered.append(text(app.test_client(), "wait", sender=FINN)))
    thread.answered = answered  # type: ignore[attr-defined]
    thread.start()
    wait_until(lambda: current(app).webhook_load.serving == 1, what="the webhook request in flight")
    return thread


def _waiting_handler(released: threading.Event):
    def handler(message, conversation):
        assert released.wait(30)
        return "done"

    return handler


def test_the_sender_yields_to_the_webhook(standin, redis_url):
    """While a webhook request is in flight the process' sender hands Twilio one message every
    SENDER_YIELD (the first at once), and the rest once the webhook pauses."""
    released = threading.Event()
    app = make(standin, redis_url, _waiting_handler(released), SENDER_YIELD=30, HANDLER_INLINE_BUDGET=20)
    for n in range(3):
        send(REY, f"reminder {n}", app=app)
    request_thread = _busy_webhook(app, released)
    sending = threading.Thread(target=drain, args=(Sender(app),))
    sending.start()
    wait_until(lambda: len(held(standin)) == 1, what="the first message, at once")
    time.sleep(0.5)  # SENDER_YIELD is 30 s: the next waits for the webhook
    assert bodies(standin) == ["reminder 0"]
    released.set()
    request_thread.join(30)
    sending.join(30)
    assert request_thread.answered[0].status_code == 200  # type: ignore[attr-defined]
    assert bodies(standin) == ["reminder 0", "reminder 1", "reminder 2"]


def test_a_busy_webhook_never_stops_the_sender(standin, redis_url):
    """However long the webhook stays busy, a message goes out every SENDER_YIELD."""
    released = threading.Event()
    app = make(standin, redis_url, _waiting_handler(released), SENDER_YIELD=0.05, HANDLER_INLINE_BUDGET=20)
    for n in range(3):
        send(REY, f"reminder {n}", app=app)
    request_thread = _busy_webhook(app, released)
    try:
        drain(Sender(app))
        assert bodies(standin) == ["reminder 0", "reminder 1", "reminder 2"]
        assert current(app).webhook_load.serving == 1  # sent while the webhook was still busy
    finally:
        released.set()
        request_thread.join(30)


def test_the_outbox_backlog_is_a_metric(standin, redis_url):
    """What the senders have yet to hand Twilio: conversations due, and how late the latest is."""

    def gauges(app) -> dict[str, float]:
        scraped = app.test_client().get("/metrics").get_data(as_text=True)
        return {
            name: float(value)
            for name, _, value in (line.partition(" ") for line in scraped.splitlines())
            if name.startswith("sms_outbound_due_")
        }

    app = make(standin, redis_url, lambda message, conversation: None)
    assert gauges(app) == {"sms_outbound_due_conversations": 0.0, "sms_outbound_due_late_seconds": 0.0}
    send(REY, "one", app=app)
    send(FINN, "two", app=app)
    send(FINN, "three", app=app)
    time.sleep(0.05)
    waiting = gauges(app)
    assert waiting["sms_outbound_due_conversations"] == 2.0
    assert waiting["sms_outbound_due_late_seconds"] >= 0.05
    drain(Sender(app))
    assert gauges(app) == {"sms_outbound_due_conversations": 0.0, "sms_outbound_due_late_seconds": 0.0}
