"""The Twilio stand-in, served on a real socket and driven through twilio-python's own
``Client`` (pointed at it by service/delivery.py): Twilio's shapes, auth, paging, status
callbacks signed as Twilio signs them, and the faults a test can ask for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import requests
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from service.delivery import client
from service.twilio_standin import DEV_ACCOUNT_SID
from tests.support import ROOT
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
    StandinServer,
)
from tests.support.waiting import wait_until

SID = re.compile(r"^(SM|MM)[0-9a-f]{32}$")


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


@pytest.fixture
def twilio(standin) -> Client:
    return client(standin.config())


@pytest.fixture
def callbacks():
    with CallbackReceiver() as receiver:
        yield receiver


def statuses(receiver: CallbackReceiver, sid: str, count: int) -> list[str]:
    wait_until(lambda: len(receiver.about(sid)) >= count, 10, f"{count} callbacks")
    return [callback.form["MessageStatus"] for callback in receiver.about(sid)]


def test_create_answers_twilios_message_resource_and_fetch_finds_it(twilio):
    before = datetime.now(UTC).replace(microsecond=0)
    message = twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="Hello there")
    assert SID.match(message.sid)
    assert message.sid.startswith("SM")
    assert (message.account_sid, message.to, message.from_, message.body) == (
        ACCOUNT_SID,
        PHONE,
        OUR_NUMBER,
        "Hello there",
    )
    assert message.status == "queued"
    assert message.direction == "outbound-api"
    assert message.num_media == "0"
    assert message.num_segments == "1"
    assert message.error_code is None
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"
    # twilio-python parsed date_created from RFC 2822 into a datetime
    assert before <= message.date_created <= datetime.now(UTC)
    fetched = wait_until(
        lambda: (m := twilio.messages(message.sid).fetch()).status == "delivered" and m, 10, "delivered"
    )
    assert fetched.sid == message.sid
    assert fetched.body == "Hello there"
    assert fetched.date_sent is not None


def test_media_urls_messaging_service_and_content_templates(twilio, standin):
    media = twilio.messages.create(
        to=PHONE, from_=OUR_NUMBER, media_url=["https://example.com/a.png", "https://example.com/b.png"]
    )
    assert media.sid.startswith("MM")
    assert media.num_media == "2"
    service = twilio.messages.create(to=PHONE, messaging_service_sid="MG" + "3" * 32, body="pooled")
    assert service.status == "accepted"
    assert service.from_ is None
    assert service.num_segments == "0"
    template = twilio.messages.create(
        to="whatsapp:" + PHONE,
        from_="whatsapp:" + OUR_NUMBER,
        content_sid="HX" + "4" * 32,
        content_variables=json.dumps({"1": "Ada"}),
    )
    assert template.status == "queued"
    assert "HX" + "4" * 32 in template.body
    wait_until(lambda: len(standin.inbox(PHONE)) == 2, 10, "two delivered")
    [first] = [m for m in standin.inbox(PHONE) if m["sid"] == media.sid]
    assert first["media_urls"] == ["https://example.com/a.png", "https://example.com/b.png"]


@pytest.mark.parametrize(
    "arguments, code",
    [
        ({"to": "12345", "body": "x"}, 21211),
        ({"to": PHONE}, 21602),
        ({"to": PHONE, "body": "x" * 1601}, 21617),
        ({"to": PHONE, "content_sid": "HX" + "4" * 32, "content_variables": "not json"}, 21656),
    ],
    ids=["invalid-to", "no-body", "too-long", "bad-content-variables"],
)
def test_invalid_creates_get_twilios_error_body(twilio, standin, arguments, code):
    with pytest.raises(TwilioRestException) as refused:
        twilio.messages.create(from_=OUR_NUMBER, **arguments)
    assert (refused.value.status, refused.value.code) == (400, code)
    assert standin.inbox() == []


def test_error_bodies_have_twilios_fields(standin):
    response = requests.post(
        f"{standin.base}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        data={"To": PHONE},
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json() == {
        "code": 21603,
        "message": "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
        "more_info": "https://www.twilio.com/docs/errors/21603",
        "status": 400,
    }
    missing = requests.get(standin.base + "/nowhere", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["code"] == 20404


def test_fetching_an_unknown_message_is_twilios_404(twilio):
    with pytest.raises(TwilioRestException) as missing:
        twilio.messages("SM" + "0" * 32).fetch()
    assert (missing.value.status, missing.value.code) == (404, 20404)


def test_the_list_filters_and_pages_as_twilio_does(twilio):
    other = FINN
    sent = [twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body=f"m{i}").sid for i in range(5)]
    twilio.messages.create(to=other, from_=OUR_NUMBER, body="else")
    twilio.messages.create(to=PHONE, from_=OTHER, body="from elsewhere")
    # page_size 2: three pages, the library following next_page_uri through the stand-in
    listed = [m.sid for m in twilio.messages.stream(to=PHONE, from_=OUR_NUMBER, page_size=2)]
    assert listed == list(reversed(sent))  # newest first
    page = twilio.messages.page(to=PHONE, page_size=2)
    assert page._payload["next_page_uri"].startswith(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?")
    assert page._payload["page_size"] == 2
    assert page._payload["previous_page_uri"] is None
    today, day = datetime.now(UTC), timedelta(days=1)
    assert len(twilio.messages.list(to=PHONE, date_sent=today.date())) == 6
    assert twilio.messages.list(to=PHONE, date_sent_after=today + day) == []
    assert twilio.messages.list(to=PHONE, date_sent_before=today - day) == []
    assert len(twilio.messages.list(date_sent_after=today - timedelta(minutes=5))) == 7


def test_basic_auth_takes_the_token_or_an_api_key(standin):
    for username, password in ((ACCOUNT_SID, AUTH_TOKEN), (API_KEY, API_SECRET)):
        twilio = client(
            standin.config(
                TWILIO_API_KEY=username if username == API_KEY else None,
                TWILIO_API_SECRET=password if username == API_KEY else None,
            )
        )
        assert twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="hi").status == "queued"
    assert len(standin.inbox()) == 2


@pytest.mark.parametrize(
    "username, password, account",
    [
        (ACCOUNT_SID, "wrong-token", ACCOUNT_SID),
        (API_KEY, "wrong-secret", ACCOUNT_SID),
        ("SK" + "9" * 32, API_SECRET, ACCOUNT_SID),
        (ACCOUNT_SID, AUTH_TOKEN, "AC" + "8" * 32),  # another account's path
        (API_SECRET, AUTH_TOKEN, ACCOUNT_SID),
    ],
    ids=["wrong-token", "wrong-secret", "unknown-key", "other-account", "nonsense"],
)
def test_other_credentials_are_refused_with_twilios_401(standin, username, password, account):
    twilio = Client(username, password, account_sid=account, http_client=client(standin.config()).http_client)
    with pytest.raises(TwilioRestException) as refused:
        twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="hi")
    assert (refused.value.status, refused.value.code) == (401, 20003)
    assert standin.inbox() == []


def test_no_credentials_at_all_is_a_401_with_the_challenge(standin):
    response = requests.get(f"{standin.base}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", timeout=5)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="Twilio API"'
    assert response.json()["code"] == 20003
    assert response.json()["more_info"].endswith("/20003")


def test_status_callbacks_are_posted_in_order_and_signed_like_twilios(twilio, callbacks):
    url = callbacks.url + "?m=outbound-1"
    message = twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="tracked", status_callback=url)
    assert statuses(callbacks, message.sid, 3) == ["queued", "sent", "delivered"]
    validator, impostor = RequestValidator(AUTH_TOKEN), RequestValidator("another-token")
    for callback in callbacks.about(message.sid):
        assert callback.url == url
        assert validator.validate(callback.url, callback.form, callback.signature)
        assert not impostor.validate(callback.url, callback.form, callback.signature)
        assert callback.form["AccountSid"] == ACCOUNT_SID
        assert callback.form["SmsSid"] == message.sid
        assert (callback.form["From"], callback.form["To"]) == (OUR_NUMBER, PHONE)
        assert "ErrorCode" not in callback.form


def test_callbacks_arrive_in_reverse_order_when_asked(twilio, standin, callbacks):
    standin.fault(to=PHONE, count=1, callbacks="reversed")
    reversed_ = twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="a", status_callback=callbacks.url)
    ordered = twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="b", status_callback=callbacks.url)
    assert statuses(callbacks, reversed_.sid, 3) == ["delivered", "sent", "queued"]
    assert statuses(callbacks, ordered.sid, 3) == ["queued", "sent", "delivered"]


def test_a_delivery_failure_arrives_with_its_error_code(twilio, standin, callbacks):
    standin.fault(to=PHONE, fail=30003)
    message = twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="lost", status_callback=callbacks.url)
    assert statuses(callbacks, message.sid, 3) == ["queued", "sent", "undelivered"]
    assert callbacks.about(message.sid)[-1].form["ErrorCode"] == "30003"
    fetched = twilio.messages(message.sid).fetch()
    assert (fetched.status, fetched.error_code) == ("undelivered", 30003)
    assert standin.inbox(PHONE) == []  # it never reached the phone


def test_whatsapp_free_form_outside_the_window_fails_with_63016_and_a_template_passes(
    twilio, standin, callbacks
):
    to, sender = "whatsapp:" + PHONE, "whatsapp:" + OUR_NUMBER
    standin.fault(to=to, window_closed=True)
    free_form = twilio.messages.create(to=to, from_=sender, body="hi", status_callback=callbacks.url)
    template = twilio.messages.create(
        to=to, from_=sender, content_sid="HX" + "4" * 32, status_callback=callbacks.url
    )
    assert statuses(callbacks, free_form.sid, 2) == ["queued", "failed"]
    assert callbacks.about(free_form.sid)[-1].form["ErrorCode"] == "63016"
    assert statuses(callbacks, template.sid, 3) == ["queued", "sent", "delivered"]
    assert [m["sid"] for m in standin.inbox(to)] == [template.sid]


def test_twilios_magic_numbers_are_refused(twilio):
    for number, code in (("+15005550001", 21211), ("+15005550004", 21610)):
        with pytest.raises(TwilioRestException) as refused:
            twilio.messages.create(to=number, from_=OUR_NUMBER, body="x")
        assert refused.value.code == code


def test_fault_rules_apply_to_their_number_for_their_count_then_lapse(twilio, standin):
    other = FINN
    standin.fault(to=PHONE, count=2, answer=503)
    standin.fault(to=other, error=21608)
    assert [f["to"] for f in standin.control.get(standin.base + "/_standin/faults").json()] == [PHONE, other]
    for _ in range(2):
        with pytest.raises(TwilioRestException) as refused:
            twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="x")
        assert (refused.value.status, refused.value.code) == (503, 20500)
    assert twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="x").status == "queued"
    with pytest.raises(TwilioRestException) as unverified:
        twilio.messages.create(to=other, from_=OUR_NUMBER, body="x")
    assert unverified.value.code == 21608
    assert other in unverified.value.msg  # without count: stays
    assert standin.control.delete(standin.base + "/_standin/faults").status_code == 204
    assert twilio.messages.create(to=other, from_=OUR_NUMBER, body="x").status == "queued"


@pytest.mark.parametrize(
    "rule",
    [
        {"answer": 418},
        {"error": 12345},
        {"answer": 429, "error": 21610},
        {},
        {"delay": -1},
        {"fail": 30003, "count": 0},
        {"lose_answer": True, "speed": 3},
        [1, 2],
    ],
)
def test_a_malformed_fault_is_a_400_with_its_reason(standin, rule):
    response = standin.control.post(standin.base + "/_standin/faults", json=rule)
    assert response.status_code == 400
    assert response.json()["error"]
    assert standin.control.get(standin.base + "/_standin/faults").json() == []


def test_reset_forgets_messages_and_faults(twilio, standin):
    twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="x")
    standin.fault(answer=429)
    assert standin.control.post(standin.base + "/_standin/reset").status_code == 204
    assert standin.inbox() == []
    assert twilio.messages.list() == []
    assert twilio.messages.create(to=PHONE, from_=OUR_NUMBER, body="x").status == "queued"


@pytest.mark.slow
def test_it_runs_as_a_module_and_masks_numbers_in_its_log(tmp_path):
    port = free_port()
    log = (tmp_path / "standin.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.twilio_standin", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(base + "/_standin/messages", timeout=1).ok, 30, "the stand-in")
        answer = requests.post(
            f"{base}/2010-04-01/Accounts/{DEV_ACCOUNT_SID}/Messages.json",
            data={"To": PHONE, "From": OUR_NUMBER, "Body": "hi"},
            auth=(DEV_ACCOUNT_SID, "dev-auth-token"),
            timeout=5,
        )
        assert answer.status_code == 201
        requests.get(f"{base}/2010-04-01/Accounts/{DEV_ACCOUNT_SID}/Messages.json", params={"To": PHONE})
    finally:
        process.terminate()
        process.wait(timeout=10)
    output = (tmp_path / "standin.log").read_text()
    assert f"TWILIO_API_BASE_URL=http://127.0.0.1:{port}" in output
    assert "Messages.json" in output
    assert PHONE not in output
    assert PHONE[1:] not in output
