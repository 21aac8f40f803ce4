"""Programs a test needs: found, or the test skips with the reason (fails under ``REQUIRE_REDIS=1``,
as CI installs every such package)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str, package: str) -> str:
    """The path of a program the test needs; missing, it skips with the reason, or fails
    under ``REQUIRE_REDIS=1``."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(reason + " and REQUIRE_REDIS=1")
    pytest.skip(reason + ": test skipped")


def require_redis_server() -> str:
    return require_binary("redis-server", "redis-server")


def require_redis_tools() -> None:
    """redis-server, and redis-cli (Cluster creation, ``config/sentinel-reconfig.sh``)."""
    require_redis_server()
    require_binary("redis-cli", "redis-tools")
