"""`cir demo INDEX`: a local web page over a `cir index` gallery (optional extra `[demo]`).

Stack: a small Starlette (ASGI) app served by uvicorn, with plain server-rendered HTML forms
and no JavaScript. Why not Gradio (what CoVR and LinCIR use): Gradio pulls in a large stack
(FastAPI, pandas, a front-end bundle, analytics), starts slowly and renders its page with
JavaScript from its own component protocol, which is hard to drive and check in a browser test.
Starlette is the small, well-kept core under FastAPI: one dependency (plus uvicorn to serve and
python-multipart to read uploads), a page that is a plain form, and routes a test can call.

The search itself is `cir_cli.search.search`, the function `cir search` runs, on the index's own
model (checked against the index by `load_index_model`), so the page lists the same top-k.

Safety: binds 127.0.0.1 unless told otherwise; serves only files listed in the index (looked up
by their relative path in the manifest, so `..` or an absolute path never reaches the file
system); an upload is bounded in bytes (read with a cap, whatever Content-Length says) and in
pixels (a PNG's size is read from its IHDR header before anything is decoded, other formats from
PIL's header parse); a bad request gets a page with one clear message and status 4xx, and the
server keeps serving.
"""

from __future__ import annotations

import html
import io
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from cir_cli.errors import CirError

if TYPE_CHECKING:
    from cir_cli.methods.base import CIRMethod
    from cir_cli.search import Index

esc = html.escape

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
MAX_SIDE = 8192  # pixels a side, for an uploaded reference image
# An index larger than this gets a text field (relative path) instead of a <select>.
SELECT_LIMIT = 5000
MAX_K = 100
_THUMB = 192
_THUMBS_KEPT = 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Form fields besides the file (reference, text, k): small.
_FIELDS_BYTES = 64 * 1024


class BadRequest(Exception):
    """A request the demo refuses, with the message the page shows."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_upload(data: bytes, filename: str, max_side: int = MAX_SIDE) -> str:
    """The file suffix to store an uploaded image under; BadRequest with a clear message when
    `data` is not an image or is larger than `max_side` pixels a side (checked before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    name = filename or "upload"
    if not data:
        raise BadRequest(f"upload {name!r} is empty")
    if data.startswith(_PNG_SIGNATURE):
        # IHDR is the first chunk: length (4) + b"IHDR" (4), then width and height (big-endian).
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise BadRequest(f"upload {name!r}: a truncated PNG (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        _check_side(name, width, height, max_side)
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            fmt, (width, height) = im.format, im.size
    except UnidentifiedImageError:
        raise BadRequest(
            f"upload {name!r} is not an image (expected a PNG, JPEG, WebP, GIF, BMP or TIFF file)"
        ) from None
    except Image.DecompressionBombError:
        raise BadRequest(f"upload {name!r}: too many pixels (over {max_side} px a side)") from None
    except Exception as exc:  # noqa: BLE001 - any parser error means an unusable upload
        raise BadRequest(f"upload {name!r}: cannot read the image header ({exc})") from None
    _check_side(name, width, height, max_side)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")  # decode now, so a broken body is refused here, not in the model
    except Exception as exc:  # noqa: BLE001
        raise BadRequest(f"upload {name!r}: cannot decode the {fmt} image ({exc})") from None
    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}.get(
        fmt or "", ".img"
    )


def _check_side(name: str, width: int, height: int, max_side: int) -> None:
    if width > max_side or height > max_side or width < 1 or height < 1:
        raise BadRequest(
            f"upload {name!r} is {width} x {height} px; the demo takes images of 1 to "
            f"{max_side} px a side",
            413,
        )


@dataclass
class DemoState:
    index: Index
    model: CIRMethod
    top_k: int = 12
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        self.names = [e.path for e in self.index.files]
        self.known = set(self.names)
        self.lock = threading.Lock()  # one model call at a time (torch + the memory-mapped index)
        self.thumbs: OrderedDict[str, bytes] = OrderedDict()

    def file(self, rel: str) -> Path:
        """The indexed file named `rel` (a manifest path); BadRequest for anything else."""
        if rel not in self.known:
            shown = rel if len(rel) <= 200 else rel[:200] + "..."
            raise BadRequest(f"{shown!r} is not an image of this index", 404)
        return self.index.root / rel

    def thumbnail(self, rel: str) -> bytes:
        path = self.file(rel)
        with self.lock:
            cached = self.thumbs.get(rel)
        if cached is not None:
            return cached
        from cir_cli.search.html import thumbnail_jpeg

        jpeg = thumbnail_jpeg(path, _THUMB)
        if jpeg is None:  # the file changed or vanished since indexing
            raise BadRequest(f"{rel!r} can no longer be read", 404)
        with self.lock:
            self.thumbs[rel] = jpeg
            while len(self.thumbs) > _THUMBS_KEPT:
                self.thumbs.popitem(last=False)
        return jpeg

    def search(self, image: Path, text: str, k: int):
        from cir_cli import search as lib

        with self.lock:
            return lib.search(self.index, self.model, [lib.Query(image, text)], k)[0]


# ---------------------------------------------------------------------------------------------
# Pages

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;
background:#f6f7f9;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin-bottom:12px}
form,section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;
margin-bottom:16px}
form{display:grid;grid-template-columns:max-content 1fr;gap:10px 14px;align-items:center;
max-width:900px} input[type=text]{width:100%;font-size:16px;padding:4px}
select{max-width:100%} button{font-size:16px;padding:6px 18px;grid-column:2;justify-self:start}
.error{background:#fde8e6;border:1px solid #e0a39c;color:#8c1d13;padding:10px 14px;
border-radius:8px;margin-bottom:16px;max-width:900px;overflow-wrap:anywhere}
.query{display:flex;gap:16px;align-items:center}
.query img{width:160px;height:160px;object-fit:contain;background:#eee;border:3px solid #3a6ee8;
border-radius:6px} .text{font-size:18px} .text b{color:#3a6ee8}
ol#results{list-style:none;padding:0;display:grid;gap:10px;
grid-template-columns:repeat(auto-fill,minmax(170px,1fr))}
li.hit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}
li.hit img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.name{overflow-wrap:anywhere} .rank{font-weight:bold} .score{color:#666}
"""


def _page(state: DemoState, body: str = "", error: str = "", form: dict | None = None) -> str:
    form = form or {}
    chosen = form.get("reference", "")
    if len(state.names) <= SELECT_LIMIT:
        options = "".join(
            f'<option value="{esc(n)}"{" selected" if n == chosen else ""}>{esc(n)}</option>'
            for n in state.names
        )
        picker = f'<select name="reference" id="reference">{options}</select>'
    else:
        picker = (
            f'<input type="text" name="reference" id="reference" value="{esc(chosen)}" '
            'placeholder="a relative path in the index">'
        )
    index = state.index
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cir demo: {esc(index.location.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>cir demo: {esc(index.location.name)}</h1>",
        f'<div class="meta">{len(state.names)} images in {esc(str(index.root))} &middot; '
        f"{esc(str(index.manifest.get('recipe_name', '')))}</div>",
        f'<div class="error" id="error" role="alert">{esc(error)}</div>' if error else "",
        '<form id="query" method="post" action="/search" enctype="multipart/form-data">',
        f'<label for="reference">reference image</label>{picker}',
        '<label for="upload">or upload one<br><small>(used instead)</small></label>',
        '<input type="file" name="upload" id="upload" accept="image/*">',
        '<label for="text">modification</label>',
        f'<input type="text" name="text" id="text" value="{esc(form.get("text", ""))}" '
        'placeholder="e.g. make it red">',
        '<label for="k">results</label>',
        f'<input type="number" name="k" id="k" min="1" max="{MAX_K}" '
        f'value="{esc(str(form.get("k", state.top_k)))}">',
        '<button type="submit" id="submit">Search</button>',
        "</form>",
        body,
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _results(state: DemoState, result, reference_tag: str, text: str) -> str:
    parts = [
        '<section id="answer"><div class="query">',
        reference_tag,
        f'<div class="text"><b>+</b> &ldquo;<span id="query-text">{esc(text)}</span>&rdquo;</div>',
        '</div><ol id="results">',
    ]
    root = state.index.root
    for hit in result.hits:
        rel = hit.path.relative_to(root).as_posix()
        url = quote(rel)
        parts.append(
            f'<li class="hit" data-path="{esc(rel)}"><a href="/image/{esc(url)}">'
            f'<img src="/thumb/{esc(url)}" alt="{esc(rel)}"></a>'
            f'<span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.4f}</span>'
            f'<br><span class="name">{esc(rel)}</span></li>'
        )
    parts.append("</ol></section>")
    return "".join(parts)


async def _read_capped(request, cap: int) -> bytes:
    """The request body, refused as soon as it passes `cap` bytes (Content-Length may lie)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise BadRequest(f"upload too large: {int(declared)} bytes; the limit is {cap} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BadRequest(f"upload too large: over the limit of {cap} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: DemoState):
    """The Starlette application over `state` (index + model)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, Response
    from starlette.routing import Route

    def refused(exc: BadRequest, form: dict | None = None) -> HTMLResponse:
        return HTMLResponse(_page(state, error=str(exc), form=form), status_code=exc.status)

    async def home(request: Request) -> HTMLResponse:
        return HTMLResponse(_page(state, form=dict(request.query_params)))

    async def image(request: Request) -> Response:
        try:
            return FileResponse(state.file(request.path_params["path"]))
        except BadRequest as exc:
            return refused(exc)

    async def thumb(request: Request) -> Response:
        try:
            data = await run_in_threadpool(state.thumbnail, request.path_params["path"])
        except BadRequest as exc:
            return refused(exc)
        return Response(data, media_type="image/jpeg")

    async def search(request: Request) -> HTMLResponse:
        form: dict = {}
        try:
            body = await _read_capped(request, state.max_upload_bytes + _FIELDS_BYTES)

            async def replay() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            parsed = await Request(request.scope, replay).form(
                max_files=1, max_fields=8, max_part_size=state.max_upload_bytes
            )
            upload = parsed.get("upload")
            form = {
                key: value
                for key in ("reference", "text", "k")
                if isinstance(value := parsed.get(key), str)
            }
            text = form.get("text", "").strip()
            if not text:
                raise BadRequest("type a modification text (e.g. 'make it red')")
            k_text = form.get("k", "") or str(state.top_k)
            if not k_text.isdigit() or not 1 <= int(k_text) <= MAX_K:
                raise BadRequest(f"results {k_text!r}: expected a whole number from 1 to {MAX_K}")
            k = int(k_text)
            data = (
                await upload.read() if upload is not None and not isinstance(upload, str) else b""
            )
            if data or (upload is not None and not isinstance(upload, str) and upload.filename):
                name = upload.filename or "upload"
                suffix = check_upload(data, name, state.max_side)
                result = await run_in_threadpool(_search_upload, state, data, suffix, text, k)
                uri = _data_uri(data)
                tag = f'<img id="query-image" src="{uri}" alt="{esc(name)}">'
            else:
                reference = form.get("reference", "")
                path = state.file(reference)
                result = await run_in_threadpool(state.search, path, text, k)
                url = esc(quote(reference))
                tag = f'<a href="/image/{url}"><img id="query-image" src="/thumb/{url}" alt=""></a>'
        except BadRequest as exc:
            return refused(exc, form)
        except CirError as exc:
            return refused(BadRequest(str(exc)), form)
        except Exception as exc:  # noqa: BLE001 - a malformed form body (multipart parser)
            return refused(BadRequest(f"malformed request: {type(exc).__name__}: {exc}"), form)
        return HTMLResponse(_page(state, _results(state, result, tag, text), form=form))

    routes = [
        Route("/", home),
        Route("/search", search, methods=["POST"]),
        Route("/image/{path:path}", image),
        Route("/thumb/{path:path}", thumb),
    ]
    return Starlette(routes=routes)


def _data_uri(data: bytes) -> str:
    """A small JPEG of an uploaded image, inline (uploads are never stored or served)."""
    import base64

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((_THUMB, _THUMB))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _search_upload(state: DemoState, data: bytes, suffix: str, text: str, k: int):
    # The search path reads the query image from a file (as `cir search` does): a private
    # temporary file, deleted at once.
    with tempfile.TemporaryDirectory(prefix="cir-demo-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        return state.search(path, text, k)


def require_demo_extra() -> None:
    """CirError naming the extra when the demo's libraries are missing."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
        missing.append("python-multipart")
    if missing:
        raise CirError(
            f"`cir demo` needs {', '.join(missing)}: pip install 'cir-cli[demo]' "
            "(or pip install -e '.[demo]' in a checkout)"
        )


def check_port(host: str, port: int) -> None:
    """CirError when `host:port` cannot be bound (checked before the model is loaded)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CirError(f"--host {host!r}: not an address of this machine ({exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise CirError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port"
            ) from None


def serve(state: DemoState, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the demo until interrupted."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")
