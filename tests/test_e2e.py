"""End to end: the app under gunicorn (2 workers) on a real Redis, driven like Twilio does."""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.keys import Keys
from service.simulator import TwilioSimulator, new_message_sid
from tests.support import ROOT
from tests.support.app import TOKEN
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, sms_sessions
from tests.support.numbers import OURS, REY
from tests.support.ports import free_port
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_for_http

pytestmark = pytest.mark.slow  # gunicorn and the sms-sessions command in subprocesses


def test_conversation_under_gunicorn_with_the_simulator(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        replies = [twilio.send(REY, OURS, f"message {n}").reply for n in range(1, 5)]
        redelivered = twilio.send(REY, OURS, "again", message_sid="SMrepeat")
        repeat = twilio.send(REY, OURS, "again", message_sid="SMrepeat")
    assert replies == [thanks("Rey")] + [count_reply("Rey", n) for n in (2, 3, 4)]
    assert redelivered.reply == repeat.reply == count_reply("Rey", 5)


def test_simulate_command_against_gunicorn(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        talk = ("simulate", "--from", REY, "--to", OURS, "--url", server.url)
        result = sms_sessions(*talk, "--message", "hello", "--repeat", "3", TWILIO_AUTH_TOKEN=TOKEN)
        typed = sms_sessions(*talk, stdin="one more\n", TWILIO_AUTH_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        thanks("Rey"),
        count_reply("Rey", 2),
        count_reply("Rey", 3),
    ]
    # A new simulator process has no cookie: the pair still finds the conversation.
    assert typed.stdout.splitlines() == [count_reply("Rey", 4)]


def test_simulate_with_the_wrong_token_is_refused(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        result = sms_sessions(
            "simulate", "--from", REY, "--to", OURS, "--url", server.url, "--message", "hello",
            "--auth-token", "wrong",
        )  # fmt: skip
    assert result.returncode == 1
    assert "HTTP 403" in result.stderr and "sign with the service's TWILIO_AUTH_TOKEN" in result.stderr


def test_simulate_without_a_service_says_so_in_one_line():
    url = f"http://127.0.0.1:{free_port()}/sms"
    result = sms_sessions("simulate", "--from", REY, "--to", OURS, "--url", url, "--message", "hello")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: no answer from http://127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_burst_delivered_twice_counts_each_message_once(redis_url, redis_client):
    """30 messages of one conversation, each delivered twice at the same moment, under the
    repository's gunicorn config: every redelivery falls inside REDELIVERY_WINDOW, however many
    messages came in between, so each is counted once and both deliveries get the same answer."""
    sids = [new_message_sid() for _ in range(30)]
    with Gunicorn({"REDIS_URL": redis_url}, config=GUNICORN_CONF) as server:
        sims = [TwilioSimulator(server.url, TOKEN) for _ in range(60)]
        with ThreadPoolExecutor(max_workers=60) as pool:
            deliveries = list(
                pool.map(lambda n: sims[n].send(REY, OURS, "x", message_sid=sids[n // 2]), range(60))
            )
    assert [d.status for d in deliveries] == [200] * 60
    for first, second in zip(deliveries[0::2], deliveries[1::2]):
        assert first.reply == second.reply
    assert len({d.reply for d in deliveries}) == 30
    assert redis_client.hget(Keys().conversation(REY, OURS).conversation, "seq") == "30"


def test_make_run_serves_the_handler_named_by_sms_handler():
    """`make run SMS_HANDLER=…` (the README's way to try a bot) serves that handler."""

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SMS_HANDLER", "TWILIO_AUTH_TOKEN")}
    server = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={port}", "SMS_HANDLER=examples.survey:handle"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", server, seconds=120)
        twilio = TwilioSimulator(f"http://127.0.0.1:{port}/sms", "dev-auth-token")
        replies = [twilio.send(REY, OURS, text).reply for text in ("hi", "Rey")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert replies == [
        "Hi! Three quick questions. What should we call you?",
        "Thanks, Rey. What is your favourite colour?",
    ]
