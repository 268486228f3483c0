"""What an honest-but-curious server can learn from a client's update or model (pure functions, Flower-free).

Three families, each the standard one from the literature, so a privacy reviewer can check them:

- **Reconstruction from an update.** ``linear_leakage``: the analytic attack on a Linear head
  (for one image, dL/dW_k = dL/db_k * x, so the head's input x is a ratio of two gradients);
  ``invert_gradients``: optimization-based inversion (Geiping et al. 2020, "Inverting Gradients"),
  which finds an input whose gradient points the way the observed one does. ``psnr``, ``ssim`` and
  ``best_match`` score a reconstruction against the client's own images.
- **Membership inference.** ``loss_threshold_attack`` (a low loss says "trained on", Yeom et al. 2018)
  and ``calibrated_loss_attack`` (the same, minus each example's loss under a reference model that
  never saw it: Watson et al. 2022, difficulty calibration); both report ROC AUC and TPR at 1% FPR.
- **An empirical lower bound on epsilon from one training run** (Steinke, Nasr, Jagielski 2023):
  ``canary_coins``, ``audit_guesses``, ``one_run_epsilon_lower_bound``; ``noise_canaries`` and
  ``margin_gain_scores`` make and score the canaries of ``edgemri privacy audit``.

``core.privacy.reconstruction`` aims the reconstruction attacks at the student and scores them;
``core.privacy.membership`` runs the membership attacks on a model. These measure what *one* attack achieves;
a weak result bounds nothing about a stronger attack.
Only the audit's epsilon is a statement with a confidence level (docs/PRIVACY.md, "Attacks and audits").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from scipy.stats import binom, rankdata
from torch import Tensor, nn

from edgemri.core.errors import EdgemriError

MAX_INVERSION_STEPS = 100_000
MAX_INVERSION_ELEMENTS = 10_000_000  # a dummy input larger than this is not an image this project trains on
MAX_CANARY_VALUES = 100_000_000  # uint8 canary pixels: 100 MB, about 2,000 images of 3 x 128 x 128
MEMBERSHIP_FPR = 0.01  # the operating point reported beside AUC: attacks matter at low false-positive rates
# SSIM's constants and window (Wang et al. 2004): K1, K2 scale the stabilizers by the data range.
SSIM_K1, SSIM_K2, SSIM_WINDOW, SSIM_SIGMA = 0.01, 0.03, 11, 1.5
# Geiping et al. drop the step size tenfold at 3/8, 5/8 and 7/8 of the steps.
_INVERSION_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


class AttackError(EdgemriError):
    """An attack or audit was asked for with impossible arguments; the message names the value and what is allowed."""


# --- reconstruction -------------------------------------------------------------------------------------------


def linear_leakage(weight_grad: Tensor, bias_grad: Tensor, *, update: bool = False) -> tuple[Tensor, int]:
    """The input of a Linear layer and the label, read off that layer's gradient (the analytic attack).

    For one image with cross-entropy loss, row k of the weight gradient is dL/db_k times the layer's
    input x, so x = weight_grad[k] / bias_grad[k] for any k with a nonzero bias gradient; the row with
    the largest |bias gradient| is used (the least rounding). dL/db_k = p_k - [k = label] is negative
    for the true class only, which reveals the label.

    A model *update* works the same: one SGD step at rate lr changes the head by -lr * grad, and the
    ratio is blind to the factor. Its sign flips the label rule, so pass ``update=True`` for an update
    given as (after - before); (before - after) is a positive multiple of the gradient (``update=False``).

    For a batch of B images (mean loss) the rows mix: row k's ratio is an average of the B inputs
    weighted by their dL/db_k, dominated by the images of class k, and the label is the class with the
    most negative bias gradient. Exact recovery holds for one image only.

    Returns the flattened input (shape ``(in_features,)``) and the label.
    """
    if weight_grad.ndim != 2 or bias_grad.ndim != 1 or bias_grad.shape[0] != weight_grad.shape[0]:
        raise AttackError(f"linear_leakage needs a (classes, features) weight gradient and a (classes,) bias "
                          f"gradient, got {tuple(weight_grad.shape)} and {tuple(bias_grad.shape)}")
    if not (torch.isfinite(weight_grad).all() and torch.isfinite(bias_grad).all()):
        raise AttackError("linear_leakage needs finite gradients; got NaN or infinity")
    row = int(bias_grad.abs().argmax())
    if bias_grad[row] == 0:
        raise AttackError("linear_leakage needs a nonzero bias gradient in some row; all are zero")
    reconstruction = weight_grad[row] / bias_grad[row]
    label = int(bias_grad.argmax()) if update else int(bias_grad.argmin())
    return reconstruction, label


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference of horizontal and vertical neighbours of (B, C, H, W) images (the inversion's prior)."""
    return ((images[..., :, 1:] - images[..., :, :-1]).abs().mean()
            + (images[..., 1:, :] - images[..., :-1, :]).abs().mean())


def _last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise AttackError("label=None needs a model with a Linear head to read the label from; pass the label")
    return names[-1]


def invert_gradients(
    model: nn.Module,
    target_grads: Mapping[str, Tensor],
    shape: Sequence[int],
    label: int | None = None,
    *,
    steps: int = 500,
    lr: float = 0.1,
    seed: int = 0,
    tv_weight: float = 1e-2,
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """An input of ``shape`` (1, C, H, W) whose gradient under ``model`` matches ``target_grads`` (Geiping et al. 2020).

    Minimizes 1 - cos(grad(x), target) over all the named parameters together, plus ``tv_weight`` times
    the total variation of x, with Adam on the signs of the gradient and the step size cut tenfold at
    3/8, 5/8 and 7/8 of ``steps``, as in the paper; x starts as seeded standard-normal noise and is
    clamped to ``bounds`` (the data's range) after every step when given. ``target_grads`` maps
    parameter names (``model.named_parameters()``) to the observed gradient of the cross-entropy loss
    on one image, or any positive multiple of it (cosine matching is blind to scale): for a one-step
    SGD update (after - before), pass its negative. ``label=None`` infers the label from the last
    Linear layer's bias gradient (``linear_leakage``'s rule).

    Deterministic for a seed on a given machine; the model's parameters and their ``.grad`` are untouched.
    One image at a time: a batch's gradient mixes its images (see ``linear_leakage``).
    """
    shape = tuple(shape)
    if len(shape) != 4 or shape[0] != 1 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise AttackError(f"invert_gradients needs a shape (1, channels, height, width) of positive ints, got {shape}")
    if math.prod(shape) > MAX_INVERSION_ELEMENTS:
        raise AttackError(f"invert_gradients input of {math.prod(shape)} values is above {MAX_INVERSION_ELEMENTS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_INVERSION_STEPS:
        raise AttackError(f"invert_gradients steps must be an int in [1, {MAX_INVERSION_STEPS}], got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise AttackError(f"invert_gradients lr must be a positive finite number, got {lr}")
    if not (math.isfinite(tv_weight) and tv_weight >= 0):
        raise AttackError(f"invert_gradients tv_weight must be a finite number >= 0, got {tv_weight}")
    if bounds is not None and not (math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]):
        raise AttackError(f"invert_gradients bounds must be (low, high) finite with low < high, got {bounds}")
    parameters = dict(model.named_parameters())
    if not target_grads:
        raise AttackError("invert_gradients needs at least one target gradient")
    for name, grad in target_grads.items():
        if name not in parameters:
            raise AttackError(f"invert_gradients: {name!r} is not a parameter of the model; "
                              f"allowed: {', '.join(parameters)}")
        if grad.shape != parameters[name].shape or not torch.isfinite(grad).all():
            raise AttackError(f"invert_gradients: the gradient of {name!r} must be finite and of shape "
                              f"{tuple(parameters[name].shape)}, got {tuple(grad.shape)}")
        if not parameters[name].requires_grad:
            raise AttackError(f"invert_gradients: parameter {name!r} does not require a gradient")
    if label is None:
        head = _last_linear(model)
        if f"{head}.weight" not in target_grads or f"{head}.bias" not in target_grads:
            raise AttackError(f"label=None needs the gradients of {head}.weight and {head}.bias; pass the label")
        label = linear_leakage(target_grads[f"{head}.weight"], target_grads[f"{head}.bias"])[1]
    names = list(target_grads)
    wanted = [parameters[name] for name in names]
    targets = [target_grads[name].detach().to(parameters[name].dtype) for name in names]
    target_norm = torch.sqrt(sum((t * t).sum() for t in targets))
    if target_norm == 0:
        raise AttackError("invert_gradients needs a nonzero target gradient; all are zero")
    dtype = wanted[0].dtype
    dummy = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if bounds is not None:
        dummy.clamp_(*bounds)
    dummy.requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(steps * f) for f in _INVERSION_MILESTONES], gamma=0.1)
    with torch.no_grad():
        classes = model(dummy).shape[-1]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
        raise AttackError(f"invert_gradients label must be an int in [0, {classes}), got {label!r}")
    labels = torch.tensor([label])
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(dummy), labels), wanted, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, targets, strict=True))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        objective = 1 - dot / (norm * target_norm + torch.finfo(dtype).tiny) + tv_weight * total_variation(dummy)
        (step,) = torch.autograd.grad(objective, dummy)
        dummy.grad = step.sign()
        optimizer.step()
        schedule.step()
        if bounds is not None:
            with torch.no_grad():
                dummy.clamp_(*bounds)
    return dummy.detach()


# --- image similarity -----------------------------------------------------------------------------------------


def _check_pair(a: Tensor, b: Tensor, data_range: float, what: str) -> None:
    if a.shape != b.shape:
        raise AttackError(f"{what} needs two images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise AttackError(f"{what} needs non-empty images")
    if not (math.isfinite(data_range) and data_range > 0):
        raise AttackError(f"{what} data_range must be a positive finite number, got {data_range}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AttackError(f"{what} needs finite pixel values; got NaN or infinity")


def psnr(a: Tensor, b: Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); ``inf`` for identical images."""
    _check_pair(a, b, data_range, "psnr")
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: Tensor, b: Tensor, data_range: float) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (H, W) or (C, H, W) images, channel by channel.

    Local means, variances and covariance come from a Gaussian window (11 x 11, sigma 1.5; shrunk to
    the largest odd size that fits an image smaller than that), over the positions where the window
    fits whole (no padding); the SSIM map is averaged over positions and channels. 1.0 for identical
    images; near 0 for unrelated ones; negative for anti-correlated structure.
    """
    _check_pair(a, b, data_range, "ssim")
    if a.ndim not in (2, 3):
        raise AttackError(f"ssim needs (H, W) or (C, H, W) images, got shape {tuple(a.shape)}")
    x = a.double().reshape(-1, 1, *a.shape[-2:])  # channels as a batch: per-channel SSIM
    y = b.double().reshape(-1, 1, *b.shape[-2:])
    size = min(SSIM_WINDOW, *a.shape[-2:])
    size -= 1 - size % 2  # odd, so the window has a centre
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    kernel_1d /= kernel_1d.sum()
    window = torch.outer(kernel_1d, kernel_1d)[None, None]

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def best_match(reconstruction: Tensor, candidates: Tensor, *, data_range: float | None = None
               ) -> tuple[int, float, float]:
    """The candidate (one of the client's own images) the reconstruction is closest to: (index, PSNR, SSIM).

    Closest means the highest PSNR (the first on a tie); its SSIM is reported beside it.
    ``candidates`` is (N, *reconstruction.shape); ``data_range`` defaults to the candidates' own
    max - min, so images in any normalization score alike. For the analytic attack, the candidates
    are the images' feature maps at the attacked layer, reshaped to (C, H, W).
    """
    if candidates.ndim != reconstruction.ndim + 1 or candidates.shape[1:] != reconstruction.shape:
        raise AttackError(f"best_match needs candidates of shape (N, {', '.join(map(str, reconstruction.shape))}), "
                          f"got {tuple(candidates.shape)}")
    if len(candidates) == 0:
        raise AttackError("best_match needs at least one candidate")
    if data_range is None:
        data_range = float(candidates.max() - candidates.min()) or 1.0
    scores = [psnr(reconstruction, c, data_range) for c in candidates]
    index = int(np.argmax(scores))
    return index, scores[index], ssim(reconstruction, candidates[index], data_range)


# --- membership inference -------------------------------------------------------------------------------------


def _as_scores(values: Tensor | Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise AttackError(f"{what} must be a non-empty 1-D list of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise AttackError(f"{what} must be finite; got NaN or infinity")
    return array


def membership_metrics(member_scores: Tensor | Sequence[float], nonmember_scores: Tensor | Sequence[float]
                       ) -> dict[str, float | int]:
    """ROC AUC and TPR at 1% FPR of "member if score >= t", over every threshold t; higher score = member.

    AUC is the Mann-Whitney probability that a member outscores a non-member, ties counting half.
    TPR at FPR <= 1% takes thresholds only at distinct scores, so tied members and non-members are
    accepted or refused together; with fewer than 100 non-members that means no false positive at all.
    """
    member_scores = _as_scores(member_scores, "member_scores")
    nonmember_scores = _as_scores(nonmember_scores, "nonmember_scores")
    n_members, n_nonmembers = member_scores.size, nonmember_scores.size
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))  # average ranks on ties
    auc = (ranks[:n_members].sum() - n_members * (n_members + 1) / 2) / (n_members * n_nonmembers)
    thresholds = np.unique(np.concatenate([member_scores, nonmember_scores]))
    members_sorted, nonmembers_sorted = np.sort(member_scores), np.sort(nonmember_scores)
    true_pos = n_members - np.searchsorted(members_sorted, thresholds, side="left")
    false_pos = n_nonmembers - np.searchsorted(nonmembers_sorted, thresholds, side="left")
    allowed = false_pos <= MEMBERSHIP_FPR * n_nonmembers + 1e-9
    tpr = float(true_pos[allowed].max() / n_members) if allowed.any() else 0.0
    return {"auc": float(auc), "tpr_at_1pct_fpr": tpr, "members": int(n_members), "nonmembers": int(n_nonmembers)}


def loss_threshold_attack(member_losses: Tensor | Sequence[float], nonmember_losses: Tensor | Sequence[float]
                          ) -> dict[str, float | int]:
    """Membership by a loss threshold (Yeom et al. 2018): the lower an example's loss, the likelier it was trained on.

    Returns ``auc``, ``tpr_at_1pct_fpr`` (see ``membership_metrics``), ``members`` and ``nonmembers``.
    AUC 0.5 is chance; it says how well *this* attack separates, not that no attack can.
    """
    members = _as_scores(member_losses, "member_losses")
    nonmembers = _as_scores(nonmember_losses, "nonmember_losses")
    return membership_metrics(-members, -nonmembers)


def calibrated_loss_attack(
    member_losses: Tensor | Sequence[float],
    nonmember_losses: Tensor | Sequence[float],
    reference_member_losses: Tensor | Sequence[float],
    reference_nonmember_losses: Tensor | Sequence[float],
) -> dict[str, float | int]:
    """The loss attack with difficulty calibration (Watson et al. 2022): score = -(loss - reference loss).

    Each example's loss under the target model minus its loss under a reference model that never
    trained on any candidate (the federation's start model, or a model of the same recipe on other
    data): an example that is hard for every model no longer looks like a non-member, nor an easy one
    like a member. The reference lists pair with the target lists element by element. Same metrics
    as ``loss_threshold_attack``.
    """
    members = _as_scores(member_losses, "member_losses")
    nonmembers = _as_scores(nonmember_losses, "nonmember_losses")
    reference_members = _as_scores(reference_member_losses, "reference_member_losses")
    reference_nonmembers = _as_scores(reference_nonmember_losses, "reference_nonmember_losses")
    if reference_members.size != members.size or reference_nonmembers.size != nonmembers.size:
        raise AttackError(f"calibrated_loss_attack needs one reference loss per example: {members.size} members "
                          f"vs {reference_members.size} references, {nonmembers.size} non-members vs "
                          f"{reference_nonmembers.size} references")
    return membership_metrics(reference_members - members, reference_nonmembers - nonmembers)


# --- one-run DP audit -----------------------------------------------------------------------------------------


def canary_coins(canaries: int, seed: int) -> Tensor:
    """Which of ``canaries`` canaries to include in training: an independent fair coin each, seeded (bool tensor)."""
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
        raise AttackError(f"canaries must be a positive int, got {canaries!r}")
    return torch.rand(canaries, generator=torch.Generator().manual_seed(seed)) < 0.5


def audit_guesses(scores: Tensor, included: Tensor, k_positive: int, k_negative: int) -> tuple[int, int]:
    """(correct, guesses) of an auditor who guesses "included" for the ``k_positive`` highest-scoring canaries
    and "excluded" for the ``k_negative`` lowest, abstaining on the rest.

    ``scores``: one per canary, higher = more likely included (e.g. minus the canary's loss);
    ``included``: the coins (``canary_coins``). Ties are broken by canary index, which is independent
    of the coins. Fix k_positive and k_negative before looking at the outcome: trying several and
    keeping the best needs a union bound (``beta`` divided by the number of tries) in
    ``one_run_epsilon_lower_bound``.
    """
    if scores.ndim != 1 or included.shape != scores.shape or included.dtype != torch.bool:
        raise AttackError(f"audit_guesses needs 1-D scores and a bool tensor of the same shape, got "
                          f"{tuple(scores.shape)} and {tuple(included.shape)} {included.dtype}")
    if not torch.isfinite(scores).all():
        raise AttackError("audit_guesses needs finite scores; got NaN or infinity")
    m = scores.shape[0]
    for name, k in (("k_positive", k_positive), ("k_negative", k_negative)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise AttackError(f"audit_guesses {name} must be an int >= 0, got {k!r}")
    if k_positive + k_negative > m:
        raise AttackError(f"audit_guesses k_positive + k_negative = {k_positive + k_negative} exceeds the {m} canaries")
    order = torch.sort(scores, descending=True, stable=True).indices
    correct = int(included[order[:k_positive]].sum()) + int((~included[order[m - k_negative:]]).sum())
    return correct, k_positive + k_negative


def _check_audit(correct: int, guesses: int, canaries: int, delta: float) -> None:
    for name, value in (("correct", correct), ("guesses", guesses), ("canaries", canaries)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AttackError(f"the one-run audit's {name} must be an int, got {value!r}")
    if not 0 <= correct <= guesses <= canaries or canaries < 1:
        raise AttackError(f"the one-run audit needs 0 <= correct <= guesses <= canaries, canaries >= 1; "
                          f"got correct={correct}, guesses={guesses}, canaries={canaries}")
    if not 0 <= delta < 1:
        raise AttackError(f"the one-run audit's delta must be in [0, 1), got {delta}")


def one_run_p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[at least ``correct`` of ``guesses`` right] for any (epsilon, delta)-DP training run.

    Steinke, Nasr, Jagielski 2023 (arXiv:2305.08846), main theorem, with W ~ Binomial(r, q),
    q = e^eps / (1 + e^eps), r guesses, v correct, m canaries:

        P[>= v correct] <= P[W >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= W < v] / i
    """
    _check_audit(correct, guesses, canaries, delta)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise AttackError(f"the one-run audit's epsilon must be a finite number >= 0, got {epsilon}")
    q = float(expit(epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))  # P[W >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    # P[v - i <= W < v] for i = 1..v, summed from the top down so small masses are not lost to rounding
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    return min(tail + 2 * canaries * delta * float(np.max(below / np.arange(1, correct + 1))), 1.0)


def one_run_epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float, beta: float = 0.05
                                ) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` refute at confidence 1 - beta.

    Any (epsilon, delta)-DP run with ``canaries`` canaries, each included by a fair coin, gives so many
    right guesses with probability at most ``one_run_p_value``; the bound is the largest epsilon with a
    p-value <= beta, found by bisection as in the paper's own code. 0.0 when even
    epsilon = 0 is not refuted. With probability >= 1 - beta over the coins, a mechanism that really is
    (epsilon, delta)-DP yields a bound <= epsilon.
    """
    _check_audit(correct, guesses, canaries, delta)
    if not 0 < beta < 1:
        raise AttackError(f"one_run_epsilon_lower_bound beta must be in (0, 1), got {beta}")

    def refuted(epsilon: float) -> bool:
        return one_run_p_value(correct, guesses, canaries, epsilon, delta) <= beta

    if not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):  # terminates: past epsilon ~ 37, q rounds to 1 and the p-value to 1
        low, high = high, 2 * high
    for _ in range(60):  # keep refuted(low), not refuted(high): the answer errs low, the safe side
        middle = (low + high) / 2
        low, high = (middle, high) if refuted(middle) else (low, middle)
    return low


def noise_canaries(count: int, seed: int, shape: Sequence[int] = (3, 128, 128), classes: int = 4
                   ) -> tuple[Tensor, Tensor]:
    """``count`` canaries for the audit: uniform-noise uint8 images of ``shape``, each with a uniform random label.

    Unlike any scan and nearly unlike each other, so what training on one does to the others is small and
    the real data teaches them nothing: how far the model moved towards a canary's label is mostly that
    canary's own doing. Seeded (``seed``), and drawn apart from the coins, which must not depend on them.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AttackError(f"noise_canaries count must be a positive int, got {count!r}")
    shape = tuple(shape)
    if not shape or not all(isinstance(s, int) and s >= 1 for s in shape) \
            or count * math.prod(shape) > MAX_CANARY_VALUES:
        raise AttackError(f"noise_canaries needs a shape of positive ints and at most {MAX_CANARY_VALUES:,} pixel "
                          f"values in all, got {count} x {shape}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise AttackError(f"noise_canaries classes must be an int >= 2, got {classes!r}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, classes, (count,), generator=generator)


def margin_gain_scores(logits_before: Tensor, logits_after: Tensor, labels: Tensor) -> Tensor:
    """How much training raised each canary's logit margin, centred per label: the audit's scores (higher = "in").

    The margin is the label's logit minus the mean of the other logits; its gain is the margin under the
    trained model minus the one under the start model. Training also moves every noise image towards the
    classes the included canaries carry; that shared drift is the same for an included and an excluded
    canary of one label, so each label's mean gain is subtracted. The scores depend on the trained model and
    the canaries only, never on the coins, as the one-run audit requires.
    """
    if logits_before.ndim != 2 or logits_after.shape != logits_before.shape or labels.shape != logits_before.shape[:1]:
        raise AttackError(f"margin_gain_scores needs two (canaries, classes) logit tensors and (canaries,) labels, got "
                          f"{tuple(logits_before.shape)}, {tuple(logits_after.shape)} and {tuple(labels.shape)}")
    classes = logits_before.shape[1]
    if classes < 2 or not (torch.isfinite(logits_before).all() and torch.isfinite(logits_after).all()):
        raise AttackError("margin_gain_scores needs finite logits over at least two classes")
    if labels.dtype != torch.long or len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        raise AttackError(f"margin_gain_scores labels must be int64 class indices in [0, {classes})")

    def margin(logits: Tensor) -> Tensor:
        logits = logits.double()
        own = logits.gather(1, labels[:, None])[:, 0]
        return own - (logits.sum(1) - own) / (classes - 1)

    gain = margin(logits_after) - margin(logits_before)
    for label in labels.unique():
        chosen = labels == label
        gain[chosen] -= gain[chosen].mean()
    return gain
