"""The conversation webhook on a real Redis: replies, TTL, cookies, exactness, idempotency."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest
import redis
from flask import Response

from service.keys import Keys
from service.simulator import TwilioSimulator
from service.store import ConversationStore
from tests.support.app import TOKEN, make_app, post_signed, sign, webhook_params
from tests.support.app_servers import LiveServer
from tests.support.numbers import FRIEND, OURS, REY
from tests.support.redis_servers import commands_during
from tests.support.replies import count_in, count_reply, thanks

KEYS = Keys()


def conversation(redis_client, sender=REY, recipient=OURS) -> dict:
    return redis_client.hgetall(KEYS.conversation(sender, recipient).conversation)


def messages(redis_client, sender=REY, recipient=OURS) -> int:
    """The conversation's own message count, as stored."""
    return int(conversation(redis_client, sender, recipient)["seq"])


def test_first_message_is_thanked_by_name_then_counted(twilio):
    first = twilio.send(REY, OURS, "hello")
    second = twilio.send(REY, OURS, "again")
    third = twilio.send(REY, OURS, "and again")
    assert first.reply == thanks("Rey")
    assert second.reply == count_reply("Rey", 2)
    assert third.reply == count_reply("Rey", 3)


def test_unknown_sender_is_friend_and_reply_is_twiml(twilio):
    delivery = twilio.send(FRIEND, OURS, "hi")
    assert delivery.reply == thanks("Friend")
    response = twilio.http.post(twilio.url, data={})  # unsigned: just to read headers below
    assert response.status_code == 403
    ok = twilio.send(FRIEND, OURS, "hi again")
    assert ok.body.startswith("<?xml")
    assert "<Response><Message>" in ok.body


def test_reply_content_type_is_text_xml(app):
    response = post_signed(app.test_client(), webhook_params())
    assert response.status_code == 200
    assert response.mimetype == "text/xml"


def test_callers_file_is_configurable(redis_url, tmp_path):
    callers = tmp_path / "callers.json"
    callers.write_text(json.dumps({FRIEND: "Zorii"}))
    app = make_app(REDIS_URL=redis_url, CALLERS_FILE=str(callers))
    response = post_signed(app.test_client(), webhook_params(sender=FRIEND))
    assert thanks("Zorii").encode() in response.data


def test_get_webhook_is_signed_over_the_query_and_counts(app):
    client = app.test_client()
    for expected in (thanks("Rey"), count_reply("Rey", 2)):
        params = webhook_params()
        query = "&".join(f"{k}={v}".replace("+", "%2B") for k, v in params.items())
        url = f"http://localhost/sms?{query}"
        response = client.get(f"/sms?{query}", headers={"X-Twilio-Signature": sign(url, {})})
        assert response.status_code == 200, response.data
        assert expected.encode() in response.data


def test_mms_with_empty_body_counts_like_any_message(twilio):
    twilio.send(REY, OURS, "text")
    mms = twilio.send(REY, OURS, "", media=["https://api.twilio.com/media/ME1"])
    assert mms.reply == count_reply("Rey", 2)


def test_state_is_json_text_and_cookie_holds_only_the_session_id(twilio, redis_client):
    twilio.send(REY, OURS, "one")
    delivery = twilio.send(REY, OURS, "two")
    stored = conversation(redis_client)
    assert json.loads(stored["state"]) == {}
    assert stored["seq"] == "2"  # the counter keeps no state
    cookie = twilio.cookie_for(REY, OURS)
    assert cookie == stored["sid"] == delivery.cookie_sent
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cookie)  # token_urlsafe(16): 128 random bits
    third = twilio.send(REY, OURS, "three")
    assert third.cookie_sent == cookie == twilio.cookie_for(REY, OURS)  # same id while state changes
    assert messages(redis_client) == 3


def test_cookie_attributes(app):
    response = post_signed(app.test_client(), webhook_params())
    header = response.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "Max-Age=14400" in header
    assert "Secure" not in header
    secure = make_app(REDIS_URL=app.config["REDIS_URL"], SESSION_COOKIE_SECURE=True)
    assert "Secure" in post_signed(secure.test_client(), webhook_params()).headers["Set-Cookie"]


def test_a_server_that_lost_the_scripts_gets_them_again(twilio, redis_client):
    """Scripts live in the server's memory only: after a restart or failover, the first call
    meets NOSCRIPT, loads the script and still answers, counted once."""
    twilio.send(REY, OURS, "hello")
    redis_client.script_flush()
    assert twilio.send(REY, OURS, "again").reply == count_reply("Rey", 2)
    redis_client.script_flush()
    assert twilio.send(REY, OURS, "and again").reply == count_reply("Rey", 3)
    assert messages(redis_client) == 3


@pytest.mark.parametrize(
    "config",
    [
        {},
        {
            "SESSION_COOKIE_SECURE": True,
            "SESSION_COOKIE_SAMESITE": "Lax",
            "SESSION_COOKIE_DOMAIN": "sms.example.com",
            "SESSION_COOKIE_PATH": "/hooks",
        },
    ],
)
@pytest.mark.parametrize("sid", ["Ab_-" * 10 + "xyz", 'hand "edited"; id é'])
def test_cookie_is_the_one_werkzeug_writes(config, sid):
    """The cookie's attributes are written once a second: the header must still be what
    Flask's set_cookie would send (quoted when the id needs it)."""
    app = make_app(**config)
    interface = app.session_interface
    for _ in range(3):  # a second may turn between the two; then again
        second = int(time.time())
        ours = interface.cookie(app, sid)
        expected = Response()
        expected.set_cookie(
            "sms_session",
            sid,
            max_age=interface.ttl,
            httponly=True,
            secure=interface.get_cookie_secure(app),
            samesite=interface.get_cookie_samesite(app),
            domain=interface.get_cookie_domain(app),
            path=interface.get_cookie_path(app),
        )
        if int(time.time()) == second:
            break
    assert ours == expected.headers["Set-Cookie"]


def test_ttl_is_four_hours_and_slides(twilio, redis_client):
    """The conversation ends 4 h after its last message (its index score); the hash itself
    outlives that by a grace period, so that whoever ends it still finds its state."""
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "one")
    first = redis_client.zscore(keys.index_shard, keys.member)
    assert abs(first - (time.time() + 14400) * 1000) < 5000
    assert (
        14400 + ConversationStore.GRACE - 5
        <= redis_client.ttl(keys.conversation)
        <= 14400 + ConversationStore.GRACE
    )
    time.sleep(0.01)
    twilio.send(REY, OURS, "two")
    assert redis_client.zscore(keys.index_shard, keys.member) > first


def test_the_index_outlives_the_conversations_it_lists(twilio, redis_client):
    """A tag's index expires a grace period after its latest entry's end (so that the sweeper
    finds every conversation); its expiry moves with a new entry and with the first save of
    each minute in the tag, so it is never more than a minute behind."""
    keys, grace_ms = KEYS.conversation(REY, OURS), ConversationStore.GRACE * 1000

    def lead_ms() -> int:  # how long the index outlives its latest entry's end
        latest = redis_client.zrange(keys.index_shard, -1, -1, withscores=True)[0][1]
        return int(time.time() * 1000 + redis_client.pttl(keys.index_shard) - latest)

    twilio.send(REY, OURS, "one")  # a new entry
    assert lead_ms() > grace_ms - 5000
    redis_client.pexpire(keys.index_shard, 60_000)  # as if its expiry had last moved a day ago
    twilio.send(REY, OURS, "two")  # the same minute: the index keeps its expiry
    # The tag's tallies say whether "two" was the same minute's (its 'm' tally then 2) or, had
    # the test straddled a minute, the first of the next (whose first save moves the expiry).
    tallies = {f: int(v) for f, v in redis_client.hgetall(keys.minutes).items() if f.endswith("m")}
    if sorted(tallies.values()) == [2]:
        assert 0 < redis_client.pttl(keys.index_shard) <= 60_000
    else:
        assert sorted(tallies.values()) == [1, 1]
        assert lead_ms() > grace_ms - 5000
    redis_client.delete(keys.minutes)  # a new minute for the tag
    twilio.send(REY, OURS, "three")
    assert lead_ms() > grace_ms - 5000


def test_expired_conversation_starts_afresh(redis_url):
    app = make_app(REDIS_URL=redis_url, CONVERSATION_TTL=1)
    with LiveServer(app) as server:
        twilio = TwilioSimulator(server.url, TOKEN)
        twilio.send(REY, OURS, "one")
        assert twilio.send(REY, OURS, "two").reply == count_reply("Rey", 2)
        time.sleep(1.2)
        # Twilio still holds the cookie (4 h), but the conversation has lapsed on our side.
        after = twilio.send(REY, OURS, "three")
        assert after.cookie_sent is not None
        assert after.reply == thanks("Rey")


def test_lost_cookie_does_not_split_the_conversation(twilio):
    twilio.send(REY, OURS, "one")
    twilio.cookies.clear()
    assert twilio.send(REY, OURS, "two").reply == count_reply("Rey", 2)


def test_forged_cookie_is_ignored_and_replaced(twilio, redis_client):
    twilio.send(REY, OURS, "one")
    delivery = twilio.send(REY, OURS, "two", cookie="forged-session-id")
    assert delivery.reply == count_reply("Rey", 2)
    assert twilio.cookie_for(REY, OURS) == conversation(redis_client)["sid"]


def test_other_pairs_cookie_neither_leaks_nor_splits(twilio, redis_client):
    for _ in range(3):
        twilio.send(REY, OURS, "rey")
    rey_cookie = twilio.cookie_for(REY, OURS)
    other = twilio.send(FRIEND, OURS, "hi", cookie=rey_cookie)
    assert other.reply == thanks("Friend")  # not Rey's 4th message
    assert twilio.send(REY, OURS, "rey").reply == count_reply("Rey", 4)
    assert conversation(redis_client, FRIEND)["sid"] != rey_cookie
    assert messages(redis_client) == 4


def _concurrently(count, send):
    barrier = threading.Barrier(count)
    results = [None] * count

    def worker(index):
        barrier.wait()
        results[index] = send(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_burst_of_30_first_messages_is_counted_1_to_30(live_server):
    sims = [TwilioSimulator(live_server.url, TOKEN) for _ in range(30)]  # none has a cookie
    deliveries = _concurrently(30, lambda i: sims[i].send(REY, OURS, f"burst {i}"))
    assert [d.status for d in deliveries] == [200] * 30
    assert sorted(count_in(d.reply) for d in deliveries) == list(range(1, 31))
    assert sims[0].send(REY, OURS, "next").reply == count_reply("Rey", 31)


def test_40_concurrent_messages_with_the_cookie_are_all_counted(live_server, redis_client):
    twilio = TwilioSimulator(live_server.url, TOKEN)
    twilio.send(REY, OURS, "first")
    cookie = twilio.cookie_for(REY, OURS)
    sims = [TwilioSimulator(live_server.url, TOKEN) for _ in range(40)]
    deliveries = _concurrently(40, lambda i: sims[i].send(REY, OURS, f"m{i}", cookie=cookie))
    assert sorted(count_in(d.reply) for d in deliveries) == list(range(2, 42))
    assert messages(redis_client) == 41


def test_different_pairs_do_not_wait_for_each_other(redis_url, redis_client):
    """Rey's conversation is held (a stuck holder); Friend's messages go straight through."""
    app = make_app(REDIS_URL=redis_url, LOCK_WAIT=30.0, LOCK_TTL=60.0)
    held = KEYS.conversation(REY, OURS).lock
    redis_client.set(held, "someone-else", px=60_000)
    with LiveServer(app) as server:
        results = {}
        waiting = threading.Thread(
            target=lambda: results.update(
                rey=TwilioSimulator(server.url, TOKEN, timeout=60).send(REY, OURS, "waits")
            )
        )
        waiting.start()
        friend = TwilioSimulator(server.url, TOKEN, timeout=10)
        replies = [friend.send(FRIEND, OURS, f"m{n}").reply for n in range(3)]
        assert redis_client.exists(held)
        assert "rey" not in results  # Rey still waits
        redis_client.delete(held)
        waiting.join(timeout=30)
    assert replies == [
        thanks("Friend"),
        count_reply("Friend", 2),
        count_reply("Friend", 3),
    ]
    assert results["rey"].reply == thanks("Rey")


def test_redelivery_gets_the_same_reply_and_counts_once(twilio, redis_client):
    first = twilio.send(REY, OURS, "one")
    again = twilio.send(REY, OURS, "one", message_sid=first.message_sid)
    assert again.status == 200
    assert again.reply == first.reply == thanks("Rey")
    assert twilio.send(REY, OURS, "two").reply == count_reply("Rey", 2)
    assert messages(redis_client) == 2


def test_concurrent_redeliveries_count_once(live_server, redis_client):
    sims = [TwilioSimulator(live_server.url, TOKEN) for _ in range(10)]
    deliveries = _concurrently(10, lambda i: sims[i].send(REY, OURS, "x", message_sid="SMsame"))
    assert {d.reply for d in deliveries} == {thanks("Rey")}
    assert messages(redis_client) == 1


def test_replay_memory_keeps_at_most_replies_kept_answers(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, REPLIES_KEPT=3)
    client = app.test_client()
    assert post_signed(client, webhook_params()).status_code == 200
    keys_after_one = redis_client.dbsize()
    for _ in range(9):
        assert post_signed(client, webhook_params()).status_code == 200
    stored = conversation(redis_client)
    kept = sorted((v for f, v in stored.items() if f.startswith("m:")), key=lambda v: int(v.split()[0]))
    assert [count_in(value.split(" ", 1)[1][1:]) for value in kept] == [8, 9, 10]
    assert redis_client.dbsize() == keys_after_one  # nothing per message


def test_apps_with_different_settings_share_a_redis(redis_url, redis_client):
    """A store's settings go with each call (the scripts are shared): each app keeps its own."""
    few = make_app(REDIS_URL=redis_url, REPLIES_KEPT=2).test_client()
    many = make_app(REDIS_URL=redis_url).test_client()
    for _ in range(4):
        assert post_signed(few, webhook_params(sender=REY)).status_code == 200
        assert post_signed(many, webhook_params(sender=FRIEND)).status_code == 200
    kept = {
        sender: [f for f in conversation(redis_client, sender) if f.startswith("m:")]
        for sender in (REY, FRIEND)
    }
    assert (len(kept[REY]), len(kept[FRIEND])) == (2, 4)


def test_replay_memory_forgets_answers_older_than_the_window(redis_url, redis_client):
    app = make_app(REDIS_URL=redis_url, REDELIVERY_WINDOW=1)
    client = app.test_client()
    old = webhook_params()
    post_signed(client, old)
    post_signed(client, webhook_params())
    time.sleep(1.1)
    post_signed(client, webhook_params())  # its save forgets the two answers now out of the window
    assert len([f for f in conversation(redis_client) if f.startswith("m:")]) == 1
    assert "answers" not in conversation(redis_client)  # one kept: the last message's
    again = post_signed(client, old)  # too late to be recognised: Twilio never retries this late
    assert b"4 times" in again.data


@pytest.mark.parametrize("missing", ["From", "To", "MessageSid"])
def test_missing_field_is_400_with_reason(app, redis_client, missing):
    params = webhook_params()
    del params[missing]
    response = post_signed(app.test_client(), params)
    assert response.status_code == 400
    assert missing.encode() in response.data
    assert redis_client.dbsize() == 0


def test_malformed_number_is_400(app, redis_client):
    response = post_signed(app.test_client(), webhook_params(sender="+1555|evil"))
    assert response.status_code == 400
    assert redis_client.dbsize() == 0


def test_oversized_body_is_413(app, redis_client):
    response = post_signed(app.test_client(), webhook_params(body="x" * 70000))
    assert response.status_code == 413
    assert redis_client.dbsize() == 0


def test_undecodable_body_is_400(app, redis_client):
    response = app.test_client().post(
        "/sms",
        data=b"From=%FF%FE&To=%2B15550001111&MessageSid=SM1",
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": "irrelevant"},
    )
    assert response.status_code == 400
    assert b"UTF-8" in response.data
    assert redis_client.dbsize() == 0


def test_planted_pickle_is_never_unpickled(twilio, redis_url, redis_client, tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    twilio.send(REY, OURS, "one")
    keys = KEYS.conversation(REY, OURS)
    payload = pickle.dumps(Exploit(), protocol=0)  # ASCII: reaches the decoder byte for byte
    redis.Redis.from_url(redis_url).hset(keys.conversation, "state", payload)
    delivery = twilio.send(REY, OURS, "two")
    assert delivery.status == 200
    assert not marker.exists()
    assert delivery.reply == thanks("Rey")  # unreadable state starts afresh
    assert messages(redis_client) == 1
    assert json.loads(conversation(redis_client)["state"]) == {}


def test_healthz_never_touches_redis():
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    response = app.test_client().get("/healthz")
    assert response.status_code == 200


@pytest.mark.parametrize(
    "edit",
    [
        {"state": "[" * 100_000 + "]" * 100_000},  # deeper than any JSON decoder recurses
        {"state": "not json"},
        {"seq": "three"},
        {"first_seen": "yesterday"},
        {"m:SMjunk": "junk"},
    ],
    ids=["deep-state", "not-json", "seq", "first-seen", "junk-reply"],
)
def test_hand_edited_conversation_starts_afresh_or_is_repaired(twilio, redis_client, edit):
    """An operator's redis-cli typo never makes a 500 nor a pair stuck on 503: what cannot be
    read is reported and the conversation starts afresh; the next message counts on."""
    keys = KEYS.conversation(REY, OURS)
    twilio.send(REY, OURS, "one")
    twilio.send(REY, OURS, "two")
    redis_client.hset(keys.conversation, mapping=edit)
    after = twilio.send(REY, OURS, "three")
    assert after.status == 200
    if "m:SMjunk" in edit:  # a junk reply field costs nothing: the count goes on
        assert after.reply == count_reply("Rey", 3)
    else:
        assert after.reply == thanks("Rey")
    assert not redis_client.exists(keys.lock)  # the save went through and released the lock
    assert twilio.send(REY, OURS, "four").status == 200


def test_redelivery_of_a_conversation_whose_sid_was_removed(twilio, redis_client):
    keys = KEYS.conversation(REY, OURS)
    first = twilio.send(REY, OURS, "one")
    redis_client.hdel(keys.conversation, "sid")
    again = twilio.send(REY, OURS, "one", message_sid=first.message_sid)
    assert again.status == 200
    assert again.reply == first.reply
    assert twilio.send(REY, OURS, "two").reply == thanks("Rey")  # no sid: afresh


def test_answers_are_scanned_only_when_one_can_be_forgotten(app, redis_client):
    """A conversation knows its oldest kept answer and how many it keeps ("answers", left out
    while it keeps one: the last message's), so a message within the window adds its answer
    without reading the others."""
    client = app.test_client()
    post_signed(client, webhook_params())
    first = conversation(redis_client)
    assert "answers" not in first
    used = commands_during(redis_client, lambda: post_signed(client, webhook_params()))
    assert "hgetall" not in used
    assert conversation(redis_client)["answers"] == f"{first['last_seen']} 2"
    for _ in range(3):
        post_signed(client, webhook_params())
    oldest, count = conversation(redis_client)["answers"].split()
    assert count == "5"
    assert int(oldest) <= int(conversation(redis_client)["last_seen"])
    used = commands_during(redis_client, lambda: post_signed(client, webhook_params()))
    assert "hgetall" not in used
    assert conversation(redis_client)["answers"] == f"{oldest} 6"


# --- The webhook's WSGI layer: one line and one count per request, whatever answered it -----


@pytest.fixture
def summaries(caplog):
    """The webhook's summary lines (their fields) since the last call."""
    caplog.set_level("INFO")

    def take():
        taken = [r.fields for r in caplog.records if r.name == "service.webhook"]
        caplog.clear()
        return taken

    return take


def counted(client) -> dict[str, float]:
    from tests.support.prometheus import scrape

    samples = scrape(client.get("/metrics").get_data(as_text=True))
    return {k: v for k, v in samples.items() if k.startswith("sms_messages_received_total")}


@pytest.mark.parametrize("method", ["OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow_logged_and_counted(redis_url, redis_client, summaries, method):
    client = make_app(REDIS_URL=redis_url).test_client()
    before = counted(client)
    summaries()
    response = client.open("/sms", method=method, data=webhook_params(REY, OURS, "hi"))
    assert (response.status_code, response.headers["Allow"]) == (405, "GET, POST")
    [line] = summaries()
    assert line["method"] == method
    assert line["reason"] == "method not allowed"
    assert (line["outcome"], line["status"], line["remote"]) == ("bad_request", 405, "127.0.0.1")
    after = counted(client)
    key = "sms_messages_received_total{outcome=bad_request}"
    assert after[key] - before[key] == 1
    assert sum(after.values()) - sum(before.values()) == 1
    assert redis_client.keys(KEYS.prefix + "conv:*") == []


def test_a_lower_case_method_is_read_as_post(redis_url, redis_client, summaries):
    """werkzeug reads the method in capitals: "post" is a POST, here unsigned."""
    client = make_app(REDIS_URL=redis_url).test_client()
    before = counted(client)
    summaries()
    response = client.open("/sms", method="post", data=webhook_params(REY, OURS, "hi"))
    assert response.status_code == 403
    [line] = summaries()
    assert (line["outcome"], line["status"]) == ("rejected_signature", 403)
    after = counted(client)
    key = "sms_messages_received_total{outcome=rejected_signature}"
    assert after[key] - before.get(key, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 1
    assert redis_client.keys(KEYS.prefix + "conv:*") == []


def test_query_string_over_the_bound_is_414_logged_and_counted(redis_url, summaries):
    client = make_app(REDIS_URL=redis_url, MAX_BODY_BYTES=100).test_client()
    summaries()
    assert client.get("/sms?" + "x" * 101).status_code == 414
    [line] = summaries()
    assert (line["outcome"], line["status"], line["reason"]) == (
        "bad_request",
        414,
        "query string over MAX_BODY_BYTES",
    )
    assert counted(client)["sms_messages_received_total{outcome=bad_request}"] == 1


def test_the_path_as_routing_sees_it_and_no_other(redis_url, summaries, caplog):
    """``//sms`` is /sms to werkzeug (a line); other paths get none, and a problem reported
    after a webhook request, on the same thread, is a line of its own, not the last one's."""
    from service import logs

    client = make_app(REDIS_URL=redis_url).test_client()
    summaries()
    assert client.put("/sms", environ_overrides={"PATH_INFO": "//sms"}).status_code == 405
    assert [line["status"] for line in summaries()] == [405]
    client.get("/healthz")
    client.put("/sms/")
    assert summaries() == []
    assert logs.annotate(reason="x") is False
    logs.report(logging.getLogger("service.later"), "a problem after the request")
    assert [r.getMessage() for r in caplog.records if r.name == "service.later"] == [
        "a problem after the request"
    ]
    assert summaries() == []


def test_the_line_names_the_forwarded_client(redis_url, summaries):
    client = make_app(REDIS_URL=redis_url, TRUSTED_PROXY_HOPS=1).test_client()
    summaries()
    client.put("/sms", headers={"X-Forwarded-For": "203.0.113.9"})
    [line] = summaries()
    assert line["remote"] == "203.0.113.9"


def test_an_exception_flask_lets_through_still_has_its_line(redis_url, summaries):
    """Under PROPAGATE_EXCEPTIONS (testing) Flask re-raises: the line still says 500, error."""

    app = make_app(REDIS_URL=redis_url)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    app.view_functions["webhook.sms"] = lambda: 1 / 0
    summaries()
    with pytest.raises(ZeroDivisionError):
        post_signed(app.test_client(), webhook_params(REY, OURS, "hi"))
    [line] = summaries()
    assert (line["outcome"], line["status"]) == ("error", 500)


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD"])
def test_the_service_s_answers_leave_as_werkzeug_would_send_them(method):
    """``Reply`` skips werkzeug's general WSGI response: the same status, headers and body."""
    from service.responses import twiml, unavailable

    environ = {"REQUEST_METHOD": method, "SERVER_NAME": "localhost", "SERVER_PORT": "80"}
    for reply in (twiml("<Response/>"), unavailable()):
        reply.headers.add("Set-Cookie", "sms_session=abc; HttpOnly")
        ours = reply.get_wsgi_response(environ)
        werkzeugs = Response.get_wsgi_response(reply, environ)
        assert (b"".join(ours[0]), ours[1], ours[2]) == (b"".join(werkzeugs[0]), werkzeugs[1], werkzeugs[2])
