"""The conversation store: the Lua scripts (``*.lua`` here, loaded by ``scripts``) and the
Python that runs them (``store``)."""

from .scripts import Script
from .store import (
    ConversationBusy,
    ConversationStore,
    LockLost,
    NotReplicated,
    Opened,
    Waiting,
    decode_state,
    decode_turn,
)

__all__ = [
    "ConversationBusy",
    "ConversationStore",
    "LockLost",
    "NotReplicated",
    "Opened",
    "Script",
    "Waiting",
    "decode_state",
    "decode_turn",
]
