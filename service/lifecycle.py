"""Conversation lifecycle: ``started``/``ended`` events on a Redis Stream, the sweeper that ends
conversations whose time ran out, and the end hook.

Every end is written by one of the store's scripts, atomically with its event (and with the
final state the end hook needs), so an event can be neither lost nor doubled by a crash, a
restart or two sweepers at once. The sweeper finds due conversations through the index, whose
score is each conversation's end: a sweep costs O(due), never a scan of the keys.
On a Cluster a script cannot reach the stream's slot, so it appends to its tag's outbox and the
sweeper relays that to the stream: at-least-once there, with the conversation id to
deduplicate on. The end hook runs in the sweeper, after the end was committed; a crash while
it runs makes it run again for that conversation (at-least-once).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import ScriptInfo, with_appcontext

from . import conversations, handler, metrics, redis_client
from .active import iso
from .conversations import now_ms
from .handler import END_REASONS, Conversation, EndHook
from .keys import Keys
from .redis_client import UNAVAILABLE, Client

log = logging.getLogger(__name__)

DUE_PER_SHARD = 200  # conversations one sweep ends per index shard (the rest, next sweep)
RELAY_PER_SHARD = 500
SAMPLES_KEPT = 7 * 24 * 60  # a week of minutes
READ_BATCH = 1000
# The per-minute tallies the scripts keep per tag (sms:minutes:{NN}), and their codes there
# (field ``<minute><code>``, as the `count` helper of service/conversations.py's scripts says).
TALLY = ("messages", "started", *END_REASONS, "duration_ms", "ended_messages")
TALLY_CODES = "mseoxhdn"
TALLIED = re.compile(r"([0-9]+)([a-z])")


@dataclass(frozen=True)
class Event:
    """One entry of the events stream."""

    id: str
    type: str  # started | ended
    sender: str
    recipient: str
    messages: int
    started_at: int  # epoch ms
    conversation: str
    reason: str | None = None  # ended: expired | operator | opt-out | handler
    ended_at: int | None = None

    @classmethod
    def parse(cls, entry_id: str, fields: dict[str, str]) -> Event:
        return cls(
            id=entry_id,
            type=fields.get("type", ""),
            sender=fields.get("from", ""),
            recipient=fields.get("to", ""),
            messages=_int(fields.get("messages")),
            started_at=_int(fields.get("started_at")),
            conversation=fields.get("conversation", ""),
            reason=fields.get("reason"),
            ended_at=_int(fields["ended_at"]) if "ended_at" in fields else None,
        )

    @property
    def duration_s(self) -> float | None:
        return (self.ended_at - self.started_at) / 1000 if self.ended_at is not None else None

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "type": self.type,
            "from": self.sender,
            "to": self.recipient,
            "messages": self.messages,
            "started_at": self.started_at,
            "conversation": self.conversation,
        }
        if self.type == "ended":
            data.update(reason=self.reason, ended_at=self.ended_at)
        return data

    def line(self) -> str:
        """One human-readable line (``sms-sessions events``)."""
        at = iso(int(self.id.split("-")[0]))
        text = f"{at}  {self.type:<7}  {self.sender} → {self.recipient}  messages={self.messages}"
        if self.type == "ended":
            text += f"  reason={self.reason}  lasted={_duration(self.duration_s or 0)}"
        return text


@dataclass(frozen=True)
class Sample:
    at: int  # epoch ms
    live: int
    messages: int  # saved in the minute before ``at``


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class History:
    """Reads the events and samples streams, and the per-tag minute tallies."""

    def __init__(self, client: Client, keys: Keys):
        self.client = client
        self.keys = keys

    def since(self, start_ms: int) -> Iterator[Event]:
        """Every event from ``start_ms`` on, oldest first, read in batches."""
        lowest = str(start_ms)
        while True:
            batch = self.client.xrange(self.keys.events, lowest, "+", count=READ_BATCH)
            for entry_id, fields in batch:
                yield Event.parse(entry_id, fields)
            if len(batch) < READ_BATCH:
                return
            lowest = "(" + batch[-1][0]

    def recent(self, limit: int = 50, kind: str = "ended") -> list[Event]:
        """The last ``limit`` events of one type, newest first (reads at most 20 × limit)."""
        found: list[Event] = []
        highest = "+"
        for _ in range(20):
            batch = self.client.xrevrange(self.keys.events, highest, "-", count=limit)
            found += [event for event in (Event.parse(i, f) for i, f in batch) if event.type == kind]
            if len(found) >= limit or len(batch) < limit:
                break
            highest = "(" + batch[-1][0]
        return found[:limit]

    def stats(self) -> dict[str, Any]:
        """The last hour: conversations started and ended (by reason), and the ended ones'
        average duration and messages, from each tag's per-minute tallies (100 reads,
        whatever the traffic)."""
        totals = [0] * len(TALLY)
        minute = now_ms() // 60000
        for tally in self.minute_tallies(minute - 59, minute):
            totals = [total + value for total, value in zip(totals, tally)]
        figures = dict(zip(TALLY, totals))
        ended = {reason: figures[reason] for reason in END_REASONS if figures[reason]}
        count = sum(ended.values())
        return {
            "started": figures["started"],
            "ended": ended,
            "average_duration_s": round(figures["duration_ms"] / count / 1000, 1) if count else None,
            "average_messages": round(figures["ended_messages"] / count, 2) if count else None,
        }

    def minute_tallies(self, first: int, last: int) -> Iterator[list[int]]:
        """Every tag's tallies (in ``TALLY``'s order) of the minutes ``first`` to ``last``.

        A tag's hash holds one field per minute and tally, ``<minute><code>`` (``TALLY_CODES``);
        an earlier version wrote one record per minute, ``minute % 60`` = ``"<minute> <the
        tallies in TALLY's order>"``, read here too until the scripts clear it.
        """
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hgetall(self.keys.minutes(shard))
        for fields in pipe.execute():
            by_minute: dict[int, list[int]] = {}
            for field, value in fields.items():
                counted = TALLIED.fullmatch(field)
                if counted and value.isdigit():
                    minute, code = int(counted[1]), counted[2]
                    if first <= minute <= last and code in TALLY_CODES:
                        by_minute.setdefault(minute, [0] * len(TALLY))[TALLY_CODES.index(code)] += int(value)
                elif field.isdigit():  # an earlier version's record
                    numbers = value.split()
                    if len(numbers) == len(TALLY) + 1 and all(n.isdigit() for n in numbers):
                        minute, *tally = (int(n) for n in numbers)
                        if first <= minute <= last:
                            yield tally
            yield from by_minute.values()

    def messages_in(self, minute: int) -> int:
        """Messages saved in ``minute`` over every tag: one field of each tag's tallies (and an
        earlier version's record of that minute), not the whole hour ``minute_tallies`` reads."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hmget(self.keys.minutes(shard), f"{minute}m", str(minute % 60))
        total = 0
        for counted, record in pipe.execute():
            if counted and counted.isdigit():
                total += int(counted)
            numbers = (record or "").split()
            old = len(numbers) == len(TALLY) + 1 and all(n.isdigit() for n in numbers)
            if old and int(numbers[0]) == minute:  # an earlier version's record: messages first
                total += int(numbers[1])
        return total

    def samples(self, since_ms: int) -> list[Sample]:
        entries = self.client.xrange(self.keys.samples, str(since_ms), "+")
        return [
            Sample(int(i.split("-")[0]), _int(f.get("live")), _int(f.get("messages"))) for i, f in entries
        ]

    def follow(self, after: str, block_ms: int = 5000) -> list[Event]:
        """Events after the id ``after``, waiting up to ``block_ms`` for one."""
        reply = self.client.xread({self.keys.events: after}, block=block_ms, count=READ_BATCH)
        return [Event.parse(i, f) for _, entries in reply for i, f in entries]


class Sweeper:
    """Ends conversations whose time ran out, relays a Cluster's outboxes, runs the end hook,
    trims the events stream and samples the live count. One process sweeps at a time (a lease
    in Redis); any may, and two at once still end each conversation once."""

    def __init__(self, app: Flask):
        self.app = app
        self.client = redis_client.client(app)
        self.keys = conversations.keys(app)
        self.store = conversations.store(app)
        self.on_end = handler.end_hook(app)
        self.interval = app.config["SWEEP_INTERVAL"]
        self.retention_ms = app.config["EVENTS_RETENTION"] * 1000
        self.token = secrets.token_hex(8)
        self.stopping = threading.Event()

    def sweep(self) -> int:
        """One pass; returns how many conversations it ended."""
        with self.app.app_context():
            ended = self._expire_due()
            if self.keys.cluster:
                self._relay()
            if self.on_end is not None:
                self._run_hooks(self.on_end)
            self.client.xtrim(self.keys.events, minid=str(now_ms() - self.retention_ms), approximate=False)
            self._sample()
        return ended

    def _expire_due(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for index in self.keys.indexes():
            pipe.zrangebyscore(index, "-inf", now_ms(), start=0, num=DUE_PER_SHARD)
        due = [self.keys.from_member(member) for members in pipe.execute() for member in members]
        ended = self.store.expire(due, cluster=self.keys.cluster) if due else 0
        if ended:
            metrics.current().conversations_ended.labels("expired").inc(ended)
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

    def _run_hooks(self, hook: EndHook) -> None:
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shards():
            pipe.hgetall(self.keys.ending(shard))
        for shard, ending in zip(self.keys.shards(), pipe.execute()):
            if ending and not self._holds_lease():
                return  # another sweeper took over; it runs what is left
            for conversation_id, raw in ending.items():
                self._call_hook(hook, conversation_id, raw)
                self.client.hdel(self.keys.ending(shard), conversation_id)

    def _call_hook(self, hook: EndHook, conversation_id: str, raw: str) -> None:
        try:
            sender, recipient, reason, messages, started_at, ended_at, state = json.loads(raw)
            final = Conversation(
                conversations.decode_state(state) or {},
                sid=conversation_id,
                sender=sender,
                recipient=recipient,
                messages=_int(messages),
                started_at=_moment(_int(started_at)),
            )
            final.ended_at = _moment(_int(ended_at))
            hook(final, reason)
        except Exception as error:  # the developer's code: logged and counted, never blocking
            metrics.current().end_hook_failures.inc()
            log.error("end hook failed: %s: %s", type(error).__name__, error, exc_info=True)

    def _sample(self) -> None:
        """Once a minute: live conversations now, and messages saved in the past minute."""
        now = now_ms()
        last = self.client.xrevrange(self.keys.samples, "+", "-", count=1)
        if last and int(last[0][0].split("-")[0]) // 60000 == now // 60000:
            return
        messages = history(self.app).messages_in(now // 60000 - 1)
        live = conversations.active(self.app).count()
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
        """Sweeps every ``SWEEP_INTERVAL`` while this process holds the lease, until stopped;
        a Redis outage only delays the next sweep."""
        while not self.stopping.is_set():
            try:
                if self._holds_lease():
                    self.sweep()
            except UNAVAILABLE as error:
                log.warning("sweep skipped: Redis %s", type(error).__name__)
            self.stopping.wait(self.interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sms-sweeper", daemon=True)
        thread.start()
        return thread


def _moment(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def history(app: Flask | None = None) -> History:
    return (app or current_app).extensions["sms.history"]


def start_sweeper(app: Flask) -> Sweeper:
    """The background sweeper of a serving process (gunicorn's ``post_worker_init``,
    ``sms-sessions run``)."""
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
        for event in history().since(now_ms() - seconds * 1000):
            show(event)
            last = event.id
        # Each wait shorter than the connection's REDIS_TIMEOUT, which would end a longer one.
        block_ms = max(1, int(current_app.config["REDIS_TIMEOUT"] * 500))
        while follow:
            for event in history().follow(last, block_ms):
                show(event)
                last = event.id
    except UNAVAILABLE as failure:
        click.echo(f"Redis unavailable: {type(failure).__name__}: {failure}", err=True)
        raise SystemExit(1) from None


@click.command("sweep")
def sweep_command():
    """Run the sweeper in the foreground (for servers other than the bundled gunicorn config)."""
    Sweeper(click.get_current_context().ensure_object(ScriptInfo).load_app()).run()


def init_app(app: Flask) -> None:
    app.extensions["sms.history"] = History(redis_client.client(app), conversations.keys(app))
    app.cli.add_command(events_command)
    app.cli.add_command(sweep_command)
