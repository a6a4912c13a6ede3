"""AOTInductor: torch.export + an AOTInductor package (.pt2) that loads without boxseg's
model code (torch._inductor.aoti_load_package)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from boxseg.data.files import atomic_path
from boxseg.errors import DataError
from boxseg.export.common import example_inputs, export_parity, write_sidecar
from boxseg.predictor import Predictor


def export_aoti(model: torch.nn.Module, meta: dict, path: Path, device: torch.device, fp16: bool = False,
                max_batch: int = 128) -> dict:
    """Compile for `device` (a CUDA package needs a CUDA device here); batch is dynamic in
    [1, max_batch]."""
    model = copy.deepcopy(model).eval().to(device)
    dtype = torch.float16 if fp16 else torch.float32
    net = copy.deepcopy(model).to(dtype)
    x = example_inputs(meta, 2).to(device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(net, (x.to(dtype),), dynamic_shapes={"x": {0: batch}})
        with atomic_path(path) as tmp:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp.with_suffix(".pt2")))
            tmp.with_suffix(".pt2").replace(tmp)
    precision = "fp16" if fp16 else "fp32"
    with torch.no_grad():
        ref = model(x)
    out = AotiPredictor(path, {**meta, "precision": precision}, device, precision)(x)  # the package's dtype
    p = export_parity(ref, out, meta["kind"], precision, f"AOTInductor {device.type}", len(x))
    art = {**meta, "artifact": "aoti", "precision": precision, "device": device.type, "max_batch": max_batch,
           "parity": p}
    write_sidecar(path, art)
    return art


class AotiPredictor(Predictor):
    backend = "aoti"

    def __init__(self, path: Path, meta: dict, device: torch.device, precision: str):
        super().__init__(meta, device, precision)
        path = Path(path)
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # the loader raises RuntimeError and others
            raise DataError(path, f"cannot load the AOTInductor package: {str(e).splitlines()[0]}") from None
        self.dtype = torch.float16 if meta.get("precision") == "fp16" else torch.float32
        self.provider = meta.get("device")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x.to(self.dtype)).float()
