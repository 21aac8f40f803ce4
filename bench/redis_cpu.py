"""Redis CPU per message, per script: the service's own OPEN and SAVE, with exactly the arguments
``ConversationStore`` sends, on a redis-server of its own (``config/redis.conf`` without
persistence, a free loopback port; never 6379) or the harness's.

Two measures, each the median of ``--repeats`` runs on ``--conversations`` new conversations:

- **per script and path** (``INFO commandstats``: µs of ``EVALSHA`` per call, the script's
  inner commands included; and those inner commands per call): each path's calls sent apart
  (pipelined, so that one delta holds one script on one path): OPEN and SAVE of a first
  message, of a later one, and OPEN of a redelivery (SAVE never runs for one);
- **per message** (``INFO cpu`` delta / N, user + system): the store's own ``open`` and
  ``save``, one message after another, each a round trip as a worker makes it: the scripts'
  time plus Redis' socket work (what the throughput runs' "Redis CPU per request" counts,
  without the contention).

µs move with whatever else the machine runs; ``--instructions`` counts instead the
instructions redis-server executes per call of each path under valgrind's callgrind (user
space, the same however busy the machine is; one run), to compare scripts that differ by a
command or two.

    .venv/bin/python -m bench.redis_cpu                          # 5,000 conversations, 5 runs
    .venv/bin/python -m bench.redis_cpu --conversations 1000 --repeats 3 --output FILE
    .venv/bin/python -m bench.redis_cpu --instructions           # 1,000 conversations, callgrind
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from service import settings
from service.keys import ConversationKeys, Keys
from service.sessions import SESSION_ID_BYTES
from service.store import Commit, ConversationStore, Opened, decode_turn
from tests.support.redis_servers import NOT_DURABLE, REDIS_CONF, RedisProcess
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_until

RECIPIENT = "+15550001111"
BATCH = 1000
PATHS = ("open_first", "save_first", "open_later", "save_later", "open_redelivery")
MESSAGES = ("first", "later", "redelivery")


def _store(client: redis.Redis) -> ConversationStore:
    store = ConversationStore.from_config(client, settings.load({}))  # the default settings
    store.preload()
    return store


def _commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    return {
        name[len("cmdstat_") :]: (row["calls"], row["usec"])
        for name, row in client.info("commandstats").items()
    }


def _cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def _reply(message: int) -> str:
    return "t" + (thanks("Friend") if message == 1 else count_reply("Friend", 2, RECIPIENT))


def _message_sid(message: int, pair: ConversationKeys) -> str:
    return f"SM{message:08x}{pair.sender[2:]}".ljust(34, "0")


class Callgrind:
    """redis-server under valgrind's callgrind on a free loopback port: instructions executed
    between ``zero`` and ``count`` (``callgrind_control``; the server acts on it within its
    next cron tick)."""

    def __init__(self, workdir: Path):
        self.out = workdir / "callgrind.out"
        valgrind = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}")
        self.server = RedisProcess(workdir, *NOT_DURABLE, config=REDIS_CONF, under=valgrind).start(seconds=60)
        self.client = redis.Redis(port=self.server.port, decode_responses=True)
        self.dumps = 0

    def _control(self, option: str) -> None:
        pid = str(self.server.process.pid)
        subprocess.run(["callgrind_control", option, pid], check=True, capture_output=True)

    def zero(self) -> None:
        self._control("-z")

    def count(self) -> int:
        self._control("-d")
        self.dumps += 1
        dump = Path(f"{self.out}.{self.dumps}")
        wait_until(dump.exists, what="callgrind's dump")
        time.sleep(0.1)  # written whole before the next look
        for line in dump.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {dump}")

    def stop(self) -> None:
        self.client.close()
        self.server.kill()


class Paths:
    """One run of the per-script measure: every path's calls pipelined apart."""

    def __init__(
        self,
        client: redis.Redis,
        store: ConversationStore,
        pairs: list[ConversationKeys],
        callgrind: Callgrind | None = None,
    ):
        self.client, self.store, self.pairs, self.callgrind = client, store, pairs, callgrind
        self.sids = {pair.member: secrets.token_urlsafe(SESSION_ID_BYTES) for pair in pairs}
        self.figures: dict[str, dict] = {}

    def _measured(self, path: str, calls: list[tuple[str, list, list]]) -> list:
        before = _commandstats(self.client)
        if self.callgrind:
            self.callgrind.zero()
        replies = []
        for start in range(0, len(calls), BATCH):
            pipe = self.client.pipeline(transaction=False)
            for sha, keys, args in calls[start : start + BATCH]:
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies += pipe.execute()
        instructions = self.callgrind.count() if self.callgrind else 0
        after = _commandstats(self.client)
        delta = {
            name: (calls_after - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
            for name, (calls_after, usec) in after.items()
            if name != "info"
        }
        scripts, usec = delta.pop("evalsha")
        self.figures[path] = {
            "us_per_call": usec / scripts,
            **({"instructions_per_call": round(instructions / scripts)} if self.callgrind else {}),
            "commands_per_call": {
                name: round(count / scripts, 3) for name, (count, _) in sorted(delta.items()) if count
            },
        }
        return replies

    def run(self) -> dict[str, dict]:
        store = self.store
        for message, shape in ((1, "first"), (2, "later")):
            tokens = {pair.member: secrets.token_hex(8) for pair in self.pairs}
            opens = [
                (store._open.sha, *store.open_call(pair, _message_sid(message, pair), tokens[pair.member]))
                for pair in self.pairs
            ]
            opened = [
                decode_turn(tokens[pair.member], reply)
                for pair, reply in zip(self.pairs, self._measured(f"open_{shape}", opens))
            ]
            if not all(isinstance(turn, Opened) and turn.answered is None for turn in opened):
                raise RuntimeError(f"OPEN of a {shape} message found its conversation busy")
            saves = [
                (
                    store._save.sha,
                    *store.save_call(
                        pair,
                        turn,
                        Commit(
                            sid=self.sids[pair.member],
                            state="{}",
                            is_new=message == 1,
                            message_sid=_message_sid(message, pair),
                            answer=_reply(message),
                        ),
                    ),
                )
                for pair, turn in zip(self.pairs, opened)
            ]
            if set(self._measured(f"save_{shape}", saves)) != {"saved"}:
                raise RuntimeError(f"SAVE of a {shape} message did not save")
        again = [
            (store._open.sha, *store.open_call(pair, _message_sid(2, pair), secrets.token_hex(8)))
            for pair in self.pairs
        ]
        replies = self._measured("open_redelivery", again)
        if any(getattr(decode_turn("", reply), "answered", None) is None for reply in replies):
            raise RuntimeError("OPEN did not recognise a redelivery")
        return self.figures


def per_message(client: redis.Redis, store: ConversationStore, pairs: list[ConversationKeys]) -> dict:
    """Redis CPU µs per message through the store's own calls, one round trip at a time."""
    sids = {pair.member: secrets.token_urlsafe(SESSION_ID_BYTES) for pair in pairs}
    figures = {}
    for message, shape in ((1, "first"), (2, "later"), (2, "redelivery")):
        before = _cpu_seconds(client)
        for pair in pairs:
            opened = store.open(pair, _message_sid(message, pair))
            if shape == "redelivery":
                if opened.answered is None:
                    raise RuntimeError("OPEN did not recognise a redelivery")
                continue
            store.save(
                pair,
                opened,
                Commit(
                    sid=sids[pair.member],
                    state="{}",
                    is_new=message == 1,
                    message_sid=_message_sid(message, pair),
                    answer=_reply(message),
                ),
            )
        figures[shape] = (_cpu_seconds(client) - before) * 1e6 / len(pairs)
    return figures


def measure(client: redis.Redis, conversations: int, repeats: int) -> dict:
    """Both measures on ``client``'s server (``decode_responses``; flushed before each run and
    after the last)."""
    store = _store(client)
    keys = Keys()
    pairs = [keys.conversation(f"+1557{n:07d}", RECIPIENT) for n in range(conversations)]
    paths: list[dict] = []
    messages: list[dict] = []
    for _ in range(repeats):
        client.flushall()
        paths.append(Paths(client, store, pairs).run())
        client.flushall()
        messages.append(per_message(client, store, pairs))
    client.flushall()
    scripts = {
        path: {
            "us_per_call": round(statistics.median(run[path]["us_per_call"] for run in paths), 2),
            "commands_per_call": paths[-1][path]["commands_per_call"],
        }
        for path in PATHS
    }
    per = {shape: round(statistics.median(run[shape] for run in messages), 1) for shape in MESSAGES}
    return {
        "conversations": conversations,
        "repeats": repeats,
        "scripts": scripts,
        "scripts_us_per_message": {
            "first": round(scripts["open_first"]["us_per_call"] + scripts["save_first"]["us_per_call"], 2),
            "later": round(scripts["open_later"]["us_per_call"] + scripts["save_later"]["us_per_call"], 2),
            "redelivery": scripts["open_redelivery"]["us_per_call"],
        },
        "cpu_us_per_message": per,
    }


def instructions(conversations: int) -> dict:
    """Instructions per call of each path, redis-server under callgrind (one run)."""
    with tempfile.TemporaryDirectory() as workdir:
        server = Callgrind(Path(workdir))
        try:
            client = server.client
            pairs = [Keys().conversation(f"+1557{n:07d}", RECIPIENT) for n in range(conversations)]
            figures = Paths(client, _store(client), pairs, server).run()
        finally:
            server.stop()
    return {
        "conversations": conversations,
        "instructions_per_call": {path: figures[path]["instructions_per_call"] for path in PATHS},
        "commands_per_call": {path: figures[path]["commands_per_call"] for path in PATHS},
    }


def render(report: dict) -> str:
    lines = [
        f"Redis CPU, {report['conversations']} conversations, median of {report['repeats']} runs",
        "  script and path       us/call  commands per call",
    ]
    for path, row in report["scripts"].items():
        commands = " ".join(f"{name} {count:g}" for name, count in row["commands_per_call"].items())
        lines.append(f"  {path:20s} {row['us_per_call']:8.2f}  {commands}")
    scripts, cpu = report["scripts_us_per_message"], report["cpu_us_per_message"]
    for shape in MESSAGES:
        lines.append(
            f"  {shape:10s} message: scripts {scripts[shape]:6.2f} us, Redis CPU {cpu[shape]:6.1f} us "
            "(INFO cpu, one round trip at a time)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per call under callgrind instead"
    )
    args = parser.parse_args(argv)
    if args.instructions:
        counted = instructions(args.conversations if args.conversations != 5000 else 1000)
        if args.output:
            args.output.write_text(json.dumps(counted, indent=2) + "\n")
        for path, count in counted["instructions_per_call"].items():
            commands = " ".join(f"{n} {c:g}" for n, c in counted["commands_per_call"][path].items())
            print(f"  {path:20s} {count:8,d} instructions/call  {commands}")
        return
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(Path(workdir), *NOT_DURABLE, config=REDIS_CONF).start()
        try:
            client = redis.Redis(port=server.port, decode_responses=True)
            report = measure(client, args.conversations, args.repeats)
            client.close()
        finally:
            server.kill()
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
