"""The conversation store: the Lua scripts (``*.lua`` here, loaded by ``scripts``) and the
Python that runs them (``store``)."""

from .scripts import Script
from .store import (
    NO_CHANGE,
    ConversationBusy,
    ConversationStore,
    Inbound,
    LockLost,
    NotReplicated,
    Opened,
    Queued,
    Timing,
    Waiting,
    decode_state,
    decode_turn,
)

__all__ = [
    "NO_CHANGE",
    "ConversationBusy",
    "ConversationStore",
    "Inbound",
    "LockLost",
    "NotReplicated",
    "Opened",
    "Queued",
    "Script",
    "Timing",
    "Waiting",
    "decode_state",
    "decode_turn",
]
