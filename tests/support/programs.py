"""Programs a test needs (redis-server, redis-cli, Chromium and its driver, docker-compose):
found, or the test skips with the reason; under ``REQUIRE_PROGRAMS=1`` (CI, which installs every
such package) a missing one fails the test instead."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED = "REQUIRE_PROGRAMS"  # =1: a missing program fails the test instead of skipping it


def require_binary(name: str, package: str) -> str:
    """The path of a program the test needs; missing, it skips with the reason, or fails
    under ``REQUIRE_PROGRAMS=1``."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (apt-get install {package})"
    if os.environ.get(REQUIRED) == "1":
        pytest.fail(f"{reason} and {REQUIRED}=1")
    pytest.skip(reason + ": test skipped")


def require_redis_server() -> str:
    return require_binary("redis-server", "redis-server")


def require_redis_tools() -> None:
    """redis-server, and redis-cli (Cluster creation, ``config/sentinel-reconfig.sh``)."""
    require_redis_server()
    require_binary("redis-cli", "redis-tools")
