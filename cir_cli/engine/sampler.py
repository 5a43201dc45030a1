"""Deterministic, resumable, distributed batches of sample indices.

The order of epoch e is a permutation drawn from (seed, e) alone, so a resumed run replays it
exactly and can skip the batches it has already seen. Under torchrun each global batch of
`batch_size` samples is cut into `world_size` equal slices, one per rank, so N processes see
exactly the global batches one process would (what makes the 1-vs-2-process test meaningful).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class GlobalBatchSampler:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} must be divisible by the number of processes {world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        total = full if self.drop_last or rest < self.world_size else full + 1
        return max(total - self.skip, 0)

    def batches_per_epoch(self) -> int:
        saved, self.skip = self.skip, 0
        try:
            return len(self)
        finally:
            self.skip = saved

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.batch_size // self.world_size
        for b in range(self.skip, self.batches_per_epoch()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if len(batch) < self.batch_size:
                per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]
