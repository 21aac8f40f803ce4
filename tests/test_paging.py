"""Keyset paging on a real Redis while conversations arrive and end: every conversation that
stays put is listed exactly once, and the order holds, whatever changes around the cursor."""

from __future__ import annotations

import random
import threading

import pytest

from service.clock import now_ms
from service.keys import Keys, shard_of
from service.wiring import current
from tests.support.app import make_app
from tests.support.conversations import plant
from tests.support.numbers import OTHER, OURS

KEYS = Keys()
TAGS = ("07", "42", "99", "00")  # few shards, so that writes land next to the cursor


def end(pipe, sender: str) -> None:
    keys = KEYS.conversation(sender, OURS)
    pipe.delete(keys.conversation)
    pipe.zrem(keys.index_shard, keys.member)


def sender(rng: random.Random, tag: str) -> str:
    return f"+1555{rng.randrange(10**5):05d}{tag}"


def order_key(member: str, score: int) -> tuple:
    """The list order, stated independently: expiry, tag, member, all descending."""
    return (score, shard_of(member.split("|")[0]), member)


@pytest.mark.parametrize("limit", [1, 7])
def test_a_walk_racing_arrivals_and_ends_lists_each_unchanged_conversation_once(
    redis_url, redis_client, limit
):
    rng = random.Random(limit)
    base = now_ms() + 3_600_000
    # Unchanged conversations with few distinct expiries: big tie groups in and across shards.
    stay = {sender(rng, rng.choice(TAGS)): base + rng.randrange(25) for _ in range(600)}
    # Conversations an operator ends during the walk, tied in among them (some above the
    # cursor, some below).
    doomed = [sender(rng, rng.choice(TAGS)) for _ in range(200)]
    doomed = [s for s in doomed if s not in stay]
    pipe = redis_client.pipeline(transaction=False)
    for number, expiry in stay.items():
        plant(pipe, number, OURS, expiry)
    for number in doomed:
        plant(pipe, number, OURS, base + rng.randrange(25))
    pipe.execute()

    stop = threading.Event()
    racing = {"arrived": 0, "ended": 0}
    rounds = threading.Semaphore(0)  # one per racing round: the walk takes one per page

    def race():
        """New conversations (later expiries, same shards) and ends, as fast as Redis takes them."""
        race_rng = random.Random(-limit)
        left = list(doomed)
        race_rng.shuffle(left)
        while not stop.is_set():
            pipe = redis_client.pipeline(transaction=False)
            for _ in range(5):
                plant(
                    pipe, sender(race_rng, race_rng.choice(TAGS)), OTHER, base + 100 + race_rng.randrange(25)
                )
                racing["arrived"] += 1
            if left:
                end(pipe, left.pop())
                racing["ended"] += 1
            pipe.execute()
            rounds.release()
            stop.wait(0.0005)  # leave the walker (and Redis) some of the machine's two cores

    active = current(make_app(REDIS_URL=redis_url)).live
    first = active.page(limit)  # before the race: arrivals all go above the cursor from here on
    racer = threading.Thread(target=race)
    racer.start()
    try:
        listed, page = [], first
        while True:
            listed += [f"{c.sender}|{c.recipient}" for c in page.conversations]
            if page.next_cursor is None:
                break
            assert rounds.acquire(timeout=10), "the race stopped"  # writes between every two pages
            page = active.page(limit, page.next_cursor)
            assert len(listed) < 10_000, "the walk does not end"
    finally:
        stop.set()
        racer.join()

    assert racing["arrived"] > 500
    assert racing["ended"] > 50  # the race really ran
    duplicates = {m for m in listed if listed.count(m) > 1}
    assert not duplicates
    unchanged = {f"{number}|{OURS}" for number in stay}
    assert unchanged - set(listed) == set()  # none skipped
    scores = {**{f"{n}|{OURS}": e for n, e in stay.items()}}
    walked = [m for m in listed if m in scores]
    assert walked == sorted(walked, key=lambda m: order_key(m, scores[m]), reverse=True)
