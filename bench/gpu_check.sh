#!/usr/bin/env bash
# Every GPU measurement and GPU test of boxseg in one call on a machine with one NVIDIA GPU,
# inside a budget (default 500 s), written to one folder and packed into one tarball.
#
#   On the lent GPU machine (device tool), with the pycocotools wheel in .whl (README, "GPU check"):
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#     -> $OUT/gpu_check.tgz
#   Elsewhere:  bash bench/gpu_check.sh [DEST]   -> DEST/gpu_check_<date>/ and DEST/gpu_check.tgz
#
# Steps, most important first; each has a time limit and the whole run a budget, so the
# tarball is always written; steps.txt says how each ended (rc 124 = its limit).
#   data, e2e       boxseg-propose's pipeline against the model alone: paper SegNet2 @512, batch 64,
#                   fp16, 1,000 medium synthetic images (issue 15; 300 more for val), the torch Predictor,
#                   writer processes
#   e2e_cudagraph   the same with the cudagraph Predictor (the eager network replayed as one CUDA graph
#                   a batch: the model stage without its ~300 launches a batch)
#   e2e_forkserver  cudagraph with decoder and writer processes forked from a forkserver, not from
#                   the CUDA process (their start-up, and its copy-on-write faults, are what differ)
#   e2e_decode_threads  cudagraph with decode threads instead of DataLoader processes (on the 2-core
#                   CPU threads won: no copy-on-write faults after forking; on CUDA the GIL may decide)
#                   (these two, ~20-30 s each, before the compile step, whose compile may take minutes:
#                   with it first they would not have fitted the first call's budget)
#   e2e_eval        boxseg-eval's pipeline against the model alone: paper SegNet1 @513, batch 16 (boxseg-eval's
#                   default), fp16, the 300 medium val images, eager and cudagraph Predictors
#   e2e_compile     the e2e measurement with the compile Predictor (reduce-overhead: CUDA graphs)
#   tests           pytest -m gpu without the compile and aoti cases: propose on CUDA against CPU fp32,
#                   cudagraph against eager, decode threads / processes / forkserver and nvJPEG on CUDA,
#                   fp16 against fp32 labels for the other backends (the CUDA paths CPU cannot test)
#   profile         the same pipeline under torch.profiler on 300 images: top ops by host and device time
#   e2e_nvjpeg      cudagraph with the JPEGs decoded and letterboxed on the GPU (nvJPEG through
#                   torchvision.io.decode_jpeg; the image has torchvision 0.26): used by default only if faster
#   e2e_threads     the same with writer threads (the GIL hypothesis: bench/results/gpu_h200_20261127_b)
#   head_eager      SegNet1 (paper @321), batch 64, fp16: eager torch, channels_last and contiguous, and
#                   the cudagraph Predictor
#   head_compile    the headline cell through the compile Predictor (reduce-overhead: CUDA graphs)
#   tests_compiled  pytest -m gpu, the compile and aoti cases (fp16 against fp32 labels; each compiles:
#                   in one step they used the whole limit before the propose tests ran, 2026-11-27 _a)
#   head_aoti       the headline cell through an AOTInductor package (max-autotune)
#   tables          both networks, eager/cudagraph/onnxruntime/tensorrt, batch 1 and 64, fp16 and fp32
#   tables_compile  both networks through compile (reduce-overhead) and aoti, batch 1 and 64
#   crf             the fully connected CRF (boxseg.crf) on a 375x500 image, 21 classes, on CUDA
#   aoti_tiny       the AOTInductor export of the tiny SegNet1 under faulthandler, phases timed
# Each step writes its own results, so a step cut by its limit loses only itself.
# GPU_CHECK_ONLY="head_aoti tables" runs only the named steps (a second call for the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then DEST=$OUT; R=/tmp/gpu_check; else DEST=${1:-bench/results}; R=$DEST/gpu_check_$(date +%Y%m%d); fi
rm -rf "$R"; mkdir -p "$R" "$DEST"
START=$(date +%s); BUDGET=${GPU_CHECK_BUDGET:-500}
PY=${PYTHON:-python3}

pack() { tar czf "$DEST/gpu_check.tgz" -C "$(dirname "$R")" "$(basename "$R")"; echo "results: $DEST/gpu_check.tgz"; }
trap pack EXIT

step() {  # step NAME LIMIT_SECONDS COMMAND...: run within the budget, log to NAME.log
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 30 )); then echo "$name: not run (budget spent)" | tee -a "$R/steps.txt"; return; fi
    (( limit > left )) && limit=$left
    local t0; t0=$(date +%s)
    echo "== $name (limit $limit s): $*" | tee -a "$R/commands.txt"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$R/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$R/steps.txt"
    tail -n 3 "$R/$name.log"
}

if [ -d .whl ] && ! $PY -c "import pycocotools" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
  git rev-parse HEAD 2>/dev/null; nproc; } > "$R/env.txt" 2>&1
cat "$R/env.txt"
export BOXSEG_CACHE=/tmp/boxseg_cache
B="$PY -m boxseg.cli.bench --device cuda --out $R"

step data 60 $PY -m boxseg.cli.data synth --out /tmp/medium --size medium --n-train 1000 --n-val 300 --n-source 8 --workers 12
E="--model segnet2 --preset paper --e2e --voc-root /tmp/medium/voc/VOC2012 --batch 64 --precision fp16 --workers 12 --warmup 3 --iters 10"
step e2e 90 $B $E --backends torch --tag segnet2_512_e2e
step e2e_cudagraph 90 $B $E --backends cudagraph --tag segnet2_512_e2e_cudagraph
step e2e_forkserver 60 $B $E --backends cudagraph --decoders forkserver --writers forkserver --tag segnet2_512_e2e_cudagraph_forkserver
step e2e_decode_threads 60 $B $E --backends cudagraph --decoders threads --tag segnet2_512_e2e_cudagraph_decode_threads
step e2e_eval 75 $B --model segnet1 --preset paper --e2e --voc-root /tmp/medium/voc/VOC2012 --batch 16 --precision fp16 \
    --backends torch,cudagraph --warmup 3 --iters 10 --tag segnet1_513_eval_e2e
step e2e_compile 150 $B $E --backends compile --tag segnet2_512_e2e_compile
GT="-m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -rs --durations=0"
step tests 120 $PY $GT -k "not compile and not aoti"
step profile 60 $PY bench/profile_e2e.py /tmp/medium/voc/VOC2012 --limit 300 --out $R
step e2e_nvjpeg 60 $B $E --backends cudagraph --decode-on-device --tag segnet2_512_e2e_cudagraph_nvjpeg
step e2e_threads 60 $B $E --backends torch --writers threads --tag segnet2_512_e2e_threads
H="--model segnet1 --preset paper --size 321 --batch 64 --precision fp16 --warmup 5 --iters 30"
step head_eager 60 $B $H --backends torch,torch-cl,torch-nchw,cudagraph --tag segnet1_321_head_eager
step head_compile 120 $B $H --backends compile --tag segnet1_321_head_compile
step tests_compiled 150 $PY $GT -k "compile or aoti"
step head_aoti 150 $B $H --backends aoti --tag segnet1_321_head_aoti
T="--batch 1,64 --precision fp16,fp32 --warmup 3 --iters 10"
step tables 90 bash -c "$B --model segnet1 --preset paper --size 321 $T --backends torch,torch-cl,torch-nchw,cudagraph,onnxruntime,tensorrt \
    --tag segnet1_321_table && $B --model segnet2 --preset paper $T --backends torch,torch-cl,torch-nchw,cudagraph,onnxruntime,tensorrt \
    --tag segnet2_512_table"
step tables_compile 150 bash -c "$B --model segnet1 --preset paper --size 321 $T --backends compile,aoti --compile-mode reduce-overhead \
    --tag segnet1_321_table_compiled && $B --model segnet2 --preset paper $T --backends compile,aoti \
    --compile-mode reduce-overhead --tag segnet2_512_table_compiled"
step crf 60 $PY -c "
import time, torch
from boxseg.crf import dense_crf_full
torch.manual_seed(0)
img = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, device='cuda')
probs = torch.nn.functional.interpolate(torch.randn(1, 21, 48, 64, device='cuda') * 3, size=(375, 500), mode='bilinear')[0].softmax(0)
for k in range(3):
    torch.cuda.synchronize(); t = time.perf_counter(); q = dense_crf_full(probs, img); torch.cuda.synchronize()
    print('fully connected CRF, 375x500, 21 classes, 10 iterations, CUDA:', round(time.perf_counter() - t, 3), 's')
"
step aoti_tiny 60 $PY -c "
import torch, time
from boxseg.config import preset
from boxseg.data.classes import VOC_TARGET_CLASSES
from boxseg.export.aoti import export_aoti
from boxseg.models.meta import build_model, segnet1_meta
meta = segnet1_meta(preset('tiny').segnet1, VOC_TARGET_CLASSES)
for fp16 in (False, True):
    t = time.perf_counter()
    art = export_aoti(build_model(meta).eval(), meta, f'/tmp/tiny_{fp16}.pt2', torch.device('cuda'), fp16, 8)
    print('tiny SegNet1 AOTI', 'fp16' if fp16 else 'fp32', round(time.perf_counter() - t, 1), 's, parity', art['parity'])
"
echo "total $(( $(date +%s) - START )) s" | tee -a "$R/steps.txt"
