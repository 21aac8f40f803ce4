"""Phone numbers as they may appear in logs: enough to correlate, never the full number."""


def mask(number: str) -> str:
    """``+15551230001`` → ``+1555***0001``; short or odd values are masked whole."""
    if len(number) < 9:
        return "***"
    return number[:5] + "***" + number[-4:]
