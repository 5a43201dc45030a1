"""`cir validate --report` (issue 18): the HTML report and the modality audit.

The audit's counts are checked against an independent brute-force ranking (full score matrix,
stable sort); the page is checked in a real headless Chromium (DOM counts, the target outline,
a screenshot that is not blank) and for escaping of hostile text; the metrics are the same as a
plain `cir validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cir_cli import api
from cir_cli.cli import app
from cir_cli.recipes import load_recipe
from cir_cli.report import QueryRecord, SplitReport, render_report
from cir_cli.report.html import histogram_bins
from tests.browser import chromium_driver, distinct_colours, quit_driver
from tests.conftest import toy_overrides

N = 4  # worst and best queries shown per split
TOP_K = 10


@pytest.fixture(scope="module")
def recipe(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_recipe("toy_clip4cir", toy_overrides(toy_root, tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def validated(recipe, tmp_path_factory: pytest.TempPathFactory):
    """`cir validate --report` through the CLI on the toy (untrained, seeded model)."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    args = ["-q", "validate", "--recipe", "toy_clip4cir", "--report", str(out)]
    args += ["--report-queries", str(N)]
    for item in toy_overrides(Path(recipe.data.root), Path(recipe.output.dir)):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = Path(result.output.split("results in ")[1].split()[0])
    return out, json.loads((run_dir / "metrics.json").read_text())


def brute_force_ranks(scores: torch.Tensor, targets: list[int], exclude: list[int]) -> list[int]:
    """1-based rank of each target: full stable descending sort, excluded item dropped."""
    ranks = []
    for row, target, skip in zip(scores, targets, exclude, strict=True):
        order = [i for i in torch.sort(row, descending=True, stable=True).indices.tolist()]
        order = [i for i in order if i != skip]
        ranks.append(order.index(target) + 1)
    return ranks


def test_modality_audit_matches_brute_force(recipe, validated) -> None:
    _, metrics = validated
    audit = metrics["modality_audit"]["cirr/val"]
    model = api.load_model(recipe, device="cpu")
    split = api.load_eval_splits(recipe)[0]
    from cir_cli.data.images import open_rgb

    with torch.no_grad():
        pixels = torch.stack(
            [model.preprocess(open_rgb(split.image_paths[n])) for n in split.gallery]
        )
        gallery_raw = model.encode_images(pixels).float()
        gallery = F.normalize(gallery_raw, dim=-1)
        refs = gallery[[split.gallery_index[t.reference] for t in split.triplets]]
        texts = F.normalize(model.encode_texts(split.texts()).float(), dim=-1)
        composed = model.compose(
            gallery_raw[[split.gallery_index[t.reference] for t in split.triplets]],
            model.encode_texts(split.texts()).float(),
        )
    targets = [split.gallery_index[t.target] for t in split.triplets]
    exclude = [split.gallery_index[t.reference] for t in split.triplets]
    ranks = {
        kind: brute_force_ranks(queries @ gallery.T, targets, exclude)
        for kind, queries in (("composed", composed), ("image", refs), ("text", texts))
    }
    assert audit["queries"] == len(split.triplets) == 120
    assert audit["defined"] == ["image", "text"]
    for kind, kind_ranks in ranks.items():
        expected = {f"solved_at{k}": sum(r <= k for r in kind_ranks) for k in (1, 10)}
        if kind != "composed":
            expected["beats_composed"] = sum(
                r < c for r, c in zip(kind_ranks, ranks["composed"], strict=True)
            )
        assert audit[kind] == expected, kind
    # The same metrics as a plain validation: R@1 and R@10 from the composed counts.
    assert metrics["recall_at1"] == pytest.approx(100 * audit["composed"]["solved_at1"] / 120)
    assert metrics["recall_at10"] == pytest.approx(100 * audit["composed"]["solved_at10"] / 120)
    worst = sorted(range(120), key=lambda i: (-ranks["composed"][i], i))[:N]
    lost = [
        split.triplets[i].query_id
        for i in worst
        if min(ranks["image"][i], ranks["text"][i]) < ranks["composed"][i]
    ]
    assert [x["query_id"] for x in audit["worst_lost_to_single_modality"]] == lost


def test_report_dom_in_chromium(validated, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    page, metrics = validated
    text = page.read_text(encoding="utf-8")
    for needle in ("http://", "https://", "file:", "<script", "<link", 'src="/'):
        assert needle not in text  # self-contained: every image is inline
    driver = chromium_driver(1300, 2000)
    try:
        driver.get(page.resolve().as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, "section.split article.query")
        assert len(cards) == 2 * N
        assert len(driver.find_elements(By.CSS_SELECTOR, ".cards.worst article.query")) == N
        ranks = [int(c.get_attribute("data-rank")) for c in cards]
        assert ranks[:N] == sorted(ranks[:N], reverse=True) and ranks[N:] == sorted(ranks[N:])
        for card, rank in zip(cards, ranks, strict=True):
            top = card.find_elements(By.CSS_SELECTOR, ".topk figure")
            group = card.find_elements(By.CSS_SELECTOR, ".group figure")
            outside = rank > TOP_K
            assert len(top) == TOP_K + outside
            # Exactly one outlined target among the top-k tiles (or the extra tile), and in the
            # CIRR group row; the extra tile says the rank.
            targets = card.find_elements(By.CSS_SELECTOR, ".topk figure.target")
            assert len(targets) == 1
            if outside:
                assert "outside" in targets[0].get_attribute("class")
                assert f"rank {rank}" in targets[0].text
            else:
                assert top.index(targets[0]) == rank - 1
            assert len(card.find_elements(By.CSS_SELECTOR, ".group figure.target")) == 1
            thumbs = card.find_elements(By.CSS_SELECTOR, "img.thumb")
            assert len(thumbs) == 1 + len(top) + len(group)
            # Outlined in green (3 px), visibly.
            style = targets[0].value_of_css_property("border-top-color")
            assert style in ("rgba(26, 156, 70, 1)", "rgb(26, 156, 70)")
        decoded = driver.execute_script(
            "return [...document.querySelectorAll('img.thumb')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        assert decoded == len(driver.find_elements(By.CSS_SELECTOR, "img.thumb"))
        bars = driver.find_elements(By.CSS_SELECTOR, ".hist .bar")
        assert sum(int(b.get_attribute("data-count")) for b in bars) == 120
        audit_cells = driver.find_elements(By.CSS_SELECTOR, "#audit-table td[data-kind='image']")
        audit = metrics["modality_audit"]["cirr/val"]
        assert [c.text for c in audit_cells] == [
            str(audit["image"]["solved_at1"]),
            str(audit["image"]["solved_at10"]),
        ]
        png = tmp_path / "report.png"
        driver.save_screenshot(str(png))
        assert distinct_colours(png) > 200
    finally:
        quit_driver(driver)


def _synthetic(dataset: str, category: str, paths: dict, text: str) -> SplitReport:
    records = [
        QueryRecord(
            i, f"q{i}<x>", "ref<1>.png", f"t{i}", text, rank, [f"t{i}"] if rank == 1 else []
        )
        for i, rank in enumerate((1, 3, 60, 1, 900))
    ]
    for r in records:
        r.modality_ranks = {"image": 2, "text": 1 if r.index == 4 else 5}
    return SplitReport(
        f"{dataset}/val/{category}",
        dataset,
        category,
        1000,
        paths,
        records,
        {10: 40.0, 50: 60.0},
        {},
        ("image", "text"),
    )


def test_audit_histogram_and_escaping_by_hand(tmp_path: Path) -> None:
    from tests.conftest import tiny_png

    image = tmp_path / "x.png"
    image.write_bytes(tiny_png())
    hostile = '<script>alert(1)</script> & "quotes"'
    report = _synthetic("fashioniq", "dress", {"ref<1>.png": image}, hostile)
    audit = report.audit(worst_n=2)
    # ranks 1, 3, 60, 1, 900; image alone 2 everywhere; text alone 5 except query 4 (1).
    assert audit["composed"] == {"solved_at1": 2, "solved_at10": 3}
    assert audit["image"] == {"solved_at1": 0, "solved_at10": 5, "beats_composed": 3}
    assert audit["text"] == {"solved_at1": 1, "solved_at10": 5, "beats_composed": 2}
    lost = audit["worst_lost_to_single_modality"]  # the 2 worst: q4 (900), q2 (60)
    assert [x["query_id"] for x in lost] == ["q4<x>", "q2<x>"]
    assert lost[0]["lost_to"] == ["image", "text"] and lost[0]["text_rank"] == 1
    assert histogram_bins([1, 3, 60, 1, 900], 1000) == [
        ("1", 2),
        ("2-5", 1),
        ("6-10", 0),
        ("11-50", 0),
        ("51-100", 1),
        ("101-500", 0),
        ("501-1000", 1),
    ]
    shirt = _synthetic("fashioniq", "shirt", {}, "fine")
    metrics = {
        "dress_recall_at10": 40.0,
        "dress_recall_at50": 60.0,
        "shirt_recall_at10": 40.0,
        "shirt_recall_at50": 60.0,
        "average_recall_at10": 40.0,
        "average_recall_at50": 60.0,
        "average_recall": 50.0,
    }
    page = render_report(
        tmp_path / "r.html",
        metrics,
        [report, shirt],
        {report.label: audit},
        title="<b>t</b>",
        n=2,
    ).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;quotes&quot;" in page and 'data-query-id="q4&lt;x&gt;"' in page
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in page
    # FashionIQ headline: a category x R@10/R@50 grid with the average row.
    grid = page[page.index('<table class="grid">') : page.index("</table>")]
    assert grid.count("<tr>") == 4 and "<th>R@10</th><th>R@50</th>" in grid
    assert ">dress</td><td>40.00</td><td>60.00</td>" in grid
    # Both categories get their own section; a missing image becomes a placeholder tile.
    assert page.count('<section class="block split"') == 2
    assert 'class="missing"' in page


def test_lincir_single_modalities_are_its_baselines(tmp_path: Path) -> None:
    """LinCIR's text-alone query is its own `text_only` baseline (a second model built with
    method.text_only = true), and its image-alone query is the normalised reference feature."""
    from cir_cli.methods import build_method

    items = [
        'backbone.name="open_clip"',
        'backbone.arch="cir-tiny"',
        'backbone.pretrained=""',
        f'output.dir="{tmp_path / "runs"}"',
        f'data.root="{tmp_path / "none"}"',
    ]
    torch.manual_seed(0)
    model = build_method(load_recipe("toy_lincir", items)).eval()
    torch.manual_seed(0)
    baseline = build_method(load_recipe("toy_lincir", [*items, "method.text_only=true"])).eval()
    ref = torch.randn(2, model.backbone.feature_dim)
    texts = [("is red.", "has sleeves "), "make it a star"]
    with torch.no_grad():
        single = model.single_modality_queries(ref, texts)
        expected_text = baseline.queries_from_representation(ref, texts)
    torch.testing.assert_close(single["text"], expected_text)
    torch.testing.assert_close(single["image"], F.normalize(ref, dim=-1))
    # CIRMethod's default: no single-modality query (SPRC, CaLa): the audit says n/a.
    from cir_cli.methods.base import CIRMethod

    assert CIRMethod.single_modality_queries(model, ref, texts) == {}


def test_fashioniq_report_has_a_section_per_category(tmp_path: Path) -> None:
    """Several splits (FashionIQ categories): one section each, the category grid, the same
    metrics as `api.validate`, and an audit row per category."""
    from cir_cli.data.toy import generate_toy
    from cir_cli.report import audit_table, evaluate_with_report

    root = tmp_path / "toy_fiq"
    generate_toy(root, fmt="fashioniq", n_train_triplets=40, n_val_queries=40, n_test_queries=8)
    shapes = ["circle", "square"]  # two categories keep it quick
    overrides = toy_overrides(root, tmp_path / "runs") + [
        'data.dataset="fashioniq"', f"data.categories={json.dumps(shapes)}",
    ]
    recipe = load_recipe("toy_clip4cir", overrides)
    model = api.load_model(recipe, device="cpu")
    evaluation, reports = evaluate_with_report(model, recipe)
    assert evaluation.metrics == api.validate(model, recipe).metrics
    assert [r.category for r in reports] == shapes
    audit = audit_table(reports, 3)
    assert list(audit) == [f"fashioniq/val/{s}" for s in shapes]
    for report in reports:
        ranks = [r.rank for r in report.records]
        assert report.recall[10] == pytest.approx(100 * sum(r <= 10 for r in ranks) / len(ranks))
    page = render_report(tmp_path / "fiq.html", evaluation.metrics, reports, audit, "fiq", n=3)
    text = page.read_text()
    assert text.count('<section class="block split"') == 2
    assert text.count('<article class="query"') == 2 * 6
    grid = text[text.index('<table class="grid">') : text.index("</table>")]
    assert grid.count("<tr>") == 1 + 2 + 1 and ">square</td>" in grid


def test_report_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "nowhere" / "r.html"
    result = CliRunner().invoke(app, ["validate", "--recipe", "toy_clip4cir", "--report", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: --report") and "folder does not exist" in result.output
