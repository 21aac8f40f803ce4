"""Outbound delivery under faults and load, against the Twilio stand-in on a real socket and a
real redis-server: the sender killed (kill -9, a real ``sms-sessions sender`` process) between
the commit and the create and between the create and its answer; 200 messages to 20
conversations while their inbound messages arrive."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service import create_app, send
from service.keys import Keys
from service.sender import Sender
from tests.support import ROOT
from tests.support.app import sign, webhook_params
from tests.support.app_servers import LiveServer, bin_path, hermetic_environment
from tests.support.numbers import OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN
from tests.support.waiting import wait_until

# A short lease: the API timeout bounds it from below (three times), so both are small here.
FAST = {
    "TWILIO_API_TIMEOUT": "2",
    "SENDER_LEASE": "1",
    "SENDER_INTERVAL": "0.05",
    "DELIVERY_RETRY_BASE": "0.1",
}


def states(redis_client, sender=REY) -> list[dict]:
    keys = Keys().conversation(sender, OURS)
    return [
        json.loads(value) for name, value in redis_client.hgetall(keys.sent).items() if name.endswith(":s")
    ]


def held(standin, to=REY) -> list[dict]:
    return [message for message in standin.inbox() if message["to"] == to]


def sender_process(redis_url: str, base_url: str) -> subprocess.Popen:
    """``sms-sessions sender`` in its own process, sending through ``base_url``."""
    environment = {
        **hermetic_environment(),
        "REDIS_URL": redis_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_FROM_NUMBER": OURS,
        "TWILIO_API_BASE_URL": base_url,
        **FAST,
    }
    return subprocess.Popen(
        [bin_path("sms-sessions"), "sender"],
        env=environment,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def recover(app, until, what: str) -> None:
    """A sender of this process, passing until ``until()`` holds (bounded)."""
    sender = Sender(app)
    wait_until(lambda: sender.send_due() >= 0 and until(), seconds=30, what=what)


@pytest.mark.slow
def test_killed_between_commit_and_create_the_message_is_sent_once_later(standin, redis_url, redis_client):
    """The killed sender's create never reached Twilio (it went to a port that takes the
    connection and never reads): after its claim's lease, another sender looks the message up,
    finds nothing, and sends it, once."""
    app = create_app({**standin.config(**FAST), "REDIS_URL": redis_url})
    sent = send(REY, "Your table is ready", app=app)
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # listens, never accepts
        process = sender_process(redis_url, f"http://127.0.0.1:{black_hole.getsockname()[1]}")
        try:
            wait_until(lambda: states(redis_client)[0]["stage"] == "claimed", what="the claim")
        finally:
            kill(process)
    assert held(standin) == []
    recover(app, lambda: states(redis_client)[0]["stage"] == "handed", "the message handed over")
    [message] = held(standin)
    assert message["body"] == "Your table is ready"
    [state] = states(redis_client)
    assert state["sid"] == message["sid"]
    assert state["attempts"] == 2
    assert sent.id in redis_client.hgetall(Keys().conversation(REY, OURS).sent)


@pytest.mark.slow
def test_killed_between_create_and_answer_the_message_is_found_not_resent(standin, redis_url, redis_client):
    """The killed sender's create reached Twilio, whose answer was still on its way: the next
    sender finds the message (find_sent: same body, same number, since the first attempt) and
    records it instead of sending it again."""
    app = create_app({**standin.config(**FAST), "REDIS_URL": redis_url})
    standin.fault(to=REY, count=1, delay=30)
    send(REY, "See you at 3 pm", app=app)
    process = sender_process(redis_url, standin.base)
    try:
        wait_until(lambda: held(standin), what="the create stored by Twilio")
    finally:
        kill(process)
    [stored] = held(standin)
    recover(app, lambda: states(redis_client)[0]["stage"] == "handed", "the message recorded")
    assert [message["sid"] for message in held(standin)] == [stored["sid"]]  # not sent again
    [state] = states(redis_client)
    assert state["sid"] == stored["sid"]
    assert state["attempts"] == 2


CONVERSATIONS, INBOUND, PER_INBOUND, FROM_JOBS = 20, 4, 2, 2  # 20 × (4 × 2 + 2) = 200 messages


def counting_bot(message, conversation):
    """Counts its messages in the state and sends two numbered messages per inbound one, in the
    save that counted it."""
    n = conversation.get("n", 0) + 1
    conversation["n"] = n
    conversation.send(f"m{n}a")
    conversation.send(f"m{n}b")
    return None


@pytest.mark.slow
def test_200_messages_to_20_conversations_keep_commit_order_while_inbound_arrives(
    standin, redis_url, redis_client
):
    app = create_app({**standin.config(**FAST), "REDIS_URL": redis_url}, handler=counting_bot)
    numbers = [f"+1555000{n:04d}" for n in range(CONVERSATIONS)]
    senders = [Sender(app), Sender(app)]  # two senders compete for the same conversations
    for sender in senders:
        sender.start()
    try:
        with LiveServer(app) as server:

            def inbound(number: str) -> list[int]:
                codes = []
                for _ in range(INBOUND):
                    params = webhook_params(sender=number, recipient=OURS, body="hi")
                    headers = {"X-Twilio-Signature": sign(server.url, params, AUTH_TOKEN)}
                    codes.append(
                        requests.post(server.url, data=params, headers=headers, timeout=30).status_code
                    )
                return codes

            def from_jobs(number: str) -> None:
                for k in range(FROM_JOBS):
                    send(number, f"job{k}", app=app)

            with ThreadPoolExecutor(16) as pool:
                answered = pool.map(inbound, numbers)
                jobs = list(pool.map(from_jobs, numbers))
                statuses = [code for codes in answered for code in codes]
            assert jobs == [None] * CONVERSATIONS
            assert statuses == [200] * (CONVERSATIONS * INBOUND)
            total = CONVERSATIONS * (INBOUND * PER_INBOUND + FROM_JOBS)
            wait_until(lambda: len(standin.inbox()) == total, seconds=120, what=f"{total} messages sent")
    finally:
        for sender in senders:
            sender.stop()
    for number in numbers:
        got = [message["body"] for message in held(standin, number)]
        handler_sent = [body for body in got if body.startswith("m")]
        assert handler_sent == [f"m{n}{half}" for n in range(1, INBOUND + 1) for half in "ab"]
        assert [body for body in got if body.startswith("job")] == [f"job{k}" for k in range(FROM_JOBS)]
        # One save's two messages are never split by another's.
        for n in range(1, INBOUND + 1):
            assert got.index(f"m{n}b") == got.index(f"m{n}a") + 1
        state = json.loads(redis_client.hget(Keys().conversation(number, OURS).conversation, "state"))
        assert state == {"n": INBOUND}
        assert all(state["stage"] == "handed" for state in states(redis_client, number))
    assert sum(redis_client.llen(Keys().conversation(number, OURS).outbound) for number in numbers) == 0


def test_a_lost_answer_is_looked_up_not_resent(standin, redis_url, redis_client):
    """Twilio stored the create and the connection closed without its answer: the retry finds
    the message (find_sent) and records it; it is not sent twice."""
    app = create_app({**standin.config(**FAST), "REDIS_URL": redis_url})
    standin.fault(to=REY, count=1, lose_answer=True)
    send(REY, "Only once, please", app=app)
    recover(app, lambda: states(redis_client)[0]["stage"] == "handed", "the message recorded")
    [stored] = held(standin)
    [state] = states(redis_client)
    assert state["sid"] == stored["sid"]
    assert state["attempts"] == 2
