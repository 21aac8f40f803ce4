"""``make bench-quick`` stays runnable: one smoke run, checking only the report's shape.

Speed is never asserted here (numbers belong to the benchmark); the test proves the harness
starts every contender, drives it and writes a complete report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.programs import require_redis_server

NUMBER = (int, float)
SECTIONS = {"machine", "settings", "throughput", "round_trips", "correctness", "hot_conversation",
            "memory", "ops_at_scale", "goals"}


@pytest.mark.slow
def test_bench_quick_writes_a_well_formed_report(tmp_path):
    require_redis_server()
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert SECTIONS <= set(report)
    assert {"cpus", "python", "redis"} <= set(report["machine"])
    for name in ("service", "cookie", "plain"):
        row = report["throughput"]["contenders"][name]
        assert all(isinstance(row[key], NUMBER) and row[key] > 0
                   for key in ("throughput_rps", "p50_ms", "p99_ms"))
        assert {"first", "later", "redelivery"} == set(report["round_trips"][name])
        assert all(isinstance(v["round_trips"], int) for v in report["round_trips"][name].values())
        assert isinstance(report["correctness"][name]["lost"], int)
        assert isinstance(report["hot_conversation"][name]["concurrent_s"], float)
    assert set(report["throughput"]["ratios"]) == {"service/cookie", "service/plain"}
    for shape in ("first_message", "replies_full"):
        assert isinstance(report["memory"][shape]["bytes_per_conversation"], float)
    assert report["ops_at_scale"]["status"] == "measured", report["ops_at_scale"]
    assert all(isinstance(report["ops_at_scale"]["figures"][key], NUMBER)
               for key in ("count_ms", "first_page_50_ms", "expire_one_ms"))
    assert all(isinstance(goal["met"], bool) for goal in report["goals"])
    assert "goal" in done.stdout and "machine:" in done.stdout
