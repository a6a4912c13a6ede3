"""One Predictor for every backend.

`load_predictor(artifact, device, precision)` picks the backend from the artifact:
  *.pt / *.pth  a boxseg checkpoint (torch; loaded with weights_only=True)
  *.onnx        onnxruntime, providers passed explicitly and the one in use checked
  *.engine/.plan  TensorRT (where the tensorrt package imports)
  *.pt2         an AOTInductor package (torch._inductor.aoti_load_package)
Every backend takes the same input (float32 (B, C, S, S), ImageNet-normalised, built by the
shared preprocessing in boxseg.propose / boxseg.inference) and returns float32 logits, so
every consumer sees the same numbers whatever the backend. Metadata (boxseg.models.meta)
travels with every artifact and is validated on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from boxseg.errors import DataError
from boxseg.models.meta import load_checkpoint_model, validate_meta

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")


class Predictor:
    """Callable: float (B, C, S, S) on `device` -> float32 logits (B, K, S/stride, S/stride)."""

    backend: str = "?"

    def __init__(self, meta: dict, device: torch.device, precision: str):
        self.meta, self.device, self.precision = meta, device, precision
        self.provider: str | None = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.provider, "precision": self.precision,
                "kind": self.kind, "device": str(self.device)}


class TorchPredictor(Predictor):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, precision: str):
        super().__init__(meta, device, precision)
        self.model = model.to(device).eval()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from boxseg.propose import autocast_for

        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(x.device, self.precision):
            return self.model(x).float()


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
    """Metadata of an exported artifact: ARTIFACT.json beside it, validated."""
    side = path.with_suffix(path.suffix + ".json")
    if not side.is_file():
        raise DataError(path, f"metadata file {side.name} is missing beside the artifact")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(side, f"malformed metadata JSON: {e}") from None
    return validate_meta(meta, side, expect_kind)


def load_predictor(artifact: str | Path, device: torch.device | str = "cpu", precision: str = "fp32",
                   expect_kind: str | None = None) -> Predictor:
    """The Predictor for a checkpoint or exported artifact; `expect_kind` (segnet1|segnet2)
    refuses the wrong model before any inference."""
    path = Path(artifact)
    device = torch.device(device)
    if not path.is_file():
        raise DataError(path, "model file is missing")
    backend = artifact_backend(path)
    if backend == "torch":
        model, meta = load_checkpoint_model(path, expect_kind)
        return TorchPredictor(model, meta, device, precision)
    if path.is_symlink():  # an exported artifact is loaded only from the folder it was written to
        raise DataError(path, f"refused: the {backend} artifact is a symbolic link")
    meta = read_sidecar_meta(path, expect_kind)
    if backend == "onnxruntime":
        from boxseg.export.ort import OrtPredictor

        return OrtPredictor(path, meta, device, precision)
    if backend == "aoti":
        from boxseg.export.aoti import AotiPredictor

        return AotiPredictor(path, meta, device, precision)
    from boxseg.export.trt import TrtPredictor

    return TrtPredictor(path, meta, device, precision)
