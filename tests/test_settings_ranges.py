"""Every setting has a range: a value outside it stops start-up with one line naming the
variable (create_app, gunicorn's master, the CLI); values at the edges of the ranges serve."""

from __future__ import annotations

import ast
import re
import time

import pytest

from service import create_app
from service.keys import Keys
from service.settings import WORKER_TIMEOUT, ConfigError, load
from service.store import ConversationStore
from tests.support import ROOT
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, sms_sessions
from tests.support.numbers import OURS, REY

OUT_OF_RANGE = [  # (variable named first in the refusal, the environment that is refused)
    ("CONVERSATION_TTL", {"CONVERSATION_TTL": "1000000000000"}),  # cookie expiry in year 33715
    ("CONVERSATION_TTL", {"CONVERSATION_TTL": "10000000000000000"}),
    ("CONVERSATION_TTL", {"CONVERSATION_TTL": "0"}),
    ("LOCK_TTL", {"LOCK_TTL": "0.0001"}),  # PX 0: every message 503
    ("LOCK_TTL", {"LOCK_TTL": "1e300"}),
    ("LOCK_WAIT", {"LOCK_WAIT": "0.001"}),
    ("LOCK_WAIT", {"LOCK_WAIT": "nan"}),
    ("LOCK_WAIT", {"LOCK_WAIT": "9.5"}),  # past the worker timeout once Redis is slow
    ("LOCK_WAIT", {"LOCK_WAIT": "8", "REDIS_TIMEOUT": "1"}),
    ("REDIS_TIMEOUT", {"REDIS_TIMEOUT": "30"}),
    ("REDIS_TIMEOUT", {"REDIS_TIMEOUT": "0.0001"}),
    ("MAX_BODY_BYTES", {"MAX_BODY_BYTES": "100"}),  # every Twilio message would be a 413
    ("PORT", {"PORT": "99999"}),
    ("REDIS_URL", {"REDIS_URL": "redis://127.0.0.1:6379/abc"}),  # not db 0, silently
    ("REDIS_URL", {"REDIS_URL": "rediss://127.0.0.1/0/1"}),
    # Just outside each bound (the edges themselves: test_edges_of_the_ranges_are_accepted).
    ("REDELIVERY_WINDOW", {"REDELIVERY_WINDOW": "0"}),
    ("REDELIVERY_WINDOW", {"REDELIVERY_WINDOW": "3601"}),
    ("REPLIES_KEPT", {"REPLIES_KEPT": "0"}),
    ("REPLIES_KEPT", {"REPLIES_KEPT": "10001"}),
    ("SWEEP_INTERVAL", {"SWEEP_INTERVAL": "0.049"}),
    ("SWEEP_INTERVAL", {"SWEEP_INTERVAL": "3600.1"}),
    ("EVENTS_RETENTION", {"EVENTS_RETENTION": "0"}),
    ("EVENTS_RETENTION", {"EVENTS_RETENTION": "31622401"}),  # 366 days and a second
    ("EVENTS_MAX", {"EVENTS_MAX": "9"}),
    ("EVENTS_MAX", {"EVENTS_MAX": "100000001"}),
    ("CONSOLE_SESSION_TTL", {"CONSOLE_SESSION_TTL": "59"}),
    ("CONSOLE_SESSION_TTL", {"CONSOLE_SESSION_TTL": "604801"}),
    # Accepted once, then broken at the first request or a traceback:
    ("CONVERSATION_TTL", {"CONVERSATION_TTL": "٣٠"}),  # Arabic-Indic 30
    ("LOCK_TTL", {"LOCK_TTL": "３"}),  # a fullwidth 3
    ("PUBLIC_BASE_URL", {"PUBLIC_BASE_URL": "not a url"}),
    ("PUBLIC_BASE_URL", {"PUBLIC_BASE_URL": "sms.example.com"}),
    ("PUBLIC_BASE_URL", {"PUBLIC_BASE_URL": "https://sms.example.com/?x=1"}),
    ("BIND", {"BIND": "127.0.0.1:99999"}),
    ("BIND", {"BIND": "localhost"}),
    ("PROMETHEUS_MULTIPROC_DIR", {"PROMETHEUS_MULTIPROC_DIR": "/proc/sms-sessions-metrics"}),
    ("PROMETHEUS_MULTIPROC_DIR", {"PROMETHEUS_MULTIPROC_DIR": "/etc/hostname/metrics"}),
    ("WEB_CONCURRENCY", {"WEB_CONCURRENCY": "65"}),
    ("WEB_CONCURRENCY", {"WEB_CONCURRENCY": "0"}),
    ("OPS_TOKEN", {"OPS_TOKEN": "token-with-a-space "}),
    ("WORKER_CLASS", {"WORKER_CLASS": "eventlet"}),
    ("WORKER_CLASS", {"WORKER_CLASS": "Gevent"}),
    ("CLIENT_TIMEOUT", {"CLIENT_TIMEOUT": "0"}),
    ("CLIENT_TIMEOUT", {"CLIENT_TIMEOUT": "10"}),  # a stalled body would outlast a sync worker
    ("CLIENT_TIMEOUT", {"CLIENT_TIMEOUT": "2.5"}),  # gunicorn's keepalive takes whole seconds
]
CASES = pytest.mark.parametrize(
    "variable, environment",
    OUT_OF_RANGE,
    ids=["-".join(f"{k}={v}" for k, v in environment.items()) for _, environment in OUT_OF_RANGE],
)


def refusal(text: str) -> str:
    lines = [line for line in text.splitlines() if "refusing to start" in line]
    assert len(lines) == 1, text
    return lines[0]


@CASES
def test_create_app_refuses_in_one_line(monkeypatch, variable, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        create_app()
    assert re.match(rf"{variable}[ =:]", str(refused.value))
    assert "\n" not in str(refused.value)


ONE_PER_VARIABLE = list({variable: (variable, env) for variable, env in reversed(OUT_OF_RANGE)}.values())


@pytest.mark.parametrize("variable, environment", ONE_PER_VARIABLE, ids=[v for v, _ in ONE_PER_VARIABLE])
def test_the_cli_refuses_in_one_line(variable, environment):
    result = sms_sessions("conversations", "count", TWILIO_AUTH_TOKEN=TOKEN, **environment)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [refusal(result.stderr)]
    assert re.match(rf"sms-sessions: refusing to start: {variable}[ =:]", result.stderr)


@pytest.mark.parametrize(
    "variable, environment", [OUT_OF_RANGE[1], OUT_OF_RANGE[9]], ids=["CONVERSATION_TTL", "REDIS_TIMEOUT"]
)
def test_gunicorn_master_refuses_in_one_line_before_any_worker(variable, environment):
    """The other cases run under gunicorn in tests/test_production.py."""
    server = Gunicorn(environment, config=GUNICORN_CONF)
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()  # one that started after all is not left running
    output = server.output()
    assert re.match(rf"sms-sessions: refusing to start: {variable}[ =:]", refusal(output))
    assert "Traceback" not in output
    assert "Booting worker" not in output


def test_the_worker_timeout_is_gunicorns():
    """LOCK_WAIT's bound uses WORKER_TIMEOUT: it must be what config/gunicorn.conf.py sets."""
    tree = ast.parse((ROOT / GUNICORN_CONF).read_text())
    [timeout] = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["timeout"]
    ]
    assert ast.literal_eval(timeout) == WORKER_TIMEOUT


def test_edges_of_the_ranges_are_accepted():
    config = load(
        {
            "CONVERSATION_TTL": "2592000",
            "LOCK_TTL": "0.1",
            "LOCK_WAIT": "8.8",
            "REDIS_TIMEOUT": "0.55",
            "MAX_BODY_BYTES": "32768",
            "PORT": "65535",
        }
    )
    assert config["CONVERSATION_TTL"] == 2592000
    assert config["LOCK_WAIT"] == 8.8
    assert load({"LOCK_WAIT": "0.01", "REDIS_TIMEOUT": "0.01", "LOCK_TTL": "60"})["LOCK_TTL"] == 60
    for edges in (
        {
            "REDELIVERY_WINDOW": 1,
            "REPLIES_KEPT": 1,
            "SWEEP_INTERVAL": 0.05,
            "EVENTS_RETENTION": 1,
            "EVENTS_MAX": 10,
            "CONSOLE_SESSION_TTL": 60,
            "CLIENT_TIMEOUT": 1,
        },
        {
            "REDELIVERY_WINDOW": 3600,
            "REPLIES_KEPT": 10_000,
            "SWEEP_INTERVAL": 3600,
            "EVENTS_RETENTION": 366 * 24 * 3600,
            "EVENTS_MAX": 100_000_000,
            "CONSOLE_SESSION_TTL": 604_800,
            "CLIENT_TIMEOUT": 9,
        },
    ):
        config = load({name: str(value) for name, value in edges.items()})
        assert {name: config[name] for name in edges} == edges


def test_a_service_at_the_edges_serves_messages(redis_url, redis_client, monkeypatch):
    """The longest TTL and the shortest lock still count every message, with a TTL and an
    index entry that match (a TTL past the bound must not be a 500 after counting)."""
    monkeypatch.setenv("CONVERSATION_TTL", "2592000")
    monkeypatch.setenv("LOCK_TTL", "0.1")
    client = make_app(REDIS_URL=redis_url).test_client()
    for _ in (1, 2):
        response = post_signed(client, webhook_params())
        assert response.status_code == 200
        assert "Max-Age=2592000" in response.headers["Set-Cookie"]
    keys = Keys().conversation(REY, OURS)
    assert redis_client.hget(keys.conversation, "seq") == "2"
    assert (
        2592000 + ConversationStore.GRACE - 5
        <= redis_client.ttl(keys.conversation)
        <= 2592000 + ConversationStore.GRACE
    )
    expiry = redis_client.zscore(keys.index_shard, keys.member)
    assert abs(expiry - (time.time() + 2592000) * 1000) < 5000
