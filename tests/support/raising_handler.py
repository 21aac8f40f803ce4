"""A handler module whose handler raises what the message's body names, and whose end hook
raises ``KeyboardInterrupt``, for processes the tests start
(``SMS_HANDLER=tests.support.raising_handler:handle``)."""

import argparse
import asyncio
import sys

RAISES = {
    "interrupt": KeyboardInterrupt,
    "cancelled": asyncio.CancelledError,
    "generator": GeneratorExit,
}


def handle(message, conversation):
    conversation["n"] = conversation.get("n", 0) + 1
    body = message.body
    if body in RAISES:
        raise RAISES[body]
    if body.startswith("exit "):
        sys.exit(int(body.split()[1]))
    if body.startswith("--"):  # a command parser fed the text: SystemExit(2)
        argparse.ArgumentParser(prog="bot").parse_args(body.split())
    if body == "bye":
        conversation.end()
    return f"{conversation['n']} handled"


def on_end(conversation, reason):
    raise KeyboardInterrupt
