"""The console's handoff walk in a real headless Chromium, under gunicorn with the repo's config:
take over, a message arrives and is shown in the thread without the bot answering, the operator
replies (through the outbound sender, to the Twilio stand-in), hands back, and the bot answers
the next one."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen

from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import OURS, REY
from tests.support.replies import count_reply, thanks
from tests.support.standin import ACCOUNT_SID, API_KEY, API_SECRET
from tests.test_console_browser import OPS, Console

pytestmark = pytest.mark.slow

CONVERSATION = f"/console/conversation?from=%2B{REY[1:]}&to=%2B{OURS[1:]}"


@pytest.fixture(scope="module")
def server(redis_server, shared_standin):
    env = {
        "REDIS_URL": redis_server.url,
        "OPS_TOKEN": OPS,
        "TRANSCRIPTS": "1",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_API_KEY": API_KEY,
        "TWILIO_API_SECRET": API_SECRET,
        "TWILIO_API_BASE_URL": shared_standin.base,
    }
    with Gunicorn(env, workers=2, config=GUNICORN_CONF) as gunicorn:
        yield gunicorn


def test_take_over_reply_and_hand_back(server, shared_standin, browser, redis_url):
    browser.delete_all_cookies()
    console = Console(browser, server.base, TwilioSimulator(server.url, TOKEN))
    assert console.twilio.send(REY, OURS, "hi").reply == thanks("Rey")
    console.sign_in()
    console.wait(seen.url_to_be(console.base + "/console/"))
    console.open(CONVERSATION)
    console.wait(lambda _: console.thread() == [("in", "hi"), ("out", thanks("Rey"))])

    console.find("#take-over").click()
    console.wait(seen.presence_of_element_located((By.ID, "held")))
    assert "the bot is paused" in console.find("#notice").text
    console.browser.execute_script("window.notReloaded = true")

    held = console.twilio.send(REY, OURS, "is anyone there?")
    assert held.status == 200
    assert held.replies == []  # the bot does not answer
    console.wait(lambda _: console.thread()[-1] == ("in", "is anyone there?"))  # shown live
    assert console.browser.execute_script("return window.notReloaded") is True

    assert console.browser.find_elements(By.ID, "send-text") == []  # the reply box is the one box
    console.find("#reply-body").send_keys("Ana here: you are booked for 7 pm.")
    console.find("#send-reply").click()
    console.wait(lambda _: console.find("#notice").text == "Reply sent.")
    assert console.thread()[-1] == ("out", "Ana here: you are booked for 7 pm.")
    console.wait(lambda _: [m for m in shared_standin.inbox() if m["to"] == REY])  # the outbound sender's
    [sent] = [m for m in shared_standin.inbox() if m["to"] == REY]
    assert (sent["from"], sent["body"]) == (OURS, "Ana here: you are booked for 7 pm.")

    console.find("#hand-back").click()
    console.wait(lambda _: console.find("#notice").text == "Handed back: the bot answers the next message.")
    assert console.find("#take-over").is_displayed()
    assert console.find("#send-text").is_displayed()  # the send box is back, the reply box gone
    assert console.browser.find_elements(By.ID, "reply-body") == []

    answered = console.twilio.send(REY, OURS, "thanks!")
    assert answered.reply == count_reply("Rey", 3)
    console.wait(lambda _: console.thread()[-2:] == [("in", "thanks!"), ("out", count_reply("Rey", 3))])
    assert console.problems() == []
    assert REY[1:] not in server.output()
