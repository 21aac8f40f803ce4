"""Timers at scale: 1,000,000 pending timers across 100,000 conversations, 10,000 of them due
within one second, fired by the sweeper as deployed (its loop, ``SWEEP_INTERVAL`` as shipped);
and one sweep's cost with 1,000 due at 10k, 100k and 1M pending.

Starts a throwaway redis-server on a free loopback port, loads the conversations and their
timers directly through the key schema (pipelined HSET + ZADD, as SAVE would leave them), then
runs the service's own ``Sweeper``. Prints one JSON object (``--output`` writes it too).

    .venv/bin/python -m bench.timers_at_scale                          # the full figures
    .venv/bin/python -m bench.timers_at_scale --conversations 1000 --due 1000 --output FILE
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import time
from contextlib import ExitStack

from bench.ops_at_scale import throwaway_redis
from service import create_app, logs, timers
from service.clock import redis_now_ms
from service.lifecycle import Sweeper
from service.sessions import SESSION_ID_BYTES
from service.timers import Timer
from service.wiring import current

RECIPIENT = "+15550001111"
PER_CONVERSATION = 10
BATCH = 2000
HOUR_MS = 3_600_000
LEAD_MS = 10_000  # the burst's timers are set this long before they fall due


def sender(number: int) -> str:
    return f"+1555{number:07d}"


def fill(app, conversations: int, seed: int = 7) -> None:
    """``conversations`` live conversations with ``PER_CONVERSATION`` timers each, due between
    one and three hours from now (none due while the benchmark runs)."""
    rng = random.Random(seed)
    wired = current(app)
    client, keys = wired.redis, wired.keys
    now = redis_now_ms(client)
    ttl_ms = app.config["CONVERSATION_TTL"] * 1000
    pipe = client.pipeline(transaction=False)
    for number in range(conversations):
        of = keys.conversation(sender(number), RECIPIENT)
        pending = {
            f"t{n}": Timer(f"t{n}", now + HOUR_MS + rng.randrange(2 * HOUR_MS), None, True, timers.new_id())
            for n in range(PER_CONVERSATION)
        }
        pipe.hset(
            of.conversation,
            mapping={
                "sid": secrets.token_urlsafe(SESSION_ID_BYTES),
                "state": "{}",
                "seq": 1,
                "first_seen": now,
                "last_seen": now,
                "timers": timers.encode(pending),
            },
        )
        pipe.zadd(of.index_shard, {of.member: now + ttl_ms})
        pipe.zadd(of.timers, {of.member: timers.earliest(pending)})
        if len(pipe) >= 3 * BATCH:
            pipe.execute()
    pipe.execute()


def arm(app, conversations: int, due: int, at_ms: int, within_ms: int, seed: int = 11) -> None:
    """Gives ``due`` of the conversations (chosen at random) one more timer, due between
    ``at_ms`` and ``at_ms + within_ms``, its data the due (the handler measures how late it
    fired), and moves their due index's score with it."""
    wired = current(app)
    client, keys = wired.redis, wired.keys
    chosen = random.Random(seed).sample(range(conversations), due)
    for start in range(0, due, BATCH):
        batch = [keys.conversation(sender(number), RECIPIENT) for number in chosen[start : start + BATCH]]
        pipe = client.pipeline(transaction=False)
        for of in batch:
            pipe.hget(of.conversation, "timers")
        stored = pipe.execute()
        for of, raw in zip(batch, stored):
            pending = timers.decode(raw)
            moment = at_ms + random.randrange(within_ms)
            name = f"due{seed}"
            pending[name] = Timer(name, moment, moment, True, timers.new_id())
            pipe.hset(of.conversation, "timers", timers.encode(pending))
            pipe.zadd(of.timers, {of.member: timers.earliest(pending)})
        pipe.execute()


def make_app(url: str, lateness: list[int]):
    def handle(message, conversation):
        if message.kind == "timer":
            lateness.append(conversation.now_ms - message.data)
            return "Still there?"
        return None

    return create_app({"REDIS_URL": url, "TWILIO_AUTH_TOKEN": "bench", "REDIS_TIMEOUT": 30}, handler=handle)


def burst(url: str, conversations: int, due: int) -> dict:
    """``due`` timers due within one second among ``conversations`` x 10 pending, fired by the
    sweeper's loop (a thread, as in a serving process): how late each fired."""
    lateness: list[int] = []
    app = make_app(url, lateness)
    client = current(app).redis
    client.flushall()
    started = time.perf_counter()
    fill(app, conversations)
    fill_seconds = time.perf_counter() - started
    interval = app.config["SWEEP_INTERVAL"]
    sweeper = Sweeper(app)
    thread = sweeper.start()  # its first pass finds nothing due
    at_ms = redis_now_ms(client) + LEAD_MS  # set well ahead, as timers are, however slow the load
    arm(app, conversations, due, at_ms, 1000)
    deadline = time.monotonic() + 10 * interval + 60
    while len(lateness) < due and time.monotonic() < deadline:
        time.sleep(0.05)
    sweeper.stopping.set()
    thread.join()
    ordered = sorted(lateness)
    return {
        "conversations": conversations,
        "pending": conversations * PER_CONVERSATION,
        "due_within_1s": due,
        "fired": len(lateness),
        "fill_seconds": round(fill_seconds, 1),
        "sweep_interval_s": interval,
        "late_s": {
            "p50": ordered[len(ordered) // 2] / 1000 if ordered else None,
            "p99": ordered[int(len(ordered) * 0.99)] / 1000 if ordered else None,
            "max": ordered[-1] / 1000 if ordered else None,
        },
        "redis_used_memory_mb": round(client.info("memory")["used_memory"] / 2**20),
    }


def sweep_costs(urls: list[str], scales: list[int], due: int, runs: int) -> list[dict]:
    """One pass of the sweeper (``Sweeper.sweep``) firing ``due`` timers among ``scale`` x 10
    pending, each scale on a redis-server of its own, measured in turn run after run so that the
    machine's drift falls on every scale alike: its time (median of ``runs``) and its Redis
    commands."""
    setups = []
    for url, conversations in zip(urls, scales):
        lateness: list[int] = []
        app = make_app(url, lateness)
        client = current(app).redis
        client.flushall()
        fill(app, conversations)
        sweeper = Sweeper(app)
        sweeper.sweep()  # the sample of the minute, once
        setups.append(
            (app, client, sweeper, conversations, lateness, {"idle": [], "busy": [], "commands": []})
        )
    for run in range(runs):
        for app, client, sweeper, conversations, _, samples in setups:
            started = time.perf_counter()
            sweeper.sweep()
            samples["idle"].append((time.perf_counter() - started) * 1000)
            arm(app, conversations, due, redis_now_ms(client) - 1000, 1000, seed=run)
            client.config_resetstat()
            started = time.perf_counter()
            sweeper.sweep()
            samples["busy"].append((time.perf_counter() - started) * 1000)
            calls = client.info("commandstats")
            samples["commands"].append(
                sum(row["calls"] for name, row in calls.items() if name != "cmdstat_config")
            )
    return [
        {
            "pending": conversations * PER_CONVERSATION,
            "due": due,
            "fired": len(lateness),
            "sweep_nothing_due_ms": round(statistics.median(samples["idle"]), 1),
            "sweep_ms": round(statistics.median(samples["busy"]), 1),
            "redis_commands": int(statistics.median(samples["commands"])),
        }
        for _, _, _, conversations, lateness, samples in setups
    ]


def run(conversations: int, due: int, scales: list[int], cost_due: int, runs: int) -> dict:
    with ExitStack() as servers, logs.quiet():  # stdout is the JSON report alone
        url = servers.enter_context(throwaway_redis())
        report = {"burst": burst(url, conversations, due)}
        current_urls = [url] + [servers.enter_context(throwaway_redis()) for _ in scales[1:]]
        report["sweep_cost"] = sweep_costs(current_urls, scales, cost_due, runs)
    costs = report["sweep_cost"]
    report["sweep_cost_ratio"] = round(costs[-1]["sweep_ms"] / costs[0]["sweep_ms"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=10_000, help="timers due within one second")
    parser.add_argument(
        "--scales", default="1000,10000,100000", help="conversations (x10 timers) for the sweep cost"
    )
    parser.add_argument("--cost-due", type=int, default=1000, help="timers due in each measured sweep")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", help="also write the JSON to this file")
    args = parser.parse_args()
    scales = [int(count) for count in args.scales.split(",")]
    report = json.dumps(run(args.conversations, args.due, scales, args.cost_due, args.runs), indent=2)
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
