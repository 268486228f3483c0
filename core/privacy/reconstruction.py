"""The reconstruction attacks on the student, scored the way a privacy reviewer reads them (Flower-free).

``core.privacy.attacks`` holds the attacks themselves, on any model; this module aims them at the student and
scores what they return:

- ``single_image_step``: the update one plain SGD step on one scan sends, with or without DP-SGD (the worst
  case of what one update can carry);
- ``analytic_attack``: ``linear_leakage`` on the student's head, scored on the scans' feature maps (the head's
  input), each class row too;
- ``inversion_attack``: ``invert_gradients`` with the model the client received, scored in pixels;
- ``score`` and ``site_baseline``: the best match among the client's own images, against what random held-out
  images of the same site score (two unrelated slices of one scanner already look alike).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgemri.core.config import TrainSpec
from edgemri.core.data.images import CLASS_NAMES, MEAN, STD, normalize
from edgemri.core.privacy import attacks
from edgemri.core.privacy.dp import DPPlan, opacus_wrap
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, fit
from edgemri.models import Student

INVERSION_LR, INVERSION_TV = 0.1, 1e-2  # Geiping et al.'s step size; their strongest total-variation prior
PSNR_CAP_DB = 100.0  # identical up to float rounding; keeps the JSON finite
# The range of a normalized pixel: what a reconstruction is clamped to.
INPUT_BOUNDS = (min((0 - m) / s for m, s in zip(MEAN, STD, strict=True)),
                max((1 - m) / s for m, s in zip(MEAN, STD, strict=True)))


def single_image_step(model: Student, image: Tensor, label: int, plan: DPPlan | None, seed: int) -> dict[str, Tensor]:
    """The update one plain SGD step at rate 1 on one scan sends: minus its gradient, or under DP-SGD minus its
    clipped gradient plus noise of the plan's multiplier times its clipping norm (Opacus, through the training
    loop's own hook; Poisson rate 1, so the scan is in the step). ``model`` is the model the step starts from and
    is trained in place (pass a fresh one); ``image``: uint8 (3, H, W)."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrap = None
    if plan is not None:
        wrap = opacus_wrap(dataclasses.replace(plan, sample_rate=1.0, steps_per_epoch=1, steps_per_round=1), seed)
    fit(model, TrainData(image[None], torch.tensor([label])), loss=cross_entropy, seed=seed, select="last",
        spec=TrainSpec(epochs=1, batch_size=1, lr=1.0, optimizer="sgd", momentum=0.0), wrap=wrap)
    return {k: v.detach() - before[k] for k, v in model.state_dict().items()}


def head_names(state: dict[str, Tensor]) -> tuple[str, str] | None:
    """The weight and bias keys of the student's Linear head."""
    weight, bias = f"{Student.HEAD_PREFIX}1.weight", f"{Student.HEAD_PREFIX}1.bias"
    return (weight, bias) if weight in state and bias in state else None


@torch.no_grad()
def feature_maps(model: Student, images: Tensor) -> Tensor:
    """The head's input for uint8 images: the (N, 3, 32, 32) maps of the second conv block, a downsampled scan."""
    model.eval()
    return torch.cat([model.conv_block_2(model.conv_block_1(normalize(images[i:i + 256])))
                      for i in range(0, len(images), 256)])


def _capped(psnr: float) -> float:
    return min(psnr, PSNR_CAP_DB)


def site_baseline(baseline: Tensor | None, candidates: Tensor, data_range: float) -> dict[str, float] | None:
    """What random held-out images of the site score against the client's images (the mean of their best matches)."""
    if baseline is None or not len(baseline):
        return None
    scores = [attacks.best_match(b, candidates, data_range=data_range) for b in baseline]
    return {"psnr": float(np.mean([_capped(s[1]) for s in scores])), "ssim": float(np.mean([s[2] for s in scores])),
            "images": len(scores)}


def score(reconstruction: Tensor, candidates: Tensor, baseline: dict[str, float] | None, data_range: float,
          true_index: int | None = None) -> dict[str, Any]:
    """Best match among the client's images (PSNR, SSIM), against the site baseline; and the true image's, if known."""
    index, psnr, ssim = attacks.best_match(reconstruction, candidates, data_range=data_range)
    out: dict[str, Any] = {"best_match_index": index, "psnr": _capped(psnr), "ssim": ssim}
    if true_index is not None:
        out.update({"matches_true_image": index == true_index,
                    "psnr_true": _capped(attacks.psnr(reconstruction, candidates[true_index], data_range)),
                    "ssim_true": attacks.ssim(reconstruction, candidates[true_index], data_range)})
    if baseline is not None:
        out.update({"baseline_psnr": baseline["psnr"], "baseline_ssim": baseline["ssim"],
                    "margin_db": out["psnr"] - baseline["psnr"],
                    "within_1db_of_random": out["psnr"] - baseline["psnr"] <= 1.0})
    return out


def analytic_attack(grads: dict[str, Tensor], candidates: Tensor, baseline: Tensor | None, *, update: bool,
                    true_index: int | None = None, true_label: int | None = None
                    ) -> tuple[dict[str, Any], Tensor | None]:
    """``linear_leakage`` on the head's gradient (or update), scored on feature maps; each class row scored too
    (for several images per step every row is a mix: row k leans towards the images of class k)."""
    head = head_names(grads)
    if head is None:
        return {"applicable": False, "why": "the head is not sent (the method keeps it on the client)"}, None
    weight, bias = grads[head[0]].double(), grads[head[1]].double()
    try:
        flat, label = attacks.linear_leakage(weight, bias, update=update)
    except attacks.AttackError as err:
        return {"applicable": False, "why": str(err)}, None
    shape = candidates.shape[1:]
    data_range = float(candidates.max() - candidates.min()) or 1.0
    reference = site_baseline(baseline, candidates, data_range)
    reconstruction = flat.reshape(shape).float()
    out: dict[str, Any] = {"applicable": True, "label": CLASS_NAMES[label],
                           **score(reconstruction, candidates, reference, data_range, true_index)}
    if true_label is not None:
        out["label_recovered"] = label == true_label
    out["rows"] = [{"class": CLASS_NAMES[k],
                    "psnr": _capped(attacks.best_match((weight[k] / bias[k]).reshape(shape).float(), candidates,
                                                       data_range=data_range)[1])}
                   for k in range(len(bias)) if bias[k] != 0]
    return out, reconstruction


def to_pixels(normalized: Tensor) -> Tensor:
    """A normalized (1, 3, H, W) input back in [0, 1] pixel space, (3, H, W)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (normalized[0] * std + mean).clamp(0, 1)


def inversion_attack(received: Student, grads: dict[str, Tensor], label: int, candidates: Tensor,
                     baseline: dict[str, float] | None, true_index: int, *, steps: int, seed: int
                     ) -> tuple[dict[str, Any], Tensor]:
    """``invert_gradients`` with ``received``, the global model the server sent; scored in [0, 1] pixels against
    the client's scans. The label comes off the head's gradient where the head is sent; else the attacker is
    given it."""
    given = head_names(grads) is None
    started = time.perf_counter()
    image = attacks.invert_gradients(received, grads, (1, *candidates.shape[1:]), label if given else None,
                                     steps=steps, lr=INVERSION_LR, seed=seed, tv_weight=INVERSION_TV,
                                     bounds=INPUT_BOUNDS)
    seconds = time.perf_counter() - started
    pixels = to_pixels(image)
    out = {"steps": steps, "seconds": seconds, "label_given": given,
           **score(pixels, candidates, baseline, 1.0, true_index)}
    if not given:
        head = head_names(grads)
        out["label_recovered"] = attacks.linear_leakage(grads[head[0]], grads[head[1]])[1] == label
    return out, pixels
