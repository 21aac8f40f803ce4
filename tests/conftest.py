"""Fixtures: one real redis-server per test session (flushed per test), apps, clients, servers,
topologies. What they are built from lives in ``tests/support/``.

Without ``redis-server`` the integration tests skip with a printed reason, unless
``REQUIRE_PROGRAMS=1`` (CI), where that is a failure (``tests/support/programs.py``).
"""

from __future__ import annotations

import pytest
import redis

from service.settings import SETTINGS
from service.simulator import TwilioSimulator
from tests.support import redis_servers
from tests.support.app import TOKEN, make_app
from tests.support.app_servers import LiveServer
from tests.support.browser import chromium
from tests.support.programs import require_redis_server, require_redis_tools
from tests.support.redis_servers import NOT_DURABLE, RedisProcess
from tests.support.standin import StandinServer


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Tests see only the settings they pass, never the developer's shell."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The session's redis-server (``host``, ``port``, ``url``) on a free port, no persistence."""
    require_redis_server()
    server = RedisProcess(tmp_path_factory.mktemp("redis-session"), *NOT_DURABLE).start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.script_flush()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def app(redis_url):
    """The app on the real Redis."""
    return make_app(REDIS_URL=redis_url)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def fake_app():
    """The app on the embedded store (fakeredis): unit tests, no server."""
    return make_app()


@pytest.fixture
def live_server(app):
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def twilio(live_server):
    return TwilioSimulator(live_server.url, TOKEN)


@pytest.fixture
def redis_processes(tmp_path):
    """Starts RedisProcess instances for one test and kills whatever is left at its end."""
    require_redis_server()
    started: list[RedisProcess] = []

    def start(*args: str, **options) -> RedisProcess:
        process = RedisProcess(tmp_path / f"redis-{len(started)}", *args, **options)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def standin():
    """The Twilio stand-in (service/twilio_standin.py) on a free port, for sending tests."""
    with StandinServer() as server:
        yield server


@pytest.fixture(scope="module")
def shared_standin():
    """The stand-in for a module's tests, beside a module-scoped service that sends through it."""
    with StandinServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    require_redis_tools()
    with redis_servers.redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory):
    require_redis_tools()
    with redis_servers.redis_sentinel(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium per test module, with a fresh profile."""
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()
