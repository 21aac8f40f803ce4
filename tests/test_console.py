"""The operators' console without a browser: number search in the operators' view, sign-in,
cookie, CSRF, headers and pages through Flask's test client on the real Redis."""

from __future__ import annotations

import json

import pytest

from service.active import BadSearch, search_number
from service.conversations import now_ms
from tests.support.redis_servers import commands_during

REY, FINN, POE, OURS, OTHER = "+15551230001", "+15551230002", "+15551230003", "+15550001111", "+15550002222"


def plant(client, active, sender, recipient, expiry):
    """A live conversation written through the key schema, with a chosen expiry (ms)."""
    keys = active.keys.conversation(sender, recipient)
    client.hset(keys.state, mapping={"sid": "s", "state": "{}", "seq": 1,
                                     "first_seen": expiry - 20000, "last_seen": expiry - 10000})
    client.zadd(keys.index, {keys.member: expiry})


@pytest.fixture
def active(app):
    return app.extensions["sms.active"]


def found(active, number, limit=50):
    return [(c.sender, c.recipient) for c in active.search(number, limit)]


# --- Search by number ------------------------------------------------------------------------

def test_search_by_full_number_or_suffix_most_recent_first(active, redis_client):
    expiry = now_ms() + 600_000
    plant(redis_client, active, REY, OURS, expiry - 3)
    plant(redis_client, active, REY, OTHER, expiry - 1)
    plant(redis_client, active, "whatsapp:" + REY, "whatsapp:" + OURS, expiry - 2)
    plant(redis_client, active, "+15559990001", OURS, expiry)        # same last 4 digits
    plant(redis_client, active, "+449990101", OURS, expiry - 4)      # same tag, other suffix
    plant(redis_client, active, "+215551230001", OURS, expiry - 5)  # ends with REY's digits
    plant(redis_client, active, FINN, OURS, expiry)                  # another tag
    assert found(active, REY) == [(REY, OTHER), ("whatsapp:" + REY, "whatsapp:" + OURS), (REY, OURS)]
    assert found(active, "+1 (555) 123-0001") == found(active, REY)
    assert found(active, "1230001") == [(REY, OTHER), ("whatsapp:" + REY, "whatsapp:" + OURS),
                                        (REY, OURS), ("+215551230001", OURS)]
    assert found(active, "0001") == [("+15559990001", OURS), (REY, OTHER),
                                     ("whatsapp:" + REY, "whatsapp:" + OURS), (REY, OURS),
                                     ("+215551230001", OURS)]
    assert len(found(active, "01")) == 6 and found(active, "02") == [(FINN, OURS)]
    assert found(active, "0001", limit=2) == [("+15559990001", OURS), (REY, OTHER)]
    assert found(active, "+15559990002") == []


def test_search_skips_lapsed_and_prunes_entries_whose_state_is_gone(active, redis_client):
    now = now_ms()
    plant(redis_client, active, REY, OURS, now + 600_000)
    plant(redis_client, active, "+15559990001", OURS, now - 1000)  # lapsed
    plant(redis_client, active, "+15558880001", OURS, now + 600_000)
    gone = active.keys.conversation("+15558880001", OURS)
    redis_client.delete(gone.state)
    assert found(active, "0001") == [(REY, OURS)]
    assert redis_client.zscore(gone.index, gone.member) is None


def test_search_reads_only_the_shard_its_digits_name(active, redis_client):
    """ZSCAN of one index shard, however many conversations the others hold: never KEYS, SCAN
    or a per-shard walk."""
    expiry = now_ms() + 600_000
    for n in range(2000):
        plant(redis_client, active, f"+1555{n:07d}", OURS, expiry - n)
    tally = commands_during(redis_client, lambda: active.search("42", 50))
    assert tally == {"zscan": 1, "hmget": 20}  # the 20 senders ending in 42, one read each


@pytest.mark.parametrize("text", ["1", "+1", "", "  ", "abc", "+1555x", "1+555", "*01", "0[1]",
                                  "1" * 65])
def test_search_refuses_what_names_no_single_shard(text):
    with pytest.raises(BadSearch):
        search_number(text)


def test_search_number_keeps_the_plus_and_drops_separators():
    assert search_number(" +1 (555) 123-00.01 ") == "+15551230001"
    assert search_number("42") == "42"
