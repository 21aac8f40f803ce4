"""Sending first, from outside a webhook (``service.send``, ``sms-sessions send``,
``POST /ops/messages``), and the rules kept before anything leaves (opt-out, WhatsApp's
24-hour window): on a real redis-server, the Twilio stand-in on a real socket."""

from __future__ import annotations

import json
import time

import pytest

from service import Refused, create_app, send
from service.delivery import Delivery
from service.keys import Keys
from service.sender import Sender
from service.sending import send_command
from tests.support.app import sign, webhook_params
from tests.support.app_servers import sms_sessions
from tests.support.numbers import FINN, OURS, REY
from tests.support.standin import AUTH_TOKEN
from tests.support.waiting import wait_until

OPS = "o" * 40
WHATSAPP_USER, WHATSAPP_OURS = "whatsapp:" + FINN, "whatsapp:" + OURS


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


def break_pooled_readers(app) -> None:
    """Every pooled connection's hiredis reader as a failover leaves it under another thread
    (``tests/test_cluster.py``'s ``ReaderGone``): redis-py then raises ``AttributeError``."""
    from service.wiring import current
    from tests.test_cluster import ReaderGone

    client = current(app).redis
    client.ping()  # a pooled connection, connected
    pooled = client.connection_pool._available_connections
    assert pooled
    for connection in pooled:
        connection._parser._reader = ReaderGone()


def test_redis_py_failing_in_its_own_way_is_an_outage_for_every_way_of_sending(app, standin, caplog):
    """What redis-py raises from its own code under a failover (``AttributeError … 'feed'``,
    redis_client.is_outage): ``sms-sessions send`` prints one line and exits 1, the API answers
    503, and the sender's thread skips the pass and goes on, delivering on the next."""
    auth = {"Authorization": f"Bearer {OPS}"}
    break_pooled_readers(app)
    result = app.test_cli_runner().invoke(send_command, ["--to", REY, "hi"])
    assert result.exit_code == 1, result.output
    assert "Redis unavailable: AttributeError" in result.output
    break_pooled_readers(app)
    answer = app.test_client().post("/ops/messages", json={"to": REY, "text": "x"}, headers=auth)
    assert answer.status_code == 503
    send(REY, "after the failover", app=app)
    break_pooled_readers(app)
    sender = Sender(app)
    thread = sender.start()
    try:
        wait_until(lambda: held(standin), what="the message delivered on a later pass")
        assert thread.is_alive()
    finally:
        sender.stop()
    assert held(standin) == ["after the failover"]
    assert "outbound pass skipped: Redis AttributeError" in caplog.text


def test_a_failing_on_status_is_logged_by_its_type_and_line_never_its_text(app, capsys):
    """Like the handler's and the end hook's failures: what ``on_status`` raised may quote what
    it read (here Twilio's error message), so its line names the type and where, not the text."""
    from types import SimpleNamespace

    from service.sender import StatusUpdate, notify
    from service.wiring import current

    def on_status(update):
        int(update.error_message)

    wired = SimpleNamespace(metrics=current(app).metrics, on_status=on_status)
    capsys.readouterr()
    notify(wired, StatusUpdate("m1", "SM1", "failed", "sent", REY, OURS, "30007", "five secret words"))
    output = capsys.readouterr().out
    assert "secret" not in output
    line = on_status.__code__.co_firstlineno + 1
    assert f"on_status failed: ValueError at test_sending.py:{line} in on_status" in output


def test_closed_whatsapp_windows_are_forgotten_opt_outs_are_kept(app, standin, redis_client):
    """A window's field in the tag's contacts goes once its 24 hours have passed, a step at a
    time as the tag's WhatsApp messages come in (600 closed ones: more than one step holds);
    an open window stays, and an opt-out, however old, is kept until its START."""
    from service.clock import now_ms

    contacts = Keys().conversation(WHATSAPP_USER, WHATSAPP_OURS).contacts
    day = 24 * 3600 * 1000
    now = now_ms()
    closed = {f"w:whatsapp:+1666{n:07d}|{WHATSAPP_OURS}": now - day - 60_000 - n for n in range(600)}
    opted_out = "+1777000" + FINN[-4:]  # FINN's tag, so its opt-out is in these contacts
    kept = {f"w:whatsapp:+17770000001|{WHATSAPP_OURS}": now - day + 3_600_000, opted_out: now - 400 * day}
    redis_client.hset(contacts, mapping={**closed, **kept})
    for turn in range(200):
        assert text(app, f"hi {turn}", sender=WHATSAPP_USER, recipient=WHATSAPP_OURS).status_code == 200
        if not set(closed) & set(redis_client.hkeys(contacts)):
            break
    assert turn > 0  # it took steps, not one pass over the whole hash per message
    left = redis_client.hgetall(contacts)
    assert not set(closed) & set(left)
    assert {name: int(left[name]) for name in kept} == kept
    assert f"w:{WHATSAPP_USER}|{WHATSAPP_OURS}" in left  # this pair's window, just opened
    send(WHATSAPP_USER, "free text in the open window", sender=WHATSAPP_OURS, app=app)
    with pytest.raises(Refused):
        send(opted_out, "opted out long ago", sender=OURS, app=app)


MESSAGING_SERVICE = "MG" + "5" * 32


def test_with_a_messaging_service_alone_a_send_names_its_number(standin, redis_url):
    """The conversation, and the reply, are keyed by our number, which a Messaging Service
    alone picks only once the message is sent: with no TWILIO_FROM_NUMBER each way of sending
    refuses a message naming none, and names the argument to give; one naming our number goes
    through the service from that number, and the reply continues its conversation."""
    config = {
        **standin.config(TWILIO_FROM_NUMBER=None, TWILIO_MESSAGING_SERVICE_SID=MESSAGING_SERVICE),
        "REDIS_URL": redis_url,
        "OPS_TOKEN": OPS,
    }
    app = create_app(config, handler=reminder_bot)
    with pytest.raises(ValueError, match=r"give sender= .*TWILIO_FROM_NUMBER.*Messaging Service"):
        send(REY, "no number", app=app)
    result = app.test_cli_runner().invoke(send_command, ["--to", REY, "no number"])
    assert result.exit_code == 1
    assert "give --from (one of our numbers" in result.output
    auth = {"Authorization": f"Bearer {OPS}"}
    answer = app.test_client().post("/ops/messages", json={"to": REY, "text": "x"}, headers=auth)
    assert answer.status_code == 400
    assert 'give "from" (one of our numbers' in answer.json["error"]
    sent = send(REY, "Reply OK to confirm", sender=OURS, state={"appointment": "3 pm"}, app=app)
    drain(app)
    [created] = standin.inbox(REY)
    fetched = Delivery.from_config(config).twilio.messages(created["sid"]).fetch()
    assert (fetched.from_, fetched.messaging_service_sid) == (OURS, MESSAGING_SERVICE)
    assert b"Confirmed: 3 pm. (new: False)" in text(app, "ok", recipient=OURS).data
    assert sent.started


def test_what_this_process_queues_wakes_its_sender_at_once(standin, redis_url):
    """The sender waits ``SENDER_INTERVAL`` (here a minute) between passes that find nothing,
    but a message this process queues (``service.send``, a handler's reply) rings its doorbell:
    the next pass starts at once."""
    config = {**standin.config(), "REDIS_URL": redis_url, "SENDER_INTERVAL": 60}
    app = create_app(config, handler=reminder_bot)
    sender = Sender(app)
    sender.start()
    try:
        time.sleep(0.3)  # its first pass found nothing: it waits its minute now
        send(REY, "Reply YES to confirm", app=app)
        wait_until(lambda: held(standin) == ["Reply YES to confirm"], seconds=10, what="the send delivered")
        assert text(app, "hello").status_code == 200
        wait_until(lambda: "echo hello" in held(standin), seconds=10, what="the handler's message delivered")
    finally:
        sender.stop()
