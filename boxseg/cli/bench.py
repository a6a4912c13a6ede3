"""boxseg-bench: latency / throughput per backend, precision and batch; JSON lines, a markdown
table and a plot, with the command, date, device and library versions."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from boxseg.cli import HELP, Exit, exit_on_errors, threads_option, version
from boxseg.threads import configure_threads
from boxseg.workers import DECODERS, WRITERS, decoder_options, writer_options


def _model(spec: str, preset: str, size: int | None):
    from boxseg.config import preset as get_preset
    from boxseg.data.classes import VOC_TARGET_CLASSES
    from boxseg.models.meta import build_model, segnet1_meta, segnet2_meta

    if spec in ("segnet1", "segnet2", "segnet2-5ch"):
        cfg = get_preset(preset)
        if spec == "segnet1":
            meta = segnet1_meta(cfg.segnet1, VOC_TARGET_CLASSES)
        else:
            meta = segnet2_meta(cfg.segnet2, 5 if spec.endswith("5ch") else 4)
        if size:
            meta = {**meta, "input_size": size}
        return build_model(meta).eval(), meta
    from boxseg.models.meta import load_checkpoint_model

    model, meta = load_checkpoint_model(spec)
    return model, ({**meta, "input_size": size} if size else meta)


@click.command(context_settings=HELP)
@version("boxseg-bench")
@click.option("--model", "spec", default="segnet1", show_default=True,
              help="segnet1, segnet2, segnet2-5ch (random weights of --preset) or a checkpoint.")
@click.option("--preset", default="paper", show_default=True, help="Network sizes for segnet1/segnet2.")
@click.option("--size", type=int, help="Input side (default: the preset's: SegNet1 test_size, SegNet2 input_size).")
@click.option("--backends", default=None,
              help="Comma list of torch (the Predictor's own memory format), torch-cl / torch-nchw (eager with "
                   "channels_last / contiguous forced), cudagraph (CUDA), compile, aoti, onnxruntime, tensorrt. Default: "
                   "torch,torch-cl,onnxruntime; with --e2e: torch.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma list of batch sizes.")
@click.option("--precision", "precisions", default="fp32", show_default=True, help="Comma list of fp32, fp16, bf16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs first.")
@click.option("--iters", type=int, default=10, show_default=True, help="Timed runs.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True,
              help="Folder for TAG.jsonl, TAG.md and TAG.png.")
@click.option("--tag", default=None, help="File name stem for the results (default: model_device).")
@click.option("--e2e", is_flag=True, help="The user's whole pipeline against the model alone: for a SegNet2 "
              "boxseg-propose's, in (image, class) pairs/s, on --voc-root's train split; for a SegNet1 boxseg-eval's "
              "(decoding, the model, labels, mIoU), in images/s, on its val split (default: the synthetic world). "
              "The options below named for propose apply to SegNet2 only, except --workers (decode threads).")
@click.option("--voc-root", type=click.Path(path_type=Path), help="Images for --e2e.")
@click.option("--writers", "writer_kind", type=click.Choice(WRITERS), default="auto",
              show_default=True, help="--e2e: boxseg-propose's PNG writers (auto: processes on CUDA, threads on CPU; "
                                      "forkserver: processes forked from a small server process instead of this one).")
@click.option("--decoders", "decoder_kind", type=click.Choice(DECODERS),
              default="auto", show_default=True,
              help="--e2e: boxseg-propose's image decoders (auto: processes on CUDA, threads on CPU; forkserver: "
                   "processes forked from a small server process instead of this one).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode workers for --e2e (default as boxseg-propose's: 2 threads on CPU, half the CPUs, 2 to 8, "
                   "as processes on CUDA).")
@click.option("--decode-on-device", is_flag=True,
              help="--e2e: boxseg-propose --decode-on-device (JPEGs decoded by torchvision on the device: nvJPEG).")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="--e2e: boxseg-propose's model streams (default: 2 on CPU with the torch or onnxruntime "
                   "backend, else 1).")
@click.option("--e2e-runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="--e2e: timed runs of the pipeline after a warm-up run, each against the model alone timed just "
                   "before it; the median of their ratios is reported.")
@click.option("--compile-mode", default="auto", show_default=True,
              help="torch.compile mode of the compile backend: auto (reduce-overhead on CUDA, default on CPU), "
                   "default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs.")
@threads_option
def main(spec, preset, size, backends, batches, precisions, device, warmup, iters, out_dir, tag, e2e, voc_root,
         workers, streams, decode_on_device, e2e_runs, writer_kind, decoder_kind, compile_mode, threads) -> None:
    """Time the model; write TAG.jsonl, TAG.md and TAG.png into --out."""
    import torch

    from boxseg.bench import bench, environment, markdown, plot, rows_to_dicts
    from boxseg.cli.train import resolve_device
    from boxseg.data.files import write_bytes_atomic

    configure_threads(threads)  # as boxseg-propose: its decode workers run at the lowest priority
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (stated in the results)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # as every Predictor sets it (boxseg.predict.base)
    from boxseg.errors import DataError

    try:
        model, meta = _model(spec, preset, size)
    except (DataError, KeyError) as e:
        click.echo(f"error: {e.args[0] if isinstance(e, KeyError) else e}", err=True)
        sys.exit(Exit.BAD_INPUT)
    name = f"{Path(spec).stem if spec.endswith('.pt') else spec}@{meta['input_size']}"
    batch_list, precision_list = [int(b) for b in batches.split(",")], precisions.split(",")
    if e2e and meta["kind"] == "segnet1":  # boxseg-eval's pipeline, on its default split
        given = [opt for opt, on in (("--decoders", decoder_kind != "auto"), ("--writers", writer_kind != "auto"),
                                     ("--streams", streams is not None), ("--decode-on-device", decode_on_device)) if on]
        if given:
            raise click.UsageError(f"{', '.join(given)}: boxseg-propose's, for --e2e with a SegNet2; a SegNet1's "
                                   f"--e2e times boxseg-eval (decode threads: --workers)")
        from boxseg.bench import bench_eval_e2e
        from boxseg.cli.train import synth_world
        from boxseg.data.images import ImageSet
        from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset

        with exit_on_errors():
            images = ImageSet(VOCDataset(voc_root or synth_world("tiny", 0)[2], "val", masks="require"),
                              NUM_VOC_CLASSES)
        rows = bench_eval_e2e(model, meta, name, images, precision_list, batch_list, dev, workers, warmup, iters,
                              log=lambda s: click.echo(s, err=True), backends=tuple((backends or "torch").split(",")),
                              compile_mode=compile_mode, e2e_runs=e2e_runs)
    elif e2e:
        if meta["kind"] != "segnet2":
            raise click.UsageError("--e2e times boxseg-propose (a SegNet2) or boxseg-eval (a SegNet1)")
        from boxseg.bench import bench_e2e
        from boxseg.cli.train import synth_world
        from boxseg.data.images import ImageSet
        from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset

        root = voc_root or synth_world("tiny", 0)[2]
        images = ImageSet(VOCDataset(root, "train"), NUM_VOC_CLASSES)
        from boxseg.propose import StreamsRefused

        try:
            with exit_on_errors():  # (torchvision missing for --decode-on-device: exit 6 naming it)
                rows = bench_e2e(model, meta, name, images, precision_list, batch_list, dev, workers, warmup, iters,
                                 log=lambda s: click.echo(s, err=True), backends=tuple((backends or "torch").split(",")),
                                 compile_mode=compile_mode,
                                 e2e_runs=e2e_runs, streams=streams, device_jpeg=decode_on_device,
                                 **decoder_options(decoder_kind), **writer_options(writer_kind))
        except StreamsRefused as e:  # (each backend's Predictor checked as it is made, before it is timed)
            raise click.BadParameter(str(e), param_hint="--streams") from None
    else:
        rows = bench(model, meta, name, (backends or "torch,torch-cl,onnxruntime").split(","), precision_list,
                     batch_list, dev, warmup, iters, log=lambda s: click.echo(s, err=True), compile_mode=compile_mode)
    env = environment(dev)
    command = "boxseg-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    tag = tag or f"{spec.replace('/', '_')}_{meta['input_size']}_{env.get('gpu', 'cpu').replace(' ', '-')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"command": command, **env, **r}) for r in rows_to_dicts(rows)]
    write_bytes_atomic(out_dir / f"{tag}.jsonl", ("\n".join(lines) + "\n").encode())
    header = (f"`{command}`  \n{env['date']}, device {env.get('gpu', env['cpu'])} ({env['device']}, "
              f"{env['threads']} threads), boxseg at {env['commit'] or 'an unknown commit'}, torch {env['torch']}, "
              f"onnxruntime {env['onnxruntime']}; "
              f"TF32 off; FLOPs counted by torch.utils.flop_counter; 'of matmul' = achieved TFLOP/s over "
              f"a same-dtype matrix product timed in the same run.\n\n")
    table = markdown(rows)
    write_bytes_atomic(out_dir / f"{tag}.md", (header + table + "\n").encode())
    plot(rows, out_dir / f"{tag}.png", f"{name} on {env.get('gpu', env['cpu'])} ({env['date']})")
    click.echo(table)
    click.echo(f"results: {out_dir / tag}.{{jsonl,md,png}}")


if __name__ == "__main__":
    main()
