"""``/healthz`` (the process lives, no Redis) and ``/readyz`` (a message could be saved), Redis
up, down, refusing writes, and turning the service's credentials down."""

from __future__ import annotations

import re
from collections import Counter as Tally

import pytest

from service import create_app
from service.settings import ConfigError
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, sms_sessions
from tests.support.redis_servers import REDIS_CONF, commands_during
from tests.support.waiting import wait_until


def test_readiness_follows_redis_and_liveness_does_not(redis_processes):
    redis_server = redis_processes(config=REDIS_CONF)
    client = make_app(REDIS_URL=redis_server.url).test_client()
    assert client.get("/readyz").json == {"status": "ready"}
    assert client.get("/healthz").status_code == 200

    redis_server.shutdown()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json == {"status": "unavailable", "redis": "ConnectionError"}
    assert client.get("/healthz").json == {"status": "ok"}
    assert post_signed(client, webhook_params()).status_code == 503

    redis_server.start()  # same port: the service recovers by itself
    assert client.get("/readyz").status_code == 200
    assert post_signed(client, webhook_params()).status_code == 200


def test_health_readiness_and_metrics_never_bind_a_conversation(app, redis_client):
    client = app.test_client()
    cookie = post_signed(client, webhook_params()).headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    keys_before = sorted(redis_client.keys("*"))
    for path, expected in (
        ("/healthz", Tally()),
        ("/readyz", Tally(set=1, **{"del": 1})),
        # per tag: the live count (ZCOUNT), the minute tallies (HGETALL), who waits for a person
        # (ZRANGE), and the outbox's backlog (ZCOUNT and ZRANGE of the due index)
        ("/metrics", Tally(zcount=200, hgetall=100, zrange=200)),
    ):
        responses = []
        used = commands_during(
            redis_client,
            lambda: responses.append(client.get(path, headers={"Cookie": f"sms_session={cookie}"})),
        )
        assert responses[0].status_code == 200, path
        assert "Set-Cookie" not in responses[0].headers, path
        assert used == expected, path
    assert sorted(redis_client.keys("*")) == keys_before  # no lock, nothing left


def test_readiness_says_no_while_redis_refuses_writes(redis_processes):
    """OOM under noeviction, a read-only replica: PING answers, a save would not. (Redis
    refuses PING itself under MISCONF, also checked.)"""
    redis_server = redis_processes(
        "--save", "3600 1", "--appendonly", "no", "--maxmemory-policy", "noeviction"
    )
    admin = redis_server.client()
    client = make_app(REDIS_URL=redis_server.url).test_client()
    assert client.get("/readyz").json == {"status": "ready"}

    refusals = {
        "OutOfMemoryError": (
            lambda: admin.config_set("maxmemory", 1),
            lambda: admin.config_set("maxmemory", 0),
        ),
        "ReadOnlyError": (lambda: admin.replicaof("127.0.0.1", 1), lambda: admin.replicaof("NO", "ONE")),
        "ResponseError MISCONF": (
            lambda: fail_a_snapshot(redis_server),
            lambda: admin.config_set("stop-writes-on-bgsave-error", "no"),
        ),
    }
    for name, (refuse, restore) in refusals.items():
        refuse()
        if name != "ResponseError MISCONF":
            assert admin.ping()  # PING alone would have said "ready"
        down = client.get("/readyz")
        assert (down.status_code, down.json) == (503, {"status": "unavailable", "redis": name})
        assert post_signed(client, webhook_params()).status_code == 503  # indeed nothing saved
        restore()
        assert client.get("/readyz").status_code == 200, name
        assert post_signed(client, webhook_params()).status_code == 200
    assert admin.keys("sms:ready*") == []


def fail_a_snapshot(redis_server) -> None:
    """A BGSAVE that fails (its directory is gone): Redis then refuses writes with MISCONF."""
    for path in redis_server.directory.iterdir():
        path.unlink()
    redis_server.directory.rmdir()
    redis_server.client().bgsave()
    wait_until(
        lambda: redis_server.client().info("persistence")["rdb_last_bgsave_status"] == "err",
        what="a failed BGSAVE",
    )


SECRET = "s3cr3t-passw0rd"


@pytest.fixture
def protected_redis(redis_processes):
    """A Redis with a password (set once it answered, so that starting it needs none)."""
    redis_server = redis_processes("--save", "", "--appendonly", "no")
    redis_server.client().config_set("requirepass", SECRET)
    return redis_server


def urls(redis_server) -> dict[str, str]:
    port = redis_server.port
    return {
        "wrong password": f"redis://:wrong@127.0.0.1:{port}/0",
        "no password": f"redis://127.0.0.1:{port}/0",
        "unknown user": f"redis://nobody:{SECRET}@127.0.0.1:{port}/0",
    }


PRODUCTION = {"APP_ENV": "production", "TWILIO_AUTH_TOKEN": TOKEN}


def test_refused_credentials_stop_production_in_one_line(protected_redis, monkeypatch):
    for case, url in urls(protected_redis).items():
        for name, value in {**PRODUCTION, "REDIS_URL": url}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as refused:
            create_app()
        message = str(refused.value)
        assert message.startswith("REDIS_URL: Redis refused the credentials"), case
        assert "\n" not in message
        assert SECRET not in message
        assert "wrong" not in message
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{protected_redis.port}/0")
    client = create_app().test_client()  # the right password starts and is ready
    assert client.get("/readyz").status_code == 200


def test_refused_credentials_warn_in_development_and_are_not_ready(protected_redis, caplog):
    app = make_app(REDIS_URL=urls(protected_redis)["wrong password"])
    warnings = [r.getMessage() for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(warnings) == 1
    down = app.test_client().get("/readyz")
    assert (down.status_code, down.json["redis"]) == (503, "AuthenticationError")


def test_gunicorn_and_the_cli_refuse_refused_credentials_in_one_line(protected_redis):
    env = {**PRODUCTION, "REDIS_URL": urls(protected_redis)["wrong password"]}
    server = Gunicorn(env, config=GUNICORN_CONF)
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()  # one that started after all is not left running
    output = server.output()
    lines = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(lines) == 1 and re.match(
        r"sms-sessions: refusing to start: REDIS_URL: Redis "
        r"refused the credentials",
        lines[0],
    )
    assert "Traceback" not in output
    assert "Booting worker" not in output
    assert "wrong" not in lines[0]
    cli = sms_sessions("conversations", "count", **env)
    assert cli.returncode == 1
    assert cli.stderr.splitlines() == lines


def test_readiness_says_no_while_fewer_replicas_than_redis_wait_replicas_confirm(redis_processes):
    """With REDIS_WAIT_REPLICAS above the replicas present every message would be a 503:
    /readyz says not ready until a replica confirms, then ready."""
    master = redis_processes()
    client = make_app(REDIS_URL=master.url, REDIS_WAIT_REPLICAS=1).test_client()
    refused = client.get("/readyz")
    assert refused.status_code == 503 and refused.json == {
        "status": "unavailable",
        "replicas": "0 of 1 confirmed",
    }
    replica = redis_processes("--replicaof", "127.0.0.1", str(master.port))
    wait_until(lambda: client.get("/readyz").status_code == 200, what="the replica confirming")
    assert replica.client().info("replication")["role"] == "slave"
