"""A stand-in for a slow HTTP API (a language model's, a booking system's): it answers each
request after a delay, as such an API would, so that a bot calling one can be run and tested
without an account.

    .venv/bin/python -m examples.slow_api --port 8766 --delay 5

``POST /v1/complete`` with JSON ``{"prompt": "..."}`` answers ``{"text": "..."}`` after
``--delay`` seconds (a request's ``"delay"`` overrides it), a made-up completion that quotes
the prompt. ``GET /healthz`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

PATH = "/v1/complete"


def completion(prompt: str) -> str:
    words = prompt.split()
    return f"You asked about “{' '.join(words[:8])}”. Here is a considered answer, {len(words)} words long."


def make_app(delay: float) -> web.Application:
    async def complete(request: web.Request) -> web.Response:
        try:
            asked = await request.json()
            prompt = str(asked["prompt"])
            wait = float(asked.get("delay", delay))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'expected JSON {"prompt": "..."}'}, status=400)
        await asyncio.sleep(wait)
        return web.json_response({"text": completion(prompt)})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post(PATH, complete)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds before each answer")
    options = parser.parse_args()
    web.run_app(make_app(options.delay), host=options.host, port=options.port)


if __name__ == "__main__":
    main()
