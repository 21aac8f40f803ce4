"""Capacity with slow handlers (``make bench``'s last part): ``conversations`` conversations each
send one message at the same moment to a handler that takes ``seconds`` (2 s: a language
model's or a booking API's call), as Twilio would deliver them: signed, each request given up
after Twilio's 15 s.

Contenders, each under gunicorn with the bench's workers and worker model:

- ``service-async``: the service, its handler ``async def`` awaiting the time
  (``bench/slow_handlers.py``), ``HANDLER_INLINE_BUDGET`` 25 ms;
- ``service-sync``: the same with a plain handler sleeping it in its thread;
- ``validated-sync``: the peer (``bench/validated_slow_app.py``), Flask-Session behind Twilio's
  validator, its view sleeping the time and answering inline, as it must;
- ``tutorial-cookie``: the floor, Twilio's tutorial (``bench/cookie_app.py``: the counter in a
  signed cookie, no Redis, no signature check) answering at once: how soon this machine can
  answer that many messages at all.

Per contender: the webhook's answers (latency from the moment all were sent, p50/p99, and how
many were not 200 within 15 s), and when each reply was ready: for the service, when the
workers' outbound senders handed it to the Twilio stand-in (``bench.outbound.Standin``, a
process of its own keeping connections alive, as Twilio does; ``SENDER_THREADS`` 16), read from
the service's outbound records; for the peer, its answer. Lost: the peer's messages
unanswered in 15 s (Twilio gives up on the webhook, and the reply is never sent); the service's
never delivered. Doubled: a reply delivered twice, or a state that counted its message twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis
import requests
from twilio.request_validator import RequestValidator

from bench.outbound import Standin, handed_per_conversation
from service.keys import Keys
from service.twilio_standin import DEV_ACCOUNT_SID
from tests.support.app_servers import GUNICORN_CONF, Gunicorn

TWILIO_WAITS = 15.0
WATCHED = 60.0  # how long the service's commits are watched for
GOAL_REPLY_S = 4.0  # every reply ready within this long of its message (bench/goals.py)
BUDGET = "0.025"
SENDER_THREADS = "16"  # each worker's sender delivers to this many conversations at once


@dataclass(frozen=True)
class Contender:
    name: str
    app: str
    env: dict[str, str]
    service: bool


def contenders(seconds: float) -> list[Contender]:
    common = {"BENCH_HANDLER_SECONDS": f"{seconds:g}"}
    service = {**common, "HANDLER_INLINE_BUDGET": BUDGET, "LOG_FORMAT": "json"}
    return [
        Contender(
            "service-async",
            "service:create_app()",
            {**service, "SMS_HANDLER": "bench.slow_handlers:async_handle"},
            True,
        ),
        Contender(
            "service-sync",
            "service:create_app()",
            {**service, "SMS_HANDLER": "bench.slow_handlers:sync_handle"},
            True,
        ),
        Contender("validated-sync", "bench.validated_slow_app:app", common, False),
        Contender("tutorial-cookie", "bench.cookie_app:app", common, False),
    ]


def messages(
    url: str, token: str, conversations: int, recipient: str, first: int = 0
) -> list[tuple[dict, str]]:
    """One signed message per conversation (its params, its signature), senders numbered from
    ``first``."""
    validator = RequestValidator(token)
    planned = []
    for n in range(first, first + conversations):
        params = {
            "From": f"+1555{90 + n // 100_000:02d}{n:05d}",
            "To": recipient,
            "Body": f"question {n}",
            "MessageSid": f"SM{n:032x}",
            "NumMedia": "0",
        }
        planned.append((params, validator.compute_signature(url, params)))
    return planned


async def _fire(url: str, planned: list[tuple[dict, str]]) -> tuple[float, list[tuple[int, float, str]]]:
    """Sends every message at once; (the moment they were sent, per message its status, when it
    was answered and its body). A request unanswered after Twilio's wait is status 0."""
    timeout = aiohttp.ClientTimeout(total=TWILIO_WAITS)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()

        async def one(params: dict, signature: str) -> tuple[int, float, str]:
            try:
                async with session.post(
                    url, data=params, headers={"X-Twilio-Signature": signature}
                ) as answer:
                    body = await answer.text()
                    return answer.status, time.monotonic(), body
            except (aiohttp.ClientError, TimeoutError):
                return 0, time.monotonic(), ""

        answers = await asyncio.gather(*(one(params, signature) for params, signature in planned))
    return started, list(answers)


def _delivered(
    standin: Standin, client: redis.Redis, senders: list[str], recipient: str, fired_at: float
) -> tuple[list[float | None], int]:
    """When each sender's reply was handed to Twilio (seconds after ``fired_at``, epoch), once
    the stand-in holds one for each or ``WATCHED`` passed; and how many got more than one."""
    wanted = set(senders)
    held: list[dict] = []
    deadline = time.monotonic() + WATCHED
    with requests.Session() as session:
        while time.monotonic() < deadline:
            held = session.get(standin.base + "/_standin/messages", timeout=10).json()
            if len({message["to"] for message in held} & wanted) == len(wanted):
                break
            time.sleep(0.5)
    counts = Counter(message["to"] for message in held if message["to"] in wanted)
    handed = handed_per_conversation(client, senders, recipient)
    return [times[0] / 1000 - fired_at if times else None for times in handed], sum(
        1 for count in counts.values() if count > 1
    )


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(
    contender: Contender,
    redis_url: str,
    token: str,
    recipient: str,
    conversations: int,
    workers: int,
    worker_args: tuple[str, ...],
) -> dict:
    """One contender under gunicorn: every message at once, then the figures."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    standin = Standin(token)
    sending = {
        "TWILIO_ACCOUNT_SID": DEV_ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": token,
        "TWILIO_FROM_NUMBER": recipient,
        "TWILIO_API_BASE_URL": standin.base,
        "SENDER_THREADS": SENDER_THREADS,
    }
    server = Gunicorn(
        {
            "REDIS_URL": redis_url,
            **(sending if contender.service else {"TWILIO_AUTH_TOKEN": token}),
            **contender.env,
            # the configuration patches the standard library for gevent unless told the class
            **(
                {"WORKER_CLASS": worker_args[worker_args.index("--worker-class") + 1]}
                if contender.service
                else {}
            ),
        },
        workers=workers,
        app=contender.app,
        config=GUNICORN_CONF if contender.service else None,
        extra_args=(*worker_args, "--log-level", "warning"),
    )
    with standin, server:
        warm = messages(server.url, token, 2 * workers * 12, recipient, first=conversations)  # others
        asyncio.run(_fire(server.url, warm))
        time.sleep(float(contender.env["BENCH_HANDLER_SECONDS"]) + 1)
        planned = messages(server.url, token, conversations, recipient)
        keys = [Keys().conversation(params["From"], recipient) for params, _ in planned]
        cpu_before = server.cpu_seconds(), _own_cpu() + standin.cpu_seconds(), _redis_cpu(client)
        delivered: list[float | None] = []
        doubled = 0
        started, answered = asyncio.run(_fire(server.url, planned))
        if contender.service:
            fired_at = time.time() - (time.monotonic() - started)
            delivered, doubled = _delivered(
                standin, client, [params["From"] for params, _ in planned], recipient, fired_at
            )
        states = [client.hget(key.conversation, "state") for key in keys] if contender.service else []
        cpu_after = server.cpu_seconds(), _own_cpu() + standin.cpu_seconds(), _redis_cpu(client)
    latencies = [at - started for status, at, _ in answered if status == 200]
    refused = sum(1 for status, _, _ in answered if status != 200)
    if contender.service:
        ready = [at for at in delivered if at is not None]
        doubled += sum(1 for state in states if state and json.loads(state).get("messages", 0) > 1)
    else:
        ready = [at - started for status, at, body in answered if status == 200 and body.strip()]
    return {
        "conversations": conversations,
        "replies_within_4s": sum(1 for at in ready if at <= GOAL_REPLY_S),
        "answered_p50_ms": round(1000 * (_percentile(latencies, 0.5) or 0), 1),
        "answered_p99_ms": round(1000 * (_percentile(latencies, 0.99) or 0), 1),
        "not_answered_200": refused,
        "statuses_not_200": dict(Counter(str(status) for status, _, _ in answered if status != 200)),
        "replies_ready": len(ready),
        "reply_p50_s": round(_percentile(ready, 0.5) or 0, 2),
        "reply_p99_s": round(_percentile(ready, 0.99) or 0, 2),
        "reply_max_s": round(max(ready, default=0), 2),
        "lost": conversations - len(ready),  # the peer: unanswered in 15 s; the service: never delivered
        "doubled": doubled,
        # CPU per message over the burst (until every reply was delivered or WATCHED passed):
        # gunicorn's processes, this one (the load) with the stand-in's, Redis.
        "cpu_ms_per_message": {
            part: round((after - before) * 1000 / conversations, 2)
            for part, before, after in zip(("gunicorn", "load_and_standin", "redis"), cpu_before, cpu_after)
        },
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def measure(
    redis_url: str,
    token: str,
    recipient: str,
    conversations: int,
    seconds: float,
    workers: int,
    worker_args: tuple[str, ...],
    only: tuple[str, ...] = (),
) -> dict:
    """Every contender in turn (those named in ``only``, when given); the figures per
    contender and the gain (service-async's replies ready within TWILIO_WAITS over the peer's)."""
    results = {}
    for contender in contenders(seconds):
        if only and contender.name not in only:
            continue
        print(
            f"capacity: {contender.name}, {conversations} messages at once, {seconds:g} s handler", flush=True
        )
        results[contender.name] = run(
            contender, redis_url, token, recipient, conversations, workers, worker_args
        )
    peer = results["validated-sync"]["replies_ready"] if "validated-sync" in results else 0
    return {
        "handler_seconds": seconds,
        "inline_budget_s": float(BUDGET),
        "contenders": results,
        "replies_vs_validated": results["service-async"]["replies_ready"] / peer if peer else None,
    }


def judged(section: dict) -> dict[str, float]:
    """The figures ``bench/goals.py`` names, from ``measure``'s section."""
    ours = section["contenders"]["service-async"]
    figures = {
        "capacity_replies_within_4s": ours["replies_within_4s"] / ours["conversations"],
        "capacity_answer_p99_ms": ours["answered_p99_ms"],
        "capacity_lost_or_doubled": ours["lost"] + ours["doubled"],
    }
    if section["replies_vs_validated"] is not None:
        figures["capacity_replies_vs_validated"] = section["replies_vs_validated"]
    return figures


def render(section: dict) -> str:
    lines = [
        f"capacity: {next(iter(section['contenders'].values()))['conversations']} messages at once, "
        f"{section['handler_seconds']:g} s handler, budget {section['inline_budget_s'] * 1000:g} ms"
    ]
    for name, row in section["contenders"].items():
        lines.append(
            f"  {name:14s} answered p50 {row['answered_p50_ms']:.0f} ms p99 {row['answered_p99_ms']:.0f} ms "
            f"(not 200: {row['not_answered_200']}); replies {row['replies_ready']}, within 4 s "
            f"{row['replies_within_4s']}, p99 {row['reply_p99_s']:.2f} s; lost {row['lost']}, "
            f"doubled {row['doubled']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """This part alone: ``python -m bench.capacity`` (its own redis-server), JSON on stdout."""
    import tempfile

    from bench import run as bench_run

    parser = argparse.ArgumentParser(
        description="conversations messaging a slow handler all at once: answers, and replies delivered"
    )
    parser.add_argument("--conversations", type=int, default=1000, help="messages at once (1000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="the handler's time (2)")
    parser.add_argument(
        "--contender",
        action="append",
        default=[],
        choices=[contender.name for contender in contenders(0)],
        help="only this one (repeatable; default: all four)",
    )
    bench_run.add_worker_class(parser)
    args = parser.parse_args(argv)
    model = bench_run.model_named(args.worker_class)
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as workdir:
        redis_server = bench_run.RedisServer(Path(workdir))
        try:
            section = measure(
                redis_server.url,
                bench_run.TOKEN,
                bench_run.RECIPIENT,
                args.conversations,
                args.seconds,
                bench_run.WORKERS,
                model.args(),
                tuple(args.contender),
            )
        finally:
            redis_server.stop()
    section["worker_model"] = model.name
    section["load_average"] = os.getloadavg()
    print(render(section), file=sys.stderr)
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
