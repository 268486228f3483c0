"""The paper's Table 1 on the real Kaggle scans: teacher, baseline, the paper's KD and the improved recipe.

    python -m benchmarks.kaggle --data-root ../shared/data/brain-tumor-mri-224 [--seeds 3]
                                [--paper-checkpoints DIR] [--sweep] [--out runs/bench/kaggle]

``configs/kaggle.yaml`` (the server distills on all of Training, Testing reported deduplicated and full) for
``--seeds`` seeds; every model of a seed shares its split and Testing images, so comparisons are paired.
The teacher is a slim VGG16 trained from scratch: ImageNet weights cannot be fetched here.
``--sweep`` first compares teacher widths and augmentation on seed 0's validation split (never Testing).
``--paper-checkpoints DIR``: the paper's published students (``KD_student_model.pth``,
``best_model_baseline_student.pth``, from github.com/jinrui-rey/DL_FinalProject), scored on the same images;
without it the paper's Table 1 is quoted as text. Without the data folder the benchmark says so and exits 0
(a user's clone has no ``../shared``). Results: benchmarks/results/kaggle.json; reports in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, write_result
from edgemri.arguments import SEEDS
from edgemri.core.config import HEAD_STEPS, AugmentConfig, Config
from edgemri.core.data.audit import audit_dataset
from edgemri.core.data.dataset import Dataset, load_dataset
from edgemri.core.data.images import normalize
from edgemri.core.io import write_text
from edgemri.core.registries import load_config
from edgemri.core.stats import bootstrap_ci
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemri.core.training.distill import Distiller, run_distillation
from edgemri.core.training.evaluate import predict_logits
from edgemri.core.training.shortcut import apply_head_step, background_classifier_probe, shortcut_report
from edgemri.edge.contract import normalize_for
from edgemri.models.pretrained import PRETRAINED_DIR
from edgemri.reports.common import markdown_table
from edgemri.reports.distill import PAPER_TABLE, build_report, write_report
from edgemri.reports.model_card import card_metrics, render_card

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "kaggle.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "brain-tumor-mri-224"
PAPER_CHECKPOINTS = {"paper-published-kd": "KD_student_model.pth",
                     "paper-published-baseline": "best_model_baseline_student.pth"}
# Teacher variants of the sweep: (width, views); epochs are the config's, the best epoch is recorded. Width 0.25
# trains 3x slower here (59 vs 186 images/s): with the students it would not fit a seed in 30 minutes.
SWEEP = ((0.125, 0), (0.125, 16))
GOALS = {"kd_full_testing_pct": 95.0, "kd_dedup_testing_pct": 94.0, "gap_closed_fraction": 0.5,
         "teacher_full_testing_pct": 97.0, "ece_calibrated": 0.03, "seed_minutes": 30.0}


def kaggle_config(data_root: Path, overrides: list[str] | None = None) -> Config:
    return load_config(CONFIG, [f"data.root={data_root}", *(overrides or [])])


def sweep(config: Config, out: Path, values: dict[str, Any], name: str) -> None:
    """Each teacher variant on seed 0, judged by its best epoch's validation accuracy (ties: lower loss); the
    results are written after each variant (a rerun resumes the unfinished one)."""
    dataset = load_dataset(config.data.root)
    for width, views in SWEEP:
        teacher = dataclasses.replace(config.distill.teacher, width=width, views=views)
        variant = config.replace(distill=dataclasses.replace(config.distill, teacher=teacher))
        variant_name = f"w{width:g}-v{views}"
        started = time.perf_counter()
        stage, *_ = Distiller(variant, dataset, 0, out / variant_name, resume=True, progress=True).teacher()
        best = max(stage.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
        values.update({f"sweep.{variant_name}.val_accuracy_pct": 100 * best["val_accuracy"],
                       f"sweep.{variant_name}.val_loss": best["val_loss"],
                       f"sweep.{variant_name}.best_epoch": best["epoch"],
                       f"sweep.{variant_name}.seconds": time.perf_counter() - started})
        print(f"sweep {variant_name}: validation {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']}",
              flush=True)
        write_result(name, values)


# KD recipes of the sweep (seed 0's teacher and validation split): changes to configs/kaggle.yaml's distill.kd.
MILD = {"flip": True, "rotate_deg": 5.0, "scale": 0.05, "translate": 0.03, "contrast": 0.1, "gamma": 0.1}
KD_SWEEP = {
    "t2-a0.5-views8": {},
    "t4-a0.9-views8": {"temperature": 4.0, "alpha": 0.9},
    "t2-a0.5-views8-mild": {"augment": MILD},
    "t4-a0.9-views0": {"temperature": 4.0, "alpha": 0.9, "views": 0},
    "t8-a0.9-views0": {"temperature": 8.0, "alpha": 0.9, "views": 0},
    "t4-a0.9-views0-cosine30": {"temperature": 4.0, "alpha": 0.9, "views": 0,
                                "train": {"epochs": 30, "schedule": "cosine"}},
}


def kd_sweep(config: Config, runs: Path, values: dict[str, Any], name: str) -> None:
    """Each KD recipe of KD_SWEEP on seed 0 with the run's own teacher, judged by the best epoch's validation
    accuracy (ties: lower loss); the teacher's view logits are cached per augmentation and reused."""
    dataset = load_dataset(config.data.root)
    distiller = Distiller(config, dataset, config.seed, runs / f"seed-{config.seed}", resume=True, progress=True)
    _, teacher, teacher_logits, _, _ = distiller.teacher()
    cache: dict[Any, Any] = {}
    for recipe, changes in KD_SWEEP.items():
        built = {"augment": lambda v: AugmentConfig(**v),
                 "train": lambda v: dataclasses.replace(config.distill.kd.train, **v)}
        kd = dataclasses.replace(config.distill.kd, **{k: built.get(k, lambda v: v)(v) for k, v in changes.items()})
        teaching, *_ = distiller.teaching(kd, teacher, teacher_logits, cache)
        stage = distiller.student(f"sweep-{recipe}", kd, teaching)
        best = max(stage.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
        values.update({f"kd_sweep.{recipe}.val_accuracy_pct": 100 * best["val_accuracy"],
                       f"kd_sweep.{recipe}.val_loss": best["val_loss"], f"kd_sweep.{recipe}.best_epoch": best["epoch"]})
        print(f"kd sweep {recipe}: validation {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']}", flush=True)
        write_result(name, values)


def shortcut_values(name: str, checkpoint: Checkpoint, dataset: Dataset) -> dict[str, Any]:
    """The collection-shortcut probes of one model (core/shortcut.py) on Testing, through its own preprocessing."""
    report = shortcut_report(checkpoint.build(), dataset,
                             transform=lambda images: normalize_for(images, checkpoint.preprocessing))
    return {f"{name}.shortcut.{probe}.{key}": value for probe in ("blanked_head", "restyle")
            for key, value in report[probe].items()}


def data_probe_values(dataset: Dataset) -> dict[str, Any]:
    """The model-free probe: notumor told from tumour by what lies outside the head, raw and after the head step."""
    values: dict[str, Any] = {}
    for step in HEAD_STEPS:
        train, test = (dataclasses.replace(split, images=apply_head_step(split.images, step))
                       for split in (dataset.train, dataset.test))
        for key, value in background_classifier_probe(train, test).to_dict().items():
            values[f"data_probe.{step}.{key}"] = value
    return values


def published_values(checkpoints: Path, dataset: Dataset, keep: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    """The paper's published students on the same Testing images (full and deduplicated), ours (the first seed's
    KD student, per full-Testing image) minus each, paired, and their shortcut probes."""
    values: dict[str, Any] = {}
    for name, file in PAPER_CHECKPOINTS.items():
        checkpoint = load_checkpoint(checkpoints / file)
        logits = predict_logits(checkpoint.build(), dataset.test.images, normalize)
        correct = (logits.argmax(1) == dataset.test.labels).float()
        values[f"{name}.full_testing_accuracy_pct"] = 100 * float(correct.mean())
        values[f"{name}.dedup_testing_accuracy_pct"] = 100 * float(correct[keep].mean())
        for variant, index in (("full", torch.arange(len(correct))), ("dedup", keep)):
            interval = bootstrap_ci((ours[index] - correct[index]).tolist())
            values.update({f"kd_seed0_minus_{name}.{variant}_pts_{part}": 100 * getattr(interval, part)
                           for part in ("mean", "low", "high")})
        values.update(shortcut_values(name, checkpoint, dataset))
    return values


def _probe_mean(values: dict[str, Any], stage: str, key: str) -> float:
    """A shortcut probe's value for ``stage``, in percent, averaged over the seeds that measured it."""
    found = [v for k, v in values.items() if k.startswith("seed") and k.endswith(f".{stage}.shortcut.{key}")]
    return 100 * sum(found) / len(found)


def shortcut_lines(values: dict[str, Any], head: dict[str, Any] | None) -> list[str]:
    """The card's shortcut section: the data-only probe, the recipe's probes, and the head step's, when measured."""
    seeds = values["seeds_run"]
    lines = [
        f"Every notumor scan of this dataset comes from one collection (Br35H). A classifier that sees only what "
        f"lies outside the head (background, frame, the head's box) tells notumor from tumour at AUC "
        f"{values['data_probe.none.test_auc']:.2f} on Testing: the collection is visible without looking at the "
        f"brain.",
        f"- Tumour scans re-styled to the notumor collection's intensity profile inside the head: "
        f"{_probe_mean(values, 'kd', 'restyle.tumour_flipped_to_notumor'):.1f}% flip to notumor (re-styled to "
        f"their own collections' profile, the control: "
        f"{_probe_mean(values, 'kd', 'restyle.tumour_flipped_to_notumor_control'):.1f}%); mean over {seeds} seeds "
        f"of this recipe.",
        f"- Scans with the head blanked out: notumor separation AUC "
        f"{_probe_mean(values, 'kd', 'blanked_head.notumor_separation') / 100:.2f} (0.5: the background alone "
        f"decides nothing).",
    ]
    if head:
        lines.append(
            f"- The same recipe behind the head step `standardize-crop` ({head['seeds_run']} seeds, "
            f"`benchmarks/results/kaggle_head.json`): "
            f"{_probe_mean(head, 'kd', 'restyle.tumour_flipped_to_notumor'):.1f}% flip (control "
            f"{_probe_mean(head, 'kd', 'restyle.tumour_flipped_to_notumor_control'):.1f}%), at "
            f"{head['kd.dedup_testing_accuracy_pct_mean']:.1f}% on deduplicated Testing against "
            f"{values['kd.dedup_testing_accuracy_pct_mean']:.1f}% here. That student is not the shipped one: the "
            f"federation's clients do not apply the step yet.")
    return lines


def ship(runs: Path, seeds: list[int]) -> Path:
    """The KD student of the seed with the best validation accuracy (never Testing) as ``kaggle-student`` in
    models/pretrained/."""
    def best_validation(seed: int) -> float:
        return max(h["val_accuracy"] for h in load_checkpoint(runs / f"seed-{seed}" / "kd.pt").history)

    seed = max(seeds, key=best_validation)
    path = save_checkpoint(PRETRAINED_DIR / "kaggle-student.pt", load_checkpoint(runs / f"seed-{seed}" / "kd.pt"))
    print(f"shipped {path} (seed {seed})", flush=True)
    return path


def write_card(values: dict[str, Any], head: dict[str, Any] | None, dataset: Dataset, keep: torch.Tensor) -> Path:
    """The shipped student's model card, from the shipped file itself and the benchmark's results."""
    path = PRETRAINED_DIR / "kaggle-student.pt"
    checkpoint = load_checkpoint(path)
    seeds = list(range(checkpoint.config["seed"], checkpoint.config["seed"] + values["seeds_run"]))
    summary = {"seeds": len(seeds), **{f"{stage}_{variant}": values[f"{stage}.{variant}_testing_accuracy_pct_mean"]
                                      for stage in ("kd", "baseline", "teacher") for variant in ("dedup", "full")}}
    card = render_card("kaggle-student", path, checkpoint, card_metrics(checkpoint, dataset, keep),
                       {"lines": shortcut_lines(values, head)}, summary,
                       f"`configs/kaggle.yaml`, seed {checkpoint.seed} (chosen among seeds {seeds} by validation "
                       f"accuracy)")
    card_path = write_text(PRETRAINED_DIR / "kaggle-student.md", card)
    print(f"model card {card_path}", flush=True)
    return card_path


def _pct(values: dict[str, Any], key: str) -> str:
    """``mean ± std`` over seeds of a per-seed list of percentages."""
    seeds = values[key]
    mean = sum(seeds) / len(seeds)
    std = (sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1)) ** 0.5 if len(seeds) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _ci(values: dict[str, Any], key: str) -> str:
    return f"{values[f'{key}_mean']:+.1f} [{values[f'{key}_low']:+.1f}, {values[f'{key}_high']:+.1f}]"


def table(values: dict[str, Any], head: dict[str, Any] | None) -> str:
    """README §2's real-data tables from the results: Table 1 beside the paper's, and the shortcut probes."""
    rows = [("teacher", "teacher (`vgg16-slim` 1/8, from scratch)", "teacher"),
            ("baseline", "baseline student (CE)", "baseline"), ("paper-kd", "paper's KD (T=1, alpha=0.5)", "kd"),
            ("kd", "**KD, our recipe (T=4, alpha=0.9)**", None)]
    table1 = []
    for stage, name, paper in rows:
        minutes = sum(values[f"{stage}.wall_seconds_per_seed"]) / len(values[f"{stage}.wall_seconds_per_seed"]) / 60
        table1.append([
            name, f"{values[f'paper_table1.{paper}_pct']:.2f}" if paper else "—",
            _pct(values, f"{stage}.full_testing_accuracy_pct_values"),
            _pct(values, f"{stage}.dedup_testing_accuracy_pct_values"),
            _ci(values, f"{stage}.dedup_minus_baseline_pts") if f"{stage}.dedup_minus_baseline_pts_mean" in values
            else "",
            f"{100 * values[f'{stage}.gap_closed_fraction']:.0f}%" if f"{stage}.gap_closed_fraction" in values else "",
            f"{values[f'{stage}.ece_calibrated_mean']:.3f}" if f"{stage}.ece_calibrated_mean" in values else "",
            f"{minutes:.1f} min"])
    for name in PAPER_CHECKPOINTS:
        if f"{name}.full_testing_accuracy_pct" in values:
            table1.append([f"the paper's published `{PAPER_CHECKPOINTS[name]}`, scored here", "",
                           f"{values[f'{name}.full_testing_accuracy_pct']:.1f}",
                           f"{values[f'{name}.dedup_testing_accuracy_pct']:.1f}",
                           f"ours − it: {_ci(values, f'kd_seed0_minus_{name}.dedup_pts')}", "", "", ""])

    def probe_row(label: str, percent: Callable[[str], float]) -> list[str]:
        """One model's probe row; ``percent(key)`` is the probe value in percent."""
        return [label, f"{percent('restyle.tumour_flipped_to_notumor'):.1f}% "
                       f"({percent('restyle.tumour_flipped_to_notumor_control'):.1f}%)",
                f"{percent('restyle.notumor_flipped_from_notumor'):.1f}% "
                f"({percent('restyle.notumor_flipped_from_notumor_control'):.1f}%)",
                f"{percent('blanked_head.notumor_separation') / 100:.2f}"]

    probes = []
    variants = [("", values)] + ([(" + head step", head)] if head else [])
    for suffix, source in variants:
        seeds = sorted({int(k.split(".")[0][4:]) for k in source if k.startswith("seed") and ".shortcut." in k})
        for stage in ("baseline", "paper-kd", "kd"):
            probes.append(probe_row(f"{stage}{suffix} ({len(seeds)} seeds)",
                                    lambda key, stage=stage, source=source: _probe_mean(source, stage, key)))
    for name in PAPER_CHECKPOINTS:
        if f"{name}.shortcut.restyle.tumour_flipped_to_notumor" in values:
            probes.append(probe_row(f"published `{PAPER_CHECKPOINTS[name]}`",
                                    lambda key, name=name: 100 * values[f"{name}.shortcut.{key}"]))
    probes += [[f"background-only classifier, notumor vs tumour ({step})",
                f"AUC {values[f'data_probe.{step}.test_auc']:.2f}, accuracy "
                f"{100 * values[f'data_probe.{step}.test_accuracy']:.1f}% (majority "
                f"{100 * values[f'data_probe.{step}.majority_accuracy']:.1f}%)", "", ""] for step in HEAD_STEPS]
    return "\n".join([
        markdown_table(["model", "paper (Table 1, full Testing)", "ours, full Testing", "ours, deduplicated Testing",
                        "− baseline, deduplicated (paired)", "gap closed", "ECE calibrated (dedup)",
                        "stage wall time (mean of seeds)"], table1),
        "",
        markdown_table(["model", "tumour scans re-styled to notumor's profile: flipped to notumor (control)",
                        "notumor scans re-styled to tumour's: flipped away (control)",
                        "head blanked: notumor separation AUC"], probes)])


def _results(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--seeds", type=SEEDS, default=3, help=f"seeds to run ({SEEDS}, default 3)")
    parser.add_argument("--paper-checkpoints", default=None, help="folder with the paper's two .pth files")
    parser.add_argument("--sweep", action="store_true", help="the teacher sweep on validation first")
    parser.add_argument("--sweep-only", action="store_true", help="only the teacher sweep")
    parser.add_argument("--kd-sweep", action="store_true", help="only the KD recipe sweep on seed 0's teacher")
    parser.add_argument("--card", action="store_true",
                        help="write the shipped student's model card again from the results (no training)")
    parser.add_argument("--table", action="store_true",
                        help="print README §2's tables from NAME.json (and NAME_head.json, the head-step run)")
    parser.add_argument("--out", default="runs/bench/kaggle")
    parser.add_argument("--name", default="kaggle", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--ship", action="store_true",
                        help="ship the best seed's KD student (by validation) as kaggle-student, with its card")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.table:
        print(table(_results(args.name) or {}, _results(f"{args.name}_head")))
        return 0
    data_root, out = Path(args.data_root), Path(args.out)
    if args.card:
        dataset = load_dataset(data_root)
        keep = torch.tensor(audit_dataset(dataset).kept_test(), dtype=torch.long)
        write_card(_results(args.name) or {}, _results(f"{args.name}_head"), dataset, keep)
        return 0
    if not (data_root / "Training").is_dir():
        print(f"kaggle: no real data at {data_root}; nothing to measure (the benchmark needs the Kaggle folder)")
        return 0
    config = kaggle_config(data_root, args.overrides)
    values = _results(args.name) or {}
    if args.kd_sweep:
        kd_sweep(config, out / "runs", values, args.name)
        return 0
    if args.sweep or args.sweep_only:
        sweep(config, out / "sweep", values, args.name)
        if args.sweep_only:
            return 0
    dataset = load_dataset(data_root, progress=True)
    started = time.perf_counter()
    results, _ = run_distillation(config, dataset, out / "runs", seeds=args.seeds, resume=True, progress=True)
    seconds = time.perf_counter() - started
    report = build_report(config, dataset, results, seconds, out / "runs")
    write_report(report, out / "runs")
    values = {k: v for k, v in values.items() if k.startswith(("sweep.", "kd_sweep."))}
    values.update({"config": str(CONFIG.relative_to(ROOT)), "overrides": args.overrides, "seeds_run": len(results),
                   "teacher": "vgg16-slim trained from scratch (no ImageNet weights offline)",
                   "testing_images_full": len(dataset.test), "seconds_total": seconds})
    keep = torch.tensor(audit_dataset(dataset).kept_test(), dtype=torch.long)  # the runs' deduplicated Testing
    values["testing_images_dedup"] = len(keep)
    for stage, m in report["models"].items():
        values[f"{stage}.dedup_testing_accuracy_pct_mean"] = 100 * m["test_accuracy"]["mean"]
        values[f"{stage}.dedup_testing_accuracy_pct_values"] = [100 * v for v in m["test_accuracy"]["values"]]
        if "test_full_testing_accuracy" in m:
            values[f"{stage}.full_testing_accuracy_pct_mean"] = 100 * m["test_full_testing_accuracy"]["mean"]
            values[f"{stage}.full_testing_accuracy_pct_values"] = [
                100 * v for v in m["test_full_testing_accuracy"]["values"]]
        if "test_ece_uncalibrated" in m:
            values[f"{stage}.ece_uncalibrated_mean"] = m["test_ece_uncalibrated"]["mean"]
            values[f"{stage}.ece_calibrated_mean"] = m["test_ece"]["mean"]
            values[f"{stage}.ece_calibrated_max"] = max(m["test_ece"]["values"])
        values[f"{stage}.train_seconds_per_seed"] = [s["train_seconds"] for s in m["per_seed"]]
        values[f"{stage}.wall_seconds_per_seed"] = [r.stages[stage].wall_seconds for r in results]
    for stage, c in report["comparisons"].items():
        values[f"{stage}.gap_closed_fraction"] = c["gap_closed"]
        values[f"{stage}.gap_closed_fraction_per_seed"] = c["gap_closed_per_seed"]
        values[f"{stage}.seeds_above_baseline"] = c["seeds_above_baseline"]
        for variant, key in (("dedup", "minus_baseline"), ("full", "minus_baseline_full_testing")):
            for part in ("mean", "low", "high"):
                values[f"{stage}.{variant}_minus_baseline_pts_{part}"] = 100 * c[key][part]
    # Wall time per seed: every stage's training, the teacher's view scoring and evaluation included.
    values["seed_wall_seconds"] = [r.wall_seconds for r in results]
    values.update({f"paper_table1.{stage}_pct": 100 * row["accuracy"] for stage, row in PAPER_TABLE.items()})
    print("shortcut probes", flush=True)
    values.update(data_probe_values(dataset))
    for result in results:
        for stage in result.stages.values():
            values.update(shortcut_values(f"seed{result.seed}.{stage.name}", load_checkpoint(stage.checkpoint),
                                          dataset))
    if args.paper_checkpoints:
        ours = torch.tensor(report["models"]["kd"]["per_seed"][0]["test"]["full_testing_correct"],
                            dtype=torch.float32)
        values.update(published_values(Path(args.paper_checkpoints), dataset, keep, ours))
    values["goals_met"] = {
        "kd_full_testing_95": values.get("kd.full_testing_accuracy_pct_mean", 0) >= GOALS["kd_full_testing_pct"],
        "kd_dedup_testing_94": values["kd.dedup_testing_accuracy_pct_mean"] >= GOALS["kd_dedup_testing_pct"],
        "every_seed_above_baseline": values["kd.seeds_above_baseline"] == len(results),
        "gap_closed_half": (values["kd.gap_closed_fraction"] or 0) >= GOALS["gap_closed_fraction"],
        "teacher_full_testing_97": values.get("teacher.full_testing_accuracy_pct_mean", 0)
        >= GOALS["teacher_full_testing_pct"],
        "ece_calibrated_003": values["kd.ece_calibrated_max"] <= GOALS["ece_calibrated"],
        "seed_under_30_min": max(values["seed_wall_seconds"]) <= 60 * GOALS["seed_minutes"],
    }
    write_result(args.name, values)
    print(json.dumps(values["goals_met"], indent=1))
    if args.ship:
        ship(out / "runs", [r.seed for r in results])
        write_card(values, _results(f"{args.name}_head"), dataset, keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
