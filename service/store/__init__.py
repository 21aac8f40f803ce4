"""The conversation store: the Lua scripts (``*.lua`` here, loaded by ``scripts``) and the
Python that runs them (``store``)."""

from .scripts import Script
from .store import (
    ConversationBusy,
    ConversationStore,
    Inbound,
    LockLost,
    NotReplicated,
    Opened,
    Queued,
    Waiting,
    decode_state,
    decode_turn,
)

__all__ = [
    "ConversationBusy",
    "ConversationStore",
    "Inbound",
    "LockLost",
    "NotReplicated",
    "Opened",
    "Queued",
    "Script",
    "Waiting",
    "decode_state",
    "decode_turn",
]
