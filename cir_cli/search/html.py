"""Self-contained HTML: the search contact sheet, and the thumbnail and page head that the
report (report/html.py) and the demo (demo/app.py) share with it."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cir_cli.io import write_text_atomic

if TYPE_CHECKING:
    from cir_cli.search.queries import QueryResult


def thumbnail_jpeg(path: Path, size: int) -> bytes | None:
    """A JPEG of `path` fitted into size x size (None when the file cannot be read any more)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a deleted/broken file becomes a placeholder tile
        return None
    return buf.getvalue()


def thumbnail_uri(path: Path, size: int) -> str | None:
    """thumbnail_jpeg as a data: URI, for pages that must open without the original files."""
    jpeg = thumbnail_jpeg(path, size)
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(
        "ascii"
    )


def html_page_head(title: str, subtitle: str, css: str) -> list[str]:
    """The opening of a self-contained page (inline CSS), title and subtitle escaped."""
    esc = html.escape
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{css}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="meta">{esc(subtitle)}</div>' if subtitle else "",
    ]


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;
background:#f6f7f9;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin-bottom:16px}
section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;margin-bottom:18px}
.query{display:flex;gap:16px;align-items:center;margin-bottom:12px}
.query img{width:160px;height:160px;object-fit:contain;background:#eee;border:3px solid #3a6ee8;
border-radius:6px}
.text{font-size:18px} .text b{color:#3a6ee8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
figure{margin:0;background:#fafafa;border:1px solid #e2e2e2;border-radius:6px;padding:6px}
figure.target{border:3px solid #1a9c46}
figure img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.missing{width:100%;aspect-ratio:1;background:#eee;display:flex;align-items:center;
justify-content:center;color:#999}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}
.rank{font-weight:bold} .score{color:#666}
"""


def render_html(
    results: Sequence[QueryResult],
    out: str | os.PathLike[str],
    title: str = "cir search",
    thumb_size: int = 256,
    subtitle: str = "",
) -> Path:
    """A self-contained HTML contact sheet: per query, the image, the text and the top-k hits.

    Every image is inlined as a base64 JPEG thumbnail, and the CSS is inline, so the page opens
    anywhere (mail it, open it from another machine) without the original files.
    """
    esc = html.escape
    parts = html_page_head(title, subtitle, _CSS)
    for qi, result in enumerate(results, 1):
        q = result.query
        uri = thumbnail_uri(q.image, thumb_size)
        img = f'<img src="{uri}" alt="query image">' if uri else '<div class="missing">?</div>'
        parts.append(f'<section><div class="query">{img}<div>')
        parts.append(f'<div class="meta">query {qi}: {esc(str(q.image))}</div>')
        parts.append(f'<div class="text"><b>+</b> &ldquo;{esc(q.text)}&rdquo;</div>')
        if q.target is not None:
            found = f"rank {result.target_rank}" if result.target_rank else "not in the top-k"
            parts.append(f'<div class="meta">target {esc(q.target.name)}: {found}</div>')
        parts.append('</div></div><div class="grid">')
        target_row = str(q.target.resolve()) if q.target is not None else None
        for hit in result.hits:
            uri = thumbnail_uri(hit.path, thumb_size)
            tile = (
                f'<img src="{uri}" alt="{esc(hit.path.name)}" loading="eager">'
                if uri
                else '<div class="missing">missing</div>'
            )
            cls = ' class="target"' if target_row and str(hit.path.resolve()) == target_row else ""
            parts.append(
                f'<figure{cls}>{tile}<figcaption><span class="rank">#{hit.rank}</span> '
                f'<span class="score">{hit.score:.3f}</span><br>{esc(hit.path.name)}'
                "</figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    out_path = Path(out).expanduser()
    write_text_atomic(out_path, "\n".join(p for p in parts if p))
    return out_path
