"""The assistant bot against the slow API's stand-in (examples/slow_api.py) on a free port:
answered inline when the API is quick, acknowledged at once and answered later when it is
slow, apologising when it is down. In-process, no server but the stand-in."""

import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web

from examples import assistant, slow_api
from service.simulator import TwilioSimulator
from service.wiring import current

REY, OURS = "+15551230001", "+15550001111"
EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response />'


@pytest.fixture
def api(monkeypatch):
    """The stand-in in a thread of its own; yields a function setting its delay."""
    delay = {"seconds": 0.0}
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(slow_api.make_app(0.0))

    async def start():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    @web.middleware
    async def delayed(request, handler):
        await asyncio.sleep(delay["seconds"])
        return await handler(request)

    runner.app.middlewares.append(delayed)
    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(assistant, "URL", f"http://127.0.0.1:{port}{slow_api.PATH}")
    yield lambda seconds: delay.update(seconds=seconds)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def history(twilio):
    redis = current(twilio.app).redis
    stored = redis.hget(f"sms:conv:{{01}}:{REY}|{OURS}", "state")
    return json.loads(stored)["history"] if stored else []


def test_a_quick_api_is_answered_inline(api):
    twilio = TwilioSimulator.for_handler(assistant.handle)
    reply = twilio.send(REY, OURS, "what is the weather").reply
    assert reply.startswith("You asked about “what is the weather”")


def test_a_slow_api_is_acknowledged_at_once_and_answered_later(api):
    api(0.5)
    twilio = TwilioSimulator.for_handler(assistant.handle, HANDLER_INLINE_BUDGET=0.1)
    first = twilio.send(REY, OURS, "plan my trip")
    assert first.status == 200
    assert first.body == EMPTY
    deadline = time.monotonic() + 5
    while not history(twilio) and time.monotonic() < deadline:
        time.sleep(0.05)
    [exchange] = history(twilio)
    assert exchange["asked"] == "plan my trip"
    assert exchange["answered"].startswith("You asked about “plan my trip”")


def test_an_api_that_is_down_gets_an_apology(monkeypatch):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setattr(assistant, "URL", f"http://127.0.0.1:{port}/v1/complete")
    twilio = TwilioSimulator.for_handler(assistant.handle)
    assert twilio.send(REY, OURS, "hello").reply.startswith("Sorry, I cannot think right now")
