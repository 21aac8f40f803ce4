"""``make bench-quick`` stays runnable: one smoke run, checking only the report's shape.

Speed is never asserted here (numbers belong to the benchmark); the test proves the harness
starts every contender, drives it and writes a complete report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.goals import REFERENCES
from tests.support import ROOT
from tests.support.programs import require_redis_server

NUMBER = (int, float)
SECTIONS = {
    "machine",
    "settings",
    "worker_models",
    "throughput",
    "round_trips",
    "correctness",
    "hot_conversation",
    "transcripts",
    "cpu_profile",
    "memory",
    "redis_cpu",
    "ops_at_scale",
    "capacity",
    "timers_at_scale",
    "outbound",
    "stalls",
    "slow_handlers",
    "goals",
    "references",
}
CONTENDERS = ("service", "validated", "plain", "cookie")


@pytest.mark.slow
def test_bench_quick_writes_a_well_formed_report(tmp_path):
    require_redis_server()
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) >= SECTIONS
    assert {"cpus", "python", "redis"} <= set(report["machine"])
    models = report["worker_models"]["measured"]
    assert report["worker_models"]["shipped"] == models[0]
    assert "sync" in models
    assert report["worker_models"]["shipped"] == "gevent"
    assert set(report["throughput"]) == set(report["correctness"]) == set(models)
    for model in models:
        named = CONTENDERS if model == models[0] else ("service", "validated")  # side by side
        assert set(report["throughput"][model]["contenders"]) == set(named)
        for name in named:
            row = report["throughput"][model]["contenders"][name]
            assert all(
                isinstance(row[key], NUMBER) and row[key] > 0
                for key in ("throughput_rps", "p50_ms", "p99_ms")
            )
            assert isinstance(report["correctness"][model][name]["lost"], int)
        assert set(report["throughput"][model]["ratios"]) == {f"service/{n}" for n in named[1:]}
    for name in CONTENDERS:
        assert {"first", "later", "redelivery"} == set(report["round_trips"][name])
        assert all(isinstance(v["round_trips"], int) for v in report["round_trips"][name].values())
        assert isinstance(report["hot_conversation"][name]["concurrent_s"], float)
        profiled = report["cpu_profile"]["us"][name]
        assert profiled["cpu_us_per_request"] > 0
        assert sum(profiled["components_us"].values()) > 0
    for shape in ("first_message", "steady", "burst", "burst_cap"):
        assert isinstance(report["memory"][shape]["bytes_per_conversation"], float)
    assert all(isinstance(v, float) for v in report["redis_cpu"]["cpu_us_per_message"].values())
    assert isinstance(report["transcripts"]["throughput"]["on_vs_off"], float)
    assert report["transcripts"]["memory"]["bytes_per_entry"] > 0
    assert report["ops_at_scale"]["status"] == "measured", report["ops_at_scale"]
    assert [row["processes"] for row in report["outbound"]["sender"]] == [1, 2]
    for row in report["outbound"]["sender"]:
        assert row["handed"] == row["messages"]  # every queued message went out
        assert row["messages_per_s"] > 0
    assert report["outbound"]["webhook"]["ratio"] > 0
    assert all(
        isinstance(report["ops_at_scale"]["figures"][key], NUMBER)
        for key in ("count_ms", "first_page_50_ms", "expire_one_ms")
    )
    assert report["timers_at_scale"]["status"] == "measured", report["timers_at_scale"]
    burst = report["timers_at_scale"]["details"]["burst"]
    assert burst["fired"] == burst["due_within_1s"]  # every due timer fired, once
    stalls = report["stalls"]
    assert {row["run"] for row in stalls["runs"]} >= {
        "no attack",
        "unfinished headers, 8x WEB_CONCURRENCY",
        "unfinished bodies, 100 per worker",
        "500 idle connections",
        "20 MB request lines, 2 clients",
    }
    for row in stalls["runs"]:
        assert row["messages"] > 0
        assert isinstance(row["p99_ms"], float)
    assert set(report["slow_handlers"]) == {"gevent", "gthread"}
    for run in report["slow_handlers"].values():
        assert run["conversations"] == sum(run["statuses"].values()) + run["unanswered"]
    assert all(isinstance(goal["met"], bool) for goal in report["goals"])
    assert {row["key"] for row in report["references"]} == set(REFERENCES)
    assert all(isinstance(row["measured"], float) and "met" not in row for row in report["references"])
    assert "goal" in done.stdout
    assert "machine:" in done.stdout
