"""The alternating scheme of METHOD.md, with the baselines, in one resumable run directory.

run_dir/
  config.yaml                     the resolved config
  stages/<stage>/final.pt         per-stage weights (last.pt while running), metrics.csv
  proposals/<name>/ID.png         every round's proposals and each baseline's labels
  results.json                    per round and per baseline figures, the ratio learned/full
Every stage and every proposal folder that is complete is reused, so `--resume` (or simply
running the same command again) continues where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from boxseg.config import TrainConfig, save_yaml
from boxseg.data.classes import SOURCE_CLASSES, VOC_TARGET_CLASSES, ClassMap
from boxseg.data.coco import COCOSource
from boxseg.data.files import write_bytes_atomic
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.errors import BadInputLog, DataError
from boxseg.faults import failpoint
from boxseg.inference import evaluate_segnet1, gt_reader, label_reader, score_label_dir, write_baseline
from boxseg.models.meta import segnet2_meta
from boxseg.predict import Predictor, default_precision, torch_predictor
from boxseg.propose import merge_manifest, propose
from boxseg.train import dist
from boxseg.train.loop import Stage
from boxseg.train.segnet1 import train_segnet1
from boxseg.train.segnet2 import train_segnet2
from boxseg.versions import library_versions


@dataclass
class Datasets:
    source: ImageSet        # COCO, 60 classes + background
    train: ImageSet         # VOC target train (boxes; masks where they exist)
    val: ImageSet           # VOC target val (masks)
    log: BadInputLog


def open_datasets(voc_root: Path, coco_ann: Path, coco_images: Path, train_split: str, val_split: str,
                  skip_bad: bool, cache: bool) -> Datasets:
    log = BadInputLog()
    source = COCOSource(coco_ann, coco_images, skip_bad=skip_bad, log=log)
    train = VOCDataset(voc_root, train_split, skip_bad=skip_bad, log=log)
    val = VOCDataset(voc_root, val_split, masks="require", skip_bad=skip_bad, log=log)
    return Datasets(ImageSet(source, SOURCE_CLASSES.num_classes, cache), ImageSet(train, NUM_VOC_CLASSES, cache),
                    ImageSet(val, NUM_VOC_CLASSES, cache), log)


def semi_indices(cfg: TrainConfig, train: ImageSet) -> list[int]:
    """Target train images that keep their ground-truth masks in the `semi` setting."""
    if cfg.setting != "semi":
        return []
    ids = train.dataset.ids
    if cfg.semi_list:
        wanted = Path(cfg.semi_list).read_text().split()
        missing = sorted(set(wanted) - set(ids))
        if missing:
            raise DataError(cfg.semi_list, f"ids not in the train split: {missing[:5]}")
        chosen = [ids.index(w) for w in wanted]
    else:
        k = int(round(cfg.semi_fraction * len(ids)))
        chosen = sorted(np.random.default_rng([cfg.seed, 99]).permutation(len(ids))[:k].tolist())
    without = [ids[i] for i in chosen if train[i].mask is None]
    if without:
        raise DataError(cfg.semi_list or "semi_fraction", f"semi: images without a ground-truth mask: {without[:5]}")
    return chosen


class Scheme:
    """Runs the stages in order, skipping the ones already complete."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, data: Datasets, device: torch.device,
                 progress: bool = False, log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.data, self.device, self.progress = cfg, run_dir, data, device, progress
        self.log = log if dist.is_main() else (lambda s: None)
        self.results_path = run_dir / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results.update({"setting": cfg.setting, "preset": cfg.preset, "rounds": self.results.get("rounds", {}),
                             "baselines": self.results.get("baselines", {})})

    # -- helpers ---------------------------------------------------------------------------
    def planned_stages(self) -> list[str]:
        """The names of the stages `run` trains, in order."""
        cfg = self.cfg
        names = ["segnet1_full"] if ("full" in cfg.baselines or cfg.setting == "full") else []
        if cfg.setting == "full":
            return names
        names += [f"segnet1_{b}" for b in cfg.baselines if b != "full"]
        for r in range(1, cfg.rounds + 1):
            names += (["segnet2_r1", "segnet1_source"] if r == 1 else [f"segnet2_r{r}"]) + [f"segnet1_r{r}"]
        return names

    def stage(self, name: str, iters: int, batch: int) -> Stage:
        plan = self.planned_stages()
        position = (plan.index(name) + 1, len(plan)) if name in plan else None
        return Stage(name, self.run_dir / "stages" / name, iters, batch, self.cfg.checkpoint_every, self.cfg.workers,
                     position, self.cfg.sync_batch_norm)

    def seed(self, name: str) -> int:
        return (self.cfg.seed * 7919 + zlib.crc32(name.encode())) % (2**31)

    def save(self) -> None:
        if dist.is_main():
            write_bytes_atomic(self.results_path, json.dumps(self.results, indent=2).encode())

    def proposals_dir(self, name: str) -> Path:
        return self.run_dir / "proposals" / name

    def _done(self, d: Path) -> bool:
        return (d / "done.json").exists()

    def _mark_done(self, d: Path, info: dict) -> None:
        write_bytes_atomic(d / "done.json", json.dumps(info).encode())

    def segnet1(self, name: str, images: ImageSet, label_of, classes: ClassMap, indices=None, iters: int | None = None):
        c = self.cfg.segnet1
        return train_segnet1(self.stage(name, iters or c.iters, c.batch), images, label_of, classes, c,
                             self.seed(name), self.device, self.cfg.amp, indices, self.progress)

    @property
    def infer_precision(self) -> str:
        p = self.cfg.infer_precision
        return default_precision(self.device) if p == "auto" else p

    def predictor(self, model: torch.nn.Module | None, kind: str, batch: int) -> Predictor | None:
        """The round's network as the Predictor boxseg-propose / boxseg-eval would build for it
        (backend `infer_backend`, precision `infer_precision`)."""
        if model is None:
            return None
        if kind == "segnet2":
            meta = segnet2_meta(self.cfg.segnet2, model.in_channels)
        else:
            meta = {"kind": "segnet1", "input_size": self.cfg.segnet1.test_size}
        return torch_predictor(model, meta, self.device, self.infer_precision, self.cfg.infer_backend, batch)

    def val_miou(self, model) -> dict:
        pred = self.predictor(model, "segnet1", 16)
        scores = evaluate_segnet1(pred, self.data.val, self.cfg.segnet1.test_size, self.device)
        return {"val_miou": scores.miou, "val_iou": scores.iou}

    def target_labels(self, prop_dir: Path, semi: list[int]):
        """Proposals, with ground truth swapped in for the `semi` images."""
        from_props, from_gt = label_reader(prop_dir, self.data.train), gt_reader(self.data.train)
        keep = set(semi)
        return lambda i: from_gt(i) if i in keep else from_props(i)

    # -- the scheme ------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        train = self.data.train
        if "full" in cfg.baselines or cfg.setting == "full":
            self.baseline_full()
        if cfg.setting == "full":
            return self.finish()
        for name in cfg.baselines:
            if name != "full":
                self.baseline(name)
        semi = semi_indices(cfg, train)
        self.results["semi_ids"] = [train.id(i) for i in semi]
        c2 = cfg.segnet2
        segnet2, source_segnet1, target_segnet1 = None, None, None
        for r in range(1, cfg.rounds + 1):
            key = f"round{r}"
            self.log(f"== round {r}")
            if r == 1:
                segnet2 = train_segnet2(self.stage("segnet2_r1", c2.iters, c2.batch), self.data.source, c2,
                                        self.seed("segnet2_r1"), self.device, amp=cfg.amp, progress=self.progress)
                src_dir = self.proposals_dir("source_r1")
                self.propose(segnet2, None, self.data.source, src_dir)
                source_segnet1 = self.segnet1("segnet1_source", self.data.source,
                                              label_reader(src_dir, self.data.source), SOURCE_CLASSES,
                                              iters=max(1, round(cfg.segnet1.source_iters_factor * cfg.segnet1.iters)))
                src_scores, src_cover = score_label_dir(src_dir, self.data.source)
                self.add_quality(src_dir, src_scores, src_cover)
                self.results["source_proposal_miou_r1"] = src_scores.miou
            else:
                failpoint(f"round:{r}")
                segnet2 = train_segnet2(self.stage(f"segnet2_r{r}", c2.iters_next, c2.batch), self.data.source, c2,
                                        self.seed(f"segnet2_r{r}"), self.device, init=segnet2,
                                        segnet1=source_segnet1, amp=cfg.amp, progress=self.progress)
            tgt_dir = self.proposals_dir(f"target_r{r}")
            self.propose(segnet2, target_segnet1 if r > 1 else None, train, tgt_dir)
            prop, cover = score_label_dir(tgt_dir, train)
            self.add_quality(tgt_dir, prop, cover)
            target_segnet1 = self.segnet1(f"segnet1_r{r}", train, self.target_labels(tgt_dir, semi), VOC_TARGET_CLASSES)
            self.results["rounds"][key] = {"proposal_miou": prop.miou, "proposal_coverage": cover,
                                           **self.val_miou(target_segnet1)}
            self.log(f"round {r}: proposal mIoU {100 * prop.miou:.2f}, "
                     f"SegNet1 val mIoU {100 * self.results['rounds'][key]['val_miou']:.2f}")
            self.save()
        return self.finish()

    def propose(self, segnet2, segnet1, images: ImageSet, out: Path) -> None:
        if self._done(out):
            return
        if dist.is_main():
            b = self.cfg.proposals.batch
            seg2, seg1 = self.predictor(segnet2, "segnet2", b), self.predictor(segnet1, "segnet1", b)
            log = BadInputLog()
            run = propose(seg2, seg1, images, out, self.cfg.segnet2.input_size, self.cfg.proposals,
                          self.device, self.infer_precision, self.cfg.workers, log=log, progress=self.progress)
            # the manifest boxseg-propose writes (the networks are this run's stages, in memory)
            head = {"model": f"{self.run_dir / 'stages'} (this run's SegNet2, in memory)", "model_meta": seg2.meta,
                    "predictor": seg2.describe(), "segnet1": "this run's SegNet1" if seg1 is not None else None,
                    "method": "learned", "config": dataclasses.asdict(self.cfg.proposals),
                    "data": {"dataset": type(images.dataset).__name__, "images": len(images)},
                    "precision": self.infer_precision, "device": str(self.device), "world_size": 1,
                    "versions": library_versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
            manifest = merge_manifest(out, [{"rank": 0, "run": run.to_dict(), "bad_input": log.to_dict()}], head)
            write_bytes_atomic(out / "manifest.json", json.dumps(manifest, indent=2).encode())
            self._mark_done(out, {**run.to_dict(), "predictor": seg2.describe(), "precision": self.infer_precision})
        dist.barrier()

    def add_quality(self, out: Path, scores, coverage: float) -> None:
        """Put the proposals' score (computed by the scheme right after) into their manifest."""
        path = out / "manifest.json"
        if dist.is_main() and path.exists():
            m = json.loads(path.read_text())
            m["quality"] = {"miou": scores.miou, "coverage": coverage}
            write_bytes_atomic(path, json.dumps(m, indent=2).encode())

    def baseline(self, name: str) -> None:
        out = self.proposals_dir(name)
        if not self._done(out):
            if dist.is_main():
                self._mark_done(out, write_baseline(name, self.data.train, out, self.cfg.box_centre_fraction, self.progress))
            dist.barrier()
        prop, cover = score_label_dir(out, self.data.train)
        model = self.segnet1(f"segnet1_{name}", self.data.train, label_reader(out, self.data.train), VOC_TARGET_CLASSES)
        self.results["baselines"][name] = {"proposal_miou": prop.miou, "proposal_coverage": cover,
                                          **self.val_miou(model)}
        self.log(f"baseline {name}: proposal mIoU {100 * prop.miou:.2f}, "
                 f"SegNet1 val mIoU {100 * self.results['baselines'][name]['val_miou']:.2f}")
        self.save()

    def baseline_full(self) -> None:
        model = self.segnet1("segnet1_full", self.data.train, gt_reader(self.data.train), VOC_TARGET_CLASSES)
        self.results["baselines"]["full"] = {"proposal_miou": 1.0, "proposal_coverage": 1.0, **self.val_miou(model)}
        self.log(f"fully supervised: SegNet1 val mIoU {100 * self.results['baselines']['full']['val_miou']:.2f}")
        self.save()

    def finish(self) -> dict:
        res = self.results
        full = res["baselines"].get("full", {}).get("val_miou")
        rounds = res["rounds"]
        if rounds:
            last = rounds[max(rounds, key=lambda k: int(k.removeprefix("round")))]
            res["final_val_miou"] = last["val_miou"]
            if full:
                res["ratio_learned_full"] = last["val_miou"] / full
            if "box" in res["baselines"]:
                res["gain_over_box_points"] = 100 * (last["val_miou"] - res["baselines"]["box"]["val_miou"])
        res["bad_input"] = self.data.log.to_dict()
        self.save()
        return res


def results_table(res: dict) -> str:
    """The comparison table as markdown: proposal mIoU on target train, SegNet1 val mIoU."""
    full = res["baselines"].get("full", {}).get("val_miou")
    rows = ["| method | proposal mIoU (train) | proposal coverage | SegNet1 val mIoU | / full |",
            "|---|---|---|---|---|"]

    def row(name, d):
        prop = "-" if name == "full (masks)" else f"{100 * d['proposal_miou']:.1f}"
        cover = "-" if name == "full (masks)" else f"{100 * d['proposal_coverage']:.0f}%"
        ratio = f"{d['val_miou'] / full:.3f}" if full else "-"
        rows.append(f"| {name} | {prop} | {cover} | {100 * d['val_miou']:.1f} | {ratio} |")

    names = {"box": "box-filled", "box-centre": "box-centre (ignore)", "grabcut": "GrabCut", "full": "full (masks)"}
    for k in ("full", "box", "box-centre", "grabcut"):
        if k in res["baselines"]:
            row(names[k], res["baselines"][k])
    for k in sorted(res["rounds"], key=lambda k: int(k.removeprefix("round"))):
        row(f"learned, round {k.removeprefix('round')}", res["rounds"][k])
    return "\n".join(rows)


# Fields a resumed run may change: the first three do not change what is computed; a learning
# rate (lowered after the loss diverged, say) applies to the stages not yet finished, and
# each stage's metrics.csv records the rate it used at every iteration.
RESUMABLE_CHANGES = {"workers", "device", "checkpoint_every", "segnet1.lr", "segnet2.lr", "infer_backend",
                     "infer_precision"}


def prepare_run(cfg: TrainConfig, run_dir: Path) -> None:
    """Create the run folder and write config.yaml. Resuming a run whose config.yaml differs
    (other than in RESUMABLE_CHANGES) is refused: the finished stages were trained with the
    old settings, and a mixture would be reported as either."""
    import yaml

    from boxseg.config import to_dict

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DataError(path, f"malformed YAML: {e}") from None
        new = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # tuples as YAML lists
        changed = sorted(_changed_fields(old, new) - RESUMABLE_CHANGES)
        if changed:
            raise DataError(path, f"this run was started with other settings ({', '.join(changed)}); resume with "
                                  f"the same settings, or start a new run with another --out")
    if dist.is_main():
        save_yaml(cfg, path)


def _changed_fields(old, new, prefix: str = "", defaults=None) -> set[str]:
    """Dotted names of the fields that differ. A field missing from the old config (written
    by a boxseg that did not have it) counts as unchanged while the new one holds its default."""
    if defaults is None:
        from boxseg.config import to_dict

        defaults = yaml_round_trip(to_dict(TrainConfig()))
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for k in set(old) | set(new):
            d = defaults.get(k) if isinstance(defaults, dict) else None
            if k not in old and k in new and new[k] == d:
                continue
            out |= _changed_fields(old.get(k), new.get(k), f"{prefix}{k}.", d if d is not None else {})
        return out
    return set() if old == new else {prefix.rstrip(".")}


def yaml_round_trip(d: dict) -> dict:
    import yaml

    return yaml.safe_load(yaml.safe_dump(d, sort_keys=False))
