"""One training stage: a fixed number of iterations with poly decay, atomic checkpoints,
resume, and a stop on non-finite loss.

Every sample is a pure function of (seed, stage, iteration, slot): which item, its crop and
flip come from `np.random.default_rng([seed, key])`, and the torch RNG (dropout) is reseeded
each iteration. A run resumed from a checkpoint therefore sees exactly the batches an
uninterrupted run would, and ends with bitwise the same weights on CPU.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from boxseg.faults import failpoint
from boxseg.models.checkpoint import load_state_file, save_checkpoint
from boxseg.train import dist
from boxseg.workers import foreground_worker


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class KeySampler(Sampler[int]):
    """Yields sample keys it*batch + slot for iterations start..iters-1; under DDP each rank
    takes its contiguous share of every batch, so all ranks together see the same keys as
    one process."""

    def __init__(self, start: int, iters: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.iters, self.batch, self.rank, self.world = start, iters, batch, rank, world
        self.local = batch // world

    def __iter__(self):
        for it in range(self.start, self.iters):
            base = it * self.batch + self.rank * self.local
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return (self.iters - self.start) * self.local


def poly_lambda(iters: int, power: float = 0.9) -> Callable[[int], float]:
    return lambda it: (1.0 - min(it, iters) / iters) ** power


PROGRESS_EVERY_S = 30.0  # without a terminal, a progress line this often (and at the end of a stage)


@dataclass
class Stage:
    """Where a stage lives and how long it runs."""
    name: str
    dir: Path
    iters: int
    batch: int
    checkpoint_every: int
    workers: int = 0
    position: tuple[int, int] | None = None   # (k, n): the k-th of the run's n stages
    sync_batch_norm: bool = False              # under torchrun: batch-norm statistics over the global batch

    @property
    def label(self) -> str:
        return f"stage {self.position[0]}/{self.position[1]} {self.name}" if self.position else self.name

    @property
    def final(self) -> Path:
        return self.dir / "final.pt"

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"


def run_stage(stage: Stage, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
              step: Callable[[torch.nn.Module, dict], torch.Tensor], seed: int, device: torch.device,
              progress: bool = False, log: Callable[[str], None] | None = None, meta: dict | None = None) -> torch.nn.Module:
    """Train `model` for stage.iters iterations (or load the finished stage) and return it.

    `dataset[key]` returns a dict of tensors for sample key; `step(model, batch)` returns the
    loss. The returned model is the unwrapped module, in eval mode. `meta` (boxseg.models.meta)
    is stored in final.pt so that the file alone rebuilds the network.
    """
    log = log or (lambda s: print(s, flush=True))  # flushed: seen at once in a redirected log file
    if stage.final.exists():
        model.load_state_dict(load_state_file(stage.final)["model"])
        return model.eval()
    stage.dir.mkdir(parents=True, exist_ok=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(stage.iters))
    start = 0
    if stage.last.exists():
        state = load_state_file(stage.last)
        model.load_state_dict(state["model"])
        fresh = list(scheduler.base_lrs)  # from the current config
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
        log(f"[{stage.name}] resuming at iteration {start}/{stage.iters}")
        if fresh != scheduler.base_lrs:  # e.g. lowered after the loss diverged: the new rate applies from here
            log(f"[{stage.name}] learning rate changed since the checkpoint: {scheduler.base_lrs[0]:g} -> {fresh[0]:g}")
            scheduler.base_lrs = fresh
            for group, base in zip(optimizer.param_groups, fresh):
                group["initial_lr"] = base
                group["lr"] = base * poly_lambda(stage.iters)(start)
    train_model = dist.wrap(model, device, stage.sync_batch_norm)
    train_model.train()
    rank, world = dist.rank_world()
    loader = DataLoader(dataset, batch_size=stage.batch // world, num_workers=stage.workers,
                        sampler=KeySampler(start, stage.iters, stage.batch, rank, world),
                        persistent_workers=False, pin_memory=device.type == "cuda", worker_init_fn=foreground_worker)
    metrics_path = stage.dir / "metrics.csv"
    rows = _read_rows(metrics_path, upto=start)
    from tqdm import tqdm

    bar = tqdm(total=stage.iters, initial=start, desc=stage.label, disable=not progress or rank != 0, leave=False)
    t0, it = time.perf_counter(), start
    # seconds stay cumulative over resumes, so throughput can be read from metrics.csv
    offset = float(rows[-1]["seconds"]) if rows else 0.0
    lines = rank == 0 and not progress  # no terminal (a cluster job, nohup): plain lines instead of a bar
    if lines:
        log(f"[{stage.label}] {stage.iters - start} iterations" + (f" (resuming at {start})" if start else ""))
    last_line = t0
    for it, batch in enumerate(loader, start=start):
        torch.manual_seed(seed * 1_000_003 + it)  # dropout is a function of the iteration
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = step(train_model, batch)
        loss_value = dist.mean(loss.detach())
        if not torch.isfinite(loss_value):
            good = stage.last if stage.last.exists() else None
            raise TrainingDiverged(
                f"[{stage.name}] loss became {loss_value.item()} at iteration {it}; stopped. "
                f"Last good checkpoint: {good or 'none (no checkpoint written yet)'}. Lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        failpoint(f"step:{stage.name}")
        done = it + 1
        now = time.perf_counter()
        rows.append({"iteration": done, "loss": round(float(loss_value), 6),
                     "lr": optimizer.param_groups[0]["lr"], "seconds": round(offset + now - t0, 3)})
        if lines and (now - last_line >= PROGRESS_EVERY_S or done == stage.iters):
            rate = (done - start) / max(now - t0, 1e-9)
            log(f"[{stage.label}] iteration {done}/{stage.iters}, loss {float(loss_value):.4f}, {rate:.2f} it/s, "
                f"ETA {(stage.iters - done) / rate:.0f} s")
            last_line = now
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss_value):.3f}")
        if done % stage.checkpoint_every == 0 and done < stage.iters and rank == 0:
            save_checkpoint(stage.last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "iteration": done})
            _write_rows(metrics_path, rows)
    bar.close()
    if rank == 0:
        _write_rows(metrics_path, rows)
        final = {"model": model.state_dict(), "iteration": stage.iters}
        save_checkpoint(stage.final, final if meta is None else {**final, "meta": meta})
        if stage.last.exists():
            stage.last.unlink()
        _tensorboard(stage.dir, rows)
    dist.barrier()
    return model.eval()


def _read_rows(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if int(r["iteration"]) <= upto]


def _write_rows(path: Path, rows: list[dict]) -> None:
    from boxseg.data.files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["iteration", "loss", "lr", "seconds"])
            w.writeheader()
            w.writerows(rows)


def _tensorboard(dir: Path, rows: list[dict]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return
    with SummaryWriter(str(dir / "tb")) as w:
        for r in rows:
            w.add_scalar("loss", float(r["loss"]), int(r["iteration"]))
            w.add_scalar("lr", float(r["lr"]), int(r["iteration"]))
