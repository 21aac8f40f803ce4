"""The outbound sender's CPU per message, by part: ``python -m bench.sender_cpu [--messages N]
[--profile]`` (its own redis-server and Twilio stand-in, each in a process of its own).

Queues ``messages`` over ``conversations`` with ``service.send``, then delivers them with one
``Sender`` in this process, one pass after another, every conversation on this thread, and
reports this thread's CPU per message, the stand-in's and Redis' (from /proc and ``INFO cpu``),
and with ``--profile`` cProfile's functions that took most of the sender's time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path

from bench.outbound import OUR_NUMBER, Standin, queue, redis_cpu_seconds
from service import create_app
from service.sender import Sender
from service.twilio_standin import DEV_ACCOUNT_SID
from tests.support.redis_servers import NOT_DURABLE, REDIS_CONF, RedisProcess

TOKEN = "bench-auth-token"


def measure(messages: int, conversations: int, profile: bool, sort: str = "cumulative") -> dict:
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as workdir:
        redis_server = RedisProcess(Path(workdir) / "redis", *NOT_DURABLE, config=REDIS_CONF).start()
        standin = Standin(TOKEN)
        try:
            standin.wait_ready()
            settings = {
                "REDIS_URL": redis_server.url,
                "TWILIO_ACCOUNT_SID": DEV_ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": TOKEN,
                "TWILIO_FROM_NUMBER": OUR_NUMBER,
                "TWILIO_API_BASE_URL": standin.base,
                "SENDER_THREADS": 1,
            }
            queue(settings, messages, conversations, series=90)
            app = create_app(settings)
            sender = Sender(app)
            client = redis_server.client()
            standin_before, redis_before = standin.cpu_seconds(), redis_cpu_seconds(client)
            profiler = cProfile.Profile() if profile else None
            started, cpu_started, sent = time.perf_counter(), time.thread_time(), 0
            with app.app_context():
                if profiler:
                    profiler.enable()
                while True:  # a pass, its conversations one after another on this thread
                    found = sender.due()
                    due = found[0] if isinstance(found, tuple) else found
                    attempts = sum(sender.send_conversation(keys) for keys in due)
                    if not attempts:
                        break
                    sent += attempts
                if profiler:
                    profiler.disable()
            cpu = time.thread_time() - cpu_started
            wall = time.perf_counter() - started
            sender.stop()
            report: dict = {
                "messages": sent,
                "messages_per_s": round(sent / wall, 1),
                "cpu_us_per_message": {
                    "sender": round(cpu * 1e6 / max(sent, 1)),
                    "standin": round((standin.cpu_seconds() - standin_before) * 1e6 / max(sent, 1)),
                    "redis": round((redis_cpu_seconds(client) - redis_before) * 1e6 / max(sent, 1)),
                },
                "load_average": os.getloadavg(),
            }
            if profiler:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(45)
                report["profile"] = out.getvalue()
            return report
        finally:
            standin.stop()
            redis_server.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the outbound sender's CPU per message")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions too")
    parser.add_argument("--sort", default="cumulative", help="their order (pstats: cumulative, tottime)")
    args = parser.parse_args(argv)
    report = measure(args.messages, args.conversations, args.profile, args.sort)
    text = report.pop("profile", None)
    print(json.dumps(report, indent=2))
    if text:
        print(text)


if __name__ == "__main__":
    main()
