"""A three-question survey: a bot written against the handler API, the way yours would be.

    make run SMS_HANDLER=examples.survey:handle
    .venv/bin/sms-sessions simulate --handler examples.survey:handle --from +15551230001 --to +15550001111

The answers live in the conversation's state until the last one is in; then the bot thanks
the sender with a summary and ends the conversation, so the next text starts a new survey.
A sender who goes quiet is nudged once after ten minutes, and the survey closes after thirty
(two timers, which each answer cancels and sets again). ``on_end`` hears of every survey that
ended, finished or abandoned.
"""

import logging
from datetime import timedelta

from twilio.twiml.messaging_response import MessagingResponse

from service import Conversation, Message

log = logging.getLogger(__name__)

QUESTIONS = [
    ("name", "Hi! Three quick questions. What should we call you?"),
    ("colour", "Thanks, {name}. What is your favourite colour?"),
    ("rating", "And how would you rate us, from 1 to 5?"),
]


NUDGE_AFTER = timedelta(minutes=10)
CLOSE_AFTER = timedelta(minutes=30)
CLOSED = "No answer for 30 minutes, so we closed the survey. Text us to start again."


def handle(message: Message, conversation: Conversation):
    if message.kind == "timer":
        return on_silence(message, conversation)
    # Any message cancelled both timers (they are cancel_on_reply): the wait starts again.
    conversation.remind(NUDGE_AFTER, "nudge")
    conversation.remind(CLOSE_AFTER, "close")
    if message.opt_out == "HELP":
        return "A three-question survey. Reply with your answer, or STOP to leave."
    answers = conversation.setdefault("answers", {})
    if not conversation.is_new:  # this message answers the question we asked last
        field = QUESTIONS[len(answers)][0]
        answer = message.body.strip()
        if field == "rating" and answer not in {"1", "2", "3", "4", "5"}:
            return "Please answer with a number from 1 to 5."
        answers[field] = answer
    if len(answers) < len(QUESTIONS):
        return QUESTIONS[len(answers)][1].format(**answers)
    conversation.end()
    reply = MessagingResponse()
    reply.message(f"Thank you, {answers['name']}!")
    reply.message(f"You said: {answers['colour']}, rated {answers['rating']}/5.")
    return reply


def on_silence(message: Message, conversation: Conversation):
    """Ten minutes without an answer: the question again, once; thirty: the survey closes."""
    if message.timer == "nudge":
        answers = conversation.get("answers", {})
        return "Still there? " + QUESTIONS[len(answers)][1].format(**answers)
    conversation.end()
    return CLOSED


def on_end(conversation: Conversation, reason: str) -> None:
    """Called once per ended survey: finished (``handler``), abandoned (``expired``), or cut
    short (``opt-out``, ``operator``). A real bot would store the answers here."""
    answers = conversation.get("answers", {})
    log.info("survey ended (%s) with %d of %d answers", reason, len(answers), len(QUESTIONS))
