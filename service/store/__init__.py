"""The conversation store: the Lua scripts (``*.lua`` here, loaded by ``scripts``) and the
Python that runs them (``store``)."""

from .scripts import Script
from .store import (
    NO_CHANGE,
    Commit,
    ConversationBusy,
    ConversationStore,
    Inbound,
    LockLost,
    NotReplicated,
    Opened,
    Queued,
    SavedAlready,
    Timing,
    Waiting,
    decode_state,
    decode_turn,
)

__all__ = [
    "NO_CHANGE",
    "Commit",
    "ConversationBusy",
    "ConversationStore",
    "Inbound",
    "LockLost",
    "NotReplicated",
    "Opened",
    "Queued",
    "SavedAlready",
    "Script",
    "Timing",
    "Waiting",
    "decode_state",
    "decode_turn",
]
