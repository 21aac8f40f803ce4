"""The survey bot, tested the way a developer tests a handler: in-process, no server needed."""

import pytest

from examples import survey
from service import create_app
from service.simulator import TwilioSimulator

REY, OURS = "+15551230001", "+15550001111"


@pytest.fixture
def twilio():
    app = create_app({"TWILIO_AUTH_TOKEN": "test-token", "REDIS_URL": None}, handler=survey.handle)
    return TwilioSimulator.for_app(app)


def test_three_questions_then_a_summary_and_a_fresh_start(twilio):
    assert twilio.send(REY, OURS, "hi").reply == survey.QUESTIONS[0][1]
    assert twilio.send(REY, OURS, "Rey").reply == "Thanks, Rey. What is your favourite colour?"
    assert twilio.send(REY, OURS, "green").reply == survey.QUESTIONS[2][1]
    last = twilio.send(REY, OURS, "5")
    assert last.status == 200
    assert "<Message>Thank you, Rey!</Message><Message>You said: green, rated 5/5.</Message>" in last.body
    assert twilio.send(REY, OURS, "hello again").reply == survey.QUESTIONS[0][1]


def test_a_rating_that_is_not_1_to_5_is_asked_again(twilio):
    for text in ("hi", "Rey", "green"):
        twilio.send(REY, OURS, text)
    assert twilio.send(REY, OURS, "great").reply == "Please answer with a number from 1 to 5."
    assert "Thank you, Rey!" in twilio.send(REY, OURS, "4").body


def test_help_is_answered_without_losing_the_place(twilio):
    twilio.send(REY, OURS, "hi")
    twilio.send(REY, OURS, "Rey")
    assert "three-question survey" in twilio.send(REY, OURS, "HELP").reply
    assert twilio.send(REY, OURS, "blue").reply == survey.QUESTIONS[2][1]
