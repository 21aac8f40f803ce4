"""The app host's clock, in epoch ms, for what Redis' clock (the scripts' ``TIME``) does not
decide: the sweeper's and the operators' view of "now"."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
