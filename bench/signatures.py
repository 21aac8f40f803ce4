"""What a message's signature check costs, with one account and with a thousand.

The check (``SignatureCheck.refusal``, what the webhook calls) runs on a Twilio message as the
simulator builds it (its usual fields, signed), on a fresh ``Request`` each time as the
webhook gets one; the cost of making that ``Request`` is measured alone and taken out. Cases:

    one account       TWILIO_AUTH_TOKEN, one token, Twilio signing with it
    1,000 accounts    TWILIO_ACCOUNTS from a file of 1,000, the message's AccountSid one of them
    rotating          TWILIO_AUTH_TOKEN=new,old while Twilio still signs with old
    validate()        twilio's RequestValidator.validate on the URL and fields the check has
                      (what the check would cost built on twilio's public API instead)
    Flask guide       the same on request.url and request.form, as twilio's Flask guide does

Besides µs a message (this thread's CPU time, median of the runs: other processes on a busy
machine add little to it), it counts the HMACs each case computes a message. With
``--redis-url`` it also times a whole message through the app (the check's share of one).

    .venv/bin/python -m bench.signatures [--messages 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from twilio.request_validator import RequestValidator
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from service import accounts, create_app, signature
from service.simulator import TwilioSimulator
from service.webhook import _parsed
from service.wiring import current

URL = "https://sms.example.com/sms"
ACCOUNTS = 1000


def message(token: str, account_sid: str) -> tuple[dict, list[tuple[str, str]]]:
    """A signed message's environ, and its fields as the webhook parses them."""
    twilio = TwilioSimulator(URL, token, account_sid=account_sid)
    params = twilio.params("+15551230001", "+15550001111", "hello there", [], "SM" + "0" * 32)
    headers = {"X-Twilio-Signature": RequestValidator(token).compute_signature(URL, params)}
    environ = EnvironBuilder(
        path="/sms", base_url=URL.removesuffix("/sms"), method="POST", data=params
    ).get_environ()
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
    body = environ["wsgi.input"].read()
    return {**environ, "body": body}, _parsed(body)


def per_message(run, environ: dict, messages: int, runs: int) -> float:
    """Median µs a message of ``run(request)`` over ``runs`` runs, less a fresh Request's."""

    def timed(call) -> float:
        started = time.thread_time()
        for _ in range(messages):
            call(Request(environ))
        return (time.thread_time() - started) / messages * 1e6

    results = []
    for _ in range(runs):
        results.append(timed(run) - timed(lambda request: None))
    return statistics.median(results)


def hmacs(run, environ: dict) -> int:
    """The HMACs one ``run`` computes: ``Secret.signs`` calls (the service's check), or
    ``hmac.new`` calls (twilio's validator keys one per HMAC)."""
    calls = 0
    signs, new = accounts.Secret.signs, hmac.new

    def counting_signs(self, *args):
        nonlocal calls
        calls += 1
        return signs(self, *args)

    def counting_new(*args, **kwargs):
        nonlocal calls
        calls += 1
        return new(*args, **kwargs)

    accounts.Secret.signs = counting_signs  # type: ignore[method-assign]
    hmac.new = counting_new
    try:
        run(Request(environ))
    finally:
        accounts.Secret.signs = signs  # type: ignore[method-assign]
        hmac.new = new
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--redis-url",
        help="also time whole messages through the app on this Redis (the check's share of one)",
    )
    options = parser.parse_args()
    logging.getLogger("service").setLevel(logging.ERROR)  # no embedded-store warning per app
    base = {"PUBLIC_BASE_URL": "https://sms.example.com", "TWILIO_ACCOUNTS": None}
    sids = [f"AC{n:032x}" for n in range(ACCOUNTS)]
    chosen = ACCOUNTS // 2
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "accounts.json"
        path.write_text(json.dumps({sid: {"auth_tokens": [f"token-{n:04}"]} for n, sid in enumerate(sids)}))
        many = create_app({**base, "TWILIO_AUTH_TOKEN": None, "TWILIO_ACCOUNTS": str(path)})
    one = create_app({**base, "TWILIO_AUTH_TOKEN": f"token-{chosen:04}"})
    rotating = create_app({**base, "TWILIO_AUTH_TOKEN": f"new-token,token-{chosen:04}"})
    environ, fields = message(f"token-{chosen:04}", sids[chosen])
    body = environ.pop("body")

    def check(app):
        refusal = current(app).signature.refusal
        return lambda request: _must_pass(refusal(request, fields, sids[chosen]))

    validator = RequestValidator(f"token-{chosen:04}")

    def twilios(request):
        request.environ["wsgi.input"] = io.BytesIO(body)  # read again by each message's form
        valid = validator.validate(request.url, request.form, request.headers.get("X-Twilio-Signature", ""))
        _must_pass(None if valid else "refused")

    form = FormValues()
    for name, value in fields:
        form.setdefault(name, []).append(value)

    def twilios_on_the_checks_url_and_fields(request):
        url = signature.signed_url(request, base["PUBLIC_BASE_URL"])
        valid = validator.validate(url, form, request.environ["HTTP_X_TWILIO_SIGNATURE"])
        _must_pass(None if valid else "refused")

    cases = {
        "one account": check(one),
        f"{ACCOUNTS:,} accounts": check(many),
        "rotating (old token second)": check(rotating),
        "validate() on the check's URL, form": twilios_on_the_checks_url_and_fields,
        "twilio's Flask guide": twilios,
    }
    print(f"{'case':40} {'µs / message':>13} {'HMACs':>6}")
    for name, run in cases.items():
        micros = per_message(run, environ, options.messages, options.runs)
        print(f"{name:40} {micros:13.2f} {hmacs(run, environ):6}")
    if options.redis_url:
        whole = whole_messages(options.redis_url, min(options.messages, 5000), options.runs)
        print(f"{'a whole message, in process':40} {whole:13.2f}")


def whole_messages(redis_url: str, messages: int, runs: int) -> float:
    """Median µs (thread CPU) of a whole message through the app's WSGI callable on ``redis_url`` (100
    conversations, each message new), as a gunicorn worker calls it."""
    token = "whole-message-token"
    app = create_app({"TWILIO_AUTH_TOKEN": token, "REDIS_URL": redis_url, "PUBLIC_BASE_URL": None})
    twilio = TwilioSimulator("http://localhost/sms", token)
    results = []
    for run in range(runs):
        environs = []
        for n in range(messages):
            params = twilio.params(f"+1555{n % 100:07}", "+15550001111", "hello", [], f"SM{run:016x}{n:016x}")
            sig = RequestValidator(token).compute_signature("http://localhost/sms", params)
            environs.append(
                EnvironBuilder(
                    path="/sms", method="POST", data=params, headers={"X-Twilio-Signature": sig}
                ).get_environ()
            )
        started = time.thread_time()
        for environ in environs:
            for _ in app.wsgi_app(environ, lambda status, headers, exc_info=None: None):
                pass
        results.append((time.thread_time() - started) / messages * 1e6)
    return statistics.median(results)


class FormValues(dict):
    """name → values, with the ``getall`` twilio's validator reads repeated fields with."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def _must_pass(refusal: str | None) -> None:
    if refusal is not None:
        raise SystemExit(f"the benchmark's message was refused: {refusal}")


if __name__ == "__main__":
    main()
