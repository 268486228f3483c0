"""Losses for the one training loop: each takes (logits, batch) and returns a scalar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from edgemri.core.data.dataset import UNKNOWN_LABEL
from edgemri.core.training.train import Batch

LossFn = Callable[[Tensor, Batch], Tensor]
KLReduction = Literal["batchmean", "mean"]


def cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    return F.cross_entropy(logits, batch.labels)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    reduction: KLReduction = "batchmean",
) -> Tensor:
    """Hinton's KD, the paper's Eq. 1: alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(s, y), averaged over images.

    'batchmean' takes the KL per image (the definition); 'mean' divides it by the number of classes as the
    paper's code did (a quarter of it for 4 classes). An UNKNOWN_LABEL image (a transfer-set image) has only the
    teacher's soft labels: its loss is T^2 KL alone.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits / t, dim=1),
        reduction="none",
    ).sum(dim=1)
    if reduction == "mean":
        # What KLDivLoss(reduction='mean') computes, without its deprecation warning.
        soft = soft / student_logits.shape[1]
    labelled = labels != UNKNOWN_LABEL
    hard = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    per_image = torch.where(labelled, alpha * t * t * soft + (1.0 - alpha) * hard, t * t * soft)
    return per_image.mean()


def make_kd_loss(temperature: float, alpha: float, reduction: KLReduction = "batchmean") -> LossFn:
    """KD loss reading the cached teacher logits from ``batch.extras[0]``."""

    def loss(logits: Tensor, batch: Batch) -> Tensor:
        return kd_loss(logits, batch.extras[0], batch.labels,
                       temperature=temperature, alpha=alpha, reduction=reduction)

    return loss
