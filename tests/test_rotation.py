"""Rotating the auth token as docs/operating.md tells it, over one real redis-server: deploys
with the old token, then both, then the new, while Twilio signs with the old one, then (once
the new one is promoted) with the new; no message it sends is refused at any step."""

from __future__ import annotations

from twilio.request_validator import RequestValidator

from service import create_app
from service.simulator import TwilioSimulator
from tests.support.numbers import OURS, REY
from tests.support.prometheus import scrape
from tests.support.replies import count_reply

OLD, NEW = "old-auth-token", "new-auth-token"


def deploy(monkeypatch, redis_url, tokens: str):
    """A new app, built from the environment as a new deploy's workers are."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", tokens)
    return create_app()


def used(app) -> dict[str, float]:
    samples = scrape(app.test_client().get("/metrics").get_data(as_text=True))
    return {
        k.split("=")[1].rstrip("}"): v for k, v in samples.items() if k.startswith("sms_signature_key_total")
    }


def test_rotation_refuses_no_message(monkeypatch, redis_url):
    old_only = deploy(monkeypatch, redis_url, OLD)
    twilio = TwilioSimulator("http://localhost/sms", OLD, app=old_only)
    sent = 0

    def send(app, expected=200):
        nonlocal sent
        twilio.app_client = app.test_client(use_cookies=False)
        delivery = twilio.send(REY, OURS, f"message {sent}")
        assert delivery.status == expected, (delivery.status, delivery.body)
        if expected == 200:
            sent += 1
        return delivery

    send(old_only)
    # Step 1: deploy both tokens, the new one first; the old deploy's workers still serve
    # while the new ones start (a rolling deploy), Twilio signing with the old token.
    both = deploy(monkeypatch, redis_url, f"{NEW},{OLD}")
    for app in (old_only, both, old_only, both):
        send(app)
    assert used(both) == {"primary": 0, "secondary": 2}
    # Step 2: the new token promoted in Twilio's console; Twilio signs with it from now on,
    # while a retry of a message signed before the promotion still comes with the old one.
    before = twilio.send(REY, OURS, "signed before the promotion")
    sent += 1
    twilio.validator = RequestValidator(NEW)
    for _ in range(3):
        send(both)
    twilio.validator = RequestValidator(OLD)
    assert twilio.send(REY, OURS, "retried", message_sid=before.message_sid).status == 200
    twilio.validator = RequestValidator(NEW)
    assert used(both) == {"primary": 3, "secondary": 4}
    for _ in range(2):
        send(both)
    assert used(both) == {"primary": 5, "secondary": 4}  # the old token's count has stopped: it can go
    # Step 3: deploy the new token alone, rolling again; the old one is now refused.
    new_only = deploy(monkeypatch, redis_url, NEW)
    for app in (both, new_only, both, new_only):
        last = send(app)
    assert used(new_only) == {"primary": 2}
    twilio.validator = RequestValidator(OLD)
    send(new_only, expected=403)
    # Every message Twilio sent was answered and counted, once, in one conversation.
    assert last.reply == count_reply("Rey", sent)
