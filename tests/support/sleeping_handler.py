"""A handler for processes the tests start (``SMS_HANDLER=tests.support.sleeping_handler:handle``):
a body ``sleep N`` takes N seconds on its first call (a call again, after its process died,
returns at once); a body ``hold`` sends "one moment" and waits until the test pushes to the
Redis list ``handler-release``; every call is recorded in the Redis list ``handler-calls`` (of
``REDIS_URL``) as JSON: the process, the body, the MessageSid. ``handle_async`` is the same as
an ``async def`` (without ``hold``)."""

import asyncio
import json
import os
import time
from functools import cache

import redis


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def handle(message, conversation):
    client = _client(os.environ["REDIS_URL"])
    first = client.incr(f"handler-runs:{message.sid}") == 1
    client.rpush("handler-calls", json.dumps({"pid": os.getpid(), "body": message.body, "sid": message.sid}))
    if message.body.startswith("sleep ") and first:
        time.sleep(float(message.body.split()[1]))
    if message.body == "hold":
        conversation.send("one moment")
        client.blpop(["handler-release"], timeout=60)
    conversation.setdefault("bodies", []).append(message.body)
    return f"done: {message.body}"


async def handle_async(message, conversation):
    """``handle`` as an ``async def``: ``sleep N`` awaits."""
    client = _client(os.environ["REDIS_URL"])
    first = client.incr(f"handler-runs:{message.sid}") == 1
    client.rpush("handler-calls", json.dumps({"pid": os.getpid(), "body": message.body, "sid": message.sid}))
    if message.body.startswith("sleep ") and first:
        await asyncio.sleep(float(message.body.split()[1]))
    conversation.setdefault("bodies", []).append(message.body)
    return f"done: {message.body}"
