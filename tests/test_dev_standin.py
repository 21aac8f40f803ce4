"""Development without a Twilio account: `make run` starts the Twilio stand-in and sends
through it, unless the developer set a Twilio account of their own; `sms-sessions simulate
--standin` prints the service's outbound messages as they reach the simulated phone, after the
reply that caused them."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.support import ROOT
from tests.support.app_servers import bin_path, hermetic_environment
from tests.support.numbers import OURS, REY
from tests.support.ports import free_port
from tests.support.waiting import wait_for_http

pytestmark = pytest.mark.slow


class MakeRun:
    """``make run`` in the project directory on free ports, its output kept."""

    def __init__(self, **env: str):
        self.port, self.standin_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.standin = f"http://127.0.0.1:{self.standin_port}"
        self.env = {**hermetic_environment(), **env}
        for name in ("MAKEFLAGS", "MAKELEVEL"):
            self.env.pop(name, None)
        self.process = subprocess.Popen(
            ["make", "--no-print-directory", "run", f"PORT={self.port}", f"STANDIN_PORT={self.standin_port}"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def __enter__(self):
        try:
            wait_for_http(self.base + "/healthz", self.process, seconds=120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.output = self.process.communicate(timeout=30)[0]


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [bin_path("sms-sessions"), "simulate", "--from", REY, "--to", OURS, *args],
        env={**hermetic_environment(), "TWILIO_AUTH_TOKEN": "dev-auth-token"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_run_sends_through_the_standin_and_simulate_prints_what_arrives():
    with MakeRun(SMS_HANDLER="tests.support.outbound_bot:handle", SENDER_INTERVAL="0.2") as served:
        result = simulate(
            "--url", served.base + "/sms", "--standin", served.standin, "--message", "3 pm", "--linger", "5"
        )
        [delivered] = requests.get(
            served.standin + "/_standin/messages", params={"to": REY}, timeout=5
        ).json()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Noted.", "[outbound] Reminder: you said 3 pm"]
    assert delivered["from"] == OURS
    assert delivered["body"] == "Reminder: you said 3 pm"
    assert f"sending: the local Twilio stand-in at {served.standin}" in served.output
    assert f"--standin {served.standin}" in served.output  # the banner's simulate line
    assert "+15551230001" not in served.output.replace("--from +15551230001", "")  # masked in logs


def test_simulate_prints_nothing_old_and_says_when_the_standin_is_not_there():
    with MakeRun(SENDER_INTERVAL="0.2", OPS_TOKEN="dev-ops") as served:
        queued = requests.post(
            served.base + "/ops/messages",
            json={"to": REY, "text": "sent before the phone listened"},
            headers={"Authorization": "Bearer dev-ops"},
            timeout=10,
        )
        assert queued.status_code == 201
        wait = requests.Session()
        for _ in range(100):  # bounded: until the stand-in delivered it
            if wait.get(served.standin + "/_standin/messages", params={"to": REY}, timeout=5).json():
                break
            time.sleep(0.1)
        result = simulate(
            "--url", served.base + "/sms", "--standin", served.standin, "--message", "hi", "--linger", "1"
        )
    assert result.returncode == 0, result.stderr
    assert "[outbound]" not in result.stdout  # delivered before simulate started: not news
    missing = simulate("--standin", f"http://127.0.0.1:{free_port()}", "--message", "hi")
    assert missing.returncode == 1
    assert "no Twilio stand-in at" in missing.stderr


def test_make_run_leaves_a_developers_own_twilio_account_alone():
    account = "AC" + "5" * 32
    with (
        MakeRun(TWILIO_ACCOUNT_SID=account, TWILIO_AUTH_TOKEN="my-own-token") as served,
        pytest.raises(requests.ConnectionError),
    ):
        requests.get(served.standin + "/_standin/messages", timeout=5)
    assert "sending: Twilio's REST API, account AC5555…" in served.output
    assert "--standin" not in served.output
    assert "TWILIO_API_BASE_URL" not in served.output


def test_make_run_with_the_assistant_acknowledges_at_once_and_simulate_prints_the_later_reply():
    """examples/assistant.py's walk: its slow API (examples/slow_api.py) answers after 2 s, past
    the inline budget, so the webhook answers Twilio with no reply and the answer reaches the
    simulated phone through the stand-in afterwards."""
    api_port = free_port()
    api = subprocess.Popen(
        [bin_path("python"), "-m", "examples.slow_api", "--port", str(api_port), "--delay", "2"],
        cwd=ROOT,
        env=hermetic_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{api_port}/healthz", api, seconds=60)
        with MakeRun(
            SMS_HANDLER="examples.assistant:handle",
            ASSISTANT_URL=f"http://127.0.0.1:{api_port}/v1/complete",
            SENDER_INTERVAL="0.2",
        ) as served:
            asked = ("--message", "why is the sky blue", "--linger", "6")
            result = simulate("--url", served.base + "/sms", "--standin", served.standin, *asked)
    finally:
        api.terminate()
        api.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "(no reply)",  # Twilio's answer: the handler is still waiting for the API
        "[outbound] You asked about “why is the sky blue”. Here is a considered answer, 5 words long.",
    ]
