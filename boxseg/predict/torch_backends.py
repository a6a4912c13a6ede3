"""The torch backends: eager (`torch`), `cudagraph` (the eager network captured in a CUDA
graph per batch shape) and `compile` (torch.compile over fixed batch shapes; on CUDA in
reduce-overhead mode, which replays CUDA graphs)."""

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

    @property
    def streamable(self) -> bool:
        return type(self) is TorchPredictor  # (not the compiled or CUDA-graph subclasses)

    def for_streams(self, n: int) -> list[Predictor] | None:
        """Itself n times: the eager network only reads its weights (each stream's thread sets
        its own share of torch's threads)."""
        return [self] * n if self.streamable else None


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


class CUDAGraphPredictor(TorchPredictor):
    """The eager network captured once in a CUDA graph (torch.cuda.graph) and replayed: the
    same kernels as `torch` (cuDNN's choice is made in the warm-up runs before the capture),
    so the same logits, but one launch per batch instead of one per kernel. Inside
    boxseg-propose on an H200 the model stage (inputs and the eager paper SegNet2) took 46 ms
    a batch against the network's 14.2 ms alone, the device waiting for the host to queue
    81 convolutions a batch and their elementwise ops (bench/results/gpu_h200_20261127_a, _b);
    a replay takes that host work away without torch.compile's compile time. CUDA only.
    Every input is padded to the full batch (one graph a run; a short last batch thus runs
    at the full batch's shape, where eager runs it at its own and cuDNN may choose other
    kernels); the input is copied into the graph's own buffer (cast and laid out in the same
    copy) and the output is the graph's buffer, copied by Predictor.__call__ before the next
    replay."""

    backend = "cudagraph"
    reuses_outputs = True

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, precision: str, batch: int = 64,
                 memory_format: torch.memory_format | None = None, warmup: int = 3):
        if torch.device(device).type != "cuda":
            raise ValueError(f"backend cudagraph needs a CUDA device (CUDA graphs), not {device}; "
                             f"use torch or compile there")
        super().__init__(model, meta, device, precision, batch, memory_format)
        self.max_batch = self.batch
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (graph, input buffer, output buffer)
        self.pool = None                      # one memory pool shared by the graphs

    def padded_size(self, n: int) -> int:
        return self.batch

    def _capture(self, x: torch.Tensor) -> tuple:
        static_in = torch.empty(x.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        static_in.copy_(x)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN autotuning, lazy inits
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread and the writers keep using CUDA
        # during the capture, which the default (global) mode would refuse
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.model(static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):  # capture and replay on this Predictor's GPU (torchrun shards)
            key = tuple(x.shape)
            if key not in self.graphs:
                self.graphs[key] = self._capture(x)
            graph, static_in, static_out = self.graphs[key]
            static_in.copy_(x)
            graph.replay()
            return static_out
