"""A handler that answers and also sends a message of its own (through the outbox and sender)."""


def handle(message, conversation):
    conversation.send(f"Reminder: you said {message.body}")
    return "Noted."
