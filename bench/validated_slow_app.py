"""The peer of the capacity benchmark (``bench/capacity.py``): ``bench/validated_app.py`` (plain
Flask-Session behind Twilio's signature decorator) whose view first waits
``BENCH_HANDLER_SECONDS`` as the slow handler does, answering inline as it must.

Run: ``REDIS_URL=redis://… TWILIO_AUTH_TOKEN=… gunicorn bench.validated_slow_app:app``.
"""

from __future__ import annotations

import os
import time

import redis
from flask import Flask
from flask_session import Session

from bench.baseline import add_counter_webhook
from bench.validated_app import validate_twilio_request

SECONDS = float(os.environ.get("BENCH_HANDLER_SECONDS", "2"))


def slow_and_validated(view):
    guarded = validate_twilio_request(view)

    def waited(*args, **kwargs):
        time.sleep(SECONDS)
        return guarded(*args, **kwargs)

    waited.__name__ = view.__name__
    return waited


app = Flask(__name__)
app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]))
Session(app)
add_counter_webhook(app, guard=slow_and_validated)
