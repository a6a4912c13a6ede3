"""Training SegNet2 (the class-agnostic Hourglass) on the source set: one sample per
(image, class present), crops around the class's boxes, scale and flip, Adam, poly decay.

From round 2 the fifth input channel S_m is the source SegNet1's softmax probability of
class m, computed on the device for the very crop SegNet2 sees (as at inference)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from boxseg.config import SegNet2Config
from boxseg.data.coco import class_sample
from boxseg.data.images import ImageSet
from boxseg.data.transforms import crop_around_boxes
from boxseg.predict.image import segnet2_inputs
from boxseg.models.hourglass import Hourglass
from boxseg.models.meta import segnet2_meta
from boxseg.train.loop import Stage, run_stage
from boxseg.train.segnet1 import Epochs, autocast, masked_cross_entropy


def build_segnet2(in_channels: int, cfg: SegNet2Config) -> Hourglass:
    return Hourglass(in_channels, cfg.widths, cfg.blocks, cfg.bottom_blocks, cfg.stem_channels)


class SegNet2Samples(Dataset):
    """dataset[key] -> image uint8 (S, S, 3), box uint8 (S, S), target uint8 (S, S), cls int."""

    def __init__(self, images: ImageSet, cfg: SegNet2Config, seed: int):
        self.images, self.cfg, self.seed = images, cfg, seed
        self.pairs = images.class_pairs()
        self.epochs = Epochs(len(self.pairs), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int) -> dict:
        i, m = self.pairs[self.epochs(key)]
        s = class_sample(self.images[i], m)
        rng = np.random.default_rng([self.seed, 2, key])
        img, box, tgt, _ = crop_around_boxes(rng, s.image, s.box_mask.astype(np.uint8), s.target, None, s.boxes,
                                             self.cfg.input_size, self.cfg.scale_min, self.cfg.scale_max)
        return {"image": torch.from_numpy(img), "box": torch.from_numpy(box), "target": torch.from_numpy(tgt),
                "cls": torch.tensor(m)}


def segnet2_step(segnet1: torch.nn.Module | None, amp: str):
    def step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        inp = segnet2_inputs(batch["image"], batch["box"], batch["cls"], segnet1)
        with autocast(inp.device, amp):
            logits = model(inp)
        up = F.interpolate(logits.float(), size=inp.shape[-2:], mode="bilinear", align_corners=False)
        return masked_cross_entropy(up, batch["target"])
    return step


def train_segnet2(stage: Stage, images: ImageSet, cfg: SegNet2Config, seed: int, device: torch.device,
                  init: Hourglass | None = None, segnet1: torch.nn.Module | None = None, amp: str = "none",
                  progress: bool = False) -> Hourglass:
    """Round 1: a fresh 4-channel network (`init` None, `segnet1` None). Round r >= 2: start
    from `init` (expanded to 5 channels if needed) and feed S_m from `segnet1`."""
    torch.manual_seed(seed)
    if init is None:
        model = build_segnet2(5 if segnet1 is not None else 4, cfg)
    else:
        model = init.expand_to_five_channels() if (segnet1 is not None and init.in_channels == 4) else init
    model = model.to(device)
    if segnet1 is not None:
        segnet1 = segnet1.to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return run_stage(stage, model, optimizer, SegNet2Samples(images, cfg, seed), segnet2_step(segnet1, amp),
                     seed, device, progress, meta=segnet2_meta(cfg, model.in_channels))
