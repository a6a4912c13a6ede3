"""AOTInductor: torch.export + an AOTInductor package (.pt2) that loads without boxseg's
model code (torch._inductor.aoti_load_package).

The compile runs in a child process (`python -X faulthandler -m boxseg.export.aoti`) by
default: it prints each phase as it starts and how long it took, and a crash inside
torch's compiler (a segmentation fault, say) becomes a clear error naming the phase, with
faulthandler's trace, instead of killing the caller. The batch is static by default (the
Predictor pads a short batch), like compile's fixed shapes; `dynamic_batch` makes it a
dimension in [1, batch].
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from boxseg.data.files import atomic_path
from boxseg.export.common import example_inputs, export_parity, write_sidecar
from boxseg.predict.aoti import AotiPredictor
from boxseg.predict.base import memory_format_for

PHASE = "aoti phase:"


class AotiExportError(RuntimeError):
    """The AOTInductor build failed or crashed; says in which phase and why."""


def _phase(log: Callable[[str], None], name: str):
    class _Timer:
        def __enter__(self):
            log(f"{PHASE} {name} ...")
            self.t = time.perf_counter()

        def __exit__(self, et, e, tb):
            if e is None:
                log(f"{PHASE} {name} done in {time.perf_counter() - self.t:.1f} s")
                return False
            raise AotiExportError(f"AOTInductor export failed in phase '{name}': {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return _Timer()


def export_aoti_inprocess(model: torch.nn.Module, meta: dict, path: Path, device: torch.device, fp16: bool = False,
                          batch: int = 64, dynamic_batch: bool = False, autotune: bool | None = None,
                          log: Callable[[str], None] = print) -> dict:
    """Compile for `device` (a CUDA package needs a CUDA device here) in this process."""
    device = torch.device(device)
    precision = "fp16" if fp16 else "fp32"
    dtype = torch.float16 if fp16 else torch.float32
    autotune = device.type == "cuda" if autotune is None else autotune
    model = copy.deepcopy(model).eval().to(device)
    net = copy.deepcopy(model).to(dtype)
    example_batch = 2 if dynamic_batch else batch
    x = example_inputs(meta, example_batch).to(device)
    # the package is compiled for one input layout and does not check the strides it is given:
    # the layout (the Predictor's, boxseg.predict.base.memory_format_for) is recorded and the
    # AotiPredictor feeds exactly that
    fmt = memory_format_for(device, precision)
    net = net.to(memory_format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _phase(log, f"torch.export ({'dynamic batch <= ' + str(batch) if dynamic_batch else 'batch ' + str(batch)}, "
                         f"{precision}, {device.type})"):
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=batch)}} if dynamic_batch else None
            ep = torch.export.export(net, (x.to(dtype).contiguous(memory_format=fmt),), dynamic_shapes=shapes)
        with _phase(log, f"AOTInductor compile and package (C++{' + Triton' if device.type == 'cuda' else ''}"
                         f"{', max-autotune' if autotune else ''})"), atomic_path(path) as tmp:
            pkg = tmp.with_suffix(".pt2")
            torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg),
                                                     inductor_configs={"max_autotune": bool(autotune)})
            pkg.replace(tmp)
    art = {**meta, "artifact": "aoti", "precision": precision, "device": device.type,
           "static_batch": None if dynamic_batch else batch, "max_batch": batch,
           "input_memory_format": "channels_last" if fmt == torch.channels_last else "contiguous"}
    with _phase(log, "load the package and check parity"), torch.no_grad():
        ref = model(x)
        out = AotiPredictor(path, art, device, precision, batch)(x)  # the package's own dtype
        art["parity"] = export_parity(ref, out, meta["kind"], precision, f"AOTInductor {device.type}", len(x))
    write_sidecar(path, art)
    return art


def export_aoti(model: torch.nn.Module, meta: dict, path: Path, device: torch.device, fp16: bool = False,
                batch: int = 64, dynamic_batch: bool = False, autotune: bool | None = None,
                log: Callable[[str], None] = print, isolate: bool = True, timeout: float | None = None) -> dict:
    """Write `path` (+ `path.json`) and return the artifact metadata, parity included. With
    `isolate`, the compile runs in a child process; its phase lines are passed to `log`, and
    a crash or a non-zero exit raises AotiExportError with the phase and the child's last lines."""
    if not isolate:
        return export_aoti_inprocess(model, meta, path, device, fp16, batch, dynamic_batch, autotune, log)
    from boxseg.models.checkpoint import save_checkpoint

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="boxseg-aoti-") as tmp:
        ckpt = Path(tmp) / "model.pt"
        save_checkpoint(ckpt, {"model": model.state_dict(), "meta": meta})
        cmd = [sys.executable, "-X", "faulthandler", "-m", "boxseg.export.aoti", str(ckpt), str(path),
               "--device", str(device), "--batch", str(batch)] + (["--fp16"] if fp16 else []) \
            + (["--dynamic-batch"] if dynamic_batch else []) \
            + ([] if autotune is None else ["--autotune" if autotune else "--no-autotune"])
        tail: deque[str] = deque(maxlen=40)
        phase = "starting the child process"
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if line.startswith(PHASE):
                    log(line)
                    if line.endswith("..."):
                        phase = line.removeprefix(PHASE).strip().removesuffix("...").strip()
                if timeout and time.perf_counter() - t0 > timeout:
                    proc.kill()
                    raise AotiExportError(f"AOTInductor export timed out after {timeout:.0f} s in phase '{phase}'")
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        how = f"was killed by signal {-rc}" + (" (segmentation fault)" if rc == -11 else "") if rc < 0 else f"exited with {rc}"
        last = "\n".join(f"    {t}" for t in tail if not t.startswith(PHASE))
        raise AotiExportError(f"AOTInductor export {how} in phase '{phase}'; its last output:\n{last}")
    return json.loads(path.with_suffix(path.suffix + ".json").read_text())


def _main() -> None:
    """The child process of `export_aoti`: build from a checkpoint."""
    from boxseg.models.meta import load_checkpoint_model

    ap = argparse.ArgumentParser(prog="python -m boxseg.export.aoti")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--dynamic-batch", action="store_true")
    ap.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None)
    a = ap.parse_args()
    model, meta = load_checkpoint_model(a.checkpoint)
    try:
        export_aoti_inprocess(model, meta, a.out, torch.device(a.device), a.fp16, a.batch, a.dynamic_batch,
                              a.autotune, log=lambda s: print(s, flush=True))
    except AotiExportError as e:
        print(f"error: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _main()
