"""An assistant that asks a slow HTTP API (a language model) for each answer: an ``async``
handler, the way yours would call one.

    .venv/bin/python -m examples.slow_api --delay 5 &        # the stand-in API, port 8766
    make run SMS_HANDLER=examples.assistant:handle

The API takes seconds; the service answers Twilio at once (an empty answer) once the handler
has taken longer than ``HANDLER_INLINE_BUDGET``, and the reply goes out when the handler
returns (docs/design.md, "Handlers that take their time"). The handler is written the same way
whether it answers in 10 ms or in 20 s. ``ASSISTANT_URL`` points it at the API.
"""

import logging
import os

import aiohttp

from service import Conversation, Message

log = logging.getLogger(__name__)

URL = os.environ.get("ASSISTANT_URL", "http://127.0.0.1:8766/v1/complete")
API_TIMEOUT = aiohttp.ClientTimeout(total=60)  # under HANDLER_TIMEOUT: the handler answers itself
KEPT = 10  # exchanges kept in the conversation's state


async def handle(message: Message, conversation: Conversation):
    if message.opt_out == "HELP":
        return "Ask me anything; STOP to leave."
    history = conversation.setdefault("history", [])
    try:
        async with (
            aiohttp.ClientSession(timeout=API_TIMEOUT) as session,
            session.post(URL, json={"prompt": message.body}) as answer,
        ):
            answer.raise_for_status()
            text = (await answer.json())["text"]
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
        log.warning("the assistant's API failed: %s", type(error).__name__)
        return "Sorry, I cannot think right now. Try again in a minute."
    history.append({"asked": message.body, "answered": text})
    del history[:-KEPT]
    return text
