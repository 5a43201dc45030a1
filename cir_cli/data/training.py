"""What training reads from a dataset: per-sample caption draws and the triplet image dataset."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import Dataset

from cir_cli.data.base import CIRSplit, caption_variants, query_text
from cir_cli.data.images import open_image


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A per-sample random stream that depends only on (seed, epoch, index).

    The FashionIQ caption draw is then the same whatever the worker count, the process count
    or a resume in the middle of an epoch (the seeds used the unseeded global `random`).
    """
    return random.Random(f"{seed}:{epoch}:{index}")


def training_text(split: CIRSplit, policy: str, seed: int, epoch: int, index: int) -> str:
    return query_text(split.triplets[index], policy, rng=sample_rng(seed, epoch, index))


def text_variant(split: CIRSplit, policy: str, seed: int, epoch: int, index: int) -> int:
    """Which precomputed caption variant a sample uses this epoch (same draw as training_text)."""
    n = caption_variants(split.triplets[index], policy)
    return sample_rng(seed, epoch, index).randrange(4) if n == 4 else 0


def all_text_variants(split: CIRSplit, policy: str) -> list[list[str]]:
    """Every text a triplet can produce under `policy` (FashionIQ random join: 4)."""
    out = []
    for t in split.triplets:
        n = caption_variants(t, policy)
        out.append(
            [query_text(t, policy, variant=v) for v in range(n)]
            if n > 1
            else [query_text(t, policy)]
        )
    return out


class TripletImages(Dataset):
    """Training triplets as (reference pixels, target pixels, text), decoded in workers."""

    def __init__(self, split: CIRSplit, transform: Any, policy: str, seed: int) -> None:
        self.split = split
        self.transform = transform
        self.policy = policy
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split.triplets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        t = self.split.triplets[index]
        paths = self.split.image_paths
        ref = self.transform(open_image(paths[t.reference]))
        tgt = self.transform(open_image(paths[t.target]))
        return ref, tgt, training_text(self.split, self.policy, self.seed, self.epoch, index)


def collate_triplets(items: list[tuple[torch.Tensor, torch.Tensor, str]]):
    refs, tgts, texts = zip(*items, strict=True)
    return torch.stack(refs), torch.stack(tgts), list(texts)
