"""`cir demo` (issue 18): the local search page over an index, driven by a real headless
Chromium (Selenium); its top-k equals `cir search`; bad uploads and paths get one clear message
and the server keeps serving; nothing of it is imported by `cir --help`."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli import api
from cir_cli import search as lib
from cir_cli.cli import app
from cir_cli.recipes import load_recipe
from tests.browser import chromium_driver, distinct_colours, free_port, quit_driver
from tests.conftest import toy_overrides

pytest.importorskip("starlette", reason="the demo extra is not installed (pip install '.[demo]')")
pytest.importorskip("uvicorn", reason="the demo extra is not installed (pip install '.[demo]')")

from cir_cli.demo.app import BadRequest, DemoState, check_upload, create_app  # noqa: E402

# A hostile file name in the gallery: it must be escaped in the page and still be served.
HOSTILE = "odd <b>&'q'.png"
TEXT = "make it red and put it in the top left corner"


def bomb_png_header(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG signature + IHDR claiming width x height (no pixel data: it must never be decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.fixture(scope="module")
def recipe(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_recipe("toy_clip4cir", toy_overrides(toy_root, tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def model(recipe):
    return api.load_model(recipe, device="cpu")


@pytest.fixture(scope="module")
def index_path(toy_root: Path, recipe, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    images = sorted((toy_root / "dev").glob("*.png"))[:40]
    for image in images[:-1]:
        shutil.copy(image, folder / image.name)
    shutil.copy(images[-1], folder / HOSTILE)
    out = tmp_path_factory.mktemp("idx") / "g.cirindex"
    lib.build_index(folder, recipe, out, model=model, num_workers=0)
    return out


@pytest.fixture(scope="module")
def server(index_path: Path, model):
    import uvicorn

    state = DemoState(lib.load_index(index_path), model, top_k=12, max_upload_bytes=256 * 1024)
    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the demo server did not start"
        time.sleep(0.05)
    yield state, f"http://127.0.0.1:{port}", port
    srv.should_exit = True
    thread.join(timeout=10)


def cir_search_names(index_path: Path, image: Path, text: str, k: int) -> list[str]:
    """The top-k of `cir search --json` for the same query, as paths relative to the gallery."""
    result = CliRunner().invoke(
        app,
        ["-q", "search", str(index_path), "--image", str(image), "--text", text, "-k", str(k)]
        + ["--json"],
    )
    assert result.exit_code == 0, result.output
    root = image.parent
    return [
        Path(h["path"]).relative_to(root).as_posix() for h in json.loads(result.stdout)["results"]
    ]


def request(port: int, method: str, path: str, body: bytes = b"", headers=None):
    """A raw HTTP request (http.client sends the path as given: `..` is not normalised)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read().decode("utf-8", "replace")
    conn.close()
    return response.status, data


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None = None):
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    if file is not None:
        filename, data = file
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def error_of(page: str) -> str:
    start = page.index('id="error"')
    return page[page.index(">", start) + 1 : page.index("</div>", start)]


# ---------------------------------------------------------------------------------------------


def test_check_upload_refuses_before_decoding() -> None:
    from tests.conftest import tiny_png

    assert check_upload(tiny_png(), "ok.png") == ".png"
    with pytest.raises(BadRequest, match=r"'notes.txt' is not an image") as err:
        check_upload(b"hello, not an image\n", "notes.txt")
    assert err.value.status == 400
    with pytest.raises(BadRequest, match=r"60000 x 60000 px; .* 1 to 8192 px") as err:
        check_upload(bomb_png_header(), "bomb.png")
    assert err.value.status == 413
    with pytest.raises(BadRequest, match="truncated PNG"):
        check_upload(bomb_png_header()[:20], "cut.png")
    with pytest.raises(BadRequest, match="is empty"):
        check_upload(b"", "empty.png")


def test_http_refusals_and_the_server_keeps_serving(server, index_path: Path) -> None:
    state, _, port = server
    for path in (
        "/image/../../../etc/passwd",
        "/image/%2e%2e/%2e%2e/etc/passwd",
        "/thumb/..%2F..%2Fetc%2Fpasswd",
        "/image//etc/passwd",
    ):
        status, page = request(port, "GET", path)
        assert status == 404, (path, status)
        assert "is not an image of this index" in error_of(page)
        assert "root:" not in page
    body, headers = multipart({"text": TEXT, "k": "5"}, ("notes.txt", b"just text\n"))
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 400 and "&#x27;notes.txt&#x27; is not an image" in error_of(page)
    body, headers = multipart({"text": TEXT, "k": "5"}, ("bomb.png", bomb_png_header()))
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 413 and "60000 x 60000 px" in error_of(page)
    # Over the byte cap (256 KiB here), whatever the body holds.
    body, headers = multipart({"text": TEXT}, ("big.png", b"\0" * (400 * 1024)))
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 413 and "upload too large" in error_of(page)
    body, headers = multipart({"text": TEXT, "reference": "../../etc/passwd"})
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 404 and "&#x27;../../etc/passwd&#x27; is not an image" in error_of(page)
    status, page = request(port, "POST", "/search", b"garbage", {"Content-Type": "text/plain"})
    assert status == 400
    # Still serving: the page, a file of the index (hostile name, URL-quoted) and a search.
    assert request(port, "GET", "/")[0] == 200
    from urllib.parse import quote

    assert request(port, "GET", "/image/" + quote(HOSTILE))[0] == 200
    body, headers = multipart({"text": TEXT, "k": "5", "reference": state.names[0]})
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 200 and page.count('class="hit"') == 5
    assert HOSTILE not in page and "odd &lt;b&gt;&amp;&#x27;q&#x27;.png" in page


def test_demo_in_chromium_matches_cir_search(server, index_path: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    state, base, port = server
    driver = chromium_driver()

    def submit() -> None:
        # Wait for the answer page itself: a click may return before the navigation ends.
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(EC.staleness_of(old))
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )

    try:
        driver.set_page_load_timeout(60)
        driver.get(base + "/")
        reference, k = state.names[7], 6

        def search(text: str, upload: Path | None = None) -> None:
            Select(driver.find_element(By.ID, "reference")).select_by_value(reference)
            if upload is not None:
                driver.find_element(By.ID, "upload").send_keys(str(upload))
            field = driver.find_element(By.ID, "text")
            field.clear()
            field.send_keys(text)
            number = driver.find_element(By.ID, "k")
            number.clear()
            number.send_keys(str(k))
            submit()

        search(TEXT)
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results li .name")]
        expected = cir_search_names(index_path, state.index.root / reference, TEXT, k)
        assert names == expected and len(names) == k
        assert driver.find_element(By.ID, "query-text").text == TEXT
        # The thumbnails loaded (served from the index) and link to the full images.
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        assert loaded == k
        links = [
            a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#results a")
        ]
        assert links[0].endswith("/image/" + names[0])
        png = tmp_path / "demo.png"
        driver.save_screenshot(str(png))
        assert distinct_colours(png) > 50

        # Bad uploads and a `..` reference: one clear message, then a good search again.
        notes = tmp_path / "notes.txt"
        notes.write_text("not an image\n")
        bomb = tmp_path / "bomb.png"
        bomb.write_bytes(bomb_png_header())
        search(TEXT, upload=notes)
        assert "'notes.txt' is not an image" in driver.find_element(By.ID, "error").text
        search(TEXT, upload=bomb)
        assert "60000 x 60000 px" in driver.find_element(By.ID, "error").text
        driver.execute_script(
            "document.querySelector('#reference option:checked').value = '../../etc/passwd'"
        )
        submit()
        assert "'../../etc/passwd' is not an image of this index" in (
            driver.find_element(By.ID, "error").text
        )
        driver.get(base + "/")
        search(TEXT)
        again = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results li .name")]
        assert again == expected
        # An uploaded copy of the reference gives the same top-k as the indexed file.
        search(TEXT, upload=state.index.root / reference)
        uploaded = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results li .name")]
        assert uploaded == expected
    finally:
        quit_driver(driver)


def test_demo_and_report_add_nothing_to_help_startup() -> None:
    # What the demo and the report would pull in (torch: what `cir --help` never loads).
    heavy = (
        "torch",
        "starlette",
        "uvicorn",
        "python_multipart",
        "selenium",
        "cir_cli.demo.app",
        "cir_cli.report",
    )
    code = (
        "import sys; from typer.testing import CliRunner; from cir_cli.cli import app; "
        "r = [CliRunner().invoke(app, a) for a in (['--help'], ['demo', '--help'], "
        "['validate', '--help'])]; assert all(x.exit_code == 0 for x in r); "
        "assert '--report' in r[2].output and 'INDEX' in r[1].output; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_without_the_extra_says_what_to_install(monkeypatch, index_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    result = CliRunner().invoke(app, ["demo", str(index_path)])
    assert result.exit_code == 2
    assert "pip install 'cir-cli[demo]'" in result.output and "uvicorn" in result.output


def test_a_large_index_gets_a_path_field(server, monkeypatch) -> None:
    """Past SELECT_LIMIT images the page asks for a relative path instead of a huge <select>."""
    from cir_cli.demo import app as demo_app

    state, _, port = server
    monkeypatch.setattr(demo_app, "SELECT_LIMIT", 3)
    status, page = request(port, "GET", "/")
    assert status == 200 and '<input type="text" name="reference"' in page
    assert "<option" not in page
    body, headers = multipart({"text": TEXT, "k": "3", "reference": state.names[2]})
    status, page = request(port, "POST", "/search", body, headers)
    assert status == 200 and page.count('class="hit"') == 3


def test_a_busy_port_is_one_line(server, index_path: Path) -> None:
    _, _, port = server
    result = CliRunner().invoke(app, ["demo", str(index_path), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
