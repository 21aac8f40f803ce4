"""A handler for the transcript's test under gunicorn (tests/test_transcripts_gunicorn.py,
``SMS_HANDLER=tests.support.transcript_handler:handle``): each run that commits notes itself in
the state's ``log`` (``in <body>``, ``timer <name>``: the commit order) and counts the messages
in ``count``. Words in a body ask for more: ``slow`` sleeps 1 s on the message's first call
(past a short ``HANDLER_INLINE_BUDGET``), ``stall`` 60 s on its first call (a process to
kill), ``send`` sends a message of its own, ``timer`` sets a timer ``t-<first word>`` due in
0.3 s, which the sweeper fires. A message is answered ``re <body>``, its send is ``sent for
<body>``, a timer's firing ``fired <name>``. Every call of a message is recorded in the Redis
list ``handler-calls`` (of ``REDIS_URL``) as JSON: the process, the body, the MessageSid."""

import json
import os
import time
from functools import cache

import redis

SLEEPS = {"slow": 1.0, "stall": 60.0}


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def handle(message, conversation):
    log = conversation.setdefault("log", [])
    if message.kind == "timer":
        log.append(f"timer {message.timer}")
        return f"fired {message.timer}"
    client = _client(os.environ["REDIS_URL"])
    first = client.incr(f"handler-runs:{message.sid}") == 1
    client.rpush("handler-calls", json.dumps({"pid": os.getpid(), "body": message.body, "sid": message.sid}))
    words = message.body.split()
    for word, seconds in SLEEPS.items():
        if word in words and first:
            time.sleep(seconds)
    if "send" in words:
        conversation.send(f"sent for {message.body}")
    if "timer" in words:
        conversation.remind(0.3, f"t-{words[0]}", cancel_on_reply=False)
    log.append(f"in {message.body}")
    conversation["count"] = conversation.get("count", 0) + 1
    return f"re {message.body}"
