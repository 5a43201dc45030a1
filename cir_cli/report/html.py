"""The self-contained HTML page of `cir validate --report` (no torch; data from report.audit).

Every image is an inline base64 JPEG thumbnail and the CSS is inline, so the page opens anywhere
without the dataset. Every piece of text from the data (captions, ids, file names) goes through
html.escape, as the `cir search --html` sheet does: a caption may hold `<script>`.

DOM contract (tests/report/test_report.py checks it in a real browser):
* ``section.split[data-split]`` per split; inside ``article.query`` per shown query with
  ``data-rank`` (the target's 1-based rank) and ``data-query-id``;
* ``img.thumb`` for every thumbnail; ``figure.target`` outlines the true target (among the top-k,
  or an extra ``figure.target.outside`` tile labelled with its rank when it is not);
* ``#metrics`` (headline table), ``#audit`` (modality table), ``.hist`` (rank histogram).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cir_cli.data import DATASETS
from cir_cli.io import write_text_atomic
from cir_cli.report.audit import AUDIT_KS, QueryRecord, SplitReport

esc = html.escape

# Upper edges of the rank histogram's bins (a last bin takes everything above).
_HIST_EDGES = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;
background:#f6f7f9;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:0 0 10px} h3{font-size:15px;
margin:14px 0 8px} .meta{color:#666;font-size:13px;margin-bottom:8px}
section.block{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;
margin-bottom:18px}
table{border-collapse:collapse;font-size:14px} th,td{border:1px solid #ddd;padding:4px 10px;
text-align:right} th{background:#f0f2f5} td.l,th.l{text-align:left}
.hist{display:grid;grid-template-columns:90px 1fr 60px;gap:3px 8px;align-items:center;
font-size:13px;max-width:720px}
.bar{background:#3a6ee8;height:16px;border-radius:3px;min-width:1px}
.cards{display:flex;flex-direction:column;gap:10px}
article.query{border:1px solid #e2e2e2;border-radius:6px;padding:8px;display:flex;gap:12px;
background:#fcfcfc}
.ref{flex:0 0 130px;font-size:12px;overflow-wrap:anywhere}
.ref img{width:120px;height:120px;object-fit:contain;background:#eee;border:3px solid #3a6ee8;
border-radius:6px;display:block}
.body{flex:1;min-width:0} .text{font-size:16px;margin-bottom:4px;overflow-wrap:anywhere}
.text b{color:#3a6ee8}
.row{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:70px;background:#fafafa;border:1px solid #e2e2e2;border-radius:5px;
padding:3px;font-size:10px}
figure img{width:64px;height:64px;object-fit:contain;background:#eee;display:block}
figure.target{border:3px solid #1a9c46;padding:1px}
figure.outside{border-style:dashed;margin-left:10px}
figcaption{overflow-wrap:anywhere}
.missing{width:64px;height:64px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#999}
.lost{color:#b3261e;font-weight:bold} .good{color:#1a9c46}
"""


class _Thumbs:
    """Thumbnails as data: URIs, each file read once per page."""

    def __init__(self, paths: Mapping[str, Path], size: int) -> None:
        self.paths, self.size, self.memo = paths, size, {}

    def tag(self, name: str, alt: str) -> str:
        from cir_cli.search.html import thumbnail_uri

        if name not in self.memo:
            path = self.paths.get(name)
            self.memo[name] = thumbnail_uri(Path(path), self.size) if path else None
        uri = self.memo[name]
        if uri is None:
            return f'<div class="missing" title="{esc(name)}">?</div>'
        return f'<img class="thumb" src="{uri}" alt="{esc(alt)}">'


def histogram_bins(ranks: Sequence[int], gallery_size: int) -> list[tuple[str, int]]:
    """(label, count) per bin of 1-based ranks: 1, 2-5, 6-10, 11-50, ... up to the gallery."""
    edges = [e for e in _HIST_EDGES if e < gallery_size] + [max(gallery_size, 1)]
    bins, low = [], 1
    for high in edges:
        label = str(high) if high == low else f"{low}-{high}"
        bins.append((label, sum(low <= r <= high for r in ranks)))
        low = high + 1
    return bins


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def _metrics_table(metrics: Mapping[str, float], reports: Sequence[SplitReport]) -> str:
    # The dataset's layout (its DatasetSpec), when the metrics it needs are there.
    spec = DATASETS.get(reports[0].dataset) if reports else None
    grid_ks = spec.report_grid_ks if spec else ()
    averages = [f"average_recall_at{k}" for k in grid_ks]
    if grid_ks and all(key in metrics for key in averages):
        rows = [
            f'<tr><td class="l">{esc(r.category)}</td>'
            + "".join(f"<td>{_fmt(r.recall.get(k, 0))}</td>" for k in grid_ks)
            + "</tr>"
            for r in reports
        ]
        rows.append(
            '<tr><td class="l"><b>average</b></td>'
            + "".join(f"<td><b>{_fmt(metrics[key])}</b></td>" for key in averages)
            + "</tr>"
        )
        ats = " + ".join(f"R@{k}" for k in grid_ks)
        return (
            '<table class="grid"><tr><th class="l">category</th>'
            + "".join(f"<th>R@{k}</th>" for k in grid_ks)
            + "</tr>"
            + "".join(rows)
            + "</table>"
            + f'<p class="meta">average recall ({ats}) / {len(grid_ks)}: '
            f"<b>{_fmt(metrics['average_recall'])}</b></p>"
        )
    headline = spec.report_headline if spec else ()
    if headline and all(key in metrics for key, _ in headline):
        keys = [key for key, _ in headline]
        heads = [head for _, head in headline]
        return (
            '<table class="grid"><tr>'
            + "".join(f"<th>{h}</th>" for h in heads)
            + "</tr><tr>"
            + "".join(f"<td>{_fmt(metrics[k])}</td>" for k in keys)
            + "</tr></table>"
        )
    cells = "".join(
        f'<tr><td class="l">{esc(k)}</td><td>{_fmt(v)}</td></tr>' for k, v in metrics.items()
    )
    return f'<table><tr><th class="l">metric</th><th>value</th></tr>{cells}</table>'


def _audit_table(audit: Mapping[str, Any], worst_n: int) -> str:
    if not audit:
        return '<p class="meta">No per-query ranks on this split (no single targets).</p>'
    head = ['<th class="l">split</th>', "<th>queries</th>"]
    kinds = ("composed", "image", "text")
    for kind in kinds:
        head += [f"<th>{kind} R@{k}</th>" for k in AUDIT_KS]
    head += ["<th>image beats composed</th>", "<th>text beats composed</th>"]
    head.append(f'<th class="l">worst {worst_n} lost to one modality</th>')
    rows = []
    for label, row in audit.items():
        cells = [f'<td class="l">{esc(label)}</td>', f"<td>{row['queries']}</td>"]
        for kind in kinds:
            for k in AUDIT_KS:
                value = row[kind][f"solved_at{k}"] if kind in row else "n/a"
                cells.append(f"<td data-kind='{kind}' data-k='{k}'>{value}</td>")
        for kind in ("image", "text"):
            cells.append(f"<td>{row[kind]['beats_composed'] if kind in row else 'n/a'}</td>")
        lost = row["worst_lost_to_single_modality"]
        names = ", ".join(f"{esc(x['query_id'])} ({'+'.join(x['lost_to'])})" for x in lost)
        cells.append(f'<td class="l">{len(lost)}{": " + names if names else ""}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="audit-table"><tr>{"".join(head)}</tr>{"".join(rows)}</table>'


def _histogram(report: SplitReport) -> str:
    bins = histogram_bins([r.rank for r in report.ranked], report.gallery_size)
    top = max((c for _, c in bins), default=0) or 1
    parts = ['<div class="hist">']
    for label, count in bins:
        width = 100.0 * count / top
        parts.append(
            f'<div>rank {esc(label)}</div><div><div class="bar" data-count="{count}" '
            f'style="width:{width:.1f}%"></div></div><div>{count}</div>'
        )
    parts.append("</div>")
    return "".join(parts)


def _card(rec: QueryRecord, report: SplitReport, thumbs: _Thumbs, top_k: int) -> str:
    rank = rec.rank
    parts = [
        f'<article class="query" data-query-id="{esc(rec.query_id)}" data-rank="{rank}">',
        f'<div class="ref">{thumbs.tag(rec.reference, "reference " + rec.reference)}',
        f"<div>{esc(rec.reference)}</div></div>",
        '<div class="body">',
        f'<div class="text"><b>+</b> &ldquo;{esc(rec.text)}&rdquo;</div>',
    ]
    where = f"in the top-{top_k}" if rank is not None and rank <= top_k else "outside the top-k"
    info = f"query {esc(rec.query_id)} &middot; target {esc(str(rec.target))}: rank {rank}"
    info += f" ({where})"
    if rec.modality_ranks:
        alone = []
        for kind, r in rec.modality_ranks.items():
            cls = ' class="lost"' if rank is not None and r < rank else ""
            alone.append(f"<span{cls}>{kind} alone: rank {r}</span>")
        info += " &middot; " + ", ".join(alone)
    parts.append(f'<div class="meta">{info}</div><div class="row topk">')
    for pos, name in enumerate(rec.top, 1):
        cls = "hit target" if name == rec.target else "hit"
        parts.append(
            f'<figure class="{cls}">{thumbs.tag(name, name)}'
            f"<figcaption>#{pos} {esc(name)}</figcaption></figure>"
        )
    if rec.target is not None and rec.target not in rec.top:
        parts.append(
            f'<figure class="hit target outside">{thumbs.tag(rec.target, rec.target)}'
            f"<figcaption>target, rank {rank}<br>{esc(rec.target)}</figcaption></figure>"
        )
    parts.append("</div>")
    if rec.group_top:
        parts.append('<div class="meta">its group, as the model ranks it:</div>')
        parts.append('<div class="row group">')
        for pos, name in enumerate(rec.group_top, 1):
            cls = "member target" if name == rec.target else "member"
            parts.append(
                f'<figure class="{cls}">{thumbs.tag(name, name)}'
                f"<figcaption>#{pos} {esc(name)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</div></article>")
    return "".join(parts)


def _split_section(report: SplitReport, n: int, top_k: int, thumb_size: int) -> str:
    thumbs = _Thumbs(report.image_paths, thumb_size)
    recalls = ", ".join(f"R@{k} {_fmt(v)}" for k, v in report.recall.items())
    if report.subset_recall:
        recalls += "; group " + ", ".join(
            f"R@{k} {_fmt(v)}" for k, v in report.subset_recall.items()
        )
    parts = [
        f'<section class="block split" data-split="{esc(report.label)}">',
        f"<h2>{esc(report.label)}</h2>",
        f'<div class="meta">{len(report.records)} queries, gallery of {report.gallery_size} '
        f"images &middot; {esc(recalls)}</div>",
    ]
    if not report.ranked:
        parts.append('<p class="meta">No single target per query: no per-query view.</p>')
        parts.append("</section>")
        return "".join(parts)
    parts.append("<h3>Rank of the target</h3>" + _histogram(report))
    for title, records, cls in (
        (f"The {n} worst queries", report.worst(n), "worst"),
        (f"The {n} best queries", report.best(n), "best"),
    ):
        parts.append(f'<h3>{title}</h3><div class="cards {cls}">')
        parts.extend(_card(r, report, thumbs, top_k) for r in records)
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def render_report(
    out: str | os.PathLike[str],
    metrics: Mapping[str, float],
    reports: Sequence[SplitReport],
    audit: Mapping[str, Any],
    title: str,
    subtitle: str = "",
    n: int = 8,
    top_k: int = 10,
    thumb_size: int = 128,
) -> Path:
    """Write the report page atomically; returns its path."""
    from cir_cli.search.html import html_page_head

    parts = [
        *html_page_head(title, subtitle, _CSS),
        '<section class="block" id="metrics"><h2>Headline metrics</h2>',
        _metrics_table(metrics, reports),
        "</section>",
        '<section class="block" id="audit"><h2>Modality audit</h2>',
        '<p class="meta">How many queries the same model already solves from one modality '
        "alone: <i>image</i> = the reference image's own feature as the query, <i>text</i> = "
        "the caption's feature as the query (same gallery, same protocol). A high count means "
        "the benchmark split does not need composition there. The reference is dropped from the "
        "gallery only where the benchmark's protocol drops it (CIRR); elsewhere (FashionIQ) the "
        "image alone mostly finds the reference itself first.</p>",
        _audit_table(audit, n),
        "</section>",
    ]
    parts.extend(_split_section(r, n, top_k, thumb_size) for r in reports)
    parts.append("</body></html>\n")
    path = Path(out).expanduser()
    write_text_atomic(path, "\n".join(p for p in parts if p))
    return path
