"""The conversation store: every Redis command a message costs, as two atomic Lua scripts.

A conversation is one hash (see ``keys``): ``sid``, ``state`` (JSON), ``seq`` (its messages),
``first_seen``/``last_seen`` (epoch ms, Redis' clock) and one field ``m:<MessageSid>`` =
``"<ms> <answer>"`` per message answered within the redelivery window, so a redelivery is
found with one HGET and no per-message key exists, and ``answers`` (the oldest one's ms and
their number) while more than one is kept. docs/design.md tells the whole story.

Why Lua: a message costs exactly two round trips. ``open`` answers a redelivery from memory,
or queues for the conversation's lock in arrival order and, once first in line, takes it and
returns the conversation; ``save`` checks the lock is still ours, writes the state (or ends
the conversation), the answer's memory and the index, and releases the lock, or hands it with
the conversation to the first in line, which then starts without asking again. A crashed
holder's lock lapses after ``lock_ttl``; a crashed waiter drops out of line once it stops
asking.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from redis import RedisError
from redis.exceptions import NoScriptError

from . import callers, handler, metrics, redis_client
from .keys import ConversationKeys, Keys
from .redis_client import UNAVAILABLE, Client, is_cluster

if TYPE_CHECKING:
    from .active import ActiveConversations

log = logging.getLogger(__name__)

# Lua helpers shared by the scripts below (prepended to each; each script defines only those it
# may use: a function defined is a closure made on every call, so a script's uncommon helpers
# are made only on a path that needs them: `on_demand`).
NOW = """
local function now_ms()
  local clock = redis.call('TIME')
  return clock[1] * 1000 + math.floor(clock[2] / 1000)
end
"""
COUNT = """
-- Per tag, one-minute tallies: field '<minute><code>' (minute: epoch ms // 60000; code m
-- messages, s started, e o x h ended as expired, operator, opt-out, handler, d the ended ones'
-- ms, n their messages) counted by HINCRBY, so that a message costs one command and no parsing
-- (a ring of 60 records of 9 numbers, read and rewritten whole, cost a fifth of a save's
-- instructions). `count` says whether it made the field, the first count of its minute: then
-- `renew` forgets the minutes older than an hour (an earlier version's records, field
-- 'minute % 60' = "<minute> <9 numbers>", once theirs are) and keeps the key an hour more.
local function count(minutes, minute, code, add)
  return add > 0 and redis.call('HINCRBY', minutes, minute .. code, add) == add
end
"""
HELPERS = """
-- Deletes the fields `names` of the hash `key`: one HDEL per thousand, not one per field.
local function delete(key, names)
  for i = 1, #names, 1000 do
    redis.call('HDEL', key, unpack(names, i, math.min(i + 999, #names)))
  end
end
-- The conversation's own fields go; the answers kept for redeliveries ('m:…') stay.
local function forget(conversation)
  local doomed = {}
  for _, name in ipairs(redis.call('HKEYS', conversation)) do
    if string.sub(name, 1, 2) ~= 'm:' then doomed[#doomed + 1] = name end
  end
  delete(conversation, doomed)
end
local function pair(member)
  local bar = string.find(member, '|', 1, true)
  return string.sub(member, 1, bar - 1), string.sub(member, bar + 1)
end
local function renew(minutes, minute)
  local fields, doomed = redis.call('HGETALL', minutes), {}
  for i = 1, #fields, 2 do
    local at = string.match(fields[i], '^(%d+)%a$') or string.match(fields[i + 1], '^(%d+) ')
    if (tonumber(at) or 0) <= minute - 60 then doomed[#doomed + 1] = fields[i] end
  end
  delete(minutes, doomed)
  redis.call('PEXPIRE', minutes, 3660000)
end
-- Ends the conversation stored in `k.conversation`, if there is one: its 'ended' event, its
-- tally and, for the end hook, its final state, in the same atomic step as its fields and
-- index entry going. `k`: the conversation's keys.
local REASONS = {expired = 'e', operator = 'o', ['opt-out'] = 'x', handler = 'h'}
local function finish(k, reason, ended_at, now)
  local found = redis.call('HMGET', k.conversation, 'sid', 'seq', 'first_seen', 'state')
  redis.call('ZREM', k.index, k.member)
  if not found[1] then
    forget(k.conversation)
    return 0
  end
  local sender, recipient = pair(k.member)
  local messages, started_at = found[2] or '0', found[3] or '0'
  redis.call('XADD', k.events, 'MAXLEN', '~', '@events_max@', '*', 'type', 'ended', 'from', sender,
             'to', recipient, 'reason', reason, 'messages', messages, 'started_at', started_at,
             'ended_at', ended_at, 'conversation', found[1])
  local minute, code = math.floor(now / 60000), REASONS[reason]
  local first = count(k.minutes, minute, code, 1)
  first = count(k.minutes, minute, 'd', math.max(ended_at - (tonumber(started_at) or ended_at), 0)) or first
  if count(k.minutes, minute, 'n', tonumber(messages) or 0) or first then renew(k.minutes, minute) end
  if '@hooks@' == '1' then  -- settings, compiled in (`configured`)
    redis.call('HSET', k.ending, found[1], cjson.encode({sender, recipient, reason, messages,
               started_at, tostring(ended_at), found[4] or '{}'}))
  end
  forget(k.conversation)
  return 1
end
"""

HEAD = """
-- The first in line whose heartbeat is still on (the others gave up: they leave it).
local function head_of(queue, waiters, token, now)
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  while head and head ~= token and (tonumber(redis.call('HGET', waiters, head)) or 0) <= now do
    redis.call('ZREM', queue, head)
    redis.call('HDEL', waiters, head)
    head = redis.call('ZRANGE', queue, 0, 0)[1]
  end
  return head
end
"""
HAND = """
-- Pushes `turn` to the wake-up list of the waiter `head` (its BLPOP on `wake .. head` returns it).
local function wake_up(wake, head, turn)
  redis.call('RPUSH', wake .. head, turn)
  redis.call('PEXPIRE', wake .. head, @patience_ms@ + @lock_ms@)
end
-- A release's hand-over: wakes the first in line (it gets '1': it asks again) when the lock's
-- holder was marked ('+': someone queued behind it).
local function hand_over(queue, waiters, wake, now)
  local head = head_of(queue, waiters, nil, now)
  if head then wake_up(wake, head, '1') end
end
"""
GIVE = """
-- A save's hand-over: the lock goes straight to the first in line with what its OPEN would
-- have returned, pushed to its wake-up list, so that it starts without asking again: the
-- conversation as this save left it, or the stored answer if its MessageSid (its token's
-- first part) was answered while it waited, a redelivery behind the original (then the next
-- in line gets the turn). No one in line: the lock is freed.
local function give(conversation, lock, queue, waiters, wake)
  local now = now_ms()
  local head = head_of(queue, waiters, nil, now)
  while head do
    local message_sid = string.match(head, '^(.*):%x+$')
    if not message_sid then  -- an earlier version's waiter (a rolling deploy): as a release
      redis.call('DEL', lock)
      return wake_up(wake, head, '1')
    end
    redis.call('ZREM', queue, head)
    redis.call('HDEL', waiters, head)
    local found = redis.call('HMGET', conversation, 'm:' .. message_sid, 'sid', 'state', 'seq', 'first_seen')
    local turn = {'dup', found[1] and (string.gsub(found[1], '^%d+ ', '', 1)), found[2] or ''}
    if not found[1] then
      local behind = redis.call('ZCARD', queue) > 0
      redis.call('SET', lock, behind and head .. '+' or head, 'PX', '@lock_ms@')
      turn = {'ok', now, found[2] or '', found[3] or '', found[4] or '', found[5] or '', 0}
    end
    wake_up(wake, head, cjson.encode(turn))
    if not found[1] then return end
    head = head_of(queue, waiters, nil, now)
  end
  redis.call('DEL', lock)
end
"""


def on_demand(source: str, *names: str) -> str:
    """Lua: the helpers ``names`` of ``source`` made the first time a script's path asks for one
    (``helpers().finish(…)``), not on every call: made on every call, a closure each and
    ``REASONS``'s table were 4–10 % of a script's instructions on the usual paths."""
    made = ", ".join(f"{name} = {name}" for name in names)
    return (
        "local made\nlocal function helpers()\n  if not made then\n"
        + source
        + f"  made = {{{made}}}\n  end\n  return made\nend\n"
    )


PRUNE = """
-- Forgets the answers older than `horizon`, and the oldest beyond `keep` (and, with `reset`,
-- the conversation's own fields: what `forget` does, in the same read); returns the oldest
-- kept answer's time (its text, or false) and how many are kept.
local function prune(conversation, horizon, keep, reset)
  local fields = redis.call('HGETALL', conversation)
  local answers, doomed = {}, {}
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'm:' then
      local stamp = string.match(fields[i + 1], '^(%d+) ')
      local at = tonumber(stamp)
      if at == nil or at <= horizon then
        doomed[#doomed + 1] = fields[i]
      else
        answers[#answers + 1] = {at, fields[i], stamp}
      end
    elseif reset then
      doomed[#doomed + 1] = fields[i]
    end
  end
  table.sort(answers, function(a, b) return a[1] > b[1] end)
  for i = keep + 1, #answers do doomed[#doomed + 1] = answers[i][2] end
  delete(conversation, doomed)
  local kept = math.min(#answers, keep)
  return kept > 0 and answers[kept][3], kept
end
"""

OPEN = (
    NOW
    + HEAD
    + on_demand(COUNT + HELPERS, "finish")
    + """
-- Round trip 1. A redelivered MessageSid gets its stored answer. Otherwise the message queues
-- for the lock in arrival order (a ticket lock: a waiter that stopped asking drops out) and,
-- first in line with the lock free, takes it and gets the conversation, which is ended first
-- if its time ran out (its index score: last message + TTL).
local conversation, lock, queue, waiters, index, events, ending, minutes =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local token, message_sid, member = ARGV[1], ARGV[2], ARGV[3]
local lock_ms, patience_ms, ttl_ms = '@lock_ms@', @patience_ms@, @ttl_ms@  -- settings, compiled in

-- One read for the redelivery check and the conversation (a waiter's poll reads it for nothing,
-- but polls are rare: an uncontended message saves a call).
local found = redis.call('HMGET', conversation, 'm:' .. message_sid, 'sid', 'state', 'seq', 'first_seen',
                         'last_seen')
if found[1] then  -- answered while this delivery waited, maybe: it leaves the line at once
  if redis.call('ZREM', queue, token) == 1 then  -- a waiter's heartbeat goes with its ticket
    redis.call('HDEL', waiters, token)
  end
  return {'dup', (string.gsub(found[1], '^%d+ ', '', 1)), found[2] or ''}
end
local now = now_ms()

local head = head_of(queue, waiters, token, now)
-- The lock holds its holder's token, marked '+' while someone waits behind it: its save then
-- hands the turn over (hand_over) instead of leaving the next in line to poll.
local mine = head == token and redis.call('ZCARD', queue) > 1 and token .. '+' or token
if (not head or head == token) and redis.call('SET', lock, mine, 'NX', 'PX', lock_ms) then
  if head then
    redis.call('ZREM', queue, token)
    redis.call('HDEL', waiters, token)
  end
  if found[2] then  -- only a stored conversation can have run out of time
    local expiry = tonumber(redis.call('ZSCORE', index, member)) or (tonumber(found[6]) or now) + ttl_ms
    if expiry <= now then
      local k = {conversation = conversation, index = index, member = member, events = events,
                 ending = ending, minutes = minutes}
      local ended = helpers().finish(k, 'expired', expiry, now)
      return {'ok', now, '', '', '', '', ended}
    end
  end
  return {'ok', now, found[2] or '', found[3] or '', found[4] or '', found[5] or '', 0}
end

local holder = redis.call('GET', lock)
if holder == token or holder == token .. '+' then  -- handed over by a save while its BLPOP had given up
  return {'ok', now, found[2] or '', found[3] or '', found[4] or '', found[5] or '', 0}
end
if not redis.call('ZSCORE', queue, token) then
  local last = redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')
  redis.call('ZADD', queue, (tonumber(last[2]) or 0) + 1, token)
end
redis.call('HSET', waiters, token, now + patience_ms)
if holder and string.sub(holder, -1) ~= '+' then redis.call('SET', lock, holder .. '+', 'KEEPTTL') end
redis.call('PEXPIRE', queue, patience_ms + lock_ms)
redis.call('PEXPIRE', waiters, patience_ms + lock_ms)
return {'busy', redis.call('ZRANK', queue, token)}
"""
)

SAVE = (
    COUNT
    + on_demand(HELPERS + NOW + HEAD + HAND + GIVE + PRUNE, "renew", "pair", "prune", "finish", "give")
    + """
-- Round trip 2, only while the lock is still ours: write the conversation (its 'started' event
-- on its first message), or end it; remember the answer under its MessageSid; count the
-- message in its minute; release the lock. Returns 'ended' if it ended a conversation, else
-- 'saved' ('lost': nothing written). Nothing here can fail half-way: every value is checked or
-- bounded before the first write.
local conversation, lock, index, events, ending, minutes, queue, waiters, wake =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local token, message_sid, member, sid, state, answer = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local fresh, end_reason, opened_at = ARGV[7] == '1', ARGV[8], ARGV[9]
local ttl_ms, window_ms, kept, keep_px, window_px =  -- settings, compiled in (`configured`)
  @ttl_ms@, @window_ms@, @kept@, '@keep_ms@', '@window_ms@'

-- The lock first: while it is ours this message cannot have been saved (a save releases it), so
-- only a lock not ours needs the answer looked up (an earlier try of this call whose reply was
-- lost saved it already).
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then
  return redis.call('HEXISTS', conversation, 'm:' .. message_sid) == 1 and 'saved' or 'lost'
end
-- The message's time is OPEN's (Redis' clock when this message took the lock, handed back):
-- no TIME here, and its text is written as it came, never formatted from a number. Messages
-- still get increasing times: the next one's OPEN takes the lock after this save released it.
local now = tonumber(opened_at)

local keeps = not (fresh and end_reason == 'opt-out')  -- an opt-out with no conversation starts none
local minute = math.floor(now / 60000)
local first_of_minute = count(minutes, minute, 'm', 1)
if fresh and keeps and count(minutes, minute, 's', 1) then first_of_minute = true end
if first_of_minute then helpers().renew(minutes, minute) end
local found = fresh and {} or redis.call('HMGET', conversation, 'seq', 'answers', 'last_seen')
-- The answers kept for redeliveries: 'answers' = "<oldest one's ms> <how many>", so that they
-- are scanned only when one can be forgotten (out of the window, or over the cap). With one
-- answer kept 'answers' is left out (26 bytes, a size class of the hash): that one is the last
-- message's, at last_seen.
local oldest, held = string.match(found[2] or '', '^(%d+) (%d+)$')
if not found[2] and found[3] then oldest, held = found[3], '1' end
held = tonumber(held)
-- A conversation's first message reads its hash once: the answers to keep, the rest (what an
-- ended or unreadable conversation left) to go.
local reset = fresh and keeps
if reset or not (oldest and held and tonumber(oldest) > now - window_ms and held < kept) then
  oldest, held = helpers().prune(conversation, now - window_ms, kept - 1, reset)
end
held = held + 1
local answered = {'m:' .. message_sid, opened_at .. ' ' .. answer}
if held > 1 then
  answered[3], answered[4] = 'answers', oldest .. ' ' .. held
end
local added = 0
if keeps then
  if fresh then
    local sender, recipient = helpers().pair(member)
    redis.call('XADD', events, 'MAXLEN', '~', '@events_max@', '*', 'type', 'started', 'from', sender,
               'to', recipient, 'messages', '1', 'started_at', opened_at, 'conversation', sid)
    answered[#answered + 1], answered[#answered + 2] = 'first_seen', opened_at  -- in the one HSET
  end
  redis.call('HSET', conversation, 'sid', sid, 'state', state, 'seq', (tonumber(found[1]) or 0) + 1,
             'last_seen', opened_at, unpack(answered))
  if held == 1 and found[2] then redis.call('HDEL', conversation, 'answers') end
  added = redis.call('ZADD', index, now + ttl_ms, member)
else
  redis.call('HSET', conversation, answered[1], answered[2])
end
-- The index outlives its entries by GRACE (a day): its expiry moves with a new entry and with the
-- first save of each minute in its tag, so at most a minute behind its latest entry's end, not
-- on every save.
if added == 1 or first_of_minute then
  redis.call('PEXPIRE', index, keep_px)
end
local ended = 0
if end_reason ~= '' then
  local k = {conversation = conversation, index = index, member = member, events = events,
             ending = ending, minutes = minutes}
  ended = helpers().finish(k, end_reason, now, now)
end
redis.call('PEXPIRE', conversation, end_reason ~= '' and window_px or keep_px)
if holder == token then
  redis.call('DEL', lock)
else  -- marked: someone waits
  helpers().give(conversation, lock, queue, waiters, wake)
end
return ended == 1 and 'ended' or 'saved'
"""
)

RELEASE = (
    NOW
    + HEAD
    + HAND
    + """
-- A message that will not save: leaves the line, and gives the lock back if it holds it (the
-- turn to the next in line, if one waits).
local lock, queue, waiters, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token = ARGV[1]
redis.call('ZREM', queue, token)
redis.call('HDEL', waiters, token)
local holder = redis.call('GET', lock)
if holder == token or holder == token .. '+' then
  redis.call('DEL', lock)
  if holder ~= token then hand_over(queue, waiters, wake, now_ms()) end
end
"""
)

END = (
    NOW
    + COUNT
    + HELPERS
    + """
-- An operator ends the conversation now ('operator'); one whose time already ran out ends as
-- 'expired' at that time instead. The lock goes too, so that a message being handled answers
-- 503 instead of bringing the conversation back. Returns 1 if it was live.
local conversation, lock, index = KEYS[1], KEYS[2], KEYS[3]
local events, ending, minutes = KEYS[4], KEYS[5], KEYS[6]
local member = ARGV[1]
local k = {conversation = conversation, index = index, member = member, events = events,
           ending = ending, minutes = minutes}
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', index, member)) or now + 1
redis.call('DEL', lock)
if expiry <= now then
  finish(k, 'expired', expiry, now)
  return 0
end
return finish(k, 'operator', now, now)
"""
)

EXPIRE = (
    NOW
    + COUNT
    + HELPERS
    + """
-- The sweeper ends a conversation whose time ran out ('expired', at that time), unless a
-- message extended it meanwhile or is being handled now (it will extend or end it itself).
local conversation, lock, index = KEYS[1], KEYS[2], KEYS[3]
local events, ending, minutes = KEYS[4], KEYS[5], KEYS[6]
local member = ARGV[1]
local k = {conversation = conversation, index = index, member = member, events = events,
           ending = ending, minutes = minutes}
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', index, member))
if not expiry or expiry > now or redis.call('EXISTS', lock) == 1 then return 0 end
return finish(k, 'expired', expiry, now)
"""
)


class ConversationBusy(Exception):
    """The message waited its turn for longer than ``LOCK_WAIT``."""


class LockLost(Exception):
    """The lock lapsed (or the conversation was ended) before the state could be saved."""


class NotReplicated(RedisError):
    """Fewer replicas than ``REDIS_WAIT_REPLICAS`` confirmed a script's writes (answers 503).

    The write may still be on the master; a redelivery of the message is answered from it, or
    counted afresh if a failover lost it, never twice.
    """


@dataclass
class Opened:
    """What ``open`` found: a redelivery's stored answer, or the lock and the stored fields
    (as Redis holds them: the caller decodes, and treats what it cannot read as new)."""

    token: str
    now: int = 0  # Redis' clock when the lock was taken: the message's time, handed back to SAVE
    answered: str | None = None
    sid: str = ""
    state: str = ""
    seq: str = ""
    first_seen: str = ""
    ended_overdue: bool = False  # it found the conversation's time run out and ended it


class ConversationStore:
    """Runs the scripts for one conversation at a time; holds no per-request state."""

    # A waiter asks again at least this often; one that stops for ``PATIENCE`` leaves the line.
    POLL_FIRST, POLL_MAX, PATIENCE = 0.002, 0.05, 1.0
    # Physically, a conversation outlives its end by this much, so that whoever ends it
    # (a message or a sweep) still finds its state.
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
        on_lock_wait: Callable[[float], None] = lambda seconds: None,
    ):
        """``hooks``: keep each ended conversation's final state for the end hook.
        ``on_lock_wait`` hears how long each ``open`` waited for the lock (metrics)."""
        self.client = client
        self.on_lock_wait = on_lock_wait
        self.lock_wait = lock_wait
        self.blocking = read_timeout > self.POLL_MAX + 0.15
        self.events_max = events_max  # the sweeper's relay trims as the scripts do
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        settings: dict[str, int | str] = {
            "hooks": "1" if hooks else "0",
            "lock_ms": int(lock_ttl * 1000),
            "patience_ms": int(self.PATIENCE * 1000),
            "ttl_ms": ttl * 1000,
            "keep_ms": (ttl + self.GRACE) * 1000,
            "window_ms": int(redelivery_window * 1000),
            "kept": replies_kept,
            "events_max": events_max,
        }
        self._open = client.register_script(configured(OPEN, settings))
        self._save = client.register_script(configured(SAVE, settings))
        self._release = client.register_script(configured(RELEASE, settings))
        self._end = client.register_script(configured(END, settings))
        self._expire = client.register_script(configured(EXPIRE, settings))

    @classmethod
    def from_config(
        cls,
        client: Client,
        config: Mapping[str, Any],
        *,
        hooks: bool = False,
        on_lock_wait: Callable[[float], None] = lambda seconds: None,
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
        )

    def preload(self) -> None:
        """Loads the scripts so that even the first message costs two round trips.

        On a Cluster ``SCRIPT LOAD`` goes to every primary. Best effort: with Redis down at
        start, or on a primary promoted later, redis-py loads them on first use instead.
        """
        for script in (self._open, self._save, self._release, self._end, self._expire):
            try:
                script.sha = self.client.script_load(script.script)
            except UNAVAILABLE as error:
                log.warning(
                    "could not preload Lua scripts (%s); they load on first use", type(error).__name__
                )
                return

    def open(self, keys: ConversationKeys, message_sid: str) -> Opened:
        """Round trip 1 (more only while the message waits its turn, asking again the sooner
        the nearer it is to the front)."""
        # Tells this message's turn from others' (unguessable is not needed: no request names
        # it), and names the message, so that a save handing the lock over can tell whether it
        # was answered meanwhile. Not os.urandom: its system call lets go of the GIL, a thread
        # switch per message. random reseeds in each forked worker.
        token = f"{message_sid}:{random.getrandbits(64):016x}"
        started = time.monotonic()
        deadline = started + self.lock_wait
        script_keys, args = self.open_call(keys, message_sid, token)
        result = self._run(self._open, script_keys, args)
        while True:
            if result[0] == "dup":  # answered from memory: no lock taken
                return Opened(token, answered=result[1], sid=result[2])
            if result[0] == "ok":
                self.on_lock_wait(time.monotonic() - started)
                _, now, sid, state, seq, first_seen, ended = result
                return Opened(token, int(now), None, sid, state, seq, first_seen, ended == 1)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.on_lock_wait(time.monotonic() - started)
                self.release(keys, token)
                raise ConversationBusy(keys.member)
            ahead = int(result[1])
            turn = self._wait_turn(
                keys.wake + token, min(remaining, self.POLL_FIRST * (ahead + 1), self.POLL_MAX)
            )
            result = turn or self._run(self._open, script_keys, args)

    def _wait_turn(self, wake: str, seconds: float) -> list | None:
        """Until the lock's holder hands the turn over or ``seconds`` pass. A save hands over
        the lock itself with what OPEN would have returned (returned here: no need to ask
        again); a release only wakes it to ask again (None, as after ``seconds``). Sleeps
        instead where Redis could answer a BLPOP later than the read timeout (its timer ticks
        every 100 ms)."""
        if self.blocking and seconds >= 0.001:  # BLPOP's 0 would mean forever
            popped = self.client.blpop([wake], timeout=seconds)
            if popped and popped[1] != "1":
                return json.loads(popped[1])
        else:
            time.sleep(seconds)
        return None

    def save(
        self,
        keys: ConversationKeys,
        opened: Opened,
        *,
        sid: str,
        state: str,
        fresh: bool,
        message_sid: str,
        answer: str,
        end_reason: str | None = None,
    ) -> bool:
        """Round trip 2; True if it ended a conversation. Raises LockLost when the lock is no
        longer ours: nothing was written."""
        result = self._run(
            self._save,
            *self.save_call(
                keys,
                opened,
                sid=sid,
                state=state,
                fresh=fresh,
                message_sid=message_sid,
                answer=answer,
                end_reason=end_reason,
            ),
        )
        if result == "lost":
            raise LockLost(keys.member)
        return result == "ended"

    def open_call(self, keys: ConversationKeys, message_sid: str, token: str) -> tuple[list, list]:
        """OPEN's keys and arguments (also for pipelines that fill Redis: the bench)."""
        return (
            [
                keys.state,
                keys.lock,
                keys.queue,
                keys.waiters,
                keys.active,
                keys.events,
                keys.ending,
                keys.minutes,
            ],
            [token, message_sid, keys.member],
        )

    def save_call(
        self,
        keys: ConversationKeys,
        opened: Opened,
        *,
        sid: str,
        state: str,
        fresh: bool,
        message_sid: str,
        answer: str,
        end_reason: str | None = None,
    ) -> tuple[list, list]:
        """SAVE's keys and arguments."""
        return (
            [
                keys.state,
                keys.lock,
                keys.active,
                keys.events,
                keys.ending,
                keys.minutes,
                keys.queue,
                keys.waiters,
                keys.wake,
            ],
            [
                opened.token,
                message_sid,
                keys.member,
                sid,
                state,
                answer,
                "1" if fresh else "0",
                end_reason or "",
                opened.now,
            ],
        )

    def _run(self, script, keys: list[str], args: list):
        """Runs ``script``; with ``wait_replicas``, pipelined with ``WAIT`` in the same round trip.

        WAIT confirms that this connection's writes reached the replicas before we answer 200,
        so a failover cannot lose a counted message. Even a script that wrote nothing (a
        redelivery answered from memory) must be confirmed: on a master whose replica was just
        promoted WAIT returns 0, and that memory may be about to vanish. Idle connections are
        then dropped, so that the next one asks Sentinel where the master is.
        """
        for attempt in (1, 2):  # redis-py's Script.__call__, less its per-call import
            try:
                if not self.wait_replicas:
                    return self.client.evalsha(script.sha, len(keys), *keys, *args)
                pipe = self.client.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.wait(self.wait_replicas, self.wait_ms)
                result, acknowledged = pipe.execute()
                break
            except NoScriptError:  # a server that lost the scripts (restart, failover)
                if attempt == 2:
                    raise
                script.sha = self.client.script_load(script.script)
        if acknowledged < self.wait_replicas:
            self.client.connection_pool.disconnect(inuse_connections=False)
            raise NotReplicated(f"{acknowledged} of {self.wait_replicas} replicas confirmed")
        return result

    def release(self, keys: ConversationKeys, token: str) -> None:
        """Gives the lock back without saving, or leaves the line."""
        self._release(keys=[keys.lock, keys.queue, keys.waiters, keys.wake], args=[token])

    def end(self, keys: ConversationKeys) -> bool:
        """An operator ends a conversation now (its event, its state for the hook, its lock and
        index entry). True if it was live."""
        return bool(self._run(self._end, self._ending_keys(keys), [keys.member]))

    def expire(self, due: list[ConversationKeys], cluster: bool = False) -> int:
        """Ends those of ``due`` whose time has run out (and that no message holds now), each
        with its event; returns how many. One pipeline, except on a Cluster, where redis-py
        cannot pipeline scripts: one call each there."""
        calls = [(self._ending_keys(keys), [keys.member]) for keys in due]
        if cluster:
            return sum(self._expire(keys=k, args=a) for k, a in calls)
        pipe = self.client.pipeline(transaction=False)
        for script_keys, args in calls:
            self._expire(keys=script_keys, args=args, client=pipe)
        return sum(pipe.execute())

    @staticmethod
    def _ending_keys(keys: ConversationKeys) -> list[str]:
        return [keys.state, keys.lock, keys.active, keys.events, keys.ending, keys.minutes]


def configured(script: str, settings: dict[str, int | str]) -> str:
    """``script`` with each ``@name@`` replaced by the store's setting: constants compiled into
    the script rather than arguments sent with every call (Redis spends about a thousand
    instructions on each argument, and a few thousand more to parse or format a number). A
    store's scripts therefore have their own SHAs; stores with the same settings share them."""
    for name, value in settings.items():
        script = script.replace(f"@{name}@", str(value))
    if "@" in script:
        raise ValueError(f"a script's setting was not given: {script[script.index('@') :][:40]!r}")
    return script


def decode_state(raw: str) -> dict | None:
    """Stored state as a dict, or None when it is not a readable JSON object (a hand edit,
    however deep its nesting)."""
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) else None


def now_ms() -> int:
    return int(time.time() * 1000)


def init_app(app: Flask) -> None:
    """The conversations' key names, store, operators' view and Flask session interface."""
    from .active import ActiveConversations
    from .sessions import ConversationSessionInterface

    config = app.config
    client = redis_client.client(app)
    keys = Keys(config["REDIS_KEY_PREFIX"], cluster=is_cluster(config["REDIS_URL"]))
    store = ConversationStore.from_config(
        client,
        config,
        hooks=handler.end_hook(app) is not None,
        on_lock_wait=metrics.current(app).lock_wait.observe,
    )
    store.preload()
    app.extensions["sms.keys"] = keys
    app.extensions["sms.store"] = store
    ended = metrics.current(app).conversations_ended.labels("operator")
    app.extensions["sms.active"] = ActiveConversations(client, keys, store, callers.directory(app), ended.inc)
    app.session_interface = ConversationSessionInterface(store, keys, config["CONVERSATION_TTL"])


def keys(app: Flask | None = None) -> Keys:
    return (app or current_app).extensions["sms.keys"]


def store(app: Flask | None = None) -> ConversationStore:
    return (app or current_app).extensions["sms.store"]


def active(app: Flask | None = None) -> ActiveConversations:
    """The operators' view of live conversations (CLI, API, metrics)."""
    return (app or current_app).extensions["sms.active"]
