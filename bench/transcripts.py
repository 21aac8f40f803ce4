"""Transcripts' cost (``TRANSCRIPTS=1``): Redis memory per transcript entry, written through the
service's own OPEN and SAVE scripts with the payload ``ConversationStore.save`` sends.

The same messages are written twice, transcripts off then on, and the difference in
``INFO memory`` is divided by the entries written (one per message in, one per reply), so that
what the conversations cost either way cancels out. The webhook's throughput with transcripts
on against off is measured by ``bench/run.py`` (``transcripts_throughput``).
"""

from __future__ import annotations

import secrets
import time

import redis

from service import settings
from service.clock import now_ms
from service.handler import Message
from service.keys import Keys
from service.sessions import SESSION_ID_BYTES
from service.store import Commit, ConversationStore, Opened
from service.transcripts import Settings, payload
from tests.support.replies import count_reply, thanks

RECIPIENT = "+15550001111"
BODY = "Is the 7 pm table still free for two?"  # a typical text message


def memory(client: redis.Redis, conversations: int, messages: int) -> dict:
    """Bytes per transcript entry, and per conversation of ``messages`` messages."""
    off = _written(client, conversations, messages, transcripts=False)
    on = _written(client, conversations, messages, transcripts=True)
    entries = conversations * messages * 2
    return {
        "conversations": conversations,
        "messages": messages,
        "body_chars": len(BODY),
        "bytes_per_entry": (on - off) / entries,
        "bytes_per_conversation": (on - off) / conversations,
    }


def _written(client: redis.Redis, conversations: int, messages: int, transcripts: bool) -> int:
    client.flushall()
    defaults = settings.load({})
    kept = Settings(transcripts, defaults["TRANSCRIPT_RETENTION"] * 1000, defaults["TRANSCRIPT_MAX"])
    store = ConversationStore(
        client,
        ttl=defaults["CONVERSATION_TTL"],
        lock_ttl=5,
        lock_wait=5,
        redelivery_window=0.001,
        replies_kept=defaults["REPLIES_KEPT"],
    )
    store.preload()
    keys = Keys()
    baseline = client.info("memory")["used_memory"]
    pairs = [keys.conversation(f"+1557{n:07d}", RECIPIENT) for n in range(conversations)]
    sids = {pair.member: secrets.token_urlsafe(SESSION_ID_BYTES) for pair in pairs}
    for number in range(1, messages + 1):
        for start in range(0, conversations, 2000):
            pipe = client.pipeline(transaction=False)
            for pair in pairs[start : start + 2000]:
                token, message_sid = f"{number:016x}", f"SM{number:08x}{pair.sender[2:]}".ljust(34, "0")
                opened = Opened(token, now=now_ms())
                answer = "t" + (thanks("Friend") if number == 1 else count_reply("Friend", number, RECIPIENT))
                message = Message(pair.sender, RECIPIENT, BODY, message_sid)
                open_keys, open_args = store.open_call(pair, message_sid, token)
                pipe.evalsha(store._open.sha, len(open_keys), *open_keys, *open_args)
                commit = Commit(
                    sid=sids[pair.member],
                    state="{}",
                    is_new=number == 1,
                    message_sid=message_sid,
                    answer=answer,
                    transcript=payload(kept, message, answer, opened.now, sids[pair.member]),
                )
                save_keys, save_args = store.save_call(pair, opened, commit)
                pipe.evalsha(store._save.sha, len(save_keys), *save_keys, *save_args)
            outcomes = pipe.execute()
            if outcomes[1::2].count("saved") != len(outcomes) // 2:
                raise RuntimeError("SAVE did not save every conversation")
        time.sleep(0.002)  # past the 1 ms redelivery window: the answers kept stay one
    used = client.info("memory")["used_memory"] - baseline
    client.flushall()
    return used
