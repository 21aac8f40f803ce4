"""The signature check and the UTF-8 gate, on the embedded store (no server needed).

Both run on every message before any Redis work; ``make bench`` made them cheaper (one HMAC
in the usual case, one pass over the body), and these tests pin down that nothing they accept
or refuse changed.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from conftest import TOKEN, post_signed, sign, webhook_params

SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"


def form(params: dict) -> bytes:
    return "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items()).encode()


def post_raw(app, body: bytes, signature: str, **headers):
    return app.test_client().post("/sms", data=body, content_type="application/x-www-form-urlencoded",
                                  headers={"X-Twilio-Signature": signature, **headers})


def test_signature_over_the_exact_url_is_accepted(fake_app):
    response = post_signed(fake_app.test_client(), webhook_params())
    assert response.status_code == 200


def test_signature_over_the_url_with_explicit_port_is_still_accepted(fake_app):
    """Twilio sometimes signs ``host:80``/``host:443``: the validator's full check covers it."""
    params = webhook_params()
    response = post_raw(fake_app, form(params), sign("http://localhost:80/sms", params))
    assert response.status_code == 200


@pytest.mark.parametrize("signature", [
    sign("http://localhost/sms", webhook_params(message_sid="SMother")),  # other params
    sign("http://localhost/sms", webhook_params(message_sid="SMfixed"), token="wrong-token"),
    "not-base64-at-all",
    "é",
])
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
    response = post_raw(fake_app, form(params), sign("http://localhost/sms", params),
                        **{SETTINGS_HEADER: "key=k,algorithm=HMAC_MD5"})
    assert response.status_code == 403


def test_sha256_shared_key_signature_is_accepted(fake_app):
    from twilio.request_validator import RequestValidator

    params = webhook_params()
    signature = RequestValidator(TOKEN).compute_signature("http://localhost/sms", params, "HMAC_SHA256")
    response = post_raw(fake_app, form(params), signature, **{SETTINGS_HEADER: "algorithm=HMAC_SHA256"})
    assert response.status_code == 200


def test_percent_encoded_utf8_in_any_field_is_accepted(fake_app):
    params = webhook_params(body="héllo 👋 & =", FromCity="São Paulo")
    response = post_raw(fake_app, form(params), sign("http://localhost/sms", params))
    assert response.status_code == 200


@pytest.mark.parametrize("body", [
    b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=%C3",  # truncated sequence
    b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&B%FFdy=x",  # in a name
    b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=\xff",  # raw byte
    b"From=%2B15551230001&To=%2B15550001111&MessageSid=SM1&Body=%C3&x=%A9",  # split by a separator
])
def test_invalid_utf8_anywhere_is_400_before_the_signature(fake_app, body):
    response = post_raw(fake_app, body, "irrelevant")
    assert response.status_code == 400
    assert b"UTF-8" in response.data
