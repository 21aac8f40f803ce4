"""The conversation store: every Redis command the webhook sends, as two atomic Lua scripts.

A conversation is one hash (see ``keys``): ``sid``, ``state`` (JSON), ``seq`` (messages
saved), ``first_seen``/``last_seen`` (epoch ms) and one field ``m:<MessageSid>`` =
``"<seq> <reply>"`` for each of the last ``replies_kept`` messages, so a redelivery is found
with one HGET and no per-message key exists.

Why Lua: a message costs exactly two round trips. ``open`` takes the conversation's lock and
returns its session (or the stored reply of a redelivered ``MessageSid``) in one; ``save``
checks the lock is still ours, writes state, replay memory and index, and releases the lock in
the other. A crashed holder's lock lapses after ``lock_ttl`` by itself.
"""

from __future__ import annotations

import random
import secrets
import time
import logging
from dataclasses import dataclass
from typing import Callable

from redis import RedisError
from redis.exceptions import NoScriptError

from .keys import ConversationKeys
from .redis_client import UNAVAILABLE

log = logging.getLogger(__name__)

OPEN = """
-- KEYS: state hash, lock. ARGV: token, lock ms, message sid.
local answered = redis.call('HGET', KEYS[1], 'm:' .. ARGV[3])
if answered then
  return {'dup', redis.call('HGET', KEYS[1], 'sid') or '', '', (string.gsub(answered, '^%d+ ', '', 1))}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {'busy'}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'sid', 'state')
return {'ok', h[1] or '', h[2] or ''}
"""

SAVE = """
-- KEYS: state hash, lock, index shard.
-- ARGV: token, sid, state json, ttl s, now ms, message sid, reply, replies kept, member, fresh.
-- Replies are fields 'm:<MessageSid>' = '<seq> <reply>'; fields under 64 bytes keep the hash
-- in Redis's compact listpack encoding.
local field = 'm:' .. ARGV[6]
if redis.call('HEXISTS', KEYS[1], field) == 1 then return 'saved' end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'lost' end
if ARGV[10] == '1' then redis.call('DEL', KEYS[1]) end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local oldest = seq - tonumber(ARGV[8])
local ttl_ms = tonumber(ARGV[4]) * 1000
local now = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'sid', ARGV[2], 'state', ARGV[3], 'last_seen', ARGV[5],
           field, seq .. ' ' .. ARGV[7])
redis.call('HSETNX', KEYS[1], 'first_seen', ARGV[5])
if oldest > 0 then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local seen = tonumber(string.match(all[i + 1], '^%d+'))  -- nil for a hand-edited value
    if string.sub(all[i], 1, 2) == 'm:' and (seen == nil or seen <= oldest) then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('ZADD', KEYS[3], now + ttl_ms, ARGV[9])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 16)
if #expired > 0 then redis.call('ZREM', KEYS[3], unpack(expired)) end
if redis.call('PTTL', KEYS[3]) < ttl_ms then redis.call('PEXPIRE', KEYS[3], ttl_ms) end
redis.call('DEL', KEYS[2])
return 'saved'
"""

RELEASE = """
-- KEYS: lock. ARGV: token. Deletes the lock only if it is still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

END = """
-- KEYS: state hash, lock, index shard. ARGV: member.
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return existed
"""


class ConversationBusy(Exception):
    """Another request held the conversation for longer than the wait bound."""


class LockLost(Exception):
    """The lock lapsed (or the conversation was ended) before the state could be saved."""


class NotReplicated(RedisError):
    """Fewer replicas than ``REDIS_WAIT_REPLICAS`` confirmed a script's writes (answers 503).

    The write may still be on the master; a redelivery of the message is answered from it, or
    counted afresh if a failover lost it, never twice.
    """


@dataclass
class Opened:
    """What ``open`` found: a stored reply for a redelivery, else the lock and the session."""

    token: str
    sid: str | None = None
    state: str | None = None
    duplicate_reply: str | None = None


class ConversationStore:
    """Runs the scripts for one conversation at a time; holds no per-request state."""

    def __init__(self, client, ttl: int, lock_ttl: float, lock_wait: float, replies_kept: int,
                 wait_replicas: int = 0, wait_ms: int = 0,
                 on_lock_wait: Callable[[float], None] = lambda seconds: None):
        """``on_lock_wait`` hears how long each ``open`` waited for the lock (metrics)."""
        self.client = client
        self.on_lock_wait = on_lock_wait
        self.ttl = ttl
        self.lock_ms = int(lock_ttl * 1000)
        self.lock_wait = lock_wait
        self.replies_kept = replies_kept
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        self._open = client.register_script(OPEN)
        self._save = client.register_script(SAVE)
        self._release = client.register_script(RELEASE)
        self._end = client.register_script(END)

    def preload(self) -> None:
        """Loads the scripts so that even the first message costs two round trips.

        On a Cluster ``SCRIPT LOAD`` goes to every primary. Best effort: with Redis down at
        start, or on a primary promoted later, redis-py loads them on first use instead.
        """
        for script in (self._open, self._save, self._release, self._end):
            try:
                script.sha = self.client.script_load(script.script)
            except UNAVAILABLE as error:
                log.warning("could not preload Lua scripts (%s); they load on first use",
                            type(error).__name__)
                return

    def open(self, keys: ConversationKeys, message_sid: str) -> Opened:
        """Round trip 1. Waits (briefly polling) while another request holds the lock."""
        token = secrets.token_hex(8)
        started = time.monotonic()
        deadline = started + self.lock_wait
        pause = 0.002
        while True:
            result = self._run(self._open, [keys.state, keys.lock], [token, self.lock_ms, message_sid])
            status = result[0]
            if status == "dup":  # answered from memory: no lock taken
                return Opened(token, result[1] or None, None, result[3])
            if status == "ok":
                self.on_lock_wait(time.monotonic() - started)
                return Opened(token, result[1] or None, result[2] or None)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.on_lock_wait(time.monotonic() - started)
                raise ConversationBusy(keys.member)
            time.sleep(min(remaining, pause * (0.5 + random.random())))
            pause = min(pause * 2, 0.05)

    def save(self, keys: ConversationKeys, opened: Opened, sid: str, state: str, fresh: bool,
             message_sid: str, reply: str) -> None:
        """Round trip 2. Raises LockLost when the lock is no longer ours: nothing was written."""
        result = self._run(
            self._save, [keys.state, keys.lock, keys.index],
            [opened.token, sid, state, self.ttl, now_ms(), message_sid, reply,
             self.replies_kept, keys.member, "1" if fresh else "0"],
        )
        if result != "saved":
            raise LockLost(keys.member)

    def _run(self, script, keys: list[str], args: list):
        """Runs ``script``; with ``wait_replicas``, pipelined with ``WAIT`` in the same round trip.

        WAIT confirms that this connection's writes reached the replicas before we answer 200,
        so a failover cannot lose a counted message. Even a script that wrote nothing (a
        redelivery answered from memory) must be confirmed: on a master whose replica was just
        promoted WAIT returns 0, and that memory may be about to vanish. Idle connections are
        then dropped, so that the next one asks Sentinel where the master is.
        """
        if not self.wait_replicas:
            return script(keys=keys, args=args)
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(self.wait_replicas, self.wait_ms)
            try:
                result, acknowledged = pipe.execute()
                break
            except NoScriptError:
                if attempt == 2:
                    raise
                script.sha = self.client.script_load(script.script)
        if acknowledged < self.wait_replicas:
            self.client.connection_pool.disconnect(inuse_connections=False)
            raise NotReplicated(f"{acknowledged} of {self.wait_replicas} replicas confirmed")
        return result

    def release(self, keys: ConversationKeys, opened: Opened) -> None:
        """Gives the lock back without saving (the handler did not answer 200)."""
        self._release(keys=[keys.lock], args=[opened.token])

    def end(self, keys: ConversationKeys) -> bool:
        """Ends a conversation now: state, lock and index entry go. True if it was live."""
        return bool(self._end(keys=[keys.state, keys.lock, keys.index], args=[keys.member]))


def now_ms() -> int:
    return int(time.time() * 1000)
