"""A real headless Chromium driven by selenium: Debian's ``chromium`` and ``chromium-driver``.

Both are given by path, so Selenium Manager never runs (it would download a browser). Each
browser starts with a fresh profile in the caller's directory and without any of Chromium's
background traffic; its console messages are kept, so a test can see what the page's
Content-Security-Policy blocked.
"""

from __future__ import annotations

from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from .programs import require_binary

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW = (1280, 1100)  # the screenshot's size: the whole overview page


def chromium(profile: Path) -> webdriver.Chrome:
    """A headless Chromium at ``WINDOW``; skips (fails under ``REQUIRE_PROGRAMS=1``) when the
    browser or its driver is not installed."""
    browser = require_binary("chromium", "chromium")
    driver = require_binary("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def screenshot(driver: webdriver.Chrome, path: Path, size: tuple[int, int] = WINDOW) -> bytes:
    """A PNG of the page in a viewport of exactly ``size`` CSS pixels (the window's own size
    loses the height of the browser's frame), written to ``path``."""
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(png)
    return png


def overflows_on_a_phone(driver: webdriver.Chrome, width: int = 375, height: int = 740) -> bool:
    """Whether the page scrolls sideways in a phone's viewport (a phone reads it badly)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        return driver.execute_script(
            "return document.documentElement.scrollWidth > document.documentElement.clientWidth"
        )
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
