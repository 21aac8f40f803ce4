"""Conversation lifecycle on a real Redis: started/ended events exactly once, the sweeper, the
end hook, retention, and the operators' views of it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from service import create_app
from service.clock import now_ms
from service.keys import Keys
from service.lifecycle import Sweeper, parse_duration
from service.simulator import TwilioSimulator
from service.store import Commit
from service.wiring import current
from tests.support import ROOT
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, bin_path, hermetic_environment
from tests.support.conversations import plant
from tests.support.numbers import FINN, OURS, REY
from tests.support.redis_servers import commands_during
from tests.support.waiting import wait_until

KEYS = Keys()
OPS = {"Authorization": "Bearer ops"}


def events(client, kind: str | None = None) -> list[dict]:
    entries = [{"id": entry_id, **fields} for entry_id, fields in client.xrange(KEYS.events)]
    return [e for e in entries if kind is None or e["type"] == kind]


def notebook(message, conversation):
    conversation.setdefault("bodies", []).append(message.body)
    if message.body == "bye":
        conversation.end()
    return f"{len(conversation['bodies'])} noted"


def plant_due(client, count: int, ended_ms_ago: int = 1000) -> list[str]:
    """``count`` conversations whose time ran out ``ended_ms_ago``, written through the key
    schema (faster than messages); returns their ids."""
    now = now_ms()
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        plant(
            pipe,
            f"+1556{n:07d}",
            OURS,
            now - ended_ms_ago,
            sid=f"conv-{n}",
            state={"n": n},
            seq=2,
            first_seen=now - 9000,
            last_seen=now - 5000,
        )
    pipe.execute()
    return [f"conv-{n}" for n in range(count)]


def test_a_conversation_starts_once_and_its_event_names_it(app, redis_client):
    twilio = TwilioSimulator.for_app(app)
    for body in ("one", "two", "three"):
        twilio.send(REY, OURS, body)
    [started] = events(redis_client)
    assert started["type"] == "started"
    assert (started["from"], started["to"]) == (REY, OURS)
    assert started["messages"] == "1"
    assert started["conversation"] == twilio.cookie_for(REY, OURS)
    assert started["started_at"] == redis_client.hget(KEYS.conversation(REY, OURS).conversation, "first_seen")


def test_each_way_of_ending_gives_its_reason(redis_url, redis_client):
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "OPS_TOKEN": "ops", "CONVERSATION_TTL": 1},
        handler=notebook,
    )
    twilio = TwilioSimulator.for_app(app)
    twilio.send(REY, OURS, "hi")
    assert app.test_client().delete(f"/ops/conversations/{REY}/{OURS}", headers=OPS).status_code == 200
    twilio.send(REY, OURS, "hi")
    twilio.send(REY, OURS, "STOP")
    twilio.send(REY, OURS, "STOP")  # nothing left to end: no event
    twilio.send(REY, OURS, "hi")
    twilio.send(REY, OURS, "bye")
    twilio.send(REY, OURS, "hi")
    last_seen = int(redis_client.hget(KEYS.conversation(REY, OURS).conversation, "last_seen"))
    time.sleep(1.1)  # its time runs out; the next message ends it first, then starts anew
    twilio.send(REY, OURS, "back")
    ended = events(redis_client, "ended")
    assert [(e["reason"], e["messages"]) for e in ended] == [
        ("operator", "1"),
        ("opt-out", "2"),
        ("handler", "2"),
        ("expired", "1"),
    ]
    started = events(redis_client, "started")
    assert len(started) == 5
    assert len({e["conversation"] for e in started}) == 5
    assert [e["conversation"] for e in ended] == [e["conversation"] for e in started[:4]]
    assert int(ended[-1]["ended_at"]) == last_seen + 1000  # its last message + TTL


def test_conversations_end_without_traffic_within_the_sweep_interval(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, CONVERSATION_TTL=1, SWEEP_INTERVAL=0.5)
    client = app.test_client()
    senders = [f"+1555123{n:04d}" for n in range(10)]
    for sender in senders:
        post_signed(client, webhook_params(sender=sender))
    sweeper = Sweeper(app)
    sweeper.start()
    try:
        wait_until(lambda: len(events(redis_client, "ended")) == 10, seconds=15, what="10 ended events")
    finally:
        sweeper.stopping.set()
    for event in events(redis_client, "ended"):
        emitted = int(event["id"].split("-")[0])
        assert event["reason"] == "expired"
        assert 0 <= emitted - int(event["ended_at"]) <= 500 + 1000  # the interval, plus slack
    assert all(redis_client.zcard(index) == 0 for index in KEYS.indexes())


def test_the_end_hook_sees_the_final_state(redis_url, redis_client):
    calls = []

    def on_end(conversation, reason):
        calls.append(
            (
                reason,
                dict(conversation),
                conversation.messages,
                conversation.sender,
                conversation.sid,
                conversation.ended_at is not None,
            )
        )

    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "CONVERSATION_TTL": 1, "OPS_TOKEN": "ops"},
        handler=notebook,
        on_end=on_end,
    )
    twilio = TwilioSimulator.for_app(app)
    for body in ("a", "b"):
        twilio.send(REY, OURS, body)
    twilio.send(FINN, OURS, "c")
    app.test_client().delete(f"/ops/conversations/{FINN}/{OURS}", headers=OPS)
    time.sleep(1.1)
    Sweeper(app).sweep()
    assert sorted(calls) == sorted(
        [
            ("expired", {"bodies": ["a", "b"]}, 2, REY, twilio.cookie_for(REY, OURS), True),
            ("operator", {"bodies": ["c"]}, 1, FINN, twilio.cookie_for(FINN, OURS), True),
        ]
    )
    assert all(not redis_client.exists(KEYS.ending(shard)) for shard in KEYS.shards())
    Sweeper(app).sweep()
    assert len(calls) == 2  # once per conversation


def test_a_failing_hook_is_logged_and_counted_and_blocks_nothing(redis_url, redis_client, capsys):
    """Its log line names the exception's type and the hook's line, with the frames, never its
    text: ``int()`` of a body quotes the body (issue 29's rule, as for the handler)."""
    called = []
    body = "five secret words"  # what a user texted, say: the traceback's lines show `int(body)`

    def on_end(conversation, reason):
        called.append(conversation.sid)
        if conversation["n"] == 3:
            int(body)

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=notebook, on_end=on_end)
    ids = plant_due(redis_client, 6)
    capsys.readouterr()
    Sweeper(app).sweep()
    assert sorted(called) == sorted(ids)
    assert len(events(redis_client, "ended")) == 6
    output = capsys.readouterr().out
    assert "secret" not in output
    [failed] = [json.loads(line) for line in output.splitlines() if "end hook failed" in line]
    line = on_end.__code__.co_firstlineno + 3
    assert failed["message"] == f"end hook failed: ValueError at test_lifecycle.py:{line} in on_end"
    assert "Traceback" in failed["error"] and "in on_end" in failed["error"]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "sms_end_hook_failures_total 1.0" in metrics
    assert 'sms_conversations_ended_total{reason="expired"} 6.0' in metrics


def test_two_sweepers_at_once_end_each_conversation_once(app, redis_client):
    ids = plant_due(redis_client, 2000)
    sweepers = [Sweeper(app), Sweeper(app)]
    barrier = threading.Barrier(2)
    ended = []

    def sweep(sweeper):
        barrier.wait()
        ended.append(sweeper.sweep())

    threads = [threading.Thread(target=sweep, args=(s,)) for s in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(ended) == 2000
    finished = events(redis_client, "ended")
    assert sorted(e["conversation"] for e in finished) == sorted(ids)


@pytest.mark.slow
def test_a_sweeper_killed_mid_sweep_loses_and_doubles_nothing(redis_url, redis_client, monkeypatch):
    ids = plant_due(redis_client, 8000)
    env = {
        **hermetic_environment(),
        "REDIS_URL": redis_url,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "SMS_HANDLER": "tests.support.recording_handler:handle",
        "SWEEP_INTERVAL": "0.1",
    }
    sweeper = subprocess.Popen(
        [bin_path("sms-sessions"), "sweep"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not redis_client.xlen(KEYS.events) and time.monotonic() < deadline:
            time.sleep(0.0005)
    finally:
        os.kill(sweeper.pid, signal.SIGKILL)
        sweeper.wait(timeout=10)
    assert 0 < redis_client.xlen(KEYS.events) < 8000  # killed mid-sweep
    redis_client.delete(KEYS.sweeper)  # its lease would lapse by itself
    monkeypatch.setenv("REDIS_URL", redis_url)  # where the recording hook writes
    monkeypatch.setenv("SMS_HANDLER", "tests.support.recording_handler:handle")
    finisher = Sweeper(create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}))
    while finisher.sweep():
        pass
    assert sorted(e["conversation"] for e in events(redis_client, "ended")) == sorted(ids)
    hooked = [json.loads(call)["id"] for call in redis_client.lrange("hook-calls", 0, -1)]
    assert sorted(set(hooked)) == sorted(ids)
    assert len(hooked) <= len(ids) + 1


def test_events_and_ends_survive_a_redis_crash(redis_processes):
    server = redis_processes("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    app = make_app(REDIS_URL=server.url, CONVERSATION_TTL=1)
    client = app.test_client()
    for n in range(5):
        assert post_signed(client, webhook_params(sender=f"+1555123{n:04d}")).status_code == 200
    server.kill()
    server.start()  # same port, same directory: the AOF is replayed
    time.sleep(1.1)
    Sweeper(app).sweep()
    Sweeper(app).sweep()
    kept = server.client()
    assert len(events(kept, "started")) == 5
    ended = events(kept, "ended")
    assert len(ended) == 5
    assert len({e["conversation"] for e in ended}) == 5


def test_retention_trims_by_age_and_by_length(redis_url, redis_client):
    old = make_app(REDIS_URL=redis_url, EVENTS_RETENTION=1)
    post_signed(old.test_client(), webhook_params())
    time.sleep(1.1)
    Sweeper(old).sweep()
    assert redis_client.xlen(KEYS.events) == 0  # older than EVENTS_RETENTION
    capped = make_app(REDIS_URL=redis_url, EVENTS_MAX=10)
    client = capped.test_client()
    for n in range(300):
        post_signed(client, webhook_params(sender=f"+1555123{n:04d}"))
    assert 10 <= redis_client.xlen(KEYS.events) < 300  # MAXLEN ~: whole nodes of the stream go


def test_a_sweep_costs_the_same_for_100_or_2000_live_conversations(app, redis_client):
    """O(due): the index is read by score, never scanned; live conversations cost nothing."""
    tallies = []
    for total in (100, 2000):
        plant_due(redis_client, total, ended_ms_ago=-3_600_000)  # ending an hour from now
        tallies.append(commands_during(redis_client, Sweeper(app).sweep))
        redis_client.flushall()
    assert tallies[0] == tallies[1]
    assert not {"keys", "scan", "zrange"} & set(tallies[1])
    assert tallies[1]["hgetall"] <= 100  # the sample's minute: each tag's tallies, bounded by the hour


def test_events_command_prints_the_stream(redis_url, redis_client, runner, app):
    TwilioSimulator.for_app(app).send(REY, OURS, "hi")
    current(app).live.end(REY, OURS)
    as_json = runner.invoke(args=["events", "--json", "--since", "10m"])
    assert as_json.exit_code == 0, as_json.output
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["type"], e.get("reason")) for e in lines] == [("started", None), ("ended", "operator")]
    text = runner.invoke(args=["events"]).stdout.splitlines()
    assert "started" in text[0]
    assert f"{REY} → {OURS}" in text[0]
    assert "reason=operator" in text[1]
    assert "lasted=0s" in text[1]
    assert runner.invoke(args=["events", "--since", "soon"]).exit_code == 2
    assert parse_duration("15m") == 900
    assert parse_duration("2h") == 7200
    assert parse_duration("90") == 90


def test_follow_waits_for_the_next_event(app, redis_client):
    history = current(app).history
    last = f"{now_ms()}-0"
    found = []
    # A wait within REDIS_TIMEOUT (0.5 s), as the events command makes them.
    waiting = threading.Thread(target=lambda: found.extend(history.follow(last, block_ms=400)))
    waiting.start()
    time.sleep(0.2)
    post_signed(app.test_client(), webhook_params())
    waiting.join(timeout=15)
    assert [e.type for e in found] == ["started"]


@pytest.mark.slow
def test_events_follow_keeps_waiting_past_redis_timeout(redis_url, redis_client):
    """``sms-sessions events --follow`` as a user runs it: still following seconds after it
    started (each wait is shorter than REDIS_TIMEOUT, which ended a 5 s one), and it prints
    the next event when it comes. The event is made once the follower is reading the stream
    (a loaded machine may take seconds to start it), and the follower is killed whatever
    happens: one left behind would keep reading this Redis under later tests."""
    follower = subprocess.Popen(
        [bin_path("sms-sessions"), "events", "--follow", "--since", "1s"],
        env={**hermetic_environment(), "REDIS_URL": redis_url, "REDIS_TIMEOUT": "0.5"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        wait_until(
            lambda: (
                follower.poll() is not None
                or any(c.get("cmd") == "xread" for c in redis_client.client_list())
            ),
            seconds=120,
            what="the follower reading the stream",
        )
        time.sleep(3)  # six times REDIS_TIMEOUT
        assert follower.poll() is None, follower.communicate(timeout=60)
        post_signed(make_app(REDIS_URL=redis_url).test_client(), webhook_params(sender=REY))
        line = lines.get(timeout=120)
        assert "started" in line and REY in line
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=60)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait(timeout=60)


def test_stats_and_metrics_report_the_lifecycle(redis_url):
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "OPS_TOKEN": "ops"}, handler=notebook
    )
    twilio = TwilioSimulator.for_app(app)
    for body in ("a", "b", "bye"):
        twilio.send(REY, OURS, body)
    twilio.send(FINN, OURS, "hi")
    client = app.test_client()
    stats = client.get("/ops/stats", headers=OPS).get_json()
    assert stats["active"] == 1
    assert stats["last_hour"]["started"] == 2
    assert stats["last_hour"]["ended"] == {"handler": 1}
    assert stats["last_hour"]["average_messages"] == 3
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "sms_conversations_started_total 2.0" in metrics
    assert 'sms_conversations_ended_total{reason="handler"} 1.0' in metrics
    assert "sms_conversations_ended_last_hour_messages 3.0" in metrics


@pytest.mark.slow
def test_under_gunicorn_a_conversation_ends_with_no_request(redis_url, redis_client):
    """The repository's gunicorn config starts a sweeper in each worker; one holds the lease."""
    with Gunicorn(
        {"REDIS_URL": redis_url, "CONVERSATION_TTL": "1", "SWEEP_INTERVAL": "0.5"},
        config=GUNICORN_CONF,
        workers=2,
    ) as server:
        assert TwilioSimulator(server.url, TOKEN).send(REY, OURS, "hi").status == 200
        wait_until(lambda: events(redis_client, "ended"), seconds=15, what="the ended event")
        assert redis_client.get(KEYS.sweeper)  # a lease, held by one worker
    [ended] = events(redis_client, "ended")
    assert ended["reason"] == "expired"


def test_the_last_hour_costs_the_same_for_ten_or_five_hundred_conversations(app, redis_client):
    """stats() reads each tag's per-minute tallies, never the events themselves."""
    client = app.test_client()
    history = current(app).history
    tallies = []
    for total in (10, 500):
        for n in range(total):
            post_signed(client, webhook_params(sender=f"+1555{n:07d}"))
        found = []
        tallies.append(commands_during(redis_client, lambda: found.append(history.stats())))
        assert found[0]["started"] == total
        redis_client.flushall()
    assert tallies[0] == tallies[1] == {"hgetall": 100}


def test_every_tally_is_read_back_with_an_earlier_versions_records(redis_url, redis_client):
    """Each end reason, started, messages and the ended ones' messages go to their own field of
    the minute; a record a version before commit 694d48f wrote (one per minute, 9 numbers) is
    read too."""
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "CONVERSATION_TTL": 1}, handler=notebook
    )
    twilio = TwilioSimulator.for_app(app)
    senders = [f"+15551230{n}" for n in range(101, 105)]
    for sender in senders:
        twilio.send(sender, OURS, "hi")
    twilio.send(senders[0], OURS, "bye")  # handler, 2 messages
    twilio.send(senders[1], OURS, "STOP")  # opt-out, 2 messages
    assert current(app).store.end(KEYS.conversation(senders[2], OURS))  # operator, 1
    time.sleep(1.1)
    assert Sweeper(app).sweep() == 1  # expired, 1
    earlier = f"{now_ms() // 60000} 4 1 1 0 0 0 60000 3"  # 1 started, 1 expired after 3 messages
    redis_client.hset(KEYS.minutes("42"), "17", earlier)
    stats = current(app).history.stats()
    assert stats["started"] == 5
    assert stats["ended"] == {"handler": 1, "opt-out": 1, "operator": 1, "expired": 2}
    assert stats["average_messages"] == round((2 + 2 + 1 + 1 + 3) / 5, 2)
    with app.app_context():
        messages = sum(tally[0] for tally in current(app).history.minute_tallies(0, now_ms()))
    assert messages == 4 + 2 + 4


def test_the_sample_counts_a_minutes_messages_from_one_field_per_tag(app, redis_client):
    """The sweeper's per-minute sample reads the minute's message count (and a version before
    commit 694d48f's record of it) with one HMGET per tag, and agrees with the whole hour's read."""
    client, history = app.test_client(), current(app).history
    first = now_ms() // 60000
    for n in range(7):
        post_signed(client, webhook_params(sender=f"+1555{n:07d}"))
    last = now_ms() // 60000
    old = first - 3  # a pre-694d48f record: '<minute % 60>' = "<minute> <messages> …"
    redis_client.hset(Keys().minutes("42"), str(old % 60), f"{old} 5 0 0 0 0 0 0 0")
    found = []
    read = commands_during(
        redis_client, lambda: found.extend(history.messages_in(m) for m in range(first, last + 1))
    )
    assert sum(found) == 7 == sum(t[0] for t in history.minute_tallies(first, last))
    assert read == {"hmget": 100 * len(found)}
    assert history.messages_in(old) == 5


def test_end_hook_payloads_of_another_shape_are_run_or_kept_never_counted_as_failures(
    redis_url, redis_client, caplog
):
    """A rolling deploy: the entry written by a version before service/store/ (a 7-element
    array) still runs the hook; one this version cannot read at all is left in place for a
    version that can, reported once in the log, and is not counted as the hook failing."""
    seen = []

    def on_end(conversation, reason):
        seen.append(
            (conversation.sid, reason, dict(conversation), conversation.messages, conversation.sender)
        )

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=notebook, on_end=on_end)
    ending = KEYS.ending("01")
    earlier = [REY, OURS, "operator", "3", "1000", "2000", '{"n": 1}']
    redis_client.hset(ending, mapping={"old": json.dumps(earlier), "junk": '{"from": "x"}'})
    sweeper = Sweeper(app)
    sweeper.sweep()
    sweeper.sweep()
    assert seen == [("old", "operator", {"n": 1}, 3, REY)]
    assert redis_client.hgetall(ending) == {"junk": '{"from": "x"}'}
    assert caplog.text.count("payload of conversation junk is unreadable; left in place") == 1
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "sms_end_hook_failures_total 0.0" in metrics


def test_end_hook_payload_fields_a_later_version_adds_are_ignored(redis_url, redis_client):
    seen = []
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url},
        handler=notebook,
        on_end=lambda conversation, reason: seen.append((conversation.sid, reason, conversation.ended_at)),
    )
    payload = {
        "from": REY,
        "to": OURS,
        "reason": "handler",
        "messages": "2",
        "started_at": "1000",
        "ended_at": "2000",
        "state": "{}",
        "channel": "sms",  # a field this version does not know
    }
    redis_client.hset(KEYS.ending("01"), "later", json.dumps(payload))
    Sweeper(app).sweep()
    assert [(sid, reason, ended_at.timestamp()) for sid, reason, ended_at in seen] == [
        ("later", "handler", 2.0)
    ]
    assert not redis_client.exists(KEYS.ending("01"))


@pytest.mark.parametrize("way", ["handler", "opt-out", "operator", "sweeper", "open"])
def test_an_ended_conversation_keeps_only_its_answers_for_the_redelivery_window(redis_url, redis_client, way):
    """Whichever way it ends, nothing of a conversation outlives REDELIVERY_WINDOW: its hash
    keeps only the answers a redelivery needs ('m:…'), expiring within the window; its index
    entry and lock are gone. ``open``: the next message's OPEN finds its time run out."""
    window = 30
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "OPS_TOKEN": "ops",
            "CONVERSATION_TTL": 1,
            "REDELIVERY_WINDOW": window,
        },
        handler=notebook,
    )
    twilio = TwilioSimulator.for_app(app)
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "hi")
    assert redis_client.pttl(keys.conversation) > 24 * 3600 * 1000  # live: the TTL and a day's grace
    if way in ("handler", "opt-out"):
        twilio.send(REY, OURS, "bye" if way == "handler" else "STOP")
    elif way == "operator":
        assert app.test_client().delete(f"/ops/conversations/{REY}/{OURS}", headers=OPS).status_code == 200
    else:
        time.sleep(1.1)
        if way == "sweeper":
            assert Sweeper(app).sweep() == 1
        else:
            assert current(app).store.open(keys, "SMnext").ended_overdue
            redis_client.delete(keys.lock)  # as if that message's handler failed: nothing saved
    assert [e["reason"] for e in events(redis_client, "ended")] == [
        {"open": "expired", "sweeper": "expired"}.get(way, way)
    ]
    fields = redis_client.hgetall(keys.conversation)
    assert fields and all(name.startswith("m:") for name in fields)
    assert 0 < redis_client.pttl(keys.conversation) <= window * 1000
    assert redis_client.zscore(keys.index_shard, keys.member) is None
    assert not redis_client.exists(keys.lock, keys.queue, keys.waiters)


@pytest.mark.parametrize("edit", ["state", "seq"])
def test_a_conversation_that_starts_afresh_gets_its_ended_event_and_hook_call(redis_url, redis_client, edit):
    """Stored state a hand edit left unreadable: the next message starts a new conversation,
    and the old one ends first (reason ``operator``, whose edit it was) with its event, its
    hook call and its metric; nothing of it outlives REDELIVERY_WINDOW."""
    calls = []
    app = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "REDELIVERY_WINDOW": 30},
        handler=notebook,
        on_end=lambda conversation, reason: calls.append((conversation.sid, reason, conversation.messages)),
    )
    twilio = TwilioSimulator.for_app(app)
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "a")
    twilio.send(REY, OURS, "b")
    old = redis_client.hget(keys.conversation, "sid")
    redis_client.hset(keys.conversation, edit, "{not json" if edit == "state" else "many")
    assert twilio.send(REY, OURS, "c").reply == "1 noted"  # afresh
    [first, second] = events(redis_client, "started")
    [ended] = events(redis_client, "ended")
    assert first["conversation"] == old
    assert (ended["conversation"], ended["reason"]) == (old, "operator")
    assert second["conversation"] == redis_client.hget(keys.conversation, "sid") != old
    assert first["id"] < ended["id"] < second["id"]
    Sweeper(app).sweep()
    assert calls == [(old, "operator", 0 if edit == "seq" else 2)]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'sms_conversations_ended_total{reason="operator"} 1.0' in metrics
    assert "sms_conversations_started_total 2.0" in metrics


def test_an_opt_out_of_an_unreadable_conversation_ends_it_as_opt_out(redis_url, redis_client):
    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=notebook)
    twilio = TwilioSimulator.for_app(app)
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "a")
    redis_client.hset(keys.conversation, "state", "[]")
    twilio.send(REY, OURS, "STOP")
    assert [e["reason"] for e in events(redis_client, "ended")] == ["opt-out"]
    assert len(events(redis_client, "started")) == 1  # an opt-out starts nothing
    fields = redis_client.hgetall(keys.conversation)
    assert all(name.startswith("m:") for name in fields)
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'sms_conversations_ended_total{reason="opt-out"} 1.0' in metrics


def test_a_handler_clearing_the_conversations_id_changes_nothing_stored(redis_url, redis_client):
    """``conversation.sid`` is the service's: a handler that clears or changes it neither
    makes the next message start afresh nor loses the conversation's ``ended`` event."""

    def forgetful(message, conversation):
        conversation.sid = None if message.body == "forget" else "mine"
        return notebook(message, conversation)

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=forgetful)
    twilio = TwilioSimulator.for_app(app)
    twilio.send(REY, OURS, "a")
    sid = twilio.cookie_for(REY, OURS)
    assert twilio.send(REY, OURS, "forget").reply == "2 noted"
    assert twilio.cookie_for(REY, OURS) == sid
    assert twilio.send(REY, OURS, "b").reply == "3 noted"
    twilio.send(REY, OURS, "bye")
    [started] = events(redis_client, "started")
    [ended] = events(redis_client, "ended")
    assert started["conversation"] == ended["conversation"] == sid
    assert ended["messages"] == "4"


def test_an_unknown_end_reason_is_a_handler_failure_with_nothing_saved(redis_url, redis_client):
    """A handler that sets ``end_reason`` by hand to what no end is: 500, nothing saved (no
    event, no count), the lock given back at once (the next message answers 200)."""

    def leaver(message, conversation):
        conversation["seen"] = message.body
        if message.body == "leave":
            conversation.end_reason = "left"
        return "ok"

    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "LOCK_TTL": 30}, handler=leaver)
    twilio = TwilioSimulator.for_app(app)
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "a")
    before = redis_client.hgetall(keys.conversation)
    assert twilio.send(REY, OURS, "leave").status == 500
    assert redis_client.hgetall(keys.conversation) == before
    assert not redis_client.exists(keys.lock)
    assert events(redis_client, "ended") == []
    assert twilio.send(REY, OURS, "b").status == 200
    assert redis_client.hget(keys.conversation, "seq") == "2"


def test_save_refuses_an_unknown_end_reason_before_writing_anything(app, redis_client):
    """The script's own check, for a caller that skipped the session's."""
    from redis.exceptions import ResponseError

    store = current(app).store
    keys = KEYS.conversation(REY, OURS)
    TwilioSimulator.for_app(app).send(REY, OURS, "a")
    before = redis_client.hgetall(keys.conversation), redis_client.xlen(KEYS.events)
    opened = store.open(keys, "SMsecond")
    with pytest.raises(ResponseError, match="unknown end reason"):
        store.save(
            keys,
            opened,
            Commit(
                sid=opened.sid, state="{}", is_new=False, message_sid="SMsecond", answer="", end_reason="left"
            ),
        )
    assert (redis_client.hgetall(keys.conversation), redis_client.xlen(KEYS.events)) == before
    store.release(keys, opened.token)
    assert not redis_client.exists(keys.lock)


@pytest.mark.parametrize("skew_ms", [-3_600_000, 8 * 86_400_000])
def test_the_sweeper_goes_by_redis_clock_not_the_hosts(app, redis_client, monkeypatch, skew_ms):
    """A host whose clock is an hour behind still ends what is due; one 8 days ahead neither
    trims a week's events (EVENTS_RETENTION) nor ends live conversations."""
    import service.clock
    import service.lifecycle

    host = lambda: service.clock.now_ms() + skew_ms  # noqa: E731
    monkeypatch.setattr(service.lifecycle, "now_ms", host)
    post_signed(app.test_client(), webhook_params(sender=FINN))  # live, with its started event
    due = plant_due(redis_client, 3)
    assert Sweeper(app).sweep() == 3
    assert sorted(e["conversation"] for e in events(redis_client, "ended")) == sorted(due)
    assert len(events(redis_client, "started")) == 1
    assert current(app).live.get(FINN, OURS) is not None
