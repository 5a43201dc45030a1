"""torchrun support: process group setup, rank helpers and the gradient-carrying all-gather.

The same `cir finetune` command runs on one CPU, one GPU or `torchrun --nproc-per-node N`:
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) switches DistributedDataParallel on,
with nccl on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cir_cli.errors import CirError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None) -> torch.device:
    """`--device`: cpu, cuda, cuda:N or auto (CUDA when available), checked against the machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CirError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CirError(f"--device {device}: CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise CirError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise CirError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    return resolved


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; return rank info and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank), device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks (rank order); gradients flow back to each owner.

    Used by contrastive losses so every rank's queries see the global batch of targets. Every
    rank must hold the same number of rows (the GlobalBatchSampler guarantees it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def global_batch(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows of all ranks, gathered with gradients; the index of each local row in them).

    One process: (local, arange(B)). Under torchrun rank k's rows sit at k*B .. k*B + B - 1.
    """
    all_rows = gather_with_grad(local)
    offset = 0
    if all_rows.shape[0] != local.shape[0]:
        offset = dist.get_rank() * local.shape[0]
    return all_rows, torch.arange(local.shape[0], device=local.device) + offset
