"""Fast unit tests on the embedded store (fakeredis): keys, settings, scripts, simulator."""

from __future__ import annotations

import io

import pytest
from redis.cluster import key_slot

from service.keys import Keys, shard_of
from service.masking import mask
from service.settings import ConfigError, load
from service.simulator import COOKIE_LIFETIME, TwilioSimulator, reply_text
from service.store import Commit, ConversationBusy, ConversationStore, LockLost
from service.wiring import current
from tests.support.app import post_signed, webhook_params
from tests.support.numbers import OURS, REY


def test_all_keys_of_a_conversation_share_one_cluster_slot():
    keys = Keys().conversation("+15551230007", OURS)
    assert shard_of("+15551230007") == "07"
    assert "{07}" in keys.conversation
    assert (
        key_slot(keys.conversation.encode())
        == key_slot(keys.lock.encode())
        == key_slot(keys.index_shard.encode())
    )
    assert Keys().from_member(keys.member) == keys
    assert len(set(Keys().indexes())) == 100


def test_shard_tag_is_digits_only():
    assert shard_of("whatsapp:+447700900123") == "23"
    assert shard_of("+1") == "01"
    assert shard_of("") == "00"
    assert shard_of("7") == "07"  # one digit: padded, as the pattern's path pads it
    assert shard_of("+1555²7") == "57"  # ² is a digit to str.isdigit, not an ASCII one
    assert shard_of("+15551230007 ") == "07"


def test_conversation_keys_are_kept_built_and_follow_the_prefix():
    keys = Keys()
    first = keys.conversation("+15551230007", OURS)
    assert keys.conversation("+15551230007", OURS) is first  # kept: the next message reuses them
    assert keys.conversation("+15551230008", OURS).conversation == "sms:conv:{08}:+15551230008|" + OURS
    assert Keys("other:").conversation("+15551230007", OURS).conversation.startswith("other:conv:{07}:")
    assert first.in_order()[0] == first.conversation and first.in_order()[-1] == first.transcript
    assert len(first.in_order()) == len(first) - 3  # every key; not the sender, recipient, member


def test_settings_defaults_and_bad_values():
    config = load({})
    assert config["CONVERSATION_TTL"] == 14400
    assert config["TWILIO_VALIDATE_SIGNATURE"] is True
    assert load({"CONVERSATION_TTL": "60", "TWILIO_VALIDATE_SIGNATURE": "off"})["CONVERSATION_TTL"] == 60
    with pytest.raises(ConfigError, match="CONVERSATION_TTL"):
        load({"CONVERSATION_TTL": "four hours"})
    with pytest.raises(ConfigError, match="TWILIO_VALIDATE_SIGNATURE"):
        load({"TWILIO_VALIDATE_SIGNATURE": "maybe"})
    with pytest.raises(ConfigError, match="APP_ENV"):
        load({"APP_ENV": "staging"})


def test_missing_callers_file_stops_start_naming_the_variable(tmp_path):
    from tests.support.app import make_app

    with pytest.raises(ConfigError, match="CALLERS_FILE"):
        make_app(CALLERS_FILE=str(tmp_path / "nope.json"))


def test_mask_hides_the_middle_of_numbers():
    assert mask("+15551230001") == "+1555***0001"
    assert "1230" not in mask("+15551230001")
    assert mask("12") == "***"
    assert mask("+12345678") == "***5678"
    assert mask("+123456789") == "***6789"


def test_embedded_store_serves_a_conversation(fake_app):
    client = fake_app.test_client()
    assert b"Thanks" in post_signed(client, webhook_params()).data
    assert b"2 times" in post_signed(client, webhook_params()).data


@pytest.fixture
def store(fake_app):
    return current(fake_app).store


def test_lock_makes_a_second_opener_wait_then_give_up(store):
    keys = Keys().conversation(REY, OURS)
    held = store.open(keys, "SM1")
    impatient = ConversationStore(
        store.client, ttl=60, lock_ttl=3, lock_wait=0.05, redelivery_window=60, replies_kept=4
    )
    with pytest.raises(ConversationBusy):
        impatient.open(keys, "SM2")
    assert not store.client.exists(keys.queue)  # the impatient one left the line
    store.release(keys, held.token)
    assert impatient.open(keys, "SM2").answered is None


def test_save_after_the_lock_was_lost_writes_nothing(store):
    keys = Keys().conversation(REY, OURS)
    opened = store.open(keys, "SM1")
    store.client.delete(keys.lock)  # lapsed
    with pytest.raises(LockLost):
        store.save(keys, opened, Commit(sid="sid", state="{}", is_new=True, message_sid="SM1", answer="thi"))
    assert store.client.exists(keys.conversation) == 0


def test_ending_a_conversation_in_flight_wins(store):
    keys = Keys().conversation(REY, OURS)
    opened = store.open(keys, "SM1")
    assert store.end(keys) is False  # nothing saved yet, but the lock goes
    with pytest.raises(LockLost):
        store.save(keys, opened, Commit(sid="sid", state="{}", is_new=True, message_sid="SM1", answer="thi"))


def test_simulator_forgets_the_cookie_after_four_hours():
    now = [1000.0]
    twilio = TwilioSimulator("http://127.0.0.1:9/sms", "token", clock=lambda: now[0])
    twilio.cookies[("+1", "+2")] = ("abc", now[0])
    now[0] += COOKIE_LIFETIME - 1
    assert twilio.cookie_for("+1", "+2") == "abc"
    now[0] += 1
    assert twilio.cookie_for("+1", "+2") is None


def test_reply_text_reads_twiml():
    assert reply_text('<?xml version="1.0"?><Response><Message>Hi</Message></Response>') == "Hi"
    assert reply_text("<Response/>") is None
    assert reply_text("not xml") is None


def test_session_serializer_is_json_only_and_refuses_a_pickle(fake_app, tmp_path):
    import os
    import pickle

    from service.sessions import JsonSerializer

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    serializer = fake_app.session_interface.serializer
    assert type(serializer) is JsonSerializer
    for payload in (pickle.dumps(Exploit()), pickle.dumps(Exploit(), protocol=0)):
        with pytest.raises(ValueError):
            serializer.decode(payload.decode("latin-1"))
    assert not marker.exists()


def test_body_first_reads_the_body_before_the_app_and_bounds_it():
    """``BodyFirst`` hands the app a body already read (at most MAX_BODY_BYTES + 1 bytes of a
    chunked one, none of one announced over it), and closes what the app returned."""
    from service.serving import BodyFirst

    seen, closed = [], []

    class Body(list):
        def close(self):
            closed.append(True)

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        seen.append((stream, stream.tell(), stream.read()))
        return Body([b"ok"])

    def run(length: str | None, body: bytes) -> list:
        environ = {"wsgi.input": io.BytesIO(body), **({"CONTENT_LENGTH": length} if length else {})}
        return BodyFirst(app, max_body=10)(environ, lambda *a: None)

    assert run("5", b"hello, more") == [b"ok"]
    assert seen[-1][2] == b"hello"
    run(None, b"x" * 50)  # chunked: one byte past the bound tells the app it is too big
    assert seen[-1][2] == b"x" * 11
    unread = io.BytesIO(b"y" * 50)
    BodyFirst(app, max_body=10)({"wsgi.input": unread, "CONTENT_LENGTH": "50"}, lambda *a: None)
    assert seen[-1][:2] == (unread, 0)  # never read: the app answers 413 without reading it
    assert closed == [True, True, True]


def test_body_first_answers_408_to_a_body_that_does_not_arrive_in_time():
    """A body still incomplete after CLIENT_TIMEOUT (its client silent) is answered 408 without
    reaching the app, its socket's reading side shut (the rest is never read); the socket's own
    timeout is put back. (Under gevent the bound is on the whole body: tests/test_gunicorn.py.)"""
    import socket

    from service.serving import BodyFirst

    reached, statuses = [], []

    def app(environ, start_response):
        reached.append(True)
        return [b"ok"]

    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(b"From=%2B1555")  # of 100 bytes announced
        environ = {"wsgi.input": ours.makefile("rb"), "gunicorn.socket": ours, "CONTENT_LENGTH": "100"}
        body = BodyFirst(app, max_body=1000, client_timeout=1)(
            environ, lambda status, headers: statuses.append(status)
        )
        assert statuses == ["408 Request Timeout"]
        assert b"CLIENT_TIMEOUT" in b"".join(body)
        assert ours.gettimeout() is None
        assert ours.recv(100) == b""  # reading side shut
    assert reached == []


def test_the_request_line_limit_leaves_room_for_the_longest_query_string():
    from gunicorn.http import message

    from service.serving import request_line_limit

    limit = request_line_limit(65536)
    assert limit > 65536
    assert limit <= message.MAX_REQUEST_LINE  # gunicorn keeps it, not 8,190


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sms_session=abc-DEF_123",
        "a=1; sms_session=abc; b=2",
        "sms_session=first; sms_session=second",
        'sms_session="quoted\\"value"',
        "other=1",
        "sms_session=",
        "sms_session=caf\u00c3\u00a9",  # UTF-8 bytes as a WSGI server passes them (latin-1)
        "sms_session=\u00ff",  # a byte that is not UTF-8
        "a=1; b=\u00c3\u0028; sms_session=x",
    ],
)
def test_the_session_reads_the_cookie_as_werkzeug_s_request_cookies(header):
    """The session's cookie, read from the one ``HTTP_COOKIE`` of the environ, is what
    werkzeug's ``request.cookies`` holds for it, whatever the header."""
    from flask import Request
    from werkzeug.test import EnvironBuilder

    from service.sessions import COOKIE_NAME, _cookie

    environ = EnvironBuilder(path="/sms").get_environ()
    if header is not None:
        environ["HTTP_COOKIE"] = header
    assert _cookie(Request(environ)) == Request(environ).cookies.get(COOKIE_NAME)
