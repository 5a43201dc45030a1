"""A real headless Chromium for the browser tests (Debian's chromium + chromedriver, Selenium).

`chromium_driver()` skips the calling test with the reason when one of them is missing (CI's
`.ci/run` installs chromium where apt works; tox installs selenium from the test extra)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_driver(width: int = 1280, height: int = 1000):
    """A headless Selenium Chrome driver on the system's Chromium (the caller quits it)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    if driver_path is None:
        pytest.skip("chromedriver is not installed (Debian: apt-get install -y chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="cir-selenium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver._cir_profile = profile  # removed by quit_driver
    return driver


def quit_driver(driver) -> None:
    profile = getattr(driver, "_cir_profile", None)
    driver.quit()
    if profile:
        shutil.rmtree(profile, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distinct_colours(png: str | Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])
