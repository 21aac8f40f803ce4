"""The conversation store: every Redis command a message costs, in two atomic Lua scripts.

A conversation is one hash (``sms:conv:…``, see ``service/keys.py``). Why Lua: a message
costs exactly two round trips. OPEN (``open.lua``) answers a redelivery from memory, or queues
for the conversation's lock in arrival order and, once first in line, takes it and returns the
conversation; SAVE (``save.lua``) checks the lock is still the message's, writes the
conversation (or ends it), the answer's memory and the index, and releases the lock, or hands
it with the conversation to the first in line, which then starts without asking again. A
crashed holder's lock lapses after ``lock_ttl``; a crashed waiter drops out of line once it
stops asking. docs/design.md tells the whole story.

Every conversation script is sent the same keys (``ConversationKeys.in_order``) and the same
settings first (``ConversationStore.settings``), in the order ``common.lua`` reads them.
OPEN's reply (and the turn a save hands over) is decoded here only: ``decode_turn``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import ConnectionError, RedisError
from redis.exceptions import AskError, ClusterError, NoScriptError, ResponseError, TryAgainError

from ..keys import ConversationKeys
from ..redis_client import UNAVAILABLE, Client, is_cluster
from .scripts import Script

log = logging.getLogger(__name__)


# A conversation's timers as a script stores them (timers.lua): their JSON ('{}': none; '':
# unchanged), their earliest due in ms ('' for none), and its own TTL in ms ('' for none).
Timing = tuple[str, int | str, int | str]
NO_CHANGE: Timing = ("", "", "")


@dataclass(frozen=True)
class Commit:
    """What a message's save writes (``save.lua``) beside the lock it holds."""

    sid: str  # the session's id
    state: str  # the encoded state
    is_new: bool
    message_sid: str
    answer: str  # kept for a redelivery
    end_reason: str | None = None
    transcript: str = ""  # its entries (``transcripts.payload``), '' when off
    handoff: str = ""  # why the handler asks for a person, or ''
    outbound: str = ""  # messages queued in the same step (``service.outbox.encode``)
    keyword: str | None = None  # the message's opt-out keyword (STOP, START), for the outbound rules
    timers: Timing = NO_CHANGE  # the pending timers and own TTL as the handler left them (timers.py)


class ConversationBusy(Exception):
    """The message waited its turn for longer than ``LOCK_WAIT``."""


class LockLost(Exception):
    """The lock lapsed (or the conversation was ended) before the state could be saved."""


class SavedAlready(LockLost):
    """An inbound message's late save: the lock is not its run's, and the message's answer is
    stored (a rerun of its handler saved it, or an earlier try of this save whose reply was
    lost): nothing written."""


class NotReplicated(RedisError):
    """Fewer replicas than ``REDIS_WAIT_REPLICAS`` confirmed a script's writes (answers 503).

    The write may still be on the master; a redelivery of the message is answered from it, or
    counted afresh if a failover lost it, never twice.
    """


@dataclass
class Opened:
    """What OPEN found: a redelivery's stored answer, or the lock and the stored fields
    (as Redis holds them: the caller decodes, and treats what it cannot read as new)."""

    token: str
    now: int = 0  # Redis' clock when the lock was taken: the message's time, handed back to SAVE
    answered: str | None = None
    sid: str = ""
    state: str = ""
    seq: str = ""
    first_seen: str = ""
    ended_overdue: bool = False  # it found the conversation's time run out and ended it
    paused: str = ""  # until when (ms) an operator holds it, the bot paused (store/person.lua)
    timers: str = ""  # its pending timers' JSON (service/timers.py), '' for none
    ttl: str = ""  # its own time to live in ms, '' for CONVERSATION_TTL


@dataclass(frozen=True)
class Queued:
    """The conversation has inbound messages (a handler runs past the webhook): the message is
    among them, acknowledged, and is handled in its turn by that run."""


QUEUED = Queued()


@dataclass
class Inbound:
    """An inbound message whose turn came outside a webhook (the previous one's save passed the
    lock on, or the sweeper claimed a lapsed conversation): its run's token is ``opened.token``,
    ``entry`` its stored fields (``<MessageSid> <JSON>``)."""

    opened: Opened
    entry: str

    @property
    def params(self) -> dict[str, str]:
        return json.loads(self.entry.partition(" ")[2])


@dataclass(frozen=True)
class Waiting:
    """OPEN found others ahead of the message: ``ahead`` of them."""

    ahead: int


DEFERRED = "deferred"  # OPEN asks for the message's fields, to put it among the inbound messages


def decode_turn(token: str, raw: Any) -> Opened | Waiting | Queued | str | None:
    """OPEN's reply (a flat list of names and values, ``reply.lua``), or the same list as JSON
    handed over on a wake-up list; None for what says only "ask again" (a release's ``1``)."""
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, list):
        return None
    reply = dict(zip(raw[0::2], raw[1::2]))
    status = reply.get("status")
    if status == "opened":
        return Opened(
            reply.get("token", token),
            int(reply["now"]),
            None,
            reply["sid"],
            reply["state"],
            reply["seq"],
            reply["first_seen"],
            reply["ended_overdue"] == 1,
            reply.get("paused") or "",
            reply.get("timers") or "",  # sent only when the conversation has them
            reply.get("ttl") or "",
        )
    if status == "answered":
        return Opened(token, answered=reply["answer"], sid=reply["sid"])
    if status == "waiting":
        return Waiting(int(reply["ahead"]))
    if status == "queued":
        return QUEUED
    if status == DEFERRED:
        return DEFERRED
    return None


def decode_inbound(raw: Any) -> Inbound | None:
    """A save's or a recovery's hand-over of the lock to an inbound message (None: no such turn)."""
    if not isinstance(raw, list):
        return None
    opened = decode_turn("", raw)
    if not isinstance(opened, Opened):
        return None
    reply = dict(zip(raw[0::2], raw[1::2]))
    return Inbound(opened, reply["entry"])


def new_hex() -> str:
    """16 hex digits: with a MessageSid, an inbound message's run's token (``new_token``)."""
    return f"{random.getrandbits(64):016x}"


def new_token(message_sid: str) -> str:
    """A message's turn: ``<MessageSid>;<16 hex digits>``.

    Tells this message's turn from others' (unguessable is not needed: no request names it),
    and names the message, so that a save handing the lock over can tell whether it was
    answered meanwhile; ``;`` tells it from a version that reads no such list (``line.lua``).
    Not os.urandom: its system call lets go of the GIL, a thread switch per message. random
    reseeds in each forked worker.
    """
    return f"{message_sid};{random.getrandbits(64):016x}"


class ConversationStore:
    """Runs the scripts for one conversation at a time; holds no per-request state."""

    # A waiter asks again at least this often; one that stops for ``PATIENCE`` leaves the line.
    POLL_FIRST, POLL_MAX, PATIENCE = 0.002, 0.05, 1.0
    # Physically, a live conversation outlives its end by this much, so that whoever ends it
    # (a message or a sweep) still finds its state. An ended one keeps only its answers, for
    # REDELIVERY_WINDOW.
    GRACE = 24 * 3600

    def __init__(
        self,
        client: Client,
        *,
        ttl: int,
        lock_ttl: float,
        lock_wait: float,
        redelivery_window: float,
        replies_kept: int,
        events_max: int = 1_000_000,
        hooks: bool = False,
        wait_replicas: int = 0,
        wait_ms: int = 0,
        read_timeout: float = 0.5,
        cluster: bool = False,
        on_lock_wait: Callable[[float], None] = lambda seconds: None,
        number_hash: Callable[[str], str | None] = lambda number: None,
        transcript_max: int = 0,
    ):
        """``hooks``: this process has the end hook, so every ended conversation's final state is
        kept for it (else only while ``keep_endings`` says another process runs it).
        ``on_lock_wait`` hears how long each ``open`` waited for the lock (metrics).
        ``number_hash``: what events carry instead of a number (None: the number itself).
        ``transcript_max``: TRANSCRIPT_MAX with transcripts on (outbound statuses are written to
        them), else 0."""
        self.client = client
        self.number_hash = number_hash
        self.transcript_max = str(transcript_max) if transcript_max else ""  # status entries
        self.on_lock_wait = on_lock_wait
        self.lock_wait = lock_wait
        self.blocking = read_timeout > self.POLL_MAX + 0.15
        self.events_max = events_max  # the sweeper's relay trims as the scripts do
        self.wait_replicas = wait_replicas
        self.cluster = cluster
        self.hooks = hooks
        self.wait_ms = wait_ms
        # ARGV[1..8] of every conversation script, in common.lua's order; as the strings Redis
        # receives, so that no call converts them again.
        self.settings: list[str] = [
            str(setting)
            for setting in (
                int(lock_ttl * 1000),
                int(self.PATIENCE * 1000),
                ttl * 1000,
                int(redelivery_window * 1000),
                replies_kept,
                (ttl + self.GRACE) * 1000,
                events_max,
                "1" if hooks else "0",
            )
        ]
        self._open = Script(client, "open.lua")
        self._save = Script(client, "save.lua")
        self._release = Script(client, "release.lua")
        self._end = Script(client, "end.lua")
        self._expire = Script(client, "expire.lua")
        self._fire = Script(client, "fire.lua")
        self._handoff = Script(client, "handoff.lua")
        self._claim = Script(client, "claim.lua")
        self._finish = Script(client, "finish.lua")
        self._status = Script(client, "status.lua")
        self._push = Script(client, "push.lua")
        self._defer = Script(client, "defer.lua")
        self._interim = Script(client, "interim.lua")
        self._renew = Script(client, "renew.lua")
        self._recover = Script(client, "recover.lua")

    @classmethod
    def from_config(
        cls,
        client: Client,
        config: Mapping[str, Any],
        *,
        hooks: bool = False,
        on_lock_wait: Callable[[float], None] = lambda seconds: None,
        number_hash: Callable[[str], str | None] = lambda number: None,
    ) -> ConversationStore:
        """The store the app's ``config`` (``settings.load``) describes."""
        return cls(
            client,
            ttl=config["CONVERSATION_TTL"],
            lock_ttl=config["LOCK_TTL"],
            lock_wait=config["LOCK_WAIT"],
            redelivery_window=config["REDELIVERY_WINDOW"],
            replies_kept=config["REPLIES_KEPT"],
            events_max=config["EVENTS_MAX"],
            hooks=hooks,
            on_lock_wait=on_lock_wait,
            wait_replicas=config["REDIS_WAIT_REPLICAS"],
            wait_ms=max(1, int(config["REDIS_TIMEOUT"] * 500)),  # answers before the read timeout
            read_timeout=config["REDIS_TIMEOUT"],
            cluster=is_cluster(config["REDIS_URL"]),
            number_hash=number_hash,
            transcript_max=config["TRANSCRIPT_MAX"] if config["TRANSCRIPTS"] else 0,
        )

    def follow_hooks(self, announcement: str) -> None:
        """Whether the scripts keep ended conversations for the end hook (ARGV[8]): always
        when this process has the hook, else when a process that runs it has announced itself
        in the key ``announcement`` (``service/hooks.py``; one read): the choice is the
        deployment's, not this process's."""
        announced = not self.hooks and bool(self.client.exists(announcement))
        self.settings[7] = "1" if self.hooks or announced else "0"

    @property
    def open_script(self) -> Script:
        """OPEN, for pipelines (the sweeper's timers: ``open_call``'s keys and arguments)."""
        return self._open

    @property
    def fire_script(self) -> Script:
        """FIRE, for pipelines (``fire_call``'s keys and arguments)."""
        return self._fire

    @property
    def scripts(self) -> tuple[Script, ...]:
        return (
            self._open,
            self._save,
            self._release,
            self._end,
            self._expire,
            self._claim,
            self._finish,
            self._status,
            self._push,
            self._defer,
            self._interim,
            self._renew,
            self._recover,
            self._handoff,
            self._fire,
        )

    def preload(self) -> None:
        """Loads the scripts so that even the first message costs two round trips.

        On a Cluster ``SCRIPT LOAD`` goes to every primary. Best effort: with Redis down at
        start, or on a primary promoted later, they are loaded on first use instead.
        """
        for script in self.scripts:
            try:
                script.redis.sha = self.client.script_load(script.source.text)
            except UNAVAILABLE as error:
                log.warning(
                    "could not preload Lua scripts (%s); they load on first use", type(error).__name__
                )
                return

    def open(self, keys: ConversationKeys, message_sid: str) -> Opened:
        """The lock for ``message_sid`` (a send from outside a webhook): round trip 1, more
        while it waits its turn, also while a handler runs past its webhook (its inbound
        messages are for webhooks' messages only)."""
        opened = self.open_or_queue(keys, message_sid, None)
        assert isinstance(opened, Opened)  # without an entry it never joins the inbound messages
        return opened

    def open_or_queue(
        self, keys: ConversationKeys, message_sid: str, entry: Callable[[], str] | None
    ) -> Opened | Queued:
        """Round trip 1 (more only while the message waits its turn, asking again the sooner
        the nearer it is to the front, or when it joins the inbound messages: ``entry`` gives
        its fields as JSON, ``Queued`` says it is among them)."""
        token = new_token(message_sid)
        started = time.monotonic()
        deadline = started + self.lock_wait
        turn = self.ask(keys, message_sid, token)
        while True:
            if turn is DEFERRED and entry is not None:
                turn = self.ask(keys, message_sid, token, entry())
            if isinstance(turn, Opened):
                if turn.answered is None:
                    self.on_lock_wait(time.monotonic() - started)
                return turn
            if isinstance(turn, Queued):
                return turn
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.on_lock_wait(time.monotonic() - started)
                self.release(keys, token)
                raise ConversationBusy(keys.member)
            ahead = turn.ahead if isinstance(turn, Waiting) else 0
            handed = self._wait_turn(
                keys.wake + token, token, min(remaining, self.POLL_FIRST * (ahead + 1), self.POLL_MAX)
            )
            turn = handed or self.ask(keys, message_sid, token)

    def ask(
        self, keys: ConversationKeys, message_sid: str, token: str, entry: str | None = None
    ) -> Opened | Waiting | Queued | str:
        """One OPEN: the message's turn as it stands (``entry``: its fields, when asked for)."""
        script_keys, args = self.open_call(keys, message_sid, token, entry)
        turn = decode_turn(token, self._run(self._open, script_keys, args))
        if turn is None:
            raise ResponseError("OPEN answered neither opened, answered, waiting, queued nor deferred")
        return turn

    def _wait_turn(self, wake: str, token: str, seconds: float) -> Opened | None:
        """Until the lock's holder hands the turn over or ``seconds`` pass. A save hands over
        the lock itself with what OPEN would have returned (returned here: no need to ask
        again); a release only wakes it to ask again (None, as after ``seconds``). Sleeps
        instead where Redis could answer a BLPOP later than the read timeout (its timer ticks
        every 100 ms)."""
        if self.blocking and seconds >= 0.001:  # BLPOP's 0 would mean forever
            popped = self.client.blpop([wake], timeout=seconds)
            if popped:
                turn = decode_turn(token, popped[1])
                return turn if isinstance(turn, Opened) else None
        else:
            time.sleep(seconds)
        return None

    def save(self, keys: ConversationKeys, opened: Opened, commit: Commit) -> bool:
        """Round trip 2; True if it ended a conversation. Raises LockLost when the lock is no
        longer ours: nothing was written."""
        result = self._run(self._save, *self.save_call(keys, opened, commit))
        if result == "lost":
            raise LockLost(keys.member)
        return result == "ended"

    def save_inbound(
        self, keys: ConversationKeys, opened: Opened, commit: Commit, keeps: bool = False
    ) -> tuple[bool, Inbound | None]:
        """SAVE of an inbound message (its handler ran past the webhook): whether it ended the
        conversation, and the next inbound message, now holding the lock, if one waits.
        ``keeps``: the conversation stays as it was (the handler failed or ran out of time),
        only the answer is remembered. Raises LockLost when the lock is no longer ours (a late
        save: the token fences it off), ``SavedAlready`` when the message's answer is stored
        already: nothing was written."""
        result = self._run(self._save, *self.save_call(keys, opened, commit, next_hex=new_hex(), keeps=keeps))
        if result == "lost":
            raise LockLost(keys.member)
        if result == "answered":
            raise SavedAlready(keys.member)
        if isinstance(result, list):
            following = decode_inbound(result)
            return dict(zip(result[0::2], result[1::2])).get("result") == "ended", following
        return result == "ended", None

    def defer(
        self, keys: ConversationKeys, token: str, message_sid: str, entry: str, outbound: str = ""
    ) -> None:
        """The message becomes the first inbound message and its lock a lease (``defer.lua``),
        ``outbound`` (``service.outbox.encode``: what its handler sent so far) queued with it;
        raises LockLost when the lock is no longer its own."""
        result = self._run(
            self._defer, keys.in_order(), [*self.settings, token, message_sid, keys.member, entry, outbound]
        )
        if result == "lost":
            raise LockLost(keys.member)

    def interim(self, keys: ConversationKeys, token: str, outbound: str) -> None:
        """Queues ``outbound`` (``service.outbox.encode``) while the lock is ``token``'s
        (``interim.lua``: a handler's sends past the webhook); raises LockLost, nothing queued,
        when it is not."""
        if (
            self._run(self._interim, keys.in_order(), [*self.settings, token, keys.member, outbound])
            == "lost"
        ):
            raise LockLost(keys.member)

    def renew(self, calls: list[tuple[ConversationKeys, str]], cluster: bool = False) -> list[bool]:
        """Extends the lease of each (keys, token) still held; whether each was. One pipeline,
        except on a Cluster (one call each)."""
        scripted = [(keys.in_order(), [*self.settings, token, keys.member]) for keys, token in calls]
        if cluster:
            return [bool(self._renew(script_keys, args)) for script_keys, args in scripted]
        pipe = self.client.pipeline(transaction=False)
        for script_keys, args in scripted:
            self._renew(script_keys, args, client=pipe)
        try:
            return [bool(renewed) for renewed in pipe.execute()]
        except ResponseError as error:
            raise self._renew.source.explain(error) from error

    def recover(self, keys: ConversationKeys) -> Inbound | None:
        """The recovery of a pending conversation whose lease lapsed: its first inbound message,
        with the lock, or None (still held, or nothing waits)."""
        return decode_inbound(
            self._run(
                self._recover,
                keys.in_order(),
                [*self.settings, new_hex(), keys.member, self.event_names(keys)],
            )
        )

    def open_call(
        self, keys: ConversationKeys, message_sid: str, token: str, entry: str | None = None
    ) -> tuple[list, list]:
        """OPEN's keys and arguments (also for pipelines that fill Redis: the bench); ``entry``
        is sent always, '' when absent, so that the events' numbers stay the last."""
        return keys.in_order(), [
            *self.settings,
            token,
            message_sid,
            keys.member,
            entry or "",
            self.event_names(keys),
        ]

    def event_names(self, keys: ConversationKeys) -> str:
        """The numbers the conversation's events carry, every event-writing script's last
        argument (``names.lua``): '' for the numbers themselves, else their hashes."""
        sender = self.number_hash(keys.sender)
        if sender is None:
            return ""
        return f"{sender}|{self.number_hash(keys.recipient)}"

    def save_call(
        self, keys: ConversationKeys, opened: Opened, commit: Commit, next_hex: str = "", keeps: bool = False
    ) -> tuple[list, list]:
        """SAVE's keys and arguments: ``commit.timers`` (timers.lua's three), ``next_hex`` (an
        inbound message's save: the next one's token's digits) and ``keeps`` (the conversation
        kept as it was), sent only when one of them is not its default, before the last three,
        counted from the end by the script: the handoff's reason, the transcript's entries and
        the events' numbers."""
        timers = commit.timers
        rare: tuple = ()
        if timers != NO_CHANGE or next_hex or keeps:
            rare = (*timers, next_hex, "1" if keeps else "0")
        return keys.in_order(), [
            *self.settings,
            opened.token,
            commit.message_sid,
            keys.member,
            commit.sid,
            commit.state,
            commit.answer,
            "1" if commit.is_new else "0",
            commit.end_reason or "",
            opened.now,
            commit.outbound,
            commit.keyword if commit.keyword in ("STOP", "START") else "",
            *rare,
            commit.handoff,
            commit.transcript,
            self.event_names(keys),
        ]

    def fire(self, *call: Any) -> str:
        """A timer's effect under the lock ``opened`` holds (``fire.lua``; ``fire_call``'s
        arguments), or with no ``timer`` only its ``timers`` stored and the lock given back:
        ``'fired'``, ``'ended'``, ``'kept'`` or ``'lost'`` (nothing written)."""
        return self._run(self._fire, *self.fire_call(*call))

    def fire_call(
        self,
        keys: ConversationKeys,
        opened: Opened,
        timer: str,
        timer_id: str,
        state: str,
        timers: Timing,
        end_reason: str | None,
        outbound: str = "",
        transcript: str = "",
    ) -> tuple[list, list]:
        """FIRE's keys and arguments: ``outbound``, the messages to queue with it
        (``service.outbox.encode``); ``transcript``, their entries (``transcripts.fired``)."""
        stored, earliest, own_ttl = timers
        return keys.in_order(), [
            *self.settings,
            opened.token,
            keys.member,
            timer,
            timer_id,
            state,
            stored or "{}",
            earliest,
            own_ttl,
            end_reason or "",
            opened.now,
            outbound,
            transcript,
            self.event_names(keys),
        ]

    def _run(self, script: Script, keys: list[str], args: list):
        """Runs ``script``; with ``wait_replicas``, pipelined with ``WAIT`` in the same round trip.

        WAIT confirms that this connection's writes reached the replicas before we answer 200,
        so a failover cannot lose a counted message. Even a script that wrote nothing (a
        redelivery answered from memory) must be confirmed: on a master whose replica was just
        promoted WAIT returns 0, and that memory may be about to vanish. Idle connections are
        then dropped, so that the next one asks Sentinel where the master is; on a Cluster the
        client's view of the slots is refreshed instead (``confirming``).
        """
        for attempt in (1, 2):  # redis-py's Script.__call__, less its per-call import
            try:
                if not self.wait_replicas:
                    return self.client.evalsha(script.sha, len(keys), *keys, *args)
                pipe = self.confirming(keys[0])
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.wait(self.wait_replicas, self.wait_ms)
                result, acknowledged = pipe.execute()
                break
            except NoScriptError:  # a server that lost the scripts (restart, failover)
                if attempt == 2:
                    raise
                script.redis.sha = self.client.script_load(script.source.text)
            except (AskError, TryAgainError, ClusterError) as error:  # MOVED included: the slot moved
                self._refresh_slots()
                raise error
            except ResponseError as error:
                raise script.source.explain(error) from error
            except UNAVAILABLE:
                if self.cluster:  # a master gone: where is its slot now?
                    self._refresh_slots()
                raise
        if acknowledged < self.wait_replicas:
            if self.cluster:
                self._refresh_slots()
            else:
                self.client.connection_pool.disconnect(inuse_connections=False)
            raise NotReplicated(f"{acknowledged} of {self.wait_replicas} replicas confirmed")
        return result

    def confirming(self, key: str) -> Any:
        """A pipeline whose ``WAIT`` confirms the writes of the connection its other commands
        run on: the client's, or on a Cluster the connection of the master that owns ``key``'s
        slot (a Cluster pipeline sends a keyless ``WAIT`` to a node of its own choosing). Such
        a pipeline does not follow ``MOVED``: ``_run`` refreshes the slots and answers 503."""
        if self.cluster:
            node = self.client.get_node_from_key(key)
            connection = node.redis_connection if node is not None else None
            if connection is None:  # another thread is refreshing the nodes: an outage meanwhile
                raise ConnectionError("the Cluster's nodes are being refreshed")
            return connection.pipeline(transaction=False)
        return self.client.pipeline(transaction=False)

    def _refresh_slots(self) -> None:
        """A Cluster's slots and masters asked again (best effort: during a failover no node
        may know yet)."""
        try:
            self.client.nodes_manager.initialize()
        except UNAVAILABLE as error:
            log.info("could not refresh the Cluster's slots: %s", type(error).__name__)

    def claim(self, keys: ConversationKeys, token: str, lease_ms: int) -> dict | None:
        """CLAIM: the conversation's next outbound message if it is due, held for ``lease_ms``
        (``claim.lua``'s names and values as a dict), else None."""
        found = self._run(self._claim, keys.in_order(), [*self.settings, keys.member, token, lease_ms])
        return dict(zip(found[0::2], found[1::2])) if found else None

    def finish(
        self, keys: ConversationKeys, message_id: str, token: str, outcome: str, *details: str | int
    ) -> tuple[str, str]:
        """FINISH: an attempt's ``outcome`` ('accepted', 'retry', 'failed') and its details, as
        ``finish.lua`` reads them; the message's status before and after it (('lost', '') when
        the claim was no longer the caller's: nothing written)."""
        before, after = self._run(
            self._finish,
            keys.in_order(),
            [*self.settings, keys.member, message_id, token, outcome, *details, self.transcript_max],
        )
        return before, after

    def status(
        self, keys: ConversationKeys, message_id: str, message_sid: str, status: str, error_code: str
    ) -> tuple[str, str]:
        """STATUS: a status callback applied if it moves the message up; (before, after)."""
        before, after = self._run(
            self._status,
            keys.in_order(),
            [*self.settings, message_id, message_sid, status, error_code, self.transcript_max],
        )
        return before, after

    def push(
        self,
        keys: ConversationKeys,
        opened: Opened,
        *,
        start: str | None,
        state: str,
        outbound: str,
        template: bool,
        transcript: str = "",
    ) -> tuple[str, int | None]:
        """PUSH, under the lock ``opened`` holds: queues ``outbound`` (``service.outbox.encode``)
        and, with ``start`` (a new conversation's id), starts the conversation with ``state``;
        releases the lock. ('queued', None), ('refused', Twilio's code) or ('lost', None)."""
        reply = self._run(
            self._push,
            keys.in_order(),
            [
                *self.settings,
                opened.token,
                keys.member,
                "1" if start else "0",
                start or "",
                state,
                outbound,
                "1" if template else "0",
                transcript,
                self.event_names(keys),
            ],
        )
        return reply[0], (int(reply[1]) if len(reply) > 1 else None)

    def release(self, keys: ConversationKeys, token: str) -> None:
        """Gives the lock back without saving, or leaves the line."""
        self._release(keys.in_order(), [*self.settings, token])

    def end(self, keys: ConversationKeys) -> bool:
        """An operator ends a conversation now (its event, its state for the hook, its lock and
        index entry). True if it was live."""
        return bool(
            self._run(self._end, keys.in_order(), [*self.settings, keys.member, self.event_names(keys)])
        )

    def take_over(self, keys: ConversationKeys, hold_ms: int) -> int | None:
        """An operator holds the conversation for ``hold_ms``: the bot is paused. None if it is
        not live, else how long (ms) it had waited for a person (-1: it had not asked)."""
        reply = self._run(self._handoff, keys.in_order(), [*self.settings, keys.member, "take", hold_ms])
        return int(reply[1]) if reply[0] == 1 else None

    def hand_back(self, keys: ConversationKeys, seen: str = "", state: str = "") -> int:
        """The bot resumes, with ``state`` (JSON) if the stored state is still ``seen``: 1 done,
        0 not live, -1 a message holds the conversation now, -2 its state changed meanwhile."""
        reply = self._run(self._handoff, keys.in_order(), [*self.settings, keys.member, "back", seen, state])
        return int(reply[0])

    def expire(self, due: list[ConversationKeys], cluster: bool = False) -> int:
        """Ends those of ``due`` whose time has run out (and that no message holds now), each
        with its event; returns how many. One pipeline, except on a Cluster, where redis-py
        cannot pipeline scripts: one call each there."""
        calls = [(keys.in_order(), [*self.settings, keys.member, self.event_names(keys)]) for keys in due]
        if cluster:
            return sum(self._expire(keys, args) for keys, args in calls)
        pipe = self.client.pipeline(transaction=False)
        for script_keys, args in calls:
            self._expire(script_keys, args, client=pipe)
        try:
            return sum(pipe.execute())
        except ResponseError as error:
            raise self._expire.source.explain(error) from error


def decode_state(raw: str) -> dict | None:
    """Stored state as a dict, or None when it is not a readable JSON object (a hand edit,
    however deep its nesting)."""
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) else None
