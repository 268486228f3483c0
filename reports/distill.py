"""Distillation report: report.json, report.md (the paper's Table 1 beside ours), plots, and a few example scans
(examples.json, examples.png: synthetic data only, unless the user asks)."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgemri.core.config import Config
from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.io import save_figure, write_json, write_text
from edgemri.core.stats import bootstrap_ci_clustered
from edgemri.core.training.distill import SeedResult
from edgemri.models import build_model, summarize
from edgemri.reports.common import machine, markdown_table, package_versions

# Table 1 of the paper (On Edge MRI Abnormality Detection using Teacher-Knowledge Distillation): test accuracy,
# trainable params, estimated size.
PAPER_TABLE = {
    "teacher": {"accuracy": 0.9567, "trainable_params": 100_356, "estimated_size_mb": 128.14},
    "baseline": {"accuracy": 0.9098, "trainable_params": 12_628, "estimated_size_mb": 2.25},
    "kd": {"accuracy": 0.9215, "trainable_params": 12_628, "estimated_size_mb": 2.25},
}
LABELS = {"teacher": "Teacher", "baseline": "Baseline student (CE)", "kd": "KD student",
          "paper-kd": "Paper KD (T=1, alpha=0.5)"}
ABLATION_PREFIX = "kd-without-"
EXAMPLES_JSON, EXAMPLES_FILE = "examples.json", "examples.png"
EXAMPLES_KIND = "edgemri.distillation-examples/1"
EXAMPLES_STAGE = "kd"  # the federation's start model (student.pt)
EXAMPLES_PER_OUTCOME = 4  # correctly and wrongly classified scans each: one of each class where there is one
SHOW_SCANS_FLAG = "--show-scans"
NOT_SHOWN = ("Example scans are not shown: the data is not edgemri's synthetic set, and real scans are drawn only "
             f"when the user asks (edgemri distill {SHOW_SCANS_FLAG}).")


def label(stage: str) -> str:
    if stage.startswith(ABLATION_PREFIX):
        return f"KD without {stage.removeprefix(ABLATION_PREFIX)}"
    return LABELS.get(stage, stage)


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def gap_closed(teacher: float, baseline: float, kd: float) -> float | None:
    """Share of the teacher-baseline accuracy gap that KD closes (paper: 25%)."""
    return (kd - baseline) / (teacher - baseline) if teacher != baseline else None


def paired_accuracy_difference(results: list[SeedResult], stage: str, reference: str,
                               correct: str = "correct") -> dict[str, float]:
    """``stage`` - ``reference`` accuracy on the same Testing images: the mean with a 95% bootstrap CI,
    images resampled within seeds (``correct``: the per-image key, e.g. ``full_testing_correct``)."""
    by_seed = {r.seed: [a - b for a, b in zip(r.stages[stage].test[correct], r.stages[reference].test[correct],
                                             strict=True)] for r in results}
    return bootstrap_ci_clustered(by_seed).to_dict()


def build_report(config: Config, dataset: Dataset, results: list[SeedResult], seconds: float,
                 out: Path) -> dict[str, Any]:
    teacher_name = config.distill.teacher.name
    teacher_options = config.distill.teacher.model_options()
    if teacher_name == "vgg16-imagenet":
        teacher_options["pretrained"] = False  # shapes only; no ImageNet download for a summary
    sizes = {
        "teacher": summarize(teacher_name, build_model(teacher_name, **teacher_options)),
        "student": summarize("student", build_model("student")),
    }
    stages = list(results[0].stages)
    models: dict[str, Any] = {}
    for stage in stages:
        size = sizes["teacher" if stage == "teacher" else "student"]
        per_seed = [r.stages[stage] for r in results]
        models[stage] = {
            "model": teacher_name if stage == "teacher" else "student",
            "trainable_params": size.trainable_params,
            "total_params": size.total_params,
            "estimated_size_mb": size.estimated_size_mb,
            "state_dict_bytes": size.state_dict_bytes,
            "checkpoint_bytes": per_seed[0].checkpoint.stat().st_size,
            **{f"test_{key}": _mean_std([s.test[key] for s in per_seed])
               for key in ("accuracy", "macro_f1", "nll", "ece", "ece_uncalibrated", "ece_noise_floor", "temperature",
                           "accuracy_at_90_coverage", "refer_coverage", "refer_accuracy", "full_testing_accuracy")
               if key in per_seed[0].test},
            "teacher_passes": [s.teacher_passes for s in per_seed],
            "transfer_images": [s.transfer_images for s in per_seed],
            "per_seed": [{"seed": r.seed, "checkpoint": str(s.checkpoint.relative_to(out)), "test": s.test,
                          "best_epoch": s.best_epoch, "history": s.history, "train_seconds": s.train_seconds,
                          "images_seen": s.images_seen}
                         for r, s in zip(results, per_seed, strict=True)],
        }
    acc = {stage: models[stage]["test_accuracy"]["mean"] for stage in stages}
    students = [s for s in stages if s not in ("teacher", "baseline")]
    comparisons = {}
    deduplicated = "test_full_testing_accuracy" in models[stages[0]]
    for stage in students:
        per_seed = [gap_closed(r.stages["teacher"].test["accuracy"], r.stages["baseline"].test["accuracy"],
                               r.stages[stage].test["accuracy"]) for r in results]
        comparisons[stage] = {
            "minus_baseline": paired_accuracy_difference(results, stage, "baseline"),
            "gap_closed": gap_closed(acc["teacher"], acc["baseline"], acc[stage]),
            "gap_closed_per_seed": per_seed,
            "seeds_above_baseline": sum(r.stages[stage].test["accuracy"] > r.stages["baseline"].test["accuracy"]
                                        for r in results),
            # What the ingredient an ablation leaves out gave: the full recipe minus the ablated one.
            **({"kd_minus_this": paired_accuracy_difference(results, "kd", stage)}
               if stage.startswith(ABLATION_PREFIX) else {}),
            **({"minus_baseline_full_testing": paired_accuracy_difference(results, stage, "baseline",
                                                                         "full_testing_correct")}
               if deduplicated else {}),
        }
    return {
        "kind": "edgemri.distillation-report/2",
        "paper_compat": config.distill.paper_compat,
        "selected_on": "Testing (paper-compat: numbers are optimistic)" if config.distill.paper_compat
        else "validation split of Training",
        "calibrated_on": "validation split of Training" if config.distill.calibrate else "not calibrated",
        "config": config.to_dict(),
        "seeds": [r.seed for r in results],
        "data": {**dataset.summary(), "train_images_per_seed": [r.train_images for r in results],
                 "testing_images": results[0].stages[stages[0]].test.get("testing_images", len(dataset.test)),
                 "deduplicated": deduplicated},
        "stages": stages,
        "teacher_forward_images": [r.teacher_forward_images for r in results],
        "teacher_conv_passes": [r.teacher_conv_passes for r in results],
        "models": models,
        "gap_closed": gap_closed(acc["teacher"], acc["baseline"], acc["kd"]),
        "comparisons": comparisons,
        "paper": PAPER_TABLE,
        "seconds": seconds,
        "versions": package_versions(),
        "machine": machine(),
    }


def _fmt_acc(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _fmt_ci(ci: dict[str, float]) -> str:
    return f"{100 * ci['mean']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _models_table(report: dict[str, Any], full_testing: bool) -> str:
    """Each model beside the paper's Table 1 (with the full Testing column when Testing is deduplicated)."""
    rows = []
    for stage in report["stages"]:
        m = report["models"][stage]
        paper = report["paper"].get("kd" if stage == "paper-kd" else stage)
        ece = (f"{m['test_ece_uncalibrated']['mean']:.3f} → {m['test_ece']['mean']:.3f} "
               f"(floor {m['test_ece_noise_floor']['mean']:.3f})"
               if "test_ece_uncalibrated" in m else f"{m['test_ece']['mean']:.3f}")
        full = [_fmt_acc(m["test_full_testing_accuracy"]) if "test_full_testing_accuracy" in m else "—"]
        rows.append([label(stage), f"{100 * paper['accuracy']:.2f}" if paper else "—", _fmt_acc(m["test_accuracy"]),
                     *(full if full_testing else []), f"{m['trainable_params']:,}", f"{m['estimated_size_mb']:.2f}",
                     f"{m['state_dict_bytes']:,}", f"{m['test_macro_f1']['mean']:.3f}", ece,
                     f"{m['test_temperature']['mean']:.2f}" if "test_temperature" in m else "—"])
    headers = ["model", "paper test acc", "ours test acc (mean ± std, %)",
               *(["full Testing acc (%)"] if full_testing else []), "trainable params", "estimated size (MB)",
               "state-dict bytes", "macro-F1", "ECE before → after calibration", "temperature"]
    return markdown_table(headers, rows, align="l" * len(headers))


def _comparisons_table(report: dict[str, Any]) -> str:
    """Each KD student against the baseline (and, for an ablation, what its left-out ingredient gave the recipe)."""
    rows = []
    for stage, c in report["comparisons"].items():
        m = report["models"][stage]
        per_seed = ", ".join(_pct(g) for g in c["gap_closed_per_seed"])
        rows.append([label(stage), _fmt_ci(c["minus_baseline"]), f"{_pct(c['gap_closed'])} ({per_seed})",
                     f"{c['seeds_above_baseline']}/{len(report['seeds'])}", f"{m['teacher_passes'][0]:,}",
                     f"{m['transfer_images'][0]:,}",
                     f"{100 * m['test_accuracy']['mean']:.1f} → {100 * m['test_accuracy_at_90_coverage']['mean']:.1f}",
                     f"{100 * m['test_refer_coverage']['mean']:.0f}%, {100 * m['test_refer_accuracy']['mean']:.1f}",
                     _fmt_ci(c["kd_minus_this"]) if "kd_minus_this" in c else "—"])
    headers = ["student", "− baseline", "gap closed (per seed)", "seeds above baseline", "teacher passes",
               "transfer images", "acc. all scans → at 90% coverage",
               "referred at the validation threshold (coverage, acc.)", "recipe − this"]
    return markdown_table(headers, rows, align="l" * len(headers))


def render_markdown(report: dict[str, Any]) -> str:
    models, stages = report["models"], report["stages"]
    compat = " (paper-compat: selected on Testing, KL 'mean')" if report["paper_compat"] else ""
    lines = [
        f"# Distillation report{compat}",
        "",
        f"Data: `{report['data']['root']}` (fingerprint `{report['data']['fingerprint']}`), "
        f"seeds {report['seeds']}, teacher `{report['config']['distill']['teacher']['name']}`. "
        f"Checkpoints selected on the {report['selected_on']}; "
        "the paper's code selected on its test set, so its numbers are optimistic. "
        f"Calibration temperature fitted on the {report['calibrated_on']}.",
        "",
    ]
    recall = {stage: models[stage]["per_seed"][0]["test"]["per_class_recall"] for stage in stages}  # first seed
    full_testing = bool(report["data"].get("deduplicated"))
    if full_testing:
        lines += [f"Testing is deduplicated ({report['data']['testing_images']:,} images: Testing scans that duplicate "
                  f"a Training scan are left out, `data.dedup`); the full Testing column is the paper's protocol.", ""]
    lines.append(_models_table(report, full_testing))
    paper_gap = gap_closed(0.9567, 0.9098, 0.9215)
    lines += [
        "",
        f"Share of the teacher-baseline gap that KD closes (the config's recipe): **{_pct(report['gap_closed'])}** "
        f"(paper: {100 * paper_gap:.0f}%). ECE's floor: what a perfectly calibrated model with the same "
        f"confidences scores on this many Testing images (the estimate's own noise). "
        f"Teacher forward passes made for distillation, per seed: "
        f"{report['teacher_forward_images']} (training images per seed: {report['data']['train_images_per_seed']}).",
        "",
        "KD students against the baseline, paired on the same Testing images (mean [95% CI] in points, images "
        "resampled within seeds); an ablation row's last column is what its left-out ingredient gave the recipe:",
        "",
        _comparisons_table(report),
        "",
        "Per-class test recall (first seed):",
        "",
        markdown_table(["model", *CLASS_NAMES],
                       [[label(stage), *(f"{100 * recall[stage][c]:.1f}" for c in CLASS_NAMES)] for stage in stages],
                       align="l" * (1 + len(CLASS_NAMES))),
    ]
    lines += ["", "![curves](curves.png)", "", "![confusion](confusion.png)", "",
              "![reliability](reliability.png)", "", "![coverage](coverage.png)", "",
              "Results on synthetic data are not clinical results.", ""]
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in _main(report):
        history = report["models"][stage]["per_seed"][0]["history"]
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            line, = ax.plot(epochs, [h[f"train_{key}"] for h in history], label=f"{label(stage)} train")
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "--", color=line.get_color(),
                    label=f"{label(stage)} {'val' if not report['paper_compat'] else 'test'}")
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Training curves (first seed)")
    save_figure(path, fig)
    plt.close(fig)


def plot_confusion(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _main(report)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 4))
    for ax, stage in zip(axes, stages, strict=True):
        confusion = report["models"][stage]["per_seed"][0]["test"]["confusion"]
        ax.imshow(confusion, cmap="Blues")
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_title(label(stage), fontsize=9)
    axes[0].set_ylabel("true")
    fig.suptitle("Testing confusion matrices (first seed)")
    save_figure(path, fig)
    plt.close(fig)


def _main(report: dict[str, Any]) -> list[str]:
    """The stages every plot shows: the teacher, the baseline, the paper's KD when trained, the recipe's."""
    return [s for s in ("teacher", "baseline", "paper-kd", "kd") if s in report["stages"]]


def plot_reliability(report: dict[str, Any], path: Path) -> None:
    """Reliability diagrams (first seed) of the students before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [s for s in _main(report) if s != "teacher"]
    fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 4), squeeze=False)
    for ax, stage in zip(axes[0], students, strict=True):
        test = report["models"][stage]["per_seed"][0]["test"]
        for key, name, style in (("reliability_uncalibrated", f"before (ECE {test['ece_uncalibrated']:.3f})", "o--"),
                                 ("reliability", f"after, T={test['temperature']:.2f} (ECE {test['ece']:.3f})", "s-")):
            bins = test[key]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, label=name, markersize=4)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set_xlabel("confidence")
        ax.set_title(label(stage), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle("Reliability on Testing (first seed): the diagonal is perfect calibration")
    save_figure(path, fig)
    plt.close(fig)


def plot_coverage(report: dict[str, Any], path: Path) -> None:
    """Accuracy of the accepted scans against the share accepted (the rest referred to a doctor), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in _main(report):
        curves = [s["test"]["coverage_curve"] for s in report["models"][stage]["per_seed"]
                  if "coverage_curve" in s["test"]]
        if not curves:
            continue
        points = len(curves[0])
        ax.plot([100 * statistics.fmean(c[k]["coverage"] for c in curves) for k in range(points)],
                [100 * statistics.fmean(c[k]["accuracy"] for c in curves) for k in range(points)], "o-",
                markersize=3, label=label(stage))
    ax.axvline(90, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("coverage: scans the model answers (%)")
    ax.set_ylabel("accuracy of those scans (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Selective prediction on Testing (mean over seeds)")
    save_figure(path, fig)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"json": out / "report.json", "md": out / "report.md", "curves": out / "curves.png",
             "confusion": out / "confusion.png", "reliability": out / "reliability.png",
             "coverage": out / "coverage.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], render_markdown(report))
    plot_curves(report, paths["curves"])
    plot_confusion(report, paths["confusion"])
    plot_reliability(report, paths["reliability"])
    plot_coverage(report, paths["coverage"])
    return paths


def pick_examples(labels: Tensor, probabilities: Tensor, seed: int, per_outcome: int = EXAMPLES_PER_OUTCOME
                  ) -> list[tuple[int, bool]]:
    """Up to ``per_outcome`` correctly and as many wrongly classified images, as (index, correct): drawn with
    ``seed``, the true classes taken in turn so that each class shows where it can."""
    rng = np.random.default_rng(seed)
    right = probabilities.argmax(1) == labels
    picked: list[tuple[int, bool]] = []
    for correct in (True, False):
        per_class = [rng.permutation(torch.nonzero((labels == c) & (right == correct)).flatten().numpy()).tolist()
                     for c in range(len(CLASS_NAMES))]
        in_turn = [i for turn in itertools.zip_longest(*per_class) for i in turn if i is not None]
        picked += [(i, correct) for i in in_turn[:per_outcome]]
    return picked


def build_examples(config: Config, test: ArraySplit, probabilities: Tensor, seed: int, *, synthetic: bool,
                   show_scans: bool) -> tuple[dict[str, Any], list[Tensor]]:
    """examples.json's record and the scans to draw: a few Testing images the KD student (``probabilities``, first
    seed) classified correctly and wrongly, each as true class, predicted class and calibrated confidence. Scans only
    on ``synthetic`` data or with ``show_scans``; never a file name."""
    shown = synthetic or show_scans
    picked = pick_examples(test.labels, probabilities, seed) if shown else []
    confidence, predicted = probabilities.max(1)
    rows = [{"outcome": "correct" if correct else "wrong", "true": CLASS_NAMES[int(test.labels[i])],
             "predicted": CLASS_NAMES[int(predicted[i])], "confidence": float(confidence[i])} for i, correct in picked]
    record = {"kind": EXAMPLES_KIND, "model": EXAMPLES_STAGE, "seed": seed, "synthetic_data": synthetic,
              "show_scans": show_scans, "shown": shown, "why_not_shown": None if shown else NOT_SHOWN,
              "examples": rows, "config": config.to_dict(), "versions": package_versions()}
    return record, [test.images[i] for i, _ in picked]


def plot_examples(record: dict[str, Any], images: list[Tensor], path: Path) -> None:
    """One row of correctly and one of wrongly classified scans, each titled with its class, prediction, confidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = ("correct", "wrong")
    columns = max(1, *(sum(row["outcome"] == outcome for row in record["examples"]) for outcome in outcomes))
    fig, axes = plt.subplots(len(outcomes), columns, figsize=(2.2 * columns, 5.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    filled = dict.fromkeys(outcomes, 0)
    for row, image in zip(record["examples"], images, strict=True):
        ax = axes[outcomes.index(row["outcome"])][filled[row["outcome"]]]
        filled[row["outcome"]] += 1
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"true {row['true']}\npredicted {row['predicted']} ({100 * row['confidence']:.0f}%)",
                     fontsize=7, color="tab:green" if row["outcome"] == "correct" else "tab:red")
    for r, outcome in enumerate(outcomes):
        axes[r][0].text(-0.08, 0.5, f"{outcome}ly classified" + ("" if filled[outcome] else ": none"),
                        transform=axes[r][0].transAxes, rotation=90, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Testing scans, {label(record['model'])} (seed {record['seed']}): calibrated confidence")
    save_figure(path, fig)
    plt.close(fig)


def write_examples(record: dict[str, Any], images: list[Tensor], out: Path) -> dict[str, Path]:
    """examples.json, and examples.png when its scans are shown (else an earlier run's is removed), atomically."""
    paths = {"examples_json": out / EXAMPLES_JSON}
    if record["shown"]:
        paths["examples"] = out / EXAMPLES_FILE
        plot_examples(record, images, paths["examples"])
    else:
        (out / EXAMPLES_FILE).unlink(missing_ok=True)  # drawn when asked before: not kept once the flag is gone
    write_json(paths["examples_json"], record)
    return paths
