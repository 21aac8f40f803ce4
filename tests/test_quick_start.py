"""The README's quick start, as written, on a clean checkout of the committed tree."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.support import ROOT
from tests.support.ports import free_port
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_for_http

README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_make_run_then_simulate_on_a_clean_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
    port = free_port()
    # As a newcomer's shell: no venv, token or make variables of ours (CI's PYTHON is kept).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "TWILIO_AUTH_TOKEN", "VENV", "MAKEFLAGS", "MAKELEVEL", "LOG_FORMAT")
    }
    server = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", server, seconds=300)
        simulate = re.search(
            r"^(TWILIO_AUTH_TOKEN=\S+) (\.venv/bin/sms-sessions simulate .*)$", README, re.MULTILINE
        )
        token, command = simulate.groups()
        result = subprocess.run(
            f"{token} {command} --url http://127.0.0.1:{port}/sms --message hello --repeat 2",
            shell=True,
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        served = server.communicate(timeout=30)[0]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        thanks("Rey"),
        count_reply("Rey", 2),
    ]
    # A developer's terminal: readable lines, one per message, no JSON, no colour escapes.
    webhook = [line for line in served.splitlines() if "service.webhook" in line]
    assert len(webhook) == 2, served
    assert all(
        re.search(
            r" INFO service\.webhook: webhook replied method=POST remote=127\.0\.0\.1 "
            r"message_sid=SM\w+ from=\+1555\*\*\*0001 ",
            line,
        )
        for line in webhook
    )
    assert '{"time"' not in served
    assert "\x1b[" not in served
    assert "POST /sms" not in served
