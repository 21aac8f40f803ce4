"""Every Redis key name the service uses, and nothing else: the key schema, written here only
(docs/design.md links here; tests/test_keys.py checks that a realistic run writes exactly
these keys).

A conversation is the pair (From, To). Its keys, and the index shard that lists it, carry the
same hash tag: the last two ASCII digits of the sender's number (``{07}`` for +15551230007).
One Lua script can therefore touch all of them, on a single Redis as on a Cluster, and an
operator in redis-cli can work the tag out by eye. There are 100 tags, so the index of live
conversations is 100 sorted sets that count and list merge. ``<prefix>`` is
``REDIS_KEY_PREFIX`` (``sms:``).

Key (example)                                        Type and what it holds
---------------------------------------------------  ------------------------------------------
<prefix>conv:{07}:+15551230007|+15550001111          hash: the conversation (below)
<prefix>lock:{07}:+15551230007|+15550001111          string, PX LOCK_TTL: the token of the message
                                                     being handled, '+' after it while others wait
<prefix>queue:{07}:+15551230007|+15550001111         zset: waiting messages' tokens by ticket
<prefix>waiters:{07}:+15551230007|+15550001111       hash: waiting token -> ms until which it waits
<prefix>wake:{07}:+15551230007|+15550001111:<token>  list, PX: a waiting message's turn, popped at
                                                     once: a save's, OPEN's reply as JSON; a
                                                     release's, '1' (ask again)
<prefix>inbound:{07}:+15551230007|+15550001111       list: messages acknowledged but not yet
                                                     handled, oldest first, each '<MessageSid>
                                                     <its fields as JSON>': the first is the one
                                                     whose handler runs (docs/design.md)
<prefix>transcript:{07}:+15551230007|+15550001111    list, with TRANSCRIPTS=1: the pair's messages
                                                     in and out, in commit order (below)
<prefix>waiting:{07}                                 zset: member '<from>|<to>', score when its
                                                     handler asked for a person (ms), until one
                                                     takes over or it ends
<prefix>forgetting:{07}:+15551230007                 string, PX: set while `forget` removes the
                                                     sender's data: SAVE refuses its messages
<prefix>active:{07}                                  zset: the index shard, member '<from>|<to>',
                                                     score its end (last message + TTL, ms)
<prefix>out:{07}:+15551230007|+15550001111           list: the conversation's outbound message ids
                                                     not yet handed to Twilio, in commit order
<prefix>sent:{07}:+15551230007|+15550001111          hash: '<id>' -> an outbound message as queued,
                                                     '<id>:s' -> its state (JSON; both in
                                                     service/store/outbound.lua): the queued ones
                                                     and the latest 100 sent, kept at least
                                                     as long as the conversation's hash
<prefix>due:{07}                                     zset: member '<from>|<to>' -> when its
                                                     first queued outbound message is due (ms;
                                                     while a sender holds it, its lease's end)
<prefix>failed:{07}                                  zset: '<id>|<from>|<to>' -> when that outbound
                                                     message failed (ms): the tag's latest 100
                                                     failures of the last day (service/
                                                     outbound_view.py: sms-sessions outbox)
<prefix>contacts:{07}                                hash: '<number>' -> ms it opted out (STOP);
                                                     'w:<from>|<to>' -> its last inbound message
                                                     (ms), WhatsApp senders only, pruned once
                                                     24 h old; 'w:' -> the pruning's cursor
<prefix>pending:{07}                                 zset: conversations with inbound messages,
                                                     member '<from>|<to>', score the ms by which
                                                     their lock must be renewed (past it, the
                                                     sweeper claims them)
<prefix>minutes:{07}                                 hash: '<minute><code>' -> that minute's tally
                                                     (service/store/tally.lua)
<prefix>timers:{07}                                  zset: the due index, member '<from>|<to>',
                                                     score its earliest pending timer's due (ms)
<prefix>ending:{07}                                  hash: conversation id -> the end hook's
                                                     payload (service/store/ending.lua), until
                                                     the hook ran; expires a day after its
                                                     latest entry's conversation's end
<prefix>hook:{07}:<id>                               string, PX END_HOOK_TIMEOUT + 10 s: the
                                                     claim of the process running the end hook
                                                     of conversation <id> (service/hooks.py)
<prefix>hooks                                        string, PX a day: the end hook's name, set
                                                     by every process that runs it: ended
                                                     conversations are kept for it meanwhile
<prefix>events                                       stream: lifecycle events (started, ended)
<prefix>outbox:{07}                                  stream: a Cluster's events on their way to
                                                     <prefix>events
<prefix>samples                                      stream: per minute, live conversations and
                                                     messages
<prefix>sweeper                                      string: the sweeping process's lease
<prefix>ready                                        string: /readyz's write probe, deleted at once

A token is ``<MessageSid>;<16 hex digits>``. The conversation's hash holds ``sid`` (its id),
``state`` (JSON), ``seq`` (its messages), ``first_seen`` and ``last_seen`` (epoch ms, Redis'
clock), ``m:<MessageSid>`` = ``<ms> <answer>`` per message answered within
``REDELIVERY_WINDOW`` (the answer as service/responses.py stores it), and ``answers`` =
``<oldest one's ms> <how many>`` while more than one is kept (with one, it is the last
message's, at ``last_seen``); while it has pending timers, ``timers`` (JSON: name ->
``{"id", "due" (epoch ms, Redis' clock), "data", "reply" (cancelled by a reply)}``,
service/timers.py), and with a time to live of its own, ``ttl`` (ms). It expires a day after
the conversation's end while live; once ended only its ``m:`` fields stay, expiring within
``REDELIVERY_WINDOW``.

A transcript entry is a JSON object: ``at`` (the message's ms), ``conv`` (the conversation's
id), ``dir`` (``in``: a message from the sender; ``out``: a reply to it or an outbound
message; ``status``: an outbound message's new status; ``timer``: a timer fired, its name in
``timer``), ``body``, ``media`` (URLs, when any),
``sid`` (an inbound MessageSid; ``outcome``, ``timeout`` or ``error``, when its handler
saved nothing), for an outbound message ``id`` (its outbox id) and ``status``, and for an
operator's one ``by`` (``operator``). Its expiry follows the
conversation's end plus ``TRANSCRIPT_RETENTION``; ``LTRIM`` caps it at ``TRANSCRIPT_MAX``.

On a Cluster a script may only touch keys of one slot, so the scripts write their events to
their tag's outbox and the sweeper relays them to the one stream; elsewhere they write to the
stream directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

SHARDS = 100
# Conversations whose keys a process keeps built: a conversation's messages come in runs, and
# each message's scripts need all its keys (about 2 kB a conversation).
RECENT_CONVERSATIONS = 1024
SEPARATOR = "|"
NOT_ASCII_DIGITS = re.compile(r"[^0-9]+")  # [0-9], not \d: \d matches ٤, ² and the like


def shard_of(sender: str) -> str:
    """The two-digit hash tag of a sender: the last two ASCII digits of its number.

    Only ASCII digits: ``str.isdigit`` also accepts ``٤``, ``²``…, whose tags would fall
    outside ``{00}``…``{99}``, where count, list and the gauge never look. Such a sender is
    still served (its tag comes from its ASCII digits, ``00`` if it has none) rather than
    refused: the tag only spreads conversations over shards, any fixed choice is correct, and
    this one rule serves the webhook, the operators' paths and the cursors alike.
    """
    tail = sender[-2:]
    if len(tail) == 2 and tail.isascii() and tail.isdigit():  # most numbers: what the pattern keeps
        return tail
    return NOT_ASCII_DIGITS.sub("", sender)[-2:].rjust(2, "0")


@dataclass(frozen=True)
class Keys:
    """Builds key names under one prefix (``REDIS_KEY_PREFIX``)."""

    prefix: str = "sms:"
    cluster: bool = False
    # Per shard, the keys a conversation's scripts touch (index, events, ending, minutes, due,
    # contacts, timers, pending): every message needs them, so they are built once.
    _shard_keys: dict[str, tuple[str, str, str, str, str, str, str, str]] = field(
        init=False, repr=False, compare=False
    )
    _recent: Callable[[str, str], ConversationKeys] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_shard = {
            shard: (
                self.index(shard),
                self.outbox(shard) if self.cluster else self.events,
                self.ending(shard),
                self.minutes(shard),
                self.due(shard),
                self.contacts(shard),
                self.timers(shard),
                self.pending(shard),
            )
            for shard in self.shards()
        }
        object.__setattr__(self, "_shard_keys", by_shard)  # frozen: set once, here
        object.__setattr__(self, "_recent", lru_cache(RECENT_CONVERSATIONS)(self._build))

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def samples(self) -> str:
        return f"{self.prefix}samples"

    @property
    def sweeper(self) -> str:
        return f"{self.prefix}sweeper"

    @property
    def hooks(self) -> str:
        return f"{self.prefix}hooks"

    def hook_claim(self, shard: str, conversation_id: str) -> str:
        return f"{self.prefix}hook:{{{shard}}}:{conversation_id}"

    def outbox(self, shard: str) -> str:
        return f"{self.prefix}outbox:{{{shard}}}"

    def ending(self, shard: str) -> str:
        return f"{self.prefix}ending:{{{shard}}}"

    def minutes(self, shard: str) -> str:
        return f"{self.prefix}minutes:{{{shard}}}"

    def pending(self, shard: str) -> str:
        return f"{self.prefix}pending:{{{shard}}}"

    def due(self, shard: str) -> str:
        return f"{self.prefix}due:{{{shard}}}"

    def failed(self, shard: str) -> str:
        return f"{self.prefix}failed:{{{shard}}}"

    def contacts(self, shard: str) -> str:
        return f"{self.prefix}contacts:{{{shard}}}"

    def dues(self) -> list[str]:
        return [self.due(shard) for shard in self.shards()]

    def timers(self, shard: str) -> str:
        return f"{self.prefix}timers:{{{shard}}}"

    def failures(self) -> list[str]:
        return [self.failed(shard) for shard in self.shards()]

    def shards(self) -> list[str]:
        return [f"{n:02d}" for n in range(SHARDS)]

    def conversation(self, sender: str, recipient: str) -> ConversationKeys:
        return self._recent(sender, recipient)

    def _build(self, sender: str, recipient: str) -> ConversationKeys:
        shard = shard_of(sender)
        member = sender + SEPARATOR + recipient
        tagged = "{" + shard + "}:" + member
        prefix = self.prefix
        index, events, ending, minutes, due, contacts, timers, pending = self._shard_keys[shard]
        return ConversationKeys(
            sender,
            recipient,
            member,
            prefix + "conv:" + tagged,
            prefix + "lock:" + tagged,
            prefix + "queue:" + tagged,
            prefix + "waiters:" + tagged,
            prefix + "wake:" + tagged + ":",
            index,
            events,
            ending,
            minutes,
            prefix + "out:" + tagged,
            prefix + "sent:" + tagged,
            due,
            contacts,
            timers,
            pending,
            prefix + "inbound:" + tagged,
            prefix + "waiting:{" + shard + "}",
            prefix + "forgetting:{" + shard + "}:" + sender,
            prefix + "transcript:" + tagged,
        )

    @property
    def readiness(self) -> str:
        return f"{self.prefix}ready"

    def waiting(self, shard: str) -> str:
        return f"{self.prefix}waiting:{{{shard}}}"

    def forgetting(self, sender: str) -> str:
        return f"{self.prefix}forgetting:{{{shard_of(sender)}}}:{sender}"

    def index(self, shard: str) -> str:
        return f"{self.prefix}active:{{{shard}}}"

    def indexes(self) -> list[str]:
        return [self.index(shard) for shard in self.shards()]

    def from_member(self, member: str) -> ConversationKeys:
        sender, _, recipient = member.partition(SEPARATOR)
        return self.conversation(sender, recipient)


class ConversationKeys(NamedTuple):
    """The keys of one conversation; ``member`` is its entry in the index shard (a named
    tuple: every message builds one, and a frozen dataclass costs a setattr per field). From
    ``conversation`` on, the fields are declared in the scripts' KEYS order (``in_order``)."""

    sender: str
    recipient: str
    member: str
    conversation: str  # its hash (<prefix>conv:{NN}:<from>|<to>)
    lock: str
    queue: str
    waiters: str
    wake: str  # a waiter's wake-up list is this followed by its token
    index_shard: str  # the index shard that lists it (<prefix>active:{NN}, Keys.index); member is its entry
    events: str  # where its scripts append lifecycle events
    ending: str
    minutes: str
    outbound: str  # its outbound messages not yet handed to Twilio (list of ids, commit order)
    sent: str  # its outbound messages' records (hash: id -> JSON)
    due: str  # the tag's due index (<prefix>due:{NN}); member is its entry
    contacts: str  # the tag's opt-outs and WhatsApp windows
    timers: str  # its tag's due index of timers (<prefix>timers:{NN}, Keys.timers)
    pending: str  # the tag's conversations with inbound messages waiting (Keys.pending)
    inbound: str  # its messages acknowledged, not yet handled
    waiting: str  # the tag's conversations waiting for a person (service/handoff.py)
    forgetting: str  # the sender's fence while `forget` runs (service/forget.py)
    transcript: str  # its transcript (a list); these three last: store/tail.lua

    def in_order(self) -> list[str]:
        """The keys every conversation script is sent, in ``service/store/common.lua``'s order:
        the fields from ``conversation`` on, as declared."""
        return list(self[3:])
