"""``make bench``: the service against the approaches a user would otherwise pick.

Contenders, each under gunicorn with the same workers, all on one redis-server this harness
starts on a free port (never 6379):

- ``service``: this project, as it ships (``config/gunicorn.conf.py``, ``service:create_app()``);
- ``validated``: plain Flask-Session on Redis behind the signature decorator of Twilio's Flask
  guide, what a careful user deploys instead (``bench/validated_app.py``);
- ``plain``: bare plain Flask-Session 0.8 on Redis, default settings (``bench/plain_session_app.py``);
- ``cookie``: Twilio's tutorial, the counter in Flask's signed-cookie session (``bench/cookie_app.py``).

Each is driven by ``bench/loadgen.py`` in a separate process with the same Twilio-faithful load,
alternating contenders over several rounds so that machine drift cancels; the report gives
medians. Every contender runs under the worker model ``config/gunicorn.conf.py`` ships, and
the service and the validated peer also under gunicorn's other worker classes (sync, gthread),
side by side. Then
round trips per message of each contender (counted by Redis's ``MONITOR``), a hot
conversation, Redis memory per conversation, Redis CPU per script and message
(``bench/redis_cpu.py``), the operators' queries at 1M conversations
(``bench/ops_at_scale.py``; 1,000 with ``--quick``), CPU per component of one request
(``bench/profile.py``), transcripts' cost (throughput on against off, memory per entry:
``bench/transcripts.py``), a good client's latency while hostile clients hold connections
(``bench/stalls.py``), outbound messages (``bench/outbound.py``: the sender's rate against the
Twilio stand-in, the webhook's throughput while it sends), the goals of ``bench/goals.py`` and
its reference figures. Report: stdout and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench import capacity, redis_cpu
from bench import goals as bench_goals
from bench import outbound as bench_outbound
from bench import profile as bench_profile
from bench import stalls as bench_stalls
from bench import transcripts as bench_transcripts
from bench.profile import COMPONENTS, CONTENDERS
from service import settings
from service.clock import now_ms
from service.keys import Keys
from service.sessions import SESSION_ID_BYTES
from service.simulator import TwilioSimulator
from service.store import Commit, ConversationStore, Opened
from tests.support.app_servers import GUNICORN_CONF, Gunicorn, gunicorn_settings, hermetic_environment
from tests.support.redis_servers import NOT_DURABLE, REDIS_CONF, RedisProcess
from tests.support.replies import count_reply, thanks

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKEN = "bench-auth-token"
RECIPIENT = "+15550001111"
WORKERS = 2
BURST_MESSAGES = 4  # messages of one conversation within the redelivery window, for memory


@dataclass(frozen=True)
class Profile:
    name: str
    conversations: int  # pairs per run
    messages: int  # unique messages per pair
    rounds: int
    concurrency: int  # generator threads, each with its own connections
    memory_conversations: int
    ops_conversations: int  # live conversations for the operators' queries (bench/ops_at_scale.py)
    ops_runs: int
    timer_conversations: int = 100_000  # x10 pending timers (bench/timers_at_scale.py)
    timers_due: int = 10_000  # of them due within one second
    timer_scales: str = "1000,10000,100000"  # conversations (x10 timers) for a sweep's cost
    burst_first: float = 0.2  # share of pairs whose first 3 messages arrive at the same moment
    burst: float = 0.1  # share of later messages that arrive as a pair of simultaneous ones
    redeliver: float = 0.05  # share of messages Twilio delivers a second time
    hot: int = 50
    redis_cpu_conversations: int = 5000  # bench/redis_cpu.py: Redis CPU per script and message
    redis_cpu_repeats: int = 5
    profile_pairs: int = 200  # bench/profile.py: pairs of 10 messages per pass
    profile_passes: int = 3
    instructions_pairs: int = 50  # the same under callgrind (0: not measured)
    capacity_conversations: int = 1000  # bench/capacity.py: messages at once to a slow handler
    capacity_seconds: float = 2.0  # how long that handler takes
    slow_conversations: int = 1000  # bench/stalls.py: conversations at once to a 2 s handler


FULL = Profile(
    "full",
    conversations=400,
    messages=10,
    rounds=7,
    concurrency=8,
    memory_conversations=100_000,
    ops_conversations=1_000_000,
    ops_runs=21,
)
QUICK = Profile(
    "quick",
    conversations=20,
    messages=4,
    rounds=1,
    concurrency=4,
    memory_conversations=2_000,
    ops_conversations=1_000,
    ops_runs=3,
    profile_pairs=10,
    profile_passes=1,
    instructions_pairs=0,
    redis_cpu_conversations=500,
    redis_cpu_repeats=1,
    capacity_conversations=20,
    capacity_seconds=0.2,
    timer_conversations=1_000,
    timers_due=1_000,
    timer_scales="100,1000",
    slow_conversations=50,
)


class RedisServer:
    """The throwaway redis-server all contenders share: the project's ``config/redis.conf`` (so
    memory figures reflect its encodings) without persistence, on a free port."""

    def __init__(self, workdir: Path):
        self.process = RedisProcess(workdir / "redis", *NOT_DURABLE, config=REDIS_CONF).start()
        self.port, self.url = self.process.port, self.process.url
        self.client = redis.Redis(port=self.port, decode_responses=True)

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"]

    def client_calls(self) -> dict[str, int]:
        return {
            name[len("cmdstat_") :]: row["calls"]
            for name, row in self.client.info("commandstats").items()
            if name != "cmdstat_info"
        }

    def stop(self) -> None:
        self.client.close()
        self.process.kill()


@dataclass(frozen=True)
class WorkerModel:
    """A gunicorn worker model: its class and threads per worker."""

    worker_class: str
    threads: int = 1

    @property
    def name(self) -> str:
        return self.worker_class if self.threads == 1 else f"{self.worker_class}x{self.threads}"

    def args(self) -> tuple[str, ...]:
        return ("--worker-class", self.worker_class, "--threads", str(self.threads))


SYNC = WorkerModel("sync")


GTHREAD = WorkerModel("gthread", 12)  # what config/gunicorn.conf.py gives gthread with 2 workers
# Beside the shipped model: the fast path of the service and the validated peer under the others.
SIDE_CONTENDERS = ("service", "validated")


def shipped_model() -> WorkerModel:
    """The worker model ``config/gunicorn.conf.py`` ships, as gunicorn reads it."""
    config = gunicorn_settings({"WEB_CONCURRENCY": str(WORKERS)})
    return WorkerModel(config["worker_class"], int(config["threads"]))


def add_worker_class(parser: argparse.ArgumentParser) -> None:
    """A part's ``--worker-class`` (``model_named`` reads it)."""
    parser.add_argument(
        "--worker-class", choices=("gevent", "gthread", "sync"), help="default: the shipped one"
    )


def model_named(worker_class: str | None) -> WorkerModel:
    """A part's ``--worker-class``: the model the bench runs under that class, or the shipped one."""
    if not worker_class:
        return shipped_model()
    return GTHREAD if worker_class == "gthread" else WorkerModel(worker_class)


class Contender(Gunicorn):
    """One app under gunicorn with ``WORKERS`` workers of ``model``; the service with its own
    configuration (``config/gunicorn.conf.py``: metrics in multiprocess mode, its log lines),
    the model chosen by its ``WORKER_CLASS``, the others by gunicorn's flags."""

    def __init__(
        self, name: str, model: WorkerModel, redis_url: str, settings: dict | None = None, root: Path = ROOT
    ):
        """``settings``: the service's, over its defaults (``TRANSCRIPTS=1``); ``root``: the
        source tree served, with its own configuration (``bench/trees.py``)."""
        app, cookie = {
            "service": ("service:create_app()", "sms_session"),
            "validated": ("bench.validated_app:app", "session"),
            "plain": ("bench.plain_session_app:app", "session"),
            "cookie": ("bench.cookie_app:app", "session"),
        }[name]
        env = {
            "TWILIO_AUTH_TOKEN": TOKEN,
            **({"REDIS_URL": redis_url} if name != "cookie" else {}),
            **(settings or {}),
        }
        if name == "service":  # its configuration picks the class (and whether gevent patches)
            env["WORKER_CLASS"] = model.worker_class
        super().__init__(
            env,
            workers=WORKERS,
            app=app,
            config=GUNICORN_CONF if name == "service" else None,
            extra_args=(*(() if name == "service" else model.args()), "--log-level", "warning"),
            root=root,
        )
        self.name, self.model, self.cookie = name, model, cookie


def senders(run: int, count: int) -> list[str]:
    """Distinct E.164 senders per run (0–99); the last two digits (the hash tag) vary."""
    if not 0 <= run < 100:
        raise ValueError(f"run {run}: senders are numbered by two digits")
    return [f"+1555{run:02d}{n:05d}" for n in range(count)]


def drive(contender: Contender, redis_server: RedisServer, plan: dict) -> dict:
    """Runs the load generator against ``contender``; adds the CPU each side used."""
    plan = {"url": contender.url, "token": TOKEN, "recipient": RECIPIENT, "deadline_s": 120, **plan}
    server_cpu, redis_cpu = contender.cpu_seconds(), redis_server.cpu_seconds()
    calls = redis_server.client_calls()
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(plan),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=plan["deadline_s"] + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"bench.loadgen against {contender.name} exited {done.returncode}: {done.stderr[-2000:]}"
        )
    result = json.loads(done.stdout)
    result["server_cpu_s"] = contender.cpu_seconds() - server_cpu
    result["redis_cpu_s"] = redis_server.cpu_seconds() - redis_cpu
    result["redis_calls"] = round_trips_made(calls, redis_server.client_calls())
    return result


def round_trips_made(before: dict[str, int], after: dict[str, int]) -> int:
    """Commands clients sent between two ``INFO commandstats``. Commands a Lua script runs are
    listed there too, so where scripts ran only EVALSHA/EVAL count, and BLPOP (a waiter's wait
    for its turn: no script runs it)."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    scripted = delta.get("evalsha", 0) + delta.get("eval", 0)
    return scripted + delta.get("blpop", 0) if scripted else sum(delta.values())


def stored_counts(client: redis.Redis, pairs: list[str]) -> dict[str, int]:
    """The service's own counts, read from the conversation hashes."""
    keys = Keys()
    pipe = client.pipeline(transaction=False)
    for sender in pairs:
        pipe.hget(keys.conversation(sender, RECIPIENT).conversation, "seq")
    return {sender: int(raw or 0) for sender, raw in zip(pairs, pipe.execute())}


def throughput_rounds(profile: Profile, contenders: list[Contender], redis_server: RedisServer) -> dict:
    """Every round drives every contender (under every worker model) in turn, the same load
    shape in a round; returns each one's results by model and name."""
    load = {
        "messages": profile.messages,
        "burst_first": profile.burst_first,
        "burst": profile.burst,
        "redeliver": profile.redeliver,
        "concurrency": profile.concurrency,
    }
    for number, contender in enumerate(contenders):  # warm-up: imports, pools, first requests
        drive(
            contender,
            redis_server,
            {
                **load,
                "run": 90 + number,
                "messages": 2,
                "senders": senders(90 + number, 4 * profile.concurrency),
            },
        )
    runs: dict[str, dict[str, list[dict]]] = {}
    for round_number in range(profile.rounds):
        for number, contender in enumerate(contenders):
            run = round_number * len(contenders) + number
            pairs = senders(run, profile.conversations)
            result = drive(
                contender,
                redis_server,  # same seed in a round: the same load shape
                {**load, "run": run, "senders": pairs, "seed": round_number},
            )
            if contender.name == "service":
                result["stored"] = stored_counts(redis_server.client, pairs)
            runs.setdefault(contender.model.name, {}).setdefault(contender.name, []).append(result)
            print(
                f"  round {round_number + 1} {contender.name:9s} {contender.model.name:11s} "
                f"{result['throughput_rps']:7.0f} req/s p50 {result['latency_ms']['p50']:6.2f} ms "
                f"p99 {result['latency_ms']['p99']:6.2f} ms",
                flush=True,
            )
    return runs


def summarise_throughput(runs: dict[str, list[dict]]) -> dict:
    """One worker model's contenders: medians over rounds, CPU per request, ratios."""
    summary = {}
    for name, results in runs.items():
        wall = sum(r["wall_s"] for r in results)
        requests = sum(r["requests"] for r in results)
        summary[name] = {
            "throughput_rps": statistics.median(r["throughput_rps"] for r in results),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in results),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in results),
            "rounds": [round(r["throughput_rps"], 1) for r in results],
            "requests": requests,
            "statuses": merge_counts(r["statuses"] for r in results),
            "cpu_us_per_request": {
                "generator": 1e6 * sum(r["cpu_s"] for r in results) / requests,
                "server": 1e6 * sum(r["server_cpu_s"] for r in results) / requests,
                "redis": 1e6 * sum(r["redis_cpu_s"] for r in results) / requests,
            },
            "redis_round_trips_per_request": sum(r["redis_calls"] for r in results) / requests,
            "generator_core_share": sum(r["cpu_s"] for r in results) / wall,
            # requests/s the generator could drive with one core to itself
            "generator_ceiling_rps": requests / sum(r["cpu_s"] for r in results),
            "server_core_share": sum(r["server_cpu_s"] for r in results) / wall,
        }
    ours = summary["service"]
    ratios = {
        f"service/{name}": {
            "throughput": ours["throughput_rps"] / other["throughput_rps"],
            "p50": ours["p50_ms"] / other["p50_ms"],
            "p99": ours["p99_ms"] / other["p99_ms"],
            "app_cpu": ours["cpu_us_per_request"]["server"] / other["cpu_us_per_request"]["server"],
        }
        for name, other in summary.items()
        if name != "service"
    }
    return {"contenders": summary, "ratios": ratios}


def merge_counts(dicts) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counts in dicts:
        for key, value in counts.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def correctness(runs: dict[str, list[dict]]) -> dict:
    """Messages sent vs. the counts each contender ends with (the highest count a pair was told)."""
    report = {}
    for name, results in runs.items():
        expected = [n for r in results for n in r["expected"].values()]
        final = [r["final"][sender] for r in results for sender in r["expected"]]
        entry = {
            "conversations": len(expected),
            "messages_sent": sum(expected),
            "redeliveries_sent": sum(r["redeliveries"] for r in results),
            "bursts_sent": sum(r["bursts"] for r in results),
            "final_count_total": sum(final),
            "lost": sum(max(0, e - f) for e, f in zip(expected, final)),
            "double_counted": sum(max(0, f - e) for e, f in zip(expected, final)),
            "exact_conversations": sum(1 for e, f in zip(expected, final) if e == f),
            "non_200": sum(
                n for code, n in merge_counts(r["statuses"] for r in results).items() if code != "200"
            )
            + sum(r["errors"] for r in results),
        }
        if name == "service":
            stored = [r["stored"][sender] for r in results for sender in r["expected"]]
            entry["stored_count_total"] = sum(stored)
            entry["stored_exact_conversations"] = sum(1 for e, s in zip(expected, stored) if e == s)
        report[name] = entry
    return report


class Monitor:
    """Redis's MONITOR in a thread; commands between markers are counted per segment."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.lines: list[dict] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _read(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = monitor.next_command()
                self.lines.append(line)
                if line["command"] == "ECHO bench:mark:end":
                    return

    def mark(self, label: str) -> None:
        self.client.echo(f"bench:mark:{label}")

    def segments(self) -> dict[str, list[str]]:
        """Client commands (not those a Lua script ran) after each marker, up to the next one."""
        self.thread.join(10)
        result: dict[str, list[str]] = {}
        current = None
        for line in self.lines:
            if line["command"].startswith("ECHO bench:mark:"):
                current = line["command"].split(":", 2)[2]
                result[current] = []
            elif current is not None and line.get("client_type") != "lua":
                result[current].append(line["command"].split(" ", 1)[0])
        result.pop("end", None)
        return result


def round_trips(contender: Contender, redis_server: RedisServer) -> dict:
    """Round trips of a first message, a later one and a redelivery, seen by Redis itself."""
    twilio = TwilioSimulator(contender.url, TOKEN, cookie_name=contender.cookie)
    sender = "+15559990042"
    monitor = Monitor(redis.Redis(port=redis_server.port, decode_responses=True))
    monitor.mark("first")
    twilio.send(sender, RECIPIENT, "hello")
    monitor.mark("later")
    later = twilio.send(sender, RECIPIENT, "again")
    monitor.mark("redelivery")
    twilio.send(sender, RECIPIENT, "again", message_sid=later.message_sid)
    monitor.mark("end")
    segments = monitor.segments()
    return {
        label: {"round_trips": len(commands), "commands": commands} for label, commands in segments.items()
    }


def hot_conversation(contender: Contender, redis_server: RedisServer, hot: int) -> dict:
    """``hot`` messages to one pair at the same moment vs. the same number one after another."""
    concurrent = drive(
        contender,
        redis_server,
        {"run": 70, "senders": ["+15559990070"], "script": [1, hot], "concurrency": 1},
    )
    sequential = drive(
        contender,
        redis_server,
        {"run": 71, "senders": ["+15559990071"], "script": [1] * (hot + 1), "concurrency": 1},
    )
    return {
        "messages": hot,
        "concurrent_s": concurrent["step_seconds"][0][1],
        "sequential_s": sum(sequential["step_seconds"][0][1:]),
        "expected_count": hot + 1,
        "concurrent_final_count": concurrent["final"]["+15559990070"],
        "sequential_final_count": sequential["final"]["+15559990071"],
        "non_200": sum(n for code, n in concurrent["statuses"].items() if code != "200"),
    }


def memory(redis_server: RedisServer, conversations: int) -> dict:
    """Redis memory per live conversation, made through the service's own OPEN and SAVE scripts.

    Pipelined for speed: each message is OPEN (takes the lock) then SAVE, with exactly the
    arguments ``ConversationStore.open``/``save`` send. Shapes (``INFO memory`` delta / N):

    - after one message;
    - steady: ``BURST_MESSAGES`` messages further apart than ``REDELIVERY_WINDOW`` (each SAVE
      keeps only the answers still within the window: here SAVE is handed a 1 ms window and the
      messages are more than 1 ms apart, which stands for a real window of minutes);
    - a burst of ``BURST_MESSAGES`` within the window (every answer kept, as the old layout
      kept its last 4), and a burst of ``REPLIES_KEPT`` (the cap: the most a conversation can
      hold), on a fiftieth of the conversations (so that the burst fits in the window).
    """
    client = redis_server.client
    defaults = settings.load({})
    window_ms, kept = defaults["REDELIVERY_WINDOW"] * 1000, defaults["REPLIES_KEPT"]
    steady = _memory_run(client, conversations, BURST_MESSAGES, 1, kept)
    burst = _memory_run(client, conversations, BURST_MESSAGES, window_ms, kept)
    cap = _memory_run(client, max(1, conversations // 50), kept, window_ms, kept)
    return {
        "conversations": conversations,
        "redelivery_window_s": window_ms // 1000,
        "replies_kept": kept,
        "first_message": steady[1],
        "steady": steady[BURST_MESSAGES],
        "burst": burst[BURST_MESSAGES],
        "burst_cap": cap[kept],
    }


def _memory_run(
    client: redis.Redis, conversations: int, messages: int, window_ms: int, kept: int
) -> dict[int, dict]:
    """``messages`` messages to each of ``conversations`` new conversations; the figures after
    the first and after the last, by messages so far."""
    client.flushall()
    defaults = settings.load({})
    store = ConversationStore(
        client,
        ttl=defaults["CONVERSATION_TTL"],
        lock_ttl=5,
        lock_wait=5,
        redelivery_window=window_ms / 1000,
        replies_kept=kept,
    )
    store.preload()
    keys = Keys()
    baseline = client.info("memory")["used_memory"]
    pairs = [keys.conversation(f"+1556{n:07d}", RECIPIENT) for n in range(conversations)]
    sids = {pair.member: secrets.token_urlsafe(SESSION_ID_BYTES) for pair in pairs}  # as the service's
    figures = {}
    for message in range(1, messages + 1):
        for start in range(0, conversations, 2000):
            pipe = client.pipeline(transaction=False)
            for pair in pairs[start : start + 2000]:
                token, message_sid = f"{message:016x}", f"SM{message:08x}{pair.sender[2:]}".ljust(34, "0")
                reply = thanks("Friend") if message == 1 else count_reply("Friend", message, RECIPIENT)
                opened = Opened(token, now=now_ms())
                open_keys, open_args = store.open_call(pair, message_sid, token)
                pipe.evalsha(store._open.sha, len(open_keys), *open_keys, *open_args)
                commit = Commit(sids[pair.member], "{}", message == 1, message_sid, "t" + reply)
                save_keys, save_args = store.save_call(pair, opened, commit)
                pipe.evalsha(store._save.sha, len(save_keys), *save_keys, *save_args)
            outcomes = pipe.execute()
            if outcomes[1::2].count("saved") != len(outcomes) // 2:
                raise RuntimeError("SAVE did not save every conversation")
        if message in (1, messages):
            used = client.info("memory")["used_memory"]
            sample = pairs[0].conversation
            figures[message] = {
                "conversations": conversations,
                "messages": message,
                "answers_kept": sum(1 for name in client.hkeys(sample) if name.startswith("m:")),
                "bytes_per_conversation": (used - baseline) / conversations,
                "hash_encoding": client.object("encoding", sample),
                "hash_memory_usage": client.memory_usage(sample),
                "index_encoding": client.object("encoding", pairs[0].index_shard),
                # its 'started' event, kept EVENTS_RETENTION whether it lives on or not
                "events_bytes_per_conversation": (client.memory_usage(keys.events, samples=0) or 0)
                / conversations,
            }
        time.sleep(0.002)  # the next message is more than a 1 ms window later
    client.flushall()
    return figures


def part(module: str, arguments: list[str], timeout: float) -> dict | str:
    """Runs ``python -m module --output FILE *arguments`` (a part that starts its own servers and
    writes one JSON object: its stdout may carry the service's log lines) and returns that
    object, or why it wrote none (its exit status and the end of its stderr)."""
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "part.json"
        done = subprocess.run(
            [sys.executable, "-m", module, "--output", str(output), *arguments],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=hermetic_environment(),
        )
        try:
            return json.loads(output.read_text())
        except (OSError, ValueError):
            return f"exit {done.returncode}: {done.stderr.strip()[-300:]}"


def ops_at_scale(profile: Profile) -> dict:
    """Issue 3's ``bench/ops_at_scale.py``: count, first page of 50, expire one, at 1M
    conversations (1,000 in the quick profile, which checks that the harness works).

    The script fills a redis-server of its own and writes one JSON object (``--output``; its
    stdout also carries the service's JSON log lines); the medians of its
    ``count_ms``, ``first_page_50_ms`` and ``expire_one_ms`` are checked against the goals.
    """
    result = part(
        "bench.ops_at_scale",
        ["--conversations", str(profile.ops_conversations), "--runs", str(profile.ops_runs)],
        timeout=420,
    )
    if isinstance(result, str):
        return {"status": "failed", "reason": result}
    figures = {name: result[name]["median"] for name in ("count_ms", "first_page_50_ms", "expire_one_ms")}
    return {"status": "measured", "figures": figures, "details": result}


def timers_at_scale(profile: Profile) -> dict:
    """``bench/timers_at_scale.py``: ``timers_due`` timers due within one second among
    ``timer_conversations`` x 10 pending, fired by the sweeper's loop (how late, against
    ``SWEEP_INTERVAL``), and a sweep firing 1,000 (100 quick) at each of ``timer_scales``."""
    result = part(
        "bench.timers_at_scale",
        [
            "--conversations",
            str(profile.timer_conversations),
            "--due",
            str(profile.timers_due),
            "--scales",
            profile.timer_scales,
            "--cost-due",
            str(min(1000, profile.timers_due // 10)),
        ],
        timeout=900,
    )
    if isinstance(result, str):
        return {"status": "failed", "reason": result}
    burst = result["burst"]
    figures = {
        "timers_late_vs_interval": burst["late_s"]["max"] / burst["sweep_interval_s"],
        "timer_sweep_vs_pending": result["sweep_cost_ratio"],
    }
    return {"status": "measured", "figures": figures, "details": result}


def cpu_profile(profile: Profile, redis_server: RedisServer) -> dict:
    """``bench/profile.py`` for every contender: CPU µs per component, and instructions per
    component under callgrind when valgrind is installed (not in the quick run: minutes)."""

    def run(name: str, *options: str) -> dict:
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory) / "profile.json"
            subprocess.run(
                bench_profile.command(name, redis_server.url, *options, "--output", str(out)),
                cwd=ROOT,
                check=True,
                capture_output=True,
                timeout=900,
                env=hermetic_environment(),
            )
            return json.loads(out.read_text())

    report = {
        "us": {
            name: run(name, "--pairs", str(profile.profile_pairs), "--passes", str(profile.profile_passes))
            for name in CONTENDERS
        }
    }
    if not profile.instructions_pairs or not shutil.which("valgrind"):
        report["instructions"] = {
            "status": "not measured: "
            + ("valgrind is not installed" if profile.instructions_pairs else "quick run")
        }
        return report
    with ThreadPoolExecutor(max_workers=2) as pool:  # one callgrind per core
        counted = pool.map(
            lambda name: run(name, "--pairs", str(profile.instructions_pairs), "--instructions"), CONTENDERS
        )
        report["instructions"] = dict(zip(CONTENDERS, counted))
    return report


def outbound(
    profile: Profile,
    shipped: WorkerModel,
    redis_server: RedisServer,
    chosen: bench_outbound.OutboundProfile | None = None,
) -> dict:
    """The sender's rate against the Twilio stand-in, and the webhook's throughput while the
    workers' senders deliver against without (``bench/outbound.py``)."""
    load = {
        "messages": profile.messages,
        "burst_first": profile.burst_first,
        "burst": profile.burst,
        "redeliver": profile.redeliver,
        "concurrency": profile.concurrency,
    }

    def start_service(env: dict[str, str]) -> Contender:
        server = Contender("service", shipped, redis_server.url, env)
        server.wait_ready()
        drive(server, redis_server, {**load, "run": 59, "messages": 2, "senders": senders(59, 20)})  # warm-up
        return server

    def drive_once(server, run: int) -> dict:
        return drive(
            server,
            redis_server,
            {**load, "run": run, "senders": senders(run, profile.conversations), "seed": run},
        )

    print(
        "outbound: sender processes against the Twilio stand-in, then the webhook with and without sending",
        flush=True,
    )
    chosen = chosen or (bench_outbound.QUICK if profile.name == "quick" else bench_outbound.FULL)
    return bench_outbound.measure(chosen, TOKEN, redis_server, start_service, drive_once)


def transcripts_throughput(profile: Profile, model: WorkerModel, redis_server: RedisServer) -> dict:
    """The service with transcripts off and on (``TRANSCRIPTS=1``), the same load in turn in
    every round (as ``throughput_rounds``): medians, and on over off."""
    with ExitStack() as servers:
        pair = []
        for extra in ({}, {"TRANSCRIPTS": "1"}):
            pair.append(Contender("service", model, redis_server.url, extra))
            servers.callback(pair[-1].stop)
        for contender in pair:
            contender.wait_ready()
        load = {
            "messages": profile.messages,
            "burst_first": profile.burst_first,
            "burst": profile.burst,
            "redeliver": profile.redeliver,
            "concurrency": profile.concurrency,
        }
        for number, contender in enumerate(pair):  # warm-up
            drive(
                contender,
                redis_server,
                {**load, "run": 80 + number, "messages": 2, "senders": senders(80 + number, 8)},
            )
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for round_number in range(profile.rounds):
            for label, contender in zip(("off", "on"), pair):
                run = 60 + round_number * 2 + (label == "on")
                result = drive(
                    contender,
                    redis_server,
                    {
                        **load,
                        "run": run,
                        "senders": senders(run, profile.conversations),
                        "seed": round_number,
                    },
                )
                results[label].append(result)
                print(
                    f"  round {round_number + 1} transcripts {label:3s} "
                    f"{result['throughput_rps']:7.0f} req/s p99 {result['latency_ms']['p99']:6.2f} ms",
                    flush=True,
                )
    medians = {label: statistics.median(r["throughput_rps"] for r in rows) for label, rows in results.items()}
    p99 = {label: statistics.median(r["latency_ms"]["p99"] for r in rows) for label, rows in results.items()}
    return {
        "throughput_rps": medians,
        "p99_ms": p99,
        "rounds": {label: [round(r["throughput_rps"], 1) for r in rows] for label, rows in results.items()},
        "on_vs_off": medians["on"] / medians["off"],
    }


def judged(report: dict) -> dict[str, float]:
    """The figures ``bench/goals.py`` names, from this report (the worker model the service ships)."""
    shipped = report["throughput"][report["worker_models"]["shipped"]]
    ratios = shipped["ratios"]
    ours = [report["correctness"][model]["service"] for model in report["correctness"]]
    ops = report["ops_at_scale"].get("figures", {})
    timer_figures = report.get("timers_at_scale", {}).get("figures", {})
    by_model = report["throughput"]
    ours_under = {model: section["contenders"]["service"] for model, section in by_model.items()}
    return {
        "throughput_vs_sync": ours_under[report["worker_models"]["shipped"]]["throughput_rps"]
        / ours_under[SYNC.name]["throughput_rps"],
        "app_cpu_vs_sync": ours_under[report["worker_models"]["shipped"]]["cpu_us_per_request"]["server"]
        / ours_under[SYNC.name]["cpu_us_per_request"]["server"],
        "stall_p99_ms": report["stalls"]["worst_p99_ms"],
        "slow_handlers_answered": answered_share(report["slow_handlers"][report["worker_models"]["shipped"]]),
        "throughput_vs_validated": ratios["service/validated"]["throughput"],
        "p99_vs_validated": ratios["service/validated"]["p99"],
        "app_cpu_vs_validated": ratios["service/validated"]["app_cpu"],
        "throughput_vs_plain": ratios["service/plain"]["throughput"],
        "throughput_vs_cookie": ratios["service/cookie"]["throughput"],
        "app_cpu_vs_plain": ratios["service/plain"]["app_cpu"],
        "round_trips": max(entry["round_trips"] for entry in report["round_trips"]["service"].values()),
        "lost_or_double_counted": sum(row["lost"] + row["double_counted"] + row["non_200"] for row in ours),
        "bytes_first_message": report["memory"]["first_message"]["bytes_per_conversation"],
        "bytes_steady": report["memory"]["steady"]["bytes_per_conversation"],
        **{key: value for key, value in ops.items() if isinstance(value, (int, float))},
        **capacity.judged(report["capacity"]),
        **timer_figures,
        "webhook_while_sending": report["outbound"]["webhook"]["ratio"],
        "webhook_beside_sender_process": report["outbound"]["webhook"]["ratio_sender_process"],
        "webhook_sending_paced": report["outbound"]["webhook"]["ratio_paced"],
        "transcripts_throughput_vs_off": report["transcripts"]["throughput"]["on_vs_off"],
        "bytes_per_transcript_entry": report["transcripts"]["memory"]["bytes_per_entry"],
    }


def answered_share(run: dict) -> float:
    """The share of a slow-handler run's conversations answered 200 and saved once."""
    return min(run["statuses"].get("200", 0), run["saved_once"]) / run["conversations"]


def machine(redis_server: RedisServer) -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_server.client.info("server")["redis_version"],
        "platform": platform.platform(),
        "gunicorn_workers": WORKERS,
    }


def benchmark(profile: Profile) -> dict:
    started = time.monotonic()
    shipped = shipped_model()
    models = [shipped] + [model for model in (SYNC, GTHREAD) if model != shipped]
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as tmp, ExitStack() as cleanup:
        workdir = Path(tmp)
        redis_server = RedisServer(workdir)
        cleanup.callback(redis_server.stop)
        report: dict = {
            "profile": asdict(profile),
            "machine": machine(redis_server),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "worker_models": {"shipped": shipped.name, "measured": [m.name for m in models]},
            "settings": {
                "gunicorn": f"{WORKERS} workers per contender; the shipped worker model for all, "
                "the others for the service and the validated peer",
                "service": "config/gunicorn.conf.py, its WORKER_CLASS set for each model",
                "redis": "one redis-server for all: config/redis.conf without persistence",
                "load": "bench/loadgen.py, separate process",
            },
        }
        with ExitStack() as servers:
            contenders = []
            for model in models:
                for name in CONTENDERS if model == shipped else SIDE_CONTENDERS:
                    contenders.append(Contender(name, model, redis_server.url))
                    servers.callback(contenders[-1].stop)
            for contender in contenders:
                contender.wait_ready(120)  # eight gunicorns starting at once on a busy machine
            print(
                f"throughput: {profile.rounds} rounds x {profile.conversations} conversations x "
                f"{profile.messages} messages, {profile.concurrency} generator threads; worker models "
                + ", ".join(m.name for m in models),
                flush=True,
            )
            runs = throughput_rounds(profile, contenders, redis_server)
            report["throughput"] = {model: summarise_throughput(named) for model, named in runs.items()}
            report["correctness"] = {model: correctness(named) for model, named in runs.items()}
            as_shipped = {c.name: c for c in contenders if c.model == shipped}
            report["round_trips"] = {name: round_trips(as_shipped[name], redis_server) for name in CONTENDERS}
            report["hot_conversation"] = {
                name: hot_conversation(as_shipped[name], redis_server, profile.hot) for name in CONTENDERS
            }
        redis_server.client.flushall()
        print("transcripts: the service with TRANSCRIPTS off and on, in turn", flush=True)
        report["transcripts"] = {
            "throughput": transcripts_throughput(profile, shipped, redis_server),
            "memory": bench_transcripts.memory(
                redis_server.client, profile.memory_conversations // 10, BURST_MESSAGES
            ),
        }
        redis_server.client.flushall()
        report["cpu_profile"] = cpu_profile(profile, redis_server)
        report["memory"] = memory(redis_server, profile.memory_conversations)
        report["redis_cpu"] = redis_cpu.measure(
            redis_server.client, profile.redis_cpu_conversations, profile.redis_cpu_repeats
        )
        redis_server.client.flushall()
        report["ops_at_scale"] = ops_at_scale(profile)
        report["capacity"] = capacity.measure(
            redis_server.url,
            TOKEN,
            RECIPIENT,
            profile.capacity_conversations,
            profile.capacity_seconds,
            WORKERS,
            shipped.args(),
        )
        report["timers_at_scale"] = timers_at_scale(profile)
        report["outbound"] = outbound(profile, shipped, redis_server)
        print("stalls: the good client while hostile clients hold connections", flush=True)
        report["stalls"] = bench_stalls.measure(
            shipped.worker_class, quick=profile.name == "quick", workdir=workdir
        )
        print(
            f"slow handlers: {profile.slow_conversations} conversations at once to a 2 s handler", flush=True
        )
        report["slow_handlers"] = {
            worker_class: bench_stalls.slow_handlers(
                worker_class, profile.slow_conversations, workdir=workdir
            )
            for worker_class in dict.fromkeys((shipped.worker_class, GTHREAD.worker_class))
        }
    measured = judged(report)
    report["goals"] = bench_goals.check(measured)
    report["references"] = bench_goals.references(measured)
    report["elapsed_s"] = time.monotonic() - started
    return report


def render(report: dict) -> str:
    """The human-readable summary printed at the end (the JSON file has everything)."""
    m = report["machine"]
    shipped = report["worker_models"]["shipped"]
    out = [
        f"machine: {m['cpus']} CPUs, Python {m['python']}, Redis {m['redis']}, gunicorn "
        f"{m['gunicorn_workers']} workers; the service ships {shipped}; profile {report['profile']['name']}"
    ]
    for model, section in report["throughput"].items():
        out.append(
            f"{model:11s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'RT/req':>7s}  "
            f"CPU us/req gen/app/redis, generator share of a core (ceiling req/s)"
        )
        for name, row in section["contenders"].items():
            cpu = row["cpu_us_per_request"]
            out.append(
                f"  {name:9s} {row['throughput_rps']:8.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
                f"{row['redis_round_trips_per_request']:7.2f}  {cpu['generator']:.0f}/{cpu['server']:.0f}/"
                f"{cpu['redis']:.0f}, {row['generator_core_share']:.2f} ({row['generator_ceiling_rps']:.0f})"
            )
        for pair, ratio in section["ratios"].items():
            out.append(
                f"  {pair}: throughput {ratio['throughput']:.2f}x, p50 {ratio['p50']:.2f}x, "
                f"p99 {ratio['p99']:.2f}x, app CPU {ratio['app_cpu']:.2f}x"
            )
    for name, rows in report["round_trips"].items():
        out.append(
            f"round trips {name}: "
            + ", ".join(
                f"{label} {row['round_trips']} ({' '.join(row['commands'])})" for label, row in rows.items()
            )
        )
    for model, named in report["correctness"].items():
        for name, row in named.items():
            out.append(
                f"correctness {name} {model}: sent {row['messages_sent']} (+{row['redeliveries_sent']} "
                f"redeliveries), counted {row['final_count_total']}, lost {row['lost']}, "
                f"double-counted {row['double_counted']}, exact {row['exact_conversations']}/"
                f"{row['conversations']}, non-200 {row['non_200']}"
            )
    for name, row in report["hot_conversation"].items():
        out.append(
            f"hot {name}: {row['messages']} concurrent {row['concurrent_s'] * 1000:.0f} ms "
            f"(count {row['concurrent_final_count']}/{row['expected_count']}) vs sequential "
            f"{row['sequential_s'] * 1000:.0f} ms (count {row['sequential_final_count']})"
        )
    profile = report["cpu_profile"]
    out.append(f"{'CPU per request':16s} {'total':>6s} " + " ".join(f"{c:>9s}" for c in COMPONENTS))
    for name, row in profile["us"].items():
        out.append(
            f"  {name + ' us':14s} {row['cpu_us_per_request']:6.0f} "
            + " ".join(f"{row['components_us'][c]:9.1f}" for c in COMPONENTS)
        )
    for name, row in profile["instructions"].items():
        if name == "status":
            out.append(f"  instructions: {row}")
            continue
        out.append(
            f"  {name + ' kinstr':14s} {row['instructions_per_request'] / 1000:6.0f} "
            + " ".join(f"{row['components'][c] / 1000:9.1f}" for c in COMPONENTS)
        )
    mem = report["memory"]
    for shape in ("first_message", "steady", "burst", "burst_cap"):
        row = mem[shape]
        out.append(
            f"memory {shape} ({row['messages']} messages, {row['answers_kept']} answers kept, "
            f"{row['conversations']} conversations): {row['bytes_per_conversation']:.0f} B each "
            f"(hash {row['hash_encoding']}, {row['hash_memory_usage']} B; index "
            f"{row['index_encoding']}; started event {row['events_bytes_per_conversation']:.0f} B)"
        )
    kept = report["transcripts"]
    out.append(
        f"transcripts: throughput on {kept['throughput']['throughput_rps']['on']:.0f} vs off "
        f"{kept['throughput']['throughput_rps']['off']:.0f} req/s ({kept['throughput']['on_vs_off']:.2f}x); "
        f"{kept['memory']['bytes_per_entry']:.0f} B per entry ({kept['memory']['body_chars']}-character "
        f"bodies), {kept['memory']['bytes_per_conversation']:.0f} B per conversation of "
        f"{kept['memory']['messages']} messages"
    )
    out.append(redis_cpu.render(report["redis_cpu"]))
    ops = report["ops_at_scale"]
    out.append(
        f"ops at {report['profile']['ops_conversations']:,} conversations: {ops['status']}: "
        f"{ops.get('figures', ops.get('reason'))}"
    )
    timers = report["timers_at_scale"]
    if timers["status"] == "measured":
        burst = timers["details"]["burst"]
        costs = ", ".join(
            f"{row['pending']:,} pending {row['sweep_ms']:.0f} ms ({row['redis_commands']} commands)"
            for row in timers["details"]["sweep_cost"]
        )
        out.append(
            f"timers: {burst['fired']:,} of {burst['due_within_1s']:,} due within 1 s among "
            f"{burst['pending']:,} pending fired, late p50 {burst['late_s']['p50']} s, max "
            f"{burst['late_s']['max']} s (SWEEP_INTERVAL {burst['sweep_interval_s']} s); a sweep "
            f"firing {timers['details']['sweep_cost'][0]['due']}: {costs}"
        )
    else:
        out.append(f"timers: {timers['status']}: {timers.get('reason')}")
    sent = report["outbound"]
    out.append(
        "outbound: the sender hands to the stand-in "
        + ", ".join(
            f"{r['messages_per_s']:.0f} messages/s with {r['processes']} process(es)" for r in sent["sender"]
        )
        + f"; the webhook while its workers send: {sent['webhook']['ratio']:.2f}x its throughput "
        f"with nothing to send, beside a sender process {sent['webhook']['ratio_sender_process']:.2f}x, "
        f"sending a tenth of its rate as queued {sent['webhook']['ratio_paced']:.2f}x"
    )
    out.append(capacity.render(report["capacity"]))
    stalls = report["stalls"]
    for row in stalls["runs"]:
        out.append(
            f"stalls {stalls['worker_class']} {row['run']}: good client p50 {row['p50_ms']:.2f} ms, p99 "
            f"{row['p99_ms']:.2f} ms, max {row['max_ms']:.2f} ms ({row['messages']} messages, "
            f"{row['not_200']} not 200)"
        )
    out.append(
        f"stalls: workers replaced {stalls['workers_replaced']}, worker timeouts {stalls['worker_timeouts']}"
    )
    for worker_class, row in report["slow_handlers"].items():
        out.append(
            f"slow handlers {worker_class}: {row['conversations']} at once to a {row['handler_seconds']:g} s "
            f"handler: {row['statuses']}, unanswered {row['unanswered']}, saved once {row['saved_once']}, "
            f"p50 {row['p50_ms'] or 0:.0f} ms, p99 {row['p99_ms'] or 0:.0f} ms, all in {row['wall_s']:.1f} s"
        )
    for goal in report["goals"]:
        measured = goal["measured"]
        shown = f"{measured:.2f}" if isinstance(measured, float) else str(measured)
        state = "MET   " if goal["met"] else ("n/a   " if goal["met"] is None else "MISSED")
        out.append(f"goal {state} {goal['goal']}: {shown} (target {goal['target']})")
    for row in report["references"]:
        out.append(f"reference {row['figure']}: {row['measured']:.2f} (not a goal)")
    out.append(f"elapsed {report['elapsed_s']:.0f} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (well under a minute)")
    parser.add_argument("--out", type=Path, help="report file (default bench/results/<date>.json)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    # SIGTERM (a CI timeout, Ctrl-C's cousin) unwinds like an exception, so every server the
    # harness started is stopped by its ExitStack instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = benchmark(profile)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    out = args.out or RESULTS / (f"{date}-quick.json" if args.quick else f"{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
