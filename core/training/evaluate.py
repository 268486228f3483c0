"""Per-image evaluation: logits over a whole split, then the metrics the reports use."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.training.checkpoint import MAX_CALIBRATION_TEMPERATURE, MIN_CALIBRATION_TEMPERATURE


def _channels_last(batch: Tensor) -> Tensor:
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch  # else features


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    inputs: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 64,
) -> Tensor:
    """Logits for every input, in order, in eval mode (restores the mode after).

    Small batches in channels-last layout: on CPU the student's convolutions run about 4x faster so
    than in 256-image contiguous batches, to the same logits, and evaluation is most of a federation's
    compute at population scale."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model(_channels_last(transform(inputs[i : i + batch_size])))
                  for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins: each bin's share of images, mean confidence and accuracy (empty bins left out)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            rows.append({"low": float(low), "high": float(high), "share": float(in_bin.float().mean()),
                         "confidence": float(confidence[in_bin].mean()), "accuracy": float(correct[in_bin].mean())})
    return rows


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    return sum(b["share"] * abs(b["confidence"] - b["accuracy"]) for b in reliability_bins(probs, labels, bins))


def ece_noise_floor(probs: Tensor, draws: int = 200, seed: int = 0) -> float:
    """The mean ECE of labels drawn from ``probs`` themselves: what a perfectly calibrated model with these
    confidences scores on this many images. An ECE near it cannot be told apart from perfect calibration."""
    if not len(probs):
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    return sum(expected_calibration_error(probs, torch.multinomial(probs, 1, generator=generator).squeeze(1))
               for _ in range(draws)) / draws


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimizing the NLL of softmax(logits / T) on held-out images.

    One parameter, so it cannot change which class is predicted; fitted in log T with L-BFGS, clamped to the
    range a checkpoint may carry.
    """
    if not len(labels):
        return 1.0
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = MIN_CALIBRATION_TEMPERATURE, MAX_CALIBRATION_TEMPERATURE
    value = float(log_t.detach().exp())
    return min(max(value, low), high) if math.isfinite(value) else 1.0


def refer_threshold(probs: Tensor, coverage: float) -> float:
    """The top-probability threshold that accepts ``coverage`` of these images (the rest go to a doctor)."""
    confidence = probs.max(dim=1).values.sort(descending=True).values
    keep = max(1, min(len(confidence), math.ceil(coverage * len(confidence))))
    return float(confidence[keep - 1])


def selective_accuracy(probs: Tensor, labels: Tensor, threshold: float) -> tuple[float, float]:
    """(coverage, accuracy of the accepted images) when images with top probability below ``threshold`` are referred."""
    confidence, predicted = probs.max(dim=1)
    accepted = confidence >= threshold
    if not bool(accepted.any()):
        return 0.0, float("nan")
    return float(accepted.float().mean()), float((predicted[accepted] == labels[accepted]).float().mean())


def coverage_curve(probs: Tensor, labels: Tensor, points: int = 20) -> list[dict[str, float]]:
    """Accuracy of the accepted images at coverages 1/points .. 1 (the most confident first)."""
    rows = []
    for k in range(1, points + 1):
        coverage, accuracy = selective_accuracy(probs, labels, refer_threshold(probs, k / points))
        rows.append({"target_coverage": k / points, "coverage": coverage, "accuracy": accuracy})
    return rows


def classification_metrics(logits: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall, NLL, ECE and the confusion matrix, per image."""
    num_classes = len(class_names)
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    true_pos = confusion.diag().float()
    support = confusion.sum(dim=1).float()
    predicted_count = confusion.sum(dim=0).float()
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), torch.zeros_like(true_pos))
    precision = torch.where(predicted_count > 0, true_pos / predicted_count.clamp(min=1), torch.zeros_like(true_pos))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(true_pos))
    present = support > 0
    return {
        "n": len(labels),
        "accuracy": float((predicted == labels).float().mean()) if len(labels) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class_recall": {name: float(r) for name, r in zip(class_names, recall, strict=True)},
        "nll": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
        "ece": expected_calibration_error(F.softmax(logits, dim=1), labels) if len(labels) else float("nan"),
        "reliability": reliability_bins(F.softmax(logits, dim=1), labels) if len(labels) else [],
        "confusion": confusion.tolist(),
    }
