"""The Predictor protocol, precisions, memory formats and the CUDA settings every backend shares.

A Predictor is called with a normalised float tensor (B, C, S, S) on its device (built by
boxseg.predict.image) and returns float32 logits (B, K, S', S') on that device. Whatever
the backend (eager torch, torch.compile, AOTInductor, onnxruntime, TensorRT), the consumer
sees the same call, so eval, propose, the training rounds, the report and the benchmark
measure and use the same thing.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return DTYPES[precision]


def default_precision(device: torch.device) -> str:
    """The one default of boxseg-propose, boxseg-eval and the training rounds: fp16 on CUDA,
    fp32 elsewhere."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def memory_format_for(device: torch.device, precision: str) -> torch.memory_format:
    """channels_last except for fp32 on CUDA, by measurement. H200 (torch 2.11, 2026-11-26):
    fp16 SegNet1 @321 batch 64 ran 2,578 images/s channels_last against 1,941 contiguous,
    fp32 (TF32 off) 14.3 against 290. 2-core CPU (torch 2.13): channels_last was faster for
    every model (bench/results: SegNet1 @321 4.81 against 3.11 images/s, SegNet2 @512 11.35
    against 8.41, the tiny SegNet2 @128 827 against 734 pairs/s at batch 64), with the same
    proposal PNGs. `boxseg-bench --backends torch-cl,torch-nchw` measures it again."""
    if torch.device(device).type == "cuda" and precision == "fp32":
        return torch.contiguous_format
    return torch.channels_last


def configure_cuda(precision: str) -> dict:
    """cuDNN autotuning for the fixed shapes of batched inference; fp32 means fp32 (TF32 off).
    Returns the settings for `describe()`."""
    torch.backends.cudnn.benchmark = True
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return {"cudnn_benchmark": True, "tf32": bool(torch.backends.cudnn.allow_tf32) and precision == "fp32"}


def streamable(*predictors) -> bool:
    """Whether model streams may run these Predictors (`Predictor.streamable`: eager torch, or
    onnxruntime on CPU); None stands for no Predictor."""
    return all(p is None or p.streamable for p in predictors)


def default_streams(device: torch.device, *predictors) -> int:
    """Model streams (batches in the model at once, each in a thread on 1/n of torch's
    threads: boxseg-propose's and boxseg-eval's): on CPU, where torch has 2 threads or more
    and the backends allow them (eager torch, onnxruntime), 2; else 1."""
    if device.type != "cpu" or torch.get_num_threads() < 2 or not streamable(*predictors):
        return 1
    return 2


def batch_bucket(n: int, batch: int) -> int:
    """The fixed batch shape an input of n samples is padded to: the smallest power of two
    >= n, capped at `batch` (so at most log2(batch) + 1 shapes are ever compiled)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, batch)


class Predictor:
    """Callable: float (B, C, S, S) on `device` -> float32 logits (B, K, S', S') on `device`.

    Backends with bounded or fixed shapes set `max_batch` (a larger input is split) and
    override `padded_size` (a smaller one is padded, the padding dropped from the output):
    compile pads to a power-of-two bucket (`batch_bucket`), a static AOTI package to its batch.
    """

    backend: str = "?"
    reuses_outputs: bool = False  # True where the next run overwrites this run's output (CUDA graphs)
    memory_format: torch.memory_format = torch.contiguous_format  # the input layout `run` takes without a copy

    def __init__(self, meta: dict, device: torch.device, precision: str, batch: int = 64):
        self.meta, self.device, self.precision = meta, torch.device(device), precision
        self.dtype = check_precision(precision)
        self.batch = max(1, int(batch))
        self.max_batch: int | None = None
        self.provider: str | None = None
        self.settings: dict = configure_cuda(precision) if self.device.type == "cuda" else {}

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def input_size(self) -> int:
        return self.meta["input_size"]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass of the backend on exactly this batch; any float dtype out."""
        raise NotImplementedError

    def padded_size(self, n: int) -> int:
        return n

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = self.max_batch or x.shape[0]
        outs = []
        for s in range(0, x.shape[0], max(1, step)):
            part = x[s: s + step]
            n = part.shape[0]
            b = self.padded_size(n)
            if b > n:
                part = torch.cat([part, part.new_zeros((b - n, *part.shape[1:]))])
            out = self.run(part)[:n]
            y = out.float()  # a new tensor unless the output is float32 already
            if self.reuses_outputs and y.data_ptr() == out.data_ptr():
                y = y.clone()  # the next CUDA-graph replay overwrites the backend's own buffer
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @property
    def streamable(self) -> bool:
        """Whether `for_streams` gives Predictors that may run at the same time."""
        return False

    def for_streams(self, n: int) -> list[Predictor] | None:
        """`n` Predictors of this one that may run batches at the same time, one per model
        stream of boxseg.propose, each on 1/n of torch's threads (as they are now); None where
        the backend holds one set of buffers for its runs (CUDA graphs, compiled graphs, a
        TensorRT context, an AOTInductor package)."""
        return None

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.provider, "precision": self.precision,
                "kind": self.kind, "device": str(self.device), "max_batch": self.max_batch, **self.settings}
