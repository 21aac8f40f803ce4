"""The operators' console in a real headless Chromium, served by gunicorn with the repo's
config on the session's redis-server: sign in, watch a conversation arrive, search it, open
it, end it, sign out; a wrong token and a forged POST are refused; nothing the page needs is
blocked by its Content-Security-Policy; the process's log output holds no full number.

The overview's screenshot is taken at a fixed size and the page checked on a phone;
``docs/console.png``, the conversation page, is tests/test_console_screenshot.py's.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import requests
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import WebDriverWait

from service.clock import now_ms
from service.keys import Keys
from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.browser import WINDOW, overflows_on_a_phone, screenshot
from tests.support.numbers import FINN, OURS, POE, REY

pytestmark = pytest.mark.slow

OPS = "browser-test-ops-token"
NUMBERS = (REY, FINN, POE, OURS)


@pytest.fixture(scope="module")
def server(redis_server):
    with Gunicorn(
        {"REDIS_URL": redis_server.url, "OPS_TOKEN": OPS}, workers=2, config=GUNICORN_CONF
    ) as gunicorn:
        yield gunicorn


@pytest.fixture
def console(server, browser, redis_url):
    """The browser at a fresh start (signed out) on an empty Redis; Twilio to talk to it."""
    browser.delete_all_cookies()
    browser.get(server.base + "/console/")  # cookies are per path: clear them on the console's
    browser.delete_all_cookies()
    browser.get_log("browser")  # drained: what an earlier test's pages reported is not ours
    return Console(browser, server.base, TwilioSimulator(server.url, TOKEN))


class Console:
    def __init__(self, browser, base, twilio):
        self.browser, self.base, self.twilio = browser, base, twilio

    def open(self, path="/console/"):
        self.browser.get(self.base + path)

    def wait(self, condition, seconds=20):
        """Until ``condition``; an element the page replaced meanwhile (a navigation, a
        refresh) is looked up again at the next poll. Chromium's driver may report one replaced
        between its lookup and its read as an "unhandled inspector error" (the node is gone),
        not as a stale element."""

        def settled(driver):
            try:
                return condition(driver)
            except WebDriverException as error:
                if "unhandled inspector error" in str(error):
                    return False
                raise

        return WebDriverWait(
            self.browser, seconds, ignored_exceptions=(StaleElementReferenceException,)
        ).until(settled)

    def find(self, css):
        return self.browser.find_element(By.CSS_SELECTOR, css)

    def text(self):
        return self.find("body").text

    def sign_in(self, token=OPS):
        self.open()
        self.wait(seen.url_to_be(self.base + "/console/sign-in"))
        field = self.find("#token")
        field.clear()
        field.send_keys(token)
        self.find("#sign-in button[type=submit]").click()

    def rows(self, table="#live"):
        return [row.text for row in self.browser.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")]

    def thread(self) -> list[tuple[str, str]]:
        """The conversation page's transcript as shown: (direction, body) per bubble."""
        return [
            (bubble.get_attribute("data-direction"), bubble.find_element(By.CSS_SELECTOR, ".body").text)
            for bubble in self.browser.find_elements(By.CSS_SELECTOR, "#thread li")
        ]

    def problems(self):
        """What the browser's console reported: a CSP violation, a failed script, fetch or
        icon (a /favicon.ico 404 when a page names none)."""
        return [
            entry["message"]
            for entry in self.browser.get_log("browser")
            if entry["level"] in ("SEVERE", "WARNING")
        ]


def test_wrong_token_is_refused(console):
    console.sign_in("not-the-token")
    console.wait(seen.visibility_of_element_located((By.ID, "sign-in-error")))
    assert console.find("#sign-in-error").text == "Wrong token."
    assert console.find("#token").get_attribute("aria-invalid") == "true"
    console.open()
    console.wait(seen.url_to_be(console.base + "/console/sign-in"))


def test_sign_in_see_a_conversation_arrive_search_open_end_and_sign_out(console, server):
    console.sign_in()
    console.wait(seen.url_to_be(console.base + "/console/"))
    assert "No live conversations." in console.text()
    assert console.browser.title == "Live conversations · sms-sessions console"
    console.browser.execute_script("window.notReloaded = true")

    for _ in range(2):
        assert console.twilio.send(REY, OURS, "hello").status == 200
    assert console.twilio.send(FINN, OURS, "hi").status == 200
    console.wait(lambda _: len(console.rows()) == 2)  # by the page's own refresh
    assert console.browser.execute_script("return window.notReloaded") is True
    assert console.rows()[0].startswith(f"{FINN} {OURS} Finn 1")
    assert console.rows()[1].startswith(f"{REY} {OURS} Rey 2")
    assert console.find("#live-count").text == "2"

    search = console.find("#q")
    search.send_keys("0001")
    search.submit()
    console.wait(lambda _: "ending in 0001" in console.find("#live-title").text)
    assert [row.split()[0] for row in console.rows()] == [REY]

    console.find("#live tbody a").click()
    console.wait(seen.presence_of_element_located((By.CSS_SELECTOR, "pre.state")))
    assert console.find("#conversation-title").text == f"{REY} → {OURS}"
    assert console.find("#messages").text == "2"
    assert console.find("pre.state").text == "{}"
    assert console.twilio.send(REY, OURS, "again").status == 200
    console.wait(lambda _: console.find("#messages").text == "3")  # refreshed in place

    confirm = console.find("#confirm-end")
    assert not confirm.is_displayed()  # ending takes a confirmation
    console.find("#end summary").click()
    console.wait(seen.visibility_of(confirm)).click()
    console.wait(seen.url_to_be(console.base + "/console/?ended=1"))
    assert "The conversation was ended." in console.text()
    assert [row.split()[0] for row in console.rows()] == [FINN]
    assert console.rows("#recent")[0].startswith(f"{REY} {OURS} operator")  # the lifecycle's record

    console.find("#sign-out").click()
    console.wait(seen.url_to_be(console.base + "/console/sign-in"))
    console.open()
    console.wait(seen.url_to_be(console.base + "/console/sign-in"))
    assert console.problems() == []

    output = server.output()
    messages = [json.loads(line)["message"] for line in output.splitlines() if line.startswith("{")]
    assert "console: an operator signed in" in messages
    assert any(message.startswith("POST /console/conversation/end ") for message in messages)
    assert "conversation of +1555***0001 ended by an operator" in output
    for number in NUMBERS:
        assert number[1:] not in output  # not even URL-encoded (%2B…)


def test_a_forged_post_without_the_csrf_token_is_refused(console, server):
    assert console.twilio.send(POE, OURS, "hello").status == 200
    console.sign_in()
    console.wait(seen.url_to_be(console.base + "/console/"))
    console.browser.execute_script(
        """
        const form = document.createElement("form");
        form.method = "post";
        form.action = "/console/conversation/end";
        for (const [name, value] of [["from", arguments[0]], ["to", arguments[1]]]) {
          const field = document.createElement("input");
          field.type = "hidden"; field.name = name; field.value = value;
          form.append(field);
        }
        document.body.append(form);
        form.submit();
    """,
        POE,
        OURS,
    )
    console.wait(lambda _: "Refused" in console.find("h1").text)
    assert "CSRF token is missing or out of date" in console.text()
    console.open()
    console.wait(lambda _: [row.split()[0] for row in console.rows()] == [POE])  # still live
    assert "console /console/conversation/end refused: missing or wrong CSRF token" in server.output()


def test_a_conversation_page_says_so_when_its_conversation_ends_elsewhere(console):
    assert console.twilio.send(POE, OURS, "hello").status == 200
    console.sign_in()
    console.wait(lambda _: len(console.rows()) == 1)
    console.find("#live tbody a").click()
    console.wait(seen.presence_of_element_located((By.CSS_SELECTOR, "pre.state")))
    console.browser.execute_script("window.notReloaded = true")
    ended = requests.delete(
        f"{console.base}/ops/conversations/{POE}/{OURS}",
        timeout=10,
        headers={"Authorization": f"Bearer {OPS}"},
    )
    assert ended.status_code == 200
    console.wait(seen.visibility_of_element_located((By.ID, "not-live")))
    assert console.browser.execute_script("return window.notReloaded") is True


def plant_samples(redis_client, hours=6):
    """A day's shape of samples, one a minute, as the sweeper writes them."""
    now, samples = now_ms(), Keys().samples
    # In one transaction: the running service's sweeper may sample meanwhile, and a stream
    # takes no entry older than its last.
    pipe = redis_client.pipeline(transaction=True)
    pipe.delete(samples)
    for minute in range(hours * 60, 0, -1):
        wave = math.sin(minute / 70) + 1  # from 0 to 2
        pipe.xadd(
            samples,
            {"live": round(3 + 6 * wave), "messages": round(4 + 10 * wave)},
            id=f"{now - minute * 60_000}-0",
        )
    pipe.execute()


def test_the_chart_renders(console, redis_client):
    plant_samples(redis_client)
    console.sign_in()
    line = console.wait(seen.visibility_of_element_located((By.CSS_SELECTOR, "#chart-live polyline")))
    assert len(line.get_attribute("points").split()) >= 359  # 6 h of minutes (and the sweeper's)
    drawn = console.browser.execute_script("return arguments[0].getBBox()", line)
    assert drawn["width"] > 500
    assert drawn["height"] > 50  # in viewBox units: spans the plot
    assert console.find("#chart-live").size["width"] > 300  # on screen
    title = console.find("#chart-live title").get_attribute("textContent")
    assert title == "Live conversations, last 6 hours"
    assert console.find("#chart-messages polyline").is_displayed()
    assert console.problems() == []


def test_screenshot_at_a_fixed_size_and_readable_on_a_phone(console, redis_client, tmp_path):
    plant_samples(redis_client)
    for sender, messages in (
        (POE, 1),
        (FINN, 4),
        (REY, 2),
        ("+14158675308", 7),
        ("+12348134522", 1),
        ("+12349013030", 3),
        ("+15551230044", 2),
    ):
        for _ in range(messages):
            assert console.twilio.send(sender, OURS, "hello").status == 200
    assert console.twilio.send("+15551230044", OURS, "STOP").status == 200  # an opt-out
    console.sign_in()
    console.wait(lambda _: len(console.rows()) == 6)
    console.find("#live tbody a").click()
    console.find("#end summary").click()
    console.wait(seen.visibility_of_element_located((By.ID, "confirm-end"))).click()
    console.wait(lambda _: len(console.rows("#recent")) == 2)
    console.open()
    png = screenshot(console.browser, tmp_path / "console.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == WINDOW
    assert not overflows_on_a_phone(console.browser)
    console.find("#live tbody a").click()
    console.wait(seen.presence_of_element_located((By.CSS_SELECTOR, "pre.state")))
    assert not overflows_on_a_phone(console.browser)
    assert console.problems() == []
