"""Redis down or too slow: a fast 503 with Retry-After, never a 500 or a hang; then recovery.

These tests stop and pause their own redis-server, not the session's shared one.
"""

from __future__ import annotations

import pytest

from service.simulator import TwilioSimulator
from tests.support.app import TOKEN, make_app
from tests.support.app_servers import LiveServer
from tests.support.numbers import FINN, OURS, REY
from tests.support.replies import count_reply

pytestmark = pytest.mark.slow  # a redis-server of its own, stopped and paused


@pytest.fixture
def own_redis(redis_processes):
    return redis_processes("--save", "", "--appendonly", "no")


@pytest.fixture
def twilio(own_redis):
    app = make_app(REDIS_URL=own_redis.url, LOCK_TTL=1.0)
    with LiveServer(app) as server:
        # A client timeout far above REDIS_TIMEOUT: a hung worker fails the test.
        yield TwilioSimulator(server.url, TOKEN, timeout=10)


def test_redis_stopped_answers_503_then_recovers(own_redis, twilio):
    assert twilio.send(REY, OURS, "one").status == 200
    own_redis.kill()
    down = [twilio.send(REY, OURS, "while down") for _ in range(3)]
    params = twilio.params(REY, OURS, "raw", [], "SMraw")  # the same request, headers visible
    signature = twilio.validator.compute_signature(twilio.url, params)
    raw = twilio.http.post(twilio.url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)
    health = twilio.http.get(twilio.url.replace("/sms", "/healthz"), timeout=10)
    own_redis.start()
    assert [d.status for d in down] == [503, 503, 503]
    assert raw.status_code == 503
    assert raw.headers["Retry-After"] == "1"
    assert all("retry" in d.body.lower() for d in down)
    assert health.status_code == 200
    back = twilio.send(REY, OURS, "back")
    assert back.status == 200
    assert back.reply is not None


def test_redis_paused_answers_503_and_the_conversation_goes_on(own_redis, twilio):
    client = own_redis.client()
    assert twilio.send(REY, OURS, "one").status == 200
    client.execute_command("CLIENT", "PAUSE", 2500, "ALL")
    slow = twilio.send(REY, OURS, "during pause")
    other = twilio.send(FINN, OURS, "another conversation during pause")
    assert slow.status == 503
    # Another conversation is answered too, within the pause (a request that waited for Redis
    # would get 200 once the pause ends): no request holds its worker until Redis returns.
    assert other.status == 503
    client.ping()  # a 5 s read timeout on this client: returns when the pause is over
    # The timed-out OPEN may have run after the pause and left a lock; it lapses (LOCK_TTL).
    later = twilio.send(REY, OURS, "after pause")
    assert later.status == 200
    assert later.reply == count_reply("Rey", 2)


def test_redis_py_failing_in_its_own_way_is_an_outage_for_every_reader(redis_url):
    """What redis-py raises from its own code when a connection is reset under another thread
    (``AttributeError … 'feed'``, redis-py issue 2967; ``tests/test_cluster.py`` has the
    webhook's case): /readyz answers 503 and /metrics leaves the gauge out, as for any outage,
    rather than a 500."""
    from service.wiring import current
    from tests.test_cluster import ReaderGone

    app = make_app(REDIS_URL=redis_url)
    client = app.test_client()
    for path, status, absent in (("/readyz", 503, None), ("/metrics", 200, "sms_active_conversations ")):
        assert client.get("/readyz").status_code == 200  # a pooled connection, connected
        for connection in current(app).redis.connection_pool._available_connections:
            connection._parser._reader = ReaderGone()
        response = client.get(path)
        assert response.status_code == status, path
        if absent:
            assert absent not in response.get_data(as_text=True)
