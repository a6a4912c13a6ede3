"""Model metadata that travels with every checkpoint and exported artifact, and building a
network back from it.

A checkpoint written by a training stage holds {"model": state_dict, "meta": {...}}; the
metadata names the model kind, its classes (with their COCO ids where known), input size,
normalisation, input channels and the network config, so that `boxseg-propose`,
`boxseg-eval` and `boxseg-export` need nothing but the file. It is validated before use:
a SegNet2 file given where a SegNet1 is expected is a clear error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import boxseg
from boxseg.config import SegNet1Config, SegNet2Config, from_dict
from boxseg.data.classes import ClassMap
from boxseg.data.transforms import MEAN, STD
from boxseg.errors import DataError

KINDS = ("segnet1", "segnet2")


def segnet1_meta(cfg: SegNet1Config, classes: ClassMap) -> dict:
    """SegNet1 predicts len(classes)+1 classes (0 = background) on images padded to test_size."""
    return {"format": "boxseg", "version": boxseg.__version__, "kind": "segnet1",
            "num_classes": classes.num_classes, "classes": classes.to_dict(), "in_channels": 3,
            "input_size": cfg.test_size, "output_stride": 8, "mean": list(MEAN), "std": list(STD),
            "config": dataclasses.asdict(cfg)}


def segnet2_meta(cfg: SegNet2Config, in_channels: int) -> dict:
    """SegNet2 is class-agnostic: 2 outputs (background, foreground), 4 or 5 input channels."""
    return {"format": "boxseg", "version": boxseg.__version__, "kind": "segnet2", "num_classes": 2,
            "in_channels": in_channels, "input_size": cfg.input_size, "output_stride": 4,
            "mean": list(MEAN), "std": list(STD), "config": dataclasses.asdict(cfg)}


def validate_meta(meta: object, where: str | Path, expect_kind: str | None = None) -> dict:
    """Check a metadata dict's shape and values; raise DataError naming `where` otherwise."""
    if not isinstance(meta, dict) or meta.get("format") != "boxseg":
        raise DataError(where, "no boxseg metadata (not a boxseg checkpoint or artifact)")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise DataError(where, f"unknown model kind {kind!r}; expected one of {KINDS}")
    if expect_kind is not None and kind != expect_kind:
        raise DataError(where, f"is a {kind} model, but a {expect_kind} is expected here")
    want_channels = (3,) if kind == "segnet1" else (4, 5)
    if meta.get("in_channels") not in want_channels:
        raise DataError(where, f"{kind} with {meta.get('in_channels')!r} input channels; expected {want_channels}")
    n = meta.get("num_classes")
    if not isinstance(n, int) or n < 2 or (kind == "segnet2" and n != 2):
        raise DataError(where, f"bad num_classes {n!r} for {kind}")
    size = meta.get("input_size")
    if not isinstance(size, int) or not 16 <= size <= 4096:
        raise DataError(where, f"bad input_size {size!r}")
    if list(meta.get("mean", [])) != list(MEAN) or list(meta.get("std", [])) != list(STD):
        raise DataError(where, f"normalisation {meta.get('mean')}/{meta.get('std')} differs from boxseg's {MEAN}/{STD}")
    if kind == "segnet1":
        try:
            classes = ClassMap.from_dict(meta["classes"])
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(where, f"bad class table: {e}") from None
        if classes.num_classes != n:
            raise DataError(where, f"class table has {classes.num_classes} classes, num_classes says {n}")
    try:
        network_config(meta)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(where, f"bad network config: {e}") from None
    return meta


def network_config(meta: dict) -> SegNet1Config | SegNet2Config:
    cls = SegNet1Config if meta["kind"] == "segnet1" else SegNet2Config
    return from_dict(cls, dict(meta["config"]), f"{meta['kind']}.config")


def build_model(meta: dict) -> torch.nn.Module:
    """The network the metadata describes, randomly initialised."""
    from boxseg.models.hourglass import Hourglass
    from boxseg.models.largefov import LargeFOV

    cfg = network_config(meta)
    if meta["kind"] == "segnet1":
        return LargeFOV(meta["num_classes"], cfg.width, cfg.batch_norm, cfg.dropout, cfg.convs_per_block,
                        cfg.fc6_dilation)
    return Hourglass(meta["in_channels"], cfg.widths, cfg.blocks, cfg.bottom_blocks, cfg.stem_channels)


def load_checkpoint_model(path: str | Path, expect_kind: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, metadata) from a stage checkpoint, loaded with weights_only=True."""
    from boxseg.models.checkpoint import load_state_file

    path = Path(path)
    state = load_state_file(path)
    meta = validate_meta(state.get("meta"), path, expect_kind)
    model = build_model(meta)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise DataError(path, f"weights do not fit the model its metadata describes: {str(e).splitlines()[0]}") from None
    return model.eval(), meta
