"""Operator queries at scale: count, first page, number search and expire-one, with 1,000,000
live conversations.

Starts a throwaway redis-server on a free loopback port (never 6379), fills it through the key
schema (``service.keys``) with pipelined HSET + PEXPIREAT + ZADD, expiries spread over the
conversation TTL like real traffic, then times the service's own ``LiveConversations``
functions (median of several runs) and prints one JSON object, with the goals of
``bench/goals.py`` met or not.

    .venv/bin/python -m bench.ops_at_scale                      # 1,000,000 conversations
    .venv/bin/python -m bench.ops_at_scale --conversations 1000 --runs 3 --output FILE
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.goals import OPS
from service import create_app, logs
from service.clock import now_ms
from service.sessions import SESSION_ID_BYTES
from service.wiring import current
from tests.support.redis_servers import NOT_DURABLE, RedisProcess
from tests.support.replies import count_reply

OUR_NUMBERS = ("+15550001111", "+15550002222", "+15550003333")
BATCH = 5000


@contextmanager
def throwaway_redis():
    """A redis-server without persistence on a free port (the tests' launcher); yields its URL."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(Path(workdir), *NOT_DURABLE).start()
        try:
            yield server.url
        finally:
            server.kill()


def fill(client, keys, count: int, ttl: int, seed: int = 7) -> list[tuple[str, str]]:
    """Writes ``count`` live conversations as the SAVE script would; returns their pairs.

    Last messages are spread over the most recent 90 % of the TTL, so every conversation
    stays live for at least a tenth of it while the benchmark runs.
    """
    rng = random.Random(seed)
    now = now_ms()
    ttl_ms = ttl * 1000
    newest: dict[str, int] = {}
    pairs = []
    pipe = client.pipeline(transaction=False)
    for number in range(count):
        sender = f"+1555{number:07d}"
        recipient = OUR_NUMBERS[number % len(OUR_NUMBERS)]
        keys_of = keys.conversation(sender, recipient)
        last_seen = now - rng.randrange(int(ttl_ms * 0.9))
        messages = rng.randrange(1, 20)
        expiry = last_seen + ttl_ms
        pipe.hset(
            keys_of.conversation,
            mapping={
                "sid": secrets.token_urlsafe(SESSION_ID_BYTES),
                "state": json.dumps({"messages": messages}),
                "seq": messages,
                "m:SM" + secrets.token_hex(16): f"{messages} " + count_reply("Friend", messages, recipient),
                "first_seen": last_seen - rng.randrange(ttl_ms),
                "last_seen": last_seen,
            },
        )
        pipe.pexpireat(keys_of.conversation, expiry)
        pipe.zadd(keys_of.index_shard, {keys_of.member: expiry})
        newest[keys_of.index_shard] = max(newest.get(keys_of.index_shard, 0), expiry)
        pairs.append((sender, recipient))
        if len(pipe) >= 3 * BATCH:
            pipe.execute()
    for index, expiry in newest.items():
        pipe.pexpireat(index, expiry)
    pipe.execute()
    return pairs


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def median_ms(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "max": round(max(samples), 3),
        "runs": len(samples),
    }


def run(count: int, runs: int) -> dict:
    with throwaway_redis() as url, logs.quiet():  # stdout is the JSON report alone
        app = create_app({"REDIS_URL": url, "TWILIO_AUTH_TOKEN": "bench", "REDIS_TIMEOUT": 30})
        client, keys = current(app).redis, current(app).keys
        active = current(app).live
        started = time.perf_counter()
        pairs = fill(client, keys, count, app.config["CONVERSATION_TTL"])
        fill_seconds = time.perf_counter() - started
        assert active.count() == count, "the fill did not make every conversation live"

        first = active.page(50)
        assert len(first.conversations) == min(50, count)
        victims = random.Random(11).sample(pairs, runs)
        results = {
            "conversations": count,
            "fill_seconds": round(fill_seconds, 1),
            "redis_used_memory_mb": round(client.info("memory")["used_memory"] / 2**20),
            "count_ms": median_ms([timed(active.count) for _ in range(runs)]),
            "first_page_50_ms": median_ms([timed(lambda: active.page(50)) for _ in range(runs)]),
            "next_page_50_ms": median_ms(
                [timed(lambda: active.page(50, first.next_cursor)) for _ in range(runs)]
            ),
            "search_number_ms": median_ms(
                [timed(lambda pair=pair: active.search(pair[0], 50)) for pair in victims]
            ),
            "search_last_4_digits_ms": median_ms(
                [timed(lambda pair=pair: active.search(pair[0][-4:], 50)) for pair in victims]
            ),
            "expire_one_ms": median_ms([timed(lambda pair=pair: active.end(*pair)) for pair in victims]),
        }
        assert active.count() == count - runs, "expire did not end exactly the chosen conversations"
        results["goals"] = {
            goal.key: {"target": goal.target, "met": goal.met(results[goal.key]["median"])} for goal in OPS
        }
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=21, help="timed runs per operation")
    parser.add_argument("--output", help="also write the JSON to this file")
    args = parser.parse_args()
    report = json.dumps(run(args.conversations, args.runs), indent=2)
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
