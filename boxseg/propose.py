"""Region proposals at scale: every (image, class with boxes) pair through SegNet2, batched
across images, merged into one label map per image (METHOD.md).

The pipeline is a chain of stages with bounded queues:
  decode    workers decode each image and its boxes (not its ground truth), letterbox it to
            the network size and compute its boxes' pixel ranges (on the canvas and on the
            image); a chunk of images arrives as one uint8 (B, S, S, 3) tensor, pinned on
            CUDA. On CUDA the workers are DataLoader processes (forked, or with
            `decode_start="forkserver"` forked from a small server process); on CPU threads,
            since forked processes made the model's process pay a copy-on-write fault on
            every page it wrote afterwards;
  upload    one non-blocking copy per chunk;
  model     pairs in fixed-size batches (`cfg.batch`; only the last is short): the input
            built on the device into one buffer reused batch after batch (normalised image,
            box masks, the score-map channel of SegNet1, once per image), SegNet2 through its
            Predictor (any backend). On CPU with eager torch or onnxruntime 2 batches are in
            flight, each in a thread with half of the threads (`streams`; onnxruntime: a
            session each): with one batch at a time every parallel region of the network
            also waited on whatever else ran on the cores, and a core idled while the main
            thread post-processed; the streams' maps are taken in batch order, so the
            outputs are those of one stream;
  post      on the device: softmax, exact un-letterbox to the image's size, the merge rule
            (`merge_foreground_batch`, byte-identical to the numpy reference; on CUDA all of
            a batch's finished images at once over padded tensors) and per-box instance
            masks, for every image whose pairs are all done; with `cfg.crf` the fully
            connected CRF refines each image's probabilities inside its boxes first;
  download  one device-to-host copy per batch of all its finished images' uint8 outputs;
  write     writers encode the PNGs and write them atomically: threads on CPU (Pillow
            releases the GIL while encoding); on CUDA forked processes (or, with
            `writer_start="forkserver"`, forked from the forkserver), each fed by a thread
            that waits without the GIL, since the writers' Python work held up the main
            loop's kernel launches; at most `2 x writers` batches wait for them, so memory
            stays bounded whatever the set size.
Helper processes end with the command, a kill included (`boxseg.workers`). `ProposalRun`
also gives the fixed costs at both ends: `start` (starting helper processes), `fill` (the
start to the first batch in the model) and `drain` (the last batch in the model to the end).
On CUDA every device stage is queued asynchronously, so the host work of batch n (writing)
overlaps the device work of batch n+1. `ProposalRun.timing` says where the wall time went.
An image whose PNG exists is not computed again, so a rerun completes only what is missing.
Outputs do not depend on the batch size (eval-mode networks; tested bitwise on CPU fp32).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from boxseg.config import ProposalConfig
from boxseg.crf import CRFParams, refine_in_boxes
from boxseg.data.boxes import box_pixel_range
from boxseg.data.coco import encode_rle
from boxseg.data.files import EncodedJpeg, encode_label_png, read_image, write_bytes_atomic, write_files_atomic
from boxseg.data.images import ImageSet
from boxseg.data.transforms import MEAN_U8
from boxseg.errors import BadInputLog, DataError
from boxseg.faults import failpoint, kill_parent_too
from boxseg.workers import (background_worker, before_fork, default_helpers, foreground_worker, in_threads,
                            lower_priority)
from boxseg.predict import as_predictor
from boxseg.predict.base import default_streams, streamable
from boxseg.predict.image import (decode_jpegs, letterbox, letterbox_params, letterbox_tensor, normalize_table,
                                  segnet2_inputs, unletterbox)
from boxseg.proposals import (fill_ranges, merge_foreground, merge_foreground_batch, merge_foreground_fast,
                              merge_foreground_torch, range_masks)

STAGES = ("wait_decode", "upload", "model", "post", "download", "wait_writers")


class _Decoded(Dataset):
    """Worker side: decode, letterbox, box pixel ranges on the canvas and on the image.
    Errors are returned as records (not raised in the worker) so the main process reports
    them with the file."""

    def __init__(self, images: ImageSet, indices: list[int], size: int, keep_image: bool = False,
                 device_jpeg: bool = False):
        self.images, self.indices, self.size = images, indices, size
        self.keep_image = keep_image  # the image itself travels too (the CRF needs it)
        self.device_jpeg = device_jpeg  # plain JPEGs travel encoded, for `_device_canvases`

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        sample_id = self.images.id(i)
        try:
            s = self.images.boxed(i, encoded_jpeg=self.device_jpeg)  # the ground truth is not needed here
        except DataError as e:
            return {"index": i, "id": sample_id, "error": (str(e.path), e.problem)}
        h, w = s.image.shape[:2]
        lb = letterbox_params(h, w, self.size)
        labels = np.asarray(s.labels, np.int64)
        boxes = np.asarray(s.boxes, np.float32).reshape(-1, 4)
        ranges = np.array([box_pixel_range(b * lb.scale, self.size, self.size) for b in boxes], np.int64).reshape(-1, 4)
        image_ranges = np.array([box_pixel_range(b, h, w) for b in boxes], np.int64).reshape(-1, 4)
        rec = {"index": i, "id": sample_id, "lb": lb,
               "boxes": boxes, "labels": labels, "ranges": ranges, "image_ranges": image_ranges,
               "classes": sorted(set(labels.tolist()))}
        if isinstance(s.image, EncodedJpeg):
            rec["jpeg"] = s.image
        else:
            rec["canvas"] = letterbox(s.image, lb, MEAN_U8)
        if self.keep_image:
            rec["image"] = s.image
        return rec


def _decode_in_threads(ds: _Decoded, chunk: int, workers: int, pin: bool = False,
                       background: bool = True) -> Iterator[dict]:
    """The DataLoader's chunks, decoded by `workers` threads instead of processes; at most
    2 x workers chunks in flight (the DataLoader's prefetch). On CPU this is what is fast:
    forking the workers makes every page the model's process then writes a copy-on-write
    fault (on the 2-core CI machine the network ran ~40% slower in the pipeline), while the
    decoders' work (Pillow, OpenCV) mostly runs without the GIL. `background`: at the lowest
    priority, so that they fill the gaps rather than slow the model's parallel regions;
    where each model stream runs one thread there are none, and at the lowest priority
    they starved behind the streams (waiting for decoding: 0.04-0.17 s a run against 0.02-0.05)."""

    def decode(ks: range) -> dict:
        out = _collate([ds[k] for k in ks])
        if pin and out["canvases"] is not None:  # as the DataLoader's pin_memory: uploads without blocking
            out["canvases"] = out["canvases"].pin_memory()
        return out

    return in_threads(decode, len(ds), chunk, workers, background)


def _forkserver():
    """The forkserver start method, its server preloading this module (torch, numpy, Pillow,
    OpenCV), so that a worker starts by a fork of that small process. The server starts on
    first use and serves every later run of this process; the child re-imports the main
    module as multiprocessing's spawn does (scripts need the `if __name__ == "__main__"` guard)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _device_canvases(records: list[dict], host: torch.Tensor | None, device: torch.device,
                     run: ProposalRun) -> torch.Tensor | None:
    """A chunk's canvases on the device, in the order of its good records: those the decoders
    letterboxed (`host`, uploaded) and the JPEGs they left encoded, decoded here on the device
    in one call and letterboxed there (`letterbox_tensor`). A JPEG the device decoder refuses,
    or decodes to another size than its header's, is decoded on the CPU as any other file
    (counted in `run.jpeg_fallbacks`); one that fails there too becomes an error record,
    reported with its file (or skipped with `skip_bad`) as a decoder's error is."""
    jpegs = [r for r in records if "jpeg" in r]
    if not jpegs:
        return host
    images = iter(decode_jpegs([r["jpeg"].data for r in jpegs], device))
    hosts = iter(host if host is not None else ())
    out = []
    for r in records:
        if "error" in r:
            continue
        if "jpeg" not in r:
            out.append(next(hosts))
            continue
        enc, img = r.pop("jpeg"), next(images)
        if img is not None and tuple(img.shape) == (3, *enc.shape[:2]):
            out.append(letterbox_tensor(img, r["lb"], MEAN_U8))
            continue
        run.jpeg_fallbacks += 1
        try:
            image = read_image(enc.path)
        except DataError as e:
            r["error"] = (e.path, e.problem)
            continue
        out.append(torch.from_numpy(letterbox(image, r["lb"], MEAN_U8)).to(device))
    return torch.stack(out) if out else None


def _collate(recs: list[dict]) -> dict:
    """A chunk of decoded images: one uint8 (B, S, S, 3) tensor of the good ones' canvases."""
    good = [r for r in recs if "canvas" in r]  # (not the errors, nor JPEGs left for the device)
    canvases = torch.from_numpy(np.stack([r.pop("canvas") for r in good])) if good else None
    return {"canvases": canvases, "records": recs}


class _Clock:
    """Seconds per stage. On CUDA, device stages are timed by events read back when the
    batch's download is complete (no synchronisation in the main loop). On CPU the model and
    post-processing are also kept as intervals (`span`), since model streams overlap each
    other and the main thread: their union is the time the CPU was doing the model's work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.spans: dict[str, list[tuple[float, float]]] = {"model": [], "post": []}
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.totals[stage] += seconds

    def span(self, stage: str, start: float, end: float) -> None:
        """A CPU stage from `start` to `end` (perf_counter seconds)."""
        with self.lock:
            self.spans[stage].append((start, end))

    def covered(self, *stages: str) -> float:
        """Seconds during which any of `stages` ran (the union of their intervals)."""
        total, reach = 0.0, float("-inf")
        for a, b in sorted(x for st in stages for x in self.spans[st]):
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def between(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class _Inputs:
    """A batch's SegNet2 input built into one buffer, reused batch after batch (no allocation,
    so no fresh pages to fault in each batch); the same values as `segnet2_inputs` alone. On
    CPU the box channel is painted box by box through numpy (a few microseconds a box); on a
    GPU by `range_masks` (a few kernels a batch). For a channels-last network on CPU (eager
    torch) a 4-channel input is built in that layout, so the Predictor does not convert it:
    each image normalised once by a lookup table (`normalize_table`, cv2.LUT), its pairs'
    rows with a zero box channel by cv2.mixChannels, then the boxes painted (2.7 against
    6.0 ms a batch of 64 @128 on one thread, the conversion included)."""

    def __init__(self, batch: int, channels: int, size: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.size, self.device = size, device
        self.hwc = None
        if device.type == "cpu" and channels == 4 and memory_format == torch.channels_last:
            self.hwc = torch.empty((batch, size, size, 4), dtype=torch.float32)  # (B, 4, S, S) channels-last
            self.normed = np.empty((batch, size, size, 3), np.float32)
            self.zero = np.zeros((size, size), np.float32)
        else:  # on a GPU in the network's layout too (the same values; its conversion pass saved, not
            # yet measured); on CPU NCHW: there a channels-last buffer filled by torch's
            # elementwise operations was slower than NCHW and the conversion together
            fmt = memory_format if device.type == "cuda" else torch.contiguous_format
            self.buf = torch.empty((batch, channels, size, size), dtype=torch.float32, device=device).contiguous(
                memory_format=fmt)

    def __call__(self, canvases: torch.Tensor, img_idx: torch.Tensor, cls: torch.Tensor, ranges: list[np.ndarray],
                 segnet1) -> torch.Tensor:
        if self.hwc is not None:
            return self._channels_last(canvases, img_idx, ranges)
        x = self.buf[: len(ranges)]
        if self.device.type == "cpu":
            fill_ranges(x[:, 3].numpy(), ranges, 1.0)
            return segnet2_inputs(canvases, None, cls, segnet1, img_idx, out=x)
        return segnet2_inputs(canvases, range_masks(ranges, self.size, self.size, self.device), cls, segnet1, img_idx,
                              out=x)

    def _channels_last(self, canvases: torch.Tensor, img_idx: torch.Tensor, ranges: list[np.ndarray]) -> torch.Tensor:
        u8, normed, hwc, table = canvases.numpy(), self.normed, self.hwc.numpy(), normalize_table()
        for k in range(len(u8)):
            cv2.LUT(u8[k], table, dst=normed[k])
        for p, i in enumerate(img_idx.tolist()):
            cv2.mixChannels([normed[i], self.zero], [hwc[p]], [0, 0, 1, 1, 2, 2, 3, 3])
        fill_ranges(hwc[: len(ranges), :, :, 3], ranges, 1.0, clear=False)  # (the box channel is 0 already)
        return self.hwc[: len(ranges)].permute(0, 3, 1, 2)


@dataclass
class ProposalRun:
    """What `propose` did; the manifest is built from it."""
    written: int = 0
    skipped_existing: int = 0
    pairs: int = 0
    failed: list[dict] = field(default_factory=list)     # non-finite outputs, nothing written
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)            # seconds per stage (STAGES), device_busy
    writers: str = ""                                     # "threads", "processes[ (forkserver)]"
    decoders: str = ""                                    # "threads", "processes[ (forkserver)]", "main thread"
    decode_workers: int = 0                               # how many
    streams: int = 1                                      # batches in the model at once (CPU: threads)
    jpeg_decoder: str = "cpu"                             # or "nvJPEG": JPEGs decoded on the device
    jpeg_fallbacks: int = 0                               # JPEGs the device decoder refused: decoded on the CPU
    start: float = 0.0   # seconds starting the writer processes and decoder processes (forks), if any
    fill: float = 0.0    # seconds from the start to the first batch handed to the model (start-up, first decodes)
    drain: float = 0.0   # seconds from the last batch handed to the model to the end (its model, post, writes)

    @property
    def model_seconds(self) -> float:
        return self.timing.get("model", 0.0)

    def to_dict(self) -> dict:
        d = {"written": self.written, "skipped_existing": self.skipped_existing, "pairs": self.pairs,
             "failed": self.failed, "seconds": round(self.seconds, 3), "model_seconds": round(self.model_seconds, 3),
             "stages": {k: round(v, 4) for k, v in self.timing.items()}, "writers": self.writers,
             "decoders": self.decoders, "decode_workers": self.decode_workers, "streams": self.streams,
             "jpeg_decoder": self.jpeg_decoder, "jpeg_fallbacks": self.jpeg_fallbacks,
             "start": round(self.start, 4), "fill": round(self.fill, 4), "drain": round(self.drain, 4)}
        if self.seconds > 0:
            d["images_per_s"] = round(self.written / self.seconds, 2)
            d["pairs_per_s"] = round(self.pairs / self.seconds, 2)
        return d


@dataclass
class _Image:
    rec: dict
    canvas: torch.Tensor                                          # uint8 (S, S, 3) on the device
    # the image's pairs in class order, as slices of the batches that computed them: fg
    # probability (k, S', S') and whether each whole map is finite (k,)
    maps: list[torch.Tensor] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)
    done: int = 0                                                 # pairs computed

    def outputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, S', S') maps and (K,) finite flags: views when one batch held all the pairs."""
        if not self.maps:
            return None, None
        if len(self.maps) == 1:
            return self.maps[0], self.finite[0]
        return torch.cat(self.maps), torch.cat(self.finite)


@torch.no_grad()
def propose(segnet2, segnet1, images: ImageSet, out_dir: Path, size: int, cfg: ProposalConfig,
            device: torch.device, precision: str = "fp32", workers: int | None = 0, instances: bool = False,
            skip_bad: bool = False, log: BadInputLog | None = None, shard: tuple[int, int] = (0, 1),
            progress: bool = False, writers: int | None = None, chunk: int = 16,
            writer_processes: bool | None = None, decode_processes: bool | None = None,
            decode_start: str = "fork", streams: int | None = None, device_jpeg: bool = False,
            writer_start: str = "fork") -> ProposalRun:
    """Write `out_dir/ID.png` (and with `instances`, `out_dir/instances/ID.json`) for every
    image of this shard that lacks one. `segnet2` / `segnet1` are Predictors (a torch module
    is wrapped in the eager one at `precision`). A bad image raises DataError naming the
    file, or with `skip_bad` is logged in `log` and skipped. `chunk` images are decoded and
    uploaded together. `writers` encode and write (default: 2 on CPU, where they share the
    cores with the model; on CUDA half the available CPUs, 2 to 8): threads, or with
    `writer_processes` (default: on CUDA) forked processes fed by one thread each, so that
    their Python work never holds the GIL the main loop needs between kernel launches;
    `writer_start` "forkserver" forks them from the forkserver (`_forkserver`) instead of
    this process, as `decode_start` does for the decoders.
    `workers` decode: DataLoader processes with `decode_processes` (default: on CUDA), else
    threads (`_decode_in_threads`); 0 decodes in the main thread; None: `default_helpers` (2
    threads on CPU, half the CPUs as processes on CUDA). `decode_start` starts the
    processes by "fork" (of this process) or "forkserver" (`_forkserver`: forked from a small
    server process, so this one, with its CUDA context and heap, is neither copied nor left
    with copy-on-write faults; the dataset is pickled to each worker instead). `streams`
    batches are in the model at once, each in a thread with a share of torch's threads
    (default `default_streams`: 2 on CPU with eager torch or onnxruntime, else 1); their maps are
    taken in batch order, so the outputs do not depend on it. `device_jpeg`: plain JPEGs are
    decoded on `device` (`_device_canvases`: torchvision.io.decode_jpeg, nvJPEG on CUDA), the
    other files as before; not with `cfg.crf`, which needs the image on the host."""
    from tqdm import tqdm

    device = torch.device(device)
    segnet2 = as_predictor(segnet2, "segnet2", size, device, precision, cfg.batch)
    segnet1 = as_predictor(segnet1, "segnet1", size, device, precision, cfg.batch)
    log = log if log is not None else BadInputLog()
    out_dir.mkdir(parents=True, exist_ok=True)
    if instances:
        (out_dir / "instances").mkdir(exist_ok=True)
    rank, world = shard
    mine = list(range(rank, len(images), world))
    todo = [i for i in mine if not _done(out_dir, images.id(i), instances)]
    run = ProposalRun(skipped_existing=len(mine) - len(todo))
    cuda = device.type == "cuda"
    if writers is None:
        writers = default_helpers(cuda)
    device_jpeg = device_jpeg and not cfg.crf
    if device_jpeg:
        decode_jpegs([], device)  # torchvision is there, or TorchvisionMissing now rather than mid-run
    run.jpeg_decoder = ("nvJPEG" if cuda else f"torchvision on {device.type}") if device_jpeg else "cpu"
    decoded = _Decoded(images, todo, size, keep_image=cfg.crf, device_jpeg=device_jpeg)
    if workers is None:
        workers = default_helpers(cuda if decode_processes is None else decode_processes)
    run.decode_workers = workers
    if workers == 0:
        run.decoders = "main thread"
    else:
        run.decoders = "processes" if (cuda if decode_processes is None else decode_processes) else "threads"
        if decode_start not in ("fork", "forkserver"):
            raise ValueError(f"decode_start must be fork or forkserver, not {decode_start!r}")
        if run.decoders == "processes" and decode_start == "forkserver":
            run.decoders = "processes (forkserver)"
    if writer_start not in ("fork", "forkserver"):
        raise ValueError(f"writer_start must be fork or forkserver, not {writer_start!r}")
    clock = _Clock(device)
    if streams is None:
        streams = default_streams(device, segnet2, segnet1)
    streams = max(1, streams)
    check_streams(streams, segnet2, segnet1)
    # each stream its own Predictor (the same one for eager torch; a session each for onnxruntime)
    models2 = segnet2.for_streams(streams) if streams > 1 else [segnet2]
    models1 = segnet1.for_streams(streams) if streams > 1 and segnet1 is not None else [segnet1] * streams
    run.streams = streams
    inputs = [_Inputs(cfg.batch, 4 if segnet1 is None else 5, size, device, segnet2.memory_format)
              for _ in range(streams)]
    main_threads = torch.get_num_threads()
    per_stream = max(1, main_threads // streams)
    pending: dict[int, _Image] = {}
    queue: list[tuple[int, int]] = []
    t0 = time.perf_counter()  # the writer processes' start counts too
    procs = None
    if cuda if writer_processes is None else writer_processes:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forked now, before the loader's and the pool's threads exist (or by the forkserver); they
        # die with this process
        if writer_start == "forkserver":
            context = _forkserver()
        else:
            before_fork()
            context = multiprocessing.get_context("fork")
        procs = ProcessPoolExecutor(max(1, writers), mp_context=context, initializer=_writer_process,
                                    initargs=(os.getpid(),))
        for f in [procs.submit(int, 0) for _ in range(max(1, writers))]:  # all started now (a forkserver's
            f.result()                                                 # pool would start them one by one later)
    run.start = time.perf_counter() - t0
    run.writers = ("threads" if procs is None else
                   "processes (forkserver)" if writer_start == "forkserver" else "processes")
    pool = ThreadPoolExecutor(max(1, writers), thread_name_prefix="boxseg-write",
                              initializer=lower_priority if not cuda else None)
    slots = threading.BoundedSemaphore(2 * max(1, writers))      # batches waiting for the writers
    futures: list[Future] = []
    bar = tqdm(total=len(todo), desc="proposals", unit="img", disable=not progress, leave=False)

    def post(done: list[int], t_model) -> None:
        """Device post-processing of the finished images, one download, hand to the writers."""
        entries = [(st.rec, *st.outputs()) for st in (pending.pop(i) for i in done)]
        tp = time.perf_counter()
        flat, layout = _post_process(entries, cfg, instances, device)
        t_post = clock.mark()
        if cuda:
            host = flat.to("cpu", non_blocking=True)  # into pinned memory
            ready = clock.mark()
            host_done = torch.cuda.Event()
            host_done.record()
            job = (host, layout, host_done, (t_model, t_post, ready))
        else:
            clock.span("post", tp, t_post)
            job = (flat, layout, None, None)
        tw = time.perf_counter()
        slots.acquire()
        clock.add("wait_writers", time.perf_counter() - tw)
        futures.append(pool.submit(_write_batch, out_dir, job, clock, instances, run, slots, precision, procs))
        bar.update(len(done))

    model_pool = (ThreadPoolExecutor(streams, thread_name_prefix="boxseg-model", initializer=torch.set_num_threads,
                                     initargs=(per_stream,)) if streams > 1 else None)
    if model_pool is not None:
        torch.set_num_threads(1)  # the main thread's own torch work: post-processing, small
    inflight: deque = deque()  # batches in the model streams, oldest first
    seq = 0
    handed: list[float] = []  # when the first and the latest batch went to the model (perf_counter)

    def forward(args: tuple, slot: int) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """Inputs, the model, foreground probabilities and finite flags of one batch (in a stream),
        and when it started and ended (perf_counter seconds)."""
        t = time.perf_counter()
        with torch.no_grad():
            logits = models2[slot](inputs[slot](*args, models1[slot]))
            fg = logits.softmax(1)[:, 1]
            # softmax gives [0, 1] or NaN, and the max propagates NaN: a map's max is finite exactly
            # when the whole map is (a reduction; isfinite over the maps cost 20x more)
            finite = torch.isfinite(fg.amax((1, 2)))
        return fg, finite, (t, time.perf_counter())

    def flush(pairs: list[tuple[int, int]]) -> None:
        nonlocal seq
        oldest = None
        if len(inflight) >= streams:  # wait for the oldest batch: its stream and input buffer are then free
            oldest = inflight.popleft()
            oldest = (*oldest[:2], oldest[2].result(), oldest[3])
        t_in = clock.mark()
        order = list(dict.fromkeys(i for i, _ in pairs))         # the batch's images, each once
        pos = {i: k for k, i in enumerate(order)}
        canvases = torch.stack([pending[i].canvas for i in order])
        img_idx = torch.tensor([pos[i] for i, _ in pairs]).to(device, non_blocking=True)
        cls = torch.tensor([m for _, m in pairs]).to(device, non_blocking=True)
        ranges = [pending[i].rec["ranges"][pending[i].rec["labels"] == m] for i, m in pairs]
        args, slot = (canvases, img_idx, cls, ranges), seq % streams
        seq += 1
        now = time.perf_counter()
        handed[:] = [handed[0] if handed else now, now]
        if model_pool is None:
            finish(pairs, order, forward(args, slot), t_in)
        else:
            inflight.append((pairs, order, model_pool.submit(forward, args, slot), t_in))
        if oldest is not None:  # its post-processing after the next batch is in its stream, not before
            finish(*oldest)

    def finish(pairs: list[tuple[int, int]], order: list[int], result, t_in) -> None:
        """A batch's maps to its images, in batch order; post-process the images it completed."""
        fg, finite, (t0, t1) = result.result() if isinstance(result, Future) else result  # (in batch order)
        k = 0
        for i in order:  # an image's pairs are consecutive in the queue, in class order
            n = 0
            while k + n < len(pairs) and pairs[k + n][0] == i:
                n += 1
            st = pending[i]
            st.maps.append(fg[k: k + n])
            st.finite.append(finite[k: k + n])
            st.done += n
            k += n
        t_model = clock.mark()
        if not cuda:  # one stream: from the batch's inputs to its maps handed out; else in the stream
            clock.span("model", *((t_in, t_model) if model_pool is None else (t0, t1)))
        run.pairs += len(pairs)
        failpoint("propose.batch")
        post([i for i in order if pending[i].done == len(pending[i].rec["classes"])], (t_in, t_model))

    it = None
    try:
        if run.decoders == "threads":
            it = _decode_in_threads(decoded, max(1, chunk), workers, pin=cuda, background=per_stream > 1)
        else:
            context = _forkserver() if workers and decode_start == "forkserver" else None
            if workers and context is None:
                before_fork()
            it = iter(DataLoader(decoded, batch_size=max(1, chunk), collate_fn=_collate, num_workers=workers,
                                 prefetch_factor=2 if workers else None, pin_memory=cuda, persistent_workers=False,
                                 worker_init_fn=functools.partial(background_worker if not cuda else foreground_worker,
                                                                  command=os.getpid()),
                                 multiprocessing_context=context))
        run.start = time.perf_counter() - t0  # (the decoders' threads start on the first chunk's wait)
        while True:
            tw = time.perf_counter()
            batch = next(it, None)
            clock.add("wait_decode", time.perf_counter() - tw)
            if batch is None:
                break
            tu = time.perf_counter()
            canvases = batch["canvases"].to(device, non_blocking=True) if batch["canvases"] is not None else None
            clock.add("upload", time.perf_counter() - tu)  # on CUDA: the time to queue it
            if device_jpeg:
                td = time.perf_counter()
                canvases = _device_canvases(batch["records"], canvases, device, run)
                clock.add("wait_decode", time.perf_counter() - td)  # (decoding is queued here)
            k = 0
            for rec in batch["records"]:
                if "error" in rec:
                    err = DataError(*rec["error"])
                    if not skip_bad:
                        raise err
                    log.skip(err, item=rec["id"])
                    bar.update(1)
                    continue
                i = rec["index"]
                pending[i] = _Image(rec, canvases[k])
                k += 1
                if not rec["classes"]:
                    post([i], None)
                    continue
                queue += [(i, m) for m in rec["classes"]]
                while len(queue) >= cfg.batch:
                    flush(queue[: cfg.batch])
                    queue = queue[cfg.batch:]
            run.written += _reap(futures)
        if queue:
            flush(queue)
        while inflight:
            finish(*inflight.popleft())
        tw = time.perf_counter()
        run.written += sum(f.result() for f in futures)  # re-raises a write error here
        futures.clear()
        clock.add("wait_writers", time.perf_counter() - tw)
    finally:
        if hasattr(it, "close"):  # the decode threads: cancelled and joined
            it.close()
        if model_pool is not None:
            model_pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(main_threads)  # the streams set torch's default for new threads
        pool.shutdown(wait=True)
        if procs is not None:
            procs.shutdown(wait=True)
        bar.close()
    end = time.perf_counter()
    run.seconds = end - t0
    if handed:  # the pipeline's fill and drain: the fixed costs that a longer run spreads thinner
        run.fill, run.drain = handed[0] - t0, end - handed[1]
    # the device's busy share: model + post (+ download on CUDA, timed by events); on CPU the
    # time covered by the model (in any stream) or post-processing
    if cuda:
        busy = clock.totals["model"] + clock.totals["post"] + clock.totals["download"]
    else:
        clock.totals["model"], clock.totals["post"] = clock.covered("model"), clock.covered("post")
        busy = clock.covered("model", "post")
    run.timing = {**clock.totals, "wall": run.seconds,
                  "device_busy": (busy / run.seconds) if run.seconds > 0 else 0.0}
    return run


class StreamsRefused(ValueError):
    """More than one model stream asked of a Predictor that holds one set of buffers."""


def check_streams(streams: int | None, segnet2, segnet1=None) -> None:
    """Raise StreamsRefused where `streams` > 1 and a Predictor cannot run batches at once
    (`streamable`); boxseg-propose and boxseg-bench turn it into a --streams error."""
    if streams is not None and streams > 1 and not streamable(segnet2, segnet1):
        raise StreamsRefused(f"{streams} model streams run batches at once, which the {segnet2.backend} backend "
                             f"on {segnet2.device.type} does not allow (one set of buffers for its runs): eager "
                             f"torch, or onnxruntime on CPU, do")


def _post_process(entries: list, cfg: ProposalConfig, instances: bool, device: torch.device,
                  together: bool | None = None):
    """Finished images -> one flat uint8 tensor on `device` and its layout (`_Layout`): each
    image's per-class finite flags (K bytes), the label maps of all images padded to the
    largest (N x H x W bytes) and, with `instances`, each box's mask inside its box and the
    boxes' scores (float32 as bytes). `together` (default: on CUDA) merges all images in one
    set of kernels over the padded batch, which costs a few kernel launches an image instead
    of ~40; on CPU, where a launch is cheap and padding is not, image by image, merged in
    numpy (`merge_foreground_fast`: an operation costs microseconds there, ~10 in torch).
    All give the same bytes (elementwise the same arithmetic; tested)."""
    together = device.type == "cuda" if together is None else together
    numpy_merge = not together and device.type == "cpu"
    n = len(entries)
    hmax = max((rec["lb"].h for rec, _, _ in entries), default=0)
    wmax = max((rec["lb"].w for rec, _, _ in entries), default=0)
    groups = [list(range(n))] if together else [[j] for j in range(n)]
    labels = torch.zeros((n, hmax, wmax), dtype=torch.uint8, device=device)
    probs_of: dict[int, torch.Tensor] = {}  # image -> (K, h, w) probabilities (a view) for the instance masks
    for group in groups:
        recs = [entries[j][0] for j in group]
        kmax = max(len(r["classes"]) for r in recs)
        if kmax == 0:
            continue  # images without boxes: all background
        if numpy_merge:  # one image on CPU: numpy, microseconds an operation where torch's take ~10
            (j,), (rec,) = group, recs
            lb, cls = rec["lb"], rec["classes"]
            fg = _probabilities(entries[j][1], rec, cfg, device)
            probs_of[j] = fg
            if cfg.merge == "order":
                lab = merge_foreground(fg.numpy(), cls, rec["boxes"], rec["labels"], cfg.threshold, mode="order")
            else:
                inside = fill_ranges(np.empty((len(cls), lb.h, lb.w), bool),
                                     [rec["image_ranges"][rec["labels"] == c] for c in cls], True)
                lab = merge_foreground_fast(fg.numpy(), cls, inside, cfg.threshold, cfg.margin, cfg.class_margin)
            labels[j, : lb.h, : lb.w] = torch.from_numpy(lab)
            continue
        gh, gw = max(r["lb"].h for r in recs), max(r["lb"].w for r in recs)
        probs = torch.zeros((len(group), kmax, gh, gw), dtype=torch.float32, device=device)
        ranges, classes = [], np.zeros((len(group), kmax), np.uint8)
        for g, (rec, j) in enumerate(zip(recs, group)):
            lb, cls = rec["lb"], rec["classes"]
            if cls:
                probs[g, : len(cls), : lb.h, : lb.w] = _probabilities(entries[j][1], rec, cfg, device)
                probs_of[j] = probs[g, : len(cls), : lb.h, : lb.w]
            classes[g, : len(cls)] = cls
            ranges += [rec["image_ranges"][rec["labels"] == c] for c in cls]
            ranges += [np.zeros((0, 4), np.int64)] * (kmax - len(cls))
        if cfg.merge == "order":  # boxes painted in annotation order: image by image
            for g, (rec, j) in enumerate(zip(recs, group)):
                if rec["classes"]:
                    lb = rec["lb"]
                    labels[j, : lb.h, : lb.w] = merge_foreground_torch(
                        probs_of[j], rec["classes"], None, rec["image_ranges"], rec["labels"], cfg.threshold,
                        mode="order")
            continue
        inside = range_masks(ranges, gh, gw, device).view(len(group), kmax, gh, gw)
        cls_t = torch.from_numpy(classes).to(device, non_blocking=True)
        merged = merge_foreground_batch(probs, cls_t, inside, cfg.threshold, cfg.margin, cfg.class_margin)
        if together:
            labels[:, :gh, :gw] = merged
        else:
            labels[group[0], :gh, :gw] = merged[0]
    finite = [f for _, _, f in entries if f is not None]
    parts = [torch.cat(finite).to(torch.uint8) if finite else torch.zeros(0, dtype=torch.uint8, device=device),
             labels.flatten()]
    layout = _Layout(hmax, wmax, [])
    for j, (rec, _, _) in enumerate(entries):
        sizes, crops = [], []
        if instances and rec["classes"]:
            probs = probs_of[j]
            index = {c: q for q, c in enumerate(rec["classes"])}
            scores = []
            for (r0, r1, c0, c1), lab in zip(rec["image_ranges"].tolist(), rec["labels"].tolist()):
                p = probs[index[lab], r0:r1, c0:c1]
                m = p >= cfg.threshold
                scores.append(torch.where(m, p, 0).sum() / m.sum().clamp(min=1))
                crops.append((r0, r1, c0, c1))
                parts.append(m.flatten().to(torch.uint8))
                sizes.append((r1 - r0) * (c1 - c0))
            parts.append(torch.stack(scores).float().view(torch.uint8))
            sizes.append(4 * len(scores))
        layout.images.append((rec, sizes, crops))
    return torch.cat(parts), layout


def _probabilities(maps: torch.Tensor, rec: dict, cfg: ProposalConfig, device: torch.device) -> torch.Tensor:
    """An image's (K, h, w) foreground probabilities from its (K, S', S') maps on the canvas;
    with `cfg.crf` refined by the dense CRF inside the boxes (boxseg.crf.refine_in_boxes)."""
    lb, cls = rec["lb"], rec["classes"]
    fg = unletterbox(maps, lb)
    if cfg.crf:
        inside = range_masks([rec["image_ranges"][rec["labels"] == c] for c in cls], lb.h, lb.w, device)
        fg = refine_in_boxes(fg, inside, torch.from_numpy(rec["image"]).to(device), CRFParams())
    return fg


@dataclass
class _Layout:
    """How `_post_process`'s flat bytes divide: the per-class finite flags of all images in
    order, the label maps (N, hmax, wmax), then per image its instance pieces (`sizes`)."""
    hmax: int
    wmax: int
    images: list  # (rec, instance piece sizes, box crops) per image


def _write_batch(out_dir: Path, job: tuple, clock: _Clock, instances: bool, run: ProposalRun,
                 slots: threading.Semaphore, precision: str, procs=None) -> int:
    """Writer thread: wait for the batch's download (CUDA), then write its images here or,
    with `procs`, in a writer process (waiting for it without the GIL). Returns the images
    written."""
    try:
        host, layout, host_done, times = job
        if host_done is not None:
            host_done.synchronize()
            t_model, t_post, ready = times
            if t_model is not None:
                clock.add("model", clock.between(t_model[0], t_model[1]))
                clock.add("post", clock.between(t_model[1], t_post))
            clock.add("download", clock.between(t_post, ready))
        buf = host.numpy()
        if procs is None:
            written, failed = _write_outputs(out_dir, buf, layout, instances, precision)
        else:  # the bytes travel by pipe; the records without the images the CRF used
            portable = _Layout(layout.hmax, layout.wmax, [({k: v for k, v in rec.items() if k != "image"}, sizes, crops)
                                                          for rec, sizes, crops in layout.images])
            # `host` stays alive (and its pinned buffer unreused) until the process has the bytes
            written, failed = procs.submit(_write_outputs, out_dir, buf, portable, instances, precision).result()
        run.failed.extend(failed)
        return written
    finally:
        slots.release()


def _writer_process(command: int) -> None:
    """A writer process: dies with the command (pid `command`; its parent, or the forkserver
    that forked it), yields the CPU to it, and a failpoint inside it kills the whole command
    (as a kill of the command during that write would)."""
    background_worker(0, command)
    kill_parent_too(command)


def _write_outputs(out_dir: Path, buf: np.ndarray, layout: _Layout, instances: bool,
                   precision: str) -> tuple[int, list[dict]]:
    """Split a batch's bytes and write each image's outputs, all made durable by one sync; an
    image's PNG goes last since its presence marks the image done. Returns the images
    written and the non-finite failures."""
    written, failed, files = 0, [], []
    n = len(layout.images)
    nfin = sum(len(rec["classes"]) for rec, _, _ in layout.images)
    finite_all = buf[:nfin]
    labels = buf[nfin: nfin + n * layout.hmax * layout.wmax].reshape(n, layout.hmax, layout.wmax)
    at, fat = nfin + labels.size, 0
    for j, (rec, sizes, crops) in enumerate(layout.images):
        pieces = []
        for size in sizes:
            pieces.append(buf[at: at + size])
            at += size
        k = len(rec["classes"])
        finite, fat = finite_all[fat: fat + k], fat + k
        lb = rec["lb"]
        if not finite.all():
            for c, ok in zip(rec["classes"], finite.tolist()):
                if not ok:
                    failed.append({"id": rec["id"], "class": c, "problem":
                                   f"non-finite network output at {precision} (overflow?); not written"})
            continue
        if instances:
            scores = pieces[-1].view(np.float32) if crops else np.zeros(0, np.float32)
            dets = []
            for q, ((r0, r1, c0, c1), lab, box) in enumerate(zip(crops, rec["labels"], rec["boxes"])):
                mask = np.zeros((lb.h, lb.w), bool)
                mask[r0:r1, c0:c1] = pieces[q].reshape(r1 - r0, c1 - c0).astype(bool)
                score = float(scores[q]) if mask.any() else 0.0
                dets.append({"label": int(lab), "box": [round(float(v), 2) for v in box], "score": round(score, 5),
                             "segmentation": encode_rle(mask)})
            files.append((out_dir / "instances" / f"{rec['id']}.json", json.dumps(dets).encode()))
        files.append((out_dir / f"{rec['id']}.png", encode_label_png(labels[j, : lb.h, : lb.w])))
        written += 1
    write_files_atomic(files)  # one filesystem sync for the batch, then the renames in this order
    return written, failed


def _reap(futures: list[Future]) -> int:
    """Drop finished writes (re-raising a write error) so the list stays short; returns the
    images they wrote."""
    still, written = [], 0
    for f in futures:
        if f.done():
            written += f.result()
        else:
            still.append(f)
    futures[:] = still
    return written


def _done(out_dir: Path, sample_id: str, instances: bool) -> bool:
    return (out_dir / f"{sample_id}.png").exists() and (not instances or (out_dir / "instances" / f"{sample_id}.json").exists())


SIGNATURE = ".boxseg-propose.json"


def claim_folder(out_dir: Path, signature: dict, overwrite: bool = False) -> None:
    """Make `out_dir` this run's, before anything is computed. A folder holding proposals made
    with other settings (another model by content, backend, precision, merge rule, method)
    is refused, naming the fields that differ, since a rerun writes only what is missing and
    would mix the two; `overwrite` deletes the earlier outputs instead. `signature` is
    recorded in out_dir/.boxseg-propose.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SIGNATURE
    made = sorted(out_dir.glob("*.png"))
    if made and not overwrite:
        try:
            old = json.loads(path.read_text()) if path.exists() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old is None:
            raise DataError(out_dir, f"holds {len(made)} proposals but no record ({SIGNATURE}) of what made them; "
                                     f"pass --overwrite to replace them, or choose another --out")
        changed = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
        if changed:
            raise DataError(out_dir, f"holds proposals made with other settings ({', '.join(changed)}); a rerun "
                                     f"completes only what is missing and would mix the two: pass --overwrite to "
                                     f"replace them, or choose another --out")
    if overwrite:
        for f in made + sorted((out_dir / "instances").glob("*.json")) + [out_dir / "manifest.json",
                                                                            out_dir / "instances.json"]:
            f.unlink(missing_ok=True)
    write_bytes_atomic(path, json.dumps(signature, indent=2, sort_keys=True).encode())


def merge_manifest(out_dir: Path, parts: list[dict], head: dict) -> dict:
    """The manifest of a proposal folder: `head` (model, predictor, settings, versions) with
    the counts, timing and stage breakdown of every rank's `ProposalRun.to_dict()` merged
    (parts: [{"rank", "run", "bad_input"}]); boxseg-propose and the training rounds write it."""
    runs = [p["run"] for p in parts]
    skipped = [s for p in parts for s in p["bad_input"]["skipped"]]
    clipped = {f: n for p in parts for f, n in p["bad_input"].get("clipped_files", {}).items()}
    failed = [f for r in runs for f in r["failed"]]
    secs = max(r["seconds"] for r in runs)
    written = sum(r["written"] for r in runs)
    counts = {"images": len(list(out_dir.glob("*.png"))), "written": written,
              "skipped_existing": sum(r["skipped_existing"] for r in runs), "pairs": sum(r["pairs"] for r in runs),
              "skipped_bad": len(skipped), "failed": len(failed),
              "jpeg_fallbacks": sum(r.get("jpeg_fallbacks", 0) for r in runs)}
    stages: dict = {}
    for r in runs:  # seconds per pipeline stage, summed over ranks (boxseg.propose.STAGES)
        for k, v in r.get("stages", {}).items():
            if k != "device_busy":
                stages[k] = round(stages.get(k, 0.0) + v, 4)
    busy = [r["stages"]["device_busy"] for r in runs if "device_busy" in r.get("stages", {})]
    timing = {"seconds": secs, "per_rank": [r["seconds"] for r in runs],
              "model_seconds": sum(r.get("model_seconds", 0.0) for r in runs), "stages": stages,
              "device_busy": round(sum(busy) / len(busy), 4) if busy else None,
              # the fixed costs at both ends (the slowest rank's): starting helper processes, the
              # start to the first batch in the model (fill), the last batch in the model to the end
              "start": max(r.get("start", 0.0) for r in runs), "fill": max(r.get("fill", 0.0) for r in runs),
              "drain": max(r.get("drain", 0.0) for r in runs),
              # how the run decoded, ran the model and wrote (every rank alike)
              "decoders": runs[0].get("decoders"), "decode_workers": runs[0].get("decode_workers"),
              "streams": runs[0].get("streams"),
              "jpeg_decoder": runs[0].get("jpeg_decoder"),
              "writers": runs[0].get("writers")}
    if secs > 0:
        timing["images_per_s"] = round(written / secs, 2)
        timing["pairs_per_s"] = round(counts["pairs"] / secs, 2)
    return {**head, "counts": counts, "timing": timing, "skipped_files": skipped, "failed": failed,
            "clipped_boxes": sum(clipped.values()), "clipped_files": clipped}


def coco_results(out_dir: Path, images: ImageSet, coco_ids: tuple[int, ...], image_id: Callable[[int], int]) -> list[dict]:
    """The per-image instance files as one COCO results list (RLE masks), in dataset order."""
    res = []
    for i in range(len(images)):
        path = out_dir / "instances" / f"{images.id(i)}.json"
        if not path.exists():
            continue
        for d in json.loads(path.read_text()):
            x0, y0, x1, y1 = d["box"]
            res.append({"image_id": image_id(i), "category_id": int(coco_ids[d["label"] - 1]),
                        "segmentation": d["segmentation"], "score": d["score"],
                        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]})
    return res


def voc_instance_truth(images: ImageSet, coco_ids: tuple[int, ...]) -> tuple[dict, dict[int, np.ndarray]]:
    """The SegmentationObject instances of a VOC split as a COCO ground-truth dict (image_id =
    position in the split, category ids `coco_ids`), for the images that have them, and each
    such image's void mask (255: borders and unlabelled objects)."""
    from pycocotools import mask as mask_utils

    ds = images.dataset
    gt = {"images": [], "annotations": [], "categories": [{"id": int(c)} for c in coco_ids]}
    void: dict[int, np.ndarray] = {}
    for i in range(len(images)):
        truth = ds.instances(i)
        if truth is None:
            continue
        h, w = truth.void.shape
        gt["images"].append({"id": i, "height": h, "width": w})
        void[i] = truth.void
        for label, m in zip(truth.labels, truth.masks):
            rle = encode_rle(m)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "iscrowd": 0,
                                      "category_id": int(coco_ids[label - 1]), "segmentation": rle,
                                      "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist()})
    return gt, void


def drop_void(results: list[dict], void: dict[int, np.ndarray]) -> list[dict]:
    """Results of the images in `void` with their void pixels taken out of every mask, so that
    they count neither for nor against a detection (as 255 in mIoU); other images dropped."""
    from pycocotools import mask as mask_utils

    out = []
    for r in results:
        v = void.get(r["image_id"])
        if v is None:
            continue
        m = mask_utils.decode(r["segmentation"])
        out.append({**r, "segmentation": encode_rle(m.astype(bool) & ~v)})
    return out


def mask_ap(ground_truth: Path | dict, results: list[dict], image_ids: list[int]) -> dict:
    """COCO mask AP of `results` against the instances of `ground_truth` (a COCO instances
    file or dict), over `image_ids` (pycocotools COCOeval)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "images": len(image_ids)}
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, dict):
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
        else:
            gt = COCO(str(ground_truth))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = image_ids
        ev.params.catIds = sorted({r["category_id"] for r in results} | _gt_cats(gt, image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2]), "images": len(image_ids)}


def _gt_cats(gt, image_ids: list[int]) -> set[int]:
    return {a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, iscrowd=None))}
