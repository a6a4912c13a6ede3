"""`load_predictor`: the Predictor for a checkpoint or an exported artifact.

  *.pt / *.pth    a boxseg checkpoint (weights_only=True): backend "torch" (eager, the
                  default), "cudagraph" (eager, replayed as a CUDA graph; CUDA only) or
                  "compile" (torch.compile over fixed batch shapes)
  *.onnx          onnxruntime, providers passed explicitly and the one in use checked
  *.engine/.plan  TensorRT (where the tensorrt package imports)
  *.pt2           an AOTInductor package
A checkpoint asked for onnxruntime, aoti or tensorrt must be exported first
(boxseg.export.open_predictor does that, cached). Metadata (boxseg.models.meta) travels with
every artifact and is validated on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from boxseg.errors import DataError
from boxseg.models.meta import load_checkpoint_model, validate_meta
from boxseg.predict.base import Predictor, check_precision

BACKENDS = ("torch", "cudagraph", "compile", "onnxruntime", "aoti", "tensorrt")
CHECKPOINT_BACKENDS = ("torch", "cudagraph", "compile")


def artifact_backend(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return "torch"
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    if suffix == ".pt2":
        return "aoti"
    raise DataError(path, f"unknown artifact type {suffix!r}; expected .pt, .onnx, .engine or .pt2")


def read_sidecar_meta(path: Path, expect_kind: str | None) -> dict:
    """Metadata of an exported artifact: `<artifact>.json` beside it, validated."""
    side = path.with_suffix(path.suffix + ".json")
    if not side.is_file():
        raise DataError(path, f"metadata file {side.name} is missing beside the artifact")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(side, f"malformed metadata JSON: {e}") from None
    return validate_meta(meta, side, expect_kind)


def torch_predictor(model: torch.nn.Module, meta: dict, device: torch.device | str, precision: str,
                    backend: str = "torch", batch: int = 64) -> Predictor:
    """A Predictor around a torch module in memory (the training rounds' networks)."""
    from boxseg.predict.torch_backends import CompiledPredictor, CUDAGraphPredictor, TorchPredictor

    if backend not in CHECKPOINT_BACKENDS:
        raise ValueError(f"a network in memory runs with backend torch, cudagraph or compile, not {backend!r}")
    cls = {"compile": CompiledPredictor, "cudagraph": CUDAGraphPredictor}.get(backend, TorchPredictor)
    return cls(model, meta, torch.device(device), precision, batch)


def as_predictor(model, kind: str, input_size: int, device: torch.device | str, precision: str = "fp32",
                 batch: int = 64) -> Predictor | None:
    """Consumers take Predictors: a Predictor (or None) passes through, a torch module (a
    test's, a caller's) gets the eager one."""
    if model is None or isinstance(model, Predictor):
        return model
    if isinstance(model, torch.nn.Module):
        return torch_predictor(model, {"kind": kind, "input_size": input_size}, device, precision, "torch", batch)
    raise TypeError(f"expected a Predictor or a torch module, not {type(model).__name__}")


def load_predictor(artifact: str | Path, device: torch.device | str = "cpu", precision: str = "fp32",
                   backend: str | None = None, expect_kind: str | None = None, batch: int = 64) -> Predictor:
    """The Predictor for a checkpoint or exported artifact. `backend` None takes the file's
    own (a checkpoint: eager torch); a checkpoint also runs with "cudagraph" and "compile". `expect_kind`
    (segnet1|segnet2) refuses the wrong model before any inference. `batch` is the largest
    batch the consumer sends (the fixed shape of compile)."""
    path = Path(artifact)
    device = torch.device(device)
    check_precision(precision)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not path.is_file():
        raise DataError(path, "model file is missing")
    own = artifact_backend(path)
    if own == "torch":
        backend = backend or "torch"
        if backend not in CHECKPOINT_BACKENDS:
            raise DataError(path, f"a checkpoint runs with backend torch, cudagraph or compile; for {backend} export it "
                                  f"first (boxseg-export), or let boxseg-propose/boxseg-eval --backend {backend} do it")
        model, meta = load_checkpoint_model(path, expect_kind)
        return torch_predictor(model, meta, device, precision, backend, batch)
    if backend not in (None, own):
        raise DataError(path, f"this artifact runs with backend {own}, not {backend}")
    if path.is_symlink():  # an exported artifact is loaded only from the folder it was written to
        raise DataError(path, f"refused: the {own} artifact is a symbolic link")
    meta = read_sidecar_meta(path, expect_kind)
    if own == "onnxruntime":
        from boxseg.predict.onnxruntime import OrtPredictor

        return OrtPredictor(path, meta, device, precision, batch)
    if own == "aoti":
        from boxseg.predict.aoti import AotiPredictor

        return AotiPredictor(path, meta, device, precision, batch)
    from boxseg.predict.tensorrt import TrtPredictor

    return TrtPredictor(path, meta, device, precision, batch)
