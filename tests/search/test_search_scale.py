"""Galleries beyond one machine (issue 16): `cir index` under torchrun (2 gloo processes ==
1 process), the approximate faiss backend, float16 storage, bounded faiss batches."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cir_cli import search as lib
from cir_cli.cli import app
from cir_cli.ranking import rank_gallery
from cir_cli.recipes import load_recipe
from cir_cli.search import backends
from tests.conftest import toy_overrides

runner = CliRunner()
needs_faiss = pytest.mark.skipif(
    not lib.faiss_available(), reason="faiss-cpu is not installed (the test extra installs it)"
)


@pytest.fixture(scope="module")
def small_folder(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(sorted((toy_root / "dev").glob("*.png"))[:45]):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        shutil.copy(image, sub / image.name)
    (folder / "b" / "broken.png").write_bytes(b"not an image")
    return folder


def _recipe(toy_root: Path, out: Path):
    return load_recipe("toy_clip4cir", toy_overrides(toy_root, out))


def _worker(rank: int, world: int, port: int, folder: str, toy_root: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CIR_PROGRESS="0",
    )
    torch.set_num_threads(1)
    recipe = _recipe(Path(toy_root), Path(out).parent)
    summary = lib.build_index(folder, recipe, out, device="cpu", num_workers=0)
    assert summary.rank == rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two spawned processes import torch and load the model: ~1 min on 2 cores
def test_two_gloo_processes_build_the_single_process_index(
    small_folder: Path, toy_root: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    one = tmp_path / "one.cirindex"
    lib.build_index(small_folder, _recipe(toy_root, tmp_path), one, device="cpu", num_workers=0)
    two = tmp_path / "two.cirindex"
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(small_folder), str(toy_root), str(two)),
        nprocs=2,
        join=True,
    )
    a, b = lib.load_index(one), lib.load_index(two)
    assert [f.path for f in a.files] == [f.path for f in b.files]
    assert len(a.files) == 45
    assert [(f.path, r) for f, r in a.skipped] == [(f.path, r) for f, r in b.skipped]
    assert [f.path for f, _ in b.skipped] == ["b/broken.png"]
    # Each rank encodes other batches than one process does: equal up to float rounding.
    np.testing.assert_allclose(a.features, b.features, rtol=0, atol=1e-6)


@needs_faiss
def test_ann_index_float16_and_search(small_folder: Path, toy_root: Path, tmp_path: Path):
    out = tmp_path / "ann.cirindex"
    args = ["-q", "index", str(small_folder), "--recipe", "toy_clip4cir",
            *sum((["--set", o] for o in toy_overrides(toy_root, tmp_path)), []),
            "--out", str(out), "--dtype", "float16", "--ann", "ivf",
            "--ann-params", "nlist=4,nprobe=4", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = lib.load_index(out)
    assert index.features.dtype == np.float16
    spec = index.manifest["ann"]
    assert spec["kind"] == "ivf" and spec["requested"] == {"nlist": 4, "nprobe": 4}
    assert spec["params"]["nlist"] == 4 and spec["params"]["nprobe"] == 4
    assert (out / spec["file"]).is_file()
    # nprobe == nlist scans every cell: the approximate path is exact, same list as torch.
    gallery = index.feature_tensor().float()
    queries = torch.nn.functional.normalize(torch.randn(7, gallery.shape[1]), dim=1)
    exact = rank_gallery(queries, gallery, 10).indices
    approx, _ = lib.rank_faiss(queries, gallery, 10, index=index.ann_index())
    assert torch.equal(approx, exact)

    query_image = index.path_of(3)
    queries_file = tmp_path / "q.csv"
    queries_file.write_text(f"{query_image},a photo\n")
    found = runner.invoke(app, ["-q", "search", str(out), "--queries", str(queries_file),
                                "-k", "5", "--json"])
    assert found.exit_code == 0, found.output
    # Bad --ann values: one line, exit 2.
    bad = runner.invoke(app, [*args[:-6], "--ann", "ivf", "--ann-params", "nlist=x"])
    assert bad.exit_code == 2 and "nlist" in bad.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["features"]["dtype"] == "float16"


@needs_faiss
def test_update_rebuilds_the_ann_index(small_folder: Path, toy_root: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    shutil.copytree(small_folder, folder)
    out = tmp_path / "u.cirindex"
    recipe = _recipe(toy_root, tmp_path)
    lib.build_index(folder, recipe, out, device="cpu", num_workers=0, ann_kind="hnsw")
    before = lib.load_index(out)
    assert before.manifest["ann"]["params"]["m"] == 32
    (folder / "a" / sorted(os.listdir(folder / "a"))[0]).unlink()
    lib.update_index(folder, out, device="cpu", num_workers=0)
    after = lib.load_index(out)
    assert len(after.files) == len(before.files) - 1
    assert after.ann_index().ntotal == len(after.files)
    assert after.manifest["ann"]["file"] != before.manifest["ann"]["file"]
    assert not (out / before.manifest["ann"]["file"]).exists()


@needs_faiss
def test_rank_faiss_in_small_batches_equals_one_batch(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.randint(-2, 3, (300, 4), generator=gen).float()  # many exact ties
    queries = torch.randint(-2, 3, (50, 4), generator=gen).float()
    exclude = torch.randint(-1, 300, (50,), generator=gen)
    full = lib.rank_faiss(queries, gallery, 5, exclude)
    monkeypatch.setattr(backends, "_FAISS_BATCH_ELEMENTS", 1)  # one query per faiss call
    small = lib.rank_faiss(queries, gallery, 5, exclude)
    assert torch.equal(full[0], small[0]) and torch.equal(full[1], small[1])
    assert torch.equal(small[0], rank_gallery(queries, gallery, 5, exclude).indices)
