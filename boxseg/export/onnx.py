"""ONNX export (opset >= 18, torch's torch.export-based exporter, dynamic batch axis, static
spatial size unless asked), full checker, and parity against PyTorch at export time."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from boxseg.data.files import atomic_path
from boxseg.export.common import example_inputs, export_parity, write_sidecar
from boxseg.predict.onnxruntime import OrtPredictor

INPUT, OUTPUT = "input", "logits"


def export_onnx(model: torch.nn.Module, meta: dict, path: Path, fp16: bool = False, dynamic_batch: bool = True,
                opset: int = 18, batch: int = 2, dynamic_size: bool = False) -> dict:
    """Write `path` (+ `path.json`) and return the artifact metadata, parity included.

    torch's torch.export-based exporter (`dynamo=True`, through onnxscript; the TorchScript
    one is deprecated), one file (no external data). fp16 exports the half-precision graph
    (fp16 input and output), which TensorRT 11 (strongly typed) builds as FP16 and
    onnxruntime runs directly. `dynamic_size` makes height and width dynamic too: a SegNet1
    that gives a 5-channel SegNet2 its score map runs at SegNet2's input size inside
    `boxseg-propose`.
    """
    import logging

    import onnx

    if opset < 18:
        raise ValueError(f"opset must be >= 18 (torch's exporter), not {opset}")
    model = copy.deepcopy(model).eval().cpu()
    x = example_inputs(meta, batch)
    net = copy.deepcopy(model).half() if fp16 else model
    spec = {}
    if dynamic_batch:
        spec[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size:
        spec[2], spec[3] = torch.export.Dim("height", min=16, max=4096), torch.export.Dim("width", min=16, max=4096)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that torchvision's operators are not registered: boxseg has none
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x.half() if fp16 else x,), str(tmp), opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_shapes={"x": spec} if spec else None, dynamo=True,
                              external_data=False, verbose=False)
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        quiet.setLevel(level)
    precision = "fp16" if fp16 else "fp32"
    with torch.no_grad():
        ref = model(x)
    out = OrtPredictor(path, meta, torch.device("cpu"), precision)(x)
    p = export_parity(ref, out, meta["kind"], precision, "onnxruntime CPUExecutionProvider", batch)
    art = {**meta, "artifact": "onnx", "precision": precision, "opset": opset, "dynamic_batch": dynamic_batch,
           "dynamic_size": dynamic_size,
           "input_name": INPUT, "output_name": OUTPUT, "parity": p}
    write_sidecar(path, art)
    return art
