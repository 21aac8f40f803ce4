"""Bounded waits for a server or a condition: they give up with a clear error, never time a test."""

from __future__ import annotations

import subprocess
import time

import redis
import requests


def wait_until(condition, seconds: float = 30, what: str = "condition"):
    """Polls ``condition`` until it returns something truthy; a bounded wait, never a timing check."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = condition()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {seconds}s")
        time.sleep(0.05)


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    """Returns once ``url`` answers at all; raises if ``process`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            requests.get(url, timeout=5)
            return
        except (requests.ConnectionError, requests.Timeout):  # not listening, or no worker yet
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds}s")
