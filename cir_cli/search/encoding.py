"""Encoding gallery images into target features, skipping unreadable files.

Unlike benchmark evaluation (where a missing image is an error, data/images.py), a user's folder
may hold broken files: they are skipped, recorded and listed in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cir_cli.errors import CirError
from cir_cli.progress import progress_bar

if TYPE_CHECKING:
    from cir_cli.methods.base import CIRMethod


class _FolderImages:
    """Map-style dataset: index -> (index, pixels or None, error message)."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from cir_cli.data.images import open_image

        try:
            return index, self.transform(open_image(self.paths[index])), ""
        except CirError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any transform failure means "skip this file"
            return index, None, f"cannot read image {self.paths[index]}: {type(exc).__name__}"


def _collate(items):
    import torch

    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, err) for i, x, err in items if x is None]
    idx = [i for i, _ in good]
    pixels = torch.stack([x for _, x in good]) if good else None
    return idx, pixels, failed


def autocast(model: CIRMethod):
    """evaluation's autocast context for `model` (imported here: evaluation imports torch)."""
    from cir_cli.evaluation import _autocast

    return _autocast(model)


def encode_gallery(
    model: CIRMethod,
    paths: Sequence[Path],
    batch_size: int = 32,
    num_workers: int = 0,
    description: str = "indexing",
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Target features of image files: (features of the readable ones, their positions, errors).

    Features come from `targets_from_representation(image_representation(pixels))`, the same
    functions evaluation.evaluate_split applies to a benchmark gallery.
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = _FolderImages(paths, model.preprocess)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=_collate,
    )
    chunks: list[np.ndarray] = []
    ok: list[int] = []
    failed: dict[int, str] = {}
    was_training = model.training
    model.eval()
    with progress_bar(description, len(dataset)) as advance, torch.no_grad(), autocast(model):
        for idx, pixels, errors in loader:
            failed.update(errors)
            if pixels is not None:
                reps = model.image_representation(pixels.to(model.device))
                feats = model.targets_from_representation(reps)
                chunks.append(feats.float().cpu().numpy())
                ok.extend(idx)
            advance(len(idx) + len(errors))
    model.train(was_training)
    if chunks:
        return np.concatenate(chunks), ok, failed
    return np.empty((0,), dtype=np.float32), ok, failed
