"""The benchmark's goals, in one table: ``bench/run.py`` checks its report against every row,
``bench/ops_at_scale.py`` against the operators' rows. Each row names the issue that set it.

Ratios are the service's figure over the other contender's, in one ``make bench`` run with the
same workers and load; "validated" is plain Flask-Session behind Twilio's documented signature
decorator (``bench/validated_app.py``), what a careful user deploys instead of this service.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    limit: float
    at_most: bool  # met when measured <= limit (else when measured >= limit)
    issue: int

    @property
    def target(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g}"

    def met(self, measured: float) -> bool:
        return measured <= self.limit if self.at_most else measured >= self.limit


GOALS = (
    Goal("throughput_vs_validated", "throughput vs Flask-Session + Twilio's validator (x)", 1.0, False, 14),
    Goal("throughput_vs_plain", "throughput vs bare plain Flask-Session (x)", 0.9, False, 14),
    Goal("throughput_vs_cookie", "throughput vs the cookie-only tutorial app (x)", 0.8, False, 14),
    Goal("p99_vs_validated", "p99 vs Flask-Session + Twilio's validator (x)", 1.0, True, 14),
    Goal("app_cpu_vs_plain", "app CPU per message vs bare plain Flask-Session (x)", 1.1, True, 14),
    Goal("round_trips", "Redis round trips per message, worst case", 2, True, 5),
    Goal("lost_or_double_counted", "messages lost or double-counted by the service", 0, True, 5),
    Goal("bytes_first_message", "Redis bytes per conversation after one message", 512, True, 5),
    Goal("bytes_steady", "Redis bytes per conversation, messages a window apart", 512, True, 5),
    Goal("count_ms", "ops: count live conversations (ms)", 5, True, 3),
    Goal("first_page_50_ms", "ops: first page of 50 (ms)", 20, True, 3),
    Goal("expire_one_ms", "ops: expire one conversation (ms)", 5, True, 3),
)
BY_KEY = {goal.key: goal for goal in GOALS}
OPS = tuple(goal for goal in GOALS if goal.key in ("count_ms", "first_page_50_ms", "expire_one_ms"))


def check(measured: dict[str, float]) -> list[dict]:
    """Every goal with its measured value (None when this run did not measure it)."""
    rows = []
    for goal in GOALS:
        value = measured.get(goal.key)
        rows.append(
            {
                "goal": goal.text,
                "key": goal.key,
                "target": goal.target,
                "issue": goal.issue,
                "measured": value,
                "met": None if value is None else goal.met(value),
            }
        )
    return rows
