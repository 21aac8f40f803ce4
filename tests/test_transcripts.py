"""Transcripts (TRANSCRIPTS=1): each message and its reply exactly once, in commit order, written
with the state; kept TRANSCRIPT_RETENTION after the end, capped at TRANSCRIPT_MAX; read by the
CLI, the API and the end hook."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
from twilio.twiml.messaging_response import MessagingResponse

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.simulator import TwilioSimulator, new_message_sid
from tests.support.app import TOKEN, post_signed, webhook_params
from tests.support.app_servers import Gunicorn
from tests.support.numbers import FINN, OURS, REY
from tests.support.waiting import wait_until

KEYS = Keys()
OPS = "ops-token-for-transcripts"


def echo(message, conversation):
    """Keeps the bodies in its state (their commit order), answers each; 'pic' with media,
    'slow' after a pause (so that others queue behind it), 'bye' ends."""
    if message.body.startswith("slow"):
        time.sleep(0.05)
    conversation.setdefault("bodies", []).append(message.body)
    if message.body == "bye":
        conversation.end()
    if message.body == "pic":
        reply = MessagingResponse()
        sent = reply.message("a picture")
        sent.media("https://example.com/a.png")
        reply.message("and words")
        return reply
    if message.body == "quiet":
        return None
    return f"got {message.body}"


def app_with(redis_url, handler=echo, **config):
    return create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "TRANSCRIPTS": True, "OPS_TOKEN": OPS, **config},
        handler=handler,
    )


def entries(redis_client, sender=REY):
    """The pair's transcript as stored: one JSON object per entry."""
    return [json.loads(raw) for raw in redis_client.lrange(KEYS.conversation(sender, OURS).transcript, 0, -1)]


def test_each_message_and_reply_once_in_commit_order(redis_url, redis_client):
    """20 messages, bursts of them at once behind a slow one, a TwiML reply with media, one
    without a reply, and a redelivered MessageSid: every inbound message is in the transcript
    once, in the order its state was saved, each followed by its reply."""
    app = app_with(redis_url)
    statuses: list[int] = []
    first = webhook_params(body="m0")
    statuses.append(post_signed(app.test_client(), first).status_code)
    for burst in range(4):  # a slow message and three more at once, queued behind it
        bodies = [f"slow{burst}", *(f"m{burst}.{n}" for n in range(3))]
        senders = [
            threading.Thread(
                target=lambda body=body: statuses.append(
                    post_signed(app.test_client(), webhook_params(body=body)).status_code
                )
            )
            for body in bodies
        ]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
    statuses.append(post_signed(app.test_client(), webhook_params(body="last")).status_code)
    statuses.append(post_signed(app.test_client(), webhook_params(body="pic")).status_code)
    statuses.append(post_signed(app.test_client(), webhook_params(body="quiet")).status_code)
    statuses.append(post_signed(app.test_client(), first).status_code)  # a redelivery of m0
    assert set(statuses) == {200}

    state = json.loads(redis_client.hget(KEYS.conversation(REY, OURS).conversation, "state"))
    saved_order = state["bodies"]
    assert len(saved_order) == 20
    kept = entries(redis_client)
    inbound = [entry["body"] for entry in kept if entry["dir"] == "in"]
    assert inbound == saved_order  # once each, in commit order
    sids = [entry["sid"] for entry in kept if entry["dir"] == "in"]
    assert len(set(sids)) == 20
    assert sids[0] == first["MessageSid"]
    replies = [entry["body"] for entry in kept if entry["dir"] == "out"]
    expected = []
    for body in saved_order:
        if body == "pic":
            expected += ["a picture", "and words"]
        elif body != "quiet":
            expected.append(f"got {body}")
    assert replies == expected
    for position, entry in enumerate(kept):  # each reply right after its message
        if entry["dir"] == "out" and entry["body"].startswith("got "):
            assert kept[position - 1]["body"] == entry["body"][4:]
    pictured = next(entry for entry in kept if entry["body"] == "a picture")
    assert pictured["media"] == ["https://example.com/a.png"]
    times = [int(entry["at"]) for entry in kept]
    assert times == sorted(times)
    conversation_id = redis_client.hget(KEYS.conversation(REY, OURS).conversation, "sid")
    assert {entry["conv"] for entry in kept} == {conversation_id}


def test_off_by_default_writes_no_transcript(redis_url, redis_client):
    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=echo)
    assert post_signed(app.test_client(), webhook_params(body="hello")).status_code == 200
    assert redis_client.exists(KEYS.conversation(REY, OURS).transcript) == 0


def test_cap_keeps_the_newest_entries(redis_url, redis_client):
    app = app_with(redis_url, TRANSCRIPT_MAX=5)
    for n in range(8):
        assert post_signed(app.test_client(), webhook_params(body=f"c{n}")).status_code == 200
    kept = entries(redis_client)
    assert [entry["body"] for entry in kept] == ["got c5", "c6", "got c6", "c7", "got c7"]


def test_retention_counts_from_the_end(redis_url, redis_client):
    """Live: the transcript outlives the conversation's scheduled end by the retention. Ended
    by the handler or an operator: by the retention from then; then it goes."""
    app = app_with(redis_url, TRANSCRIPT_RETENTION=1, CONVERSATION_TTL=3600)
    client = app.test_client()
    assert post_signed(client, webhook_params(body="one")).status_code == 200
    transcript = KEYS.conversation(REY, OURS).transcript
    assert 3600_000 < redis_client.pttl(transcript) <= 3601_000
    assert post_signed(client, webhook_params(body="bye")).status_code == 200
    assert 0 < redis_client.pttl(transcript) <= 1000

    assert post_signed(client, webhook_params(sender=FINN, body="one")).status_code == 200
    ended = client.delete(f"/ops/conversations/{FINN}/{OURS}", headers={"Authorization": f"Bearer {OPS}"})
    assert ended.status_code == 200
    assert 0 < redis_client.pttl(KEYS.conversation(FINN, OURS).transcript) <= 1000
    wait_until(
        lambda: not redis_client.exists(transcript, KEYS.conversation(FINN, OURS).transcript),
        seconds=5,
        what="both transcripts expired",
    )


def test_a_new_conversation_drops_entries_older_than_the_retention(redis_url, redis_client):
    app = app_with(redis_url, TRANSCRIPT_RETENTION=1)
    client = app.test_client()
    assert post_signed(client, webhook_params(body="old")).status_code == 200
    transcript = KEYS.conversation(REY, OURS).transcript
    redis_client.persist(transcript)  # as if that conversation had ended within the retention
    redis_client.delete(KEYS.conversation(REY, OURS).conversation)
    redis_client.zrem(KEYS.index("01"), f"{REY}|{OURS}")
    time.sleep(1.1)
    assert post_signed(client, webhook_params(body="new")).status_code == 200
    assert [entry["body"] for entry in entries(redis_client)] == ["new", "got new"]


def test_read_by_the_cli_the_api_and_the_end_hook(redis_url, redis_client):
    heard = []
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "TRANSCRIPTS": True,
            "OPS_TOKEN": OPS,
            "CONVERSATION_TTL": 1,
        },
        handler=echo,
        on_end=lambda conversation, reason: heard.append(conversation.transcript),
    )
    client = app.test_client()
    for body in ("hello", "pic"):
        assert post_signed(client, webhook_params(body=body)).status_code == 200

    shown = app.test_cli_runner().invoke(args=["transcript", REY, OURS])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert len(lines) == 5
    assert lines[0].endswith("<- hello")
    assert lines[1].endswith("-> got hello")
    assert lines[3].endswith("-> a picture [media] https://example.com/a.png")
    as_json = json.loads(app.test_cli_runner().invoke(args=["transcript", REY, OURS, "--json"]).output)
    assert [entry["direction"] for entry in as_json] == ["in", "out", "in", "out", "out"]

    answer = client.get(f"/ops/transcripts/{REY}/{OURS}", headers={"Authorization": f"Bearer {OPS}"})
    assert answer.status_code == 200
    assert answer.get_json()["entries"] == as_json
    unauthorized = client.get(f"/ops/transcripts/{REY}/{OURS}")
    assert unauthorized.status_code == 401

    time.sleep(1.1)
    assert Sweeper(app).sweep() == 1
    assert len(heard) == 1
    assert [entry.body for entry in heard[0]] == ["hello", "got hello", "pic", "a picture", "and words"]


@pytest.mark.slow
def test_kill_9_mid_message_then_redelivery_is_written_once(redis_server, redis_client):
    """The worker is killed between the message's two round trips: nothing of it is in the
    transcript; Twilio's redelivery of its MessageSid writes it once; a second redelivery
    writes nothing."""
    from tests.test_faults import FreezingProxy, gunicorn_workers

    sender = "+15554200012"
    env = {"REDIS_TIMEOUT": "3", "LOCK_TTL": "1", "LOCK_WAIT": "0.2", "TRANSCRIPTS": "1"}
    proxy = FreezingProxy(redis_server.port, env)
    env["REDIS_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        with Gunicorn(env, workers=1) as gunicorn:
            twilio = TwilioSimulator(gunicorn.url, TOKEN, timeout=60)
            assert twilio.send(sender, OURS, "before").status == 200
            proxy.freeze_save.set()
            killed_sid = new_message_sid()
            doomed = threading.Thread(target=lambda: _swallow(twilio, sender, killed_sid))
            doomed.start()
            wait_until(proxy.frozen.is_set, what="SAVE held back")
            [worker] = gunicorn_workers(gunicorn.process.pid)
            os.kill(worker, signal.SIGKILL)
            doomed.join(timeout=60)
            assert [f["body"] for f in entries(redis_client, sender)] == [
                "before",
                "Thanks for the message, Friend!",
            ]
            wait_until(
                lambda: gunicorn_workers(gunicorn.process.pid) not in ([], [worker]),
                what="gunicorn replaced the worker",
            )
            statuses = []
            for _ in range(60):
                statuses.append(twilio.send(sender, OURS, "doomed", message_sid=killed_sid).status)
                if statuses[-1] == 200:
                    break
                time.sleep(0.25)
            assert statuses[-1] == 200
            assert twilio.send(sender, OURS, "doomed", message_sid=killed_sid).status == 200
    finally:
        proxy.close()
    kept = entries(redis_client, sender)
    assert [f["sid"] for f in kept if f["dir"] == "in"].count(killed_sid) == 1
    assert [f["body"] for f in kept if f["dir"] == "in"] == ["before", "doomed"]


def _swallow(twilio, sender, message_sid):
    try:
        twilio.send(sender, OURS, "doomed", message_sid=message_sid)
    except Exception:  # the killed worker's connection just drops
        pass


def test_the_console_shows_the_thread_like_a_phone(redis_url):
    """Theirs and ours in order, each with its time and direction; still shown once ended."""
    from tests.test_console import sign_in

    app = app_with(redis_url)
    client = app.test_client()
    for body in ("hello <b>", "pic"):
        assert post_signed(client, webhook_params(body=body)).status_code == 200
    sign_in(client, OPS)
    page = client.get("/console/conversation", query_string={"from": REY, "to": OURS})
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    thread = text[text.index('<ol class="thread">') :]
    directions = re.findall(r'data-direction="(in|out)"', thread)
    assert directions == ["in", "out", "in", "out", "out"]
    assert thread.index("hello &lt;b&gt;") < thread.index("got hello &lt;b&gt;") < thread.index("a picture")
    assert 'href="https://example.com/a.png"' in thread
    assert len(re.findall(r"<time datetime=", thread)) == 5

    app.test_cli_runner().invoke(args=["conversations", "expire", REY, OURS])
    ended = client.get("/console/conversation", query_string={"from": REY, "to": OURS})
    assert ended.status_code == 404
    assert "a picture" in ended.get_data(as_text=True)


def test_outbound_messages_and_their_statuses(standin, redis_url, redis_client):
    """A message the handler sends is in the transcript with the message and reply that queued
    it (the same SAVE), and each status the sender and Twilio's callbacks record follows it."""
    from service.sender import Sender
    from service.wiring import current
    from tests.support.app_servers import LiveServer
    from tests.test_outbound import drain, make, text

    def sends(message, conversation):
        conversation.send(f"later: {message.body}", media=["https://example.com/b.png"])
        return f"now: {message.body}"

    routed = {}
    with LiveServer(lambda environ, start_response: routed["app"](environ, start_response)) as server:
        app = make(
            standin,
            redis_url,
            sends,
            PUBLIC_BASE_URL=server.url.removesuffix("/sms"),
            TRANSCRIPTS=True,
        )
        routed["app"] = app
        assert text(app.test_client(), "hi").status_code == 200
        drain(Sender(app))

        def shown():
            return [entry.to_json() for entry in current(app).transcripts.read(REY, OURS)]

        wait_until(lambda: shown()[-1].get("status") == "delivered", what="delivered, in the transcript")
    listed = shown()
    assert [(e["direction"], e["body"]) for e in listed] == [
        ("in", "hi"),
        ("out", "now: hi"),
        ("out", "later: hi"),
    ]
    assert listed[2]["media"] == ["https://example.com/b.png"]
    stored = entries(redis_client)
    assert [e["status"] for e in stored if e["dir"] == "status"] == ["queued", "sent", "delivered"]
    assert {e["id"] for e in stored if e["dir"] == "status"} == {listed[2]["id"]}


def test_a_message_sent_first_is_written_by_the_push(standin, redis_url, redis_client):
    """service.send() from outside a webhook: its entry, timed by Redis, in the conversation it
    starts; the reply continues it."""
    from service.sending import send
    from tests.test_outbound import make, text

    app = make(standin, redis_url, echo, TRANSCRIPTS=True)
    sent = send(REY, "Your table is ready", sender=OURS, app=app)
    assert text(app.test_client(), "thanks").status_code == 200
    kept = entries(redis_client)
    assert [(e["dir"], e["body"]) for e in kept] == [
        ("out", "Your table is ready"),
        ("in", "thanks"),
        ("out", "got thanks"),
    ]
    assert kept[0]["id"] == sent.id
    assert kept[0]["at"] <= kept[1]["at"]
    assert {e["conv"] for e in kept} == {sent.conversation}


def test_the_cap_holds_whichever_script_writes(standin, redis_url, redis_client):
    """TRANSCRIPT_MAX caps the list on every path that writes to it, the newest kept: a
    message's save, a message sent from outside a webhook, a timer's firing, the statuses the
    outbound sender records."""
    from service.sender import Sender
    from service.sending import send
    from tests.test_outbound import drain, make, text

    def handler(message, conversation):
        if message.kind == "timer":
            return "fired"
        conversation.send(f"sent for {message.body}")
        conversation.remind(0, "soon", cancel_on_reply=False)
        return f"got {message.body}"

    app = make(standin, redis_url, handler, TRANSCRIPTS=True, TRANSCRIPT_MAX=2)

    def kept():
        return [
            (entry["dir"], entry.get("body") or entry.get("timer") or entry["status"])
            for entry in entries(redis_client)
        ]

    assert text(app.test_client(), "hi").status_code == 200
    assert kept() == [("out", "got hi"), ("out", "sent for hi")]  # of 3 entries
    send(REY, "pushed", sender=OURS, app=app)
    assert kept() == [("out", "sent for hi"), ("out", "pushed")]
    assert Sweeper(app).sweep() == 0  # the timer fires, nothing ends
    assert kept() == [("timer", "soon"), ("out", "fired")]
    drain(Sender(app))
    assert [direction for direction, _ in kept()] == ["status", "status"]


def test_retention_counts_from_the_end_the_conversation_has(standin, redis_url, redis_client):
    """The transcript is kept the retention past the conversation's scheduled end as its index
    has it, not CONVERSATION_TTL's: with a time to live of its own, longer or shorter; held by
    an operator, who replies (a message sent from outside a webhook) and hands back."""
    from tests.test_outbound import make, text

    def handler(message, conversation):
        if message.body.startswith("live "):
            conversation.expire_after(int(message.body.split()[1]))
        return "ok"

    app = make(
        standin,
        redis_url,
        handler,
        TRANSCRIPTS=True,
        TRANSCRIPT_RETENTION=10,
        CONVERSATION_TTL=3600,
        OPS_TOKEN=OPS,
    )
    client = app.test_client()
    auth = {"Authorization": f"Bearer {OPS}"}
    keys = KEYS.conversation(REY, OURS)

    def past_the_end() -> int:
        """How long (ms) the transcript outlives the conversation's scheduled end."""
        with redis_client.pipeline(transaction=True) as pipe:
            (seconds, micros), end, left = (
                pipe.time().zscore(keys.index_shard, keys.member).pttl(keys.transcript).execute()
            )
        return left - (int(end) - (seconds * 1000 + micros // 1000))

    for body in ("hello", "live 7200", "live 5", "again"):  # CONVERSATION_TTL, longer, shorter, its own kept
        assert text(client, body).status_code == 200
        assert abs(past_the_end() - 10_000) <= 2, body
    base = f"/ops/conversations/{REY}/{OURS}"
    assert client.post(base + "/handoff", headers=auth).status_code == 200  # its end moves past the hold
    assert abs(past_the_end() - 10_000) <= 2
    assert client.post(base + "/reply", headers=auth, json={"body": "Ana here"}).status_code == 200
    assert abs(past_the_end() - 10_000) <= 2
    assert client.delete(base + "/handoff", headers=auth).status_code == 200
    assert abs(past_the_end() - 10_000) <= 2


def test_a_timers_firing_is_shown_by_the_cli_the_api_and_the_console(redis_url):
    """A firing's entry names its timer wherever the transcript is read, between the message
    that set it and what it sent."""
    from tests.test_console import sign_in

    def handler(message, conversation):
        if message.kind == "timer":
            return f"{message.timer} is up"
        conversation.remind(0, "tea", cancel_on_reply=False)
        return "set"

    app = app_with(redis_url, handler=handler)
    client = app.test_client()
    assert post_signed(client, webhook_params(body="brew")).status_code == 200
    Sweeper(app).sweep()

    lines = app.test_cli_runner().invoke(args=["transcript", REY, OURS]).output.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "<- brew",
        "-> set",
        "-- timer tea fired",
        "-> tea is up (pending)",  # queued for the sender, which does not run here
    ]
    answer = client.get(f"/ops/transcripts/{REY}/{OURS}", headers={"Authorization": f"Bearer {OPS}"})
    fired = answer.get_json()["entries"][2]
    assert (fired["direction"], fired["timer"], fired["body"]) == ("timer", "tea", "")
    sign_in(client, OPS)
    page = client.get("/console/conversation", query_string={"from": REY, "to": OURS}).get_data(as_text=True)
    thread = page[page.index('<ol class="thread">') :]
    assert re.findall(r'data-direction="(\w+)"', thread) == ["in", "out", "timer", "out"]
    assert thread.index("set") < thread.index("Timer tea fired") < thread.index("tea is up")
