"""The default conversation: the first message is thanked, every later one counted.

It is written against the public handler API only (``service.handler``), like any bot:
``SMS_HANDLER=service.counter:handle`` is what runs when nothing else is chosen.
"""

from .handler import Conversation, Message


def handle(message: Message, conversation: Conversation) -> str:
    if conversation.is_new:
        return f"Thanks for the message, {message.caller_name}!"
    return f"{message.caller_name} has messaged {message.recipient} {conversation.messages} times."
