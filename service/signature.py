"""Twilio request signatures, checked with twilio's own ``RequestValidator``.

The signed URL must be the one Twilio called. Behind a TLS proxy or tunnel Flask sees
``http://internal-host``; ``PUBLIC_BASE_URL`` rebuilds it, or ``TRUSTED_PROXY_HOPS`` lets
werkzeug's ``ProxyFix`` take scheme and host from the proxies' ``X-Forwarded-*`` headers.
"""

from __future__ import annotations

import logging

from flask import Flask, Request, current_app
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    compare,
    get_signature_algorithm,
)
from werkzeug.middleware.proxy_fix import ProxyFix

log = logging.getLogger(__name__)


def signed_url(request: Request, public_base_url: str | None) -> str:
    """The URL Twilio signed: the public base plus the path and query Flask received."""
    if not public_base_url:
        return request.url
    query = request.query_string.decode("utf-8")
    url = public_base_url.rstrip("/") + request.script_root + request.path
    return url + "?" + query if query else url


class FormValues(dict):
    """Form fields as name → list of values, with the ``getall`` the validator looks for first.

    Handed werkzeug's MultiDict (which has only ``getlist``), the validator raises and catches
    an AttributeError for every field; ``make bench`` showed that cost on every message.
    """

    def getall(self, name: str) -> list[str]:
        return self[name]


class SignatureCheck:
    """Validates ``X-Twilio-Signature`` (and the SharedKey variant's algorithm header)."""

    def __init__(self, app: Flask):
        self.enabled = app.config["TWILIO_VALIDATE_SIGNATURE"]
        token = app.config["TWILIO_AUTH_TOKEN"]
        self.validator = RequestValidator(token) if token else None
        self.public_base_url = app.config["PUBLIC_BASE_URL"]

    def is_valid(self, request: Request) -> bool:
        if not self.enabled:
            return True
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature or self.validator is None:
            return False
        params = FormValues(request.form.lists()) if request.method == "POST" else {}
        algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        url = signed_url(request, self.public_base_url)
        # One HMAC settles the usual case, Twilio having signed exactly the URL we received;
        # only a mismatch pays for the validator's full check (URL with and without port).
        try:
            if compare(self.validator.compute_signature(url, params, algorithm), signature):
                return True
        except ValueError:
            return False  # an algorithm twilio does not support (the header is the sender's)
        return self.validator.validate(url, params, signature, algorithm)


def init_app(app: Flask) -> None:
    hops = app.config["TRUSTED_PROXY_HOPS"]
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops,
                                x_port=hops, x_prefix=hops)
    if not app.config["TWILIO_VALIDATE_SIGNATURE"]:
        log.warning("TWILIO_VALIDATE_SIGNATURE is off: anyone can post messages. "
                    "Local development only.")
    elif not app.config["TWILIO_AUTH_TOKEN"]:
        log.warning("TWILIO_AUTH_TOKEN is not set: every webhook will be refused with 403.")
    app.extensions["sms.signature"] = SignatureCheck(app)


def check() -> SignatureCheck:
    return current_app.extensions["sms.signature"]
