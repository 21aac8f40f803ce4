"""``python -m bench.signatures`` stays runnable, and counts what the issue asks: one HMAC a
message in the usual case, with one account or a thousand (speed is the benchmark's, never
asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT


def test_the_signature_benchmark_runs_and_counts_one_hmac_in_the_usual_case():
    done = subprocess.run(
        [sys.executable, "-m", "bench.signatures", "--messages", "20", "--runs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {m[1]: (m[2], m[3]) for m in re.finditer(r"^(\S.*?) +([\d.]+) +(\d+)$", done.stdout, re.MULTILINE)}
    assert [rows[case][1] for case in ("one account", "1,000 accounts", "rotating (old token second)")] == [
        "1",
        "1",
        "2",
    ]
    assert all(float(micros) > 0 for micros, _ in rows.values())
