"""The end hook on a real Redis: once per ending however slow and however many sweepers, a time
limit, never in the sweep's way, and reached by every way of ending, from processes that do not
have it too (the CLI, ``sms-sessions sweep`` with only REDIS_URL)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter

import pytest

from service import create_app
from service.clock import now_ms
from service.hooks import EndHooks
from service.keys import Keys
from service.lifecycle import Sweeper
from service.simulator import TwilioSimulator
from service.wiring import current
from tests.support import ROOT
from tests.support.app import TOKEN
from tests.support.app_servers import bin_path, hermetic_environment
from tests.support.conversations import plant
from tests.support.numbers import OURS, REY
from tests.support.waiting import wait_until

KEYS = Keys()


def plant_due_in_one_shard(client, count: int) -> list[str]:
    """``count`` conversations whose time ran out, all in the index shard {42}: one sweep's
    shard holds them all."""
    now = now_ms()
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        plant(pipe, f"+1557{n:05d}42", OURS, now - 1000, sid=f"conv-{n}", state={"n": n}, seq=2)
    pipe.execute()
    return [f"conv-{n}" for n in range(count)]


def ended_ids(client) -> list[str]:
    return [fields["conversation"] for _, fields in client.xrange(KEYS.events) if fields["type"] == "ended"]


def app_with_hook(redis_url, on_end, **settings):
    config = {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, **settings}
    return create_app(config, handler=lambda message, conversation: "ok", on_end=on_end)


@pytest.mark.slow
def test_a_slow_hook_runs_once_per_ending_with_several_sweepers(redis_url, redis_client):
    """41 endings in one shard, a 0.5 s hook, three processes' sweepers (each with its end-hook
    thread) in the background: 41 calls, one per conversation, though the hooks take longer
    than the sweeper's lease."""
    calls: list[str] = []
    lock = threading.Lock()

    def slow(conversation, reason):
        time.sleep(0.5)
        with lock:
            calls.append(conversation.sid)

    due = plant_due_in_one_shard(redis_client, 41)
    sweepers = [Sweeper(app_with_hook(redis_url, slow, SWEEP_INTERVAL=0.2)) for _ in range(3)]
    for sweeper in sweepers:
        sweeper.start()
    try:
        wait_until(lambda: len(calls) >= 41, seconds=90, what="41 hook calls")
        time.sleep(1.5)  # any second call of an ending would come meanwhile
    finally:
        for sweeper in sweepers:
            sweeper.stop()
    assert sorted(ended_ids(redis_client)) == sorted(due)
    assert Counter(calls) == Counter(due)
    assert all(not redis_client.exists(KEYS.ending(shard)) for shard in KEYS.shards())


@pytest.mark.slow
def test_a_hanging_hook_holds_up_neither_the_sweep_nor_the_other_hooks(redis_url, redis_client, caplog):
    """A hook that never returns for one conversation: the sweep goes on (the next endings'
    events, the minute's sample), the call is given up after END_HOOK_TIMEOUT (logged,
    counted, its entry dropped, never called again) and the other conversations' hooks run."""
    release = threading.Event()
    calls: list[str] = []

    def hangs_on_the_first(conversation, reason):
        calls.append(conversation.sid)
        if conversation.sid == "conv-0":
            release.wait(60)

    app = app_with_hook(redis_url, hangs_on_the_first, SWEEP_INTERVAL=0.2, END_HOOK_TIMEOUT=1)
    plant_due_in_one_shard(redis_client, 1)
    sweeper = Sweeper(app)
    sweeper.start()
    try:
        wait_until(lambda: calls == ["conv-0"], seconds=30, what="the hanging call")
        later = plant_due_in_one_shard(redis_client, 4)[1:]  # conv-1…3 (conv-0 is ended)
        wait_until(lambda: set(later) <= set(ended_ids(redis_client)), seconds=30, what="the next endings")
        assert redis_client.xlen(KEYS.samples) >= 1
        wait_until(lambda: set(later) <= set(calls), seconds=30, what="the other hooks")
    finally:
        sweeper.stop()
        release.set()
    assert sorted(calls) == ["conv-0", *later]
    assert "end hook timed out after 1s (END_HOOK_TIMEOUT) for conversation conv-0" in caplog.text
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "sms_end_hook_failures_total 1.0" in metrics
    assert not redis_client.hexists(KEYS.ending("42"), "conv-0")


def run_cli(redis_url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``sms-sessions`` as docs/operating.md runs it: only REDIS_URL set."""
    return subprocess.run(
        [bin_path("sms-sessions"), *args],
        env={**hermetic_environment(), "REDIS_URL": redis_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_conversations_expire_from_the_cli_reaches_the_deployments_hook(redis_url, redis_client):
    """The CLI has no handler: what it ends is kept for the hook of the deployment (a process
    that runs it announced itself), which runs it."""
    calls = []
    app = app_with_hook(redis_url, lambda conversation, reason: calls.append((conversation.sid, reason)))
    TwilioSimulator.for_app(app).send(REY, OURS, "hi")
    hooks = EndHooks(app, current(app).on_end)
    hooks.run_once()  # the deployment's process, announcing itself
    result = run_cli(redis_url, "conversations", "expire", REY, OURS)
    assert result.returncode == 0, result.stderr
    [ended] = ended_ids(redis_client)
    hooks.run_once()
    assert calls == [(ended, "operator")]


@pytest.mark.slow
def test_a_sweep_run_with_only_redis_url_reaches_the_deployments_hook(redis_url, redis_client):
    """``sms-sessions sweep`` without SMS_HANDLER ends what is due and keeps it for the hook;
    the deployment's process runs it (its hook thread, whoever holds the lease)."""
    calls = []
    app = app_with_hook(redis_url, lambda conversation, reason: calls.append((conversation.sid, reason)))
    EndHooks(app, current(app).on_end).announce()
    due = plant_due_in_one_shard(redis_client, 5)
    sweep = subprocess.Popen(
        [bin_path("sms-sessions"), "sweep"],
        env={**hermetic_environment(), "REDIS_URL": redis_url, "SWEEP_INTERVAL": "0.2"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(ended_ids(redis_client)) == 5, seconds=30, what="5 ended events")
    finally:
        sweep.terminate()
        sweep.wait(timeout=10)
    EndHooks(app, current(app).on_end).run_once()
    assert sorted(calls) == sorted((sid, "expired") for sid in due)


def test_without_any_hook_nothing_is_kept_for_one(redis_url, redis_client):
    """No process announced a hook (none has one): ending keeps no final state."""
    app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, "OPS_TOKEN": "ops"})
    TwilioSimulator.for_app(app).send(REY, OURS, "hi")
    plant_due_in_one_shard(redis_client, 2)
    assert Sweeper(app).sweep() == 2
    assert current(app).live.end(REY, OURS)
    assert not redis_client.exists(KEYS.hooks)
    assert all(not redis_client.exists(KEYS.ending(shard)) for shard in KEYS.shards())


def test_an_entry_kept_for_a_hook_expires_with_its_conversations_grace(app, redis_client):
    """A deployment that dropped its hook leaves no entry forever: the hash expires a day after
    its latest entry's conversation would have."""
    EndHooks(app, lambda conversation, reason: None).announce()
    plant_due_in_one_shard(redis_client, 1)
    Sweeper(app).sweep()
    entries = redis_client.hgetall(KEYS.ending("42"))
    assert [json.loads(raw)["reason"] for raw in entries.values()] == ["expired"]
    grace = (app.config["CONVERSATION_TTL"] + 24 * 3600) * 1000
    assert grace - 60_000 < redis_client.pttl(KEYS.ending("42")) <= grace
