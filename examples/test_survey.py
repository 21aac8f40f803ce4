"""The survey bot, tested the way a developer tests a handler: in-process, no server needed."""

import pytest

from examples import survey
from service import create_app
from service.lifecycle import Sweeper
from service.simulator import TwilioSimulator
from service.testing import Clock

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


def test_silence_is_nudged_once_after_10_minutes_and_closed_after_30(twilio):
    clock = Clock(twilio)
    twilio.send(REY, OURS, "hi")
    assert clock.advance(minutes=9) == []
    nudged = clock.advance(minutes=1)
    assert [(sent.to, sent.text) for sent in nudged] == [(REY, "Still there? " + survey.QUESTIONS[0][1])]
    assert clock.advance(minutes=19) == []  # nudged once only
    closed = clock.advance(minutes=1)
    assert [sent.text for sent in closed] == [survey.CLOSED]
    assert twilio.send(REY, OURS, "Rey").reply == survey.QUESTIONS[0][1]  # a new survey


def test_an_answer_starts_the_wait_again(twilio):
    clock = Clock(twilio)
    twilio.send(REY, OURS, "hi")
    clock.advance(minutes=8)
    assert twilio.send(REY, OURS, "Rey").reply == "Thanks, Rey. What is your favourite colour?"
    assert clock.advance(minutes=8) == []  # 16 minutes since the first, 8 since the answer
    assert [sent.text for sent in clock.advance(minutes=2)] == [
        "Still there? Thanks, Rey. What is your favourite colour?"
    ]
    assert clock.advance(minutes=20) == [clock.sent[-1]]
    assert clock.sent[-1].text == survey.CLOSED


def test_a_finished_survey_leaves_no_timer(twilio):
    clock = Clock(twilio)
    for text in ("hi", "Rey", "green", "5"):
        twilio.send(REY, OURS, text)
    assert clock.advance(hours=1) == []
