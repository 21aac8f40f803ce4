"""The handler API on a real Redis, with handlers other than the counter: what a bot gets,
what is saved, and the guarantees that hold for any handler."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from types import MappingProxyType
from xml.etree import ElementTree

import pytest
from twilio.twiml.messaging_response import MessagingResponse

from service import create_app
from service.handler import Message
from service.keys import Keys
from service.redis_client import connect
from service.settings import ConfigError
from service.simulator import TwilioSimulator
from service.store import Commit, ConversationStore, Opened, Waiting
from service.wiring import current
from tests.support.app import TOKEN, make_app, post_signed, webhook_params
from tests.support.app_servers import LiveServer, sms_sessions
from tests.support.numbers import OURS, REY
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_until

KEYS = Keys()


def notebook(message, conversation):
    """Keeps every body in a list and a nested tally; answers with the list's length."""
    conversation.setdefault("bodies", []).append(message.body)
    tally = conversation.setdefault("tally", {"chars": 0})
    tally["chars"] += len(message.body)
    return f"{len(conversation['bodies'])} noted"


def stored(redis_client, sender=REY) -> dict:
    return redis_client.hgetall(KEYS.conversation(sender, OURS).conversation)


def state(redis_client, sender=REY) -> dict:
    return json.loads(stored(redis_client, sender)["state"])


@pytest.fixture
def app_with(redis_url):
    def build(handler, **settings):
        return (
            make_app(REDIS_URL=redis_url, **settings)
            if handler is None
            else create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url, **settings}, handler=handler)
        )

    return build


def test_state_and_nested_changes_are_kept_across_messages(app_with, redis_client):
    twilio = TwilioSimulator.for_app(app_with(notebook))
    replies = [twilio.send(REY, OURS, body).reply for body in ("one", "three", "seven")]
    assert replies == ["1 noted", "2 noted", "3 noted"]
    assert state(redis_client) == {"bodies": ["one", "three", "seven"], "tally": {"chars": 13}}
    assert stored(redis_client)["seq"] == "3"


def test_what_the_handler_sees(app_with, tmp_path):
    callers = tmp_path / "callers.json"
    callers.write_text(json.dumps({REY: "Rey"}))
    seen = []

    def inspect(message, conversation):
        seen.append((message, conversation.messages, conversation.is_new, conversation.started_at))
        return None

    twilio = TwilioSimulator.for_app(app_with(inspect, CALLERS_FILE=str(callers)))
    twilio.send(REY, OURS, "look", media=["https://api.twilio.com/m/ME1", "https://api.twilio.com/m/ME2"])
    twilio.send(REY, OURS, "again")
    (first, messages, is_new, started), (second, messages2, is_new2, started2) = seen
    assert (first.sender, first.recipient, first.body, first.caller_name) == (REY, OURS, "look", "Rey")
    assert first.media == ("https://api.twilio.com/m/ME1", "https://api.twilio.com/m/ME2")
    assert first.sid.startswith("SM")
    assert first.params["MessageSid"] == first.sid
    assert first.params["NumSegments"] == "1"
    assert isinstance(first.params, MappingProxyType)
    with pytest.raises(TypeError):
        first.params["Body"] = "changed"  # read-only
    assert (messages, is_new, messages2, is_new2) == (1, True, 2, False)
    assert started == started2
    assert started.tzinfo is not None


def test_no_reply_still_saves_the_state(app_with, redis_client):
    def silent(message, conversation):
        conversation["seen"] = conversation.get("seen", 0) + 1

    client = app_with(silent).test_client()
    response = post_signed(client, webhook_params())
    assert response.status_code == 200
    assert response.data.endswith(b"<Response />")
    post_signed(client, webhook_params())
    assert state(redis_client) == {"seen": 2}


def test_a_messaging_response_is_answered_as_built(app_with):
    def rich(message, conversation):
        reply = MessagingResponse()
        reply.message("first")
        reply.message("second").media("https://example.com/cat.jpg")
        return reply

    first = TwilioSimulator.for_app(app_with(rich)).send(REY, OURS, "hi")
    assert first.status == 200
    assert (
        "<Message>first</Message><Message>second<Media>https://example.com/cat.jpg</Media></Message>"
    ) in first.body


def test_end_makes_this_message_the_last(app_with, redis_client):
    def two_step(message, conversation):
        if conversation.is_new:
            conversation["asked"] = True
            return "question?"
        conversation.end()
        return f"bye after {conversation.messages}"

    twilio = TwilioSimulator.for_app(app_with(two_step))
    assert [twilio.send(REY, OURS, b).reply for b in ("a", "b", "c")] == [
        "question?",
        "bye after 2",
        "question?",
    ]
    assert state(redis_client) == {"asked": True}
    assert stored(redis_client)["seq"] == "1"


def test_a_failing_handler_answers_500_and_saves_nothing(app_with, redis_client, capsys):
    def fragile(message, conversation):
        conversation.setdefault("bodies", []).append(message.body)
        if message.body.startswith("five"):
            return str(int(message.body))  # ValueError, quoting the text
        return "ok"

    app = app_with(fragile)
    client = app.test_client()
    assert post_signed(client, webhook_params(body="fine")).status_code == 200
    before = stored(redis_client)
    capsys.readouterr()
    failed = post_signed(client, webhook_params(body="five secret words"))
    assert failed.status_code == 500
    assert b"handler failed" in failed.data
    assert stored(redis_client) == before  # no state, no reply memory, no count
    assert not redis_client.exists(KEYS.conversation(REY, OURS).lock)  # released at once
    output = capsys.readouterr().out
    assert "secret" not in output  # the body never reaches the logs, not even in the error
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 1
    assert lines[0]["outcome"] == "error"
    assert lines[0]["level"] == "error"
    line = fragile.__code__.co_firstlineno + 3
    assert lines[0]["reason"] == f"the handler failed: ValueError at test_handler.py:{line} in fragile"
    assert "Traceback" in lines[0]["error"]
    assert "in fragile" in lines[0]["error"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sms_messages_received_total{outcome="error"} 1.0' in metrics
    assert post_signed(client, webhook_params(body="after")).status_code == 200
    assert state(redis_client) == {"bodies": ["fine", "after"]}


def test_a_key_error_on_state_logs_no_text_of_the_state(app_with, capsys):
    def lookup(message, conversation):
        return conversation[message.body]

    assert post_signed(app_with(lookup).test_client(), webhook_params(body="my secret")).status_code == 500
    output = capsys.readouterr().out
    assert "KeyError at test_handler.py" in output
    assert "secret" not in output


def _raise(error: BaseException):
    raise error


@pytest.mark.parametrize(
    "raised",
    [KeyboardInterrupt(), SystemExit(3), SystemExit(0), asyncio.CancelledError(), GeneratorExit()],
    ids=lambda error: type(error).__name__ + "".join(f"({a})" for a in error.args),
)
def test_whatever_a_handler_raises_is_a_500_for_that_message(app_with, redis_client, capsys, raised):
    def raising(message, conversation):
        conversation["touched"] = True
        if message.body == "raise":
            _raise(raised)
        return "ok"

    client = app_with(raising).test_client()
    failed = post_signed(client, webhook_params(body="raise"))
    assert failed.status_code == 500
    assert b"handler failed" in failed.data
    assert stored(redis_client) == {}
    assert not redis_client.exists(KEYS.conversation(REY, OURS).lock)
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["reason"].startswith(f"the handler failed: {type(raised).__name__} at test_handler.py")
    assert post_signed(client, webhook_params(body="fine")).status_code == 200


@pytest.mark.parametrize(
    "bad",
    [lambda m, c: 42, lambda m, c: c.update(when=object())],
    ids=["reply-of-a-wrong-type", "state-that-is-not-json"],
)
def test_a_reply_or_state_the_service_cannot_keep_is_a_500(app_with, redis_client, bad):
    client = app_with(bad).test_client()
    assert post_signed(client, webhook_params()).status_code == 500
    assert stored(redis_client) == {}
    assert not redis_client.exists(KEYS.conversation(REY, OURS).lock)


def _many(text: str, count: int) -> MessagingResponse:
    reply = MessagingResponse()
    for _ in range(count):
        reply.message(text)
    return reply


@pytest.mark.parametrize(
    ("reply", "update", "reason"),
    [
        ("\ud800", {}, "its reply holds U+D800, which TwiML (XML 1.0 in UTF-8) cannot carry"),
        (_many("ok \udfff", 2), {}, "its reply is not well-formed XML"),
        ("ok", {"kept": "x\ud800"}, "its state holds a lone surrogate, which UTF-8 cannot carry"),
        ("ok", {"score": math.nan}, "ValueError"),
        ("ok", {"score": math.inf}, "ValueError"),
        ("bell \x07", {}, "its reply holds U+0007, which TwiML (XML 1.0 in UTF-8) cannot carry"),
        (_many("nul \x00", 1), {}, "U+0000"),
        ("x" * 64_001, {}, "its reply is 64079 bytes of TwiML, over Twilio's 64000"),
        (_many("é" * 1600, 20), {}, "over Twilio's 64000"),
    ],
    ids=["surrogate", "surrogate-twiml", "surrogate-state", "nan", "infinity", "bell", "nul", "long", "many"],
)
def test_a_reply_or_state_twilio_or_redis_cannot_take_is_the_handlers_failure(
    app_with, redis_client, capsys, reply, update, reason
):
    """Lone surrogates (which reach Redis' client only once the save began), characters XML
    excludes, NaN and a reply over Twilio's 64 kB: a 500, nothing saved, the lock released
    at once, and a reason that quotes none of it."""

    def handle(message, conversation):
        conversation.update(update)
        return reply

    failed = post_signed(app_with(handle).test_client(), webhook_params())
    assert failed.status_code == 500
    assert b"handler failed" in failed.data
    assert stored(redis_client) == {}
    assert not redis_client.exists(KEYS.conversation(REY, OURS).lock)
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["reason"].startswith("the handler failed: ")
    assert reason in line["reason"]


@pytest.mark.parametrize(
    "reply",
    ["tab\tnew\nline\r and \U0001f600 é", _many("é" * 1600, 10)],
    ids=["whitespace-and-emoji", "ten-longest-messages"],
)
def test_replies_twilio_can_take_are_sent_as_well_formed_twiml(app_with, redis_client, reply):
    sent = post_signed(app_with(lambda message, conversation: reply).test_client(), webhook_params())
    assert sent.status_code == 200
    assert ElementTree.fromstring(sent.data).tag == "Response"  # well-formed
    assert stored(redis_client)["seq"] == "1"


@pytest.mark.parametrize("planted", ['{"kept": "\\ud800"}', '{"score": NaN}', '{"score": -Infinity}'])
def test_stored_state_that_could_not_be_saved_again_starts_afresh(app_with, redis_client, planted):
    """A hand edit that JSON reads but that could never be saved again (a lone surrogate,
    NaN) is unreadable state: the conversation starts afresh rather than fail each message
    until it expires."""
    app = app_with(lambda message, conversation: f"{conversation.messages} {sorted(conversation)}")
    twilio = TwilioSimulator.for_app(app)
    assert twilio.send(REY, OURS, "one").reply == "1 []"
    redis_client.hset(KEYS.conversation(REY, OURS).conversation, "state", planted)
    assert twilio.send(REY, OURS, "two").reply == "1 []"
    assert twilio.send(REY, OURS, "three").reply == "2 []"
    assert state(redis_client) == {}


def test_a_redelivery_gets_the_first_answer_without_calling_the_handler(app_with, redis_client):
    calls = []

    def counting(message, conversation):
        calls.append(message.sid)
        return f"call {len(calls)}"

    twilio = TwilioSimulator.for_app(app_with(counting))
    first = twilio.send(REY, OURS, "x")
    again = twilio.send(REY, OURS, "x", message_sid=first.message_sid)
    assert again.status == 200
    assert again.reply == "call 1"
    assert calls == [first.message_sid]


def test_30_simultaneous_messages_leave_30_entries(app_with, redis_client):
    with LiveServer(app_with(notebook)) as server:
        sims = [TwilioSimulator(server.url, TOKEN) for _ in range(30)]
        barrier = threading.Barrier(30)
        results = [None] * 30

        def send(index):
            barrier.wait()
            results[index] = sims[index].send(REY, OURS, f"m{index}")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [r.status for r in results] == [200] * 30
    assert sorted(r.reply for r in results) == sorted(f"{n} noted" for n in range(1, 31))
    assert sorted(state(redis_client)["bodies"]) == sorted(f"m{i}" for i in range(30))


@pytest.mark.parametrize("read_timeout", [0.5, 0.1], ids=["handed-over", "sleeping-between-asks"])
def test_messages_that_queued_are_handled_in_arrival_order(app_with, redis_client, read_timeout):
    """The lock is held; eight messages arrive one after another and wait; once it is free
    they are applied in the order they arrived, not in whatever order their asks land: each
    save handing the turn over, or (REDIS_TIMEOUT under 0.2 s, too short for a BLPOP) each
    waiter sleeping between its asks."""
    keys = KEYS.conversation(REY, OURS)
    redis_client.set(keys.lock, "held-by-someone", px=60_000)
    with LiveServer(app_with(notebook, LOCK_WAIT=20.0, REDIS_TIMEOUT=read_timeout)) as server:
        twilio = TwilioSimulator(server.url, TOKEN, timeout=30)
        threads = []
        for index in range(8):
            thread = threading.Thread(target=twilio.send, args=(REY, OURS, f"m{index}"))
            thread.start()
            threads.append(thread)
            wait_until(
                lambda: redis_client.zcard(keys.queue) == index + 1,
                seconds=10,
                what=f"message {index} in line",
            )
        redis_client.delete(keys.lock)
        for thread in threads:
            thread.join()
    assert state(redis_client)["bodies"] == [f"m{i}" for i in range(8)]
    assert not redis_client.exists(keys.queue)
    assert not redis_client.exists(keys.waiters)


class Patient(ConversationStore):
    """Asks again only every 6 s: only a hand-over explains a turn taken sooner."""

    POLL_FIRST = POLL_MAX = 6.0


class Counting(Patient):
    """Counts the OPEN script's runs: a turn handed over with its state needs no second one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opens = 0

    def _run(self, script, *args):
        self.opens += script is self._open
        return super()._run(script, *args)


def patient_store(redis_url) -> Counting:
    store = Counting(
        connect(redis_url, 10),
        ttl=3600,
        lock_ttl=30,
        lock_wait=30,
        redelivery_window=60,
        replies_kept=100,
        read_timeout=10,
    )
    store.preload()
    return store


@pytest.mark.parametrize("gives_back", ["save", "release"])
def test_the_turn_is_handed_to_the_next_in_line(redis_url, redis_client, gives_back):
    """docs/design.md: the holder's save hands the lock to the first in line (its release, a
    failed handler, wakes it to ask again), marked for the one still behind it, whose save
    hands it on: two queued messages take their turns at once, not at their next ask 6 s
    later."""
    store = patient_store(redis_url)
    keys = KEYS.conversation(REY, OURS)
    holder = store.open(keys, "SM0")
    taken: list[int] = []

    def next_in_line(number: int) -> None:
        opened = store.open(keys, f"SM{number}")
        taken.append(number)
        store.save(
            keys, opened, Commit(sid="s", state="{}", is_new=False, message_sid=f"SM{number}", answer="a")
        )

    waiters = [threading.Thread(target=next_in_line, args=(number,)) for number in (1, 2)]
    for number, waiter in enumerate(waiters, 1):
        waiter.start()
        wait_until(
            lambda: redis_client.zcard(keys.queue) == number, seconds=10, what=f"message {number} in line"
        )
    if gives_back == "save":
        store.save(keys, holder, Commit(sid="s", state="{}", is_new=True, message_sid="SM0", answer="a"))
    else:
        store.release(keys, holder.token)
    handed_over_by = time.monotonic() + 4  # both, in all: a single ask would come at 6 s
    for waiter in waiters:
        waiter.join(timeout=max(0.0, handed_over_by - time.monotonic()))
    assert taken == [1, 2]
    assert not any(waiter.is_alive() for waiter in waiters)
    assert redis_client.hget(keys.conversation, "seq") == ("3" if gives_back == "save" else "2")
    assert not redis_client.exists(keys.lock, keys.queue, keys.waiters)


def test_a_save_hands_the_lock_over_with_the_conversation_as_it_left_it(redis_url, redis_client):
    """docs/design.md: the waiter gets the lock and the saved state from the save itself, in
    its wake-up list: one OPEN in all (its first ask), and the state the holder just wrote."""
    store = patient_store(redis_url)
    keys = KEYS.conversation(REY, OURS)
    holder = store.open(keys, "SM0")
    handed: list = []
    waiter = threading.Thread(target=lambda: handed.append(store.open(keys, "SM1")))
    waiter.start()
    wait_until(lambda: redis_client.zcard(keys.queue) == 1, seconds=10, what="the waiter in line")
    opens_before = store.opens
    state = '{"n": 1, "name": "Zo\u00eb \\"\u2603\\" /"}'  # passed on exactly, as JSON inside JSON
    store.save(keys, holder, Commit(sid="s0", state=state, is_new=True, message_sid="SM0", answer="a0"))
    waiter.join(timeout=4)  # its next ask would come 6 s later
    assert not waiter.is_alive()
    assert store.opens == opens_before
    (opened,) = handed
    assert (opened.sid, opened.state, opened.seq, opened.answered) == ("s0", state, "1", None)
    assert opened.now >= holder.now
    assert redis_client.get(keys.lock) == opened.token  # nobody behind it: unmarked
    store.save(keys, opened, Commit(sid="s0", state='{"n": 2}', is_new=False, message_sid="SM1", answer="a1"))
    assert redis_client.hget(keys.conversation, "seq") == "2"
    assert not redis_client.exists(keys.lock, keys.queue, keys.waiters, keys.wake + opened.token)


def test_a_redelivery_waiting_behind_its_original_gets_the_answer_from_the_hand_over(redis_url, redis_client):
    """Twilio redelivers SM1 while SM1 is being answered: the redelivery waits in line, and the
    save of the original hands it the stored answer (not the lock), and the lock to the next."""
    store = patient_store(redis_url)
    keys = KEYS.conversation(REY, OURS)
    holder = store.open(keys, "SM1")
    results: dict[str, object] = {}

    def deliver(message_sid: str, name: str) -> None:
        results[name] = store.open(keys, message_sid)

    threads = []
    for number, (message_sid, name) in enumerate((("SM1", "redelivery"), ("SM2", "next")), 1):
        threads.append(threading.Thread(target=deliver, args=(message_sid, name)))
        threads[-1].start()
        wait_until(lambda: redis_client.zcard(keys.queue) == number, seconds=10, what=f"{name} in line")
    opens_before = store.opens
    store.save(
        keys, holder, Commit(sid="s", state="{}", is_new=True, message_sid="SM1", answer="first answer")
    )
    for thread in threads:
        thread.join(timeout=4)
    assert not any(thread.is_alive() for thread in threads)
    assert store.opens == opens_before
    assert results["redelivery"].answered == "first answer"
    assert results["next"].answered is None
    assert redis_client.get(keys.lock) == results["next"].token


def queued_behind_a_save(store: Counting, keys, token: str, state: str) -> None:
    """A waiter with ``token`` asks once for SM1 (in line, then not listening), and the holder
    saves ``state``."""
    holder = store.open(keys, "SM0")
    assert store.ask(keys, "SM1", token) == Waiting(ahead=0)
    store.save(keys, holder, Commit(sid="s", state=state, is_new=True, message_sid="SM0", answer="a0"))


def test_a_turn_handed_over_while_its_waiter_was_not_listening_is_taken_at_its_next_ask(
    redis_url, redis_client
):
    """A waiter whose BLPOP gave up just before the save handed it the lock finds the lock its
    own at its next ask, instead of queueing again behind itself."""
    store = patient_store(redis_url)
    keys = KEYS.conversation(REY, OURS)
    queued_behind_a_save(store, keys, "SM1;00000000000000aa", '{"n": 1}')
    assert redis_client.get(keys.lock) == "SM1;00000000000000aa"
    again = store.ask(keys, "SM1", "SM1;00000000000000aa")
    assert isinstance(again, Opened)
    assert again.answered is None
    assert again.state == '{"n": 1}'
    assert not redis_client.exists(keys.queue, keys.waiters)


@pytest.mark.parametrize("token", ["SM1:00000000000000bb", "00000000000000bb"], ids=["colon", "bare-hex"])
def test_a_waiter_of_an_earlier_version_is_woken_to_ask_again(redis_url, redis_client, token):
    """During a rolling deploy a waiter from a worker still on a version before service/store/
    (0.1.0; its token ``<MessageSid>:<hex>``, or bare hex before commit fef70c2; it reads no
    JSON map) is only woken, as a release wakes it: the lock is freed for its next ask."""
    store = patient_store(redis_url)
    keys = KEYS.conversation(REY, OURS)
    queued_behind_a_save(store, keys, token, "{}")
    assert not redis_client.exists(keys.lock)
    assert redis_client.lrange(keys.wake + token, 0, -1) == ["1"]
    assert isinstance(store.ask(keys, "SM1", token), Opened)


def test_a_waiter_that_stops_asking_drops_out_of_line(app_with, redis_client):
    """A worker that died while waiting must not hold up the messages behind it forever."""
    keys = KEYS.conversation(REY, OURS)
    redis_client.zadd(keys.queue, {"dead-waiter": 1})
    redis_client.hset(keys.waiters, "dead-waiter", 0)  # it stopped asking long ago
    assert TwilioSimulator.for_app(app_with(notebook)).send(REY, OURS, "hi").reply == "1 noted"
    assert not redis_client.exists(keys.queue)


@pytest.mark.parametrize(
    "stop",
    [
        {"Body": " stop "},
        {"Body": "Unsubscribe"},
        {"Body": "QUIT"},
        {"Body": "cancel"},
        {"Body": "End"},
        {"Body": "STOPALL"},
        {"Body": "please stop", "OptOutType": "STOP"},
    ],
    ids=["stop", "unsubscribe", "quit", "cancel", "end", "stopall", "opt-out-type"],
)
def test_an_opt_out_ends_the_conversation_unanswered(app_with, redis_client, stop):
    calls = []

    def handler(message, conversation):
        calls.append(message.body)
        return notebook(message, conversation)

    client = app_with(handler).test_client()
    post_signed(client, webhook_params(body="hello"))
    answer = post_signed(client, webhook_params(**stop))
    assert answer.status_code == 200
    assert answer.data.endswith(b"<Response />")
    assert calls == ["hello"]  # the handler never saw the opt-out
    assert "state" not in stored(redis_client)
    keys = KEYS.conversation(REY, OURS)
    assert redis_client.zscore(keys.index_shard, keys.member) is None
    post_signed(client, webhook_params(body="back"))
    assert state(redis_client) == {"bodies": ["back"], "tally": {"chars": 4}}  # a new conversation


def test_start_and_help_reach_the_handler_with_the_keyword(app_with):
    seen = []

    def handler(message, conversation):
        seen.append(message.opt_out)
        return "ok"

    client = app_with(handler).test_client()
    for params in (
        {"Body": "START"},
        {"Body": "help "},
        {"Body": "hi", "OptOutType": "HELP"},
        {"Body": "hello"},
        {"Body": "yes"},  # what a bot's "reply YES to confirm" gets
        {"Body": "UNSTOP"},
        {"Body": "cancel my booking"},  # not a keyword: the whole body is
    ):
        assert post_signed(client, webhook_params(**params)).status_code == 200
    assert seen == ["START", "HELP", "HELP", None, "START", "START", None]


def test_whatsapp_senders_are_named_by_their_number(app_with, redis_client, tmp_path):
    callers = tmp_path / "callers.json"
    callers.write_text(json.dumps({REY: "Rey"}))
    twilio = TwilioSimulator.for_app(app_with(None, CALLERS_FILE=str(callers)))
    sender, recipient = f"whatsapp:{REY}", f"whatsapp:{OURS}"
    assert twilio.send(sender, recipient, "hi").reply == thanks("Rey")
    assert twilio.send(sender, recipient, "hi").reply == count_reply("Rey", 2, recipient)
    assert redis_client.hget(KEYS.conversation(sender, recipient).conversation, "seq") == "2"


def test_operators_see_any_handlers_state_and_count(app_with):
    app = app_with(notebook, OPS_TOKEN="ops")
    twilio = TwilioSimulator.for_app(app)
    for body in ("a", "b"):
        twilio.send(REY, OURS, body)
    shown = (
        app.test_client()
        .get(f"/ops/conversations/{REY}/{OURS}", headers={"Authorization": "Bearer ops"})
        .get_json()
    )
    assert shown["messages"] == 2
    assert shown["state"] == {"bodies": ["a", "b"], "tally": {"chars": 2}}


@pytest.mark.parametrize(
    "spec, complaint",
    [
        ("examples.nothing_here:handle", "cannot import examples.nothing_here"),
        ("examples.survey:QUESTIONS", "has no function QUESTIONS"),
        ("examples.survey", "expected package.module:function"),
        ("tests.support.bad_handlers.exits:handle", "cannot import .*: SystemExit: 0"),
        ("tests.support.bad_handlers.one_argument:handle", r"handle must take \(message, conversation\)"),
        ("tests.support.bad_handlers.end_hook_text:handle", r"on_end must be a function of \(conversation"),
        ("tests.support.bad_handlers.end_hook_one_argument:handle", "on_end must be a function of"),
    ],
)
def test_a_bad_sms_handler_stops_start_up_in_one_line(monkeypatch, spec, complaint):
    monkeypatch.setenv("SMS_HANDLER", spec)
    with pytest.raises(ConfigError, match=complaint) as refused:
        create_app({"TWILIO_AUTH_TOKEN": TOKEN})
    assert str(refused.value).startswith(f"SMS_HANDLER={spec!r}")
    assert "\n" not in str(refused.value)


def test_sms_handler_from_the_environment(monkeypatch, redis_url):
    monkeypatch.setenv("SMS_HANDLER", "examples.survey:handle")
    twilio = TwilioSimulator.for_app(create_app({"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": redis_url}))
    assert twilio.send(REY, OURS, "hi").reply.startswith("Hi! Three quick questions.")


@pytest.mark.slow
def test_simulate_runs_a_handler_in_process_without_a_server():
    survey = ("--handler", "examples.survey:handle", "--from", REY, "--to", OURS)
    result = sms_sessions("simulate", *survey, stdin="hi\nRey\nteal\n5\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-5:] == [
        "Hi! Three quick questions. What should we call you?",
        "Thanks, Rey. What is your favourite colour?",
        "And how would you rate us, from 1 to 5?",
        "Thank you, Rey!",
        "You said: teal, rated 5/5.",  # the last reply's second message
    ]


@pytest.mark.slow
def test_simulate_shows_every_message_and_its_media_and_logs_text():
    talk = ("simulate", "--handler", "tests.support.media_handler:handle", "--from", REY, "--to", OURS)
    result = sms_sessions(
        *talk,
        "--media",
        "https://example.com/a.jpg",
        "--media",
        "https://example.com/b.jpg",
        "--message",
        "hi",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "first",
        "second, after 2 media",
        "[media] https://example.com/dog.jpg",
    ]
    failed = sms_sessions(*talk, "--message", "boom")
    assert failed.returncode == 1
    assert "HTTP 500" in failed.stderr
    output = failed.stdout + failed.stderr
    assert "the handler failed: ValueError at media_handler.py" in output
    assert not any(line.startswith("{") for line in output.splitlines())  # text, not JSON


def test_message_from_params_reads_keywords_and_media():
    message = Message.from_params(
        {"From": REY, "To": OURS, "Body": " Stop", "MessageSid": "SM1", "NumMedia": "2", "MediaUrl0": "u0"},
        "Rey",
    )
    assert message.opt_out == "STOP"
    assert message.media == ("u0",)
    assert Message.from_params({"NumMedia": "lots"}, "x").media == ()
    assert Message.from_params({"Body": "stop it"}, "x").opt_out is None


def test_message_from_params_is_the_message_its_constructor_makes():
    """from_params sets the fields itself (not through __init__): every one of them, each as
    the constructor would, and the message stays frozen."""
    params = {"From": REY, "To": OURS, "Body": "hi", "MessageSid": "SM1", "NumMedia": "1", "MediaUrl0": "u0"}
    message = Message.from_params(params, "Rey")
    made = Message(REY, OURS, "hi", "SM1", ("u0",), "Rey", MappingProxyType(dict(params)), None)
    assert message == made
    assert vars(message) == vars(made)  # no field missing, none extra
    assert (message.kind, message.timer, message.data) == ("message", None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.body = "changed"


def test_a_redelivery_answered_while_it_waited_leaves_the_line(app_with, redis_client):
    """Its first delivery is saved while the redelivery waits in line: the redelivery gets the
    stored answer and takes its ticket with it, so the message behind it is not held up."""
    app = app_with(notebook)
    keys = KEYS.conversation(REY, OURS)
    store = current(app).store
    holder = store.open(keys, "SMfirst")
    assert store.ask(keys, "SMfirst", "redelivery-token") == Waiting(ahead=0)  # it queues behind the holder
    assert redis_client.zrange(keys.queue, 0, -1) == ["redelivery-token"]
    store.save(keys, holder, Commit(sid="s", state="{}", is_new=True, message_sid="SMfirst", answer="tok"))
    assert store.ask(keys, "SMfirst", "redelivery-token").answered == "tok"
    assert not redis_client.exists(keys.queue)
    assert not redis_client.exists(keys.waiters)
