"""The service from several source trees, side by side: ``python -m bench.trees NAME=PATH ...
[--worker-class sync] [--rounds 5]``.

Each tree (a ``git worktree`` of another commit, or one holding a change being weighed) is
served by gunicorn with its own configuration and code, beside the validated peer, all on one
redis-server; ``make bench``'s full load drives every contender in turn in each round, so that
the machine's drift cancels. Reports, per tree, its throughput over the peer's in the same
round (the median over rounds and the spread) and its app and Redis CPU per message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from bench import run as bench_run


def compare(trees: dict[str, Path], model: bench_run.WorkerModel, rounds: int) -> dict:
    profile = dataclasses.replace(bench_run.FULL, name="trees", rounds=rounds)  # make bench's load
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as workdir:
        redis_server = bench_run.RedisServer(Path(workdir))
        contenders = [
            bench_run.Contender("service", model, redis_server.url, root=root) for root in trees.values()
        ]
        contenders.append(bench_run.Contender("validated", model, redis_server.url))
        try:
            for contender, label in zip(contenders, [*trees, "validated"]):
                contender.wait_ready()
                contender.name = label  # its rounds are reported under its tree's name
            runs = bench_run.throughput_rounds(profile, contenders, redis_server)[model.name]
        finally:
            for contender in contenders:
                contender.stop()
            redis_server.stop()
    peer = runs["validated"]
    report = {}
    for label in trees:
        ratios = [
            ours["throughput_rps"] / theirs["throughput_rps"] for ours, theirs in zip(runs[label], peer)
        ]
        requests = sum(result["requests"] for result in runs[label])
        report[label] = {
            "over_the_peer": round(statistics.median(ratios), 3),
            "over_the_peer_rounds": [round(ratio, 3) for ratio in ratios],
            "app_cpu_us": round(1e6 * sum(result["server_cpu_s"] for result in runs[label]) / requests),
            "redis_cpu_us": round(1e6 * sum(result["redis_cpu_s"] for result in runs[label]) / requests),
        }
    return {"worker_model": model.name, "rounds": rounds, "trees": report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=PATH", help="a source tree to serve, named")
    bench_run.add_worker_class(parser)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    trees = {}
    for tree in args.trees:
        name, _, path = tree.partition("=")
        if not path or not (Path(path) / "service").is_dir():
            parser.error(f"{tree}: NAME=PATH, PATH a source tree of this project")
        trees[name] = Path(path).resolve()
    print(json.dumps(compare(trees, bench_run.model_named(args.worker_class), args.rounds), indent=2))


if __name__ == "__main__":
    main()
