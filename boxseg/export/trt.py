"""TensorRT engines built from the exported ONNX file through the TensorRT Python API.

TensorRT 10: FP16 by the builder flag (BuilderFlag.FP16) on the fp32 graph.
TensorRT 11: networks are strongly typed and there is no FP16 builder flag, so FP16 comes
from the FP16 ONNX graph (`boxseg-export --fp16`); the precision follows the graph's types.
An optimisation profile min 1 / opt `batch` / max 2 x `batch`; the timing cache is saved
beside the engine and reused by the next build.
"""

from __future__ import annotations

import json
from pathlib import Path

from boxseg.data.files import write_bytes_atomic
from boxseg.errors import DataError
from boxseg.export.common import write_sidecar
from boxseg.predict.tensorrt import import_tensorrt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: Path, meta: dict, engine_path: Path, fp16: bool, batch: int,
                 timing_cache: Path | None = None, workspace_gib: int = 8) -> dict:
    trt = import_tensorrt()
    major = trt_major(trt)
    graph_meta = json.loads(onnx_path.with_suffix(onnx_path.suffix + ".json").read_text())
    if major >= 11 and fp16 and graph_meta.get("precision") != "fp16":
        raise ValueError("TensorRT >= 11 is strongly typed: FP16 needs the FP16 ONNX graph (export with --fp16)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11 or graph_meta.get("precision") == "fp16":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DataError(onnx_path, f"TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if fp16 and major < 11 and graph_meta.get("precision") != "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = timing_cache or engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    c, s = meta["in_channels"], meta["input_size"]
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, c, s, s), (batch, c, s, s), (2 * batch, c, s, s))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    write_bytes_atomic(engine_path, bytes(serialized))
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    art = {**meta, "artifact": "tensorrt", "precision": "fp16" if fp16 else "fp32", "tensorrt": trt.__version__,
           "profile": {"min": 1, "opt": batch, "max": 2 * batch}, "from_onnx": onnx_path.name}
    write_sidecar(engine_path, art)
    return art
