"""Prometheus metrics at ``/metrics``, right under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``config/gunicorn.conf.py`` sees to it) each worker
writes its counters and histograms to files there, and a scrape, whichever worker answers it,
adds up every worker's files (prometheus-client's multiprocess mode). Without it the metrics
are the process's own. The active-conversations gauge is kept nowhere: it is counted from the
index when scraped, so the webhook pays no extra Redis round trip for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import StrEnum

from flask import Blueprint, Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .handler import END_REASONS
from .logs import report
from .redis_client import is_outage

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a webhook request ended: the ``outcome`` of its log line and of its metric."""

    REPLIED = "replied"
    DUPLICATE = "duplicate"  # a redelivered MessageSid, answered from memory
    DEFERRED = "deferred"  # its handler ran past the budget: acknowledged, the reply goes out later
    QUEUED = "queued"  # it came while a handler ran past the webhook: acknowledged, handled in turn
    REJECTED_SIGNATURE = "rejected_signature"  # 403
    BAD_REQUEST = "bad_request"  # 4xx
    UNAVAILABLE = "unavailable"  # 503: Redis, or the conversation stayed busy
    ERROR = "error"  # 500: the handler failed (or a bug)


OUTBOUND_STATUSES = ("pending", "queued", "sent", "delivered", "failed", "undelivered", "retried")
SOURCES = ("webhook", "health", "metrics")  # blueprints that talk to Redis
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15)
HANDOFF_WAIT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
LOCK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
TIMER_CANCELLED = ("reply", "handler", "ended")  # why a timer went unfired


class StoreGauges:
    """Gauges read from Redis when scraped, so the webhook pays nothing for them: live
    conversations (the operators' count) and the last hour's ended conversations (from the
    events stream)."""

    def __init__(
        self,
        count: Callable[[], int],
        last_hour: Callable[[], dict],
        on_error: Callable[[], None],
        waiting: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
        backlog: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
    ):
        """``on_error`` hears of each Redis error a scrape met; ``waiting``: conversations
        waiting for a person, and the longest wait in seconds (service/handoff.py);
        ``backlog``: conversations with an outbound message due, and the longest wait
        (service/outbound_view.py)."""
        self.count = count
        self.last_hour = last_hour
        self.on_error = on_error
        self.waiting = waiting
        self.backlog = backlog

    def collect(self):
        try:
            count, last_hour = self.count(), self.last_hour()
            waiting, longest = self.waiting()
            due, late = self.backlog()
        except Exception as error:  # redis_client.is_outage: redis-py's own failures too
            if not is_outage(error):
                raise
            self.on_error()
            report(log, f"conversations not counted: Redis {type(error).__name__}")
            return
        yield GaugeMetricFamily(
            "sms_active_conversations",
            "Conversations whose time has not run out (counted from the index).",
            value=count,
        )
        yield GaugeMetricFamily(
            "sms_conversations_waiting_for_person",
            "Conversations whose handler asked for a person that no operator has taken over yet.",
            value=waiting,
        )
        yield GaugeMetricFamily(
            "sms_conversations_waiting_for_person_longest_seconds",
            "How long the conversation waiting longest for a person has waited (0: none waits).",
            value=longest,
        )
        yield GaugeMetricFamily(
            "sms_outbound_due_conversations",
            "Conversations whose next outbound message is due and not yet handed to Twilio.",
            value=due,
        )
        yield GaugeMetricFamily(
            "sms_outbound_due_late_seconds",
            "How long the one of those due longest has waited (0: none): the senders' lag.",
            value=late,
        )
        for name, key, meaning in (
            ("duration_seconds", "average_duration_s", "Average duration"),
            ("messages", "average_messages", "Average messages"),
        ):
            if last_hour[key] is not None:
                yield GaugeMetricFamily(
                    f"sms_conversations_ended_last_hour_{name}",
                    f"{meaning} of the conversations ended in the last hour.",
                    value=last_hour[key],
                )


class Metrics:
    """The service's metrics; in multiprocess mode they live in files, not in a registry."""

    def __init__(
        self,
        count: Callable[[], int],
        last_hour: Callable[[], dict],
        multiprocess: bool,
        waiting: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
        backlog: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
    ):
        """``count``, ``last_hour``, ``waiting`` and ``backlog``: the gauges' readings (the
        operators' count, the last hour's stats, who waits for a person, the outbox's
        backlog), read when scraped."""
        registry = None if multiprocess else CollectorRegistry()
        self.registry = registry
        self.active = StoreGauges(count, last_hour, self.count_redis_error, waiting, backlog)
        if registry is not None:  # first, so that a scrape reports its own Redis error
            registry.register(self.active)
        self.messages = Counter(
            "sms_messages_received", "Webhook requests, by outcome.", ["outcome"], registry=registry
        )
        # Each outcome's child, made once: labels() takes a lock and builds a key per call.
        self.by_outcome = {outcome: self.messages.labels(outcome) for outcome in Outcome}
        self.conversations_started = Counter(
            "sms_conversations_started",
            "Conversations begun (first message, or after an end).",
            registry=registry,
        )
        self.conversations_ended = Counter(
            "sms_conversations_ended", "Conversations ended, by reason.", ["reason"], registry=registry
        )
        for reason in END_REASONS:
            self.conversations_ended.labels(reason)
        self.end_hook_failures = Counter(
            "sms_end_hook_failures", "End hook calls that raised.", registry=registry
        )
        self.sign_in_failures = Counter(
            "sms_sign_in_failures",
            "Wrong operators' tokens, by where they were tried (api, console).",
            ["surface"],
            registry=registry,
        )
        for surface in ("api", "console"):
            self.sign_in_failures.labels(surface)
        self.lock_wait = Histogram(
            "sms_lock_wait_seconds",
            "Time a message waited for its conversation's lock.",
            buckets=LOCK_WAIT_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "sms_webhook_latency_seconds",
            "Webhook requests, from the app receiving them to their final response.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.handoff_wait = Histogram(
            "sms_handoff_wait_seconds",
            "How long a conversation whose handler asked for a person waited for an operator to take over.",
            buckets=HANDOFF_WAIT_BUCKETS,
            registry=registry,
        )
        self.signature_keys = Counter(
            "sms_signature_key",
            "Signed requests accepted, by the key that signed them: primary, secondary, third or "
            "fourth auth token, or a SharedKey's id (never a secret).",
            ["key"],
            registry=registry,
        )
        self.handler_timeouts = Counter(
            "sms_handler_timeouts", "Handler calls stopped past HANDLER_TIMEOUT.", registry=registry
        )
        self.timers_set = Counter(
            "sms_timers_set", "Timers set (or set again) by handlers.", registry=registry
        )
        self.timers_fired = Counter(
            "sms_timers_fired", "Timers fired (the handler's effect committed).", registry=registry
        )
        self.timers_cancelled = Counter(
            "sms_timers_cancelled",
            "Timers dropped unfired, by why: a reply (cancel_on_reply), the handler (cancel, or "
            "set again under its name), the conversation's end.",
            ["reason"],
            registry=registry,
        )
        for reason in TIMER_CANCELLED:
            self.timers_cancelled.labels(reason)
        self.timer_late = Histogram(
            "sms_timer_late_seconds",
            "How long after its due time a timer fired (Redis' clock).",
            buckets=LATE_BUCKETS,
            registry=registry,
        )
        self.outbound = Counter(
            "sms_outbound_messages",
            "Outbound messages reaching a status: pending (queued with a save), Twilio's statuses "
            "as its answers and status callbacks report them (accepted, queued, sent, delivered, "
            "read, undelivered, failed), failed also for a refusal (an error code), and retried "
            "(an attempt to try again later).",
            ["status"],
            registry=registry,
        )
        for status in OUTBOUND_STATUSES:
            self.outbound.labels(status)
        self.redis_errors = Counter(
            "sms_redis_errors",
            "Failed Redis calls, by the part that made them.",
            ["source"],
            registry=registry,
        )
        for source in SOURCES:
            self.redis_errors.labels(source)

    def count_redis_error(self) -> None:
        """Counts a failed Redis call under the blueprint of the request that made it."""
        self.redis_errors.labels(request.blueprint or "app").inc()

    def scrape_registry(self) -> CollectorRegistry:
        if self.registry is not None:
            return self.registry
        registry = CollectorRegistry()
        registry.register(self.active)
        MultiProcessCollector(registry)
        return registry


def init_app(app: Flask, metrics: Metrics) -> None:
    """Serves ``metrics`` at ``/metrics`` (blueprint ``metrics``: a scrape's Redis errors count
    under that source)."""
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    def scrape():
        registry = metrics.scrape_registry()
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.register_blueprint(bp)


def multiprocess() -> bool:
    """Whether metrics live in files shared by the workers (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
