"""Fixtures: one real redis-server per test session (flushed per test), apps, clients, servers.

Without ``redis-server`` the integration tests skip with a printed reason, unless
``REQUIRE_REDIS=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis
from pytest_redis import factories
from twilio.request_validator import RequestValidator
from werkzeug.serving import make_server

from service import create_app
from service.settings import SETTINGS
from service.simulator import TwilioSimulator

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-auth-token"
REDIS_SERVER = shutil.which("redis-server")

redis_server_proc = factories.redis_proc(executable=REDIS_SERVER or "redis-server", port=None)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Tests see only the settings they pass, never the developer's shell."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)


def require_binary(name: str, package: str) -> str:
    """The path of a program the test needs; missing, it skips with the reason, or fails
    under ``REQUIRE_REDIS=1`` (CI installs every such package)."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(reason + " and REQUIRE_REDIS=1")
    pytest.skip(reason + ": test skipped")


def require_redis_server() -> str:
    return require_binary("redis-server", "redis-server")


@pytest.fixture(scope="session")
def redis_server(request):
    """The session's redis-server (host, port), started by pytest-redis on a free port."""
    require_redis_server()
    return request.getfixturevalue("redis_server_proc")


@pytest.fixture
def redis_url(redis_server):
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    client = redis.Redis.from_url(url)
    client.flushall()
    client.script_flush()
    client.close()
    return url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def commands_during(redis_client, action) -> Tally:
    """Redis commands the server executed while ``action`` ran (INFO itself left out)."""
    def calls():
        stats = redis_client.info("commandstats")
        return Tally({name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()
                      if name != "cmdstat_info"})

    before = calls()
    action()
    return calls() - before


def make_app(**overrides):
    config = {"TWILIO_AUTH_TOKEN": TOKEN}
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def app(redis_url):
    """The app on the real Redis."""
    return make_app(REDIS_URL=redis_url)


@pytest.fixture
def fake_app():
    """The app on the embedded store (fakeredis): unit tests, no server."""
    return make_app()


def sign(url: str, params: dict, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def webhook_params(sender="+15551230001", recipient="+15550001111", body="hi", message_sid=None, **extra):
    params = {"From": sender, "To": recipient, "Body": body,
              "MessageSid": message_sid or "SM" + os.urandom(16).hex(), "NumMedia": "0"}
    params.update(extra)
    return params


def post_signed(client, params, url="http://localhost/sms", cookie=None, **kwargs):
    """A signed webhook through Flask's test client (which calls http://localhost)."""
    headers = {"X-Twilio-Signature": sign(url, params)}
    if cookie:
        headers["Cookie"] = f"sms_session={cookie}"
    path = url.split("localhost", 1)[1]
    return client.post(path, data=params, headers=headers, **kwargs)


class LiveServer:
    """The app on a threaded werkzeug server: real sockets, real concurrency."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/sms"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join()


@pytest.fixture
def live_server(app):
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def twilio(live_server):
    return TwilioSimulator(live_server.url, TOKEN)


def scrape(text: str) -> dict[str, float]:
    """Prometheus text → {'name{label=value,...}': value} for every sample."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    import requests

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


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


GUNICORN_CONF = "config/gunicorn.conf.py"
GUNICORN_APP = "service:create_app()"


class Gunicorn:
    """The app under gunicorn in a subprocess, the way it runs in production.

    With ``config`` the command is the Dockerfile's (``gunicorn -c CONFIG APP``) and workers
    and address come from the environment (``WEB_CONCURRENCY``, ``BIND``) as in the container;
    without, from flags. The environment is the test's, never the developer's settings.
    Output (stdout and stderr) goes to a file: ``output()`` reads it at any time.
    """

    def __init__(self, env: dict[str, str], workers: int = 2, config: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/sms"
        self.base = f"http://127.0.0.1:{self.port}"
        address = f"127.0.0.1:{self.port}"
        self.env = {**self.hermetic_environment(), "TWILIO_AUTH_TOKEN": TOKEN, **env}
        args = [bin_path("gunicorn")]
        if config:
            args += ["-c", config]
            self.env.setdefault("WEB_CONCURRENCY", str(workers))
            self.env["BIND"] = address
        else:
            args += ["-w", str(workers), "-b", address]
        args += [*extra_args, GUNICORN_APP]
        self.args = args
        self.log = tempfile.NamedTemporaryFile("w+", prefix="gunicorn-", suffix=".log")
        self.process = subprocess.Popen(args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def hermetic_environment() -> dict[str, str]:
        """This process's environment without any of the service's settings."""
        return {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_exit(self, seconds: float = 30) -> int:
        """For a server expected to refuse to start: its exit code."""
        return self.process.wait(timeout=seconds)

    def __enter__(self):
        wait_for_http(self.base + "/healthz", self.process)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Topologies beyond one Redis, and Redis processes the tests stop and restart themselves.
# Each is started on free loopback ports in a temporary directory and torn down by its fixture.

from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

REDIS_CLI = shutil.which("redis-cli")


def require_redis_tools() -> None:
    require_redis_server()
    if not REDIS_CLI:
        reason = "redis-cli is not installed (apt-get install redis-tools)"
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(reason + " and REQUIRE_REDIS=1")
        pytest.skip(reason + ": topology test skipped")


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


REDIS_CONF = str(ROOT / "config" / "redis.conf")


class RedisProcess:
    """One redis-server (or Sentinel) the test owns: start, clean SHUTDOWN, kill -9, restart.

    ``config=REDIS_CONF`` runs the deployed ``config/redis.conf`` (durable AOF, noeviction)
    with only port, address and data directory given on the command line.
    """

    def __init__(self, directory: Path, *args: str, port: int | None = None, config: str | None = None):
        self.port = port or free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.argv = [REDIS_SERVER, *([config] if config else []), "--port", str(self.port),
                     "--bind", "127.0.0.1", "--dir", str(directory), *args]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """No retries: redis-py's default backoff would turn each failed ping into seconds."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0))

    def start(self) -> "RedisProcess":
        log = open(self.directory / "server.log", "a")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.client().ping(), what=f"redis on port {self.port}")
        return self

    def shutdown(self) -> None:
        """A clean stop: Redis fsyncs its AOF (and saves, if configured) before exiting."""
        try:
            self.client().shutdown()
        except redis.ConnectionError:
            pass
        self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    import random

    for _ in range(200):
        port = random.randint(20000, 40000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class Topology:
    """Redis processes started together: a Cluster or a Sentinel setup, and its REDIS_URL."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.nodes: list[RedisProcess] = []
        self.url = ""

    def start(self, *args: str, port: int | None = None) -> RedisProcess:
        node = RedisProcess(self.directory / f"node-{len(self.nodes)}", *args, port=port)
        self.nodes.append(node)
        return node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three masters, no replicas, all 16384 slots covered; REDIS_URL ``redis+cluster://``."""
    require_redis_tools()
    cluster = Topology(tmp_path_factory.mktemp("cluster"))
    try:
        for _ in range(3):
            cluster.start("--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                          "--save", "", "--appendonly", "no", port=free_cluster_port())
        addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        subprocess.run([REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        for node in cluster.nodes:
            wait_until(lambda: node.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                       what="cluster_state:ok")
        cluster.url = "redis+cluster://" + ",".join(addresses)
        yield cluster
    finally:
        cluster.stop()


def replicated_write(client: redis.Redis) -> bool:
    """True once the master accepts a write and its replica confirms it (WAIT)."""
    client.set("probe", "1")
    confirmed = client.wait(1, 100) == 1
    client.delete("probe")
    return confirmed


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory):
    """Master + replica + one Sentinel (quorum 1); REDIS_URL ``redis+sentinel://…/sms``.

    The data nodes are configured as the README recommends: ``min-replicas-to-write 1`` (a
    master whose replica was promoted refuses writes instead of accepting ones the failover
    discards), ``repl-diskless-sync-delay 0`` (a rejoining replica syncs at once), and Sentinel
    runs ``config/sentinel-reconfig.sh``.
    """
    require_redis_tools()  # redis-server, and redis-cli for sentinel-reconfig.sh
    setup = Topology(tmp_path_factory.mktemp("sentinel"))
    fenced = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
              "--repl-diskless-sync-delay", "0", "--save", "", "--appendonly", "no")
    try:
        master = setup.start(*fenced)
        setup.start(*fenced, "--replicaof", "127.0.0.1", str(master.port))  # the replica
        wait_until(lambda: replicated_write(master.client()), what="a write confirmed by the replica")
        config = setup.directory / "sentinel.conf"
        config.write_text(f"sentinel monitor sms 127.0.0.1 {master.port} 1\n"
                          "sentinel down-after-milliseconds sms 1000\n"
                          "sentinel failover-timeout sms 10000\n"
                          f"sentinel client-reconfig-script sms {ROOT / 'config' / 'sentinel-reconfig.sh'}\n")
        sentinel = RedisProcess(setup.directory / "sentinel", "--sentinel", config=str(config))
        setup.nodes.append(sentinel)
        sentinel.start()
        wait_until(lambda: [r for r in sentinel.client().sentinel_slaves("sms")
                            if r["flags"] == "slave" and r["master-link-status"] == "ok"],
                   what="Sentinel sees a good replica")
        setup.sentinel = sentinel
        setup.url = f"redis+sentinel://127.0.0.1:{sentinel.port}/sms"
        yield setup
    finally:
        setup.stop()
