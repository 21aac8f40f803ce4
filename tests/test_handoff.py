"""Human handoff through the API and the CLI: take over (the bot paused, messages recorded), an
operator's reply (sent through the Twilio stand-in, in the transcript), hand back (the bot
resumes with the operator's values), the hold's timeout, no expiry while held, and the
handler asking for a person (flagged, gauged, its wait observed)."""

from __future__ import annotations

import json
import time

from service import create_app
from service.keys import Keys
from service.lifecycle import Sweeper
from service.sender import Sender
from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.numbers import OURS, REY
from tests.support.standin import ACCOUNT_SID, API_KEY, API_SECRET
from tests.test_outbound import drain

KEYS = Keys()
OPS = "ops-token-for-handoff"
AUTH = {"Authorization": f"Bearer {OPS}"}


def bot(message, conversation):
    """Counts, remembers the operator's 'booked', asks for a person on 'human'."""
    conversation["n"] = conversation.get("n", 0) + 1
    if message.body == "human":
        conversation.handoff("asked for a human")
    return f"bot {conversation['n']}" + (" booked" if conversation.get("booked") else "")


def make(redis_url, standin, **config):
    return create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "OPS_TOKEN": OPS,
            "TRANSCRIPTS": True,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_API_KEY": API_KEY,
            "TWILIO_API_SECRET": API_SECRET,
            "TWILIO_API_BASE_URL": standin.base,
            **config,
        },
        handler=bot,
    )


def path(action: str = "handoff") -> str:
    return f"/ops/conversations/{REY}/{OURS}/{action}"


def test_take_over_reply_and_hand_back(redis_url, redis_client, standin):
    app = make(redis_url, standin)
    client, twilio = app.test_client(), TwilioSimulator.for_app(app)
    assert twilio.send(REY, OURS, "hi").reply == "bot 1"

    taken = client.post(path(), headers=AUTH)
    assert taken.status_code == 200
    assert taken.get_json()["paused_until"] > 0
    held = twilio.send(REY, OURS, "is anyone there?")
    assert held.status == 200
    assert held.replies == []  # the bot does not answer
    assert redis_client.hget(KEYS.conversation(REY, OURS).conversation, "seq") == "2"  # but it is saved

    sent = client.post(path("reply"), headers=AUTH, json={"body": "Hi, Ana here. Booked you in."})
    assert sent.status_code == 200
    assert sent.get_json()["queued"] is True
    drain(Sender(app))  # the outbound sender delivers it
    [delivered] = [m for m in standin.inbox() if m["to"] == REY]
    assert (delivered["from"], delivered["body"]) == (OURS, "Hi, Ana here. Booked you in.")

    back = client.delete(path(), headers=AUTH, json={"state": {"booked": True}})
    assert back.status_code == 200
    assert twilio.send(REY, OURS, "thanks").reply == "bot 2 booked"  # the state as it was, plus booked

    entries = client.get(f"/ops/transcripts/{REY}/{OURS}", headers=AUTH).get_json()["entries"]
    assert [(e["direction"], e["body"], e.get("by", "")) for e in entries] == [
        ("in", "hi", ""),
        ("out", "bot 1", ""),
        ("in", "is anyone there?", ""),
        ("out", "Hi, Ana here. Booked you in.", "operator"),
        ("in", "thanks", ""),
        ("out", "bot 2 booked", ""),
    ]
    assert entries[3]["id"] == sent.get_json()["id"]
    assert entries[3]["status"] in ("pending", "queued")  # no status callbacks here (no public URL)


def test_the_hold_times_out_and_a_held_conversation_does_not_expire(redis_url, standin):
    app = make(redis_url, standin, CONVERSATION_TTL=1, HANDOFF_TIMEOUT=3)
    client, twilio = app.test_client(), TwilioSimulator.for_app(app)
    assert twilio.send(REY, OURS, "hi").reply == "bot 1"
    assert client.post(path(), headers=AUTH).status_code == 200
    time.sleep(1.5)  # past CONVERSATION_TTL, within the hold
    assert Sweeper(app).sweep() == 0
    assert client.get(f"/ops/conversations/{REY}/{OURS}", headers=AUTH).status_code == 200
    assert twilio.send(REY, OURS, "still there?").replies == []
    time.sleep(1.7)  # the hold is over: the bot answers again, in the same conversation
    assert twilio.send(REY, OURS, "hello?").reply == "bot 2"
    time.sleep(1.1)  # and its time runs as before
    assert Sweeper(app).sweep() == 1


def test_a_handler_asks_for_a_person(redis_url, standin):
    app = make(redis_url, standin)
    client, twilio = app.test_client(), TwilioSimulator.for_app(app)
    assert twilio.send(REY, OURS, "human").reply == "bot 1"
    [waiting] = client.get("/ops/handoffs", headers=AUTH).get_json()["waiting"]
    assert (waiting["from"], waiting["to"], waiting["reason"]) == (REY, OURS, "asked for a human")
    scraped = client.get("/metrics").get_data(as_text=True)
    assert "sms_conversations_waiting_for_person 1.0" in scraped
    time.sleep(0.05)
    assert client.post(path(), headers=AUTH).status_code == 200
    assert client.get("/ops/handoffs", headers=AUTH).get_json()["waiting"] == []
    scraped = client.get("/metrics").get_data(as_text=True)
    assert "sms_conversations_waiting_for_person 0.0" in scraped
    assert "sms_handoff_wait_seconds_count 1.0" in scraped


def test_the_cli(redis_url, standin):
    app = make(redis_url, standin)
    twilio, runner = TwilioSimulator.for_app(app), app.test_cli_runner()
    assert twilio.send(REY, OURS, "human").reply == "bot 1"
    waiting = runner.invoke(args=["handoff", "waiting", "--json"])
    assert [w["from"] for w in json.loads(waiting.output)] == [REY]
    assert runner.invoke(args=["handoff", "take", REY, OURS]).exit_code == 0
    assert twilio.send(REY, OURS, "hello").replies == []
    replied = runner.invoke(args=["handoff", "reply", REY, OURS, "on it"])
    assert replied.exit_code == 0, replied.output
    back = runner.invoke(args=["handoff", "back", REY, OURS, "--set", "booked=true"])
    assert back.exit_code == 0, back.output
    assert twilio.send(REY, OURS, "ok").reply == "bot 2 booked"
    assert runner.invoke(args=["handoff", "take", "+15550009999", OURS]).exit_code == 1


def test_the_console_overview_flags_who_waits_for_a_person(redis_url, standin):
    from tests.test_console import sign_in

    app = make(redis_url, standin)
    client = app.test_client()
    assert TwilioSimulator.for_app(app).send(REY, OURS, "human").reply == "bot 1"
    sign_in(client, OPS)
    page = client.get("/console/").get_data(as_text=True)
    waiting = page[
        page.index('<section id="waiting"') : page.index("</section>", page.index('<section id="waiting"'))
    ]
    assert "Waiting for a person (1)" in waiting
    assert f"{REY} → {OURS}" in waiting
    assert "asked for a human" in waiting
    client.post(path(), headers=AUTH)
    assert "Nobody waits for a person" in client.get("/console/").get_data(as_text=True)
