"""Building blocks the methods' training tasks share (datasets, losses, parameter groups)."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cir_cli.data.base import CIRSplit, caption_variants, query_text
from cir_cli.data.images import open_image
from cir_cli.engine.distributed import gather_with_grad


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


def contrastive_loss(queries: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """CE over the batch: query i must pick target i among all targets of the global batch.

    `queries` and `targets` are the normalised local rows; under torchrun the targets of all
    ranks are gathered (with gradients), so N processes optimise the same loss as one.
    """
    all_targets, labels = global_batch(targets)
    return F.cross_entropy(scale * queries @ all_targets.T, labels)


def global_batch(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows of all ranks, gathered with gradients; the index of each local row in them).

    One process: (local, arange(B)). Under torchrun rank k's rows sit at k*B .. k*B + B - 1.
    """
    all_rows = gather_with_grad(local)
    offset = 0
    if all_rows.shape[0] != local.shape[0]:
        import torch.distributed as dist

        offset = dist.get_rank() * local.shape[0]
    return all_rows, torch.arange(local.shape[0], device=local.device) + offset


def named_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train right now, by their names in `model` (what checkpoints hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_named_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a subset of named parameters/buffers into `model`; every key must match exactly."""
    from cir_cli.errors import CirError

    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"unexpected keys {unknown[:10]}" + (" ..." if len(unknown) > 10 else ""))
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:10]
                )
            )
        raise CirError(f"{source}: does not fit this model: {'; '.join(parts)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))
