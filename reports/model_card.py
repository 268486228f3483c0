"""The model card of a shipped model: what it was trained on and how, what it scores, where it fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgemri.core.data.dataset import Dataset
from edgemri.core.data.images import CLASS_NAMES, normalize
from edgemri.core.stats import bootstrap_ci
from edgemri.core.training.checkpoint import Checkpoint, calibrated_probabilities
from edgemri.core.training.evaluate import classification_metrics, predict_logits
from edgemri.models import summarize
from edgemri.reports.common import markdown_table

DISCLAIMER = ("**Not a medical device.** A research model for benchmarking on-device federated learning; it must "
              "not be used to diagnose, triage or treat anyone.")


def card_metrics(checkpoint: Checkpoint, dataset: Dataset, test_keep: torch.Tensor) -> dict[str, Any]:
    """The model's Testing metrics, deduplicated (``test_keep``) and full, each accuracy with its 95% bootstrap CI
    over images; calibrated with the checkpoint's own temperature."""
    model = checkpoint.build()
    logits = predict_logits(model, dataset.test.images, normalize)
    correct = (logits.argmax(1) == dataset.test.labels).float()
    out: dict[str, Any] = {}
    for name, index in (("dedup", test_keep), ("full", torch.arange(len(dataset.test)))):
        metrics = classification_metrics(logits[index] / checkpoint.temperature, dataset.test.labels[index],
                                         CLASS_NAMES)
        interval = bootstrap_ci(correct[index].tolist())
        out[name] = {"images": len(index), "accuracy": interval.mean, "accuracy_low": interval.low,
                     "accuracy_high": interval.high, "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
                     "per_class_recall": metrics["per_class_recall"],
                     "class_counts": torch.bincount(dataset.test.labels[index], minlength=len(CLASS_NAMES)).tolist()}
    out["dedup"]["ece_uncalibrated"] = classification_metrics(logits[test_keep], dataset.test.labels[test_keep],
                                                              CLASS_NAMES)["ece"]
    probs = calibrated_probabilities(logits[test_keep], checkpoint.temperature)
    out["dedup"]["mean_confidence"] = float(probs.max(1).values.mean())
    return out


def render_card(name: str, path: Path, checkpoint: Checkpoint, metrics: dict[str, Any],
                shortcut: dict[str, Any], seeds: dict[str, Any], config_file: str) -> str:
    """The card as Markdown. ``shortcut``: the collection-shortcut probes of this model (and the data-only probe);
    ``seeds``: the benchmark's multi-seed summary of the recipe the model comes from."""
    size = summarize(checkpoint.model, checkpoint.build())
    dedup, full = metrics["dedup"], metrics["full"]

    def acc(m: dict[str, Any]) -> str:
        return f"{100 * m['accuracy']:.1f}% [{100 * m['accuracy_low']:.1f}, {100 * m['accuracy_high']:.1f}]"

    recall = " · ".join(f"{c} {100 * dedup['per_class_recall'][c]:.1f}%" for c in CLASS_NAMES)
    counts = ", ".join(f"{c} {n}" for c, n in zip(CLASS_NAMES, dedup["class_counts"], strict=True))
    refer = checkpoint.metrics.get("calibration", {}).get("refer_below", {})
    lines = [
        f"# Model card: `{name}`",
        "",
        DISCLAIMER,
        "",
        markdown_table(["", ""], [
            ["file", f"`{path.name}` ({path.stat().st_size:,} bytes), an edgemri checkpoint (`edgemri predict --model "
                     f"{name} scan.jpg`)"],
            ["architecture", f"the paper's student: 2 conv blocks + Linear, {size.trainable_params:,} parameters, "
                             f"{size.mflops:.1f} MFLOPs per 128 px scan"],
            ["classes", ", ".join(CLASS_NAMES)],
            ["trained with", f"{config_file}, the improved KD recipe (role `{checkpoint.role}`)"],
            ["teacher", f"`vgg16-slim` (width {checkpoint.config['distill']['teacher']['width']}) trained from scratch "
                        f"on the same scans (ImageNet weights cannot be fetched offline): not the paper's teacher"],
            ["data", "Kaggle Brain Tumor MRI (Nickparvar; figshare, SARTAJ, Br35H), the 224 px copy, all of Training "
                     "less a validation split (copies of one scan kept on one side)"],
            ["preprocessing", f"{checkpoint.preprocessing} (applied by `predict` and stored in every export)"],
            ["calibration", f"temperature {checkpoint.temperature:.3f}, fitted on validation; refer below top "
                            f"probability {refer.get('threshold', float('nan')):.3f} to keep 90% of scans"],
        ], align="ll"),
        "",
        "## Metrics on Testing (95% CI over images)",
        "",
        f"- **Deduplicated Testing** ({dedup['images']} scans; {counts}): accuracy **{acc(dedup)}**, macro-F1 "
        f"{dedup['macro_f1']:.3f}, ECE {dedup['ece_uncalibrated']:.3f} raw → {dedup['ece']:.3f} calibrated.",
        f"- Full Testing ({full['images']} scans, the paper's protocol; it counts {full['images'] - dedup['images']} "
        f"copies of Training scans): accuracy {acc(full)}, macro-F1 {full['macro_f1']:.3f}.",
        f"- Recall per class (deduplicated): {recall}.",
        f"- The recipe over {seeds['seeds']} seeds (benchmarks/results/kaggle.json): KD student "
        f"{seeds['kd_dedup']:.1f}% deduplicated / {seeds['kd_full']:.1f}% full, baseline {seeds['baseline_dedup']:.1f}%"
        f" / {seeds['baseline_full']:.1f}%, teacher {seeds['teacher_dedup']:.1f}% / {seeds['teacher_full']:.1f}%. "
        f"The paper (ImageNet teacher, full Testing, selected on Testing): KD student 92.15%, baseline 90.98%.",
        "",
        "## The collection shortcut",
        "",
        *shortcut["lines"],
        "",
        "## Limits",
        "",
        "- Deduplicated Testing keeps few notumor scans: most Testing notumor scans are copies of Training scans "
        "(`edgemri data info`), so its notumor recall rests on few images.",
        "- One public dataset of axial, coronal and sagittal 2-D slices from three collections; no patient-level "
        "split exists in it, and no site outside it was measured.",
        "- 128 px grey input: small lesions are at the edge of what it resolves.",
    ]
    return "\n".join(lines) + "\n"
