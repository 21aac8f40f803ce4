"""The webhook the baselines share: Twilio's tutorial counter on ``flask.session``.

Same replies as the service, and deliberately nothing more: no lock, no redelivery memory, no
index. Where ``flask.session`` lives, and whether the view is guarded by Twilio's signature
check, is all that differs between the baselines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flask import Flask, request, session

from service.callers import Callers
from service.responses import twiml
from tests.support.replies import count_reply, thanks

CALLERS_FILE = Path(__file__).resolve().parent.parent / "config" / "callers.json"


def add_counter_webhook(app: Flask, guard: Callable = lambda view: view) -> Flask:
    """``/sms`` (the counter) and ``/healthz``; ``guard`` decorates the webhook view."""
    callers = Callers.from_file(str(CALLERS_FILE))

    @app.route("/sms", methods=["GET", "POST"])
    @guard
    def sms():
        sender, recipient = request.values.get("From", ""), request.values.get("To", "")
        counter = session.get("counter", 0) + 1
        session["counter"] = counter
        name = callers.name(sender)
        if counter == 1:
            return twiml(thanks(name))
        return twiml(count_reply(name, counter, recipient))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
