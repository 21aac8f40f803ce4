"""The benchmark's goals, in one table: ``bench/run.py`` checks its report against every row,
``bench/ops_at_scale.py`` against the operators' rows.

Ratios are the service's figure over the other contender's, in one ``make bench`` run with the
same workers and load, under the worker model ``config/gunicorn.conf.py`` ships (and, for
``throughput_vs_sync``, the service's own figure under gunicorn's sync worker: what the
protection against stalled clients and slow handlers costs). ``stall_p99_ms`` and
``slow_handlers_answered`` are ``bench/stalls.py``'s. The peer every
ratio goal is judged against is "validated": plain Flask-Session behind Twilio's documented
signature decorator (``bench/validated_app.py``), what a careful user deploys instead of this
service. Bare Flask-Session (no signature check) and the cookie app (no server state) do less
than any deployment should, so their ratios are reference figures: reported, never judged.

One goal is kept by design rather than measured here: nothing of an ended conversation (its
state, index entry, lock or stored answers) outlives ``REDELIVERY_WINDOW``; the store's tests
pin it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    limit: float
    at_most: bool  # met when measured <= limit (else when measured >= limit)

    @property
    def target(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g}"

    def met(self, measured: float) -> bool:
        return measured <= self.limit if self.at_most else measured >= self.limit


GOALS = (
    Goal("throughput_vs_validated", "throughput vs Flask-Session + Twilio's validator (x)", 1.0, False),
    Goal("p99_vs_validated", "p99 vs Flask-Session + Twilio's validator (x)", 1.0, True),
    Goal("app_cpu_vs_validated", "app CPU per message vs Flask-Session + Twilio's validator (x)", 1.0, True),
    Goal(
        "throughput_vs_sync",
        "throughput under the shipped worker class vs the same code under gunicorn's sync worker (x)",
        0.95,
        False,
    ),
    Goal(
        "stall_p99_ms",
        "a good client's p99 while hostile clients hold connections, worst of bench/stalls.py's runs (ms)",
        100,
        True,
    ),
    Goal(
        "slow_handlers_answered",
        "share of 1,000 conversations messaging a 2 s handler at once answered and saved once",
        1.0,
        False,
    ),
    Goal("round_trips", "Redis round trips per message, worst case", 2, True),
    Goal("lost_or_double_counted", "messages lost or double-counted by the service", 0, True),
    Goal(
        "bytes_first_message",
        "Redis bytes per conversation after one message, its started event included",
        600,
        True,
    ),
    Goal(
        "bytes_steady",
        "Redis bytes per conversation, messages a window apart, its started event included",
        600,
        True,
    ),
    Goal(
        "capacity_replies_within_4s",
        "slow handlers: share of 1,000 simultaneous messages (async, 2 s) replied within 4 s",
        1.0,
        False,
    ),
    Goal("capacity_answer_p99_ms", "slow handlers: webhook answer p99 (ms)", 50, True),
    Goal("capacity_lost_or_doubled", "slow handlers: messages lost or doubled", 0, True),
    Goal(
        "webhook_while_sending",
        "webhook throughput while its workers' senders deliver vs with nothing to send (x)",
        0.95,
        False,
    ),
    Goal("transcripts_throughput_vs_off", "throughput with TRANSCRIPTS=1 vs off (x)", 0.9, False),
    Goal("count_ms", "ops: count live conversations (ms)", 5, True),
    Goal("first_page_50_ms", "ops: first page of 50 (ms)", 20, True),
    Goal("expire_one_ms", "ops: expire one conversation (ms)", 5, True),
    Goal(
        "timers_late_vs_interval",
        "timers: 10,000 due within a second among 1,000,000 pending, latest firing after its due "
        "(x SWEEP_INTERVAL)",
        2,
        True,
    ),
    Goal(
        "timer_sweep_vs_pending",
        "timers: a sweep firing 1,000, at 1,000,000 pending vs 10,000 pending (x)",
        1.5,
        True,
    ),
)
BY_KEY = {goal.key: goal for goal in GOALS}
OPS = tuple(goal for goal in GOALS if goal.key in ("count_ms", "first_page_50_ms", "expire_one_ms"))

# key: what the figure is; reported beside the goals, never judged
REFERENCES = {
    "throughput_vs_plain": "throughput vs bare Flask-Session, no signature check (x)",
    "throughput_vs_cookie": "throughput vs the cookie-only tutorial app, no server state (x)",
    "app_cpu_vs_plain": "app CPU per message vs bare Flask-Session (x)",
    "capacity_replies_vs_validated": "slow handlers: replies in Twilio's 15 s vs the validated peer (x)",
    "webhook_beside_sender_process": "webhook throughput beside a sender process (workers "
    "without an account) vs with nothing to send (x)",
    "webhook_sending_paced": "webhook throughput while its workers send messages queued at a "
    "tenth of its rate vs with nothing to send (x)",
    "bytes_per_transcript_entry": "Redis bytes per transcript entry (a message in or a reply)",
    "app_cpu_vs_sync": "app CPU per message under the shipped worker class vs under sync (x)",
}


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
                "measured": value,
                "met": None if value is None else goal.met(value),
            }
        )
    return rows


def references(measured: dict[str, float]) -> list[dict]:
    """The reference figures this run measured, unjudged."""
    return [
        {"figure": text, "key": key, "measured": measured[key]}
        for key, text in REFERENCES.items()
        if key in measured
    ]
