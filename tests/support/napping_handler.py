"""A handler that takes its time (``SMS_HANDLER=tests.support.napping_handler:handle``): it says
"one moment" at once, naps half a second, then answers."""

import time


def handle(message, conversation):
    conversation.send("One moment…")
    time.sleep(0.5)
    return f"Answer to: {message.body}"
