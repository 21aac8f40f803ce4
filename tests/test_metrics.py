"""``/metrics``: values after known sequences of messages (one process, plain registry).

Several gunicorn workers adding up their metrics: tests/test_stack.py.
"""

from __future__ import annotations

import time

from service.keys import Keys
from service.metrics import Outcome
from service.wiring import current
from tests.support.app import make_app, post_signed, webhook_params
from tests.support.numbers import FINN, OURS, REY
from tests.support.prometheus import scrape

KEYS = Keys()


def metrics(client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return scrape(response.get_data(as_text=True))


def outcomes(samples) -> dict[str, float]:
    return {o: samples[f"sms_messages_received_total{{outcome={o}}}"] for o in Outcome}


def test_known_sequence_of_messages(app, redis_client):
    client = app.test_client()
    first = webhook_params(REY)
    assert post_signed(client, first).status_code == 200
    second = webhook_params(REY)
    assert post_signed(client, second).status_code == 200
    assert post_signed(client, second).status_code == 200  # redelivery
    forged = client.post("/sms", data=webhook_params(REY), headers={"X-Twilio-Signature": "forged"})
    assert forged.status_code == 403
    no_from = webhook_params()
    del no_from["From"]
    assert post_signed(client, no_from).status_code == 400
    assert post_signed(client, webhook_params(REY, body="x" * 70000)).status_code == 413
    assert post_signed(client, webhook_params(FINN)).status_code == 200
    # The gauge is read from the index: an entry planted by hand counts, an expired one not.
    now = int(time.time() * 1000)
    redis_client.zadd(
        KEYS.index("55"), {"+15550000055|+15550001111": now + 60_000, "+15550000155|+15550001111": now - 1}
    )

    samples = metrics(client)
    assert outcomes(samples) == {
        Outcome.REPLIED: 3,
        Outcome.DUPLICATE: 1,
        Outcome.DEFERRED: 0,
        Outcome.QUEUED: 0,
        Outcome.REJECTED_SIGNATURE: 1,
        Outcome.BAD_REQUEST: 2,
        Outcome.UNAVAILABLE: 0,
        Outcome.ERROR: 0,
    }
    assert samples["sms_conversations_started_total"] == 2
    assert samples["sms_active_conversations"] == 3
    assert samples["sms_webhook_latency_seconds_count"] == 7
    assert samples["sms_lock_wait_seconds_count"] == 3
    assert {k: v for k, v in samples.items() if k.startswith("sms_redis_errors_total")} == {
        "sms_redis_errors_total{source=webhook}": 0,
        "sms_redis_errors_total{source=health}": 0,
        "sms_redis_errors_total{source=metrics}": 0,
    }


def test_instrumented_message_still_costs_two_round_trips(app, monkeypatch):
    redis_client, sent = current(app).redis, []
    execute = redis_client.execute_command
    monkeypatch.setattr(
        redis_client,
        "execute_command",
        lambda *args, **options: sent.append(args[0]) or execute(*args, **options),
    )
    assert post_signed(app.test_client(), webhook_params(REY)).status_code == 200
    assert sent == ["EVALSHA", "EVALSHA"]  # open and save; metrics and the log line add none


def test_expired_conversation_starts_again_and_counts(redis_url, redis_client):
    client = make_app(REDIS_URL=redis_url).test_client()
    post_signed(client, webhook_params(REY))
    redis_client.delete(KEYS.conversation(REY, OURS).conversation)  # as if its TTL had run out
    post_signed(client, webhook_params(REY))
    assert metrics(client)["sms_conversations_started_total"] == 2


def test_redis_down_counts_unavailable_and_errors():
    client = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client()  # nothing listens there
    assert post_signed(client, webhook_params()).status_code == 503
    assert client.get("/readyz").status_code == 503
    first = metrics(client)
    assert outcomes(first)["unavailable"] == 1
    assert "sms_active_conversations" not in first  # not counted, yet /metrics still answers
    assert first["sms_redis_errors_total{source=webhook}"] == 1
    assert first["sms_redis_errors_total{source=health}"] == 1
    assert first["sms_redis_errors_total{source=metrics}"] == 1  # this scrape's own
    assert metrics(client)["sms_redis_errors_total{source=metrics}"] == 2


def test_busy_conversation_is_unavailable_and_its_wait_observed(redis_url, redis_client):
    client = make_app(REDIS_URL=redis_url, LOCK_WAIT=0.05).test_client()
    redis_client.set(KEYS.conversation(REY, OURS).lock, "another-request", px=10_000)
    response = post_signed(client, webhook_params(REY))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    samples = metrics(client)
    assert outcomes(samples)["unavailable"] == 1
    assert samples["sms_lock_wait_seconds_count"] == 1
    assert samples["sms_lock_wait_seconds_bucket{le=0.025}"] == 0  # it waited LOCK_WAIT
    assert samples["sms_lock_wait_seconds_sum"] >= 0.05
    assert samples["sms_redis_errors_total{source=webhook}"] == 0
