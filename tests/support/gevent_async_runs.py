"""Run as a script under gevent's patching (``python -m tests.support.gevent_async_runs URL``),
as a gevent worker is: two apps in one process, each with an async handler, one answering
inline and one past the webhook, each sending a message before and after it awaits, and a plain
``asyncio.run`` in a greenlet meanwhile. Prints one JSON line of what each got."""

from gevent import monkey

monkey.patch_all()

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

from service import create_app  # noqa: E402
from service.keys import Keys  # noqa: E402
from tests.support.app import TOKEN, post_signed, webhook_params  # noqa: E402

OURS = "+15550001111"


async def handle(message, conversation):
    conversation.send("before " + message.body)
    await asyncio.sleep(0.3)
    conversation.send("after " + message.body)  # past the webhook's budget, for "two"
    conversation.setdefault("bodies", []).append(message.body)
    return "async: " + message.body


def outbox(client: redis.Redis, keys) -> list[str]:
    """The conversation's queued outbound messages' bodies, in queue order."""
    return [json.loads(client.hget(keys.sent, name))["body"] for name in client.lrange(keys.outbound, 0, -1)]


def main(url: str) -> None:
    inline = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": url, "HANDLER_INLINE_BUDGET": 3.0}, handler=handle
    )
    later = create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "REDIS_URL": url, "HANDLER_INLINE_BUDGET": 0.05}, handler=handle
    )

    def send(app, sender, body):
        answer = post_signed(app.test_client(), webhook_params(sender=sender, body=body))
        return answer.status_code, answer.get_data(as_text=True)

    first = gevent.spawn(send, inline, "+15551230001", "one")
    second = gevent.spawn(send, later, "+15551230002", "two")
    plain = gevent.spawn(lambda: asyncio.run(asyncio.sleep(0.01, "ran")))
    gevent.joinall([first, second, plain], timeout=10)
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys().conversation("+15551230002", OURS)
    deadline = time.monotonic() + 10
    while client.exists(keys.inbound) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(
        json.dumps(
            {
                "inline": first.value,
                "later": second.value,
                "plain": plain.value,
                "later_state": client.hget(keys.conversation, "state"),
                "later_outbound": outbox(client, keys),
                "inline_outbound": outbox(client, Keys().conversation("+15551230001", OURS)),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
