"""Calibration of a data set: is it a benchmark with headroom, or a toy?

On one Kaggle-layout folder (a fresh synthetic quickstart set by default), measures:

1. single-statistic probes: for each global statistic (mean and spread of intensity,
   stored image width, height and aspect, JPEG file size, scanner site) the best a
   classifier using only that statistic does on Testing: quantile bins fitted on
   Training, each bin predicting its majority label. Near the majority-class rate means
   the statistic does not give the label away.
2. headroom: the paper's student (cross-entropy, the config's baseline settings)
   against a larger model (the slim VGG16 at twice the quickstart teacher's width, the
   config's teacher settings), both selected on the config's validation share of Training.
3. site shift (leave one site out): for each site, the student trained on the other
   sites' Training images, tested on the held-out site's Testing images, against the
   all-sites student on the same images.

    python -m benchmarks.data_calibration [--data-root DIR] [--config configs/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import quickstart_data, write_result
from edgemri.core.config import TrainSpec
from edgemri.core.data.dataset import ArraySplit, load_dataset
from edgemri.core.data.images import normalize
from edgemri.core.data.splits import stratified_split
from edgemri.core.registries import load_config
from edgemri.core.training.evaluate import predict_logits
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, fit
from edgemri.models import build_model

STATISTIC_BINS = 10
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def image_statistics(root, split: ArraySplit) -> dict[str, np.ndarray]:
    """Per image: the global statistics a shortcut-learning model could latch onto."""
    pixels = split.images.float()
    sizes = []
    for name in split.files:
        path = root / name
        with Image.open(path) as image:
            sizes.append((*image.size, path.stat().st_size))
    width, height, nbytes = (np.array(column, dtype=np.float64) for column in zip(*sizes, strict=True))
    return {"mean_intensity": pixels.mean(dim=(1, 2, 3)).numpy(), "std_intensity": pixels.std(dim=(1, 2, 3)).numpy(),
            "width_px": width, "height_px": height, "aspect": width / height, "file_bytes": nbytes}


def binned_probe_accuracy(train_values, train_labels, test_values, test_labels) -> float:
    """Test accuracy of 'majority label of my quantile bin' fitted on Training."""
    edges = np.unique(np.quantile(train_values, np.linspace(0, 1, STATISTIC_BINS + 1)[1:-1]))
    train_bins, test_bins = np.digitize(train_values, edges), np.digitize(test_values, edges)
    overall = np.bincount(train_labels).argmax()
    majority = {b: np.bincount(train_labels[train_bins == b]).argmax() for b in np.unique(train_bins)}
    predicted = np.array([majority.get(b, overall) for b in test_bins])
    return float((predicted == test_labels).mean())


def categorical_probe_accuracy(train_values, train_labels, test_values, test_labels) -> float:
    """Test accuracy of 'majority label of my category' (e.g. of my scanner site)."""
    overall = np.bincount(train_labels).argmax()
    majority = {v: np.bincount(train_labels[train_values == v]).argmax() for v in set(train_values)}
    return float((np.array([majority.get(v, overall) for v in test_values]) == test_labels).mean())


def train_and_test(model_name: str, options: dict, train: ArraySplit, test: ArraySplit,
                   spec: TrainSpec, val_fraction: float, seed: int) -> tuple[float, torch.nn.Module]:
    """Train on ``train`` (a stratified validation share selects the epoch); accuracy on ``test``."""
    torch.manual_seed(seed)
    model = build_model(model_name, **options)
    fit_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
    result = fit(model, TrainData.from_split(train.subset(fit_idx)), loss=cross_entropy, spec=spec, seed=seed,
                 val=TrainData.from_split(train.subset(val_idx)), progress=True, desc=model_name)
    model.load_state_dict(result.best_state)
    return accuracy(model, test), model


def accuracy(model: torch.nn.Module, split: ArraySplit) -> float:
    return float((predict_logits(model, split.images, normalize).argmax(1) == split.labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="Kaggle-layout folder (default: a fresh quickstart set)")
    parser.add_argument("--config", default=str(CONFIG), help="training settings (distill.baseline, distill.teacher)")
    parser.add_argument("--large-width", type=float, default=0.25, help="width of the slim VGG16 'larger model'")
    parser.add_argument("--large-epochs", type=int, default=10)
    args = parser.parse_args()
    config = load_config(args.config)
    seed, val_fraction = config.seed, config.data.val_fraction
    root = quickstart_data(args.data_root)
    dataset = load_dataset(root, progress=True)
    train, test = dataset.train, dataset.test
    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    results: dict[str, float | int | str] = {
        "data_root": str(root), "config": args.config, "seed": seed,
        "train_images": len(train), "test_images": len(test),
        "majority_class_test_acc_pct": 100 * float((y_test == np.bincount(y_train).argmax()).mean()),
    }

    train_stats, test_stats = image_statistics(root, train), image_statistics(root, test)
    for name in train_stats:
        results[f"probe_{name}_test_acc_pct"] = 100 * binned_probe_accuracy(
            train_stats[name], y_train, test_stats[name], y_test)
    if train.sites:
        results["probe_site_test_acc_pct"] = 100 * categorical_probe_accuracy(
            np.array(train.sites), y_train, np.array(test.sites), y_test)

    started = time.perf_counter()
    student_spec = config.distill.baseline
    student_acc, student = train_and_test("student", {}, train, test, student_spec, val_fraction, seed)
    results["student_test_acc_pct"] = 100 * student_acc
    large_spec = dataclasses.replace(config.distill.teacher.train, epochs=args.large_epochs)
    large_acc, _ = train_and_test("vgg16-slim", {"width": args.large_width}, train, test, large_spec,
                                  val_fraction, seed)
    results["large_model"] = f"vgg16-slim width {args.large_width}"
    results["large_model_test_acc_pct"] = 100 * large_acc
    results["large_minus_student_pts"] = 100 * (large_acc - student_acc)

    drops = []
    for site in sorted(set(train.sites)):
        others = [i for i, s in enumerate(train.sites) if s != site]
        held_out = test.subset([i for i, s in enumerate(test.sites) if s == site])
        held_out_acc, _ = train_and_test("student", {}, train.subset(others), held_out, student_spec,
                                         val_fraction, seed)
        all_sites_acc = accuracy(student, held_out)
        results[f"loso_{site}_test_acc_pct"] = 100 * held_out_acc
        results[f"loso_{site}_all_sites_test_acc_pct"] = 100 * all_sites_acc
        drops.append(100 * (all_sites_acc - held_out_acc))
    if drops:
        results["loso_mean_drop_pts"] = float(np.mean(drops))
        results["loso_max_drop_pts"] = float(np.max(drops))
    results["train_seconds"] = time.perf_counter() - started
    for key, value in results.items():
        print(f"{key:45s} {value:10.2f}" if isinstance(value, float) else f"{key:45s} {value}")
    write_result("data_calibration", results)


if __name__ == "__main__":
    main()
