"""End to end: the app under gunicorn (2 workers) on a real Redis, driven like Twilio does."""

from __future__ import annotations

import subprocess

import pytest

from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.app_servers import Gunicorn, bin_path
from tests.support.ports import free_port

pytestmark = pytest.mark.slow  # gunicorn and the sms-sessions command in subprocesses

REY, OURS = "+15551230001", "+15550001111"


def test_conversation_under_gunicorn_with_the_simulator(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        replies = [twilio.send(REY, OURS, f"message {n}").reply for n in range(1, 5)]
        redelivered = twilio.send(REY, OURS, "again", message_sid="SMrepeat")
        repeat = twilio.send(REY, OURS, "again", message_sid="SMrepeat")
    assert replies == ["Thanks for the message, Rey!"] + [
        f"Rey has messaged +15550001111 {n} times." for n in (2, 3, 4)]
    assert redelivered.reply == repeat.reply == "Rey has messaged +15550001111 5 times."


def test_simulate_command_against_gunicorn(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        result = subprocess.run(
            [bin_path("sms-sessions"), "simulate", "--from", REY, "--to", OURS, "--url", server.url,
             "--message", "hello", "--repeat", "3"],
            env={**server.env, "TWILIO_AUTH_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60)
        typed = subprocess.run(
            [bin_path("sms-sessions"), "simulate", "--from", REY, "--to", OURS, "--url", server.url],
            input="one more\n", env={**server.env, "TWILIO_AUTH_TOKEN": TOKEN},
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Thanks for the message, Rey!",
        "Rey has messaged +15550001111 2 times.",
        "Rey has messaged +15550001111 3 times.",
    ]
    # A new simulator process has no cookie: the pair still finds the conversation.
    assert typed.stdout.splitlines() == ["Rey has messaged +15550001111 4 times."]


def test_simulate_with_the_wrong_token_is_refused(redis_url):
    with Gunicorn({"REDIS_URL": redis_url}) as server:
        result = subprocess.run(
            [bin_path("sms-sessions"), "simulate", "--from", REY, "--to", OURS, "--url", server.url,
             "--message", "hello", "--auth-token", "wrong"],
            env=server.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "HTTP 403" in result.stderr


def test_simulate_without_a_service_says_so_in_one_line():
    result = subprocess.run(
        [bin_path("sms-sessions"), "simulate", "--from", REY, "--to", OURS,
         "--url", f"http://127.0.0.1:{free_port()}/sms", "--message", "hello"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: no answer from http://127.0.0.1:")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
