"""TensorRT engines (where the tensorrt package imports; engines are built by boxseg.export.trt)."""

from __future__ import annotations

from pathlib import Path

import torch

from boxseg.errors import DataError
from boxseg.predict.base import Predictor

INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` (NVIDIA's wheels; needs a CUDA GPU and "
                "access to pypi.nvidia.com), or use --onnx / --aoti")


class TensorRTMissing(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTMissing(f"{INSTALL_HINT} ({e})") from None
    return trt


class TrtPredictor(Predictor):
    backend = "tensorrt"

    def __init__(self, path: Path, meta: dict, device: torch.device, precision: str, batch: int = 64):
        super().__init__(meta, device, precision, batch)
        if self.device.type != "cuda":
            raise ValueError("a TensorRT engine runs on a CUDA device only")
        trt = import_tensorrt()
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise DataError(path, "TensorRT cannot deserialize this engine (other TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.dtypes = {n: (torch.float16 if self.engine.get_tensor_dtype(n) == trt.DataType.HALF else torch.float32)
                       for n in ("input", "logits")}
        self.max_batch = int(meta.get("profile", {}).get("max", 0)) or None  # the engine's profile
        self.provider = f"TensorRT {trt.__version__}"

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtypes["input"]).contiguous()
        self.context.set_input_shape("input", tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=self.dtypes["logits"], device=self.device)
        self.context.set_tensor_address("input", x.data_ptr())
        self.context.set_tensor_address("logits", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
