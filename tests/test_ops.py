"""Operators on a real Redis: count, list, show and expire via the CLI (click's runner and the
real console script) and the JSON API; paging, ties, pruning, hygiene and plain-text storage."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time

import pytest
import redis

from service.clock import now_ms
from service.keys import Keys, shard_of
from service.simulator import TwilioSimulator
from service.wiring import current
from tests.support import ROOT
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import LiveServer, sms_sessions
from tests.support.conversations import plant
from tests.support.numbers import FINN, OTHER, OURS, POE, REY
from tests.support.programs import require_redis_server
from tests.support.redis_servers import commands_during
from tests.support.replies import thanks

OPS = "ops-test-token"
AUTH = {"Authorization": f"Bearer {OPS}"}
KEYS = Keys()
FIELDS = {"from", "to", "name", "messages", "first_seen", "last_seen", "expires_in"}


@pytest.fixture
def ops_app(redis_url):
    return make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS)


def text_messages(app, sender, count, recipient=OURS):
    client = app.test_client()
    for _ in range(count):
        assert post_signed(client, webhook_params(sender=sender, recipient=recipient)).status_code == 200


def converse_in_order(app, *senders):
    """One message each, in this order, each at a later millisecond (a later expiry)."""
    for sender in senders:
        text_messages(app, sender, 1)
        saved_by = now_ms()  # the message was saved at or before this millisecond
        while now_ms() <= saved_by:
            time.sleep(0.001)


def cli(app, *args):
    result = app.test_cli_runner().invoke(args=["conversations", *args])
    return result


def console(redis_url, *args, **env):
    """The installed ``sms-sessions`` console script, in its own process, in the service's env."""
    return sms_sessions("conversations", *args, REDIS_URL=redis_url, TWILIO_AUTH_TOKEN=TOKEN, **env)


def api_pages(client, limit):
    """Every page of ``GET /ops/conversations`` from the first to the end."""
    rows, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = client.get("/ops/conversations", query_string=query, headers=AUTH).get_json()
        rows += body["conversations"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, pages
        assert pages < 1000


# --- CLI -------------------------------------------------------------------------------------


def test_cli_count_list_show_expire(ops_app):
    text_messages(ops_app, REY, 3)
    converse_in_order(ops_app, FINN)
    assert cli(ops_app, "count").stdout == "2\n"
    assert json.loads(cli(ops_app, "count", "--json").stdout) == {"active": 2}

    listed = json.loads(cli(ops_app, "list", "--json").stdout)
    assert [(r["from"], r["name"], r["messages"]) for r in listed] == [(FINN, "Finn", 1), (REY, "Rey", 3)]
    assert set(listed[0]) == FIELDS
    assert 14390 <= listed[1]["expires_in"] <= 14400
    assert listed[1]["first_seen"].endswith("Z")
    assert listed[1]["first_seen"] <= listed[1]["last_seen"]
    table = cli(ops_app, "list").stdout.splitlines()
    assert table[0].split()[:4] == ["FROM", "TO", "NAME", "MESSAGES"]
    assert table[1].split()[:4] == [FINN, OURS, "Finn", "1"]

    shown = json.loads(cli(ops_app, "show", REY, OURS, "--json").stdout)
    assert shown["state"] == {}
    assert shown["messages"] == 3
    assert set(shown) == FIELDS | {"state", "ttl", "timers", "outbound"}
    assert shown["outbound"] == []  # it sent nothing
    assert "messages: 3\n" in cli(ops_app, "show", REY, OURS).stdout

    ended = cli(ops_app, "expire", REY, OURS)
    assert ended.exit_code == 0
    assert REY in ended.stdout
    assert cli(ops_app, "count").stdout == "1\n"
    assert [r["from"] for r in json.loads(cli(ops_app, "list", "--json").stdout)] == [FINN]


def test_cli_unknown_pair_exits_1_with_one_stderr_line(runner):
    for command in ("show", "expire"):
        result = runner.invoke(args=["conversations", command, POE, OURS])
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == f"no live conversation from {POE} to {OURS}\n"


@pytest.mark.slow
def test_console_script_reads_redis_url(redis_url, ops_app):
    text_messages(ops_app, REY, 2)
    assert json.loads(console(redis_url, "count", "--json").stdout) == {"active": 1}
    listed = json.loads(console(redis_url, "list", "--json").stdout)
    assert [(r["from"], r["to"], r["messages"]) for r in listed] == [(REY, OURS, 2)]
    shown = console(redis_url, "show", REY, OURS, "--json")
    assert json.loads(shown.stdout)["messages"] == 2
    unknown = console(redis_url, "show", POE, OURS)
    assert unknown.returncode == 1 and unknown.stderr.splitlines() == [
        f"no live conversation from {POE} to {OURS}"
    ]
    assert console(redis_url, "expire", REY, OURS).returncode == 0
    again = console(redis_url, "expire", REY, OURS)
    assert again.returncode == 1 and again.stderr.splitlines() == [
        f"no live conversation from {REY} to {OURS}"
    ]
    assert console(redis_url, "count").stdout == "0\n"


def test_cli_pages_with_the_printed_cursor(ops_app):
    converse_in_order(ops_app, REY, FINN, POE)
    first = cli(ops_app, "list", "--limit", "2", "--json")
    assert [r["from"] for r in json.loads(first.stdout)] == [POE, FINN]
    cursor = first.stderr.split("next cursor: ")[1].strip()
    second = cli(ops_app, "list", "--limit", "2", "--cursor", cursor, "--json")
    assert [r["from"] for r in json.loads(second.stdout)] == [REY]
    assert "next cursor" not in second.stderr
    assert cli(ops_app, "list", "--cursor", "not-a-cursor").exit_code == 2


def test_cli_without_redis_url_warns_it_sees_only_its_own_store():
    result = cli(make_app(), "count")
    assert result.stdout == "0\n"
    assert "REDIS_URL is not set" in result.stderr
    assert "make run" in result.stderr


def test_cli_with_redis_down_says_so_in_one_line():
    result = cli(make_app(REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT=0.2), "count")
    assert result.exit_code == 1
    assert result.stderr.startswith("Redis unavailable: ConnectionError")
    assert len(result.stderr.splitlines()) == 1


# --- JSON API --------------------------------------------------------------------------------


def test_api_stats_list_show_delete(ops_app, redis_client, caplog):
    caplog.set_level(logging.INFO)
    text_messages(ops_app, REY, 2)
    converse_in_order(ops_app, POE)
    client = ops_app.test_client()
    stats = client.get("/ops/stats", headers=AUTH).get_json()
    assert (stats["active"], stats["indexed"], stats["last_hour"]["started"]) == (2, 2, 2)
    body = client.get("/ops/conversations", headers=AUTH).get_json()
    assert [r["from"] for r in body["conversations"]] == [POE, REY]
    assert body["next_cursor"] is None
    shown = client.get(f"/ops/conversations/{REY}/{OURS}", headers=AUTH)
    assert shown.status_code == 200
    assert shown.get_json()["messages"] == 2
    assert shown.get_json()["name"] == "Rey"
    ended = client.delete(f"/ops/conversations/{REY}/{OURS}", headers=AUTH)
    assert ended.status_code == 200
    assert ended.get_json()["ended"] is True
    assert client.get("/ops/stats", headers=AUTH).get_json()["active"] == 1
    ended_keys = KEYS.conversation(REY, OURS)
    assert redis_client.hget(ended_keys.conversation, "state") is None  # only redelivery memory is left
    assert redis_client.zscore(ended_keys.index_shard, ended_keys.member) is None
    assert "+1555***0001 ended by an operator" in caplog.text
    assert REY not in caplog.text


def test_api_unknown_pair_is_404(ops_app):
    client = ops_app.test_client()
    assert client.get(f"/ops/conversations/{POE}/{OURS}", headers=AUTH).status_code == 404
    deleted = client.delete(f"/ops/conversations/{POE}/{OURS}", headers=AUTH)
    assert deleted.status_code == 404
    assert "error" in deleted.get_json()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {OPS}", f"Bearer {OPS}x", "Bearer"])
def test_api_without_the_right_token_is_401(ops_app, header):
    headers = {"Authorization": header} if header else {}
    client = ops_app.test_client()
    for method, path in (
        ("get", "/ops/stats"),
        ("get", "/ops/conversations"),
        ("get", f"/ops/conversations/{REY}/{OURS}"),
        ("delete", f"/ops/conversations/{REY}/{OURS}"),
    ):
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_api_is_off_without_ops_token(app):
    client = app.test_client()
    for path in ("/ops/stats", "/ops/conversations", f"/ops/conversations/{REY}/{OURS}"):
        assert client.get(path, headers=AUTH).status_code == 404
        assert client.get(path).status_code == 404
    assert client.delete(f"/ops/conversations/{REY}/{OURS}", headers=AUTH).status_code == 404


def test_api_opens_no_session_and_touches_no_conversation(ops_app, redis_client):
    text_messages(ops_app, REY, 1)
    keys = KEYS.conversation(REY, OURS)
    before = redis_client.hgetall(keys.conversation)
    response = ops_app.test_client().get(f"/ops/conversations/{REY}/{OURS}", headers=AUTH)
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers
    assert redis_client.hgetall(keys.conversation) == before
    assert redis_client.exists(keys.lock) == 0


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"cursor": "%%%"}, {"cursor": "bm8tc2VwYXJhdG9y"}],
)
def test_api_bad_paging_parameters_are_400(ops_app, query):
    response = ops_app.test_client().get("/ops/conversations", query_string=query, headers=AUTH)
    assert response.status_code == 400
    assert "error" in response.get_json()


def test_api_on_redis_down_is_503():
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT=0.2, OPS_TOKEN=OPS)
    response = app.test_client().get("/ops/stats", headers=AUTH)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"


# --- Ordering and paging ---------------------------------------------------------------------


def test_most_recent_first_follows_the_last_message(ops_app):
    converse_in_order(ops_app, REY, FINN, POE, REY)
    rows, _ = api_pages(ops_app.test_client(), 50)
    assert [r["from"] for r in rows] == [REY, POE, FINN]


def expected_order(planted):
    """Independent statement of the list order: expiry, then tag, then member, all descending."""
    return [
        m for _, _, m in sorted(((e, shard_of(m.split("|")[0]), m) for m, e in planted.items()), reverse=True)
    ]


@pytest.mark.parametrize("limit", [1, 3, 7, 50])
def test_paging_to_the_end_with_ties_has_no_duplicates_or_gaps(ops_app, redis_client, limit):
    rng = random.Random(limit)
    base = now_ms() + 600_000
    planted = {}
    for _ in range(240):
        # Few distinct expiries, and senders crowded into few tags: many ties in and across shards.
        sender = f"+1555{rng.randrange(10**5):05d}{rng.choice(['07', '42', '99', '00'])}"
        recipient = rng.choice([OURS, OTHER])
        expiry = base + rng.randrange(6)
        plant(redis_client, sender, recipient, expiry)
        planted[f"{sender}|{recipient}"] = expiry
    rows, pages = api_pages(ops_app.test_client(), limit)
    assert [f"{r['from']}|{r['to']}" for r in rows] == expected_order(planted)
    assert pages == -(-len(planted) // limit)  # the last page says there is no more


def test_paging_survives_the_cursor_entry_ending_between_pages(ops_app, redis_client):
    expiry = now_ms() + 600_000
    senders = [f"+1555{n:05d}07" for n in range(10)]  # one tag, one expiry: a single tie group
    for sender in senders:
        plant(redis_client, sender, OURS, expiry)
    client = ops_app.test_client()
    first = client.get("/ops/conversations?limit=4", headers=AUTH).get_json()
    last = first["conversations"][-1]
    assert client.delete(f"/ops/conversations/{last['from']}/{OURS}", headers=AUTH).status_code == 200
    rest = client.get(
        "/ops/conversations", query_string={"cursor": first["next_cursor"]}, headers=AUTH
    ).get_json()
    listed = [r["from"] for r in first["conversations"] + rest["conversations"]]
    assert listed == sorted(senders, reverse=True)


def test_paging_lists_a_refreshed_conversation_once(ops_app, redis_client):
    expiry = now_ms() + 600_000
    for n, sender in enumerate((REY, FINN, POE)):
        plant(redis_client, sender, OURS, expiry - n)
    client = ops_app.test_client()
    first = client.get("/ops/conversations?limit=1", headers=AUTH).get_json()
    assert [r["from"] for r in first["conversations"]] == [REY]
    text_messages(ops_app, REY, 1)  # moves to the top, behind the cursor
    rest, cursor = [], first["next_cursor"]
    while cursor:
        body = client.get(
            "/ops/conversations", query_string={"limit": 1, "cursor": cursor}, headers=AUTH
        ).get_json()
        rest += [r["from"] for r in body["conversations"]]
        cursor = body["next_cursor"]
    assert rest == [FINN, POE]


def test_entries_whose_state_is_gone_are_skipped_and_pruned(ops_app, redis_client):
    expiry = now_ms() + 600_000
    for n, sender in enumerate((REY, FINN, POE)):
        plant(redis_client, sender, OURS, expiry - n)
    redis_client.delete(KEYS.conversation(FINN, OURS).conversation)  # e.g. deleted by hand
    rows, _ = api_pages(ops_app.test_client(), 1)
    assert [r["from"] for r in rows] == [REY, POE]
    assert redis_client.zscore(KEYS.conversation(FINN, OURS).index_shard, f"{FINN}|{OURS}") is None
    assert json.loads(cli(ops_app, "count", "--json").stdout) == {"active": 2}


# --- Ending, expiry and hygiene --------------------------------------------------------------


def test_expired_by_operator_then_old_cookie_is_thanked_as_new(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS)
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        for _ in range(3):
            twilio.send(REY, OURS, "hello")
        old_cookie = twilio.cookie_for(REY, OURS)
        assert cli(app, "expire", REY, OURS).exit_code == 0
        keys = KEYS.conversation(REY, OURS)
        assert redis_client.exists(keys.lock) == 0
        assert [field[:2] for field in redis_client.hkeys(keys.conversation)] == ["m:"] * 3  # answers only
        assert redis_client.zscore(keys.index_shard, keys.member) is None
        after = twilio.send(REY, OURS, "back again")
        assert after.cookie_sent == old_cookie
        assert after.reply == thanks("Rey")
        assert twilio.cookie_for(REY, OURS) != old_cookie
        # and through the API the same way
        assert app.test_client().delete(f"/ops/conversations/{REY}/{OURS}", headers=AUTH).status_code == 200
        assert twilio.send(REY, OURS, "once more").reply == thanks("Rey")


def test_every_conversation_lapses(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS, CONVERSATION_TTL=1)
    senders = [f"+1555123{n:04d}" for n in range(0, 40, 3)]
    for sender in senders:
        text_messages(app, sender, 2)
    assert json.loads(cli(app, "count", "--json").stdout) == {"active": len(senders)}
    deadline = time.monotonic() + 15
    while active_count(app) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert active_count(app) == 0
    assert api_pages(app.test_client(), 10)[0] == []


def active_count(app):
    return app.test_client().get("/ops/stats", headers=AUTH).get_json()["active"]


def test_every_stored_value_is_utf8_text(redis_url, ops_app):
    text_messages(ops_app, REY, 2)
    client = ops_app.test_client()
    assert post_signed(client, webhook_params(sender=FINN, body="héllo ✓ 你好")).status_code == 200
    held = KEYS.conversation(POE, OURS)
    current(ops_app).store.open(held, "SMheld")  # a lock, as during a message
    raw = redis.Redis.from_url(redis_url)  # no decoding: bytes as stored
    readers = {
        b"hash": lambda k: [b for pair in raw.hgetall(k).items() for b in pair],
        b"zset": lambda k: [m for m, _ in raw.zrange(k, 0, -1, withscores=True)],
        b"string": lambda k: [raw.get(k)],
        b"stream": lambda k: [b for _, fields in raw.xrange(k) for pair in fields.items() for b in pair],
    }
    seen = set()
    for key in raw.scan_iter(count=1000):
        kind = raw.type(key)
        seen.add(kind)
        for value in [key, *readers[kind](key)]:
            value.decode("utf-8")  # raises on anything that is not text
    assert seen == {b"hash", b"zset", b"string", b"stream"}
    assert raw.hget(KEYS.conversation(REY, OURS).conversation, "seq") == b"2"


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    """The scale benchmark's own machinery on 1000 conversations (figures are not asserted)."""
    require_redis_server()  # the script starts one of its own
    output = tmp_path / "ops.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ops_at_scale",
            "--conversations",
            "1000",
            "--runs",
            "3",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert json.loads(result.stdout) == report  # stdout: the JSON alone, no log lines
    assert report["conversations"] == 1000
    assert {"count_ms", "first_page_50_ms", "expire_one_ms"} <= set(report)


def test_a_page_costs_the_same_commands_for_100_or_2000_conversations(ops_app, redis_client):
    """O(page size): never KEYS or SCAN, and no command more when the index grows 20-fold,
    for a first page and for one after a cursor (the cursor's shard read by a script)."""
    client, expiry = ops_app.test_client(), now_ms() + 3_600_000

    def two_pages():
        first = client.get("/ops/conversations?limit=50", headers=AUTH).get_json()
        client.get(
            "/ops/conversations", query_string={"limit": 50, "cursor": first["next_cursor"]}, headers=AUTH
        ).get_json()

    tallies = []
    for total in (100, 2000):
        for n in range(total):
            plant(redis_client, f"+1555{n:07d}", OURS, expiry - n)
        tallies.append(commands_during(redis_client, two_pages))
        redis_client.flushall()
    assert tallies[0] == tallies[1]
    assert not {"keys", "scan", "zcard"} & set(tallies[1])  # no whole-index reads
    assert tallies[1]["hmget"] == 100
    assert tallies[1]["evalsha"] == 1


def test_cli_expire_json(ops_app):
    text_messages(ops_app, REY, 1)
    ended = cli(ops_app, "expire", REY, OURS, "--json")
    assert ended.exit_code == 0
    assert json.loads(ended.stdout) == {"ended": True, "from": REY, "to": OURS}
    assert json.loads(cli(ops_app, "count", "--json").stdout) == {"active": 0}


def strict_json(text: str):
    """JSON as any parser reads it: no NaN or Infinity."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_state_holding_nan_is_served_as_valid_json(ops_app, redis_client):
    """A hand edit may leave NaN or an infinity in stored state: /ops and ``--json`` serve it
    as null, so that every JSON parser reads the answer."""
    text_messages(ops_app, REY, 1)
    planted = '{"a": NaN, "b": [Infinity, 1.5], "c": {"d": -Infinity}}'
    redis_client.hset(KEYS.conversation(REY, OURS).conversation, "state", planted)
    answer = ops_app.test_client().get(f"/ops/conversations/{REY}/{OURS}", headers=AUTH)
    assert answer.status_code == 200
    assert strict_json(answer.get_data(as_text=True))["state"] == {
        "a": None,
        "b": [None, 1.5],
        "c": {"d": None},
    }
    shown = cli(ops_app, "show", REY, OURS, "--json")
    assert shown.exit_code == 0
    assert strict_json(shown.output)["state"]["b"] == [None, 1.5]


def test_wrong_bearer_tokens_are_slowed_per_address_and_counted(ops_app):
    """After 5 wrong tokens an address waits (1 s, then twice as long after each further
    failure): its tries meanwhile are 429 with Retry-After, the right token included; other
    addresses are not slowed; a right token afterwards clears the address."""
    client, other = ops_app.test_client(), ops_app.test_client()
    client.environ_base["REMOTE_ADDR"], other.environ_base["REMOTE_ADDR"] = "192.0.2.1", "192.0.2.2"
    guard = current(ops_app).throttle
    now = [1000.0]
    guard.clock = lambda: now[0]
    wrong = {"Authorization": "Bearer guess"}
    assert [client.get("/ops/stats", headers=wrong).status_code for _ in range(5)] == [401] * 5
    slowed = client.get("/ops/stats", headers=AUTH)
    assert slowed.status_code == 429
    assert slowed.headers["Retry-After"] == "1"
    assert other.get("/ops/stats", headers=AUTH).status_code == 200
    now[0] += 1
    assert client.get("/ops/stats", headers=wrong).status_code == 401  # the 6th is looked at...
    now[0] += 1.5
    slowed = client.get("/ops/stats", headers=AUTH)  # ...then the address waits 2 s
    assert slowed.status_code == 429
    assert slowed.headers["Retry-After"] == "1"
    now[0] += 0.5
    assert client.get("/ops/stats", headers=AUTH).status_code == 200
    assert client.get("/ops/stats", headers=wrong).status_code == 401  # cleared: counted afresh
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sms_sign_in_failures_total{surface="api"} 7.0' in metrics
