"""Timers (service/timers.py, service/firing.py): set and cancelled with the conversation's save,
fired by the sweeper under the conversation's lock, once, in due order, never early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from service import create_app, send
from service.keys import Keys
from service.lifecycle import Sweeper
from service.wiring import current
from tests.support import ROOT
from tests.support.app import TOKEN, post_signed, webhook_params
from tests.support.app_servers import bin_path, hermetic_environment
from tests.support.standin import StandinServer
from tests.support.waiting import wait_until

REY, OURS = "+15551230001", "+15550001111"
KEYS = Keys()


def reminder(message, conversation):
    """'remind <seconds> <name> [keep]' sets a timer; 'cancel <name>'; 'bye' ends; a timer's
    call is logged in the state and answered."""
    log = conversation.setdefault("log", [])
    if message.kind == "timer":
        log.append(f"timer:{message.timer}:{message.data}")
        if message.data == "end":
            conversation.end()
        if message.data == "again":
            conversation.remind(0, "second", data="after-again")
        return f"nudge {message.timer}"
    log.append(f"message:{message.body}")
    words = message.body.split()
    if words[0] == "remind":
        conversation.remind(
            float(words[1]),
            words[2],
            data=words[3] if len(words) > 3 else None,
            cancel_on_reply=len(words) < 5,
        )
    elif words[0] == "cancel":
        conversation.cancel(words[1])
    elif words[0] == "bye":
        conversation.end()
    return "pending: " + ",".join(sorted(conversation.timers))


def make(redis_url, handler=reminder, **settings):
    return create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, **settings}, handler=handler)


def say(app, body, sender=REY):
    response = post_signed(app.test_client(), webhook_params(sender=sender, body=body))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data(as_text=True)


def state(redis_client, sender=REY):
    raw = redis_client.hget(KEYS.conversation(sender, OURS).conversation, "state")
    return json.loads(raw) if raw else None


class Outbox(list):
    """Collects what firings queued for the outbound sender: (to, body) each."""

    def __call__(self, keys, queued):
        self.extend((message.to, message.body) for message in queued)


def test_a_timer_is_stored_with_the_conversation_and_fires_once_when_due(redis_url, redis_client):
    app = make(redis_url)
    assert "pending: nudge" in say(app, "remind 0.3 nudge hello")
    keys = KEYS.conversation(REY, OURS)
    stored = json.loads(redis_client.hget(keys.conversation, "timers"))
    assert set(stored) == {"nudge"}
    assert redis_client.zscore(keys.timers, keys.member) == stored["nudge"]["due"]
    sent = Outbox()
    sweeper = Sweeper(app, on_queued=sent)
    sweeper.sweep()
    assert sent == []  # never before it is due
    time.sleep(0.35)
    sweeper.sweep()
    assert sweeper.fired == 1
    assert sent == [(REY, "nudge nudge")]
    queued = redis_client.lrange(keys.outbound, 0, -1)  # in the outbox, for the outbound sender
    assert len(queued) == 1
    record = json.loads(redis_client.hget(keys.sent, queued[0]))
    assert (record["to"], record["from"], record["body"]) == (REY, OURS, "nudge nudge")
    assert state(redis_client)["log"] == ["message:remind 0.3 nudge hello", "timer:nudge:hello"]
    assert redis_client.hget(keys.conversation, "timers") is None
    assert redis_client.zscore(keys.timers, keys.member) is None
    sweeper.sweep()
    assert len(sent) == 1  # once


def test_same_name_replaces_and_cancel_drops(redis_url, redis_client):
    app = make(redis_url)
    say(app, "remind 100 a x - keep")
    first = json.loads(redis_client.hget(KEYS.conversation(REY, OURS).conversation, "timers"))["a"]
    say(app, "remind 200 a y - keep")
    second = json.loads(redis_client.hget(KEYS.conversation(REY, OURS).conversation, "timers"))["a"]
    assert second["id"] != first["id"]
    assert second["due"] > first["due"]
    assert second["data"] == "y"
    assert "pending: a" in say(app, "cancel b")
    assert "pending: <" in say(app, "cancel a").replace("pending: </", "pending: <")
    assert redis_client.zcard(KEYS.conversation(REY, OURS).timers) == 0


def test_a_reply_cancels_cancel_on_reply_timers_only(redis_url, redis_client):
    app = make(redis_url)
    say(app, "remind 100 waits")
    say(app, "remind 100 stays x - keep")
    assert "pending: stays" in say(app, "hello")  # 'waits' went with the reply, before the handler


def test_timers_fire_in_due_order_after_a_pause(redis_url, redis_client):
    """Missed while no sweeper ran: they fire when one starts again, earliest first."""
    app = make(redis_url)
    say(app, "remind 0.2 c - - keep")
    say(app, "remind 0.1 b - - keep")
    say(app, "remind 0.3 a - - keep")
    time.sleep(0.5)
    sent = Outbox()
    Sweeper(app, on_queued=sent).sweep()
    assert [line for line in state(redis_client)["log"] if line.startswith("timer")] == [
        "timer:b:-",
        "timer:c:-",
        "timer:a:-",
    ]
    assert len(sent) == 3


def test_a_firing_may_set_timers_and_end_the_conversation(redis_url, redis_client):
    ended = []
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url},
        handler=reminder,
        on_end=lambda conversation, reason: ended.append((reason, sorted(conversation.timers))),
    )
    say(app, "remind 0 first again keep")
    say(app, "remind 50 later x - keep")
    sweeper = Sweeper(app, on_queued=Outbox())
    sweeper.sweep()  # 'first' fires and sets 'second', due at once: it fires in the same pass
    assert state(redis_client)["log"][-2:] == ["timer:first:again", "timer:second:after-again"]
    say(app, "remind 0 last end - keep")
    sweeper.sweep()
    keys = KEYS.conversation(REY, OURS)
    assert redis_client.hget(keys.conversation, "state") is None  # ended by the timer's handler
    assert redis_client.zscore(keys.timers, keys.member) is None
    sweeper.sweep()  # the end hook
    assert ended == [("handler", ["later"])]  # what was pending when it ended


def test_an_ending_drops_the_timers_and_the_hook_sees_them(redis_url, redis_client):
    seen = []
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url},
        handler=reminder,
        on_end=lambda conversation, reason: seen.append((reason, sorted(conversation.timers))),
    )
    say(app, "remind 100 a x - keep")
    say(app, "remind 0 b x - keep", sender="+15551230002")
    say(app, "STOP", sender="+15551230002")
    current(app).live.end(REY, OURS)
    assert redis_client.zcard(KEYS.timers("01")) == 0
    assert redis_client.zcard(KEYS.timers("02")) == 0
    sent = Outbox()
    Sweeper(app, on_queued=sent).sweep()
    assert sent == []
    assert sorted(seen) == [("operator", ["a"]), ("opt-out", ["b"])]


def test_a_timer_due_after_the_conversation_ends_is_refused_unless_it_lives_longer(redis_url):
    def handler(message, conversation):
        if message.body == "long":
            conversation.expire_after(timedelta(days=2))
        conversation.remind(timedelta(days=1), "tomorrow")
        return "ok"

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=handler)
    assert post_signed(app.test_client(), webhook_params(body="short")).status_code == 500
    assert post_signed(app.test_client(), webhook_params(body="long")).status_code == 200


def test_expire_after_is_the_conversations_own_ttl(redis_url, redis_client):
    def handler(message, conversation):
        if message.body == "own":
            conversation.expire_after(60)
        return None

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=handler)
    post_signed(app.test_client(), webhook_params(body="own"))
    keys = KEYS.conversation(REY, OURS)
    first = redis_client.zscore(keys.index_shard, keys.member) - int(
        redis_client.hget(keys.conversation, "last_seen")
    )
    assert first == 60_000
    post_signed(app.test_client(), webhook_params(body="later"))  # kept by later messages
    later = redis_client.zscore(keys.index_shard, keys.member) - int(
        redis_client.hget(keys.conversation, "last_seen")
    )
    assert later == 60_000
    shown = current(app).live.get(REY, OURS)
    assert shown.ttl == 60
    assert shown.to_json(with_state=True)["ttl"] == 60


def test_remind_refuses_what_cannot_be_stored():
    from service.handler import Conversation

    conversation = Conversation({}, now_ms=1_000_000)
    with pytest.raises(ValueError):
        conversation.remind(-1, "past")
    with pytest.raises(ValueError):
        conversation.remind(datetime(2030, 1, 1), "naive")  # noqa: DTZ001 (the point)
    with pytest.raises(ValueError):
        conversation.remind(1, "")
    with pytest.raises(ValueError):
        conversation.remind(1, "x", data={1, 2})
    assert conversation.remind(datetime.fromtimestamp(1_060, UTC), "absolute").due_ms == 1_060_000
    assert conversation.remind(timedelta(minutes=1), "delta").due_ms == 1_060_000


def test_a_reply_and_a_due_timer_in_the_same_instant_never_both(redis_url, redis_client):
    """200 races: a message arrives as its cancel_on_reply timer falls due and the sweeper runs.
    Either the timer fired first (then the reply came after it), or the reply cancelled it; a
    timer firing after the reply was handled would be both."""
    app = make(redis_url)
    sweeper = Sweeper(app, on_queued=Outbox())
    senders = [f"+1555124{n:04d}" for n in range(200)]
    for sender in senders:
        say(app, "remind 0.05 follow", sender=sender)
    time.sleep(0.05)
    replies = [threading.Thread(target=say, args=(app, "answer", sender)) for sender in senders]
    for thread in replies:
        thread.start()
    sweeper.sweep()
    for thread in replies:
        thread.join()
    sweeper.sweep()
    fired = 0
    for sender in senders:
        log = state(redis_client, sender)["log"]
        assert log.count("message:answer") == 1
        if "timer:follow:None" in log:
            fired += 1
            assert log.index("timer:follow:None") < log.index("message:answer")
        assert (
            redis_client.zscore(
                KEYS.conversation(sender, OURS).timers, KEYS.conversation(sender, OURS).member
            )
            is None
        )
    print(f"{fired} of 200 timers fired before the reply")


def test_two_sweepers_fire_each_timer_once(redis_url, redis_client):
    app = make(redis_url)
    senders = [f"+1555125{n:04d}" for n in range(200)]
    for sender in senders:
        say(app, "remind 0 once - keep", sender=sender)
    sweepers = [Sweeper(app, on_queued=Outbox()) for _ in range(2)]
    threads = [threading.Thread(target=sweeper.firing.fire_due) for sweeper in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sweeper in sweepers:
        sweeper.firing.fire_due()
    assert sum(len(sweeper.firing.on_queued) for sweeper in sweepers) == 200
    for sender in senders:
        assert state(redis_client, sender)["log"].count("timer:once:-") == 1


def test_operators_see_pending_timers(redis_url, redis_client):
    app = make(redis_url, OPS_TOKEN="ops-token-0123456789")
    say(app, "remind 100 later x - keep")
    say(app, "remind 50 sooner", sender="+15551230002")
    headers = {"Authorization": "Bearer ops-token-0123456789"}
    shown = app.test_client().get(f"/ops/conversations/{REY}/{OURS}", headers=headers).get_json()
    assert [timer["name"] for timer in shown["timers"]] == ["later"]
    assert shown["timers"][0]["data"] == "x"
    assert shown["timers"][0]["cancel_on_reply"] is False
    listed = app.test_client().get("/ops/timers", headers=headers).get_json()["timers"]
    assert [(timer["from"], timer["name"]) for timer in listed] == [
        ("+15551230002", "sooner"),
        (REY, "later"),
    ]
    runner = app.test_cli_runner()
    text = runner.invoke(args=["timers"]).output.splitlines()
    assert "sooner" in text[0]
    assert "later" in text[1]
    assert "timer: later" in runner.invoke(args=["conversations", "show", REY, OURS]).output


def set_timers(app, senders, count):
    for sender in senders:
        say(app, f"set {count}", sender=sender)


def fired_counts(redis_client, senders):
    """Per conversation, how often each of its timers' effects was committed."""
    return [state(redis_client, sender).get("fired", {}) for sender in senders]


@pytest.mark.slow
def test_a_sweeper_killed_mid_fire_loses_none_and_applies_none_twice(redis_url, redis_client, monkeypatch):
    """kill -9 of the sweeping process while a timer's handler runs: the timer fires again once
    the lock lapses (its handler runs twice), and its effect is committed once."""
    monkeypatch.setenv("REDIS_URL", redis_url)  # where the handler notes its attempts
    settings = {"SMS_HANDLER": "tests.support.timer_handler:handle", "LOCK_TTL": 1}
    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, **settings})
    senders = [f"+1555126{n:04d}" for n in range(20)]
    set_timers(app, senders, 3)
    env = {
        **hermetic_environment(),
        "REDIS_URL": redis_url,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "SMS_HANDLER": "tests.support.timer_handler:handle",
        "TIMER_SLEEP": "0.05",
        "SWEEP_INTERVAL": "0.1",
        "LOCK_TTL": "1",
    }
    sweeper = subprocess.Popen(
        [bin_path("sms-sessions"), "sweep"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: redis_client.llen("timer-attempts") >= 10, seconds=30, what="timers firing")
    finally:
        os.kill(sweeper.pid, signal.SIGKILL)
        sweeper.wait(timeout=10)
    attempts_before = redis_client.llen("timer-attempts")
    assert attempts_before < 60  # killed mid-pass
    redis_client.delete(KEYS.sweeper)  # its lease would lapse by itself
    time.sleep(1.1)  # the killed firing's lock lapses (LOCK_TTL)
    finisher = Sweeper(app, on_queued=Outbox())
    for _ in range(10):
        finisher.sweep()
    assert fired_counts(redis_client, senders) == [{"t0": 1, "t1": 1, "t2": 1}] * len(senders)
    attempts = redis_client.lrange("timer-attempts", 0, -1)
    assert len(attempts) >= 60
    assert sum(redis_client.zcard(KEYS.timers(shard)) for shard in KEYS.shards()) == 0


@pytest.mark.slow
def test_a_redis_crash_mid_fire_with_aof_loses_none_and_applies_none_twice(redis_processes, monkeypatch):
    server = redis_processes("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    monkeypatch.setenv("REDIS_URL", server.url)
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": server.url, "LOCK_TTL": 1, "REDIS_TIMEOUT": 1},
        handler=__import__("tests.support.timer_handler", fromlist=["handle"]).handle,
    )
    senders = [f"+1555127{n:04d}" for n in range(30)]
    set_timers(app, senders, 2)
    monkeypatch.setenv("TIMER_SLEEP", "0.01")
    sweeper = Sweeper(app, on_queued=Outbox())
    failed = []

    def sweep():
        try:
            sweeper.firing.fire_due()
        except Exception as error:  # the crash, as the sweeper's loop meets it
            failed.append(type(error).__name__)

    firing = threading.Thread(target=sweep)
    firing.start()
    client = server.client()
    wait_until(lambda: client.llen("timer-attempts") >= 10, seconds=30, what="timers firing")
    server.kill()
    firing.join()
    assert failed  # killed mid-pass
    server.start()  # same port, same directory: the AOF is replayed
    time.sleep(1.1)  # a lock taken before the crash lapses
    for _ in range(10):
        sweeper.sweep()
    kept = server.client()
    assert fired_counts(kept, senders) == [{"t0": 1, "t1": 1}] * len(senders)


def test_the_deployed_sweeper_loop_fires_due_timers_never_early(redis_url, redis_client):
    """The sweeper as it runs in a serving process (its loop under the lease): timers set at
    different times fire once each, none before its due time (Redis' clock); how late they are
    is a figure of `make bench` (BENCHMARKS.md), within SWEEP_INTERVAL there."""
    lateness = []

    def handler(message, conversation):
        if message.kind == "timer":
            lateness.append(conversation.now_ms - conversation["due"])
            return None
        conversation["due"] = conversation.remind(float(message.body), "t", cancel_on_reply=False).due_ms
        return None

    app = make(redis_url, handler=handler, SWEEP_INTERVAL=0.1)
    sweeper = Sweeper(app, on_queued=Outbox())
    thread = sweeper.start()
    try:
        senders = [f"+1555128{n:04d}" for n in range(30)]
        for n, sender in enumerate(senders):
            say(app, str(0.02 * n), sender=sender)
        wait_until(lambda: len(lateness) == len(senders), seconds=30, what="every timer fired")
    finally:
        sweeper.stopping.set()
        thread.join()
    assert min(lateness) >= 0
    print(f"late by {min(lateness)} to {max(lateness)} ms with SWEEP_INTERVAL 100 ms")


def test_the_console_shows_a_conversations_timers_and_own_ttl(redis_url):
    from tests.test_console import sign_in

    def handler(message, conversation):
        conversation.expire_after(7200)
        conversation.remind(600, "nudge")
        return None

    token = "console-timers-token-0123456789"
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "OPS_TOKEN": token}, handler=handler
    )
    post_signed(app.test_client(), webhook_params())
    client = app.test_client()
    assert sign_in(client, token)
    page = client.get("/console/conversation", query_string={"from": REY, "to": OURS}).get_data(as_text=True)
    assert "<strong>nudge</strong>" in page
    assert "unless a message comes first" in page
    assert "its own time to live: 2h 00m 00s" in page


def test_timer_metrics_count_set_fired_cancelled_and_late(redis_url):
    app = make(redis_url)
    metrics = current(app).metrics
    say(app, "remind 0 a x - keep")
    say(app, "remind 100 b")
    say(app, "remind 100 c x - keep")  # cancels b (a reply)
    say(app, "cancel c")
    assert metrics.timers_set._value.get() == 3
    assert metrics.timers_cancelled.labels("reply")._value.get() == 1
    assert metrics.timers_cancelled.labels("handler")._value.get() == 1
    Sweeper(app, on_queued=Outbox()).sweep()
    assert metrics.timers_fired._value.get() == 1
    assert metrics.timer_late._sum.get() >= 0


def test_a_firings_messages_are_queued_with_its_effect_in_order(redis_url, redis_client):
    """send() calls and the reply leave through the outbox, committed by FIRE with the state:
    the sends first, in order, then the reply's messages; a handler that raises queues none."""
    from twilio.twiml.messaging_response import MessagingResponse

    def handler(message, conversation):
        if message.kind == "timer" and message.timer == "fail":
            conversation.send("never")
            raise RuntimeError("the timer's handler failed")
        if message.kind == "timer":
            conversation.send("one")
            conversation.send("two", media=["https://example.com/a.png"])
            reply = MessagingResponse()
            reply.message("three")
            reply.message("four")
            return reply
        conversation.remind(0, "go", cancel_on_reply=False)
        conversation.remind(0, "fail", cancel_on_reply=False)
        return None

    app = make(redis_url, handler=handler)
    say(app, "hi")
    Sweeper(app).sweep()
    keys = KEYS.conversation(REY, OURS)
    records = [
        json.loads(redis_client.hget(keys.sent, mid)) for mid in redis_client.lrange(keys.outbound, 0, -1)
    ]
    assert [record["body"] for record in records] == ["one", "two", "three", "four"]
    assert records[1]["media"] == ["https://example.com/a.png"]
    assert redis_client.zscore(keys.due, keys.member) is not None  # due for the outbound sender
    assert redis_client.hget(keys.conversation, "timers") is None  # both spent, the failed one too


def test_a_firings_messages_are_written_to_the_transcript(redis_url, redis_client):
    """With TRANSCRIPTS=1 a firing is a transcript entry (the timer's name), followed by its
    send() calls and its reply, as a message's are with SAVE: at the firing's time, in the
    conversation, after the message that set the timer; a timer that sends nothing is its
    firing's entry alone."""
    from service.wiring import current

    def handler(message, conversation):
        if message.kind == "timer" and message.timer == "quiet":
            return None
        if message.kind == "timer":
            conversation.send("one")
            return "two"
        conversation.remind(0, "go", cancel_on_reply=False)
        conversation.remind(0, "quiet", cancel_on_reply=False)
        return "set"

    app = make(redis_url, handler=handler, TRANSCRIPTS=True)
    say(app, "hi")
    Sweeper(app).sweep()
    assert redis_client.hget(KEYS.conversation(REY, OURS).conversation, "timers") is None  # both fired
    with app.app_context():
        entries = [entry.to_json() for entry in current(app).transcripts.read(REY, OURS)]
    assert [(entry["direction"], entry.get("timer") or entry["body"]) for entry in entries] == [
        ("in", "hi"),
        ("out", "set"),
        ("timer", "go"),
        ("out", "one"),
        ("out", "two"),
        ("timer", "quiet"),
    ]
    assert len({entry["conversation"] for entry in entries}) == 1
    assert entries[2]["at"] >= entries[0]["at"]


@pytest.mark.parametrize("own", [60, 2 * 86_400])
def test_sending_and_an_operators_hold_keep_a_conversations_own_ttl(redis_url, redis_client, own):
    """A send from outside the webhook and an operator's take over and hand back give the
    conversation its own TTL (shorter or longer than CONVERSATION_TTL), and never bring its hash's
    life or its transcript's before the conversation's end."""

    def handler(message, conversation):
        conversation.expire_after(own)
        return None

    keys = KEYS.conversation(REY, OURS)
    retention_ms = 86_400_000

    def kept_as_its_own_ttl(since_ms: int) -> None:
        ends = redis_client.zscore(keys.index_shard, keys.member)
        assert ends - since_ms == pytest.approx(own * 1000, abs=2000)  # not CONVERSATION_TTL's
        assert redis_client.pttl(keys.conversation) >= ends - since_ms  # the hash outlives its end
        assert redis_client.pttl(keys.transcript) >= ends - since_ms + retention_ms - 2000

    with StandinServer() as standin:
        config = {**standin.config(), "TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "TRANSCRIPTS": True}
        app = create_app({**config, "TRANSCRIPT_RETENTION": retention_ms // 1000}, handler=handler)
        assert post_signed(app.test_client(), webhook_params(body="hi")).status_code == 200
        send(REY, "from a job", app=app, sender=OURS)
        kept_as_its_own_ttl(int(redis_client.hget(keys.conversation, "last_seen")))
        current(app).handoffs.take_over(REY, OURS)
        current(app).handoffs.hand_back(REY, OURS)
        now_ms = int(redis_client.time()[0]) * 1000
        kept_as_its_own_ttl(now_ms)
