"""Conversation lifecycle: ``started``/``ended`` events on a Redis Stream, the sweeper that ends
conversations whose time ran out, and the end hook.

Every end is written by one of the store's scripts, atomically with its event (and with the
final state the end hook needs), so an event can be neither lost nor doubled by a crash, a
restart or two sweepers at once. The sweeper finds due conversations through the index, whose
score is each conversation's end: a sweep costs O(due), never a scan of the keys.
On a Cluster a script cannot reach the stream's slot, so it appends to its tag's outbox and the
sweeper relays that to the stream: at-least-once there, with the conversation id to
deduplicate on. The end hook runs beside the sweep, never inside it (``service/hooks.py``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading

import click
from flask import Flask, current_app
from flask.cli import ScriptInfo, with_appcontext

from .clock import now_ms, redis_now_ms
from .firing import Queued, TimerFiring
from .history import Event
from .hooks import EndHooks
from .redis_client import UNAVAILABLE, is_outage
from .wiring import current

log = logging.getLogger(__name__)

DUE_PER_SHARD = 200  # conversations one sweep ends per index shard (the rest, next sweep)
RELAY_PER_SHARD = 500
EARLIEST = 0.1  # seconds a sweep waits at least before the next (a timer due meanwhile waits)
SAMPLES_KEPT = 7 * 24 * 60  # a week of minutes


class Sweeper:
    """Ends conversations whose time ran out, fires due timers (service/firing.py), relays a
    Cluster's outboxes, trims the events stream and samples the live count. One process sweeps
    at a time (a lease in Redis); any may, and two at once still end each conversation once and
    fire each timer once. The end hook is ``hooks``' to run (``EndHooks``), in a thread of its
    own when this sweeper runs in the background. ``on_queued`` hears what each timer's firing
    queued for the outbound sender."""

    def __init__(self, app: Flask, on_queued: Queued | None = None):
        self.app = app
        self.wired = wired = current(app)
        self.client, self.keys, self.store = wired.redis, wired.keys, wired.store
        self.hooks = EndHooks(app, wired.on_end) if wired.on_end is not None else None
        self.interval = app.config["SWEEP_INTERVAL"]
        self.retention_ms = app.config["EVENTS_RETENTION"] * 1000
        self.token = secrets.token_hex(8)
        self.stopping = threading.Event()
        self.firing = TimerFiring(app, on_queued)
        self.fired = 0  # timers fired by the last pass

    def sweep(self) -> int:
        """One pass, then the end hook for every conversation waiting for it (what a test
        calls: ``run`` leaves the hooks to their own thread); returns how many it ended."""
        ended = self.sweep_pass()
        if self.hooks is not None:
            self.hooks.run_once()
        return ended

    def follow_hooks(self) -> None:
        """Keeps ended conversations for the end hook if this process or another runs it."""
        self.store.follow_hooks(self.keys.hooks)

    def sweep_pass(self) -> int:
        """Ends what is due, fires the due timers, relays, trims and samples; returns how many
        conversations it ended."""
        self.follow_hooks()
        with self.app.app_context():
            now = redis_now_ms(self.client)  # what is due is the scripts' to say: by Redis' clock
            self.wired.runs.recover(now)  # handlers whose process died run again, here
            ended = self._expire_due(now)
            self.fired = self.firing.fire_due()
            if self.keys.cluster:
                self._relay()
            self.client.xtrim(self.keys.events, minid=str(now - self.retention_ms), approximate=False)
            self._sample(now)
        return ended

    def _expire_due(self, now: int) -> int:
        pipe = self.client.pipeline(transaction=False)
        for index in self.keys.indexes():
            pipe.zrangebyscore(index, "-inf", now, start=0, num=DUE_PER_SHARD)
        due = [self.keys.from_member(member) for members in pipe.execute() for member in members]
        ended = self.store.expire(due, cluster=self.keys.cluster) if due else 0
        if ended:
            self.wired.metrics.conversations_ended.labels("expired").inc(ended)
        return ended

    def _relay(self) -> None:
        """A Cluster's events, from each tag's outbox to the stream (XADD, then XDEL)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.xrange(self.keys.outbox(shard), "-", "+", count=RELAY_PER_SHARD)
        for shard, entries in zip(self.keys.shards(), pipe.execute()):
            if not entries:
                continue
            for _, fields in entries:
                self.client.xadd(self.keys.events, fields, maxlen=self.store.events_max, approximate=True)
            self.client.xdel(self.keys.outbox(shard), *[entry_id for entry_id, _ in entries])

    def _sample(self, now: int) -> None:
        """Once a minute (``now``: Redis' clock, as the tallies' minutes): live conversations
        now, and messages saved in the past minute."""
        last = self.client.xrevrange(self.keys.samples, "+", "-", count=1)
        if last and int(last[0][0].split("-")[0]) // 60000 == now // 60000:
            return
        messages = self.wired.history.messages_in(now // 60000 - 1)
        live = self.wired.live.count()
        self.client.xadd(
            self.keys.samples, {"live": live, "messages": messages}, maxlen=SAMPLES_KEPT, approximate=True
        )

    def _holds_lease(self) -> bool:
        """Takes or renews the lease (twice the interval, at least 10 s); False if another
        process holds it."""
        lease_ms = int(max(2 * self.interval, 10) * 1000)
        holder = self.client.set(self.keys.sweeper, self.token, nx=True, px=lease_ms, get=True)
        if holder in (None, self.token):
            self.client.pexpire(self.keys.sweeper, lease_ms)
            return True
        return False

    def run(self) -> None:
        """Sweeps every ``SWEEP_INTERVAL`` while this process holds the lease, until stopped,
        and sooner when a timer falls due before then (at most every ``EARLIEST`` seconds);
        a Redis outage only delays the next sweep."""
        while not self.stopping.is_set():
            wait = self.interval
            try:
                if self._holds_lease():
                    self.sweep_pass()
                    wait = self._until_next_timer()
                else:
                    self.follow_hooks()  # what this process's messages end is kept as the sweeper's
            except Exception as error:  # the thread goes on: a bug is logged, an outage waits
                if not is_outage(error):
                    log.exception("sweep failed")
                else:
                    log.warning("sweep skipped: Redis %s", type(error).__name__)
            self.stopping.wait(wait)

    def _until_next_timer(self) -> float:
        """Seconds until the next sweep: ``SWEEP_INTERVAL``, or less when a timer is due
        sooner (one pipelined read of each tag's earliest)."""
        next_due = self.firing.next_due()
        if next_due is None:
            return self.interval
        seconds = (next_due - redis_now_ms(self.client)) / 1000
        return min(self.interval, max(seconds, min(self.interval, EARLIEST)))

    def start(self) -> threading.Thread:
        """The sweep in a thread, and the end hook (if this process has it) in another."""
        if self.hooks is not None:
            self.hooks.start()
        thread = threading.Thread(target=self.run, name="sms-sweeper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        if self.hooks is not None:
            self.hooks.stopping.set()


def start_sweeper(app: Flask) -> Sweeper:
    """The background sweeper (and end hook) of a serving process (gunicorn's
    ``post_worker_init``, ``sms-sessions run``)."""
    sweeper = Sweeper(app)
    sweeper.start()
    return sweeper


DURATION = re.compile(r"^(\d+)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds."""
    match = DURATION.match(text.strip().lower())
    if not match:
        raise click.BadParameter("use a number of seconds, or 15m, 2h, 7d")
    return int(match.group(1)) * UNITS[match.group(2)]


@click.command("events")
@with_appcontext
@click.option(
    "--since",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Start this long ago (90s, 15m, 2h, 7d).",
)
@click.option("--follow", is_flag=True, help="Then wait for new events, until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events_command(since, follow, as_json):
    """Lifecycle events: conversations started and ended (from the events stream)."""
    seconds = parse_duration(since)

    def show(event: Event) -> None:
        click.echo(json.dumps(event.to_json(), ensure_ascii=False) if as_json else event.line())

    try:
        last = f"{now_ms() - seconds * 1000}-0"
        for event in current().history.since(now_ms() - seconds * 1000):
            show(event)
            last = event.id
        # Each wait shorter than the connection's REDIS_TIMEOUT, which would end a longer one.
        block_ms = max(1, int(current_app.config["REDIS_TIMEOUT"] * 500))
        while follow:
            for event in current().history.follow(last, block_ms):
                show(event)
                last = event.id
    except UNAVAILABLE as failure:
        click.echo(f"Redis unavailable: {type(failure).__name__}: {failure}", err=True)
        raise SystemExit(1) from None


@click.command("sweep")
def sweep_command():
    """Run the sweeper in the foreground (for servers other than the bundled gunicorn config),
    and the end hook of SMS_HANDLER's module, if it has one, beside it."""
    sweeper = Sweeper(click.get_current_context().ensure_object(ScriptInfo).load_app())
    if sweeper.hooks is not None:
        sweeper.hooks.start()
    sweeper.run()


def init_app(app: Flask) -> None:
    app.cli.add_command(events_command)
    app.cli.add_command(sweep_command)
