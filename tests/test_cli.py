"""The ``sms-sessions`` console script as an operator and a developer meet it: its own version
and commands, operator commands that print only their output, one-line Redis errors, readable
tables, a hint for a number written without its +, a simulator that skips empty lines, and
``make run`` on a busy port."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from service.keys import Keys
from service.wiring import current
from tests.support import ROOT
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import LiveServer, bin_path, hermetic_environment, sms_sessions
from tests.support.conversations import plant
from tests.support.numbers import OURS, REY
from tests.support.ports import free_port
from tests.support.programs import require_binary
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_for_http


@pytest.mark.slow
def test_version_is_the_tools_own():
    result = sms_sessions("--version")
    assert (result.returncode, result.stdout) == (0, "sms-sessions 0.1.0\n")


@pytest.mark.slow
def test_help_lists_only_its_commands():
    result = sms_sessions("--help")
    assert result.returncode == 0
    assert result.stderr == ""
    commands = [line.split()[0] for line in result.stdout.split("Commands:\n", 1)[1].splitlines()]
    assert commands == [
        "conversations",
        "events",
        "forget",
        "handoff",
        "outbox",
        "run",
        "send",
        "sender",
        "serve",
        "simulate",
        "sweep",
        "timers",
        "transcript",
    ]
    assert "--app" not in result.stdout
    assert "--env-file" not in result.stdout
    for foreign in (["routes"], ["shell"], ["-A", "x", "run"], ["--env-file", "x", "run"]):
        assert sms_sessions(*foreign).returncode == 2, foreign


@pytest.mark.slow
def test_operator_commands_print_only_their_output(redis_url):
    """No start-up warning meant for the webhook (TWILIO_AUTH_TOKEN unset), no info line."""
    post_signed(make_app(REDIS_URL=redis_url).test_client(), webhook_params(REY, OURS))
    assert sms_sessions("conversations", "--help").stderr == ""
    counted = sms_sessions("conversations", "count", REDIS_URL=redis_url)
    assert (counted.returncode, counted.stdout, counted.stderr) == (0, "1\n", "")
    ended = sms_sessions("conversations", "expire", REY, OURS, "--json", REDIS_URL=redis_url)
    assert ended.returncode == 0
    assert ended.stderr == ""
    assert json.loads(ended.stdout) == {"ended": True, "from": REY, "to": OURS}
    events = sms_sessions("events", "--json", REDIS_URL=redis_url)
    assert events.returncode == 0
    assert events.stderr == ""
    assert [json.loads(line)["type"] for line in events.stdout.splitlines()] == ["started", "ended"]


@pytest.mark.slow
@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "redis+cluster://127.0.0.1:{port}"])
def test_redis_unreachable_is_one_line(url):
    result = sms_sessions(
        "conversations", "count", REDIS_URL=url.format(port=free_port()), REDIS_TIMEOUT="0.2"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Redis unavailable: ")


@pytest.mark.slow
def test_a_number_without_its_plus_gets_a_hint(redis_url):
    post_signed(make_app(REDIS_URL=redis_url).test_client(), webhook_params(REY, OURS))
    result = sms_sessions("conversations", "show", REY[1:], OURS, REDIS_URL=redis_url)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"no live conversation from {REY[1:]} to {OURS} (numbers are written as Twilio sends them: "
        "E.164 with the +, e.g. +15551230001)"
    ]
    assert sms_sessions("conversations", "show", REY, OURS, REDIS_URL=redis_url).returncode == 0


@pytest.mark.slow
def test_the_table_shows_expiry_for_people_and_json_keeps_seconds(redis_url):
    post_signed(make_app(REDIS_URL=redis_url).test_client(), webhook_params(REY, OURS))
    table = sms_sessions("conversations", "list", REDIS_URL=redis_url).stdout.splitlines()
    assert table[0].endswith("EXPIRES IN")
    # written the way people read it, a few seconds under CONVERSATION_TTL however slow the CLI
    assert re.search(r"  (3h 5[0-9]m [0-5][0-9]s|4h 00m 00s)$", table[1])
    [row] = json.loads(sms_sessions("conversations", "list", "--json", REDIS_URL=redis_url).stdout)
    assert isinstance(row["expires_in"], int)


@pytest.mark.slow
def test_simulate_skips_empty_lines(redis_url):
    app = make_app(REDIS_URL=redis_url)
    with LiveServer(app) as server:
        result = sms_sessions(
            "simulate",
            "--from",
            REY,
            "--to",
            OURS,
            "--url",
            server.url,
            stdin="hello\n\n   \nagain\n",
            TWILIO_AUTH_TOKEN=TOKEN,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        thanks("Rey"),
        count_reply("Rey", 2),
    ]


@pytest.mark.slow
def test_make_run_on_a_busy_port_says_which_to_use():
    """Before its banner, and without starting anything (the venv is the running one)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-o",
                "install",
                "run",
                f"PORT={port}",
                f"VENV={Path(bin_path('python')).parent.parent}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        f"make run: port {port} on 127.0.0.1 is in use; choose another: make run PORT=5001"
    )
    assert "Serving the webhook" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "variable, value",
    [("WEB_CONCURRENCY", "abc"), ("PORT", "http"), ("LOG_FORMAT", "yaml"), ("BIND", "127.0.0.1:99999")],
)
def test_serve_refuses_a_bad_setting_in_one_line(variable, value):
    """What the image runs. gunicorn itself reads WEB_CONCURRENCY when imported (a traceback)."""
    result = sms_sessions("serve", **{variable: value})
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sms-sessions: refusing to start: {variable}={value!r}: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def operating_redis_cli_recipe(title: str) -> str:
    """docs/operating.md's redis-cli set-up lines and the recipe under the comment ``title``."""
    block = (
        (ROOT / "docs" / "operating.md").read_text().split("## Plain redis-cli", 1)[1].split("```sh\n", 1)[1]
    )
    block = block.split("```", 1)[0]
    setup = "\n".join(line for line in block.splitlines() if line.startswith(("R=", "now=")))
    recipe = block.split(f"# {title}", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
    return setup + "\n" + recipe


@pytest.mark.slow
def test_operating_most_recent_recipe_with_empty_tags(redis_url, redis_client):
    """Run as printed, against a real Redis where most of the 100 tags are empty."""
    require_binary("redis-cli", "redis-tools")
    keys, now = Keys(), int(time.time() * 1000)
    planted = {}
    for n in range(12):  # tags {01}, {02} and {03} only
        conversation = keys.conversation(f"+1555123{n:02d}{n % 3 + 1:02d}", OURS)
        planted[conversation.member] = now + 60_000 + 1000 * n
        redis_client.zadd(conversation.index_shard, {conversation.member: planted[conversation.member]})
    redis_client.zadd(keys.conversation("+15551239903", OURS).index_shard, {"lapsed|+1": now - 1000})
    script = operating_redis_cli_recipe("The 10 most recent")
    printed = subprocess.run(
        ["bash", "-c", script],
        env={**hermetic_environment(), "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    newest = sorted(planted.items(), key=lambda item: -item[1])[:10]
    assert printed.stdout.splitlines() == [f"{member}\t{score}" for member, score in newest]


def run_recipe(title: str, redis_url: str) -> subprocess.CompletedProcess:
    """docs/operating.md's recipe under ``title``, run as printed against ``redis_url``."""
    require_binary("redis-cli", "redis-tools")
    return subprocess.run(
        ["bash", "-c", operating_redis_cli_recipe(title)],
        env={**hermetic_environment(), "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_operating_count_recipe_agrees_with_the_service(redis_url, redis_client):
    """Live conversations in a few tags (and lapsed ones beside them): the recipe's sum is the
    service's count and the CLI's."""
    now = int(time.time() * 1000)
    for n in range(9):  # tags {01}, {02} and {03}: 3 live each
        plant(redis_client, f"+1555123{n:02d}{n % 3 + 1:02d}", OURS, now + 600_000 + n)
    for n in range(4):  # lapsed, in the same tags and one of their own
        plant(redis_client, f"+1555777{n:02d}{n + 1:02d}", OURS, now - 1000 - n)
    printed = run_recipe("Count live conversations", redis_url)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == "9\n"
    assert current(make_app(REDIS_URL=redis_url)).live.count() == 9
    assert sms_sessions("conversations", "count", REDIS_URL=redis_url).stdout == "9\n"


@pytest.mark.slow
def test_operating_end_one_recipe_lets_the_sweeper_end_it(redis_url, redis_client):
    """The recipe makes the conversation it names due now; the next sweep ends it: one
    ``ended`` event, reason ``expired``."""
    from service.lifecycle import Sweeper

    app = make_app(REDIS_URL=redis_url)
    client = app.test_client()
    for _ in range(2):
        assert post_signed(client, webhook_params(REY, OURS)).status_code == 200
    ended = run_recipe("End one", redis_url)
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout == "0\n"  # ZADD XX changes a score: nothing added
    Sweeper(app).sweep()
    events = [fields for _, fields in redis_client.xrange(Keys().events)]
    [end] = [e for e in events if e["type"] == "ended"]
    assert (end["from"], end["to"], end["reason"], end["messages"]) == (REY, OURS, "expired", "2")
    assert current(app).live.count() == 0


def run_server(tmp_path, port: int, **env: str) -> subprocess.Popen:
    """``sms-sessions run`` (what ``make run`` starts), its output in tmp_path/run.log."""
    return subprocess.Popen(
        [bin_path("sms-sessions"), "run", "--host", "127.0.0.1", "--port", str(port)],
        env={**hermetic_environment(), "LOG_FORMAT": "text", **env},
        cwd=ROOT,
        stdout=(tmp_path / "run.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_run_banner_says_what_serves(redis_processes, tmp_path):
    """The store (Redis, its password hidden), the handler, the console, and a simulate line
    that prints no token but the development one."""
    port, redis_server = free_port(), redis_processes("--save", "", "--appendonly", "no")
    redis_server.client().config_set("requirepass", "hunter2")
    url = f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"
    server = run_server(
        tmp_path,
        port,
        REDIS_URL=url,
        TWILIO_AUTH_TOKEN="a-real-secret",
        OPS_TOKEN="ops",
        SMS_HANDLER="examples.survey:handle",
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", server, seconds=60)
    finally:
        server.terminate()
        server.wait(timeout=15)
    output = (tmp_path / "run.log").read_text()
    assert f"Serving the webhook on http://127.0.0.1:{port}/sms" in output
    assert "  handler: examples.survey:handle" in output
    assert f"  store:   Redis at redis://:***@127.0.0.1:{redis_server.port}/0" in output
    assert f"  console: http://127.0.0.1:{port}/console/ (sign in with OPS_TOKEN)" in output
    assert "TWILIO_AUTH_TOKEN=<this service's TWILIO_AUTH_TOKEN>" in output
    assert "hunter2" not in output
    assert "a-real-secret" not in output
    assert "embedded" not in output


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, named",
    [({"LOCK_WAIT": "soon"}, "LOCK_WAIT="), ({"REDIS_URL": "redis://127.0.0.1:{port}/0"}, "REDIS_URL=")],
    ids=["bad-setting", "redis-unreachable"],
)
def test_run_refuses_in_one_line_before_any_banner(tmp_path, env, named):
    env = {name: value.format(port=free_port()) for name, value in env.items()}
    server = run_server(tmp_path, free_port(), TWILIO_AUTH_TOKEN=TOKEN, REDIS_TIMEOUT="0.2", **env)
    assert server.wait(timeout=60) == 1
    output = (tmp_path / "run.log").read_text()
    [line] = [line for line in output.splitlines() if "refusing to start" in line]
    assert line.startswith(f"sms-sessions: refusing to start: {named}")
    assert "Serving" not in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_make_run_with_a_bad_setting_refuses_before_any_banner():
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            "install",
            "run",
            f"PORT={free_port()}",
            f"VENV={Path(bin_path('python')).parent.parent}",
        ],
        env={**hermetic_environment(), "LOCK_WAIT": "soon"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "sms-sessions: refusing to start: LOCK_WAIT='soon'" in result.stderr
    assert "Serving" not in result.stdout
    assert "embedded" not in result.stdout


@pytest.mark.slow
def test_simulate_in_process_shows_a_slow_reply_after_the_acknowledgement():
    """The webhook's answer is empty (the handler ran past its budget); the handler's outbound
    messages follow, marked as coming later."""
    result = sms_sessions(
        "simulate",
        "--handler",
        "tests.support.napping_handler:handle",
        "--from",
        REY,
        "--to",
        OURS,
        "--message",
        "plan my trip",
        HANDLER_INLINE_BUDGET="0.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "(no reply)",
        "[later] One moment…",
        "[later] Answer to: plan my trip",
    ]
