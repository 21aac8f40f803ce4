"""The callers directory: phone number → name, read once from ``CALLERS_FILE``."""

from __future__ import annotations

import json

from .settings import ConfigError

UNKNOWN = "Friend"


class Callers:
    def __init__(self, names: dict[str, str]):
        self.names = names

    @classmethod
    def from_file(cls, path: str) -> Callers:
        try:
            with open(path, encoding="utf-8") as handle:
                names = json.load(handle)
        except (OSError, ValueError) as error:
            raise ConfigError(f"CALLERS_FILE={path!r}: {error}") from None
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ConfigError(f"CALLERS_FILE={path!r}: expected a JSON object of number → name")
        return cls(names)

    def name(self, address: str) -> str:
        """The name of a sender, by its number (``whatsapp:+1555…`` is ``+1555…``)."""
        return self.names.get(address.rpartition(":")[2], UNKNOWN)
