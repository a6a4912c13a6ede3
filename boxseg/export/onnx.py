"""ONNX export (opset >= 17, dynamic batch axis, static spatial size), full checker, parity
against PyTorch at export time, and safe loading (external data stays in the folder)."""

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
                opset: int = 17, batch: int = 2, dynamic_size: bool = False) -> dict:
    """Write `path` (+ `path.json`) and return the artifact metadata, parity included.

    fp16 exports the half-precision graph (fp16 input and output), which TensorRT 11 (strongly
    typed) builds as FP16 and onnxruntime runs directly. Uses torch's TorchScript-based
    exporter (the torch.export-based one needs the onnxscript package). `dynamic_size` makes
    height and width dynamic too: a SegNet1 that gives a 5-channel SegNet2 its score map runs
    at SegNet2's input size inside `boxseg-propose`.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17, not {opset}")
    model = copy.deepcopy(model).eval().cpu()
    x = example_inputs(meta, batch)
    net = copy.deepcopy(model).half() if fp16 else model
    axes_in = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_size else {})
    axes_out = ({0: "batch"} if dynamic_batch else {}) | ({2: "out_height", 3: "out_width"} if dynamic_size else {})
    dyn = {INPUT: axes_in, OUTPUT: axes_out} if axes_in else None
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x.half() if fp16 else x,), str(tmp), opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes=dyn, dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)
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
