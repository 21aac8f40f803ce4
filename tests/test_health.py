"""``/healthz`` (the process lives, no Redis) and ``/readyz`` (Redis answers), Redis up and down."""

from __future__ import annotations

from collections import Counter as Tally

from tests.support.app import make_app, post_signed, webhook_params
from tests.support.redis_servers import REDIS_CONF, commands_during


def test_readiness_follows_redis_and_liveness_does_not(redis_processes):
    redis_server = redis_processes(config=REDIS_CONF)
    client = make_app(REDIS_URL=redis_server.url).test_client()
    assert client.get("/readyz").json == {"status": "ready"}
    assert client.get("/healthz").status_code == 200

    redis_server.shutdown()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json == {"status": "unavailable", "redis": "ConnectionError"}
    assert client.get("/healthz").json == {"status": "ok"}
    assert post_signed(client, webhook_params()).status_code == 503

    redis_server.start()  # same port: the service recovers by itself
    assert client.get("/readyz").status_code == 200
    assert post_signed(client, webhook_params()).status_code == 200


def test_health_readiness_and_metrics_never_bind_a_conversation(app, redis_client):
    client = app.test_client()
    cookie = post_signed(client, webhook_params()).headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    keys_before = sorted(redis_client.keys("*"))
    for path, expected in (("/healthz", Tally()), ("/readyz", Tally(ping=1)),
                           ("/metrics", Tally(zcount=100, xrange=1))):
        responses = []
        used = commands_during(redis_client, lambda: responses.append(
            client.get(path, headers={"Cookie": f"sms_session={cookie}"})))
        assert responses[0].status_code == 200, path
        assert "Set-Cookie" not in responses[0].headers, path
        assert used == expected, path
    assert sorted(redis_client.keys("*")) == keys_before  # no lock, nothing written
