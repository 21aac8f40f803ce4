"""Baseline 4, what a careful user deploys instead: plain Flask-Session 0.8 on Redis (as
``bench/plain_session_app.py``) with the webhook guarded by the decorator from Twilio's guide
"Secure your Flask App by Validating Incoming Twilio Requests", as the guide shows it: a
``RequestValidator`` per request, ``request.url`` and ``request.form``, 403 otherwise.

Run: ``REDIS_URL=redis://… TWILIO_AUTH_TOKEN=… gunicorn bench.validated_app:app``.
"""

from __future__ import annotations

import os
from functools import wraps

import redis
from flask import Flask, abort, request
from flask_session import Session
from twilio.request_validator import RequestValidator

from bench.baseline import add_counter_webhook


def validate_twilio_request(f):
    """The guide's decorator: the view runs only for a request Twilio signed, else 403."""

    @wraps(f)
    def decorated_function(*args, **kwargs):
        validator = RequestValidator(os.environ.get("TWILIO_AUTH_TOKEN"))
        request_valid = validator.validate(
            request.url, request.form, request.headers.get("X-TWILIO-SIGNATURE", "")
        )
        if request_valid:
            return f(*args, **kwargs)
        else:
            return abort(403)

    return decorated_function


app = Flask(__name__)
app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]))
Session(app)
add_counter_webhook(app, guard=validate_twilio_request)
