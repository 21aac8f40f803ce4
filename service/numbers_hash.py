"""``EVENTS_NUMBERS=hashed``: the keyed hash events carry instead of each phone number.

HMAC-SHA256 with ``EVENTS_HASH_KEY``, its first 16 bytes in hex: the same number always gets
the same hash (consumers join on it), and without the key nobody can work out which number a
hash is by trying every number. Computed by the app and handed to the scripts, which write the
events (Redis' Lua has no HMAC).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

HEX_DIGITS = 32  # 16 bytes: collisions among phone numbers are out of reach


class NumberHash:
    """A callable: a number's hash, or None when events carry numbers as they are."""

    def __init__(self, key: str | None):
        self.key = key.encode() if key else None
        self._hash = lru_cache(maxsize=4096)(self._compute)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NumberHash:
        return cls(config["EVENTS_HASH_KEY"] if config["EVENTS_NUMBERS"] == "hashed" else None)

    def __call__(self, number: str) -> str | None:
        return self._hash(number) if self.key else None

    def _compute(self, number: str) -> str:
        assert self.key is not None
        return hmac.new(self.key, number.encode(), hashlib.sha256).hexdigest()[:HEX_DIGITS]
