"""Sending first, from outside a webhook (``service.send``, ``sms-sessions send``,
``POST /ops/messages``), and the rules kept before anything leaves (opt-out, WhatsApp's
24-hour window): on a real redis-server, the Twilio stand-in on a real socket."""

from __future__ import annotations

import json

import pytest

from service import Refused, create_app, send
from service.keys import Keys
from service.sender import Sender
from tests.support.app import sign, webhook_params
from tests.support.app_servers import sms_sessions
from tests.support.numbers import FINN, OURS, REY
from tests.support.standin import AUTH_TOKEN, StandinServer

OPS = "o" * 40
WHATSAPP_USER, WHATSAPP_OURS = "whatsapp:" + FINN, "whatsapp:" + OURS


@pytest.fixture
def standin():
    with StandinServer() as server:
        yield server


def reminder_bot(message, conversation):
    """The README's appointment reminder: the reply to 'Reply YES to confirm'."""
    if message.body.strip().upper() == "OK" and "appointment" in conversation:
        conversation["confirmed"] = True
        return f"Confirmed: {conversation['appointment']}. (new: {conversation.is_new})"
    conversation.send(f"echo {message.body}")
    return f"messages={conversation.messages}"


@pytest.fixture
def app(standin, redis_url):
    config = {**standin.config(), "REDIS_URL": redis_url, "OPS_TOKEN": OPS, "DELIVERY_RETRY_BASE": 0.1}
    return create_app(config, handler=reminder_bot)


def text(app, body, sender=REY, recipient=OURS, **extra):
    params = webhook_params(sender=sender, recipient=recipient, body=body, **extra)
    headers = {"X-Twilio-Signature": sign("http://localhost/sms", params, AUTH_TOKEN)}
    return app.test_client().post("/sms", data=params, headers=headers)


def held(standin, to=REY) -> list[str]:
    return [message["body"] for message in standin.inbox() if message["to"] == to]


def drain(app) -> None:
    sender = Sender(app)
    for _ in range(50):
        if not sender.send_due():
            return
    raise AssertionError("still sending")


def test_sending_first_starts_a_conversation_the_reply_continues(app, standin, redis_client):
    sent = send(REY, "Dentist tomorrow 3 pm. Reply OK to confirm.", state={"appointment": "3 pm"}, app=app)
    assert sent.started
    events = redis_client.xrange(Keys().events)
    assert [(fields["type"], fields["conversation"]) for _, fields in events] == [
        ("started", sent.conversation)
    ]
    drain(app)
    assert held(standin) == ["Dentist tomorrow 3 pm. Reply OK to confirm."]
    reply = text(app, "ok")
    assert b"Confirmed: 3 pm. (new: False)" in reply.data
    stored = redis_client.hgetall(Keys().conversation(REY, OURS).conversation)
    assert stored["sid"] == sent.conversation
    assert json.loads(stored["state"]) == {"appointment": "3 pm", "confirmed": True}
    assert stored["seq"] == "1"
    assert len(redis_client.xrange(Keys().events)) == 1  # still the one 'started'


def test_sending_into_a_live_conversation_keeps_its_state_and_order(app, standin, redis_client):
    assert text(app, "first").status_code == 200  # queues 'echo first'
    sent = send(REY, "from a job", state={"ignored": True}, app=app)
    assert not sent.started
    assert b"messages=2" in text(app, "second").data
    drain(app)
    assert held(standin) == ["echo first", "from a job", "echo second"]
    state = json.loads(redis_client.hget(Keys().conversation(REY, OURS).conversation, "state"))
    assert state == {}


def test_the_cli_sends_with_state_and_json(standin, redis_url, redis_client):
    environment = {"REDIS_URL": redis_url, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_FROM_NUMBER": OURS}
    result = sms_sessions(
        "send", "--to", REY, "--state", '{"step": 1}', "--json", "Hello first", **environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    sent = json.loads(result.stdout)
    assert sent["started"] is True
    stored = redis_client.hgetall(Keys().conversation(REY, OURS).conversation)
    assert json.loads(stored["state"]) == {"step": 1}
    bad = sms_sessions("send", "--to", REY, "--state", "[1]", "x", **environment)
    assert bad.returncode == 2
    assert "a JSON object" in bad.stderr


def test_the_operators_api_sends(app, standin):
    client = app.test_client()
    auth = {"Authorization": f"Bearer {OPS}"}
    assert client.post("/ops/messages", json={"to": REY, "text": "hi"}).status_code == 401
    created = client.post("/ops/messages", json={"to": REY, "text": "From the desk"}, headers=auth)
    assert created.status_code == 201
    assert created.json["started"] is True
    assert client.post("/ops/messages", json={"to": REY}, headers=auth).status_code == 400
    assert (
        client.post("/ops/messages", json={"to": REY, "text": "x", "oops": 1}, headers=auth).status_code
        == 400
    )
    drain(app)
    assert held(standin) == ["From the desk"]


def test_an_opted_out_number_is_refused_until_start(app, standin):
    assert text(app, "hello").status_code == 200  # queues 'echo hello'
    assert text(app, "STOP").status_code == 200
    with pytest.raises(Refused, match=r"opted out \(STOP\)") as refused:
        send(REY, "are you there?", app=app)
    assert refused.value.code == 21610
    auth = {"Authorization": f"Bearer {OPS}"}
    answer = app.test_client().post("/ops/messages", json={"to": REY, "text": "x"}, headers=auth)
    assert (answer.status_code, answer.json["code"]) == (422, 21610)
    drain(app)
    assert held(standin) == []  # what was queued before the STOP is held back too
    assert text(app, "START").status_code == 200  # queues 'echo START'
    send(REY, "welcome back", app=app)
    drain(app)
    assert held(standin) == ["echo START", "welcome back"]


def test_a_handlers_message_to_an_opted_out_number_is_recorded_refused(app, standin, redis_client):
    assert text(app, "STOP", OptOutType="STOP").status_code == 200
    assert text(app, "hello again").status_code == 200  # a new conversation; its send is held
    drain(app)
    assert held(standin) == []
    keys = Keys().conversation(REY, OURS)
    [state] = [json.loads(v) for k, v in redis_client.hgetall(keys.sent).items() if k.endswith(":s")]
    assert (state["status"], state["error_code"]) == ("failed", "21610")


def test_whatsapp_free_text_needs_the_24_hour_window_templates_do_not(app, standin):
    with pytest.raises(Refused, match="24-hour window") as refused:
        send(WHATSAPP_USER, "free text", sender=WHATSAPP_OURS, app=app)
    assert refused.value.code == 63016
    send(
        WHATSAPP_USER,
        sender=WHATSAPP_OURS,
        content_sid="HX" + "1" * 32,
        content_variables={"1": "3 pm"},
        app=app,
    )
    assert text(app, "hi", sender=WHATSAPP_USER, recipient=WHATSAPP_OURS).status_code == 200  # opens it
    send(WHATSAPP_USER, "now free text goes", sender=WHATSAPP_OURS, app=app)
    drain(app)
    assert len(held(standin, WHATSAPP_USER)) == 3  # the template, the handler's echo, the free text
    assert held(standin, WHATSAPP_USER)[1:] == ["echo hi", "now free text goes"]


def test_a_conversation_started_by_sending_is_live_for_operators(app):
    sent = send(REY, "Reply OK to confirm.", state={"appointment": "3 pm"}, app=app)
    shown = app.test_client().get(
        f"/ops/conversations/{REY}/{OURS}", headers={"Authorization": f"Bearer {OPS}"}
    )
    assert shown.status_code == 200
    assert shown.json["messages"] == 0
    assert shown.json["state"] == {"appointment": "3 pm"}
    assert shown.json["last_seen"] == shown.json["first_seen"]
    assert sent.started


def test_twilios_own_opt_out_refusal_is_kept_as_an_opt_out(app, standin):
    """An opt-out this service never saw (say, made before it ran): Twilio refuses with 21610,
    and from then on sending is refused here, before any call, until START."""
    send(REY, "hello", app=app)
    standin.fault(to=REY, count=1, error=21610)
    drain(app)
    with pytest.raises(Refused) as refused:
        send(REY, "again", app=app)
    assert refused.value.code == 21610
    assert text(app, "START").status_code == 200
    send(REY, "welcome back", app=app)
    drain(app)
    assert held(standin) == ["echo START", "welcome back"]
