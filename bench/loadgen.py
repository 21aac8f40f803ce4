"""The load generator: plays Twilio against one contender, in its own process.

Reads a plan (JSON) on stdin, prints the result (JSON) on stdout. Like Twilio it signs every
form POST (``X-Twilio-Signature`` by twilio's ``RequestValidator``), keeps one cookie jar per
(From, To) pair, gives every message a unique ``MessageSid``, sometimes delivers several
messages of one pair at the same moment (a burst: first messages without a cookie, later ones
with the same cookie), and sometimes redelivers a ``MessageSid`` it already got an answer for.

Cheap on purpose, so that it does not starve the server: bodies and signatures are computed
before the clock starts, requests go over raw sockets, and the result reports the CPU time
the generator itself used (``cpu_s``) so the harness can show it was not the bottleneck.
Threads own disjoint pairs; a burst is sent over several sockets at once and read with
``select``. Every loop is bounded by the plan's ``deadline_s``.
"""

from __future__ import annotations

import json
import random
import re
import resource
import select
import socket
import sys
import threading
import time
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

from tests.support.replies import COUNTED, THANKS

COUNT = re.compile(COUNTED.pattern.encode())
FIRST = THANKS.encode()


def reply_count(body: bytes) -> int | None:
    """The message count a reply states ("Thanks…" is the first), None for anything else."""
    if FIRST in body:
        return 1
    match = COUNT.search(body)
    return int(match["times"]) if match else None


def pair_script(rng: random.Random, plan: dict) -> list[list[tuple[int, bool]]]:
    """One pair's steps: each a list of (message index, is redelivery) sent at the same moment."""
    if plan.get("script"):
        steps, index = [], 0
        for size in plan["script"]:
            steps.append([(index + k, False) for k in range(size)])
            index += size
        return steps
    messages = plan["messages"]
    size = min(3, messages) if rng.random() < plan["burst_first"] else 1
    steps = [[(k, False) for k in range(size)]]
    index = size
    while index < messages:
        size = min(2 if rng.random() < plan["burst"] else 1, messages - index)
        steps.append([(index + k, False) for k in range(size)])
        index += size
        if rng.random() < plan["redeliver"]:
            steps.append([(index - 1, True)])
    return steps


class Pair:
    """A (From, To) pair: its signed messages, its script, its cookie jar, its replies."""

    def __init__(
        self,
        sender: str,
        plan: dict,
        rng: random.Random,
        validator: RequestValidator,
        account_sid: str,
        tag: str,
    ):
        self.sender = sender
        self.steps = pair_script(rng, plan)
        self.jar: dict[bytes, bytes] = {}
        self.highest = 0  # the highest count any reply of this pair announced
        self.step_seconds: list[float] = []
        total = max(index for step in self.steps for index, _ in step) + 1
        self.unique = total
        self.redeliveries = sum(1 for step in self.steps for _, again in step if again)
        self.signed: list[tuple[bytes, bytes]] = []
        for index in range(total):
            sid = f"SM{tag}{index:08x}".ljust(34, "0")
            params = {
                "ToCountry": "US",
                "ToState": "CA",
                "SmsMessageSid": sid,
                "NumMedia": "0",
                "ToCity": "",
                "FromZip": "",
                "SmsSid": sid,
                "FromState": "CA",
                "SmsStatus": "received",
                "FromCity": "",
                "Body": f"message {index + 1}",
                "FromCountry": "US",
                "To": plan["recipient"],
                "ToZip": "",
                "NumSegments": "1",
                "MessageSid": sid,
                "AccountSid": account_sid,
                "From": sender,
                "ApiVersion": "2010-04-01",
            }
            signature = validator.compute_signature(plan["url"], params)
            self.signed.append((urlencode(params).encode(), signature.encode()))

    def request(self, index: int, head: bytes) -> bytes:
        body, signature = self.signed[index]
        cookie = b"; ".join(name + b"=" + value for name, value in self.jar.items())
        lines = [head, b"Content-Length: " + str(len(body)).encode(), b"X-Twilio-Signature: " + signature]
        if cookie:
            lines.append(b"Cookie: " + cookie)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Generator:
    def __init__(self, plan: dict):
        self.plan = plan
        url = urlsplit(plan["url"])
        self.address = (url.hostname, url.port)
        self.head = (
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nConnection: close"
        ).encode()
        rng = random.Random(plan.get("seed", 1))
        validator = RequestValidator(plan["token"])
        account_sid = "AC" + "b" * 32
        self.pairs = [
            Pair(sender, plan, rng, validator, account_sid, f"{plan['run']:04x}{n:06x}")
            for n, sender in enumerate(plan["senders"])
        ]
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.lock = threading.Lock()
        self.deadline = 0.0

    def send_step(self, pair: Pair, step: list[tuple[int, bool]]) -> list[int | None]:
        """Sends the step's messages at the same moment; returns the count each reply states."""
        pending = {}
        for index, _ in step:
            sock = socket.create_connection(self.address, timeout=self.plan.get("timeout", 20))
            started = time.perf_counter()
            sock.sendall(pair.request(index, self.head))
            # Half-close at once: gunicorn drains the socket until the client's FIN before it
            # takes the next request, so a late FIN would make the server wait on us.
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            pending[sock] = (started, [])
        counts, latencies, statuses, cookies = [], [], [], []
        while pending:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                for sock in pending:
                    sock.close()
                with self.lock:
                    self.errors += len(pending)
                return counts
            ready, _, _ = select.select(list(pending), [], [], remaining)
            for sock in ready:
                chunk = sock.recv(65536)
                if chunk:
                    pending[sock][1].append(chunk)
                    continue
                started, chunks = pending.pop(sock)
                latencies.append(time.perf_counter() - started)
                sock.close()
                status, jar, count = parse(b"".join(chunks))
                statuses.append(status)
                cookies.append(jar)
                counts.append(count if status == 200 else None)
        for jar in cookies:  # the jar keeps whichever answer came last, like Twilio's
            pair.jar.update(jar)
        with self.lock:
            self.latencies.extend(latencies)
            for status in statuses:
                self.statuses[status] = self.statuses.get(status, 0) + 1
        return counts

    def worker(self, pairs: list[Pair], barrier: threading.Barrier) -> None:
        barrier.wait()
        rounds = max(len(pair.steps) for pair in pairs) if pairs else 0
        for number in range(rounds):
            for pair in pairs:
                if number < len(pair.steps) and time.monotonic() < self.deadline:
                    started = time.perf_counter()
                    try:
                        counts = self.send_step(pair, pair.steps[number])
                        pair.highest = max([pair.highest, *(c for c in counts if c is not None)])
                    except OSError:
                        with self.lock:
                            self.errors += len(pair.steps[number])
                    pair.step_seconds.append(time.perf_counter() - started)

    def run(self) -> dict:
        concurrency = max(1, min(self.plan["concurrency"], len(self.pairs)))
        barrier = threading.Barrier(concurrency + 1)
        threads = [
            threading.Thread(target=self.worker, args=(self.pairs[n::concurrency], barrier))
            for n in range(concurrency)
        ]
        for thread in threads:
            thread.start()
        self.deadline = time.monotonic() + self.plan["deadline_s"]
        cpu_before = cpu_seconds()
        barrier.wait()
        started, started_at = time.perf_counter(), time.time()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
        latencies = sorted(self.latencies)
        return {
            "requests": len(latencies),
            "errors": self.errors,
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
            "wall_s": wall,
            "started_at": started_at,  # epoch seconds, to compare with what Redis records meanwhile
            "throughput_rps": len(latencies) / wall if wall else 0.0,
            "latency_ms": {
                name: percentile(latencies, q) * 1000
                for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
            },
            "cpu_s": cpu,
            "unique_messages": sum(pair.unique for pair in self.pairs),
            "redeliveries": sum(pair.redeliveries for pair in self.pairs),
            "bursts": sum(1 for pair in self.pairs for step in pair.steps if len(step) > 1),
            "expected": {pair.sender: pair.unique for pair in self.pairs},
            # The highest count announced, not the last reply's: a redelivery of an earlier
            # message rightly repeats that message's (lower) count.
            "final": {pair.sender: pair.highest for pair in self.pairs},
            "step_seconds": [pair.step_seconds for pair in self.pairs[:1]],
        }


def parse(response: bytes) -> tuple[int, dict[bytes, bytes], int | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, {}, None
    jar = {}
    for line in lines[1:]:
        if line[:11].lower() == b"set-cookie:":
            name, _, value = line[11:].split(b";", 1)[0].strip().partition(b"=")
            jar[name] = value
    return status, jar, reply_count(body)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    json.dump(Generator(json.load(sys.stdin)).run(), sys.stdout)


if __name__ == "__main__":
    main()
