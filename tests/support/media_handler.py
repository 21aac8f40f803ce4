"""A handler that answers with two messages, the second with media, and says how many media
the message carried; ``boom`` makes it raise (``SMS_HANDLER`` / ``--handler`` in tests)."""

from twilio.twiml.messaging_response import MessagingResponse


def handle(message, conversation):
    if message.body == "boom":
        raise ValueError("boom")
    reply = MessagingResponse()
    reply.message("first")
    reply.message(f"second, after {len(message.media)} media").media("https://example.com/dog.jpg")
    return reply
