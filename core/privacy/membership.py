"""Membership inference against a trained model: loss threshold, start-calibrated loss and the Adversarial
Robustness Toolbox's learned black-box attack (Flower-free).

``core.privacy.attacks`` scores lists of losses; this module gets them from a model and its members and
non-members, and runs ART's attack (the ``attacks`` extra) beside them.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.data.dataset import ArraySplit
from edgemri.core.data.images import CLASS_NAMES, IMAGE_SIZE, normalize
from edgemri.core.privacy import attacks
from edgemri.core.training.evaluate import predict_logits

MIN_LEARNED_MEMBERS = 8  # per half: the learned attack fits on one half of the members, scores the other


def losses_and_accuracy(logits: Tensor, split: ArraySplit) -> tuple[Tensor, float]:
    """Each example's cross-entropy loss from a model's ``logits`` for ``split`` and the accuracy."""
    accuracy = float((logits.argmax(1) == split.labels).float().mean())
    return F.cross_entropy(logits, split.labels, reduction="none"), accuracy


def art_membership_classes() -> tuple[Any, Any]:
    """ART's ``MembershipInferenceBlackBox`` and ``PyTorchClassifier``; ImportError without the ``attacks`` extra.

    ART's package import calls ``logging.config.dictConfig``, which closes every logging handler open in the
    process (a log file, pytest's own handlers); all its config adds is a NullHandler on the "art" logger, so
    the import runs with ``dictConfig`` a no-op, and ART's INFO chatter stays out of the progress output."""
    configure = logging.config.dictConfig
    logging.config.dictConfig = lambda _config: None
    try:
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import PyTorchClassifier
    finally:
        logging.config.dictConfig = configure
    logging.getLogger("art").setLevel(logging.WARNING)
    return MembershipInferenceBlackBox, PyTorchClassifier


def learned_attack(model: nn.Module, member_logits: Tensor, members: ArraySplit, nonmember_logits: Tensor,
                   nonmembers: ArraySplit, seed: int) -> dict[str, Any]:
    """The Adversarial Robustness Toolbox's black-box membership attack (its default attack model, a small
    network on the model's probabilities and the true label, trained under ``seed``): fitted on half of the
    members and non-members, scored on the other half. Needs the ``attacks`` extra; too few members to split is
    a reason, not a number."""
    try:
        MembershipInferenceBlackBox, PyTorchClassifier = art_membership_classes()  # noqa: N806 - classes
    except ImportError:
        return {"skipped": "the Adversarial Robustness Toolbox is not installed (pip install 'edgemri[attacks]')"}
    if min(len(members), len(nonmembers)) < 2 * MIN_LEARNED_MEMBERS:
        return {"skipped": f"{len(members)} members: at least {2 * MIN_LEARNED_MEMBERS} needed to fit on half "
                           "and score the other half"}
    rng = np.random.default_rng(seed)
    halves = [np.array_split(rng.permutation(n), 2) for n in (len(members), len(nonmembers))]
    probabilities = [F.softmax(logits, 1).numpy() for logits in (member_logits, nonmember_logits)]
    labels = [split.labels.numpy() for split in (members, nonmembers)]
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, IMAGE_SIZE,
                                   IMAGE_SIZE), nb_classes=len(CLASS_NAMES))
    attack = MembershipInferenceBlackBox(classifier, input_type="prediction", attack_model_type="nn")
    (member_fit, member_score), (nonmember_fit, nonmember_score) = halves
    with torch.random.fork_rng():  # the attack network's initialization and batches come from torch's RNG
        torch.manual_seed(seed)
        attack.fit(x=None, y=labels[0][member_fit], test_x=None, test_y=labels[1][nonmember_fit],
                   pred=probabilities[0][member_fit], test_pred=probabilities[1][nonmember_fit])
        member_scores, nonmember_scores = (
            attack.infer(x=None, y=labels[which][index], pred=probabilities[which][index],
                         probabilities=True).reshape(-1)
            for which, index in ((0, member_score), (1, nonmember_score)))
    return {"attack": "ART MembershipInferenceBlackBox, its attack network on (probabilities, label)",
            **attacks.membership_metrics(member_scores, nonmember_scores)}


def membership_attack(model: nn.Module, reference: nn.Module, members: ArraySplit, nonmembers: ArraySplit,
                      seed: int = 0, *, transform: Callable[[Tensor], Tensor] = normalize) -> dict[str, Any]:
    """Loss-threshold, reference-calibrated and learned (ART) membership inference against ``model`` (raw logits
    of uint8 images through ``transform``, its own preprocessing). ``reference`` (default preprocessing) never
    saw a candidate: the federation's start model, the calibration of ``calibrated_loss_attack``."""
    member_logits, nonmember_logits = (predict_logits(model, split.images, transform)
                                       for split in (members, nonmembers))
    (member_losses, member_accuracy), (nonmember_losses, nonmember_accuracy) = (
        losses_and_accuracy(logits, split) for logits, split in ((member_logits, members),
                                                                 (nonmember_logits, nonmembers)))
    calibration = [losses_and_accuracy(predict_logits(reference, split.images, normalize), split)[0]
                   for split in (members, nonmembers)]
    return {"loss_threshold": attacks.loss_threshold_attack(member_losses, nonmember_losses),
            "calibrated": attacks.calibrated_loss_attack(member_losses, nonmember_losses, *calibration),
            "learned": learned_attack(model, member_logits, members, nonmember_logits, nonmembers, seed),
            "member_loss": float(member_losses.mean()), "nonmember_loss": float(nonmember_losses.mean()),
            "member_accuracy": member_accuracy, "nonmember_accuracy": nonmember_accuracy}
