"""The adversarial harness: the service as it ships (``config/gunicorn.conf.py``, 2 workers)
while hostile clients hold connections, and a good client's latency meanwhile.

Each run holds one attack while the good client sends signed messages of one conversation,
one after another, for up to ``SECONDS`` (or ``MESSAGES`` messages): connections with
unfinished headers, with unfinished bodies (2×, 4× and 8× ``WEB_CONCURRENCY``, and 100 per
worker), 500 idle connections, and clients sending 20 MB request lines over and over. The
attacks are held for the whole run: ``CLIENT_TIMEOUT`` is at its longest (9 s), longer than a
run. Reported per run: the good client's p50, p99 and slowest answer, answers other than 200,
and workers replaced. ``--worker-class`` runs the same against another worker class.

``.venv/bin/python -m bench.stalls [--quick] [--worker-class gthread]``; ``make bench`` runs it
as shipped and checks the worst p99 against ``bench/goals.py``.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlencode

import requests
from twilio.request_validator import RequestValidator

from service.keys import Keys
from service.simulator import TwilioSimulator
from tests.support.app import webhook_params
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import OURS, crowd
from tests.support.redis_servers import NOT_DURABLE, REDIS_CONF, RedisProcess

TOKEN = "bench-auth-token"
WORKERS = 2
SECONDS = 6.0  # each run's good client stops after this, well within CLIENT_TIMEOUT
MESSAGES = 400
REQUEST_LINE = 20 * 1024 * 1024
ANSWER_WITHIN = 15  # Twilio's patience: a slower answer counts as failed


def header_stall(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www")
    return sock


def body_stall(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\nX-Twilio-Signature: x\r\n\r\nFrom=%2B1555123"
    )
    return sock


def idle(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


class LongLines:
    """Two clients sending 20 MB request lines, each on a new connection once the server
    refuses (414) or drops the last, until stopped."""

    def __init__(self, port: int, clients: int = 2):
        self.port, self.stop, self.started = port, threading.Event(), 0
        chunk = b"a" * 65536
        self.threads = [threading.Thread(target=self.run, args=(chunk,), daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self, chunk: bytes) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    self.started += 1
                    sock.sendall(b"GET /sms?Body=")
                    for _ in range(REQUEST_LINE // len(chunk)):
                        if self.stop.is_set():
                            return
                        sock.sendall(chunk)
            except OSError:
                time.sleep(0.01)  # refused and cut off: the next one

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def good_client(url: str, sender: str, seconds: float, messages: int) -> dict:
    """Signed messages of one conversation, one after another; each answer's latency."""
    twilio = TwilioSimulator(url, TOKEN, timeout=ANSWER_WITHIN)
    latencies, failed = [], 0
    deadline = time.monotonic() + seconds
    for number in range(messages):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        try:
            status = twilio.send(sender, OURS, f"message {number}").status
        except requests.RequestException:
            status = 0
        latencies.append((time.perf_counter() - started) * 1000)
        failed += status != 200
    latencies.sort()
    return {
        "messages": len(latencies),
        "not_200": failed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": latencies[-1],
    }


def runs(workers: int) -> list[tuple[str, Callable[[int], socket.socket] | None, int]]:
    """(name, attack, connections held) of every run."""
    plan: list[tuple[str, Callable[[int], socket.socket] | None, int]] = [("no attack", None, 0)]
    for name, attack in (("unfinished headers", header_stall), ("unfinished bodies", body_stall)):
        for times in (2, 4, 8):
            plan.append((f"{name}, {times}x WEB_CONCURRENCY", attack, times * workers))
        plan.append((f"{name}, 100 per worker", attack, 100 * workers))
    plan.append(("500 idle connections", idle, 500))
    plan.append(("20 MB request lines, 2 clients", None, -1))
    return plan


def measure(worker_class: str = "gevent", quick: bool = False, workdir: Path | None = None) -> dict:
    """Every run against one service; the report's ``stalls`` section."""
    seconds, messages = (1.0, 50) if quick else (SECONDS, MESSAGES)
    results = []
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sms-stalls-")))
        redis_server = RedisProcess(workdir / "stalls-redis", *NOT_DURABLE, config=REDIS_CONF).start()
        stack.callback(redis_server.kill)
        env = {
            "REDIS_URL": redis_server.url,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "WORKER_CLASS": worker_class,
            "CLIENT_TIMEOUT": "9",
            "LOG_FORMAT": "json",
        }
        server = Gunicorn(env, workers=WORKERS, config=GUNICORN_CONF)
        stack.callback(server.stop)
        server.wait_ready(120)
        good_client(server.url, crowd(1, start=199)[0], seconds, 20)  # warm-up: first requests, scripts
        for number, (name, attack, count) in enumerate(runs(WORKERS)):
            held: list[socket.socket] = []
            lines = LongLines(server.port) if count < 0 else None
            try:
                if attack is not None:
                    held = [attack(server.port) for _ in range(count)]
                [sender] = crowd(1, start=200 + number)
                row = {
                    "run": name,
                    "connections": max(count, 0),
                    **good_client(server.url, sender, seconds, messages),
                }
                if lines is not None:
                    row["request_lines_started"] = lines.started
            finally:
                if lines is not None:
                    lines.close()
                for sock in held:
                    sock.close()
            results.append(row)
            print(
                f"  stalls {worker_class} {name:45s} p50 {row['p50_ms']:7.2f} ms p99 {row['p99_ms']:8.2f} ms "
                f"max {row['max_ms']:8.2f} ms, {row['messages']} messages, {row['not_200']} not 200",
                flush=True,
            )
        output = server.output()
    return {
        "worker_class": worker_class,
        "workers": WORKERS,
        "client_timeout_s": 9,
        "runs": results,
        "worst_p99_ms": max(row["p99_ms"] for row in results),
        "not_200": sum(row["not_200"] for row in results),
        "workers_replaced": output.count("Booting worker") - WORKERS,
        "worker_timeouts": output.count("WORKER TIMEOUT"),
    }


def slow_handlers(
    worker_class: str = "gevent",
    conversations: int = 1000,
    seconds: float = 2.0,
    workdir: Path | None = None,
) -> dict:
    """``conversations`` conversations each send one message at the same moment to a handler
    that waits ``seconds`` (``bench/slow_handler.py``): how many are answered 200, how long
    each took from its request to its answer, and how many are saved once (their saves waited
    for: a handler past ``HANDLER_INLINE_BUDGET`` saves after its empty answer). The lock
    outlives the wait (``LOCK_TTL`` 30 s): what becomes of a handler slower than ``LOCK_TTL`` is
    not measured here."""
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sms-slow-")))
        redis_server = RedisProcess(workdir / "slow-redis", *NOT_DURABLE, config=REDIS_CONF).start()
        stack.callback(redis_server.kill)
        env = {
            "REDIS_URL": redis_server.url,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "WORKER_CLASS": worker_class,
            "SMS_HANDLER": "bench.slow_handler:handle",
            "SLOW_HANDLER_SECONDS": str(seconds),
            "LOCK_TTL": "30",
        }
        server = Gunicorn(env, workers=WORKERS, config=GUNICORN_CONF, extra_args=("--log-level", "warning"))
        stack.callback(server.stop)
        server.wait_ready(120)
        requests_ = []
        for sender in crowd(conversations, start=1000):
            params = webhook_params(sender=sender, recipient=OURS, body="hello")
            body = urlencode(params).encode()
            head = (
                f"POST /sms HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {RequestValidator(TOKEN).compute_signature(server.url, params)}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            requests_.append(head.encode() + body)
        pending: dict[socket.socket, tuple[float, list[bytes]]] = {}
        latencies, statuses = [], {}
        started_all = time.perf_counter()
        for request in requests_:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(request)
            sock.setblocking(False)
            pending[sock] = (time.perf_counter(), [])
        deadline = time.monotonic() + ANSWER_WITHIN + 4 * seconds
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending), [], [], 1.0)
            for sock in ready:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if chunk:
                    pending[sock][1].append(chunk)
                    continue
                began, chunks = pending.pop(sock)
                latencies.append((time.perf_counter() - began) * 1000)
                sock.close()
                line = b"".join(chunks).split(b"\r\n", 1)[0].split()
                status = line[1].decode() if len(line) > 1 else "closed"
                statuses[status] = statuses.get(status, 0) + 1
        for sock in pending:
            sock.close()
        wall = time.perf_counter() - started_all
        stored = redis_server.client()
        keys = Keys()
        while True:  # a handler past HANDLER_INLINE_BUDGET saves after its (empty) answer
            saved = sum(
                stored.hget(keys.conversation(sender, OURS).conversation, "seq") == "1"
                for sender in crowd(conversations, start=1000)
            )
            if saved == conversations or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        stored.close()
    latencies.sort()
    return {
        "worker_class": worker_class,
        "conversations": conversations,
        "handler_seconds": seconds,
        "statuses": statuses,
        "unanswered": len(pending),
        "saved_once": saved,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "max_ms": latencies[-1] if latencies else None,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--worker-class", default="gevent", choices=("gevent", "gthread", "sync"))
    parser.add_argument(
        "--slow-handlers", type=int, metavar="N", help="instead: N conversations at once to a 2 s handler"
    )
    args = parser.parse_args(argv)
    if args.slow_handlers:
        print(json.dumps(slow_handlers(args.worker_class, args.slow_handlers), indent=2))
    else:
        print(json.dumps(measure(args.worker_class, args.quick), indent=2))


if __name__ == "__main__":
    main()
