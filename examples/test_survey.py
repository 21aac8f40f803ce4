"""The survey bot, tested the way a developer tests a handler: in-process, no server needed."""

import pytest

from examples import survey
from service import create_app
from service.lifecycle import Sweeper
from service.simulator import TwilioSimulator

REY, OURS = "+15551230001", "+15550001111"


@pytest.fixture
def app():
    return create_app({"TWILIO_AUTH_TOKEN": "test-token", "REDIS_URL": None}, handler=survey.handle)


@pytest.fixture
def twilio(app):
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


def test_the_end_hook_hears_of_every_ended_survey(app, twilio, caplog):
    caplog.set_level("INFO", logger="examples.survey")
    for text in ("hi", "Rey", "green", "5"):
        twilio.send(REY, OURS, text)
    twilio.send("+15551230002", OURS, "hi")
    twilio.send("+15551230002", OURS, "STOP")
    Sweeper(app).sweep()
    assert "survey ended (handler) with 3 of 3 answers" in caplog.text
    assert "survey ended (opt-out) with 0 of 3 answers" in caplog.text
