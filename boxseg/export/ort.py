"""onnxruntime Predictor: providers passed explicitly, the provider in use checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from boxseg.errors import DataError
from boxseg.export.common import to_numpy
from boxseg.predictor import Predictor


class ProviderFallback(RuntimeError):
    """onnxruntime silently chose another execution provider than the one asked for."""


class OrtPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, path: Path, meta: dict, device: torch.device, precision: str):
        import onnxruntime as ort

        from boxseg.export.onnx import check_onnx_file

        super().__init__(meta, device, precision)
        path = Path(path)
        check_onnx_file(path)
        wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            raise ProviderFallback(f"{wanted} is not available in this onnxruntime ({ort.get_available_providers()}); "
                                   f"install onnxruntime-gpu for CUDA")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [(wanted, {"device_id": device.index or 0})] if device.type == "cuda" else [wanted]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise DataError(path, f"onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        used = self.session.get_providers()[0]
        if used != wanted:
            raise ProviderFallback(f"{path}: asked onnxruntime for {wanted}, it uses {used}")
        self.provider = used
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        size = meta["input_size"]
        self.static_hw = tuple(inp.shape[2:]) if all(isinstance(d, int) for d in inp.shape[2:]) else None
        if inp.shape[1] != meta["in_channels"] or self.static_hw not in (None, (size, size)):
            raise DataError(path, f"graph input {inp.shape} does not match its metadata "
                                  f"({meta['in_channels']}, {size}, {size})")
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_hw is not None and tuple(x.shape[2:]) != self.static_hw:
            raise ValueError(f"{self.path} takes {self.static_hw[0]}x{self.static_hw[1]} inputs, not "
                             f"{x.shape[2]}x{x.shape[3]}; export it with --dynamic-size to run at other sizes "
                             f"(a SegNet1 feeding SegNet2's score map runs at SegNet2's input size)")
        out = self.session.run([self.output_name], {self.input_name: to_numpy(x, self.input_dtype)})[0]
        return torch.from_numpy(out.astype(np.float32, copy=False)).to(x.device)
