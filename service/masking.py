"""Phone numbers as they may appear in logs: enough to correlate, never the full number."""


def mask(number: str) -> str:
    """``+15551230001`` → ``+1555***0001``; shorter values keep only their last four characters."""
    if len(number) < 12:
        return "***" + number[-4:] if len(number) >= 8 else "***"
    return number[:5] + "***" + number[-4:]
