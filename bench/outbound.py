"""Outbound messages in ``make bench``: how many a second the sender hands to Twilio (the local
stand-in, ``service/twilio_standin.py``, in its own process), with one ``sms-sessions sender``
process and with several; and the webhook's throughput while the serving workers' own senders
deliver a backlog, against the same load with nothing to send (goal: at least 0.95x).

Sender rate: a backlog queued with ``service.send`` (each message under its conversation's
lock, as operators and jobs queue), then the sender processes started; the rate is read from
the records themselves, messages over the time between the first and the last one handed
(Redis' clock), so process start-up is not counted. The stand-in shares the machine: its own
CPU bounds the figure, as Twilio's API latency bounds it in production.

Webhook while sending: the service under gunicorn with ``config/gunicorn.conf.py`` and an
account, so each worker runs its sender, which yields to the webhook (``SENDER_YIELD``);
``bench/loadgen.py`` drives it in pairs of runs, one with an empty outbox and one with a
backlog that outlasts the load (the report says how many conversations were still queued at
the end, and how many messages a second the senders handed to Twilio during the load). Then, as
references against the same runs with nothing to send: the same workers without an account
beside one ``sms-sessions sender`` process delivering such a backlog (it does not yield), at
the normal priority and at ``nice -n 19``; and the workers' senders delivering messages queued
during the run at a tenth of the webhook's rate (what an app that sends some of its answers
later queues). Medians over rounds. Everything shares the machine's cores: the stand-in's CPU
(Twilio's, in production) is taken from the webhook too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from service import create_app, send
from service.keys import Keys
from service.twilio_standin import DEV_ACCOUNT_SID
from tests.support.app_servers import Gunicorn, bin_path, hermetic_environment
from tests.support.waiting import wait_for_http

ROOT = Path(__file__).resolve().parent.parent
OUR_NUMBER = "+15550001111"
KEYS = Keys()
PACED_SHARE = 0.1  # the paced run queues this share of the webhook's idle rate
DRAIN_S = 1  # seconds the senders get to finish what they claimed before the next run
NICE = 19  # the niced sender process' niceness: the lowest


@dataclass(frozen=True)
class OutboundProfile:
    messages: int  # queued for each sender-rate measurement
    conversations: int  # they are spread over
    processes: tuple[int, ...]  # sender processes, one measurement each
    rounds: int  # webhook rounds, each with and without sending


FULL = OutboundProfile(messages=3000, conversations=300, processes=(1, 2, 4), rounds=5)
QUICK = OutboundProfile(messages=100, conversations=20, processes=(1, 2), rounds=1)


class Standin(Gunicorn):
    """The stand-in (``service.twilio_standin:create_standin``, the bench's token as its
    account's) on a free port, under gunicorn's gthread worker, which keeps connections alive
    as Twilio's API does: werkzeug's development server (``python -m service.twilio_standin``)
    closes each one, so every message would pay a TCP connect on both sides, and under gevent
    a host lookup in gevent's resolver threads, that production does not."""

    def __init__(self, token: str):
        app = f"service.twilio_standin:create_standin({DEV_ACCOUNT_SID!r}, {token!r})"
        super().__init__(
            {},
            workers=1,
            extra_args=("--worker-class", "gthread", "--threads", "32", "--keep-alive", "60"),
            app=app,
        )

    def wait_ready(self, seconds: float = 30) -> None:
        wait_for_http(self.base + "/_standin/faults", self.process, seconds)

    def reset(self) -> None:
        requests.post(self.base + "/_standin/reset", timeout=10)


def account(standin: Standin, token: str, redis_url: str) -> dict[str, str]:
    """The service's settings for sending through the stand-in."""
    return {
        "REDIS_URL": redis_url,
        "TWILIO_ACCOUNT_SID": DEV_ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": token,
        "TWILIO_FROM_NUMBER": OUR_NUMBER,
        "TWILIO_API_BASE_URL": standin.base,
    }


def phones(count: int, series: int) -> list[str]:
    return [f"+1666{series:02d}{n:05d}" for n in range(count)]


def queue(settings: dict[str, str], messages: int, conversations: int, series: int) -> list[str]:
    """Queues ``messages`` round robin over ``conversations`` new ones; their numbers."""
    app = create_app({name: value for name, value in settings.items() if name != "TWILIO_ACCOUNT_SID"})
    numbers = phones(conversations, series)
    for n in range(messages):
        send(numbers[n % conversations], f"Reminder {n}: your appointment is at 3 pm.", app=app)
    return numbers


def pace(settings: dict[str, str], rate: float, series: int, stop: threading.Event) -> None:
    """Queues messages at ``rate`` a second (to 50 conversations) until ``stop``."""
    app = create_app(dict(settings))
    numbers, n, started = phones(50, series), 0, time.monotonic()
    while not stop.is_set():
        due = started + n / rate
        if stop.wait(max(0.0, due - time.monotonic())):
            return
        send(numbers[n % len(numbers)], f"Your table is ready ({n}).", app=app)
        n += 1


def outbox_left(client: redis.Redis) -> int:
    """Conversations with a message still queued (every tag's due index)."""
    pipe = client.pipeline(transaction=False)
    for due in KEYS.dues():
        pipe.zcard(due)
    return sum(pipe.execute())


def handed_times(client: redis.Redis, numbers: list[str], ours: str = OUR_NUMBER) -> list[int]:
    """When each of these conversations' messages was handed to Twilio (ms, Redis' clock)."""
    return sorted(at for times in handed_per_conversation(client, numbers, ours) for at in times)


def handed_per_conversation(
    client: redis.Redis, numbers: list[str], ours: str = OUR_NUMBER
) -> list[list[int]]:
    """Per conversation (``numbers``' with ``ours``), when its messages were handed to Twilio
    (ms, Redis' clock: the sender's FINISH, right after Twilio's answer)."""
    pipe = client.pipeline(transaction=False)
    for number in numbers:
        pipe.hgetall(KEYS.conversation(number, ours).sent)
    found = []
    for fields in pipe.execute():
        times = []
        for name, raw in fields.items():
            state = json.loads(raw) if name.endswith(":s") else {}
            if state.get("stage") == "handed":
                times.append(int(state["updated_at"]))
        found.append(sorted(times))
    return found


def handed_within(client: redis.Redis, numbers: list[str], run: dict) -> float:
    """Messages a second these conversations' senders handed to Twilio during the load run
    ``run`` (its window, not the load generator's start-up or exit)."""
    start = run["started_at"] * 1000
    end = start + run["wall_s"] * 1000
    return sum(1 for at in handed_times(client, numbers) if start <= at <= end) / run["wall_s"]


def discard(client: redis.Redis, numbers: list[str]) -> None:
    """Takes these conversations' queued messages away, so the senders stop at once (a pass
    goes on with the conversations it took, whatever the due indexes say)."""
    pipe = client.pipeline(transaction=False)
    for number in numbers:
        pipe.delete(KEYS.conversation(number, OUR_NUMBER).outbound)
    pipe.delete(*KEYS.dues())
    pipe.execute()
    time.sleep(DRAIN_S)  # the messages already claimed go out before the next run


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user and system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def sender_rate(
    settings: dict[str, str], client: redis.Redis, profile: OutboundProfile, processes: int, standin: Standin
) -> dict:
    """Messages a second ``processes`` sender processes hand to the stand-in, and the CPU a
    message took in each part (the senders, the stand-in, Redis)."""
    numbers = queue(settings, profile.messages, profile.conversations, series=10 + processes)
    env = {**hermetic_environment(), **settings}
    standin_before, redis_before = standin.cpu_seconds(), redis_cpu_seconds(client)
    started = [
        subprocess.Popen(
            [bin_path("sms-sessions"), "sender"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    try:
        deadline = time.monotonic() + 300
        while outbox_left(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        senders_cpu = sum(cpu_seconds(process.pid) for process in started)
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=30)
    times = handed_times(client, numbers)
    span = (times[-1] - times[0]) / 1000 if len(times) > 1 else 0.0
    return {
        "processes": processes,
        "messages": profile.messages,
        "handed": len(times),
        "messages_per_s": (len(times) - 1) / span if span else 0.0,
        "cpu_us_per_message": {
            "senders": senders_cpu * 1e6 / max(len(times), 1),
            "standin": (standin.cpu_seconds() - standin_before) * 1e6 / max(len(times), 1),
            "redis": (redis_cpu_seconds(client) - redis_before) * 1e6 / max(len(times), 1),
        },
    }


def measure(
    profile: OutboundProfile,
    token: str,
    redis_server,
    start_service: Callable[[dict[str, str]], object],
    drive: Callable[[object, int], dict],
) -> dict:
    """The outbound section of the report. ``start_service(env)``: the service under gunicorn
    with extra settings, ready; ``drive(server, run)``: one load run against it (loadgen's
    result)."""
    client = redis_server.client
    standin = Standin(token)
    standin.wait_ready()
    try:
        settings = account(standin, token, redis_server.url)
        rates = []
        for processes in profile.processes:
            client.flushall()
            standin.reset()
            rates.append(sender_rate(settings, client, profile, processes, standin))
            print(
                f"  outbound: {processes} sender process(es): {rates[-1]['messages_per_s']:.0f} messages/s; "
                f"CPU us a message: {rates[-1]['cpu_us_per_message']}",
                flush=True,
            )
        client.flushall()
        standin.reset()
        # The workers' own senders (the default), and the same workers without an account
        # beside one `sms-sessions sender` process (docs/deploying.md's other way).
        serving = start_service(settings)
        plain = start_service({name: v for name, v in settings.items() if name != "TWILIO_ACCOUNT_SID"})
        fastest = max((rate["messages_per_s"] for rate in rates), default=0) or 300
        try:
            idle, workers, beside, niced, paced, left = [], [], [], [], [], []
            handed_workers, handed_paced = [], []  # messages a second handed to Twilio meanwhile

            def drive_beside(server, run: int, env: dict[str, str], nice: int = 0) -> float:
                """One run against ``server`` beside an ``sms-sessions sender`` process."""
                process = subprocess.Popen(
                    [*(["nice", "-n", str(nice)] if nice else []), bin_path("sms-sessions"), "sender"],
                    cwd=ROOT,
                    env={**hermetic_environment(), **env},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    return drive(server, run)["throughput_rps"]
                finally:
                    process.terminate()
                    process.wait(timeout=30)

            # The goal's pairs, each run with nothing to send next to one while the workers send
            # a backlog that outlasts it (at the fastest measured rate, four times over).
            for number in range(profile.rounds):
                quiet = drive(serving, 60 + 3 * number)
                idle.append(quiet["throughput_rps"])
                backlog = int(fastest * quiet["wall_s"] * 4) + 100
                numbers = queue(settings, backlog, profile.conversations, series=30 + 2 * number)
                result = drive(serving, 61 + 3 * number)
                workers.append(result["throughput_rps"])
                handed_workers.append(handed_within(client, numbers, result))
                left.append(outbox_left(client))
                discard(client, numbers)
            # References, against the median of those with nothing to send.
            for number in range(profile.rounds):
                numbers = queue(settings, backlog, profile.conversations, series=31 + 2 * number)
                beside.append(drive_beside(plain, 62 + 3 * number, settings))
                left.append(outbox_left(client))
                discard(client, numbers)
                # The same at the lowest priority (``nice -n 19``).
                numbers = queue(settings, backlog, profile.conversations, series=20 + number)
                niced.append(drive_beside(plain, 80 + number, settings, nice=NICE))
                left.append(outbox_left(client))
                discard(client, numbers)
                # Paced: messages queued during the run at a tenth of the webhook's rate, as an
                # app that answers some messages later, or sends reminders, queues them.
                stop = threading.Event()
                rate = statistics.median(idle) * PACED_SHARE
                pacer = threading.Thread(target=pace, args=(settings, rate, 40 + number, stop), daemon=True)
                pacer.start()
                try:
                    result = drive(serving, 63 + 3 * number)
                    paced.append(result["throughput_rps"])
                    handed_paced.append(handed_within(client, phones(50, 40 + number), result))
                finally:
                    stop.set()
                    pacer.join()
                discard(client, phones(50, 40 + number))
            print(
                f"  outbound: webhook {idle} req/s with nothing to send, {workers} while its workers send "
                f"(handed {handed_workers} messages a second meanwhile), {beside} beside a sender "
                f"process, {niced} beside one at nice {NICE}, {paced} while its workers send "
                f"{PACED_SHARE:.0%} of that rate as queued (handed {handed_paced} a second); "
                f"conversations still queued after each: {left}",
                flush=True,
            )
        finally:
            serving.stop()
            plain.stop()
    finally:
        standin.stop()
    base = statistics.median(idle)
    return {
        "sender": rates,
        "webhook": {
            "idle_rps": idle,
            "workers_sending_rps": workers,
            "sender_process_rps": beside,
            "conversations_still_queued_after": left,
            "ratio": statistics.median(workers) / base,
            "workers_handed_per_s": handed_workers,
            "ratio_sender_process": statistics.median(beside) / base,
            "sender_process_niced_rps": niced,
            "sender_process_nice": NICE,
            "ratio_sender_process_niced": statistics.median(niced) / base,
            "paced_rps": paced,
            "paced_share": PACED_SHARE,
            "ratio_paced": statistics.median(paced) / base,
            "paced_handed_per_s": handed_paced,
        },
    }


def main() -> None:
    """This part alone: ``python -m bench.outbound [--quick]`` (its own redis-server)."""
    import argparse
    import tempfile

    from bench import run

    parser = argparse.ArgumentParser(
        description="outbound messages: the sender's rate, the webhook while it sends"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="webhook rounds (default: 5, 1 with --quick)")
    parser.add_argument(
        "--processes", type=int, nargs="*", help="sender processes to measure the rate with (default: 1 2 4)"
    )
    args = parser.parse_args()
    profile = run.QUICK if args.quick else run.FULL
    chosen = QUICK if args.quick else FULL
    chosen = dataclasses.replace(
        chosen,
        rounds=args.rounds or chosen.rounds,
        processes=tuple(args.processes) if args.processes is not None else chosen.processes,
    )
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as workdir:
        redis_server = run.RedisServer(Path(workdir))
        try:
            report = run.outbound(profile, run.shipped_model(), redis_server, chosen)
            report["load_average"] = os.getloadavg()
            print(json.dumps(report, indent=2))
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
