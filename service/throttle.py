"""Sign-in throttling: the operators' token is tried at ``/ops`` (bearer) and at the console's
sign-in form; repeated wrong tries from one client address are slowed and counted.

After ``FREE_FAILURES`` wrong tries within ``WINDOW`` seconds, an address must wait before its
next try is even looked at: 1 s, then twice as long after each further failure, at most
``MAX_WAIT``. A try made while waiting is answered 429 with ``Retry-After``, whatever token it
carries, so that guessing gains nothing from trying faster. A right token clears the address.
Each process keeps its own record (gunicorn's workers each slow a guesser down alike); at most
``MAX_ADDRESSES`` addresses are remembered, the oldest forgotten first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import Counter

FREE_FAILURES = 5
WINDOW = 600
MAX_WAIT = 60
MAX_ADDRESSES = 10_000


@dataclass
class _Record:
    failures: int
    last: float  # monotonic time of the last failure


class Throttle:
    def __init__(self, failures: Counter, clock=time.monotonic):
        """``failures`` counts wrong tokens by surface (``sms_sign_in_failures``)."""
        self.failures = failures
        self.clock = clock
        self.records: OrderedDict[str, _Record] = OrderedDict()
        self.lock = threading.Lock()

    def wait(self, address: str) -> int:
        """Whole seconds ``address`` must still wait before its next try is looked at; 0 if none."""
        with self.lock:
            record = self._current(address)
            if record is None or record.failures < FREE_FAILURES:
                return 0
            pause = min(MAX_WAIT, 2 ** (record.failures - FREE_FAILURES))
            return math.ceil(max(0.0, record.last + pause - self.clock()))

    def failed(self, address: str, surface: str) -> None:
        """A wrong token from ``address`` at ``surface`` (``api`` or ``console``)."""
        self.failures.labels(surface).inc()
        with self.lock:
            record = self._current(address) or _Record(0, 0.0)
            record.failures += 1
            record.last = self.clock()
            self.records[address] = record
            self.records.move_to_end(address)
            while len(self.records) > MAX_ADDRESSES:
                self.records.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self.lock:
            self.records.pop(address, None)

    def _current(self, address: str) -> _Record | None:
        record = self.records.get(address)
        if record is not None and self.clock() - record.last > WINDOW:
            del self.records[address]
            return None
        return record
