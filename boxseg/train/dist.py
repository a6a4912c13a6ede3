"""DDP helpers: the same code runs in one process or under torchrun (rank 0 writes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (no-op otherwise)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        tdist.init_process_group(backend)


def rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def wrap(model: torch.nn.Module, device: torch.device, sync_batch_norm: bool = False) -> torch.nn.Module:
    """DDP around `model` in a process group (the module itself otherwise). With
    `sync_batch_norm`, batch-norm statistics are computed over the global batch (the layers
    are converted in place, so the returned module's inner one is still `model`)."""
    if rank_world()[1] == 1:
        return model
    if sync_batch_norm:
        for name, child in list(model.named_children()):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shutdown() -> None:
    """Leave the process group (a no-op in one process)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def mean(t: torch.Tensor) -> torch.Tensor:
    """All-reduced mean of a scalar across ranks (identity in one process)."""
    if rank_world()[1] == 1:
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / rank_world()[1]


def barrier() -> None:
    if rank_world()[1] > 1:
        tdist.barrier()


def gather(obj: object) -> list:
    """Every rank's `obj`, in rank order (on every rank); [obj] in one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list = [None] * world
    tdist.all_gather_object(out, obj)
    return out
