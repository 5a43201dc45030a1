"""Render a `cir search --html` page in headless Chromium and save a PNG screenshot.

Shows that the contact sheet is self-contained: Chromium gets no network, a fresh profile and
only the HTML file, and the thumbnails still appear (they are inline base64 images).

Usage (Debian: `apt-get install -y chromium`):

    cir search photos.cirindex --image q.jpg --text "is red" --html out.html
    python scripts/html_screenshot.py out.html out.png [--width 1200 --height 900]

tests/search/test_search.py runs it (skipped when chromium is not installed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

# Flags for a hermetic headless run (no GPU, sandbox or background network traffic; a
# throw-away profile so nothing from a user's browser leaks in).
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("chromium not found (Debian: apt-get install -y chromium)")


def screenshot(
    html: str | Path, png: str | Path, width: int = 1200, height: int = 900, timeout: int = 90
) -> Path:
    """Screenshot `html` (a file) into `png` with headless Chromium; returns the PNG path."""
    html, png = Path(html).resolve(), Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="cir-chromium-") as profile:
        cmd = [
            find_chromium(),
            *_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr}")
    return png


def distinct_colours(png: str | Path) -> int:
    """How many distinct RGB colours the screenshot holds (a blank page has a handful)."""
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    out = screenshot(args.html, args.png, args.width, args.height)
    print(f"wrote {out} ({distinct_colours(out)} colours)")


if __name__ == "__main__":
    main()
