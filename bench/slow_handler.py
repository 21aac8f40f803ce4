"""The benchmark's slow handler: it waits ``SLOW_HANDLER_SECONDS`` (2 by default) as a handler
waiting on a booking API or a language model would, then answers
(``SMS_HANDLER=bench.slow_handler:handle``)."""

import os
import time


def handle(message, conversation):
    time.sleep(float(os.environ.get("SLOW_HANDLER_SECONDS", "2")))
    conversation["n"] = conversation.get("n", 0) + 1
    return f"{conversation['n']} handled"
