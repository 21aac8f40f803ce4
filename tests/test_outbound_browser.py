"""The console's send box in a real headless Chromium: the service under gunicorn with the repo's
config (its workers' senders delivering), the Twilio stand-in as Twilio posting signed status
callbacks back to the service. Type a message, send it, see it on the conversation page with
its status moving to delivered in place; a send box posted without the CSRF token is refused
and sends nothing."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen

from service.simulator import TwilioSimulator
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.browser import overflows_on_a_phone
from tests.support.numbers import OURS, POE, REY
from tests.support.standin import ACCOUNT_SID, AUTH_TOKEN
from tests.test_console_browser import Console

pytestmark = pytest.mark.slow

OPS = "outbound-browser-ops-token"


class Served(Gunicorn):
    """gunicorn whose ``PUBLIC_BASE_URL`` is its own address, so status callbacks reach it."""

    def launch(self, args, prefix, **where):
        self.env["PUBLIC_BASE_URL"] = self.base
        super().launch(args, prefix, **where)


@pytest.fixture(scope="module")
def server(redis_server, shared_standin):
    env = {
        "REDIS_URL": redis_server.url,
        "OPS_TOKEN": OPS,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_FROM_NUMBER": OURS,
        "TWILIO_API_BASE_URL": shared_standin.base,
        "SENDER_INTERVAL": "0.1",
    }
    with Served(env, workers=2, config=GUNICORN_CONF) as gunicorn:
        yield gunicorn


@pytest.fixture
def console(server, browser, redis_url):
    browser.delete_all_cookies()
    browser.get(server.base + "/console/")
    browser.delete_all_cookies()
    browser.get_log("browser")
    return Console(browser, server.base, TwilioSimulator(server.url, AUTH_TOKEN))


def outbound_rows(console):
    return console.browser.find_elements(By.CSS_SELECTOR, "#outbound tbody tr")


def open_conversation(console, sender, sign_in=True):
    if sign_in:
        console.sign_in(OPS)
        console.wait(seen.url_to_be(console.base + "/console/"))
    console.open(f"/console/conversation?from=%2B{sender[1:]}&to=%2B{OURS[1:]}")
    console.wait(seen.presence_of_element_located((By.CSS_SELECTOR, "pre.state")))


def test_type_send_and_see_the_message_delivered(console, server, shared_standin):
    assert console.twilio.send(REY, OURS, "hello").status == 200
    open_conversation(console, REY)
    assert console.find("#no-outbound").text == "None yet."
    console.find("#send-text").send_keys("See you at 3 pm")
    console.find("#send-message").click()
    console.wait(lambda _: len(outbound_rows(console)) == 1)
    console.browser.execute_script("window.notReloaded = true")
    row = lambda: outbound_rows(console)[0]  # noqa: E731 (looked up again after each refresh)
    assert row().find_element(By.CSS_SELECTOR, ".said").text == "See you at 3 pm"
    # Delivered by a worker's sender, then the stand-in's status callbacks; the page's own
    # refresh shows it.
    console.wait(lambda _: row().find_element(By.CSS_SELECTOR, ".status").text == "delivered")
    assert console.browser.execute_script("return window.notReloaded") is True
    [delivered] = shared_standin.inbox(REY)
    assert delivered["body"] == "See you at 3 pm"
    assert row().find_element(By.CSS_SELECTOR, "td[data-label=Twilio]").text == delivered["sid"]
    assert console.find("#send-text").get_attribute("value") == ""
    assert not overflows_on_a_phone(console.browser)
    assert console.problems() == []
    assert "console: an operator queued outbound message" in server.output()


def test_an_empty_send_says_so_and_a_refused_one_names_the_rule(console, shared_standin):
    assert console.twilio.send(POE, OURS, "hello").status == 200
    assert console.twilio.send(POE, OURS, "STOP").status == 200  # opted out, conversation ended
    assert console.twilio.send(POE, OURS, "hello again").status == 200  # a new one, still opted out
    open_conversation(console, POE)
    console.find("#send-text").send_keys("Anything")
    console.find("#send-message").click()
    console.wait(seen.visibility_of_element_located((By.ID, "send-error")))
    assert "opted out (STOP)" in console.find("#send-error").text
    assert "21610" in console.find("#send-error").text
    assert console.find("#send-text").get_attribute("value") == "Anything"  # kept to edit
    assert outbound_rows(console) == []
    assert shared_standin.inbox(POE) == []


def test_a_send_without_the_csrf_token_is_refused_and_sends_nothing(console, server, shared_standin):
    assert console.twilio.send(REY, OURS, "hi").status == 200
    open_conversation(console, REY)
    before = len(outbound_rows(console))
    console.browser.execute_script(
        """
        const form = document.getElementById("send");
        form.querySelector("input[name=csrf]").remove();
        form.querySelector("textarea").value = "forged";
        form.submit();
    """
    )
    console.wait(lambda _: "Refused" in console.find("h1").text)
    open_conversation(console, REY, sign_in=False)
    assert len(outbound_rows(console)) == before
    assert all(message["body"] != "forged" for message in shared_standin.inbox())
    assert "console /console/conversation/send refused: missing or wrong CSRF token" in server.output()
