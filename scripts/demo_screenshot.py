"""Start `cir demo INDEX` on a free loopback port, run one query in headless Chromium, save a PNG.

What the README's demo screenshot is made with; it drives the page as a user does (choose the
reference, type the text, press Search) through Selenium and Debian's chromium + chromedriver.

Usage (Debian: `apt-get install -y chromium chromium-driver`; `pip install -e ".[demo,test]"`):

    python scripts/demo_screenshot.py photos.cirindex out.png --reference a/b.jpg --text "is red"
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cir demo exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"cir demo did not answer at {url} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--reference", required=True, help="a path relative to the index root")
    parser.add_argument("--text", required=True)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = free_port()
    cir = [sys.executable, "-m", "cir_cli", "-q", "demo", str(args.index), "--port", str(port)]
    proc = subprocess.Popen(cir)
    profile = tempfile.mkdtemp(prefix="cir-selenium-")
    driver = None
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={args.width},{args.height}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "chromedriver"), options=options
        )
        driver.get(f"http://127.0.0.1:{port}/")
        Select(driver.find_element(By.ID, "reference")).select_by_value(args.reference)
        driver.find_element(By.ID, "text").send_keys(args.text)
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys(str(args.k))
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 120).until(EC.staleness_of(old))
        WebDriverWait(driver, 120).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results li .name")]
        driver.save_screenshot(str(args.png))
        print(f"wrote {args.png}; top-{len(names)}: {', '.join(names)}")
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
