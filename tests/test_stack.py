"""The local stack: docker-compose.yml is valid, and its very files run natively end to end.

No Docker engine runs here, so the stack runs as docker-compose would start it, without
containers: ``redis-server config/redis.conf`` (free port, temporary data directory) and the
Dockerfile's command, ``sms-sessions serve`` (gunicorn with ``config/gunicorn.conf.py``), with the
environment of ``config/sms-sessions.env.example`` (``APP_ENV=production``, 2 workers).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter as Tally
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
import requests
from prometheus_client.multiprocess import MultiProcessCollector

from service.keys import Keys
from service.metrics import Outcome
from service.simulator import TwilioSimulator
from tests.support import ROOT
from tests.support.app import sign
from tests.support.app_servers import (
    Gunicorn,
    bin_path,
    gunicorn_settings,
    hermetic_environment,
)
from tests.support.numbers import OURS, REY, UNNAMED
from tests.support.ports import free_port
from tests.support.programs import require_binary, require_redis_server
from tests.support.prometheus import delta, scrape
from tests.support.redis_servers import REDIS_CONF, RedisProcess
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_until

ENV_EXAMPLE = ROOT / "config" / "sms-sessions.env.example"
FINN, POE, MORE = UNNAMED[1:]  # callers in no callers file: the counter calls them "Friend"
KEYS = Keys()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker-compose's env_file reads them (comments and blanks skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def dockerfile_cmd() -> list[str]:
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return json.loads(cmd.group(1))


# docker-compose.yml


def test_compose_file_is_valid_and_wires_the_stack():
    compose = require_binary("docker-compose", "docker-compose")
    quiet = subprocess.run([compose, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    rendered = subprocess.run(
        [compose, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "image: redis:7" in rendered
    assert f"{ROOT}/config/redis.conf:/usr/local/etc/redis/redis.conf:ro" in rendered
    assert "redis-data:/data" in rendered
    assert "- redis-cli\n      - ping" in rendered
    assert "condition: service_healthy" in rendered
    assert rendered.count("healthcheck:") == 1  # redis's; web has the image's (below)
    assert "tmpfs:\n    - /tmp" in rendered  # gunicorn's metrics directory: gone at each restart
    assert "127.0.0.1:5000:5000" in rendered
    for name, value in read_env_file(ENV_EXAMPLE).items():  # env_file was read
        assert re.search(rf"^      {name}: '?{re.escape(value)}'?$", rendered, re.MULTILINE), name


def test_compose_validation_catches_a_broken_file(tmp_path):
    """The check above can fail: the same file with a bad depends_on condition is refused."""
    compose = require_binary("docker-compose", "docker-compose")
    broken = (ROOT / "docker-compose.yml").read_text().replace("service_healthy", "service_happy")
    (tmp_path / "docker-compose.yml").write_text(broken)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sms-sessions.env.example").write_text(ENV_EXAMPLE.read_text())
    result = subprocess.run(
        [compose, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "service_happy" in result.stderr


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (comments and continuations joined), one list per stage."""
    text = re.sub(r"\\\n\s*", "", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if line.strip() and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_dockerfile_installs_the_lock_then_the_wheel_as_non_root():
    build, final = dockerfile_stages()
    assert build[0] == "FROM python:3.11-slim AS wheel"
    assert final[0] == "FROM python:3.11-slim"
    assert "RUN pip wheel --no-deps --wheel-dir /wheels ." in build
    # Dependencies from the production lock, in a layer before anything of the code's.
    lock = final.index("COPY requirements.txt ./")
    assert final[lock + 1] == "RUN pip install --require-hashes -r requirements.txt"
    code = [i for i, line in enumerate(final) if "service" in line or "wheel" in line]
    assert code
    assert min(code) > lock + 1
    # The code as its wheel only: no sources, build/ or *.egg-info copied into the image.
    assert [line for line in final if line.startswith("COPY")] == [
        "COPY requirements.txt ./",
        "COPY --from=wheel /wheels /tmp/wheels",
        "COPY config ./config",
    ]
    assert "RUN pip install --no-deps /tmp/wheels/*.whl && rm -r /tmp/wheels" in final
    # A user and a group of its own, same ids, not a system account (ids above SYS_UID_MAX).
    assert (
        "RUN groupadd --gid 10001 sms && useradd --uid 10001 --gid sms --no-create-home "
        "--home-dir /nonexistent --shell /usr/sbin/nologin sms"
    ) in final
    assert "USER sms:sms" in final
    # The native stack below runs exactly this command and this healthcheck.
    assert dockerfile_cmd() == ["sms-sessions", "serve"]
    assert dockerfile_healthcheck() == ["python", "config/healthcheck.py"]


def dockerfile_healthcheck() -> list[str]:
    check = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return json.loads(check.group(1))


def test_gunicorn_config_reads_the_environment():
    load = lambda **env: gunicorn_settings(env)  # noqa: E731

    default = load()
    assert int(default["workers"]) == 2 * os.cpu_count() + 1
    assert default["bind"] == "['0.0.0.0:5000']"
    assert int(default["timeout"]) < 15  # Twilio's limit
    assert default["accesslog"] == "-"
    assert default["logger_class"] == "service.logs.GunicornLogger"
    assert default["worker_class"] == "gevent"
    assert int(default["worker_connections"]) >= 1000  # stalled and idle clients of one worker, and more
    assert default["keepalive"] == "5"  # CLIENT_TIMEOUT: headers, bodies and idle connections
    threaded = load(WORKER_CLASS="gthread")
    assert threaded["worker_class"] == "gthread"
    assert int(threaded["threads"]) > 2 * int(threaded["workers"])  # every stalled client on one worker
    assert load(WORKER_CLASS="sync", CLIENT_TIMEOUT="2")["keepalive"] == "2"
    assert load(WEB_CONCURRENCY="3", PORT="8080")["workers"] == "3"
    assert load(PORT="8080")["bind"] == "['0.0.0.0:8080']"
    assert load(BIND="127.0.0.1:9000")["bind"] == "['127.0.0.1:9000']"


# The same files, natively


class ImageCommand(Gunicorn):
    """The Dockerfile's CMD as the container runs it, in the project directory (the image's
    WORKDIR): workers from WEB_CONCURRENCY, the address from BIND (loopback, a free port)."""

    def __init__(self, env: dict[str, str]):  # Gunicorn's own would start plain gunicorn
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/sms"
        self.env = {**hermetic_environment(), **env, "BIND": f"127.0.0.1:{self.port}"}
        self.launch([bin_path(dockerfile_cmd()[0]), *dockerfile_cmd()[1:]], prefix="image-")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stack")
    (directory / "metrics").mkdir()
    require_redis_server()
    redis_server = RedisProcess(directory / "redis", config=REDIS_CONF).start()
    try:
        env = read_env_file(ENV_EXAMPLE)
        env.update(REDIS_URL=redis_server.url, PROMETHEUS_MULTIPROC_DIR=str(directory / "metrics"))
        with ImageCommand(env) as server:
            yield server, redis_server, redis.Redis.from_url(redis_server.url, decode_responses=True)
    finally:
        redis_server.kill()


@pytest.fixture
def twilio(stack):
    server, _, _ = stack
    return TwilioSimulator(server.url, server.env["TWILIO_AUTH_TOKEN"])


@pytest.mark.slow
def test_native_stack_holds_a_conversation(stack, twilio):
    server, redis_server, client = stack
    assert server.env["APP_ENV"] == "production"
    assert server.env["WEB_CONCURRENCY"] == "2"
    assert requests.get(server.base + "/healthz", timeout=5).status_code == 200
    assert requests.get(server.base + "/readyz", timeout=5).json() == {"status": "ready"}
    replies = [twilio.send(REY, OURS, f"message {n}").reply for n in (1, 2, 3)]
    assert replies == [
        thanks("Rey"),
        count_reply("Rey", 2),
        count_reply("Rey", 3),
    ]
    assert client.hget(KEYS.conversation(REY, OURS).conversation, "seq") == "3"
    # Redis runs on config/redis.conf: durable and never evicting.
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("protected-mode") == {"protected-mode": "no"}  # the web container's way in
    assert (redis_server.directory / "appendonlydir").is_dir()


def per_worker_messages(metrics_dir: Path) -> dict[str, float]:
    """Webhook requests counted by each worker's own file (pid → total)."""
    totals = {}
    for path in metrics_dir.glob("counter_*.db"):
        samples = [
            s
            for metric in MultiProcessCollector.merge([str(path)], accumulate=True)
            for s in metric.samples
            if s.name == "sms_messages_received_total"
        ]
        totals[path.stem.split("_")[-1]] = sum(s.value for s in samples)
    return totals


def evalsha_calls(client) -> int:
    return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


@pytest.mark.slow
def test_metrics_add_up_across_two_workers(stack, twilio):
    """Messages counted by both workers (one of them kept waiting for a held lock meanwhile):
    the totals are right only if a scrape, answered by either worker, adds up both."""
    server, _, client = stack
    metrics_dir = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    before = scrape(requests.get(server.base + "/metrics", timeout=5).text)
    per_worker_before = per_worker_messages(metrics_dir)

    held = KEYS.conversation(POE, OURS)
    client.set(held.lock, "another-request", px=10_000)
    calls = evalsha_calls(client)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(twilio.send(POE, OURS, "held")))
    waiter.start()
    deadline = time.monotonic() + 10
    while evalsha_calls(client) < calls + 2:  # its worker is polling for the lock
        assert time.monotonic() < deadline, "the held message never reached a worker"
        time.sleep(0.01)
    polling_since = time.monotonic()

    first = twilio.send(FINN, OURS, "one")
    second = twilio.send(FINN, OURS, "two")
    duplicate = twilio.send(FINN, OURS, "two", message_sid=second.message_sid)
    forged = TwilioSimulator(server.url, "not-the-token").send(FINN, OURS, "forged")
    params = {"To": OURS, "Body": "no sender", "MessageSid": "SM" + secrets.token_hex(16)}
    missing_from = requests.post(
        server.url,
        data=params,
        timeout=10,
        headers={"X-Twilio-Signature": sign(server.url, params, server.env["TWILIO_AUTH_TOKEN"])},
    )
    time.sleep(max(0.0, 0.3 - (time.monotonic() - polling_since)))  # held ≥ 0.3 s
    client.delete(held.lock)
    waiter.join(timeout=15)
    # Each worker accepts what it is fastest to take: more messages, each on a connection of its
    # own (a kept-alive one stays with its worker), until both have counted.
    extra = 0
    while len([v for v in delta(per_worker_messages(metrics_dir), per_worker_before).values() if v]) < 2:
        assert extra < 100, "every message went to one worker"
        assert TwilioSimulator(server.url, server.env["TWILIO_AUTH_TOKEN"]).send(MORE, OURS).status == 200
        extra += 1

    assert [first.status, second.status, duplicate.status] == [200, 200, 200]
    assert duplicate.reply == second.reply == count_reply("Friend", 2)
    assert [forged.status, missing_from.status_code] == [403, 400]
    assert waited[0].reply == thanks("Friend")

    scrapes = [scrape(requests.get(server.base + "/metrics", timeout=5).text) for _ in range(6)]
    assert all(s == scrapes[0] for s in scrapes)  # whichever worker answers
    change = delta(scrapes[0], before)
    assert {outcome: change[f"sms_messages_received_total{{outcome={outcome}}}"] for outcome in Outcome} == {
        Outcome.REPLIED: 3 + extra,
        Outcome.DUPLICATE: 1,
        Outcome.REJECTED_SIGNATURE: 1,
        Outcome.BAD_REQUEST: 1,
        Outcome.UNAVAILABLE: 0,
        Outcome.ERROR: 0,
    }
    assert change["sms_conversations_started_total"] == 2 + (extra > 0)
    assert change["sms_active_conversations"] == 2 + (extra > 0)
    assert change["sms_webhook_latency_seconds_count"] == 6 + extra
    assert change["sms_lock_wait_seconds_count"] == 3 + extra  # the duplicate takes no lock
    assert change["sms_lock_wait_seconds_sum"] >= 0.3  # the held one waited at least that long
    assert sum(v for k, v in change.items() if k.startswith("sms_redis_errors_total")) == 0

    per_worker = delta(per_worker_messages(metrics_dir), per_worker_before)
    assert len([v for v in per_worker.values() if v]) == 2
    assert sum(per_worker.values()) == 6 + extra


@pytest.mark.slow
def test_stack_output_is_json_lines_without_numbers_bodies_or_token(stack, twilio):
    server, _, _ = stack
    token = server.env["TWILIO_AUTH_TOKEN"]
    body = "secret-body-" + secrets.token_hex(4)
    posted = twilio.send(REY, OURS, body)
    params = {"From": FINN, "To": OURS, "Body": body, "MessageSid": "SM" + secrets.token_hex(16)}
    url = server.url + "?" + urlencode(params)  # a GET webhook: everything in the query
    got = requests.get(url, headers={"X-Twilio-Signature": sign(url, {}, token)}, timeout=10)
    forged = TwilioSimulator(server.url, "not-the-token").send(POE, OURS, body)
    assert [posted.status, got.status_code, forged.status] == [200, 200, 403]
    requests.get(f"{server.base}/ops/conversations/{REY}/{OURS}", timeout=10)  # numbers in a path

    # gunicorn writes a request's access line after its answer: wait for the last one.
    output = wait_until(
        lambda: "/ops/conversations/" in server.output() and server.output(),
        seconds=10,
        what="the ops request's access line",
    )
    for secret in (REY, FINN, POE, OURS, body, token, REY[1:], OURS[1:]):
        assert secret not in output
    lines = [json.loads(line) for line in output.splitlines()]  # every line, gunicorn's too
    webhook = {line["message_sid"]: line for line in lines if line["logger"] == "service.webhook"}
    assert (
        Tally(line["message_sid"] for line in lines if line["logger"] == "service.webhook")[
            posted.message_sid
        ]
        == 1
    )
    assert {key: webhook[posted.message_sid][key] for key in ("from", "to", "outcome", "status")} == {
        "from": "+1555***0001",
        "to": "+1555***1111",
        "outcome": "replied",
        "status": 200,
    }
    assert webhook[params["MessageSid"]]["from"] == "+1555***0077"
    assert webhook[forged.message_sid]["outcome"] == "rejected_signature"
    assert all(isinstance(line["latency_ms"], float) for line in webhook.values())
    assert {
        (webhook[sid]["method"], webhook[sid]["status"])
        for sid in (posted.message_sid, params["MessageSid"], forged.message_sid)
    } == {("POST", 200), ("GET", 200), ("POST", 403)}
    assert all(line["remote"] == "127.0.0.1" for line in webhook.values())
    assert {line["logger"] for line in lines} >= {"gunicorn.error", "gunicorn.access", "service.webhook"}
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert {(line["method"], line["path"], line["status"]) for line in access} >= {
        ("GET", "/ops/conversations/+1555***0001/+1555***1111", 404)
    }  # the path, never the query
    assert not [line for line in access if line["path"] == "/sms"]  # the webhook's own line is its one
    assert all(isinstance(line["duration_ms"], float) for line in access)


@pytest.mark.slow
def test_health_probes_are_not_access_logged(stack):
    server, _, _ = stack
    for path in ("/healthz", "/readyz", "/metrics"):  # in this order
        assert requests.get(server.base + path, timeout=10).status_code == 200
    wait_until(lambda: "/metrics" in logged_paths(server), what="the /metrics access line")
    assert not {"/healthz", "/readyz"} & set(logged_paths(server))


def logged_paths(server) -> list[str]:
    return [json.loads(line).get("path") for line in server.output().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, ready",
    [
        ({"PORT": "{port}"}, True),
        ({"PORT": "{other}"}, False),
        ({"BIND": "127.0.0.1:{port}"}, True),
        ({"BIND": "0.0.0.0:{port}", "PORT": "{other}"}, True),
    ],
)
def test_the_image_healthcheck_follows_port_and_bind(stack, env, ready):
    """The Dockerfile's HEALTHCHECK command, run as the container runs it."""
    server, _, _ = stack
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        other = unused.getsockname()[1]
    values = {name: value.format(port=server.port, other=other) for name, value in env.items()}
    command = dockerfile_healthcheck()
    check = subprocess.run(
        [bin_path(command[0]), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**hermetic_environment(), **values},
        timeout=30,
    )
    assert (check.returncode == 0) is ready, check.stderr
    if not ready:
        assert check.stderr.startswith("not ready: ")
