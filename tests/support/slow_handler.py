"""A handler module whose handler, for a body starting with "wait", waits on an HTTP call
(through requests, as a booking API or a language model would be called) to the service at
``SLOW_SERVICE_URL``, which the test answers when it chooses; for processes the tests start
(``SMS_HANDLER=tests.support.slow_handler:handle``)."""

import os

import requests


def handle(message, conversation):
    conversation["n"] = conversation.get("n", 0) + 1
    if message.body.startswith("wait"):
        requests.get(os.environ["SLOW_SERVICE_URL"], timeout=60).raise_for_status()
        return f"waited, {conversation['n']} handled"
    return f"{conversation['n']} handled"
