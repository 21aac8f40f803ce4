"""The console's conversation page in a real headless Chromium, as ``docs/console.png`` shows it:
the survey example (examples/survey.py) under gunicorn with the repo's config, transcripts on,
the Twilio stand-in delivering and posting its status callbacks back. The sender answers two
questions and gets stuck on the third; an operator takes over, replies from the reply box and
sees the reply delivered. The page then shows the thread, the survey's pending timers, the
hold (reply box, "Hand back") and the reply's delivery status.

With ``CONSOLE_SCREENSHOT=1`` it writes ``docs/console.png`` (else a temporary file): the whole
page at the overview's width, so the committed image changes when the console does, not at
every run."""

from __future__ import annotations

import os
import struct

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen

from service.simulator import TwilioSimulator
from tests.support import ROOT
from tests.support.app_servers import GUNICORN_CONF
from tests.support.browser import WINDOW, overflows_on_a_phone, screenshot
from tests.support.numbers import OURS, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN
from tests.test_console_browser import OPS, Console
from tests.test_outbound_browser import Served

pytestmark = pytest.mark.slow

CONVERSATION = f"/console/conversation?from=%2B{REY[1:]}&to=%2B{OURS[1:]}"
REPLY = "Hi Rey, Ana from support here. Order #4521 ships today; a tracking link follows by text."


@pytest.fixture(scope="module")
def server(redis_server, shared_standin):
    env = {
        "REDIS_URL": redis_server.url,
        "OPS_TOKEN": OPS,
        "TRANSCRIPTS": "1",
        "SMS_HANDLER": "examples.survey:handle",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_FROM_NUMBER": OURS,
        "TWILIO_API_BASE_URL": shared_standin.base,
        "SENDER_INTERVAL": "0.1",
    }
    with Served(env, workers=2, config=GUNICORN_CONF) as gunicorn:
        yield gunicorn


def test_the_conversation_page_with_its_thread_timers_hold_and_statuses(server, browser, redis_url, tmp_path):
    browser.delete_all_cookies()
    console = Console(browser, server.base, TwilioSimulator(server.url, AUTH_TOKEN))
    for body in ("Hi", "Rey", "Green", "Before that: my order #4521 has not arrived"):
        assert console.twilio.send(REY, OURS, body).status == 200
    console.sign_in()
    console.wait(seen.url_to_be(console.base + "/console/"))
    console.open(CONVERSATION)
    console.find("#take-over").click()
    console.wait(seen.presence_of_element_located((By.ID, "held")))
    console.find("#reply-body").send_keys(REPLY)
    console.find("#send-reply").click()
    console.wait(lambda _: console.find("#notice").text == "Reply sent.")

    console.open(CONVERSATION)
    console.wait(lambda _: "delivered" in console.find("#thread li:last-child small.by").text)
    console.wait(lambda _: console.find("#outbound tbody td.status").text == "delivered")
    assert console.thread() == [
        ("in", "Hi"),
        ("out", "Hi! Three quick questions. What should we call you?"),
        ("in", "Rey"),
        ("out", "Thanks, Rey. What is your favourite colour?"),
        ("in", "Green"),
        ("out", "And how would you rate us, from 1 to 5?"),
        ("in", "Before that: my order #4521 has not arrived"),
        ("out", "Please answer with a number from 1 to 5."),
        ("out", REPLY),
    ]
    assert console.find("#thread li:last-child small.by").text == "operator · delivered"
    assert [timer.text.split(":")[0] for timer in browser.find_elements(By.CSS_SELECTOR, "#timers li")] == [
        "nudge",
        "close",
    ]
    assert console.find("#reply-body").is_displayed()
    assert console.find("#hand-back").is_displayed()
    assert browser.find_elements(By.ID, "send-text") == []  # one reply box while held: the handoff's

    width = WINDOW[0]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    target = (
        ROOT / "docs" / "console.png"
        if os.environ.get("CONSOLE_SCREENSHOT") == "1"
        else tmp_path / "console.png"
    )
    png = screenshot(browser, target, (width, height))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (width, height)
    assert not overflows_on_a_phone(browser)
    assert console.problems() == []
