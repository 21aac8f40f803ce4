"""Async handlers under gevent's patching (the shipped worker class): asyncio keeps one running
loop per OS thread, which all greenlets share, so the process' handler loop runs on a real
thread. Two apps in one process (each its own loop) and a plain ``asyncio.run`` in a greenlet
all work, and so do an async handler's sends (made on the loop's thread, queued from the hub's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.responses import NO_REPLY

ROOT = Path(__file__).resolve().parent.parent


def test_async_handlers_of_two_apps_and_asyncio_run_in_a_greenlet_under_gevent(redis_url):
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.gevent_async_runs", redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    status, body = got["inline"]
    assert status == 200
    assert "async: one" in body
    assert got["later"] == [200, NO_REPLY]  # past the webhook: its reply is an outbound message
    assert json.loads(got["later_state"])["bodies"] == ["two"]
    # Inline, its sends go with the save; past the webhook, each as it is sent, then the reply.
    assert got["inline_outbound"] == ["before one", "after one"]
    assert got["later_outbound"] == ["before two", "after two", "async: two"]
    assert got["plain"] == "ran"
