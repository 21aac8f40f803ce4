"""The clocks: the app host's, in epoch ms, for what Redis' clock does not decide (the
operators' view of "now"); Redis' own (``TIME``, as the scripts read it) for what must agree
with the scripts whatever the host's clock says (the sweeper's); and durations written for
people."""

from __future__ import annotations

import math
import time

# A duration's units, largest first, in the letters ``sms-sessions events --since`` takes.
UNITS = (("d", 86400), ("h", 3600), ("m", 60))


def now_ms() -> int:
    return int(time.time() * 1000)


def redis_now_ms(client) -> int:
    """Redis' clock in epoch ms, as ``common.lua``'s ``now_ms`` reads it (one round trip). A
    Cluster client that asks every primary gets the latest of their clocks."""
    reply = client.time()
    readings = reply.values() if isinstance(reply, dict) else [reply]
    return max(int(seconds) * 1000 + int(microseconds) // 1000 for seconds, microseconds in readings)


def duration(seconds: float) -> str:
    """``14398`` → ``3h 59m 58s``, ``65`` → ``1m 05s``, ``7`` → ``7s``: whole seconds (less than
    0 is ``0s``) from the largest unit present, each after it two digits. The one way the CLI,
    the events lines and the console write a duration; JSON keeps the seconds."""
    left = max(0, math.floor(seconds))
    parts: list[str] = []
    for unit, size in UNITS:
        count, left = divmod(left, size)
        if count or parts:
            parts.append(f"{count:02d}{unit}" if parts else f"{count}{unit}")
    parts.append(f"{left:02d}s" if parts else f"{left}s")
    return " ".join(parts)
