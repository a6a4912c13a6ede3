"""Training SegNet1 (LargeFOV) on proposals or masks: SGD with the paper's lr multipliers,
poly decay, random scale/crop/flip, cross-entropy with ignore 255."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from boxseg.config import SegNet1Config
from boxseg.data.classes import IGNORE, ClassMap
from boxseg.data.images import ImageSet
from boxseg.data.transforms import random_scale_crop
from boxseg.predict.image import normalize
from boxseg.models.largefov import LargeFOV
from boxseg.models.meta import segnet1_meta
from boxseg.models.vgg import load_vgg16_state
from boxseg.train.loop import Stage, run_stage


def build_segnet1(num_classes: int, cfg: SegNet1Config) -> LargeFOV:
    model = LargeFOV(num_classes, cfg.width, cfg.batch_norm, cfg.dropout, cfg.convs_per_block, cfg.fc6_dilation)
    if cfg.vgg_weights:
        model.load_vgg16(load_vgg16_state(Path(cfg.vgg_weights)))
    return model


class Epochs:
    """Maps a sample key to a dataset index: a fresh permutation per epoch, seeded."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, key: int) -> int:
        epoch, pos = divmod(key, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][pos])


class SegNet1Samples(Dataset):
    """dataset[key] -> {"image": uint8 (crop, crop, 3), "label": uint8 (crop, crop)}."""

    def __init__(self, images: ImageSet, label_of: Callable[[int], np.ndarray], cfg: SegNet1Config, seed: int,
                 indices: list[int] | None = None):
        self.images, self.label_of, self.cfg, self.seed = images, label_of, cfg, seed
        self.indices = indices if indices is not None else list(range(len(images)))
        self.epochs = Epochs(len(self.indices), seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int) -> dict:
        i = self.indices[self.epochs(key)]
        rng = np.random.default_rng([self.seed, 1, key])
        img, lab = random_scale_crop(rng, self.images[i].image, self.label_of(i), self.cfg.crop,
                                     self.cfg.scale_min, self.cfg.scale_max)
        return {"image": torch.from_numpy(img), "label": torch.from_numpy(lab)}


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-255 pixels; 0 (with a graph) when every pixel is ignored."""
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE, reduction="sum")
    return loss / (target != IGNORE).sum().clamp(min=1)


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def segnet1_step(amp: str):
    def step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        x = normalize(batch["image"])
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, amp):
            logits = model(x)
        up = F.interpolate(logits.float(), size=batch["label"].shape[-2:], mode="bilinear", align_corners=False)
        return masked_cross_entropy(up, batch["label"])
    return step


def segnet1_optimizer(model: LargeFOV, cfg: SegNet1Config) -> torch.optim.Optimizer:
    """Paper (sgd): lr x1 for weights, x2 for biases (no decay), x10 / x20 for fc8's weight / bias.
    adam: one lr, for small networks trained from scratch, where plain SGD is far slower
    to get going (the paper's SGD starts from ImageNet weights)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.optimizer != "sgd":
        raise ValueError(f"segnet1.optimizer must be sgd or adam, not {cfg.optimizer!r}")
    cls_w, cls_b = model.classifier_parameters()
    special = {id(p) for p in cls_w + cls_b}
    weights = [p for n, p in model.named_parameters() if id(p) not in special and p.ndim > 1]
    biases = [p for n, p in model.named_parameters() if id(p) not in special and p.ndim <= 1]  # incl. BN
    return torch.optim.SGD([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": 2 * cfg.lr, "weight_decay": 0.0},
        {"params": cls_w, "lr": 10 * cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": cls_b, "lr": 20 * cfg.lr, "weight_decay": 0.0},
    ], lr=cfg.lr, momentum=cfg.momentum)


def train_segnet1(stage: Stage, images: ImageSet, label_of: Callable[[int], np.ndarray], classes: ClassMap,
                  cfg: SegNet1Config, seed: int, device: torch.device, amp: str = "none",
                  indices: list[int] | None = None, progress: bool = False) -> LargeFOV:
    torch.manual_seed(seed)
    model = build_segnet1(classes.num_classes, cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    data = SegNet1Samples(images, label_of, cfg, seed, indices)
    return run_stage(stage, model, segnet1_optimizer(model, cfg), data, segnet1_step(amp), seed, device, progress,
                     meta=segnet1_meta(cfg, classes))
