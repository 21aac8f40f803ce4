"""Transcripts as deployed: gunicorn with the repository's config (its workers' senders and
sweeper), a real redis-server, the Twilio stand-in delivering and posting status callbacks. A
conversation of 20 messages with slow handlers (replies past the webhook), messages of the
handler's own and two timers, a ``kill -9`` of the worker running a handler and redelivered
``MessageSid``s: its transcript holds each message, reply, outbound message and firing exactly
once, in the order the state committed them, the outbound ones with their delivery status;
it is kept ``TRANSCRIPT_RETENTION`` after the conversation ends, then goes."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests

from service.keys import Keys
from service.responses import NO_REPLY
from service.simulator import TwilioSimulator
from tests.support.app_servers import GUNICORN_CONF
from tests.support.numbers import OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN, StandinServer
from tests.support.waiting import wait_until
from tests.test_outbound_browser import Served

pytestmark = pytest.mark.slow

KEYS = Keys().conversation(REY, OURS)
OPS = "transcripts-gunicorn-ops-token"
AUTH = {"Authorization": f"Bearer {OPS}"}
RETENTION = 2  # seconds
TTL = 3600  # seconds: the conversation's


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


def state(redis_client) -> dict:
    return json.loads(redis_client.hget(KEYS.conversation, "state") or "{}")


def transcript(gunicorn: Served) -> list[dict]:
    """The pair's transcript as the service's API reads it (statuses on their messages)."""
    answer = requests.get(f"{gunicorn.base}/ops/transcripts/{REY}/{OURS}", headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["entries"]


def calls(redis_client) -> list[dict]:
    return [json.loads(call) for call in redis_client.lrange("handler-calls", 0, -1)]


def commits(entries: list[dict]) -> list[tuple[tuple[str, str], list[tuple[str, str]]]]:
    """The transcript cut where each commit starts (a message in, or a timer's firing, its
    name): its first entry, then the rest as a sorted list (a reply past the webhook leaves after the
    handler's own sends, one answered inline before them)."""
    cut: list[tuple[tuple[str, str], list[tuple[str, str]]]] = []
    for entry in entries:
        said = (entry["direction"], entry.get("timer") or entry["body"])
        if entry["direction"] in ("in", "timer"):
            cut.append((said, []))
        else:
            assert cut, f"{said} before any message"
            cut[-1][1].append(said)
    return [(first, sorted(rest)) for first, rest in cut]


def expected(log: list[str]) -> list[tuple[tuple[str, str], list[tuple[str, str]]]]:
    """What each committed run (the state's log, in commit order) writes."""
    wanted = []
    for noted in log:
        kind, _, said = noted.partition(" ")
        if kind == "timer":
            wanted.append((("timer", said), [("out", f"fired {said}")]))
        else:
            rest = [("out", f"re {said}")] + ([("out", f"sent for {said}")] if "send" in said.split() else [])
            wanted.append((("in", said), sorted(rest)))
    return wanted


def settled(redis_client, gunicorn, count: int, timers: int = 0) -> bool:
    """``count`` messages and ``timers`` firings committed, nothing waiting, every outbound
    message delivered."""
    log = state(redis_client).get("log", [])
    if state(redis_client).get("count") != count or sum(n.startswith("timer ") for n in log) != timers:
        return False
    if redis_client.exists(KEYS.inbound):
        return False
    return all(entry.get("status") == "delivered" for entry in transcript(gunicorn) if entry.get("id"))


def test_twenty_messages_slow_sends_timers_kill_9_and_redelivery_each_once_in_commit_order(
    redis_url, redis_client, standin
):
    env = {
        "REDIS_URL": redis_url,
        "OPS_TOKEN": OPS,
        "TRANSCRIPTS": "1",
        "TRANSCRIPT_RETENTION": str(RETENTION),
        "CONVERSATION_TTL": str(TTL),
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_FROM_NUMBER": OURS,
        "TWILIO_API_BASE_URL": standin.base,
        "SMS_HANDLER": "tests.support.transcript_handler:handle",
        "HANDLER_INLINE_BUDGET": "0.2",
        "LOCK_TTL": "1",
        "SWEEP_INTERVAL": "0.2",
        "SENDER_INTERVAL": "0.05",
        "REDELIVERY_WINDOW": "600",  # the redeliveries come at the end, however long it took
    }
    with Served(env, workers=2, config=GUNICORN_CONF) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)

        def say(body: str):
            delivery = twilio.send(REY, OURS, body)
            assert delivery.status == 200
            return delivery

        say("m01")
        with_send = say("m02 send")
        assert say("m03 slow").body == NO_REPLY  # past the budget: its reply leaves through the sender
        queued = say("m04")
        assert queued.body == NO_REPLY  # waits its turn behind the slow one
        assert twilio.send(REY, OURS, "m04", message_sid=queued.message_sid).body == NO_REPLY  # redelivered
        say("m05 timer")
        for n in range(6, 10):
            say(f"m{n:02d}")
        wait_until(lambda: settled(redis_client, gunicorn, 9, timers=1), what="m01 to m09 and a firing")

        stalled = say("m10 stall")
        assert stalled.body == NO_REPLY  # past the budget: it runs on in its worker
        say("m11 send")
        held = say("m12")
        assert held.body == NO_REPLY
        [running] = [call for call in calls(redis_client) if call["body"] == "m10 stall"]
        os.kill(running["pid"], signal.SIGKILL)  # the handler mid-message; m11, m12 wait behind it
        # The sweeper claims m10 once its lease lapses (LOCK_TTL), or once the sweeper's own lease
        # does, if the killed worker held it.
        twilio = TwilioSimulator(gunicorn.url, AUTH_TOKEN)  # none of its connections to the dead one
        assert twilio.send(REY, OURS, "m12", message_sid=held.message_sid).body == NO_REPLY
        wait_until(
            lambda: settled(redis_client, gunicorn, 12, timers=1),
            seconds=40,
            what="m10 run again, then m11, m12",
        )
        again = [call for call in calls(redis_client) if call["body"] == "m10 stall"]
        assert len(again) == 2 and again[1]["pid"] != running["pid"]

        say("m13 slow send")
        say("m14 timer")
        for n in range(15, 21):
            say(f"m{n:02d}" + {17: " send", 19: " slow"}.get(n, ""))
        wait_until(
            lambda: settled(redis_client, gunicorn, 20, timers=2), what="all 20 messages and both firings"
        )

        # Redeliveries once all is committed: answered from memory, nothing written again.
        written = transcript(gunicorn)
        handled = len(calls(redis_client))
        assert twilio.send(REY, OURS, "m02 send", message_sid=with_send.message_sid).body == with_send.body
        assert twilio.send(REY, OURS, "m10 stall", message_sid=stalled.message_sid).body == NO_REPLY
        assert transcript(gunicorn) == written
        assert len(calls(redis_client)) == handled

        final = state(redis_client)
        counted = redis_client.hget(KEYS.conversation, "seq")
        entries = transcript(gunicorn)
        delivered = [message["body"] for message in standin.inbox(REY)]
        with redis_client.pipeline(transaction=True) as pipe:  # one instant of Redis' clock
            now, scheduled_end, live_left = (
                pipe.time().zscore(KEYS.index_shard, KEYS.member).pttl(KEYS.transcript).execute()
            )
        ended = requests.delete(f"{gunicorn.base}/ops/conversations/{REY}/{OURS}", headers=AUTH, timeout=10)
        assert ended.status_code == 200
        ended_left = redis_client.pttl(KEYS.transcript)

    assert final["count"] == 20
    assert counted == "20"
    bodies = [noted.partition(" ")[2] for noted in final["log"] if noted.startswith("in ")]
    assert bodies == [
        "m01", "m02 send", "m03 slow", "m04", "m05 timer", "m06", "m07", "m08", "m09", "m10 stall",
        "m11 send", "m12", "m13 slow send", "m14 timer", "m15", "m16", "m17 send", "m18", "m19 slow", "m20",
    ]  # fmt: skip
    assert sorted(noted for noted in final["log"] if noted.startswith("timer ")) == [
        "timer t-m05",
        "timer t-m14",
    ]

    # Each once, in commit order: the transcript is exactly what the committed runs wrote.
    assert commits(entries) == expected(final["log"])
    inbound = [entry for entry in entries if entry["direction"] == "in"]
    assert len(inbound) == 20
    assert len({entry["sid"] for entry in inbound}) == 20
    assert {entry["sid"] for entry in inbound} >= {queued.message_sid, held.message_sid, stalled.message_sid}
    times = [entry["at"] for entry in entries]
    assert times == sorted(times)
    # The outbound ones (replies past the webhook, sends, firings) with their delivery status.
    outbound = [entry for entry in entries if entry.get("id")]
    assert len({entry["id"] for entry in outbound}) == len(outbound)
    assert {entry["status"] for entry in outbound} == {"delivered"}
    assert {entry["body"] for entry in outbound} == set(delivered)
    assert {"re m03 slow", "re m10 stall", "sent for m02 send", "fired t-m05"} <= set(delivered)
    inline = [entry for entry in entries if entry["direction"] == "out" and not entry.get("id")]
    assert inline and all(entry["body"].startswith("re ") for entry in inline)

    # Kept the retention after the conversation's end (live: its scheduled end), then gone.
    now_ms = now[0] * 1000 + now[1] // 1000
    assert abs(live_left - (int(scheduled_end) - now_ms + RETENTION * 1000)) <= 2
    assert 0 < ended_left <= RETENTION * 1000
    wait_until(
        lambda: not redis_client.exists(KEYS.transcript), seconds=RETENTION + 5, what="the transcript gone"
    )
