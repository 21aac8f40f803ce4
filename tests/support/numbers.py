"""The phone numbers the tests and ``bench/`` talk with, declared once."""

from __future__ import annotations

# Callers named in config/callers.json, the default CALLERS_FILE.
REY, FINN, POE = "+15551230001", "+15551230002", "+15551230003"
# Callers in no callers file: the counter calls each of them "Friend".
UNNAMED = ("+15559870042", "+15554440077", "+15556660042", "+15557770099")
FRIEND = UNNAMED[0]
# The service's own numbers, the ones Twilio's webhooks are sent To.
OURS, OTHER = "+15550001111", "+15550002222"


def crowd(count: int, start: int = 0) -> list[str]:
    """``count`` callers in no callers file (+15553000000, +15553000001, …), for tests that
    need many conversations at once."""
    return [f"+1555300{n:04d}" for n in range(start, start + count)]
