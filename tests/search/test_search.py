"""`cir index` / `cir search` (issue 8): agreement with `cir validate`, incremental updates,
the HTML contact sheet (and its Chromium screenshot), and one-line errors for bad indexes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_cli import api
from cir_cli import search as lib
from cir_cli.cli import app
from cir_cli.errors import CirError
from cir_cli.metrics import CIRR_KS
from cir_cli.recipes import load_recipe
from tests.conftest import REPO, toy_overrides

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, ["-q", *args], catch_exceptions=True)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip() if result.stderr else result.output.strip()
    assert "Traceback" not in result.output
    assert text.startswith("error:"), text
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


@pytest.fixture(scope="module")
def recipe(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("search_runs")
    return load_recipe("toy_clip4cir", toy_overrides(toy_root, out))


@pytest.fixture(scope="module")
def model(recipe):
    # Untrained (seeded random init): the point is that the two paths agree, not the numbers.
    return api.load_model(recipe, device="cpu")


@pytest.fixture(scope="module")
def val_index(toy_root: Path, recipe, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "val.cirindex"
    summary = lib.build_index(toy_root / "dev", recipe, out, model=model, num_workers=0)
    assert summary.total == 648 and not summary.skipped
    return out


def val_queries(recipe) -> tuple[list[lib.Query], object]:
    split = api.load_eval_splits(recipe)[0]
    texts = split.texts()
    queries = [
        lib.Query(split.image_paths[t.reference], text, split.image_paths[t.target])
        for t, text in zip(split.triplets, texts, strict=True)
    ]
    return queries, split


# ---------------------------------------------------------------------------------------------
# 1. the search path agrees with `cir validate`


def test_search_agrees_with_validate(recipe, model, val_index: Path, tmp_path: Path) -> None:
    """Same model, val gallery folder, val queries, reference excluded (CIRR protocol)."""
    evaluation = api.validate(model, recipe, use_cache=False)
    expected = evaluation.splits[0].recall
    queries, split = val_queries(recipe)
    index = lib.load_index(val_index)
    results = lib.search(index, model, queries, k=50, exclude_query=True)
    got = lib.recall_at(results, CIRR_KS)
    assert got == pytest.approx(expected, abs=1e-9)
    # Stronger than equal recalls: the same top-50 list for every query.
    top50 = evaluation.rankings()
    for t, result in zip(split.triplets, results, strict=True):
        assert [h.path.stem for h in result.hits] == top50[t.query_id]

    # The CLI batch path (model rebuilt from the index's recipe) gives the same rows.
    csv_file = tmp_path / "queries.csv"
    lines = ["image,text,target"] + [
        f"{q.image},{json.dumps(q.text)},{q.target}" for q in queries[:20]
    ]
    csv_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rows.jsonl"
    result = cli(
        "search", str(val_index), "--queries", str(csv_file), "-k", "50",
        "--exclude-query", "--output", str(out),
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20
    for t, row in zip(split.triplets, rows, strict=False):
        assert [Path(r["path"]).stem for r in row["results"]] == top50[t.query_id]
    subset = lib.recall_at(results[:20], (10,))
    assert f"R@10 {subset[10]:.2f}" in result.output


def test_exclude_query_and_json(model, val_index: Path, toy_root: Path) -> None:
    image = sorted((toy_root / "dev").glob("*.png"))[3]
    index = lib.load_index(val_index)
    plain = lib.search(index, model, [lib.Query(image, "")], k=648)[0]
    assert [h.rank for h in plain.hits] == list(range(1, 649)) and image in [
        h.path for h in plain.hits
    ]
    args = ["search", str(val_index), "--image", str(image), "--text", "", "-k", "648", "--json"]
    excluded = cli(*args, "--exclude-query")
    assert excluded.exit_code == 0, excluded.output
    payload = json.loads(excluded.stdout)
    assert payload["text"] == "" and payload["image"] == str(image)
    assert [h["path"] for h in payload["results"]] == [
        str(h.path) for h in plain.hits if h.path != image
    ]
    # --backend faiss gives the same list when faiss is installed, one clear line otherwise.
    with_faiss = cli(*args, "--exclude-query", "--backend", "faiss")
    if lib.faiss_available():
        got = json.loads(with_faiss.stdout)["results"]
        assert [h["path"] for h in got] == [h["path"] for h in payload["results"]]
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in payload["results"]])
    else:
        assert_one_line_error(with_faiss, "faiss is not installed")


# ---------------------------------------------------------------------------------------------
# 2. --update re-encodes exactly the new and changed files


def _count_encodes(model, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = model.image_representation

    def counting(pixels):
        calls.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(model, "image_representation", counting)
    return calls


def test_update_reencodes_only_changes(
    toy_root: Path, recipe, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = sorted((toy_root / "dev").glob("*.png"))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(source[:10]):
        shutil.copy(path, folder / ("sub" if i % 2 else "") / path.name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "photos.cirindex"
    calls = _count_encodes(model, monkeypatch)
    built = lib.build_index(folder, recipe, out, model=model, num_workers=0, batch_size=4)
    assert sum(calls) == 10 and built.total == 10
    before = lib.load_index(out)
    old_rows = {e.path: before.features[i].copy() for i, e in enumerate(before.files)}
    del before

    files = sorted(p for p in folder.rglob("*.png"))
    deleted, changed = files[0], files[1]
    deleted.unlink()
    shutil.copy(source[20], changed)  # different content (size and mtime change too)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    for path in source[11:13]:
        shutil.copy(path, folder / "sub" / path.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    calls.clear()
    summary = lib.update_index(folder, out, model=model, num_workers=0, batch_size=4)
    rel = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    new = sorted([rel(changed)] + [f"sub/{p.name}" for p in source[11:13]])
    assert sum(calls) == 3 and sorted(summary.encoded) == new
    assert summary.removed == [rel(deleted)]
    assert [p for p, _ in summary.skipped] == ["broken.jpg"]
    assert summary.kept == 8 and summary.total == 11

    after = lib.load_index(out)
    assert [e.path for e in after.files] == sorted(rel(p) for p in folder.rglob("*.png"))
    assert [e.path for e, _ in after.skipped] == ["broken.jpg"]
    assert len(list(out.glob("features-*.npy"))) == 1  # the old features file is gone
    fresh = lib.build_index(folder, recipe, tmp_path / "fresh.cirindex", model=model,
                            num_workers=0)
    np.testing.assert_allclose(after.features, lib.load_index(fresh.location).features,
                               atol=1e-6)
    for i, entry in enumerate(after.files):
        if entry.path in old_rows and entry.path not in new:
            np.testing.assert_array_equal(after.features[i], old_rows[entry.path])

    calls.clear()
    again = lib.update_index(folder, out, model=model, num_workers=0)
    assert sum(calls) == 0 and not again.encoded and again.kept == 11 and not again.removed

    # The CLI reports the update and lists the unreadable file (names are not rich markup).
    (folder / "sub" / source[14].name).write_bytes(source[14].read_bytes())
    (folder / "[b]bad.png").write_bytes(b"\x89PNG broken")
    result = cli("index", str(folder), "--update", str(out), "--num-workers", "0")
    assert result.exit_code == 0, result.output
    assert "1 encoded" in result.output and "11 unchanged" in result.output
    assert "1 skipped" in result.output and "[b]bad.png" in result.output


# ---------------------------------------------------------------------------------------------
# 3. the HTML contact sheet (and a Chromium screenshot of it)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_html_is_self_contained(recipe, model, val_index: Path, tmp_path: Path) -> None:
    queries, _ = val_queries(recipe)
    index = lib.load_index(val_index)
    results = lib.search(index, model, queries[:2], k=6, exclude_query=True)
    page = lib.render_html(results, tmp_path / "out.html", title="toy <search>")
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 2 * (1 + 6)
    assert "toy &lt;search&gt;" in text and queries[0].text.replace("'", "&#x27;") in text
    # Nothing outside the file is referenced: no links, scripts or file/http URLs.
    for needle in ("http://", "https://", "file:", "<script", "<link"):
        assert needle not in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(
    recipe, model, val_index: Path, tmp_path: Path
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "html_screenshot", REPO / "scripts" / "html_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    queries, _ = val_queries(recipe)
    results = lib.search(lib.load_index(val_index), model, queries[:1], k=12, exclude_query=True)
    page = lib.render_html(results, tmp_path / "page.html")
    png = module.screenshot(page, tmp_path / "page.png", width=1200, height=900)
    assert _png_size(png) == (1200, 900)
    # Not a blank page: decode the PNG's pixels and look for many distinct colours.
    assert module.distinct_colours(png) > 50


# ---------------------------------------------------------------------------------------------
# 4. mismatched recipe/checkpoint and corrupt indexes: one line, exit 2


def test_mismatched_recipe_or_checkpoint(val_index: Path, toy_root: Path, tmp_path: Path) -> None:
    image = str(next((toy_root / "dev").glob("*.png")))
    args = ["search", str(val_index), "--image", image, "--text", "x"]
    assert_one_line_error(
        cli(*args, "--recipe", "toy_clip4cir", "--set", 'backbone.arch="cir-tiny-rn"'),
        "recipe mismatch", "backbone.arch", "cir-tiny-rn",
    )
    # Keys that do not change the features (output dir, batch sizes) are not a mismatch.
    same = cli(*args, "--recipe", "toy_clip4cir", "--set", "eval.batch_size=3")
    assert same.exit_code == 0, same.output
    assert "rank" in same.output and "score" in same.output  # the rich table
    fake = tmp_path / "other.pt"
    fake.write_bytes(b"x")
    assert_one_line_error(cli(*args, "--checkpoint", str(fake)), "checkpoint mismatch")


def test_changed_checkpoint_is_refused(
    toy_root: Path, recipe, model, tmp_path: Path
) -> None:
    from cir_cli.checkpoints import save_seed_checkpoint

    ckpt = tmp_path / "tuned.pt"
    save_seed_checkpoint(ckpt, "CLIP", model.backbone.model.state_dict(), epoch=1)
    folder = tmp_path / "few"
    folder.mkdir()
    for path in sorted((toy_root / "dev").glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "few.cirindex"
    lib.build_index(folder, recipe, out, checkpoint=ckpt, num_workers=0)
    image = str(next(folder.glob("*.png")))
    args = ["search", str(out), "--image", image, "--text", "x", "-k", "2"]
    assert cli(*args).exit_code == 0
    save_seed_checkpoint(ckpt, "CLIP", model.backbone.model.state_dict(), epoch=2)
    assert_one_line_error(cli(*args), "checkpoint mismatch", "SHA1", "rebuild")


def test_corrupt_index(val_index: Path, toy_root: Path, tmp_path: Path) -> None:
    image = str(next((toy_root / "dev").glob("*.png")))
    broken = tmp_path / "broken.cirindex"
    shutil.copytree(val_index, broken)
    args = ["search", str(broken), "--image", image, "--text", "x"]
    features = next(broken.glob("features-*.npy"))
    features.write_bytes(features.read_bytes()[:1000])  # truncated
    assert_one_line_error(cli(*args), "corrupt index", features.name)
    (broken / "manifest.json").write_text('{"format": "cir-index", "versi')
    assert_one_line_error(cli(*args), "corrupt index", "manifest.json")
    (broken / "manifest.json").write_text(json.dumps({"format": "cir-index", "version": 1}))
    assert_one_line_error(cli(*args), "corrupt index")
    assert_one_line_error(cli("search", str(tmp_path), "--image", image, "--text", "x"),
                          "not a cir index")
    assert_one_line_error(cli("search", str(tmp_path / "nope"), "--image", image, "--text", "x"),
                          "index not found")
    missing = str(tmp_path / "no.jpg")
    assert_one_line_error(cli("search", str(val_index), "--image", missing, "--text", "x"),
                          f"query image {missing} not found")


# ---------------------------------------------------------------------------------------------
# small pieces


def test_read_queries_formats(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_text('a.jpg,"make it, red"\nsub/b.png,bigger,t.png\n')
    qs = lib.read_queries(tmp_path / "q.csv")
    assert qs[0] == lib.Query(tmp_path / "a.jpg", "make it, red")
    assert qs[1].target == tmp_path / "t.png"
    (tmp_path / "q.jsonl").write_text('{"image": "/x/a.jpg", "text": "t"}\n\n')
    assert lib.read_queries(tmp_path / "q.jsonl") == [lib.Query(Path("/x/a.jpg"), "t")]
    (tmp_path / "q.json").write_text('[{"image": "a.jpg", "text": "t", "target": "b.jpg"}]')
    assert lib.read_queries(tmp_path / "q.json")[0].target == tmp_path / "b.jpg"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(CirError, match=r"bad.jsonl:1: needs an 'image' path and a 'text'"):
        lib.read_queries(tmp_path / "bad.jsonl")


def test_faiss_backend_matches_torch() -> None:
    pytest.importorskip("faiss")
    import torch

    from cir_cli.ranking import rank_gallery

    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(3000, 32, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(5, 32, generator=gen), dim=-1)
    exclude = torch.tensor([0, -1, 7, 2999, -1])
    for excl in (exclude, None):
        ref = rank_gallery(queries, gallery, 20, exclude=excl)
        indices, scores = lib.rank_faiss(queries, gallery, 20, excl)
        assert torch.equal(indices, ref.indices)
        torch.testing.assert_close(scores, ref.scores)


def test_target_rank_beyond_k(recipe, model, val_index: Path) -> None:
    """A target outside the top k gets its rank in the whole gallery (issue 14): the same as
    its position in a full (k = gallery) ranking."""
    queries, _ = val_queries(recipe)
    queries = queries[:40]
    index = lib.load_index(val_index)
    short = lib.search(index, model, queries, k=5, exclude_query=True)
    full = lib.search(index, model, queries, k=648, exclude_query=True)
    beyond = 0
    for s, f in zip(short, full, strict=True):
        assert s.gallery_rank == f.target_rank  # full list: the target's position
        assert s.target_rank == (s.gallery_rank if s.gallery_rank <= 5 else None)
        beyond += s.gallery_rank > 5
    assert beyond > 0  # the untrained model misses most targets: the case is exercised
    q = next(q for q, s in zip(queries, short, strict=True) if s.gallery_rank > 5)
    rank = next(s.gallery_rank for q2, s in zip(queries, short, strict=True) if q2 is q)
    result = cli(
        "search", str(val_index), "--image", str(q.image), "--text", q.text,
        "--target", str(q.target), "-k", "5", "--exclude-query",
    )
    assert result.exit_code == 0, result.output
    assert f"target {q.target.name}: rank {rank} of 648 (outside the top 5)" in result.output


def test_index_dry_run_imports_no_model_library(toy_root: Path, tmp_path: Path) -> None:
    """`cir index --dry-run` reads the search package (image suffixes): importing it pulls in
    neither torch nor a model library, which is why search/ imports them inside functions."""
    code = (
        "import sys\n"
        "from cir_cli.cli import main\n"
        f"sys.argv = ['cir', 'index', '{toy_root / 'dev'}', '--recipe', 'toy_clip4cir', "
        f"'--out', '{tmp_path / 'x.cirindex'}', '--dry-run', '--set', "
        f"'data.root=\"{toy_root}\"']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'PIL') "
        "if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "image file(s)" in proc.stdout and "EXIT 0" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
