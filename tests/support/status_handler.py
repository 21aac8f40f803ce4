"""A handler module with an ``on_status``: it answers each message with an outbound one and
keeps every status update it hears in ``UPDATES`` (cleared by the tests that read it)."""

from __future__ import annotations

UPDATES: list = []


def handle(message, conversation):
    conversation.send(f"re: {message.body}")


def on_status(update):
    UPDATES.append(update)
