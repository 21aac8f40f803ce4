"""Twilio request signatures, checked with twilio's own ``RequestValidator``.

The signed URL must be the one Twilio called, byte for byte. Behind a TLS proxy or tunnel
Flask sees ``http://internal-host``; ``PUBLIC_BASE_URL`` rebuilds it, or
``TRUSTED_PROXY_HOPS`` lets werkzeug's ``ProxyFix`` take scheme, host and port from the
proxies' ``X-Forwarded-Proto``/``-Host``/``-Port`` headers (``-For`` too, for the client
address in access logs).

``X-Forwarded-Prefix`` is not trusted: it would rewrite the path of every route, a path
prefix the proxy strips is a fixed fact of the deployment that ``PUBLIC_BASE_URL`` states
(``https://host/prefix``), and a malformed one made werkzeug build URLs that twilio's
validator cannot parse (a 500).
"""

from __future__ import annotations

import base64
import hmac
import logging
from urllib.parse import quote, urlsplit

from flask import Flask, Request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from werkzeug.exceptions import BadRequest
from werkzeug.middleware.proxy_fix import ProxyFix

from . import logs

log = logging.getLogger(__name__)

# Characters left as they are in the path (RFC 3986 pchar); anything else is percent-encoded.
PATH_SAFE = "/:@!$&'()*+,;="
# The headers as the WSGI environ names them.
SIGNATURE_ENVIRON = "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_")
SETTINGS_ENVIRON = "HTTP_" + SIGNATURE_SETTINGS_HEADER.upper().replace("-", "_")


def signed_url(request: Request, public_base_url: str | None) -> str:
    """The URL Twilio signed: scheme and host (``public_base_url``, else the request's),
    the path, and the query string exactly as received.

    Not ``request.url``: werkzeug decodes it into an IRI (``%2C`` comes back as ``,``,
    ``%C3%A9`` as ``é``), while Twilio signs the percent-encoded URL it called. A Host or
    trusted ``X-Forwarded-*`` header that cannot be part of a URL is a 400 (``BadRequest``).
    """
    base = public_base_url.rstrip("/") if public_base_url else _origin(request)
    url = base + _quoted(request.script_root + request.path)
    query = request.query_string.decode("utf-8", "replace")  # the webhook checked it is UTF-8
    return url + "?" + query if query else url


# What a request's origin and path come to, remembered: a deployment is called at a handful
# of them, each checked and quoted once instead of on every message (urllib's parse and quote
# were a fifth of the signature check). Emptied when full, so that made-up Host headers
# cannot grow it.
_ORIGINS: dict[tuple[str, str], str] = {}
_PATHS: dict[str, str] = {}
REMEMBERED = 64


def _remember(cache: dict, key, value):
    if len(cache) >= REMEMBERED:
        cache.clear()
    cache[key] = value
    return value


def _quoted(path: str) -> str:
    quoted = _PATHS.get(path)
    return quoted if quoted is not None else _remember(_PATHS, path, quote(path, safe=PATH_SAFE))


def _origin(request: Request) -> str:
    """``scheme://host[:port]`` of the request; 400 unless urllib (hence twilio's validator)
    parses it: the Host header, or ``X-Forwarded-Proto``/``-Host``/``-Port``, may say anything.
    """
    key = (request.scheme, request.host)
    origin = _ORIGINS.get(key)
    if origin is not None:
        return origin
    origin = f"{request.scheme}://{request.host}"
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError unless the port is a number up to 65535
        valid = request.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # also an IPv6 literal that is not one
        valid = False
    if not valid:
        logs.annotate(reason="malformed Host or X-Forwarded-* header")
        raise BadRequest("Malformed Host or X-Forwarded-* header.")
    return _remember(_ORIGINS, key, origin)


class FormValues(dict):
    """Form fields as name → list of values, with the ``getall`` the validator looks for first
    (handed a dict without it, the validator raises and catches an AttributeError per field)."""

    def getall(self, name: str) -> list[str]:
        return self[name]

    @classmethod
    def of(cls, fields) -> FormValues:
        values = cls()
        for name, value in fields:
            values.setdefault(name, []).append(value)
        return values


class SignatureCheck:
    """Validates ``X-Twilio-Signature`` (and the SharedKey variant's algorithm header)."""

    def __init__(self, app: Flask):
        self.enabled = app.config["TWILIO_VALIDATE_SIGNATURE"]
        token = app.config["TWILIO_AUTH_TOKEN"]
        # Keyed once, copied per message: a keyed HMAC's set-up was most of its cost (unused
        # without a token).
        self.keyed = hmac.new(token.encode("utf-8") if token else b"", digestmod="sha1")
        self.validator = RequestValidator(token) if token else None
        self.public_base_url = app.config["PUBLIC_BASE_URL"]

    def is_valid(self, request: Request, fields) -> bool:
        """``fields``: the signed form's (name, value) pairs (none for a GET)."""
        if not self.enabled:
            return True
        environ = request.environ  # the headers read from it: EnvironHeaders.get costs more
        signature = environ.get(SIGNATURE_ENVIRON)
        if not signature or self.validator is None:
            return False
        url = signed_url(request, self.public_base_url)
        settings = environ.get(SETTINGS_ENVIRON)
        # One HMAC settles the usual case, Twilio having signed exactly the URL we received
        # with its Auth Token; only a mismatch, or a SharedKey's other algorithm, pays for the
        # validator's full check (URL with and without port).
        if not settings and hmac.compare_digest(self.signed(url, fields), signature.encode()):
            return True
        try:
            return self.validator.validate(
                url, FormValues.of(fields), signature, get_signature_algorithm(settings)
            )
        except ValueError:
            return False  # an algorithm twilio does not support (the header is the sender's)

    def signed(self, url: str, fields) -> bytes:
        """What ``RequestValidator.compute_signature(url, fields)`` computes (HMAC-SHA1, base64):
        the URL, then each name with each of its distinct values, sorted by name then value."""
        data = url + "".join([name + value for name, value in sorted(set(fields))])
        keyed = self.keyed.copy()
        keyed.update(data.encode("utf-8"))
        return base64.b64encode(keyed.digest())


def init_app(app: Flask) -> SignatureCheck:
    hops = app.config["TRUSTED_PROXY_HOPS"]
    if hops:
        # Flask's documented way to wrap its WSGI app (mypy sees a method being replaced).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops
        )
    if not app.config["TWILIO_VALIDATE_SIGNATURE"]:
        log.warning("TWILIO_VALIDATE_SIGNATURE is off: anyone can post messages. Local development only.")
    elif not app.config["TWILIO_AUTH_TOKEN"]:
        log.warning("TWILIO_AUTH_TOKEN is not set: every webhook will be refused with 403.")
    return SignatureCheck(app)
