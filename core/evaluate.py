"""Per-image evaluation: logits over a whole split, then the metrics the reports use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    inputs: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
) -> Tensor:
    """Logits for every input, in order, in eval mode (restores the mode after)."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model(transform(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


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
        "confusion": confusion.tolist(),
    }
