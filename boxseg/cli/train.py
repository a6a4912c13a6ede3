"""boxseg-train: the whole alternating scheme and its baselines, from one command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import torch

from boxseg.cli import HELP, Exit, exit_on_errors, fail, stop_on_sigterm, threads_option, version
from boxseg.config import TrainConfig, config_problems, load_yaml, override, preset
from boxseg.data.files import output_folder
from boxseg.threads import configure_threads


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; a device this machine does not have is a usage error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N",
                                 param_hint="--device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available here (no GPU, or a CPU-only torch)", param_hint="--device")
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                     param_hint="--device")
    elif dev.type != "cpu":
        raise click.BadParameter(f"device {name!r} is not supported; expected auto, cpu, cuda or cuda:N",
                                 param_hint="--device")
    return dev


def synth_cache_dir(size: str, seed: int) -> Path:
    root = Path(os.environ.get("BOXSEG_CACHE", Path.home() / ".cache" / "boxseg"))
    return root / "synth" / f"{size}-seed{seed}"


def synth_world(size: str, seed: int) -> tuple[Path, Path, Path]:
    """(coco_images, coco_ann, voc_root) of the cached synthetic world, built by rank 0 if missing
    or written by an older boxseg (`SYNTH_FORMAT`)."""
    from boxseg.data.synth import SYNTH_FORMAT, size_preset, world_paths, write_synth
    from boxseg.train import dist

    cache = synth_cache_dir(size, seed)
    if dist.is_main():
        meta = cache / "synth.json"
        try:
            old = json.loads(meta.read_text()).get("format", 1) if meta.exists() else None
        except (json.JSONDecodeError, AttributeError, OSError):
            old = 0  # unreadable: rebuild
        if old is None or old < SYNTH_FORMAT:
            what = "building" if old is None else f"rebuilding (format {old} < {SYNTH_FORMAT})"
            click.echo(f"{what} the synthetic world ({size}, seed {seed}) in {cache}", err=True)
            from boxseg.cli.data import calibration_line

            world = write_synth(cache, seed=seed, size=size_preset(size))
            click.echo(calibration_line(world.calibration), err=True)
    dist.barrier()
    return world_paths(cache)


@click.command(context_settings=HELP)
@version("boxseg-train")
@click.option("--preset", "preset_name", default=None,
              help="paper (METHOD.md's figures) or tiny (CPU demo). Default: tiny on the synthetic world, paper on real data.")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path), help="YAML overlay of any fields.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Set any config field, e.g. --set segnet1.iters=500.")
@click.option("--setting", type=click.Choice(["weak", "semi", "full"]), help="Supervision on the target.")
@click.option("--rounds", type=click.IntRange(min=0), help="Alternating rounds (default 3; 0: the baselines only).")
@click.option("--voc-root", type=click.Path(path_type=Path), help="VOC2012 folder (target). Omit for the synthetic world.")
@click.option("--coco-ann", type=click.Path(path_type=Path), help="COCO instances JSON (source).")
@click.option("--coco-images", type=click.Path(path_type=Path), help="COCO image folder (source).")
@click.option("--semi-list", type=click.Path(exists=True), help="semi: file of target ids that keep their masks.")
@click.option("--semi-fraction", type=float, help="semi: fraction of target train images that keep their masks.")
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), default=Path("runs/default"), show_default=True,
              help="The run folder (config, stages, proposals, results).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue the run in --out (complete stages are reused, a stage resumes from last.pt).")
@click.option("--skip-bad", is_flag=True, help="Skip and list bad inputs instead of stopping.")
@click.option("--overwrite", is_flag=True,
              help="Start --out afresh: delete the config, stages, proposals and results an earlier run left there.")
@click.option("--deterministic", is_flag=True,
              help="torch deterministic algorithms; bitwise reproducible on CPU with --threads 1 (with more threads "
                   "a rare run has been seen to differ).")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader worker processes (config workers).")
@click.option("--seed", type=int, help="Seed of every stage (config seed; stage seeds derive from it).")
@click.option("--infer-backend", type=click.Choice(["torch", "cudagraph", "compile"]),
              help="Predictor for the proposals and val scores between rounds (config infer_backend; default torch).")
@click.option("--infer-precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Their precision (config infer_precision; default auto: fp16 on CUDA, fp32 on CPU, as boxseg-propose).")
@threads_option
def main(preset_name, config_file, sets, setting, rounds, voc_root, coco_ann, coco_images, semi_list, semi_fraction,
         device, run_dir, resume, skip_bad, overwrite, deterministic, workers, seed, infer_backend, infer_precision,
         threads) -> None:
    """Train SegNet2 and SegNet1 in alternating rounds, plus the baselines, and print the table."""
    from boxseg.train import dist

    real = voc_root is not None
    if real and (coco_ann is None or coco_images is None):
        raise click.UsageError("real data needs --voc-root, --coco-ann and --coco-images together")
    try:
        cfg: TrainConfig = preset(preset_name or ("paper" if real else "tiny"))
    except KeyError as e:
        raise click.BadParameter(e.args[0], param_hint="--preset") from None
    if config_file:  # a bad config file is bad input (it is named), not a wrong option
        try:
            cfg = load_yaml(config_file, cfg)
        except ValueError as e:
            fail(e, Exit.BAD_INPUT)
    try:
        flags = {"setting": setting, "rounds": rounds, "semi_list": semi_list, "semi_fraction": semi_fraction,
                 "device": device, "data.voc_root": voc_root and str(voc_root), "data.coco_ann": coco_ann and str(coco_ann),
                 "data.coco_images": coco_images and str(coco_images), "data.skip_bad": skip_bad or None,
                 "deterministic": deterministic or None, "workers": workers, "seed": seed,
                 "infer_backend": infer_backend,
                 "infer_precision": infer_precision}
        for k, v in flags.items():
            if v is not None:
                cfg = override(cfg, k, v)
        for s in sets:
            k, eq, v = s.partition("=")
            if not eq:
                raise ValueError(f"--set expects FIELD=VALUE, got {s!r}")
            cfg = override(cfg, k.strip(), v)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    problems = config_problems(cfg)  # before anything is written: a bad value must not leave a run folder behind
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint="the config (--set, --config or a flag)")
    dev = resolve_device(cfg.device)  # as the config: refused before --overwrite clears anything
    if cfg.sync_batch_norm and dev.type != "cuda":
        raise click.BadParameter("sync_batch_norm needs CUDA devices (torch's SyncBatchNorm)", param_hint="--set")
    if cfg.infer_backend == "cudagraph" and dev.type != "cuda":
        raise click.BadParameter(f"infer_backend cudagraph needs a CUDA device, not {dev}",
                                 param_hint="--infer-backend")
    stop_on_sigterm()
    with exit_on_errors():
        output_folder(run_dir)
    if overwrite and run_dir.is_dir():  # start the folder afresh: what an earlier run of boxseg-train wrote goes
        import shutil

        for name in ("config.yaml", "results.json", "stages", "proposals"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise click.UsageError(f"{run_dir} is not empty; pass --resume, --overwrite to start it afresh, "
                               f"or choose another --out")
    configure_threads(threads, cfg.workers)
    dist.init_from_env(dev)
    world = dist.rank_world()[1]
    for field, b in (("segnet1.batch", cfg.segnet1.batch), ("segnet2.batch", cfg.segnet2.batch)):
        if b % world:  # the batch is global: each of the world's processes takes batch / world
            dist.shutdown()
            raise click.BadParameter(f"{field}={b} is the global batch and does not divide among {world} processes",
                                     param_hint="--set")
    lock = None
    if dist.is_main():  # one trainer per run folder: a second one would interleave its checkpoints
        from boxseg.data.files import lock_folder

        with exit_on_errors():
            lock = lock_folder(run_dir, "boxseg-train")
    try:
        _train(cfg, run_dir, dev)
    finally:  # released however the run ends (the OS would at exit; a caller in the same process needs it now)
        if lock is not None:
            lock.close()


def _train(cfg: TrainConfig, run_dir: Path, dev: torch.device) -> None:
    from boxseg.train import dist
    from boxseg.train.alternate import Scheme, open_datasets, prepare_run, results_table

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.data.voc_root is None:
        coco_images_p, coco_ann_p, voc_root_p = synth_world(cfg.data.synth_size, cfg.data.synth_seed)
    else:
        voc_root_p, coco_ann_p, coco_images_p = Path(cfg.data.voc_root), Path(cfg.data.coco_ann), Path(cfg.data.coco_images)
    with exit_on_errors():
        data = open_datasets(voc_root_p, coco_ann_p, coco_images_p, cfg.data.train_split, cfg.data.val_split,
                             cfg.data.skip_bad, cache=cfg.data.voc_root is None)
    if data.log.skipped and dist.is_main():
        click.echo(data.log.summary(), err=True)
    with exit_on_errors():
        prepare_run(cfg, run_dir)
    scheme = Scheme(cfg, run_dir, data, dev, progress=sys.stderr.isatty())
    from boxseg.train.loop import TrainingDiverged
    try:
        with exit_on_errors():
            res = scheme.run()
    except TrainingDiverged as e:
        fail(e, Exit.DIVERGED)
    if dist.is_main():
        click.echo(results_table(res))
        if "ratio_learned_full" in res:
            click.echo(f"final round / full: {res['ratio_learned_full']:.3f}; "
                       f"gain over box-filled: {res.get('gain_over_box_points', float('nan')):+.1f} points")
        click.echo(f"results: {run_dir / 'results.json'}")
    dist.shutdown()


if __name__ == "__main__":
    main()
