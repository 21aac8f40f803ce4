"""The default handler's replies (``service/counter.py``), worded once for the tests and
``bench/``, and read back."""

from __future__ import annotations

import re

from tests.support.numbers import OURS

THANKS = "Thanks for the message, "
COUNTED = re.compile(r"(?P<name>.+) has messaged (?P<recipient>\S+) (?P<times>\d+) times\.")


def thanks(name: str) -> str:
    """The reply to a conversation's first message."""
    return f"{THANKS}{name}!"


def count_reply(name: str, times: int, recipient: str = OURS) -> str:
    """The reply to a conversation's ``times``-th message (from 2 on)."""
    return f"{name} has messaged {recipient} {times} times."


def count_in(reply: str) -> int | None:
    """The message number a reply announces: 1 for the thanks, None for any other reply."""
    if reply.startswith(THANKS):
        return 1
    match = COUNTED.fullmatch(reply)
    return int(match["times"]) if match else None
