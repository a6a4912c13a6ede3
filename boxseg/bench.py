"""Latency and throughput of SegNet1 / SegNet2 per backend, precision and batch, against the
device's own ceiling (a large matrix product of the same dtype timed in the same run)."""

from __future__ import annotations

import copy
import itertools
import platform
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from boxseg.export.common import example_inputs


@dataclass
class BenchRow:
    model: str
    backend: str
    precision: str
    batch: int
    status: str                      # "ok" or why it did not run
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    images_per_s: float | None = None
    gflop_per_image: float | None = None
    tflops: float | None = None
    matmul_tflops: float | None = None
    fraction_of_matmul: float | None = None
    peak_mem_mib: float | None = None
    note: str = ""


def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x[:1])
    return float(fc.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-call latencies in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t))
    return out


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product (the practical ceiling for convs)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_fn(lambda: a @ b, device, 3, iters))
    return 2 * n**3 / (ms / 1000) / 1e12


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _dtype(precision: str) -> torch.dtype:
    from boxseg.predict.base import check_precision

    return check_precision(precision)


VARIANTS = {"torch-cl": torch.channels_last, "torch-nchw": torch.contiguous_format}


def make_predictor(backend: str, model: torch.nn.Module, meta: dict, precision: str, device: torch.device,
                   batch: int, workdir: Path, log=print, compile_mode: str | None = "auto"):
    """The Predictor a user gets for `backend` (boxseg.predict), or an exception saying why
    not. torch-cl / torch-nchw are the eager Predictor with its memory format forced (the
    measurement behind `memory_format_for`)."""
    from boxseg.predict import load_predictor
    from boxseg.predict.torch_backends import CompiledPredictor, CUDAGraphPredictor, TorchPredictor

    if backend in ("torch", "torch-cl", "torch-nchw"):
        return TorchPredictor(model, meta, device, precision, batch, VARIANTS.get(backend))
    if backend == "cudagraph":
        return CUDAGraphPredictor(model, meta, device, precision, batch)
    if backend == "compile":
        return CompiledPredictor(model, meta, device, precision, batch, compile_mode)
    if precision == "bf16":
        raise RuntimeError(f"{backend}: boxseg exports fp32 and fp16 artifacts only")
    fp16 = precision == "fp16"
    stem = f"{meta['kind']}_{meta['in_channels']}_{meta['input_size']}_{precision}"
    if backend == "onnxruntime":
        from boxseg.export.onnx import export_onnx

        path = workdir / f"{stem}.onnx"
        if not path.exists():
            export_onnx(model, meta, path, fp16=fp16)
        return load_predictor(path, device, precision, batch=batch)
    if backend == "aoti":
        from boxseg.export.aoti import export_aoti

        path = workdir / f"{stem}_{device.type}_b{batch}.pt2"
        if not path.exists():
            export_aoti(model, meta, path, device, fp16, batch, log=log)
        return load_predictor(path, device, precision, batch=batch)
    if backend == "tensorrt":
        from boxseg.export.onnx import export_onnx
        from boxseg.export.trt import build_engine, import_tensorrt

        import_tensorrt()  # says how to install it when missing
        onnx_path = workdir / f"{stem}.onnx"
        if not onnx_path.exists():
            export_onnx(model, meta, onnx_path, fp16=fp16)
        engine = workdir / f"{stem}_b{batch}.engine"
        build_engine(onnx_path, meta, engine, fp16, batch)
        return load_predictor(engine, device, precision, batch=batch)
    raise ValueError(f"unknown backend {backend!r}; expected one of torch, torch-cl, torch-nchw, cudagraph, compile, "
                     f"onnxruntime, aoti, tensorrt")


def make_runner(backend: str, model: torch.nn.Module, meta: dict, precision: str, device: torch.device,
                batch: int, workdir: Path, log=print, compile_mode: str | None = "auto"):
    """A no-argument callable that runs one batch through the Predictor, as consumers call it."""
    pred = make_predictor(backend, model, meta, precision, device, batch, workdir, log, compile_mode)
    x = example_inputs(meta, batch).to(device)
    return lambda: pred(x)


def bench(model: torch.nn.Module, meta: dict, name: str, backends: list[str], precisions: list[str],
          batches: list[int], device: torch.device, warmup: int, iters: int, log=print,
          compile_mode: str | None = "auto") -> list[BenchRow]:
    rows: list[BenchRow] = []
    x1 = example_inputs(meta, 1)
    gflop = flops_per_image(copy.deepcopy(model).eval(), x1) / 1e9
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            try:
                peaks[precision] = matmul_tflops(device, _dtype(precision))
            except RuntimeError as e:
                peaks[precision] = float("nan")
                log(f"matmul {precision}: {e}")
            for backend in backends:
                for b in batches:
                    row = BenchRow(name, backend, precision, b, "ok", gflop_per_image=round(gflop, 3),
                                   matmul_tflops=round(peaks[precision], 3))
                    try:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            run = make_runner(backend, model, meta, precision, device, b, Path(tmp), log, compile_mode)
                            lat = time_fn(run, device, warmup, iters)
                    except Exception as e:  # reported in the table: a backend that cannot run says why
                        row.status = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        rows.append(row)
                        log(f"{backend} {precision} b{b}: {row.status}")
                        continue
                    med = statistics.median(lat)
                    row.median_ms, row.p90_ms, row.p99_ms = round(med, 3), round(_pct(lat, 0.9), 3), round(_pct(lat, 0.99), 3)
                    row.images_per_s = round(b / (med / 1000), 2)
                    row.tflops = round(row.images_per_s * gflop / 1000, 4)
                    row.fraction_of_matmul = round(row.tflops / peaks[precision], 4) if peaks[precision] else None
                    if device.type == "cuda":
                        row.peak_mem_mib = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    else:
                        row.peak_mem_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
                        row.note = "peak mem: the process's max RSS so far"
                    rows.append(row)
                    log(f"{backend} {precision} b{b}: {row.median_ms} ms, {row.images_per_s} img/s, "
                        f"{row.tflops} TFLOP/s ({100 * (row.fraction_of_matmul or 0):.1f}% of matmul)")
    return rows


def source_commit() -> str | None:
    """The git commit of the boxseg source that runs (short hash, "+dirty" when its tracked
    files differ from it), or None outside a git checkout, without git, or where this file
    is not tracked there (a copy installed into a virtual environment inside some checkout)."""
    import subprocess

    src = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "-C", str(src), "ls-files", "--error-unmatch", Path(__file__).name],
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    import numpy

    import boxseg
    from boxseg.versions import library_versions

    v = library_versions()
    ort = v["onnxruntime-gpu"] if v["onnxruntime"] == "not installed" else v["onnxruntime"]
    env = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "torch": torch.__version__,
           "onnxruntime": ort, "numpy": numpy.__version__, "boxseg": boxseg.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "tf32": False,
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "commit": source_commit()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def markdown(rows: list[BenchRow]) -> str:
    head = ("| model | backend | precision | batch | median ms | p90 ms | p99 ms | images/s | GFLOP/img | TFLOP/s "
            "| matmul TFLOP/s | of matmul | peak MiB | status |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
        frac = "-" if r.fraction_of_matmul is None else f"{100 * r.fraction_of_matmul:.1f}%"
        lines.append(f"| {r.model} | {r.backend} | {r.precision} | {r.batch} | {f(r.median_ms)} | {f(r.p90_ms)} | "
                     f"{f(r.p99_ms)} | {f(r.images_per_s)} | {f(r.gflop_per_image)} | {f(r.tflops)} | "
                     f"{f(r.matmul_tflops)} | {frac} | {f(r.peak_mem_mib)} | "
                     f"{r.status + ': ' + r.note if r.backend.startswith(('propose-e2e', 'eval-e2e', 'model-only')) else r.status} |")
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r.model, r.backend, r.precision) for r in rows if r.status == "ok"})
    for k in keys:
        pts = sorted((r.batch, r.images_per_s) for r in rows if (r.model, r.backend, r.precision) == k and r.status == "ok")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(k))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("images (or pairs) / s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows_to_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def bench_e2e(model: torch.nn.Module, meta: dict, name: str, images, precisions: list[str], batches: list[int],
              device: torch.device, workers: int | None, warmup: int, iters: int, log=print,
              backends: tuple[str, ...] = ("torch",), compile_mode: str | None = "auto",
              writer_processes: bool | None = None, decode_processes: bool | None = None,
              e2e_runs: int = 3, decode_start: str = "fork", streams: int | None = None,
              device_jpeg: bool = False, writer_start: str = "fork") -> list[BenchRow]:
    """boxseg-propose's whole pipeline (decode in workers, upload, box masks, model, device
    post-processing, download, PNG writes) on `images` (an ImageSet), against the same
    Predictor alone on inputs of the same shape, batch and layout (its `memory_format`, in
    which the pipeline builds them). Throughput is in (image, class)
    pairs per second. After a warm-up run, each of `e2e_runs` timed runs is paired with a
    model-only timing taken just before it, and e2e / model-only is the median of the runs'
    ratios: the machine's own speed drifts (on the 2-core CPU the model alone measured 940
    to 1,370 pairs/s within a minute), so a ratio of two moments measures the drift as much
    as the pipeline. The model-only row is the median over all its timings; the e2e row is
    the run with the median ratio, and its note gives every run's pair, the ratios and
    that run's stage breakdown. Every run writes into a folder of its own, all removed
    together at the end: deleting a run's files just before the next run made that run's file
    creation slower on a filesystem that avoids reusing just-freed inodes (ext4 without a
    journal, as on the 2-core machine of the README's CPU figures: ~2% of the run's wall time), a cost of the benchmark's own
    deletions that a user's run does not pay."""
    from boxseg.config import ProposalConfig
    from boxseg.propose import StreamsRefused, check_streams, propose

    rows: list[BenchRow] = []
    model = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as work:
        for backend in backends:
            for precision in precisions:
                for b in batches:
                    if meta["in_channels"] != 4:
                        rows.append(BenchRow(name, "propose-e2e", precision, b, "not run: --e2e times a 4-channel "
                                             "(round-1) SegNet2; a 5-channel one needs a SegNet1 as well"))
                        continue
                    ref = BenchRow(name, f"model-only {backend}", precision, b, "ok")
                    try:
                        pred = make_predictor(backend, model, meta, precision, device, b, Path(work), log, compile_mode)
                        check_streams(streams, pred)
                        # in the layout the Predictor takes without a copy, as the pipeline builds
                        # it (an NCHW input to a channels-last network costs ~6% more on CPU)
                        x = example_inputs(meta, b).to(device).contiguous(memory_format=pred.memory_format)
                        time_fn(lambda: pred(x), device, warmup, iters)  # it runs (else a row saying why), warm
                    except StreamsRefused:
                        raise  # a --streams error for the command, not a row of the table
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        ref.status = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        rows.append(ref)
                        continue
                    row = BenchRow(name, f"propose-e2e {backend}", precision, b, "ok")

                    def run_once():
                        out = Path(tempfile.mkdtemp(prefix="e2e-", dir=work))  # removed with `work`, at the end
                        run = propose(pred, None, images, out, meta["input_size"], ProposalConfig(batch=b),
                                      device, precision, workers, writer_processes=writer_processes,
                                      decode_processes=decode_processes, decode_start=decode_start,
                                      streams=streams, device_jpeg=device_jpeg, writer_start=writer_start)
                        return run, run.pairs, run.seconds

                    timed, ratios, k = _paired_runs(pred, x, b, device, warmup, iters, e2e_runs, run_once, ref,
                                                    "pairs/s")
                    rows.append(ref)
                    r = timed[k][0]  # the run with the median ratio: its stages reported
                    row.images_per_s = round(r.pairs / r.seconds, 2)
                    row.median_ms = round(1000 * r.seconds / max(1, -(-r.pairs // b)), 3)
                    ratio = ratios[k]
                    stages = ", ".join(f"{n} {v:.2f} s" for n, v in r.timing.items() if n not in ("wall", "device_busy"))
                    each = ", ".join(f"{n / sec:.1f} / {mo:.1f}" for _, n, sec, mo in timed)
                    row.note = (f"pairs/s over {len(images)} images, {r.pairs} pairs; {len(timed)} timed runs, each "
                                f"against the model alone just before it (e2e / model-only pairs/s: {each}); "
                                f"e2e / model-only = {100 * ratio:.0f}%, the median of "
                                f"{', '.join(f'{100 * v:.0f}' for v in ratios)}%; that run: wall {r.seconds:.2f} s: "
                                f"{stages}; device busy {100 * r.timing['device_busy']:.0f}%; "
                                f"fill {r.fill:.2f} s (starting processes {r.start:.2f} s), drain {r.drain:.2f} s; "
                                f"decoders: {r.decoders} ({r.decode_workers}); "
                                f"writers: {r.writers}; model streams: {r.streams}; JPEGs decoded by: {r.jpeg_decoder}"
                                f"{f' ({r.jpeg_fallbacks} on the CPU)' if r.jpeg_fallbacks else ''}; "
                                f"median_ms = wall time per batch")
                    rows.append(row)
                    log(f"e2e {backend} {precision} b{b}: {row.images_per_s} pairs/s end to end against "
                        f"{timed[k][3]:.2f} model-only just before ({100 * ratio:.0f}%, the median of the runs' "
                        f"ratios {', '.join(f'{100 * v:.0f}' for v in ratios)}%); {stages}; "
                        f"fill {r.fill:.2f} s (starting processes {r.start:.2f} s), drain {r.drain:.2f} s")
    return rows


def _paired_runs(pred, x: torch.Tensor, b: int, device: torch.device, warmup: int, iters: int, runs: int,
                 run_once, ref: BenchRow, unit: str) -> tuple[list[tuple], list[float], int]:
    """A pipeline's runs against its model alone: a warm-up run (workers, allocator, kernels),
    then `runs` timed runs, each just after a model-only timing of `pred(x)` (the machine's
    speed drifts: a ratio of two moments measures the drift as much as the pipeline).
    `run_once()` -> (result, units, seconds). Fills `ref`, the model-only row (the median of
    all its timings); returns the timed runs as (result, units, seconds, model-only units/s),
    their e2e / model-only ratios and the index of the run with the median ratio."""
    timed, lats = [], []
    for rep in range(1 + max(1, runs)):
        if rep:
            lat = time_fn(lambda: pred(x), device, min(warmup, 1), iters)
            lats += lat
        result = run_once()
        if rep:
            timed.append((*result, b / (statistics.median(lat) / 1000)))
    med = statistics.median(lats)
    ref.median_ms, ref.p90_ms, ref.p99_ms = round(med, 3), round(_pct(lats, 0.9), 3), round(_pct(lats, 0.99), 3)
    ref.images_per_s = round(b / (med / 1000), 2)
    ref.note = (f"{unit}; same Predictor, shapes, batch and input layout as the pipeline's; timed "
                f"{len(timed)} x {iters} batches, each time just before an e2e run")
    ratios = [n / sec / mo for _, n, sec, mo in timed]
    return timed, ratios, sorted(range(len(timed)), key=ratios.__getitem__)[len(timed) // 2]


def bench_eval_e2e(model: torch.nn.Module, meta: dict, name: str, images, precisions: list[str], batches: list[int],
                   device: torch.device, workers: int | None, warmup: int, iters: int, log=print,
                   backends: tuple[str, ...] = ("torch",), compile_mode: str | None = "auto",
                   e2e_runs: int = 3) -> list[BenchRow]:
    """boxseg-eval's whole pipeline (`evaluate_segnet1`: decode and letterbox in threads, the
    model, labels and confusion counts on the device) over `images` (an ImageSet with ground
    truth) against the same Predictor alone on inputs of the same shape, batch and layout, in
    images per second; runs paired with model-only timings as `bench_e2e`'s."""
    from boxseg.errors import NonFiniteOutput
    from boxseg.inference import evaluate_segnet1

    rows: list[BenchRow] = []
    model = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as work:
        for backend, precision, b in itertools.product(backends, precisions, batches):
            ref = BenchRow(name, f"model-only {backend}", precision, b, "ok")
            try:
                pred = make_predictor(backend, model, meta, precision, device, b, Path(work), log, compile_mode)
                x = example_inputs(meta, b).to(device).contiguous(memory_format=pred.memory_format)
                time_fn(lambda: pred(x), device, warmup, iters)  # it runs (else a row saying why), warm
            except Exception as e:  # noqa: BLE001 - reported in the table
                ref.status = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(ref)
                continue

            def run_once():
                t = time.perf_counter()
                try:
                    scores = evaluate_segnet1(pred, images, meta["input_size"], device, b, workers=workers)
                except NonFiniteOutput as e:  # raised after the whole pipeline ran: the time stands (random
                    scores = e                # weights at fp16 may overflow), and the note says so
                return scores, len(images), time.perf_counter() - t

            timed, ratios, k = _paired_runs(pred, x, b, device, warmup, iters, e2e_runs, run_once, ref, "images/s")
            rows.append(ref)
            scores, n, sec, mo = timed[k]
            unscored = (f" ({len(scores.ids)} images with non-finite outputs: not scored)"
                        if isinstance(scores, NonFiniteOutput) else "")
            row = BenchRow(name, f"eval-e2e {backend}", precision, b, "ok", images_per_s=round(n / sec, 2),
                           median_ms=round(1000 * sec / -(-n // b), 3))
            each = ", ".join(f"{n / sec:.1f} / {mo:.1f}" for _, n, sec, mo in timed)
            row.note = (f"images/s over {n} images (boxseg-eval's pipeline, mIoU computed); {len(timed)} timed "
                        f"runs, each against the model alone just before it (e2e / model-only images/s: {each}); "
                        f"e2e / model-only = {100 * ratios[k]:.0f}%, the median of "
                        f"{', '.join(f'{100 * v:.0f}' for v in ratios)}%; that run: wall {sec:.2f} s{unscored}; "
                        f"median_ms = wall time per batch")
            rows.append(row)
            log(f"eval e2e {backend} {precision} b{b}: {row.images_per_s} images/s end to end against "
                f"{mo:.2f} model-only just before ({100 * ratios[k]:.0f}%, the median of the runs' ratios "
                f"{', '.join(f'{100 * v:.0f}' for v in ratios)}%)")
    return rows
