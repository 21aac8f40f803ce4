"""``APP_ENV=production`` refuses unsafe settings with one line naming the variable (as any
environment refuses malformed ones)."""

from __future__ import annotations

import re
import subprocess

import pytest

from service import create_app
from service.settings import ConfigError
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, bin_path, hermetic_environment
from tests.support.ports import free_port

SAFE = {
    "APP_ENV": "production",
    "TWILIO_AUTH_TOKEN": "a-real-token",
    "TWILIO_VALIDATE_SIGNATURE": "1",
    "REDIS_URL": "redis://127.0.0.1:1/0",
}
REFUSED = [  # (variable named in the refusal, how it is set)
    ("TWILIO_AUTH_TOKEN", {"TWILIO_AUTH_TOKEN": ""}),
    ("TWILIO_VALIDATE_SIGNATURE", {"TWILIO_VALIDATE_SIGNATURE": "0"}),
    ("REDIS_URL", {"REDIS_URL": ""}),
    # Refused in any environment, and as briefly:
    ("LOCK_WAIT", {"LOCK_WAIT": "soon"}),
    ("CALLERS_FILE", {"CALLERS_FILE": "/nonexistent/callers.json"}),
    ("REDIS_URL", {"REDIS_URL": "redis+sentinel://127.0.0.1:26379"}),  # no service name
    # Out of range (tests/test_settings_ranges.py has the rest of them):
    ("CONVERSATION_TTL", {"CONVERSATION_TTL": "1000000000000"}),
    ("LOCK_TTL", {"LOCK_TTL": "0.0001"}),
    ("LOCK_WAIT", {"LOCK_WAIT": "9.5"}),
    ("REDIS_URL", {"REDIS_URL": "redis://127.0.0.1:6379/abc"}),
    ("LOG_FORMAT", {"LOG_FORMAT": "yaml"}),
    ("WORKER_CLASS", {"WORKER_CLASS": "eventlet"}),  # refused before gevent would patch anything
    # The operators' token: guessable when short, and one with spaces around it a trap:
    ("OPS_TOKEN", {"OPS_TOKEN": "a"}),
    ("OPS_TOKEN", {"OPS_TOKEN": "x" * 31}),
    ("OPS_TOKEN", {"OPS_TOKEN": " " + "x" * 40 + " "}),
    # Once a traceback, or an exit 0 with nothing said:
    ("SMS_HANDLER", {"SMS_HANDLER": "tests.support.bad_handlers.exits:handle"}),
    ("SMS_HANDLER", {"SMS_HANDLER": "tests.support.bad_handlers.end_hook_text:handle"}),
    ("PROMETHEUS_MULTIPROC_DIR", {"PROMETHEUS_MULTIPROC_DIR": "/proc/sms-sessions-metrics"}),
    ("PUBLIC_BASE_URL", {"PUBLIC_BASE_URL": "not a url"}),
]
CASES = pytest.mark.parametrize(
    "variable, setting",
    REFUSED,
    ids=[f"{variable}={next(iter(setting.values()))}" for variable, setting in REFUSED],
)


@CASES
def test_create_app_refuses(monkeypatch, variable, setting):
    for name, value in {**SAFE, **setting}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        create_app()
    assert re.match(rf"{variable}[ =:]", str(refused.value))
    assert "\n" not in str(refused.value)


def test_production_starts_with_safe_settings_and_development_with_anything(monkeypatch):
    for name, value in SAFE.items():
        monkeypatch.setenv(name, value)
    assert create_app().config["APP_ENV"] == "production"
    for name in ("TWILIO_AUTH_TOKEN", "REDIS_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("APP_ENV", "development")
    monkeypatch.setenv("TWILIO_VALIDATE_SIGNATURE", "0")
    app = create_app()  # what `make run` allows: embedded store, no checks
    assert app.test_client().get("/healthz").status_code == 200


@CASES
@pytest.mark.slow
def test_gunicorn_refuses_in_one_line_before_any_worker(variable, setting):
    server = Gunicorn({**SAFE, **setting}, config=GUNICORN_CONF)
    assert server.wait_exit() != 0
    output = server.output()
    refusals = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1
    assert re.match(rf"sms-sessions: refusing to start: {variable}[ =:]", refusals[0])
    assert "Traceback" not in output
    assert "Booting worker" not in output


def test_cli_refuses_in_one_line():
    env = {**hermetic_environment(), **SAFE, "TWILIO_AUTH_TOKEN": ""}
    result = subprocess.run(
        [bin_path("sms-sessions"), "run", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "sms-sessions: refusing to start: TWILIO_AUTH_TOKEN is not set (nor TWILIO_ACCOUNTS): "
        "APP_ENV=production needs it to verify Twilio's signatures"
    ]


def test_a_refused_ops_token_is_never_echoed(monkeypatch):
    for name, value in {**SAFE, "OPS_TOKEN": " secret-" + "x" * 40}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        create_app()
    assert str(refused.value).startswith("OPS_TOKEN: has spaces around it")
    assert "secret" not in str(refused.value)
    monkeypatch.setenv("OPS_TOKEN", "s3cret")
    with pytest.raises(ConfigError) as refused:
        create_app()
    assert "s3cret" not in str(refused.value)
    assert "at least 32" in str(refused.value)
    monkeypatch.setenv("OPS_TOKEN", "x" * 32)
    assert create_app().config["OPS_TOKEN"] == "x" * 32
