"""Logs: one JSON line per webhook request, with masked numbers and never a body or the token."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from urllib.parse import urlencode

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from service import create_app, logs
from service.logs import LineFormatter, json_line
from service.metrics import Outcome
from service.settings import ConfigError, load
from tests.support.app import TOKEN, make_app, post_signed, sign, webhook_params
from tests.support.numbers import OURS, REY

MASKED = ("+1555***0001", "+1555***1111")
BODY = "my secret is " + secrets.token_hex(4)
# The webhook's line in the text format (LOG_FORMAT=text), every number masked.
TEXT_LINE = (
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO service\.webhook: webhook replied "
    r"method=POST remote=127\.0\.0\.1 message_sid=SM\w+ from=\+1555\*\*\*0001 "
    r"to=\+1555\*\*\*1111 outcome=replied status=200 latency_ms=[\d.]+"
)


@pytest.fixture
def lines(caplog):
    """The JSON lines logged (by the service, or ``logger``) since the last call."""
    caplog.set_level(logging.INFO)
    formatter = LineFormatter(json_line)

    def take(logger="service"):
        taken = [formatter.format(r) for r in caplog.records if r.name.startswith(logger)]
        caplog.clear()
        return taken

    return take


def requests_of_every_outcome(client):
    """(outcome, masked From and To, send) for each kind of webhook request, all with number
    and body. A body over MAX_BODY_BYTES is never read, so its line has no numbers."""
    replied = webhook_params(REY, OURS, BODY)
    get_url = "http://localhost/sms?" + urlencode(webhook_params(REY, OURS, BODY))
    no_to = webhook_params(REY, OURS, BODY)
    del no_to["To"]
    return [
        (Outcome.REPLIED, MASKED, lambda: post_signed(client, replied)),
        (Outcome.DUPLICATE, MASKED, lambda: post_signed(client, replied)),
        (
            Outcome.REPLIED,
            MASKED,
            lambda: client.get(get_url, headers={"X-Twilio-Signature": sign(get_url, {})}),
        ),
        (
            Outcome.REJECTED_SIGNATURE,
            MASKED,
            lambda: client.post("/sms", data=replied, headers={"X-Twilio-Signature": "x"}),
        ),
        (Outcome.BAD_REQUEST, ("+1555***0001", "***"), lambda: post_signed(client, no_to)),
        (
            Outcome.BAD_REQUEST,
            (None, None),
            lambda: post_signed(client, webhook_params(REY, OURS, BODY * 5000)),
        ),
    ]


def assert_clean(line: str) -> None:
    for secret in (REY, OURS, REY[1:], OURS[1:], BODY, TOKEN):
        assert secret not in line


def test_one_json_line_per_webhook_request(app, lines):
    client = app.test_client()
    lines()
    for expected, masked, send in requests_of_every_outcome(client):
        send()
        taken = lines()
        assert len(taken) == 1, taken
        line = json.loads(taken[0])
        assert_clean(taken[0])
        assert line["outcome"] == expected
        assert line["logger"] == "service.webhook"
        assert line["level"] == "info"
        assert (line.get("from"), line.get("to")) == masked
        assert isinstance(line["status"], int)
        assert isinstance(line["latency_ms"], float)


@pytest.fixture
def direct(monkeypatch, capsys):
    """``with direct() as take``: the service's handler alone on the root logger, as under
    gunicorn (pytest's capturing handlers, added for the test's call, set aside meanwhile), so
    that the webhook writes its line itself: no LogRecord may be made for it. ``take()``: the
    lines written to stdout since the last call."""
    made = logging.Logger.makeRecord

    def no_record(self, name, *args, **kwargs):
        assert name != "service.webhook", "the webhook's line went through logging"
        return made(self, name, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "makeRecord", no_record)

    @contextlib.contextmanager
    def alone():
        root = logging.getLogger()
        kept = root.handlers[:]
        root.handlers[:] = [h for h in kept if type(h) is logs._Handler]
        capsys.readouterr()
        try:
            yield lambda: capsys.readouterr().out.splitlines()
        finally:
            root.handlers[:] = kept

    return alone


def test_direct_lines_are_the_same_lines(redis_url, direct):
    """Written without a record, the webhook's line is still one per request, with the same
    fields, masking and form as the formatter's."""
    client = make_app(REDIS_URL=redis_url).test_client()
    with direct() as take:
        for expected, masked, send in requests_of_every_outcome(client):
            send()
            taken = take()
            assert len(taken) == 1, taken
            assert_clean(taken[0])
            line = json.loads(taken[0])
            assert line["outcome"] == expected
            assert line["logger"] == "service.webhook"
            assert (line.get("from"), line.get("to")) == masked
            assert isinstance(line["status"], int)
            assert isinstance(line["latency_ms"], float)
            record = logging.makeLogRecord({"name": "service.webhook", "levelname": "INFO"})
            fields = {k: v for k, v in line.items() if k not in ("time", "level", "logger", "message")}
            record.msg, record.fields = line["message"], fields
            assert taken[0].partition(",")[2] == LineFormatter(json_line).format(record).partition(",")[2]


def test_direct_lines_mask_numbers_in_any_field(redis_url, direct):
    """A forged request may put a number where none is expected (its MessageSid)."""
    client = make_app(REDIS_URL=redis_url).test_client()
    params = webhook_params(REY, OURS, BODY, message_sid=OURS)
    with direct() as take:
        client.post("/sms", data=params, headers={"X-Twilio-Signature": "x"})
        [taken] = take()
    assert_clean(taken)
    assert json.loads(taken)["message_sid"] == MASKED[1]


def test_direct_text_lines(redis_url, direct):
    client = make_app(REDIS_URL=redis_url, LOG_FORMAT="text").test_client()
    with direct() as take:
        post_signed(client, webhook_params(REY, OURS, BODY))
        [line] = take()
    assert re.fullmatch(TEXT_LINE, line), line


def test_a_line_s_time(monkeypatch):
    """Written once a second, the time is still isoformat's, to the millisecond."""
    for moment in (0.0, 1764160941.9066, 1764160941.0004, 1764160942.9999):
        record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "m"})
        record.created = moment
        expected = logs.datetime.fromtimestamp(int(moment * 1000) / 1000, logs.UTC)
        assert json.loads(LineFormatter(json_line).format(record))["time"] == expected.isoformat(
            timespec="milliseconds"
        )


TEXT = st.text(alphabet=st.sampled_from("0123456789+%2Bb_a \x1b[m٣.*"), max_size=40)


@given(message=TEXT, values=st.lists(TEXT, max_size=4))
def test_a_line_skips_scrubbing_only_when_scrubbing_changes_nothing(message, values):
    """``_clean``'s shortcuts give what scrubbing every field gives (digits of any script,
    numbers at a field's edges, colours)."""
    fields = {f"f{n}": value for n, value in enumerate(values)} | {"n": 12345678}
    assert logs._clean(message, fields) == (
        logs.scrub(message),
        {key: logs._scrubbed(value) for key, value in fields.items()},
    )


def test_refusals_and_failures_say_why_in_the_same_line(lines):
    client = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client()  # nothing listens there
    lines()
    client.post("/sms", data=webhook_params(REY, OURS, BODY), headers={"X-Twilio-Signature": "x"})
    assert json.loads(lines()[0])["reason"] == "invalid or missing Twilio signature"
    post_signed(client, webhook_params(REY, OURS, BODY))
    taken = lines()
    assert len(taken) == 1
    assert_clean(taken[0])
    line = json.loads(taken[0])
    assert (line["outcome"], line["status"], line["reason"]) == (
        "unavailable",
        503,
        "Redis unavailable: ConnectionError",
    )


def test_stale_cookie_is_noted_in_the_line(app, lines):
    client = app.test_client(use_cookies=False)  # the cookie sent is the test's, not a jar's
    post_signed(client, webhook_params(REY, OURS, BODY))
    lines()
    post_signed(client, webhook_params(REY, OURS, BODY), cookie="not-the-session-id")
    taken = lines()
    assert len(taken) == 1
    assert json.loads(taken[0])["cookie"] == "not this conversation's; ignored"


def test_dev_server_request_lines_carry_no_query(live_server, lines):
    """``make run``'s werkzeug logs each request line; a query may hold numbers and bodies."""
    base = live_server.url.removesuffix("/sms")
    lines()
    assert requests.get(f"{base}/healthz?" + urlencode(webhook_params(REY, OURS, BODY)), timeout=10).ok
    [request_line] = lines("werkzeug")
    assert "GET /healthz HTTP/1.1" in request_line
    assert_clean(request_line)


def test_dev_server_writes_one_line_per_webhook_request(live_server, lines):
    """The webhook's own summary line, without a second, werkzeug line for the same request."""
    url = live_server.url + "?" + urlencode(webhook_params(REY, OURS, BODY))
    lines("")
    assert requests.get(url, headers={"X-Twilio-Signature": sign(url, {})}, timeout=10).status_code == 200
    taken = lines("")
    assert [json.loads(line)["logger"] for line in taken] == ["service.webhook"]


def test_request_lines_mask_the_numbers_in_ops_paths(live_server, lines):
    base = live_server.url.removesuffix("/sms")
    lines()
    requests.get(f"{base}/ops/conversations/{REY}/{OURS.replace('+', '%2B')}", timeout=10)
    [request_line] = lines("werkzeug")
    assert "/ops/conversations/+1555***0001/+1555***1111 HTTP/1.1" in request_line
    assert_clean(request_line)


def test_request_lines_mask_formatted_numbers_in_ops_paths(live_server, lines):
    base = live_server.url.removesuffix("/sms")
    lines()
    requests.get(f"{base}/ops/conversations/+1 415 555 0123/(415)5550123", timeout=10)
    [request_line] = lines("werkzeug")
    assert "/ops/conversations/+1 41***0123/(415)***0123 HTTP/1.1" in request_line
    assert "555" not in request_line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_line_is_masked_whatever_logger_wrote_it(capsys, log_format):
    """Flask's own line for a failed request names its path; a library may log a number."""
    app = make_app(LOG_FORMAT=log_format)

    def fails(number):
        raise KeyError(number)

    app.add_url_rule("/fails/<number>", view_func=fails)
    capsys.readouterr()
    assert app.test_client().get(f"/fails/{REY}").status_code == 500
    logging.getLogger("some.library").warning("calling %s from %s", OURS, REY.replace("+", "%2B"))
    output = capsys.readouterr().out
    assert f"Exception on /fails/{MASKED[0]} [GET]" in output  # Flask's line, with its traceback
    assert f"KeyError: '{MASKED[0]}'" in output
    assert f"calling {MASKED[1]} from {MASKED[0]}" in output
    assert_clean(output)


def test_text_lines_for_a_terminal(capsys):
    client = make_app(LOG_FORMAT="text").test_client()
    capsys.readouterr()
    post_signed(client, webhook_params(REY, OURS, BODY))
    [line] = capsys.readouterr().out.splitlines()
    assert re.fullmatch(TEXT_LINE, line), line


def test_log_format_is_json_or_text():
    with pytest.raises(ConfigError, match=r"^LOG_FORMAT='yaml': must be 'json' or 'text'$"):
        load({"LOG_FORMAT": "yaml"})


def test_a_handler_s_own_logger_still_gets_where_it_logged_from(redis_url):
    """The service changes none of logging's process-wide switches: a record of a bot
    author's logger carries its file, line, function and thread (one of the handlers' threads,
    service/runs.py) for a formatter that asks."""
    bot_log = logging.getLogger("mybot")
    records = []
    recorder = logging.Handler()
    recorder.emit = records.append
    bot_log.addHandler(recorder)

    def handle(message, conversation):
        bot_log.warning("handling")
        return "ok"

    try:
        app = create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}, handler=handle)
        answer = post_signed(app.test_client(), webhook_params())
    finally:
        bot_log.removeHandler(recorder)
    assert answer.status_code == 200, answer.data
    [record] = records
    where = logging.Formatter("%(filename)s:%(funcName)s:%(threadName)s").format(record)
    assert where.startswith("test_logs.py:handle:sms-handler")
    assert record.lineno == handle.__code__.co_firstlineno + 1
