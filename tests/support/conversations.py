"""Conversations written straight through the key schema, the way the scripts write them:
faster than messages, with a chosen expiry."""

from __future__ import annotations

import json
from typing import Any

import redis

from service.keys import ConversationKeys, Keys
from service.store import ConversationStore

GRACE_MS = ConversationStore.GRACE * 1000


def plant(
    client: Any,
    sender: str,
    recipient: str,
    expiry: int,
    *,
    keys: Keys | None = None,
    seq: int = 1,
    state: Any = None,
    sid: str = "s",
    first_seen: int | None = None,
    last_seen: int | None = None,
) -> ConversationKeys:
    """A live conversation ending at ``expiry`` (ms): its hash and its index entry, each kept a
    grace period past that end as SAVE keeps them (the index: past its latest entry's end).

    ``client``: a Redis client (one round trip) or a pipeline the caller executes. ``state``
    (stored as JSON) defaults to ``{"messages": seq}``; ``first_seen`` and ``last_seen`` to
    20 s and 10 s before ``expiry``."""
    keys_of = (keys or Keys()).conversation(sender, recipient)
    pipe = client if isinstance(client, redis.client.Pipeline) else client.pipeline(transaction=False)
    pipe.hset(
        keys_of.conversation,
        mapping={
            "sid": sid,
            "state": json.dumps({"messages": seq} if state is None else state),
            "seq": seq,
            "first_seen": expiry - 20000 if first_seen is None else first_seen,
            "last_seen": expiry - 10000 if last_seen is None else last_seen,
        },
    )
    pipe.pexpireat(keys_of.conversation, expiry + GRACE_MS)
    pipe.zadd(keys_of.index_shard, {keys_of.member: expiry})
    pipe.pexpireat(keys_of.index_shard, expiry + GRACE_MS, nx=True)  # a new index
    pipe.pexpireat(keys_of.index_shard, expiry + GRACE_MS, gt=True)  # or one this entry outlasts
    if pipe is not client:
        pipe.execute()
    return keys_of
