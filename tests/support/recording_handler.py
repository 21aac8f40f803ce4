"""A handler module with an end hook that records each call in Redis, for processes the tests
start (``SMS_HANDLER=tests.support.recording_handler:handle``): the list ``hook-calls`` gets
one JSON entry per call, on the Redis of ``REDIS_URL``."""

import json
import os
from functools import cache

import redis


def handle(message, conversation):
    conversation.setdefault("bodies", []).append(message.body)
    return f"{len(conversation['bodies'])} noted"


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def on_end(conversation, reason):
    _client(os.environ["REDIS_URL"]).rpush(
        "hook-calls", json.dumps({"id": conversation.sid, "reason": reason, "state": dict(conversation)})
    )
