"""The contrastive loss the methods' training stages share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cir_cli.engine.distributed import global_batch


def contrastive_loss(queries: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """CE over the batch: query i must pick target i among all targets of the global batch.

    `queries` and `targets` are the normalised local rows; under torchrun the targets of all
    ranks are gathered (with gradients), so N processes optimise the same loss as one.
    """
    all_targets, labels = global_batch(targets)
    return F.cross_entropy(scale * queries @ all_targets.T, labels)
