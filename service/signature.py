"""Twilio request signatures, checked with the keys of the request's account (accounts.py).

The signed URL must be the one Twilio called, byte for byte. Behind a TLS proxy or tunnel
Flask sees ``http://internal-host``; ``PUBLIC_BASE_URL`` rebuilds it, or
``TRUSTED_PROXY_HOPS`` lets werkzeug's ``ProxyFix`` take scheme, host and port from the
proxies' ``X-Forwarded-Proto``/``-Host``/``-Port`` headers (``-For`` too, for the client
address in access logs).

``X-Forwarded-Prefix`` is not trusted: it would rewrite the path of every route, a path
prefix the proxy strips is a fixed fact of the deployment that ``PUBLIC_BASE_URL`` states
(``https://host/prefix``), and a malformed one made werkzeug build URLs that urllib cannot
parse (a 500).

What is signed is built here (``matching_key``) rather than by twilio's ``RequestValidator``,
which builds it with a Python loop, computes two HMACs for every message (the URL with and
without its port), takes one token, and cannot try the apostrophe as Twilio signs it;
tests/test_signature.py holds it to ``RequestValidator`` and to twilio-python's and
twilio-node's published vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from flask import Flask, Request
from prometheus_client import Counter
from twilio.request_validator import (
    HMAC_SHA1,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    get_signature_algorithm,
)
from werkzeug.exceptions import BadRequest
from werkzeug.middleware.proxy_fix import ProxyFix

from . import logs
from .accounts import ACCOUNT_SID, DIGESTS, KEY_ID, Accounts, Secret

log = logging.getLogger(__name__)

# Characters left as they are in the path (RFC 3986 pchar); anything else is percent-encoded.
PATH_SAFE = "/:@!$&'()*+,;="
# The headers as the WSGI environ names them.
SIGNATURE_ENVIRON = "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_")
SETTINGS_ENVIRON = "HTTP_" + SIGNATURE_SETTINGS_HEADER.upper().replace("-", "_")
INVALID = "invalid or missing Twilio signature"


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
# of them, each checked and quoted once instead of by urllib's parse and quote on every
# message. Emptied when full, so that made-up Host headers cannot grow it.
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
    """``scheme://host[:port]`` of the request; 400 unless urllib parses it: the Host header,
    or ``X-Forwarded-Proto``/``-Host``/``-Port``, may say anything.
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


def matching_key(
    keys: Iterable[Secret], url: str, fields, signature: bytes, algorithm: str = HMAC_SHA1
) -> Secret | None:
    """The first of ``keys`` that signed ``url`` and the form's ``fields`` ((name, value)
    pairs) the way Twilio signs (``signature``: the header's base64), or None.

    What Twilio signs, as twilio's ``RequestValidator.compute_signature`` builds it: the URL,
    then each field's name and each of its distinct values, sorted by name then value. The URL
    as received is tried with every key first, so the usual case is one HMAC; only when no key
    signed it are the other URLs Twilio may have signed tried (``_also_signed``).
    """
    keys = tuple(keys)
    params = "".join([name + value for name, value in sorted(set(fields))])
    data = (url + params).encode("utf-8")
    for key in keys:
        if key.signs(data, signature, algorithm):
            return key
    for other in _also_signed(url):
        data = (other + params).encode("utf-8")
        for key in keys:
            if key.signs(data, signature, algorithm):
                return key
    return None


def _also_signed(url: str) -> list[str]:
    """The other URLs Twilio may have signed for a request to ``url``: with its port removed,
    or the scheme's default one added (Twilio's backend signs either way, so twilio-python's
    and twilio-node's validators both try both); and each of those with the query string's
    apostrophes in the other form, ``'`` for ``%27`` and ``%27`` for ``'``. The two are one
    character to this check: Twilio's backend signs a configured URL's ``'`` as it is and may
    send it as ``%27`` (twilio-node issue 1183), twilio-python signs what it is given and
    twilio-node what WHATWG URL parsing makes of it (``%27``), and each library's published
    vectors hold one of the two."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return []
    start = len(parts.scheme) + 3  # past "scheme://"
    netloc, rest = parts.netloc, url[start + len(parts.netloc) :]
    if url[start : start + len(netloc)] != netloc:
        return []
    if port is not None:
        other = netloc.rsplit(":", 1)[0]
    else:
        other = netloc + (":443" if parts.scheme == "https" else ":80")
    origin, other_origin = url[:start] + netloc, url[:start] + other
    urls = [other_origin + rest]
    path, _, query = rest.partition("?")
    forms = []
    if "%27" in query:
        forms.append(query.replace("%27", "'"))
    if "'" in query:
        forms.append(query.replace("'", "%27"))
    for form in forms:
        urls += [f"{origin}{path}?{form}", f"{other_origin}{path}?{form}"]
    return urls


def _settings(header: str) -> tuple[str | None, str]:
    """The SharedKey id (None without one) and the algorithm (upper case) an
    ``X-Twilio-Webhooks-Signature-Settings`` header names (``key=<id>,algorithm=<name>``)."""
    key_id = None
    for part in header.split(","):
        name, separator, value = part.partition("=")
        if separator and name.strip() == "key" and value.strip():
            key_id = value.strip()
            break
    return key_id, get_signature_algorithm(header).upper()


class SignatureCheck:
    """Validates ``X-Twilio-Signature`` with the keys of the request's account (accounts.py):
    its auth tokens, primary first, or the SharedKey secret the settings header names, with
    that header's algorithm. Any signed route uses it (the webhook; Twilio's status callbacks
    are signed the same way)."""

    def __init__(self, config: Mapping[str, Any], known: Accounts, used: Counter):
        """``known``: the accounts whose keys validate; ``used`` counts each key that did."""
        self.enabled = config["TWILIO_VALIDATE_SIGNATURE"]
        self.accounts = known
        self.public_base_url = config["PUBLIC_BASE_URL"]
        # Each label's child made once (labels() takes a lock and builds a key per call).
        self.used = {label: used.labels(label) for label in sorted(known.labels())}

    def refusal(self, request: Request, fields, account_sid: str | None) -> str | None:
        """Why the request's signature is refused (the reason its 403 gives), or None when it
        is valid. ``fields``: the signed form's (name, value) pairs (none for a GET, whose
        query string is in the signed URL); ``account_sid``: the request's ``AccountSid``."""
        if not self.enabled:
            return None
        environ = request.environ  # the headers read from it: EnvironHeaders.get costs more
        signature = environ.get(SIGNATURE_ENVIRON)
        if not signature:
            return INVALID
        account = self.accounts.account(account_sid)
        if account is None:
            return _unknown(self.accounts, account_sid)
        keys: tuple[Secret, ...] = account.tokens
        algorithm = HMAC_SHA1
        header = environ.get(SETTINGS_ENVIRON)
        if header:
            key_id, algorithm = _settings(header)
            if algorithm not in DIGESTS:
                return "unsupported signature algorithm in X-Twilio-Webhooks-Signature-Settings"
            if key_id is not None:
                if not KEY_ID.fullmatch(key_id):
                    return "malformed key id in X-Twilio-Webhooks-Signature-Settings"
                shared = account.shared_keys.get(key_id)
                if shared is None:
                    return f"unknown SharedKey id {key_id}"
                keys = (shared,)
        if b"bodySHA256=" in request.query_string:
            # A JSON body: the URL is signed, with the body's SHA-256 in it, and no form.
            if not _body_matches(request):
                return "body does not match its bodySHA256"
            fields = ()
        url = signed_url(request, self.public_base_url)
        key = matching_key(keys, url, fields, signature.encode(), algorithm)
        if key is None:
            return INVALID
        self.used[key.label].inc()
        if not account.tokens or key is not account.tokens[0]:
            # Not the usual key: the line names it and the account (a rotation's stragglers).
            logs.annotate(signature_key=key.label, account_sid=account_sid)
        return None


def _body_matches(request: Request) -> bool:
    """True when the body's SHA-256 (hex) is the query string's ``bodySHA256``."""
    given = parse_qs(request.query_string.decode("utf-8", "replace")).get("bodySHA256", [""])[0]
    body = hashlib.sha256(request.get_data(cache=True)).hexdigest()
    return hmac.compare_digest(body.encode(), given.encode("utf-8", "replace"))


def _unknown(known: Accounts, account_sid: str | None) -> str:
    """Why no account answers ``account_sid`` (named only when it has an AccountSid's form)."""
    if known.listed is None:
        return INVALID  # no token at all: init_app warned
    if account_sid and ACCOUNT_SID.fullmatch(account_sid):
        return f"unknown AccountSid {account_sid}"
    return "missing or malformed AccountSid"


def init_app(app: Flask, known: Accounts) -> None:
    """Rebuilds the signed URL behind trusted proxies; warns when nothing can be validated."""
    hops = app.config["TRUSTED_PROXY_HOPS"]
    if hops:
        # Flask's documented way to wrap its WSGI app (mypy sees a method being replaced).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops
        )
    if not app.config["TWILIO_VALIDATE_SIGNATURE"]:
        log.warning("TWILIO_VALIDATE_SIGNATURE is off: anyone can post messages. Local development only.")
    elif not any(known):
        log.warning("TWILIO_AUTH_TOKEN is not set (nor TWILIO_ACCOUNTS): every webhook is refused with 403.")
