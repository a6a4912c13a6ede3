"""The torch backends: eager (`torch`) and `compile` (torch.compile over fixed batch shapes;
on CUDA in reduce-overhead mode, which replays CUDA graphs)."""

from __future__ import annotations

import copy

import torch

from boxseg.predict.base import Predictor, batch_bucket, memory_format_for


class TorchPredictor(Predictor):
    """Eager PyTorch. The whole network is cast to the precision's dtype (no autocast: the
    casts per layer cost more than they save) and kept in the memory format that measured
    fastest for this device and precision (`memory_format_for`)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, precision: str, batch: int = 64,
                 memory_format: torch.memory_format | None = None):
        super().__init__(meta, device, precision, batch)
        self.memory_format = memory_format or memory_format_for(self.device, precision)
        self.model = copy.deepcopy(model).eval().to(self.device, self.dtype)
        self.model = self.model.to(memory_format=self.memory_format)
        self.settings["memory_format"] = "channels_last" if self.memory_format == torch.channels_last else "contiguous"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(x))


class CompiledPredictor(TorchPredictor):
    """torch.compile of the eager network. Shapes are fixed, so each shape compiles once: on
    CPU a short batch is padded to a power-of-two bucket (`batch_bucket`); on CUDA to the
    full batch, so a run compiles and captures one shape and pays for it with at most one
    padded batch. The default mode on CUDA is reduce-overhead (CUDA graphs, inductor's
    kernels): max-autotune autotuned each convolution shape for 6-10 s on an H200 and had
    not finished the paper SegNet2 after 150 s (bench/results/gpu_h200_20261127_*); it stays
    available as `mode`. CUDA graphs need every replay's output copied before the next
    (done in Predictor.__call__)."""

    backend = "compile"

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, precision: str, batch: int = 64,
                 mode: str | None = "auto", memory_format: torch.memory_format | None = None):
        super().__init__(model, meta, device, precision, batch, memory_format)
        if mode in ("auto", None):
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        elif mode == "default":
            mode = None
        self.mode = mode
        self.compiled = torch.compile(self.model, mode=mode, dynamic=False, fullgraph=True)
        self.settings["compile_mode"] = mode or "default"
        self.reuses_outputs = self.device.type == "cuda"  # CUDA graphs replay into the same output
        self.max_batch = self.batch

    def padded_size(self, n: int) -> int:
        if self.device.type == "cuda":
            return self.batch
        return batch_bucket(n, self.batch)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(self.prepare(x))
