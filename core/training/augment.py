"""Augmented views for consistent teaching: the student and the teacher see the very same view.

A view is a row of parameters (flip, rotation, zoom, shift, contrast, gamma) drawn once per
(image, view) from a seeded generator, so ``apply_views`` rebuilds a view exactly whenever it is
needed: the teacher scores each view once (its logits are cached) and the student, epochs later,
trains on the identical pixels. View 0 of every image is the image itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.config import AugmentConfig
from edgemri.core.progress import track
from edgemri.core.training.evaluate import predict_logits
from edgemri.core.training.train import Batch, TrainData, Transform

# Columns of a view's parameter row.
FLIP, ANGLE, ZOOM, SHIFT_X, SHIFT_Y, CONTRAST, GAMMA = range(7)
PARAMS = 7
IDENTITY = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])


def draw_views(n: int, views: int, augment: AugmentConfig, seed: int) -> Tensor:
    """(n, views, PARAMS) view parameters; view 0 is the identity. The same arguments give the same views."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, views, generator=generator)

    params = torch.empty(n, views, PARAMS)
    flips = torch.rand(n, views, generator=generator) < 0.5
    params[..., FLIP] = torch.where(flips & bool(augment.flip), -1.0, 1.0)
    params[..., ANGLE] = uniform(-augment.rotate_deg, augment.rotate_deg) * math.pi / 180
    params[..., ZOOM] = uniform(1 - augment.scale, 1 + augment.scale)
    params[..., SHIFT_X] = uniform(-augment.translate, augment.translate)
    params[..., SHIFT_Y] = uniform(-augment.translate, augment.translate)
    params[..., CONTRAST] = uniform(1 - augment.contrast, 1 + augment.contrast)
    params[..., GAMMA] = torch.exp(uniform(-augment.gamma, augment.gamma))
    if views:
        params[:, 0] = IDENTITY
    return params


def apply_views(images: Tensor, params: Tensor) -> Tensor:
    """uint8 (B, C, H, W) images and (B, PARAMS) rows -> float32 views in [0, 255] (the scale ``normalize`` takes).

    Geometry is one affine resampling per image (zeros outside: the MRI background); intensity is a gamma
    and a contrast factor on the [0, 1] scale. An identity row returns the image unchanged.
    """
    x = images.float()
    identity = (params == IDENTITY).all(dim=1)
    if bool(identity.all()):
        return x
    cos, sin = torch.cos(params[:, ANGLE]), torch.sin(params[:, ANGLE])
    zoom, flip = params[:, ZOOM], params[:, FLIP]
    # affine_grid maps output to input coordinates: zooming in by z samples a 1/z-sized window.
    theta = torch.stack([
        torch.stack([flip * cos / zoom, -sin / zoom, params[:, SHIFT_X] * 2], dim=1),
        torch.stack([flip * sin / zoom, cos / zoom, params[:, SHIFT_Y] * 2], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma, contrast = params[:, GAMMA].view(-1, 1, 1, 1), params[:, CONTRAST].view(-1, 1, 1, 1)
    out = (warped.clamp(0, 1) ** gamma * contrast).clamp(0, 1) * 255
    # Exact copies for identity rows: view 0 is the image itself, bit for bit.
    return torch.where(identity.view(-1, 1, 1, 1), x, out)


@dataclass(kw_only=True)
class ViewData(TrainData):
    """Training rows that are drawn, each epoch, as one of their cached views: ``view_params`` (N, V, PARAMS);
    every extra holds one row per view (N, V, ...), e.g. the teacher's logits for exactly that view."""

    view_params: Tensor

    def batch(self, index: Tensor, generator: torch.Generator) -> Batch:
        pick = torch.randint(self.view_params.shape[1], (len(index),), generator=generator)
        inputs = apply_views(self.inputs[index], self.view_params[index, pick])
        return Batch(self.transform(inputs), self.labels[index], tuple(e[index, pick] for e in self.extras))


@torch.no_grad()
def view_logits(model: nn.Module, images: Tensor, view_params: Tensor, transform: Transform,
                known: Tensor | None = None, progress: bool = False) -> Tensor:
    """(N, V, classes) logits of every view of every image, one pass each. ``known``: the logits of view 0 (the
    image itself) of the first ``len(known)`` images, computed already, so those are not passed again."""
    n, views = view_params.shape[:2]
    per_view = []
    for k in track(range(views), "teacher views", enabled=progress, unit="views"):
        skip = len(known) if known is not None and k == 0 else 0
        logits = predict_logits(model, torch.arange(skip, n),
                                lambda rows, k=k: transform(apply_views(images[rows], view_params[rows, k])))
        per_view.append(logits if not skip else known if skip == n else torch.cat([known, logits]))
    return torch.stack(per_view, dim=1)
