"""The app as the tests build it, and webhook requests signed the way Twilio signs them."""

from __future__ import annotations

import os

from twilio.request_validator import RequestValidator

from service import create_app
from tests.support.numbers import OURS, REY

TOKEN = "test-auth-token"


def make_app(**overrides):
    config = {"TWILIO_AUTH_TOKEN": TOKEN}
    config.update(overrides)
    return create_app(config)


def sign(url: str, params: dict, token: str = TOKEN, algorithm: str | None = None) -> str:
    return RequestValidator(token).compute_signature(url, params, algorithm)


class FormValues(dict):
    """Form fields as name → list of values, with the ``getall`` twilio's validator reads a
    repeated field's values with."""

    def getall(self, name: str) -> list[str]:
        return self[name]

    @classmethod
    def of(cls, fields) -> FormValues:
        values = cls()
        for name, value in fields:
            values.setdefault(name, []).append(value)
        return values


def webhook_params(sender=REY, recipient=OURS, body="hi", message_sid=None, **extra):
    params = {
        "From": sender,
        "To": recipient,
        "Body": body,
        "MessageSid": message_sid or "SM" + os.urandom(16).hex(),
        "NumMedia": "0",
    }
    params.update(extra)
    return params


def post_signed(client, params, url="http://localhost/sms", cookie=None, **kwargs):
    """A signed webhook through Flask's test client (which calls http://localhost)."""
    headers = {"X-Twilio-Signature": sign(url, params)}
    if cookie:
        headers["Cookie"] = f"sms_session={cookie}"
    path = url.split("localhost", 1)[1]
    return client.post(path, data=params, headers=headers, **kwargs)
