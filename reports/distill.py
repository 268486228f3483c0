"""Distillation report: report.json, report.md (the paper's Table 1 beside ours), plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from edgemri.core.config import Config
from edgemri.core.data import CLASS_NAMES, Dataset
from edgemri.core.distill import STAGES, SeedResult
from edgemri.core.io import save_figure, write_json, write_text
from edgemri.models import build_model, summarize
from edgemri.reports.common import machine, package_versions

# The paper's Table 1 (seed/paper.txt): test accuracy, trainable params, estimated size.
PAPER_TABLE = {
    "teacher": {"accuracy": 0.9567, "trainable_params": 100_356, "estimated_size_mb": 128.14},
    "baseline": {"accuracy": 0.9098, "trainable_params": 12_628, "estimated_size_mb": 2.25},
    "kd": {"accuracy": 0.9215, "trainable_params": 12_628, "estimated_size_mb": 2.25},
}
LABELS = {"teacher": "Teacher", "baseline": "Baseline student (CE)", "kd": "KD student"}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def gap_closed(teacher: float, baseline: float, kd: float) -> float | None:
    """Share of the teacher-baseline accuracy gap that KD closes (paper: 25%)."""
    return (kd - baseline) / (teacher - baseline) if teacher != baseline else None


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
    models: dict[str, Any] = {}
    for stage in STAGES:
        size = sizes["teacher" if stage == "teacher" else "student"]
        per_seed = [r.stages[stage] for r in results]
        models[stage] = {
            "model": teacher_name if stage == "teacher" else "student",
            "trainable_params": size.trainable_params,
            "total_params": size.total_params,
            "estimated_size_mb": size.estimated_size_mb,
            "state_dict_bytes": size.state_dict_bytes,
            "checkpoint_bytes": per_seed[0].checkpoint.stat().st_size,
            "test_accuracy": _mean_std([s.test["accuracy"] for s in per_seed]),
            "test_macro_f1": _mean_std([s.test["macro_f1"] for s in per_seed]),
            "test_nll": _mean_std([s.test["nll"] for s in per_seed]),
            "test_ece": _mean_std([s.test["ece"] for s in per_seed]),
            "per_seed": [{"seed": r.seed, "checkpoint": str(s.checkpoint.relative_to(out)), "test": s.test,
                          "best_epoch": s.best_epoch, "history": s.history, "train_seconds": s.train_seconds,
                          "images_seen": s.images_seen}
                         for r, s in zip(results, per_seed, strict=True)],
        }
    acc = {stage: models[stage]["test_accuracy"]["mean"] for stage in STAGES}
    return {
        "kind": "edgemri.distillation-report/1",
        "paper_compat": config.distill.paper_compat,
        "selected_on": "Testing (paper-compat: numbers are optimistic)" if config.distill.paper_compat
        else "validation split of Training",
        "config": config.to_dict(),
        "seeds": [r.seed for r in results],
        "data": {**dataset.summary(), "train_images_per_seed": [r.train_images for r in results]},
        "teacher_forward_images": [r.teacher_forward_images for r in results],
        "teacher_conv_passes": [r.teacher_conv_passes for r in results],
        "models": models,
        "gap_closed": gap_closed(acc["teacher"], acc["baseline"], acc["kd"]),
        "paper": PAPER_TABLE,
        "seconds": seconds,
        "versions": package_versions(),
        "machine": machine(),
    }


def _fmt_acc(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    compat = " (paper-compat: selected on Testing, KL 'mean')" if report["paper_compat"] else ""
    lines = [
        f"# Distillation report{compat}",
        "",
        f"Data: `{report['data']['root']}` (fingerprint `{report['data']['fingerprint']}`), "
        f"seeds {report['seeds']}, teacher `{report['config']['distill']['teacher']['name']}`. "
        f"Checkpoints selected on the {report['selected_on']}; "
        "the paper's code selected on its test set, so its numbers are optimistic.",
        "",
        "| model | paper test acc | ours test acc (mean ± std, %) | trainable params | estimated size (MB) "
        "| state-dict bytes | macro-F1 | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        m, p = models[stage], report["paper"][stage]
        lines.append(
            f"| {LABELS[stage]} | {100 * p['accuracy']:.2f} | {_fmt_acc(m['test_accuracy'])} | "
            f"{m['trainable_params']:,} | {m['estimated_size_mb']:.2f} (paper {p['estimated_size_mb']}) | "
            f"{m['state_dict_bytes']:,} | {m['test_macro_f1']['mean']:.3f} | {m['test_ece']['mean']:.3f} |"
        )
    gap = report["gap_closed"]
    paper_gap = gap_closed(0.9567, 0.9098, 0.9215)
    lines += [
        "",
        f"Share of the teacher-baseline gap that KD closes: "
        f"**{'n/a' if gap is None else f'{100 * gap:.0f}%'}** (paper: {100 * paper_gap:.0f}%).",
        f"Teacher forward passes for distillation: {report['teacher_forward_images']} "
        f"(training images per seed: {report['data']['train_images_per_seed']}).",
        "",
        "Per-class test recall (first seed):",
        "",
        "| model | " + " | ".join(CLASS_NAMES) + " |",
        "|---|" + "---|" * len(CLASS_NAMES),
    ]
    for stage in STAGES:
        recall = models[stage]["per_seed"][0]["test"]["per_class_recall"]
        lines.append(f"| {LABELS[stage]} | " + " | ".join(f"{100 * recall[c]:.1f}" for c in CLASS_NAMES) + " |")
    lines += ["", "![curves](curves.png)", "", "![confusion](confusion.png)", "",
              "Results on synthetic data are not clinical results.", ""]
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        history = report["models"][stage]["per_seed"][0]["history"]
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            line, = ax.plot(epochs, [h[f"train_{key}"] for h in history], label=f"{LABELS[stage]} train")
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "--", color=line.get_color(),
                    label=f"{LABELS[stage]} {'val' if not report['paper_compat'] else 'test'}")
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

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4.2 * len(STAGES), 4))
    for ax, stage in zip(axes, STAGES, strict=True):
        confusion = report["models"][stage]["per_seed"][0]["test"]["confusion"]
        ax.imshow(confusion, cmap="Blues")
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_title(LABELS[stage])
    axes[0].set_ylabel("true")
    fig.suptitle("Testing confusion matrices (first seed)")
    save_figure(path, fig)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"json": out / "report.json", "md": out / "report.md",
             "curves": out / "curves.png", "confusion": out / "confusion.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], render_markdown(report))
    plot_curves(report, paths["curves"])
    plot_confusion(report, paths["confusion"])
    return paths
