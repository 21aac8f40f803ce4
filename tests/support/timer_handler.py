"""A handler whose timers take their time, for sweeper processes the tests start and kill
(``SMS_HANDLER=tests.support.timer_handler:handle``): a message 'set <n>' sets n timers due at
once, each firing counts itself in the state and, before that, notes its attempt in the list
``timer-attempts`` on the Redis of ``REDIS_URL`` and sleeps ``TIMER_SLEEP`` seconds."""

import os
import time
from functools import cache

import redis


def handle(message, conversation):
    if message.kind == "timer":
        _client(os.environ["REDIS_URL"]).rpush("timer-attempts", f"{message.sender} {message.timer}")
        time.sleep(float(os.environ.get("TIMER_SLEEP", "0")))
        fired = conversation.setdefault("fired", {})
        fired[message.timer] = fired.get(message.timer, 0) + 1
        return f"fired {message.timer}"
    words = message.body.split()
    if words and words[0] == "set":
        for n in range(int(words[1])):
            conversation.remind(0, f"t{n}", cancel_on_reply=False)
    return "set"


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)
