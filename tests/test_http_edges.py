"""The webhook's HTTP edges on a real Redis, in-process and under gunicorn with the repo's own
``config/gunicorn.conf.py``: GET signatures over the raw query (punctuation, non-ASCII,
Twilio's longest message), chunked bodies over ``MAX_BODY_BYTES``, methods other than GET
and POST, and malformed forwarded headers."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, quote, urlencode

import pytest
import requests

from service.keys import Keys
from service.metrics import Outcome
from tests.support.app import make_app, sign, webhook_params
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import OURS, REY
from tests.support.prometheus import scrape
from tests.support.replies import thanks

KEYS = Keys()
PUNCTUATION = "Hi, it's me (Rey): see https://x.io/a?b=c&d=e @ 10:30! é ü € 😀 100% #1 +2 ~x*"
# Twilio counts at most 1,600 characters; "€" is 3 UTF-8 bytes, 9 characters percent-encoded.
LONGEST = ("€" * 1591) + ",!'():/?@"


def query(params: dict, style: str) -> str:
    """A query string as a client may encode it: ``+`` for spaces and every reserved character
    percent-encoded (``urlencode``), or ``%20`` with RFC 3986 sub-delimiters left as they are."""
    if style == "plus":
        return urlencode(params)
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=chr(39) + '!()*,:@/?')}" for k, v in params.items())


def conversation_keys(redis_client) -> list[str]:
    """What a handled message writes (its conversation, its index entry, its started event).
    Not ``dbsize()``: the module's gunicorn workers run the lifecycle sweeper, which writes its
    lease and a sample to the same Redis whenever it likes."""
    return [
        *redis_client.keys(KEYS.prefix + "conv:*"),
        *redis_client.keys(KEYS.prefix + "active:*"),
        *([KEYS.events] if redis_client.exists(KEYS.events) else []),
    ]


def messages(redis_client, sender=REY, recipient=OURS) -> int:
    """Messages the conversation counted (its ``seq``)."""
    return int(redis_client.hget(KEYS.conversation(sender, recipient).conversation, "seq") or 0)


# --- 1. GET signatures over the raw query ------------------------------------------------------

MODES = {  # how the service is set up → (settings, base URL Twilio calls, headers the proxy adds)
    "default": ({}, "http://localhost", {}),
    "public_base_url": ({"PUBLIC_BASE_URL": "https://sms.example.com"}, "https://sms.example.com", {}),
    "trusted_proxy_hops": (
        {"TRUSTED_PROXY_HOPS": 1},
        "https://sms.example.com:8443",
        {
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "sms.example.com",
            "X-Forwarded-Port": "8443",
            "X-Forwarded-For": "54.1.2.3",
        },
    ),
}


@pytest.mark.parametrize("style", ["plus", "sub-delims"])
@pytest.mark.parametrize("mode", MODES)
def test_get_with_punctuation_and_non_ascii_is_signed_over_the_raw_query(
    redis_url, redis_client, mode, style
):
    settings, base, forwarded = MODES[mode]
    client = make_app(REDIS_URL=redis_url, **settings).test_client()
    for expected in (1, 2):
        raw = query(webhook_params(REY, OURS, PUNCTUATION), style)
        signature = sign(f"{base}/sms?{raw}", {})
        response = client.get(f"/sms?{raw}", headers={"X-Twilio-Signature": signature, **forwarded})
        assert response.status_code == 200, response.data
        assert messages(redis_client) == expected
    forged = query(webhook_params(REY, OURS, PUNCTUATION + "!"), style)
    response = client.get(f"/sms?{forged}", headers={"X-Twilio-Signature": signature, **forwarded})
    assert response.status_code == 403  # still over the exact query: one character more fails


def test_post_to_a_url_with_a_query_is_signed_over_the_raw_query(redis_url, redis_client):
    client = make_app(REDIS_URL=redis_url).test_client()
    params = webhook_params(REY, OURS, "hello")
    url = "http://localhost/sms?tenant=caf%C3%A9%2C1"
    response = client.post(
        "/sms?tenant=caf%C3%A9%2C1", data=params, headers={"X-Twilio-Signature": sign(url, params)}
    )
    assert response.status_code == 200
    assert messages(redis_client) == 1


def test_query_string_over_max_body_bytes_is_414(redis_url, redis_client):
    client = make_app(REDIS_URL=redis_url).test_client()
    raw = urlencode(webhook_params(REY, OURS, "x" * 70_000))
    response = client.get(
        f"/sms?{raw}", headers={"X-Twilio-Signature": sign(f"http://localhost/sms?{raw}", {})}
    )
    assert response.status_code == 414
    assert conversation_keys(redis_client) == []


# --- Under gunicorn with the repository's configuration --------------------------------------


@pytest.fixture(scope="module")
def served(redis_server):
    """One gunicorn for the module, run as deployed (``-c config/gunicorn.conf.py``)."""
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    with Gunicorn({"REDIS_URL": url}, config=GUNICORN_CONF) as server:
        yield server


def new_lines(server: Gunicorn, since: int) -> list[dict]:
    """The webhook's JSON log lines written after offset ``since`` of the server's output."""
    lines = []
    for line in server.output()[since:].splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["logger"] == "service.webhook":
                lines.append(record)
    return lines


def outcomes(server: Gunicorn) -> dict[str, float]:
    samples = scrape(requests.get(server.base + "/metrics", timeout=10).text)
    return {
        name.split("outcome=")[1][:-1]: value
        for name, value in samples.items()
        if name.startswith("sms_messages_received_total{")
    }


def test_longest_non_ascii_get_is_answered_under_gunicorn(served, redis_url, redis_client):
    raw = urlencode(webhook_params(REY, OURS, LONGEST))
    assert len(LONGEST) == 1600
    assert len(raw) > 14_000  # ~15 KB, far over gunicorn's default line
    url = f"{served.url}?{raw}"
    response = requests.get(url, headers={"X-Twilio-Signature": sign(url, {})}, timeout=10)
    assert response.status_code == 200, response.text
    assert thanks("Rey") in response.text
    assert messages(redis_client) == 1


def chunked(body: bytes, size: int = 4096):
    """A body sent with ``Transfer-Encoding: chunked`` (requests does so for a generator)."""
    return (body[i : i + size] for i in range(0, len(body), size))


def padded_form(params: dict, length: int) -> tuple[bytes, dict]:
    """A form of exactly ``length`` bytes whose last field, ``Pad``, fills it up, and the
    fields it parses to."""
    head = urlencode(params).encode() + b"&Pad="
    pad = "p" * (length - len(head))
    return head + pad.encode(), {**params, "Pad": pad}


def test_chunked_body_over_max_body_bytes_is_413_not_truncated(served, redis_url, redis_client):
    limit = 65536  # MAX_BODY_BYTES' default
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    at_limit, fields = padded_form(webhook_params(REY, OURS, "fits"), limit)
    response = requests.post(
        served.url,
        data=chunked(at_limit),
        timeout=10,
        headers={**headers, "X-Twilio-Signature": sign(served.url, fields)},
    )
    assert response.status_code == 200
    assert messages(redis_client) == 1  # exactly the limit: fine

    # One form of limit + 1000 bytes, signed as if it ended at the limit: truncated, it would
    # pass the signature check and be counted.
    over, _ = padded_form(webhook_params(REY, OURS, "too long"), limit + 1000)
    truncated = dict(parse_qsl(over[:limit].decode(), keep_blank_values=True))
    since = len(served.output())
    response = requests.post(
        served.url,
        data=chunked(over),
        timeout=10,
        headers={**headers, "X-Twilio-Signature": sign(served.url, truncated)},
    )
    assert response.status_code == 413
    assert messages(redis_client) == 1
    [line] = new_lines(served, since)
    assert line["status"] == 413
    assert line["outcome"] == "bad_request"


@pytest.mark.parametrize("method", ["OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"])
def test_other_methods_on_sms_are_405_logged_and_counted(served, redis_url, redis_client, method):
    raw = urlencode(webhook_params(REY, OURS, "hi"))
    url = f"{served.url}?{raw}"
    before, since = outcomes(served), len(served.output())
    response = requests.request(method, url, headers={"X-Twilio-Signature": sign(url, {})}, timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"
    after = outcomes(served)
    assert after[Outcome.BAD_REQUEST] - before[Outcome.BAD_REQUEST] == 1
    assert after[Outcome.REPLIED] == before[Outcome.REPLIED]
    [line] = new_lines(served, since)
    assert line["status"] == 405
    assert line["outcome"] == "bad_request"
    assert line["reason"] == "method not allowed"
    assert conversation_keys(redis_client) == []  # a HEAD does not run the handler


# --- 4. Forwarded headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, value",
    [
        ("X-Forwarded-Proto", "ftp"),
        ("X-Forwarded-Proto", "é"),
        ("X-Forwarded-Host", "[::1"),
        ("X-Forwarded-Host", "[1::2::3]"),
        ("X-Forwarded-Host", "a b"),
        ("X-Forwarded-Host", "h:x"),
        ("X-Forwarded-Port", "abc"),
        ("X-Forwarded-Port", "99999"),
    ],
)
def test_malformed_forwarded_header_is_400(redis_url, redis_client, header, value):
    client = make_app(REDIS_URL=redis_url, TRUSTED_PROXY_HOPS=1).test_client()
    params = webhook_params()
    response = client.post(
        "/sms",
        data=params,
        headers={header: value, "X-Twilio-Signature": sign("http://localhost/sms", params)},
    )
    assert response.status_code == 400
    assert b"Malformed Host or X-Forwarded-* header" in response.data
    assert conversation_keys(redis_client) == []


@pytest.mark.parametrize("prefix", ["a:b", "[::1", "/api", "no-slash", "%zz"])
def test_forwarded_prefix_is_not_trusted(redis_url, redis_client, prefix):
    """Was a 500 for ``a:b`` and ``[::1``; now ignored: a prefix belongs in PUBLIC_BASE_URL."""
    client = make_app(REDIS_URL=redis_url, TRUSTED_PROXY_HOPS=1).test_client()
    params = webhook_params()
    response = client.post(
        "/sms",
        data=params,
        headers={"X-Forwarded-Prefix": prefix, "X-Twilio-Signature": sign("http://localhost/sms", params)},
    )
    assert response.status_code == 200


def test_a_stripped_prefix_is_stated_in_public_base_url(redis_url):
    client = make_app(REDIS_URL=redis_url, PUBLIC_BASE_URL="https://sms.example.com/api/").test_client()
    params = webhook_params()
    response = client.post(
        "/sms", data=params, headers={"X-Twilio-Signature": sign("https://sms.example.com/api/sms", params)}
    )
    assert response.status_code == 200
