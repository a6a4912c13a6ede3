"""`open_predictor`: any model file with any of the five backends. A checkpoint asked for
onnxruntime, aoti or tensorrt is exported once into a cache keyed by the checkpoint's
content, precision, device and batch, and the artifact's Predictor is returned; so
`boxseg-propose --backend X` and `boxseg-eval --backend X` take a checkpoint as they are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from boxseg.data.files import file_digest
from boxseg.predict import Predictor, load_predictor
from boxseg.predict.load import CHECKPOINT_BACKENDS, artifact_backend


def artifact_cache() -> Path:
    return Path(os.environ.get("BOXSEG_CACHE", Path.home() / ".cache" / "boxseg")) / "artifacts"


def open_predictor(model_path: Path, device: torch.device, precision: str, backend: str | None = None,
                   expect_kind: str | None = None, batch: int = 64,
                   log: Callable[[str], None] = lambda s: None, input_size: int | None = None) -> Predictor:
    """`input_size` (AOTI only, whose spatial size is static) compiles a package for another
    input size than the model's own: a SegNet1 feeding SegNet2's score map runs at SegNet2's."""
    model_path = Path(model_path)
    if backend is None or backend in CHECKPOINT_BACKENDS or not model_path.is_file() \
            or artifact_backend(model_path) != "torch":
        return load_predictor(model_path, device, precision, backend, expect_kind, batch)
    from boxseg.models.meta import load_checkpoint_model

    model, meta = load_checkpoint_model(model_path, expect_kind)  # refuses a wrong kind before exporting
    if precision == "bf16":
        raise ValueError(f"backend {backend} runs fp32 or fp16, not bf16")
    fp16 = precision == "fp16"
    folder = artifact_cache() / f"{file_digest(model_path)[:16]}-{meta['kind']}{meta['in_channels']}"
    dyn = meta["kind"] == "segnet1"  # a SegNet1 also runs at SegNet2's input size (score maps)
    if backend == "onnxruntime":
        path = folder / f"model.{precision}{'.dynsize' if dyn else ''}.onnx"
        if not path.exists():
            from boxseg.export.onnx import export_onnx

            log(f"exporting {model_path} to {path}")
            export_onnx(model, meta, path, fp16=fp16, dynamic_size=dyn)
    elif backend == "aoti":
        meta = {**meta, "input_size": input_size or meta["input_size"]}
        path = folder / f"model.{precision}.{torch.device(device).type}.b{batch}.s{meta['input_size']}.pt2"
        if not path.exists():
            from boxseg.export.aoti import export_aoti

            log(f"compiling {model_path} to {path}")
            export_aoti(model, meta, path, torch.device(device), fp16, batch, log=log)
    elif backend == "tensorrt":
        from boxseg.export.onnx import export_onnx
        from boxseg.export.trt import build_engine, import_tensorrt

        import_tensorrt()
        onnx_path = folder / f"model.{precision}.onnx"
        if not onnx_path.exists():
            export_onnx(model, meta, onnx_path, fp16=fp16)
        path = folder / f"model.{precision}.b{batch}.engine"
        if not path.exists():
            log(f"building a TensorRT engine {path}")
            build_engine(onnx_path, meta, path, fp16, batch)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return load_predictor(path, device, precision, backend, expect_kind, batch)
