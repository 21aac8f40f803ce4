"""The operators' console without a browser: number search in the operators' view, sign-in,
cookie, CSRF, headers and pages through Flask's test client on the real Redis."""

from __future__ import annotations

import html
import json
import logging
import re
import time

import pytest
import requests
from itsdangerous import TimestampSigner

from service.clock import now_ms
from service.console import PLOT, chart
from service.live import BadSearch, search_number
from service.wiring import current
from tests.support.app import make_app, post_signed, webhook_params
from tests.support.app_servers import LiveServer
from tests.support.conversations import plant
from tests.support.numbers import FINN, OTHER, OURS, POE, REY
from tests.support.redis_servers import commands_during


@pytest.fixture
def active(app):
    return current(app).live


def found(active, number, limit=50):
    return [(c.sender, c.recipient) for c in active.search(number, limit)]


# --- Search by number ------------------------------------------------------------------------


def test_search_by_full_number_or_suffix_most_recent_first(active, redis_client):
    expiry = now_ms() + 600_000
    plant(redis_client, REY, OURS, expiry - 3, keys=active.keys, state={})
    plant(redis_client, REY, OTHER, expiry - 1, keys=active.keys, state={})
    plant(redis_client, "whatsapp:" + REY, "whatsapp:" + OURS, expiry - 2, keys=active.keys, state={})
    plant(redis_client, "+15559990001", OURS, expiry, keys=active.keys, state={})  # same last 4 digits
    plant(redis_client, "+449990101", OURS, expiry - 4, keys=active.keys, state={})  # same tag, other suffix
    plant(
        redis_client, "+215551230001", OURS, expiry - 5, keys=active.keys, state={}
    )  # ends with REY's digits
    plant(redis_client, FINN, OURS, expiry, keys=active.keys, state={})  # another tag
    assert found(active, REY) == [(REY, OTHER), ("whatsapp:" + REY, "whatsapp:" + OURS), (REY, OURS)]
    assert found(active, "+1 (555) 123-0001") == found(active, REY)
    assert found(active, "1230001") == [
        (REY, OTHER),
        ("whatsapp:" + REY, "whatsapp:" + OURS),
        (REY, OURS),
        ("+215551230001", OURS),
    ]
    assert found(active, "0001") == [
        ("+15559990001", OURS),
        (REY, OTHER),
        ("whatsapp:" + REY, "whatsapp:" + OURS),
        (REY, OURS),
        ("+215551230001", OURS),
    ]
    assert len(found(active, "01")) == 6
    assert found(active, "02") == [(FINN, OURS)]
    assert found(active, "0001", limit=2) == [("+15559990001", OURS), (REY, OTHER)]
    assert found(active, "+15559990002") == []


def test_search_skips_lapsed_and_prunes_entries_whose_state_is_gone(active, redis_client):
    now = now_ms()
    plant(redis_client, REY, OURS, now + 600_000, keys=active.keys, state={})
    plant(redis_client, "+15559990001", OURS, now - 1000, keys=active.keys, state={})  # lapsed
    plant(redis_client, "+15558880001", OURS, now + 600_000, keys=active.keys, state={})
    gone = active.keys.conversation("+15558880001", OURS)
    redis_client.delete(gone.conversation)
    assert found(active, "0001") == [(REY, OURS)]
    assert redis_client.zscore(gone.index_shard, gone.member) is None


def test_search_reads_only_the_shard_its_digits_name(active, redis_client):
    """ZSCAN of one index shard, however many conversations the others hold: never KEYS, SCAN
    or a per-shard walk."""
    expiry = now_ms() + 600_000
    for n in range(2000):
        plant(redis_client, f"+1555{n:07d}", OURS, expiry - n, keys=active.keys, state={})
    tally = commands_during(redis_client, lambda: active.search("42", 50))
    assert tally == {"zscan": 1, "hmget": 20}  # the 20 senders ending in 42, one read each


@pytest.mark.parametrize("text", ["1", "+1", "", "  ", "abc", "+1555x", "1+555", "*01", "0[1]", "1" * 65])
def test_search_refuses_what_names_no_single_shard(text):
    with pytest.raises(BadSearch):
        search_number(text)


def test_search_number_keeps_the_plus_and_drops_separators():
    assert search_number(" +1 (555) 123-00.01 ") == "+15551230001"
    assert search_number("42") == "42"


# --- Sign-in, cookie, CSRF, headers ----------------------------------------------------------

OPS = "console-test-token"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def console_app(redis_url):
    return make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS)


def csrf_of(response) -> str:
    return CSRF.search(response.get_data(as_text=True)).group(1)


def sign_in(client, token=OPS):
    """Signs in through the form; the signed-in page's CSRF token (None if refused)."""
    form = client.get("/console/sign-in")
    response = client.post("/console/sign-in", data={"token": token, "csrf": csrf_of(form)})
    if response.status_code != 303:
        return None
    return csrf_of(client.get("/console/"))


def cookie_header(response, name="sms_console") -> str:
    [header] = [v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith(f"{name}=")]
    return header


def talk(app, sender=REY, recipient=OURS, messages=1):
    client = app.test_client()
    for _ in range(messages):
        assert post_signed(client, webhook_params(sender=sender, recipient=recipient)).status_code == 200


def test_console_is_off_without_ops_token(app):
    client = app.test_client()
    for path in (
        "/console/",
        "/console",
        "/console/sign-in",
        "/console/sign-out",
        "/console/conversation",
        "/console/conversation/end",
        "/console/static/console.css",
        "/static/console.css",
    ):
        for method in ("get", "post", "put", "delete", "options", "head"):
            assert getattr(client, method)(path).status_code == 404, (method, path)


def test_sign_in_sets_a_strict_expiring_cookie_of_its_own(console_app):
    client = console_app.test_client()
    assert client.get("/console/").headers["Location"] == "/console/sign-in"
    form = client.get("/console/sign-in")
    first = cookie_header(form, "sms_console_csrf")
    assert "sms_console=" not in form.headers.get("Set-Cookie", "")  # nothing keyed by the token yet
    signed_in = client.post("/console/sign-in", data={"token": OPS, "csrf": csrf_of(form)})
    assert signed_in.status_code == 303
    assert signed_in.headers["Location"] == "/console/"
    cookie = cookie_header(signed_in)
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"):
        assert attribute in cookie
        assert attribute in first
    assert "Secure" not in cookie
    assert "sms_session" not in signed_in.headers.get("Set-Cookie", "")
    assert OPS not in cookie
    assert cookie.split(";")[0] != first.split(";")[0]
    page = client.get("/console/")
    assert page.status_code == 200
    assert "Live conversations" in page.get_data(as_text=True)
    assert csrf_of(page) != csrf_of(form)  # a new CSRF token once signed in


def test_secure_cookie_when_configured(redis_url):
    client = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS, SESSION_COOKIE_SECURE=True).test_client()
    assert "; Secure" in cookie_header(client.get("/console/sign-in"), "sms_console_csrf")


def test_wrong_token_is_401_with_one_log_line(console_app, caplog):
    client = console_app.test_client()
    caplog.set_level(logging.INFO)
    for number, wrong in enumerate(("", "nope", OPS + "x", OPS[:-1])):
        caplog.clear()
        client.environ_base["REMOTE_ADDR"] = f"192.0.2.{number}"  # two tries each: none slowed
        assert sign_in(client, wrong) is None
        form = client.get("/console/sign-in")
        response = client.post("/console/sign-in", data={"token": wrong, "csrf": csrf_of(form)})
        assert response.status_code == 401
        assert "Wrong token." in response.get_data(as_text=True)
        assert client.get("/console/").status_code == 303
    assert [r.getMessage() for r in caplog.records if r.name == "service.console"] == [
        "console sign-in refused: wrong ops token"
    ] * 2


def test_nothing_a_visitor_gets_is_keyed_by_the_token(console_app):
    """The sign-in form's cookie, a refusal's, a slowed try's: none is signed with a key from
    OPS_TOKEN, so none lets the token be guessed offline; only a sign-in gets such a cookie."""
    from itsdangerous import BadData

    from service.console import _signer

    client = console_app.test_client()
    client.environ_base["REMOTE_ADDR"] = "192.0.2.9"
    form = client.get("/console/sign-in")
    answers = [form] + [
        client.post("/console/sign-in", data={"token": "guess", "csrf": csrf_of(form)}) for _ in range(7)
    ]
    assert [a.status_code for a in answers] == [200] + [401] * 5 + [429] * 2
    slowed = answers[-1]
    assert slowed.headers["Retry-After"] == "1"
    assert "try again in 1 s" in slowed.get_data(as_text=True)
    assert all("sms_console=" not in a.headers.get("Set-Cookie", "") for a in answers)
    value = cookie_header(form, "sms_console_csrf").split(";")[0].partition("=")[2]
    with console_app.test_request_context(), pytest.raises(BadData):
        _signer().loads(value)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sms_sign_in_failures_total{surface="console"} 5.0' in metrics


def test_sign_in_without_its_csrf_token_is_refused(console_app):
    client = console_app.test_client()
    client.get("/console/sign-in")
    assert client.post("/console/sign-in", data={"token": OPS}).status_code == 403
    fresh = console_app.test_client()  # no cookie at all: nothing to compare the token with
    assert fresh.post("/console/sign-in", data={"token": OPS, "csrf": "x"}).status_code == 403
    assert client.get("/console/").status_code == 303


def test_sign_out_and_expiry_and_token_rotation_sign_out(console_app, redis_url, monkeypatch):
    client = console_app.test_client()
    csrf = sign_in(client)
    assert client.post("/console/sign-out", data={}).status_code == 403  # CSRF here too
    out = client.post("/console/sign-out", data={"csrf": csrf})
    assert out.status_code == 303
    assert "sms_console=;" in cookie_header(out)
    assert client.get("/console/").status_code == 303

    rotated = make_app(REDIS_URL=redis_url, OPS_TOKEN="another-token").test_client()
    sign_in(client)
    rotated.set_cookie(
        "sms_console", client.get_cookie("sms_console", path="/console").value, path="/console"
    )
    assert rotated.get("/console/").status_code == 303

    signed_at = int(time.time()) - 28801  # a sign-in older than CONSOLE_SESSION_TTL
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: signed_at)
    sign_in(client)
    monkeypatch.undo()
    assert client.get("/console/").status_code == 303


def test_every_console_page_is_protected_and_uncached(console_app):
    client = console_app.test_client()
    talk(console_app)
    csrf = sign_in(client)
    responses = [
        client.get("/console/sign-in"),
        client.get("/console/"),
        client.get("/console/", query_string={"q": "0001"}),
        client.get("/console/conversation", query_string={"from": REY, "to": OURS}),
        client.post("/console/conversation/end", data={"from": REY, "to": OURS}),
        client.post("/console/conversation/end", data={"from": POE, "to": OURS, "csrf": csrf}),
    ]
    assert [r.status_code for r in responses] == [303, 200, 200, 200, 403, 404]
    for response in responses:
        policy = response.headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in policy
        assert "script-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    asset = client.get("/console/static/console.js")
    assert asset.status_code == 200
    assert asset.headers["X-Content-Type-Options"] == "nosniff"


def test_the_apps_own_answers_under_console_are_protected_too(console_app):
    """A 404, a 405 and werkzeug's 308 (adding a slash) get the console's headers; the 308's
    Location is a path, whatever the Host header says."""
    client = console_app.test_client()
    responses = [
        client.get("/console/no-such-page"),
        client.delete("/console/sign-in"),
        client.get("/console", headers={"Host": "evil.example"}),
        client.get("/console", base_url="https://evil.example:8443"),
    ]
    assert [r.status_code for r in responses] == [404, 405, 308, 308]
    for response in responses:
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    assert [r.headers["Location"] for r in responses[2:]] == ["/console/", "/console/"]


def test_pages_name_their_icon(console_app):
    """Each page links its icon, so that no browser asks for /favicon.ico (a 404)."""
    client = console_app.test_client()
    icon = re.search(
        r'<link rel="icon" href="([^"]+)"', client.get("/console/sign-in").get_data(as_text=True)
    )
    served = client.get(icon.group(1))
    assert served.status_code == 200
    assert served.mimetype == "image/svg+xml"


def test_pages_have_nothing_inline_for_the_policy_to_block(console_app):
    """No inline script, style or event handler: the CSP forbids them, so none may be needed.
    And each id once, a plain title: well-formed enough for the refresh to find its parts."""
    client = console_app.test_client()
    talk(console_app, messages=2)
    pages = [client.get("/console/sign-in"), client.post("/console/sign-in", data={"token": "x"})]
    sign_in(client)
    pages += [
        client.get("/console/"),
        client.get("/console/?q=1"),
        client.get("/console/conversation", query_string={"from": REY, "to": OURS}),
        client.get("/console/conversation", query_string={"from": POE, "to": OURS}),
    ]
    for response in pages:
        text = response.get_data(as_text=True)
        assert "<html" in text
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), text
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", text, re.I), text
        ids = re.findall(r'\sid="([^"]+)"', text)
        assert len(ids) == len(set(ids)), "an id twice: the refresh would swap the wrong one"
        assert re.search(r"<title>[^<]+ · sms-sessions console</title>", text)


# --- Pages -----------------------------------------------------------------------------------


def test_live_list_search_conversation_page_and_end(console_app, caplog):
    caplog.set_level(logging.INFO)
    talk(console_app, REY, messages=3)
    talk(console_app, FINN)
    client = console_app.test_client()
    csrf = sign_in(client)
    listed = client.get("/console/").get_data(as_text=True)
    assert '<dd id="live-count">2</dd>' in listed
    assert listed.index(FINN) < listed.index(REY)
    assert "Rey" in listed
    assert "Finn" in listed
    searched = client.get("/console/", query_string={"q": "0001"}).get_data(as_text=True)
    assert REY in searched
    assert FINN not in searched
    refused = client.get("/console/", query_string={"q": "1"})
    assert refused.status_code == 400
    assert "at least the last two digits" in refused.get_data(as_text=True)

    shown = client.get("/console/conversation", query_string={"from": REY, "to": OURS})
    text = shown.get_data(as_text=True)
    assert shown.status_code == 200
    assert f"{REY} → {OURS}" in text
    assert '<dd id="messages">3</dd>' in text
    assert re.search(r"<dt>Expires in</dt><dd>(\d+[dhm] )*\d+s</dd>", text)  # service/clock.py's form
    assert "Yes, end it" in text
    state = re.search(r'<pre class="state"[^>]*>(.*?)</pre>', text, re.S)
    assert state
    assert html.unescape(state.group(1)) == "{}"  # the counter keeps no state of its own

    ended = client.post("/console/conversation/end", data={"from": REY, "to": OURS, "csrf": csrf})
    assert ended.status_code == 303
    assert ended.headers["Location"] == "/console/?ended=1"
    after = client.get("/console/?ended=1").get_data(as_text=True)
    assert "The conversation was ended." in after
    assert REY not in section(after, "live")
    [ended_row] = re.findall(r"<tr>.*?</tr>", section(after, "recent").split("<tbody>")[1], re.S)
    assert [html.unescape(cell) for cell in re.findall(r"<td[^>]*>(?:<time[^>]*>)?(.*?)<", ended_row)][
        :5
    ] == [REY, OURS, "operator", "0s", "3"]
    assert re.search(r'<dd id="ended-count">1<small>operator 1</small>', after)
    again = client.get("/console/conversation", query_string={"from": REY, "to": OURS})
    assert again.status_code == 404
    assert "it ended or expired" in again.get_data(as_text=True)
    assert current(console_app).live.get(REY, OURS) is None
    assert "conversation of +1555***0001 ended by an operator" in caplog.text
    assert REY not in caplog.text
    assert FINN not in caplog.text


def section(page: str, section_id: str) -> str:
    return re.search(rf'<section id="{section_id}".*?</section>', page, re.S).group(0)


def test_overview_counts_the_last_hour_and_charts_the_samples(console_app, redis_client):
    talk(console_app, REY, messages=2)
    talk(console_app, FINN)
    now, samples = now_ms(), current(console_app).keys.samples
    series = [
        (now - minutes * 60_000, live, messages)
        for minutes, live, messages in ((400, 9, 90), (300, 4, 12), (120, 8, 30), (1, 2, 7))
    ]
    for at, live, messages in series:  # as the sweeper writes them, one a minute
        redis_client.xadd(samples, {"live": live, "messages": messages}, id=f"{at}-0")
    client = console_app.test_client()
    csrf = sign_in(client)
    client.post("/console/conversation/end", data={"from": FINN, "to": OURS, "csrf": csrf})
    overview = section(client.get("/console/").get_data(as_text=True), "overview")
    assert '<dd id="live-count">1</dd>' in overview
    assert '<dd id="started">2</dd>' in overview
    assert '<dd id="per-minute">7<small>' in overview  # the latest sample's minute
    assert '<dd id="ended-count">1<small>operator 1</small>' in overview
    assert '<dd id="averages">0s<small>1.0 messages</small>' in overview
    live = re.search(r'<svg class="chart" id="chart-live".*?</svg>', overview, re.S).group(0)
    points = [
        tuple(map(float, pair.split(",")))
        for pair in re.search(r'<polyline class="line" points="([^"]+)"', live).group(1).split()
    ]
    assert len(points) == 3  # the sample from 400 minutes ago is older than the chart's 6 h
    left, top, right, bottom = PLOT
    assert [y for _, y in points] == [bottom - 4 / 8 * (bottom - top), top, bottom - 2 / 8 * (bottom - top)]
    assert left < points[0][0] < points[1][0] < points[2][0] <= right
    assert "highest 8, latest 2." in live


def test_chart_without_samples_says_so():
    empty = chart("live", "Live conversations", [], now_ms())
    assert (empty.line, empty.last, empty.peak) == ("", None, 0)
    assert empty.summary == "Live conversations: no samples yet."


def test_state_is_shown_as_formatted_json(console_app, redis_client):
    talk(console_app)
    keys = current(console_app).keys.conversation(REY, OURS)
    redis_client.hset(keys.conversation, "state", json.dumps({"step": 2, "answers": ["<b>yes</b>", "é"]}))
    client = console_app.test_client()
    sign_in(client)
    page = client.get("/console/conversation", query_string={"from": REY, "to": OURS})
    state = re.search(r'<pre class="state"[^>]*>(.*?)</pre>', page.get_data(as_text=True), re.S)
    assert "<b>" not in state.group(1)  # escaped, as every value on the page
    assert (
        html.unescape(state.group(1)) == '{\n  "answers": [\n    "<b>yes</b>",\n    "é"\n  ],\n  "step": 2\n}'
    )


def test_bad_requests_are_400_with_a_reason(console_app, caplog):
    client = console_app.test_client()
    sign_in(client)
    caplog.set_level(logging.INFO)
    for query, reason in (
        ({"cursor": "not-a-cursor"}, "start from the first page"),
        ({"q": "abc"}, "digits, with + for a full number"),
    ):
        caplog.clear()
        response = client.get("/console/", query_string=query)
        assert response.status_code == 400
        assert reason in response.get_data(as_text=True)
        assert len([r for r in caplog.records if r.name == "service.console"]) == 1
    missing = client.get("/console/conversation", query_string={"from": REY})
    assert missing.status_code == 400


def test_pages_follow_the_cursor(console_app, redis_client):
    active = current(console_app).live
    expiry = now_ms() + 600_000
    senders = [f"+1555000{n:04d}" for n in range(60)]
    for n, sender in enumerate(senders):
        plant(redis_client, sender, OURS, expiry - n, keys=active.keys, state={})
    client = console_app.test_client()
    sign_in(client)
    first = client.get("/console/").get_data(as_text=True)
    cursor = re.search(r'href="/console/\?cursor=([^"]+)" rel="next"', first).group(1)
    second = client.get("/console/?cursor=" + cursor).get_data(as_text=True)
    assert [s for s in senders if s in first] == senders[:50]
    assert [s for s in senders if s in second] == senders[50:]
    assert 'rel="next"' not in second
    assert ">First page<" in second


def test_dev_server_and_app_log_lines_hold_no_full_number(redis_url, caplog):
    """``make run``'s request lines and the app's own lines, for a whole console session."""
    app = make_app(REDIS_URL=redis_url, OPS_TOKEN=OPS)
    talk(app, REY)
    caplog.set_level(logging.INFO)
    with LiveServer(app) as server:
        base, browser = server.url.removesuffix("/sms"), requests.Session()
        form = browser.get(f"{base}/console/sign-in", timeout=10)
        csrf = CSRF.search(form.text).group(1)
        browser.post(f"{base}/console/sign-in", data={"token": OPS, "csrf": csrf}, timeout=10)
        csrf = CSRF.search(browser.get(f"{base}/console/", params={"q": REY}, timeout=10).text).group(1)
        shown = browser.get(f"{base}/console/conversation", params={"from": REY, "to": OURS}, timeout=10)
        assert shown.status_code == 200
        assert REY in shown.text
        ended = browser.post(
            f"{base}/console/conversation/end", timeout=10, data={"from": REY, "to": OURS, "csrf": csrf}
        )
        assert ended.status_code == 200
        assert ended.url.endswith("/console/?ended=1")
    lines = [record.getMessage() for record in caplog.records]
    assert any("GET /console/conversation HTTP/1.1" in line for line in lines)
    assert any("+1555***0001 ended by an operator" in line for line in lines)
    for line in lines:
        assert REY[1:] not in line, line
        assert OURS[1:] not in line, line


def test_redis_down_is_503_and_the_page_stays_protected():
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT=0.2, OPS_TOKEN=OPS)
    client = app.test_client()
    form = client.get("/console/sign-in")  # signing in needs no Redis
    assert client.post("/console/sign-in", data={"token": OPS, "csrf": csrf_of(form)}).status_code == 303
    response = client.get("/console/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"
