"""The delivery client (service/delivery.py) against the Twilio stand-in on a real socket,
through twilio-python's real ``Client``: every answer classified, lost answers found again,
and the settings that build it."""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from twilio.http.http_client import TwilioHttpClient

from service import create_app
from service.delivery import (
    Accepted,
    Delivery,
    Permanent,
    RedirectedHttpClient,
    RetryLater,
    backoff,
    callback_url,
    classify,
    client,
    failure,
)
from service.settings import ConfigError, check, load
from tests.support.app import TOKEN
from tests.support.app_servers import sms_sessions
from tests.support.numbers import FINN, OTHER
from tests.support.ports import free_port
from tests.support.standin import (
    ACCOUNT_SID,
    API_KEY,
    API_SECRET,
    AUTH_TOKEN,
    OUR_NUMBER,
    PHONE,
    CallbackReceiver,
)
from tests.support.waiting import wait_until


@pytest.fixture
def delivery(standin) -> Delivery:
    return Delivery.from_config(standin.config())


def stored(standin, to: str = PHONE) -> list[dict]:
    return [m for m in standin.inbox() if m["to"] == to]


def test_an_accepted_message_has_twilios_sid_and_status(delivery, standin):
    outcome = delivery.send(PHONE, "Your table is ready")
    assert isinstance(outcome, Accepted)
    assert re.fullmatch(r"SM[0-9a-f]{32}", outcome.sid)
    assert outcome.status == "queued"
    [message] = stored(standin)
    assert (message["sid"], message["from"], message["body"]) == (
        outcome.sid,
        OUR_NUMBER,
        "Your table is ready",
    )


def test_a_message_names_its_own_sender_or_goes_through_the_messaging_service(standin):
    delivery = Delivery.from_config(standin.config())
    assert isinstance(delivery.send(PHONE, "a", from_=OTHER), Accepted)
    pooled = Delivery.from_config(standin.config(TWILIO_MESSAGING_SERVICE_SID="MG" + "3" * 32))
    outcome = pooled.send(PHONE, "b")
    assert isinstance(outcome, Accepted)
    assert outcome.status == "queued"  # From given: no pool pick
    pooled_only = Delivery.from_config(
        standin.config(TWILIO_MESSAGING_SERVICE_SID="MG" + "3" * 32, TWILIO_FROM_NUMBER=None)
    )
    outcome = pooled_only.send(PHONE, "c")
    assert isinstance(outcome, Accepted)
    assert outcome.status == "accepted"  # the pool picks
    senders = [m["from"] for m in stored(standin)]
    assert senders[:2] == [OTHER, OUR_NUMBER]
    assert senders[2] == "MG" + "3" * 32


@pytest.mark.parametrize(
    "to, body, fault, code",
    [
        ("12345", "x", None, 21211),
        ("+15005550001", "x", None, 21211),
        ("+15005550004", "x", None, 21610),
        (PHONE, "x", {"error": 21610}, 21610),
        (PHONE, "x", {"error": 21608}, 21608),
        (PHONE, "", None, 21602),
    ],
    ids=["invalid-to", "magic-invalid", "magic-opted-out", "opted-out", "unverified-trial", "no-body"],
)
def test_each_permanent_refusal_is_classified_with_its_code(delivery, standin, to, body, fault, code):
    if fault:
        standin.fault(to=to, **fault)
    outcome = delivery.send(to, body)
    assert isinstance(outcome, Permanent)
    assert outcome.code == code
    assert outcome.message
    assert not outcome.message.startswith("Unable to")  # Twilio's own words
    assert standin.inbox() == []


def test_no_sender_at_all_is_twilios_21603(standin):
    delivery = Delivery.from_config(standin.config(TWILIO_FROM_NUMBER=None))
    assert delivery.send(PHONE, "x") == Permanent(
        21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message."
    )


def test_63016_arrives_after_acceptance_and_reads_as_a_permanent_failure(delivery, standin):
    to = "whatsapp:" + PHONE
    standin.fault(to=to, window_closed=True)
    with CallbackReceiver() as callbacks:
        outcome = delivery.send(
            to, "free form", from_="whatsapp:" + OUR_NUMBER, status_callback=callbacks.url
        )
        assert isinstance(outcome, Accepted)  # Twilio takes it, then fails it
        wait_until(lambda: len(callbacks.about(outcome.sid)) == 2, 10, "the failure's callback")
        last = callbacks.about(outcome.sid)[-1].form
    assert failure(last["MessageStatus"], last.get("ErrorCode")) == Permanent(63016, "failed")
    fetched = delivery.twilio.messages(outcome.sid).fetch()
    assert failure(fetched.status, fetched.error_code, fetched.error_message).code == 63016


def test_failure_reads_only_final_failures():
    for status in ("queued", "accepted", "sent", "delivered", "read"):
        assert failure(status, None) is None
    assert failure("undelivered", "30003", "Unreachable destination handset") == Permanent(
        30003, "Unreachable destination handset"
    )
    assert failure("failed", "") == Permanent(None, "failed")


def test_429_is_retried_later_then_the_message_goes(delivery, standin):
    standin.fault(count=2, answer=429)
    for _ in range(2):
        assert delivery.send(PHONE, "busy") == RetryLater("HTTP 429", 20429, maybe_accepted=False)
    assert stored(standin) == []
    assert isinstance(delivery.send(PHONE, "busy"), Accepted)
    assert len(stored(standin)) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retried_later_and_may_have_been_stored(delivery, standin, status):
    standin.fault(count=1, answer=status)
    assert delivery.send(PHONE, "x") == RetryLater(f"HTTP {status}", 20500, maybe_accepted=True)
    assert isinstance(delivery.send(PHONE, "x"), Accepted)


def test_a_refused_credential_waits_for_the_operator(standin):
    delivery = Delivery.from_config(standin.config(TWILIO_AUTH_TOKEN="not-the-token"))
    assert delivery.send(PHONE, "x") == RetryLater("credentials refused", 20003)
    assert standin.inbox() == []


def test_an_api_key_sends_for_the_account(standin):
    delivery = Delivery.from_config(standin.config(TWILIO_API_KEY=API_KEY, TWILIO_API_SECRET=API_SECRET))
    assert delivery.twilio.username == API_KEY
    assert delivery.twilio.account_sid == ACCOUNT_SID
    assert isinstance(delivery.send(PHONE, "x"), Accepted)


def test_a_rotating_token_list_sends_with_its_primary(standin):
    """The REST API takes one token: the primary of ``TWILIO_AUTH_TOKEN``'s list, not the list."""
    delivery = Delivery.from_config(standin.config(TWILIO_AUTH_TOKEN=f"{AUTH_TOKEN},an-old-token"))
    assert delivery.twilio.password == AUTH_TOKEN
    assert isinstance(delivery.send(PHONE, "x"), Accepted)


def test_an_account_listed_in_twilio_accounts_sends_with_its_primary_token(standin):
    listed = json.dumps({ACCOUNT_SID: {"auth_tokens": [AUTH_TOKEN, "an-old-token"]}})
    delivery = Delivery.from_config(standin.config(TWILIO_AUTH_TOKEN=None, TWILIO_ACCOUNTS=listed))
    assert delivery.twilio.password == AUTH_TOKEN
    assert isinstance(delivery.send(PHONE, "x"), Accepted)


def test_a_lost_answer_is_retried_and_find_sent_finds_the_stored_message(delivery, standin):
    since = datetime.now(UTC)
    delivery.send(PHONE, "earlier, same number")
    standin.fault(count=1, lose_answer=True)
    outcome = delivery.send(PHONE, "Your code is 1234")
    assert isinstance(outcome, RetryLater)
    assert outcome.maybe_accepted
    assert outcome.code is None
    [held] = [m for m in stored(standin) if m["body"] == "Your code is 1234"]  # Twilio has it
    found = delivery.find_sent(PHONE, "Your code is 1234", since)
    assert isinstance(found, Accepted)
    assert found.sid == held["sid"]
    assert delivery.find_sent(PHONE, "Your code is 1234", since, exclude=[held["sid"]]) is None
    assert delivery.find_sent(PHONE, "never sent", since) is None
    assert delivery.find_sent(FINN, "Your code is 1234", since) is None
    # created before the window (beyond the clock skew allowed): not this attempt's
    assert delivery.find_sent(PHONE, "Your code is 1234", since + timedelta(minutes=5)) is None


def test_a_refused_create_leaves_nothing_for_find_sent(delivery, standin):
    since = datetime.now(UTC)
    standin.fault(count=1, answer=503)
    assert delivery.send(PHONE, "x").maybe_accepted
    assert delivery.find_sent(PHONE, "x", since) is None


def test_the_callback_marker_names_the_message_whose_answer_was_lost(delivery, standin):
    standin.fault(count=1, lose_answer=True)
    with CallbackReceiver() as callbacks:
        url = callback_url(callbacks.url + "?tenant=a", "outbound-42")
        assert url == callbacks.url + "?tenant=a&m=outbound-42"
        assert isinstance(delivery.send(PHONE, "x", status_callback=url), RetryLater)
        wait_until(lambda: len(callbacks.received) == 3, 10, "three callbacks")
        [held] = stored(standin)
        assert {c.url for c in callbacks.received} == {url}
        assert {c.form["MessageSid"] for c in callbacks.received} == {held["sid"]}


def test_a_slow_answer_times_out_into_a_maybe_accepted_retry(standin):
    delivery = Delivery.from_config(standin.config(TWILIO_API_TIMEOUT="0.5"))
    standin.fault(count=1, delay=2)
    outcome = delivery.send(PHONE, "slow")
    assert outcome == RetryLater("ReadTimeout", maybe_accepted=True)
    wait_until(lambda: stored(standin), 10, "the slow message stored")


def test_nothing_listening_is_retried_and_cannot_have_been_stored():
    config = load(
        {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM_NUMBER": OUR_NUMBER,
            "TWILIO_API_BASE_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    delivery = Delivery.from_config(config)
    assert delivery.send(PHONE, "x") == RetryLater("ConnectionError", maybe_accepted=False)
    assert delivery.find_sent(PHONE, "x", datetime.now(UTC)) == RetryLater("ConnectionError")


def test_regional_hosts_are_redirected_too(standin, monkeypatch):
    """twilio-python rewrites api.twilio.com for TWILIO_REGION/TWILIO_EDGE before the HTTP
    client sees it; the base URL still wins."""
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    assert isinstance(Delivery.from_config(standin.config()).send(PHONE, "x"), Accepted)


def test_without_a_base_url_the_client_is_twilios_own():
    config = load({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN})
    http = client(config).http_client
    assert type(http) is TwilioHttpClient
    assert http.timeout == 10.0


def test_a_client_needs_an_account_and_a_credential():
    with pytest.raises(ConfigError, match=r"^TWILIO_ACCOUNT_SID is not set"):
        client(load({"TWILIO_AUTH_TOKEN": AUTH_TOKEN}))
    with pytest.raises(ConfigError, match=r"^no auth token for TWILIO_ACCOUNT_SID"):
        client(load({"TWILIO_ACCOUNT_SID": ACCOUNT_SID}))


def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter_in_its_upper_half():
    assert [backoff(n, 0.0, 1.0, 300.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff(n, 0.999999, 1.0, 300.0) for n in (1, 2, 3)] == pytest.approx([1.0, 2.0, 4.0], rel=1e-5)
    assert backoff(9, 0.5, 1.0, 300.0) == pytest.approx(192.0)  # 256 s ceiling
    assert backoff(10, 0.0, 1.0, 300.0) == 150.0
    assert backoff(10_000, 0.999999, 1.0, 300.0) <= 300.0
    assert backoff(0, 0.0, 2.0, 300.0) == 1.0  # attempts count from 1
    delivery = Delivery(
        client(load({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": "t"})), None, None, 2, 8
    )
    assert all(1.0 <= delivery.retry_delay(1) < 2.0 for _ in range(100))
    assert all(4.0 <= delivery.retry_delay(6) < 8.0 for _ in range(100))


def test_classify_sorts_twilios_answers():
    assert classify(429, 20429, "Too Many Requests") == RetryLater("HTTP 429", 20429)
    assert classify(502, None, "Bad Gateway").maybe_accepted
    assert classify(401, 20003, "Authenticate") == RetryLater("credentials refused", 20003)
    assert classify(400, 21610, "Attempt to send to unsubscribed recipient") == Permanent(
        21610, "Attempt to send to unsubscribed recipient"
    )
    assert classify(404, 20404, "not found") == Permanent(20404, "not found")


def test_the_redirect_keeps_a_base_path():
    http = RedirectedHttpClient("http://127.0.0.1:1/prefix/", 1.0)
    seen = []
    http.session.send = lambda prepared, **kwargs: seen.append(prepared.url) or _raise()
    with pytest.raises(LookupError):
        http.request("GET", "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json")
    assert seen == ["http://127.0.0.1:1/prefix/2010-04-01/Accounts/AC1/Messages.json"]


def _raise():
    raise LookupError


# -- settings ------------------------------------------------------------------------------

PRODUCTION = {"APP_ENV": "production", "TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": "redis://127.0.0.1:1/0"}


def test_the_base_url_is_refused_in_production():
    check(load(PRODUCTION))  # the rest of it passes
    with pytest.raises(ConfigError) as refused:
        check(load({**PRODUCTION, "TWILIO_API_BASE_URL": "http://127.0.0.1:8765"}))
    assert str(refused.value).startswith("TWILIO_API_BASE_URL is set")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="^TWILIO_API_BASE_URL"):
        create_app({**PRODUCTION, "TWILIO_API_BASE_URL": "http://127.0.0.1:8765"})


@pytest.mark.slow
def test_the_cli_refuses_the_base_url_in_production_in_one_line():
    result = sms_sessions("conversations", "count", **PRODUCTION, TWILIO_API_BASE_URL="http://127.0.0.1:8765")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "sms-sessions: refusing to start: TWILIO_API_BASE_URL is set: APP_ENV=production sends "
        "through Twilio's own API, not a stand-in"
    ]


@pytest.mark.parametrize(
    "environment, named",
    [
        ({"TWILIO_ACCOUNT_SID": "AC123"}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_API_KEY": "AC" + "1" * 32, "TWILIO_API_SECRET": "s"}, "TWILIO_API_KEY"),
        ({"TWILIO_MESSAGING_SERVICE_SID": "SK" + "1" * 32}, "TWILIO_MESSAGING_SERVICE_SID"),
        ({"TWILIO_FROM_NUMBER": "5550001111"}, "TWILIO_FROM_NUMBER"),
        ({"TWILIO_API_BASE_URL": "127.0.0.1:8765"}, "TWILIO_API_BASE_URL"),
        ({"TWILIO_API_BASE_URL": "http://127.0.0.1:99999"}, "TWILIO_API_BASE_URL"),
        ({"TWILIO_API_BASE_URL": "http://h/?x=1"}, "TWILIO_API_BASE_URL"),
        ({"TWILIO_API_TIMEOUT": "0.1"}, "TWILIO_API_TIMEOUT"),
        ({"TWILIO_API_TIMEOUT": "61"}, "TWILIO_API_TIMEOUT"),
        ({"DELIVERY_RETRY_BASE": "0.05"}, "DELIVERY_RETRY_BASE"),
        ({"DELIVERY_RETRY_MAX": "3601"}, "DELIVERY_RETRY_MAX"),
        ({"DELIVERY_RETRY_BASE": "30", "DELIVERY_RETRY_MAX": "10"}, "DELIVERY_RETRY_BASE"),
        ({"TWILIO_API_KEY": API_KEY, "TWILIO_ACCOUNT_SID": ACCOUNT_SID}, "TWILIO_API_KEY"),
        ({"TWILIO_API_SECRET": "s", "TWILIO_ACCOUNT_SID": ACCOUNT_SID}, "TWILIO_API_SECRET"),
        ({"TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "s"}, "TWILIO_API_KEY"),
    ],
)
def test_malformed_or_mismatched_outbound_settings_are_refused_naming_the_variable(environment, named):
    with pytest.raises(ConfigError) as refused:
        load(environment)
    assert re.match(rf"{named}[ =:]", str(refused.value))
    assert "\n" not in str(refused.value)


def test_the_edges_of_the_outbound_ranges_are_accepted():
    config = load(
        {
            "TWILIO_API_TIMEOUT": "0.5",
            "DELIVERY_RETRY_BASE": "0.1",
            "DELIVERY_RETRY_MAX": "3600",
            "TWILIO_API_BASE_URL": "https://standin.example:8443/twilio/",
            "TWILIO_FROM_NUMBER": "whatsapp:+15550001111",
        }
    )
    assert config["TWILIO_API_BASE_URL"] == "https://standin.example:8443/twilio"
    assert load({"TWILIO_API_TIMEOUT": "60", "DELIVERY_RETRY_BASE": "60", "DELIVERY_RETRY_MAX": "60"})


def test_each_sender_thread_keeps_its_connection(standin, caplog):
    """As many connections stay open as the sender has threads (``SENDER_THREADS``): with
    every thread's create in flight at once, none is opened only to be closed after its
    answer (urllib3 says so when its pool is full), which against Twilio would be a TLS
    handshake per message."""
    threads = 14  # over twilio's HTTPS pool (cpu_count + 4) and requests' HTTP pool (10) here
    delivery = Delivery.from_config(standin.config(SENDER_THREADS=str(threads)))
    standin.fault(delay=0.3)
    start = threading.Barrier(threads)

    def send(n: int):
        start.wait()
        return delivery.send(PHONE, f"at once {n}")

    with (
        caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"),
        ThreadPoolExecutor(threads) as pool,
    ):
        outcomes = list(pool.map(send, range(threads)))
    assert all(isinstance(outcome, Accepted) for outcome in outcomes)
    assert "Connection pool is full" not in caplog.text


def test_the_environments_proxy_is_read_once_and_used(monkeypatch):
    """requests reads HTTPS_PROXY and the like on every request (two scans of the whole
    environment each); the client takes them once, at start, and sends through them."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    config = load({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN})
    session = client(config).http_client.session
    monkeypatch.delenv("HTTPS_PROXY")
    assert not session.trust_env
    used = session.merge_environment_settings("https://api.twilio.com/2010-04-01", {}, None, None, None)
    assert used["proxies"]["https"] == "http://proxy.example:3128"
