"""The capacity benchmark's handlers (``bench/capacity.py``): each waits ``BENCH_HANDLER_SECONDS``
(2 by default) as a call to a slow API would, then notes the message and replies.

``async_handle`` awaits the time (I/O on the event loop); ``sync_handle`` sleeps it in its
thread, as a plain function calling a blocking HTTP client would.
"""

from __future__ import annotations

import asyncio
import os
import time

SECONDS = float(os.environ.get("BENCH_HANDLER_SECONDS", "2"))


async def async_handle(message, conversation):
    await asyncio.sleep(SECONDS)
    conversation["messages"] = conversation.get("messages", 0) + 1
    return f"answered {message.body}"


def sync_handle(message, conversation):
    time.sleep(SECONDS)
    conversation["messages"] = conversation.get("messages", 0) + 1
    return f"answered {message.body}"
