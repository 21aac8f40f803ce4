"""Twilio signatures: forged and unsigned requests are refused before any Redis work."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from werkzeug.test import EnvironBuilder

from service.accounts import Secret
from service.signature import matching_key
from service.webhook import MAX_FIELD, _decodable, _field_problem, _parsed, _problem
from service.wiring import current
from tests.support.app import TOKEN, FormValues, make_app, post_signed, sign, webhook_params

# Twilio's documented example of a signed request: its auth token, URL, params and signature.
EXAMPLE_TOKEN, EXAMPLE_URL, EXAMPLE_SIGNATURE = (
    "12345",
    "https://mycompany.com/myapp.php?foo=1&bar=2",
    "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
)
EXAMPLE_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


def test_twilios_documented_example_validates():
    validator = RequestValidator(EXAMPLE_TOKEN)
    assert validator.compute_signature(EXAMPLE_URL, EXAMPLE_PARAMS) == EXAMPLE_SIGNATURE
    assert validator.validate(EXAMPLE_URL, EXAMPLE_PARAMS, EXAMPLE_SIGNATURE)


def test_documented_example_through_the_app(redis_url):
    """The app validates Twilio's own example request (with From/To it can act on)."""
    app = make_app(
        REDIS_URL=redis_url, TWILIO_AUTH_TOKEN=EXAMPLE_TOKEN, PUBLIC_BASE_URL="https://mycompany.com"
    )
    params, headers = EXAMPLE_PARAMS, {"X-Twilio-Signature": EXAMPLE_SIGNATURE}
    # Twilio's example URL and params, so its signature is valid. The example has no
    # MessageSid: the 400 for it proves validation passed (the 403 check comes first).
    app.add_url_rule("/myapp.php", view_func=app.view_functions["webhook.sms"], methods=["POST"])
    response = app.test_client().post("/myapp.php?foo=1&bar=2", data=params, headers=headers)
    assert response.status_code == 400
    assert b"MessageSid" in response.data
    forged = app.test_client().post(
        "/myapp.php?foo=1&bar=2", data={**params, "Digits": "9999"}, headers=headers
    )
    assert forged.status_code == 403


def test_unsigned_and_wrongly_signed_are_403_with_no_redis_write(app, redis_client):
    client = app.test_client()
    params = webhook_params()
    unsigned = client.post("/sms", data=params)
    wrong = client.post(
        "/sms", data=params, headers={"X-Twilio-Signature": sign("http://localhost/sms", params, "other")}
    )
    tampered = client.post(
        "/sms",
        data={**params, "Body": "changed"},
        headers={"X-Twilio-Signature": sign("http://localhost/sms", params)},
    )
    assert [r.status_code for r in (unsigned, wrong, tampered)] == [403, 403, 403]
    assert b"signature" in unsigned.data
    assert redis_client.dbsize() == 0
    assert post_signed(client, params).status_code == 200  # the same request, signed, works


def test_without_auth_token_every_webhook_is_refused(redis_url, redis_client, caplog):
    with caplog.at_level(logging.WARNING):
        app = make_app(REDIS_URL=redis_url, TWILIO_AUTH_TOKEN=None)
    assert "TWILIO_AUTH_TOKEN is not set" in caplog.text
    assert post_signed(app.test_client(), webhook_params()).status_code == 403
    assert redis_client.dbsize() == 0


def test_validation_off_only_when_asked_and_warns(redis_url, caplog):
    with caplog.at_level(logging.WARNING):
        app = make_app(REDIS_URL=redis_url, TWILIO_VALIDATE_SIGNATURE=False)
    assert "TWILIO_VALIDATE_SIGNATURE is off" in caplog.text
    assert app.test_client().post("/sms", data=webhook_params()).status_code == 200


def test_behind_a_tls_proxy_with_public_base_url(redis_url):
    """Twilio signs https://sms.example.com/sms; the app sees http://10.0.0.5:8000/sms."""
    app = make_app(REDIS_URL=redis_url, PUBLIC_BASE_URL="https://sms.example.com")
    client = app.test_client()
    params = webhook_params()
    signature = sign("https://sms.example.com/sms", params)
    response = client.post(
        "/sms", data=params, base_url="http://10.0.0.5:8000", headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 200
    as_seen = client.post(
        "/sms",
        data=params,
        base_url="http://10.0.0.5:8000",
        headers={"X-Twilio-Signature": sign("http://10.0.0.5:8000/sms", params)},
    )
    assert as_seen.status_code == 403  # only the public URL is trusted


def test_public_base_url_keeps_the_query_string(redis_url):
    app = make_app(REDIS_URL=redis_url, PUBLIC_BASE_URL="https://sms.example.com/")
    params = webhook_params()
    signature = sign("https://sms.example.com/sms?tenant=a", params)
    response = app.test_client().post("/sms?tenant=a", data=params, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200


def test_behind_trusted_proxy_hops(redis_url):
    params = webhook_params()
    signature = sign("https://sms.example.com/sms", params)
    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "sms.example.com",
        "X-Forwarded-For": "54.1.2.3",
        "X-Twilio-Signature": signature,
    }
    trusting = make_app(REDIS_URL=redis_url, TRUSTED_PROXY_HOPS=1)
    assert trusting.test_client().post("/sms", data=params, headers=forwarded).status_code == 200
    untrusting = make_app(REDIS_URL=redis_url)
    assert untrusting.test_client().post("/sms", data=params, headers=forwarded).status_code == 403


# The checks that run on every message before any Redis work, on the embedded store. ``make
# bench`` made them cheaper (one HMAC in the usual case, one pass over the body); these pin
# down that nothing they accept or refuse changed.

SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"


def form(params: dict) -> bytes:
    return "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items()).encode()


def post_raw(app, body: bytes, signature: str, **headers):
    return app.test_client().post(
        "/sms",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": signature, **headers},
    )


def test_signature_over_the_exact_url_is_accepted(fake_app):
    response = post_signed(fake_app.test_client(), webhook_params())
    assert response.status_code == 200


def test_signature_over_the_url_with_explicit_port_is_still_accepted(fake_app):
    """Twilio sometimes signs ``host:80``/``host:443``: the validator's full check covers it."""
    params = webhook_params()
    response = post_raw(fake_app, form(params), sign("http://localhost:80/sms", params))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "signature",
    [
        sign("http://localhost/sms", webhook_params(message_sid="SMother")),  # other params
        sign("http://localhost/sms", webhook_params(message_sid="SMfixed"), token="wrong-token"),
        "not-base64-at-all",
        "é",
    ],
)
def test_wrong_signature_is_refused(fake_app, signature):
    response = post_raw(fake_app, form(webhook_params(message_sid="SMfixed")), signature)
    assert response.status_code == 403


def test_repeated_field_is_signed_with_all_its_values(fake_app):
    params = webhook_params()
    body = form(params) + b"&Extra=b&Extra=a"
    signed = sign("http://localhost/sms", {**params, "Extra": "x"})  # single value: wrong
    assert post_raw(fake_app, body, signed).status_code == 403

    class Multi(dict):
        def getall(self, name):
            return ["b", "a"] if name == "Extra" else [self[name]]

    good = sign("http://localhost/sms", Multi(params, Extra=None))
    assert post_raw(fake_app, body, good).status_code == 200


def test_unsupported_algorithm_is_refused(fake_app):
    params = webhook_params()
    response = post_raw(
        fake_app,
        form(params),
        sign("http://localhost/sms", params),
        **{SETTINGS_HEADER: "key=k,algorithm=HMAC_MD5"},
    )
    assert response.status_code == 403


def test_percent_encoded_utf8_in_any_field_is_accepted(fake_app):
    params = webhook_params(body="héllo 👋 & =", FromCity="São Paulo")
    response = post_raw(fake_app, form(params), sign("http://localhost/sms", params))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=%C3",  # truncated sequence
        b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&B%FFdy=x",  # in a name
        b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=\xff",  # raw byte
        b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=%C3&x=%A9",  # split by a separator
    ],
)
def test_invalid_utf8_anywhere_is_400_before_the_signature(fake_app, body):
    response = post_raw(fake_app, body, "irrelevant")
    assert response.status_code == 400
    assert b"UTF-8" in response.data


# The usual case is settled by one HMAC the service computes itself (not by the validator,
# which builds the string in a Python loop); it must sign exactly what twilio signs.

fields_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.sampled_from(["Body", "From", "To", "MediaUrl0", "b", ""]) | fields_text, fields_text),
        max_size=8,
    ),
    url=st.sampled_from(["http://localhost/sms", "https://sms.example.com/sms?tenant=a&x=%C3%A9"]),
)
def test_the_one_hmac_signs_what_twilios_validator_signs(fields, url):
    """Repeated names, repeated values, empty and non-ASCII ones: what twilio's
    ``compute_signature`` signs is what the check accepts, with one HMAC."""
    secret = CountingSecret("primary", TOKEN)
    twilios = RequestValidator(TOKEN).compute_signature(url, FormValues.of(fields))
    assert matching_key([secret], url, fields, twilios.encode()) is secret
    assert secret.computed == 1
    assert matching_key([secret], url, [*fields, ("Extra", "x")], twilios.encode()) is None


URLS = [
    "http://localhost/sms",
    "http://localhost:80/sms",
    "http://localhost:8000/sms",
    "https://sms.example.com/sms?tenant=a&x=%C3%A9",
    "https://sms.example.com:443/sms?tenant=a&x=%C3%A9",
    "https://sms.example.com:8443/sms?tenant=a",
    "https://[::1]/sms",
]


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(st.tuples(st.sampled_from(["Body", "From", "b"]) | fields_text, fields_text), max_size=5),
    signed=st.sampled_from(URLS),
    received=st.sampled_from(URLS),
)
def test_the_check_accepts_what_twilios_validator_accepts(fields, signed, received):
    """Signed over one URL, received at another (the same with or without its port, or not the
    same): accepted exactly when twilio's ``RequestValidator.validate`` accepts it."""
    signature = RequestValidator(TOKEN).compute_signature(signed, FormValues.of(fields))
    twilios = RequestValidator(TOKEN).validate(received, FormValues.of(fields), signature)
    assert (
        matching_key([Secret("primary", TOKEN)], received, fields, signature.encode()) is not None
    ) is twilios


@pytest.mark.parametrize(
    "signed, received",
    [
        ("https://[::1]/sms", "https://[::1]:8443/sms"),
        ("https://user:pass@sms.example.com/sms", "https://user:pass@sms.example.com:8443/sms"),
    ],
)
def test_the_port_comes_off_where_twilios_validator_cuts_too_much(signed, received):
    """Twilio's ``remove_port`` keeps a netloc up to its first colon (``[``, ``user``): the
    check removes the port itself, so an IPv6 host or credentials keep their URL."""
    signature = RequestValidator(TOKEN).compute_signature(signed, {})
    assert not RequestValidator(TOKEN).validate(received, {}, signature)
    assert matching_key([Secret("primary", TOKEN)], received, (), signature.encode()) is not None


class CountingSecret(Secret):
    """A secret that counts the HMACs computed with it."""

    __slots__ = ("computed",)

    def __init__(self, label, value):
        super().__init__(label, value)
        self.computed = 0

    def signs(self, data, signature, algorithm):
        self.computed += 1
        return super().signs(data, signature, algorithm)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=60) | st.text(max_size=40).map(lambda t: quote(t, safe="=&+%").encode()))
def test_the_webhooks_parser_reads_forms_as_werkzeug_did(raw):
    """One strict pass refuses what the UTF-8 gate refused, and reads the fields werkzeug's
    form read from everything else."""
    parsed = _parsed(raw)
    if not _decodable(raw):
        assert parsed is None
        return
    request = EnvironBuilder(
        method="POST", data=raw, content_type="application/x-www-form-urlencoded"
    ).get_request()
    assert parsed == list(request.form.items(multi=True))


# Pieces of a body: separators, pluses literal and encoded, escapes valid, cut short or
# invalid, literal UTF-8 and bytes that are not (a lone lead byte, a lone continuation byte).
FORM_PIECES = [b"a", b"=", b"&", b"+", b" ", b"%2B", b"%26", b"%3D", b"%3d", b"%C3%A9", b"%C3", b"%A9"]
FORM_PIECES += [b"%zz", b"%", b"%25", b"%0", "é".encode(), b"\xc3", b"\xa9"]


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.sampled_from(FORM_PIECES), max_size=16))
def test_the_webhooks_parser_reads_what_parse_qsl_reads(pieces):
    """Decoded in one pass or field by field, the same fields as the stdlib's strict parser
    (encoded separators, encoded and literal pluses, escapes cut short or invalid)."""
    raw = b"".join(pieces)
    try:
        expected = parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        expected = None
    assert _parsed(raw) == expected


FIELD = st.text(st.sampled_from("+15a|\x00\u2028 é"), max_size=8) | st.just("+1" * (MAX_FIELD // 2 + 1))


@given(sender=FIELD, recipient=FIELD, message_sid=FIELD)
def test_the_three_fields_checked_at_once_as_one_by_one(sender, recipient, message_sid):
    named = (("From", sender), ("To", recipient), ("MessageSid", message_sid))
    first = next((r for r in (_field_problem(n, v) for n, v in named) if r), None)
    assert _problem(sender, recipient, message_sid) == first


def test_origins_remembered_are_still_each_request_s_own(redis_url):
    """Checked and quoted once per origin, the URL signed is still the request's: a request
    to another host is refused with that host's signature unless it is its own, a malformed
    Host is still a 400, and made-up hosts do not grow what is remembered."""
    from service import signature

    client = make_app(REDIS_URL=redis_url).test_client()
    for n in range(signature.REMEMBERED + 5):
        params = webhook_params()
        url = f"http://host{n % 3}.example:8000/sms"
        good = {"X-Twilio-Signature": sign(url, params)}
        assert (
            client.post("/sms", data=params, base_url=url.removesuffix("/sms"), headers=good).status_code
            == 200
        )
        other = f"http://made-up-{n}.example/sms"
        assert (
            client.post("/sms", data=params, base_url=other.removesuffix("/sms"), headers=good).status_code
            == 403
        )
        assert client.post("/sms", data=params, headers={**good, "Host": "[::1"}).status_code == 400
    assert len(signature._ORIGINS) <= signature.REMEMBERED


def test_a_repeated_field_reaches_the_handler_as_its_first_value(redis_url):
    """As werkzeug's MultiDict.get: the first Body of two, in the fields' order."""
    seen = []
    app = make_app(REDIS_URL=redis_url)
    current(app).handler = lambda message, conversation: seen.append(message) or "ok"
    params = webhook_params(body="first")
    body = form(params) + b"&Body=second&Zeta=z"
    good = sign("http://localhost/sms", FormValues.of([*params.items(), ("Body", "second"), ("Zeta", "z")]))
    assert post_raw(app, body, good).status_code == 200
    [message] = seen
    assert message.body == "first"
    assert list(message.params) == [*params, "Zeta"]


def test_the_body_read_in_one_call_is_still_the_request_s(redis_url):
    """Read from the server's stream directly, the body is still what ``request.get_data()``
    gives later; a body shorter than its Content-Length is the 400 werkzeug's stream gave."""
    import io

    from flask import request

    bodies = []
    app = make_app(REDIS_URL=redis_url)
    current(app).handler = lambda message, conversation: bodies.append(request.get_data()) or "ok"
    params = webhook_params()
    body = form(params)
    assert post_raw(app, body, sign("http://localhost/sms", params)).status_code == 200
    assert bodies == [body]
    short = app.test_client().post(
        "/sms",
        input_stream=io.BytesIO(body[:-5]),
        content_type="application/x-www-form-urlencoded",
        environ_overrides={"CONTENT_LENGTH": str(len(body))},
        headers={"X-Twilio-Signature": sign("http://localhost/sms", params)},
    )
    assert short.status_code == 400
