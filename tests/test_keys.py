"""The key schema in service/keys.py's docstring is what the service writes: no more, no less."""

from __future__ import annotations

import re
import threading
import time

from service import create_app
from service import keys as key_schema
from service.delivery import Permanent
from service.keys import Keys
from service.lifecycle import Sweeper
from service.sender import Sender
from tests.support.app import TOKEN, post_signed, webhook_params
from tests.support.waiting import wait_until

REY, FINN, POE, OURS = "+15551230001", "+15551230002", "+15551230003", "+15550001111"
CLUSTER_ONLY = {"<prefix>outbox:{07}"}  # written only where the stream is in another slot


def documented() -> dict[str, re.Pattern]:
    """Each key of the docstring's table, as a pattern its keys match."""
    examples = re.findall(r"^(<prefix>\S+)", key_schema.__doc__ or "", re.MULTILINE)
    patterns = {}
    for example in examples:
        pattern = re.escape(example)
        pattern = pattern.replace(re.escape("<prefix>"), "sms:").replace(re.escape("{07}"), r"\{\d\d\}")
        pattern = pattern.replace(re.escape("+15551230007|+15550001111"), r"[^|]+\|[^|:]+")
        pattern = pattern.replace(re.escape("+15551230007"), r"[^|:]+")  # a sender alone
        pattern = pattern.replace(re.escape("<token>"), r".+").replace(re.escape("<id>"), r"[^:]+")
        patterns[example] = re.compile(pattern)
    return patterns


class Refusing:
    """Twilio refusing every message for good (an invalid number)."""

    def send(self, *args, **kwargs):
        return Permanent(21211, "The 'To' number is not a valid phone number.")


def slow_notebook(message, conversation):
    if message.body == "slow":
        time.sleep(0.3)
    conversation.setdefault("bodies", []).append(message.body)
    if message.body == "hi":
        conversation.remind(0.5, "nudge")  # the tag's due index
    if message.body == "after":
        conversation.send("queued with the save")
    if message.body == "bye":
        conversation.end()
    if message.body == "hi" and message.sender == FINN:
        conversation.handoff("wants a person")
    return "noted"


def test_a_realistic_run_writes_exactly_the_documented_keys(redis_url, redis_client):
    """Messages (with transcripts), two at once on one conversation (its line, then the first
    one's handler past its budget: the second joins the inbound messages), one queueing an
    outbound message (refused for good when sent), one setting a timer, one asking for a person,
    a redelivery, an end, an opt-out, the sweeper (an expiry, the end hook, a sample), a
    readiness probe and a forget: every key written, however briefly (keyspace notifications),
    and every key left (SCAN) is one the schema lists, and every key it lists was written (but
    the Cluster's outboxes)."""
    redis_client.config_set("notify-keyspace-events", "KA")
    listener = redis_client.pubsub()
    listener.psubscribe("__keyspace@0__:*")
    app = create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "CONVERSATION_TTL": 1,
            "REDIS_TIMEOUT": 1,
            "HANDLER_INLINE_BUDGET": 0.1,
            "TRANSCRIPTS": True,
        },
        handler=slow_notebook,
        on_end=lambda conversation, reason: None,
    )
    first = webhook_params(sender=REY)
    assert post_signed(app.test_client(), first).status_code == 200
    keys = Keys().conversation(REY, OURS)
    statuses = []
    slow = threading.Thread(
        target=lambda: statuses.append(
            post_signed(app.test_client(), webhook_params(body="slow")).status_code
        )
    )
    slow.start()
    wait_until(lambda: redis_client.exists(keys.lock), seconds=5, what="the slow message's lock")
    statuses.append(post_signed(app.test_client(), webhook_params(body="after")).status_code)  # waits in line
    slow.join()
    wait_until(lambda: not redis_client.exists(keys.inbound), seconds=5, what="both handled")
    assert post_signed(app.test_client(), first).status_code == 200  # a redelivery
    for body in ("hi", "bye"):
        assert post_signed(app.test_client(), webhook_params(sender=FINN, body=body)).status_code == 200
    assert post_signed(app.test_client(), webhook_params(sender=POE, body="STOP")).status_code == 200
    # REY's: both late replies (sent as outbound messages) and the one queued, refused: failures
    assert Sender(app, delivery=Refusing()).send_due() == 3
    time.sleep(1.1)
    assert Sweeper(app).sweep() == 1  # REY's conversation, with its end hook
    background = Sweeper(app)
    background.start()  # in the background: its lease (sweep() called directly takes none)
    wait_until(lambda: redis_client.exists(Keys().sweeper), seconds=5, what="the sweeper's lease")
    background.stop()
    assert app.test_client().get("/readyz").status_code == 200
    assert app.test_cli_runner().invoke(args=["forget", "+15559990000"]).exit_code == 0  # its fence
    assert statuses == [200, 200]

    written = set(redis_client.scan_iter("*"))
    while message := listener.get_message(timeout=0.5):  # until none came for half a second
        if message["type"] == "pmessage":
            written.add(message["channel"].split(":", 1)[1])
    listener.close()
    patterns = documented()
    unlisted = {key for key in written if not any(p.fullmatch(key) for p in patterns.values())}
    assert unlisted == set()
    seen = {name for name, pattern in patterns.items() if any(pattern.fullmatch(key) for key in written)}
    assert seen == set(patterns) - CLUSTER_ONLY
    assert len(patterns) == 26
