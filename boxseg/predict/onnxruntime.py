"""onnxruntime: providers passed explicitly and the one in use checked; inputs and outputs
bound in place (IO binding) to the torch tensors' memory, on CUDA as on CPU, so no batch
makes a round trip through numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from boxseg.errors import DataError
from boxseg.predict.base import Predictor

_ORT_TYPES = {"tensor(float16)": (torch.float16, np.float16), "tensor(float)": (torch.float32, np.float32)}


class ProviderFallback(RuntimeError):
    """onnxruntime silently chose another execution provider than the one asked for."""


def check_onnx_file(path: Path) -> None:
    """Refuse a model file that is a symlink (as `load_predictor` does for every artifact), or
    whose external data lies outside its folder or is reached through a symlink."""
    import onnx

    if path.is_symlink():
        raise DataError(path, "refused: the ONNX file is a symbolic link")
    folder = path.parent.resolve()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a malformed protobuf
        raise DataError(path, f"not a readable ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = path.parent / loc
        if target.is_symlink():
            raise DataError(path, f"refused: external data {loc!r} of tensor {t.name!r} is a symbolic link")
        if Path(loc).is_absolute() or not target.resolve().is_relative_to(folder):
            raise DataError(path, f"refused: external data {loc!r} of tensor {t.name!r} lies outside {folder}")


class OnnxRuntimeMissing(RuntimeError):
    """Neither onnxruntime (CPU) nor onnxruntime-gpu is installed."""


def installed_builds() -> list[str]:
    """The onnxruntime distributions installed: both write the same `onnxruntime` package
    folder, so with both the one installed last wins, whatever was asked for."""
    import importlib.metadata as md

    out = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(name)
            out.append(name)
        except md.PackageNotFoundError:
            pass
    return out


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed: pip install 'boxseg[cpu]' (CPU) or 'boxseg[gpu]' "
                                 f"(onnxruntime-gpu) ({e})") from None
    return ort


class OrtPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, path: Path, meta: dict, device: torch.device, precision: str, batch: int = 64,
                 threads: int | None = None):
        ort = import_onnxruntime()
        super().__init__(meta, device, precision, batch)
        path = Path(path)
        check_onnx_file(path)
        wanted = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            builds = installed_builds()
            why = ("both onnxruntime and onnxruntime-gpu are installed and the CPU build's files won: "
                   "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
                   if len(builds) > 1 else "install onnxruntime-gpu (pip install 'boxseg[gpu]') for CUDA")
            raise ProviderFallback(f"{wanted} is not available in this onnxruntime "
                                   f"({ort.get_available_providers()}): {why}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cpu":
            # the threads every command sets (boxseg.threads), not onnxruntime's own count of the
            # machine's cores; and no spinning between runs: in boxseg-propose its spinning threads
            # took the cores from the decoding and post-processing (b64 on the 2-core CPU: 756-804
            # pairs/s end to end, 867-912 without; the model alone the same, ~1,640)
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [(wanted, {"device_id": self.device.index or 0})] if self.device.type == "cuda" else [wanted]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise DataError(path, f"onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        used = self.session.get_providers()[0]
        if used != wanted:
            raise ProviderFallback(f"{path}: asked onnxruntime for {wanted}, it uses {used}")
        self.provider = used
        self.settings["onnxruntime"] = f"{'+'.join(installed_builds())} {ort.__version__}"
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        if inp.type not in _ORT_TYPES or out.type not in _ORT_TYPES:
            raise DataError(path, f"graph input/output types {inp.type}/{out.type}; expected float or float16")
        self.in_types, self.out_types = _ORT_TYPES[inp.type], _ORT_TYPES[out.type]
        size = meta["input_size"]
        self.static_hw = tuple(inp.shape[2:]) if all(isinstance(d, int) for d in inp.shape[2:]) else None
        if inp.shape[1] != meta["in_channels"] or self.static_hw not in (None, (size, size)):
            raise DataError(path, f"graph input {inp.shape} does not match its metadata "
                                  f"({meta['in_channels']}, {size}, {size})")
        self.out_chw = tuple(out.shape[1:]) if all(isinstance(d, int) for d in out.shape[1:]) else None
        self._out_hw: dict[tuple[int, int], tuple[int, ...]] = {}
        self.path = path
        self.binding = self.session.io_binding()
        self.ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._streams: dict[int, list[OrtPredictor]] = {}

    @property
    def streamable(self) -> bool:
        return self.device.type == "cpu"

    def for_streams(self, n: int) -> list[Predictor] | None:
        """On CPU, n sessions of the same file, each with its own IO binding (one cannot be
        shared between threads) and 1/n of the threads; made once per n and kept, so that
        repeated runs do not load them again. None on CUDA (one stream there)."""
        if not self.streamable:
            return None
        if n not in self._streams:
            each = max(1, torch.get_num_threads() // n)
            self._streams[n] = [OrtPredictor(self.path, self.meta, self.device, self.precision, self.batch, each)
                                for _ in range(n)]
        return list(self._streams[n])

    def _out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.static_hw is not None and self.out_chw is not None:
            return (x.shape[0], *self.out_chw)
        hw = tuple(x.shape[2:])
        if hw not in self._out_hw:  # a dynamic-size graph: learn the output shape once per input size
            probe = np.zeros((1, *x.shape[1:]), self.in_types[1])
            self._out_hw[hw] = self.session.run([self.output_name], {self.input_name: probe})[0].shape[1:]
        return (x.shape[0], *self._out_hw[hw])

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_hw is not None and tuple(x.shape[2:]) != self.static_hw:
            raise ValueError(f"{self.path} takes {self.static_hw[0]}x{self.static_hw[1]} inputs, not "
                             f"{x.shape[2]}x{x.shape[3]}; export it with --dynamic-size to run at other sizes "
                             f"(a SegNet1 feeding SegNet2's score map runs at SegNet2's input size)")
        x = x.to(self.device, self.in_types[0]).contiguous()
        out = torch.empty(self._out_shape(x), dtype=self.out_types[0], device=self.device)
        idx = self.device.index or 0
        b = self.binding
        b.bind_input(self.input_name, self.ort_device, idx, self.in_types[1], tuple(x.shape), x.data_ptr())
        b.bind_output(self.output_name, self.ort_device, idx, self.out_types[1], tuple(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # x was written on torch's stream
        self.session.run_with_iobinding(b)  # returns after the provider's stream is synchronised
        return out
