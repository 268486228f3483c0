"""The collection shortcut: does a model tell notumor from tumour by the scan's collection rather than by the head?

In the Kaggle Brain Tumor MRI set every ``notumor`` scan comes from one collection (Br35H) and every tumour
scan from two others (figshare, SARTAJ). Framing, background level and noise, white frame lines, the head's
size and position and the intensity profile all differ by collection, so a model can learn "this collection
means healthy". Three probes measure that:

- ``blanked_head_probe``: the model on scans whose head is replaced by the background level. Only what lies
  outside the head (and the head's silhouette) is left; a model that still separates notumor from tumour
  reads the collection.
- ``restyle_probe``: tumour scans histogram-matched, inside the head, to the notumor collection's intensity
  profile (and the reverse). A tumour that stays a tumour is judged by its content, not its styling.
- ``background_classifier_probe``: no model. A logistic regression on background-only features says how much
  of the label the data leaks outside the head at all.

``standardize_head`` and ``crop_head`` are the cheap preprocessing that removes most of those traces: the
head stretched to a fixed intensity range on a zero background, and cropped to fill the frame.

The head mask: grey levels above ``bg + HEAD_FRACTION * (p99 - bg)`` (``bg`` the image's 2nd percentile),
opened to cut 1-2 px frame lines and text, the largest connected component, holes filled, dilated
``DILATE_PX``. Why that threshold, on the 5,708 Training scans: the background's 90th percentile (inner
corners) lies below 10 % of the bg..p99 range for all but 18 (most of those: a head reaching the corner);
Otsu's threshold instead cuts dark head tissue (face, neck, grey matter on T1) out of the mask, on average
26 % of a notumor head and over 10 % of 2,393 heads. Known misses: 5 notumor scans whose grey background box
sits inside black padding (the mask is the whole frame) and one dark sagittal scan whose rim is open at the
neck (the brain is not filled). scipy (an Opacus dependency) labels the components; it is imported only
when a mask is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES, normalize
from edgemri.core.errors import EdgemriError
from edgemri.core.training.evaluate import predict_logits

NOTUMOR = CLASS_NAMES.index("notumor")
LEVELS = 256  # uint8 grey levels
BACKGROUND_QUANTILE = 0.02  # the background level: the head rarely covers 98 % of the frame
TOP_QUANTILE = 0.99  # the bright end of the range, robust to a few saturated pixels and frame lines
HEAD_FRACTION = 0.1  # of the bg..p99 range: above background noise on 99.7 % of the real scans (module doc)
# No head: a scan whose p99 - bg is under MIN_HEAD_CONTRAST levels (real scans: 72 and up; background noise
# alone: 4-10), or whose largest component covers under MIN_HEAD_AREA of the frame (real heads: 14 % and up).
MIN_HEAD_CONTRAST = 24
MIN_HEAD_AREA = 0.05
OPEN_PX = 1  # an opening of this radius removes frame lines and text up to 2 px wide before the components
DILATE_PX = 3  # the mask grows this much so the head's soft edge (resize blur, JPEG ringing) counts as head
CROP_MARGIN_PX = 2  # beyond the dilated mask
MAX_PIXELS_ARGUMENT = 64  # a dilation or margin beyond this is half the frame: a typo, not a choice
STANDARD_QUANTILES = (0.01, 0.99)  # the head's range that standardize_head maps to 0..255
# Background histogram bins, finer near black, where the collections' backgrounds differ (0-8 levels).
_BACKGROUND_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_BORDER_RINGS = ((0, 2), (2, 8))  # the outermost 2 px (frame lines), then the next 6 px (padding, noise)


class ShortcutError(EdgemriError):
    """A shortcut probe or head function got unusable input; the message names what."""


# --------------------------------------------------------------------------------------------- the head


def _grey(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, H, W), the mean of the channels (the scans are grey; a few are RGB)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else ""
        raise ShortcutError(f"images must be a uint8 tensor (N, 3, H, W), got {dtype} {shape}")
    return images.float().mean(dim=1)


def _as_images(grey: Tensor) -> Tensor:
    """float (N, H, W) -> uint8 (N, 3, H, W) with three equal channels."""
    return grey.round().clamp(0, LEVELS - 1).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


def _histograms(grey: Tensor, where: Tensor | None = None) -> Tensor:
    """(N, 256) pixel counts per grey level, of all pixels or only those ``where`` is True."""
    n = grey.shape[0]
    levels = grey.round().clamp(0, LEVELS - 1).long().reshape(n, -1)
    weights = torch.ones(levels.shape) if where is None else where.reshape(n, -1).float()
    return torch.zeros(n, LEVELS).scatter_add_(1, levels, weights)


def _quantiles(histograms: Tensor, q: float) -> Tensor:
    """(N,) the smallest level whose cumulative count reaches ``q`` of each histogram's total (0 when empty)."""
    cumulative = histograms.cumsum(dim=1)
    target = q * cumulative[:, -1:]
    return torch.searchsorted(cumulative, target).clamp(max=LEVELS - 1).squeeze(1).float()


def _dilate(mask: Tensor, px: int) -> Tensor:
    """bool (N, H, W) grown by a (2 px + 1)-square, as shifted ORs along rows then columns: ~25x faster than a
    float max-pool on a CPU. Outside the frame counts as False."""
    grown = mask.clone()
    for shift in range(1, px + 1):
        grown[:, shift:] |= mask[:, :-shift]
        grown[:, :-shift] |= mask[:, shift:]
    rows = grown.clone()
    for shift in range(1, px + 1):
        grown[:, :, shift:] |= rows[:, :, :-shift]
        grown[:, :, :-shift] |= rows[:, :, shift:]
    return grown


def _erode(mask: Tensor, px: int) -> Tensor:
    """bool (N, H, W) shrunk by a (2 px + 1)-square; outside the frame counts as True, so a head cut by the
    frame's edge is not eaten from there."""
    return ~_dilate(~mask, px)


def _check_masks(masks: Tensor, images: Tensor) -> Tensor:
    expected = (images.shape[0], *images.shape[2:])
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != expected:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
        raise ShortcutError(f"masks must be a bool tensor of shape {expected} (from head_mask), got {got}")
    return masks


def _check_pixels(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PIXELS_ARGUMENT:
        raise ShortcutError(f"{name} must be a whole number of pixels 0..{MAX_PIXELS_ARGUMENT}, got {value!r}")


def head_mask(images: Tensor, *, dilate: int = DILATE_PX) -> Tensor:
    """bool (N, H, W): each scan's head (skull and brain, holes filled), dilated ``dilate`` px; empty where there is
    no head (a flat or background-only image).

    ``images``: uint8 (N, 3, H, W). See the module doc for the threshold and why.
    """
    from scipy import ndimage  # here, not at the top: only the probes and the head preprocessing need it

    _check_pixels(dilate, "dilate")
    grey = _grey(images)
    histograms = _histograms(grey)
    low = _quantiles(histograms, BACKGROUND_QUANTILE)
    high = _quantiles(histograms, TOP_QUANTILE)
    foreground = grey > (low + HEAD_FRACTION * (high - low))[:, None, None]
    foreground &= (high - low >= MIN_HEAD_CONTRAST)[:, None, None]
    foreground = _dilate(_erode(foreground, OPEN_PX), OPEN_PX)
    heads = np.zeros(foreground.shape, dtype=bool)
    smallest = MIN_HEAD_AREA * foreground.shape[1] * foreground.shape[2]
    for i, scan in enumerate(foreground.numpy()):
        labels, count = ndimage.label(scan)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0  # the background's label
        if count and sizes.max() >= smallest:
            # Holes: the parts of the rest that do not reach the frame's edge. Two labellings cost a third of
            # ndimage.binary_fill_holes, which dilates step by step; the result is the same.
            rest, _ = ndimage.label(labels != sizes.argmax())
            edge = np.unique(np.concatenate([rest[0], rest[-1], rest[:, 0], rest[:, -1]]))
            heads[i] = ~np.isin(rest, edge[edge > 0])
    return _dilate(torch.from_numpy(heads), dilate)


def background_level(images: Tensor, masks: Tensor | None = None) -> Tensor:
    """(N,) float: the median grey level outside each head (0 where the head fills the frame)."""
    grey = _grey(images)
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    return _quantiles(_histograms(grey, ~masks), 0.5)


def blank_head(images: Tensor, masks: Tensor | None = None) -> Tensor:
    """uint8 images with each head (``head_mask``) set to that scan's background level, in every channel.

    What remains: the background, its noise, frame lines, text, padding, and the head's silhouette.
    """
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    level = background_level(images, masks).round().to(torch.uint8)
    fill = level[:, None, None, None].expand_as(images)
    return torch.where(masks[:, None], fill, images)


@dataclass(frozen=True)
class IntensityProfile:
    """A collection's look: the average head histogram (as a cumulative share per level) and background level."""

    head_cdf: Tensor  # (256,) float64, non-decreasing, ends at 1
    background: float
    images: int


def intensity_profile(images: Tensor, masks: Tensor | None = None) -> IntensityProfile:
    """The average of the scans' head histograms (each scan weighs the same) and their mean background level."""
    if len(images) == 0:
        raise ShortcutError("an intensity profile needs at least one image")
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    histograms = _histograms(_grey(images), masks).double()
    has_head = histograms.sum(dim=1) > 0
    if not bool(has_head.any()):
        raise ShortcutError(f"none of the {len(images)} images has a head region (all flat?)")
    shares = histograms[has_head] / histograms[has_head].sum(dim=1, keepdim=True)
    cdf = shares.mean(dim=0).cumsum(dim=0)
    return IntensityProfile(head_cdf=cdf / cdf[-1], background=float(background_level(images, masks).mean()),
                            images=len(images))


def restyle(images: Tensor, profile: IntensityProfile, masks: Tensor | None = None) -> Tensor:
    """uint8 grey images (3 equal channels) whose head histogram is matched to ``profile``'s and whose background
    is ``profile.background``.

    Matching maps each level to the profile's level at the same cumulative share (the midpoint of the level's
    own step), so it is monotone: what is brighter than its surroundings stays brighter.
    """
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    grey = _grey(images)
    histograms = _histograms(grey, masks).double()
    totals = histograms.sum(dim=1, keepdim=True).clamp(min=1)
    midpoints = (histograms.cumsum(dim=1) - histograms / 2) / totals
    target = profile.head_cdf.double().expand(len(grey), -1).contiguous()
    lookup = torch.searchsorted(target, midpoints).clamp(max=LEVELS - 1)
    levels = grey.round().clamp(0, LEVELS - 1).long().reshape(len(grey), -1)
    matched = lookup.gather(1, levels).reshape(grey.shape).float()
    return _as_images(torch.where(masks, matched, torch.full_like(grey, profile.background)))


def standardize_head(images: Tensor, masks: Tensor | None = None) -> Tensor:
    """uint8 grey images (3 equal channels): each head's 1st..99th percentile stretched to 0..255, background 0.

    Removes the background (level, noise, frame lines, text), the colour of the few RGB scans and the head's
    brightness and contrast; the ordering of levels inside the head is kept. A flat image becomes all 0.
    """
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    grey = _grey(images)
    histograms = _histograms(grey, masks)
    low, high = (_quantiles(histograms, q)[:, None, None] for q in STANDARD_QUANTILES)
    stretched = ((grey - low) / (high - low).clamp(min=1) * (LEVELS - 1)).clamp(0, LEVELS - 1)
    return _as_images(torch.where(masks, stretched, torch.zeros_like(grey)))


def _bounding_boxes(masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, bottom, left, right) pixel edges of each mask's bounding box (float, bottom/right exclusive); an
    empty mask gives the whole frame."""
    _, height, width = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    steps_h, steps_w = torch.arange(height).float(), torch.arange(width).float()
    top = torch.where(rows, steps_h, float(height)).amin(dim=1)
    bottom = torch.where(rows, steps_h, -1.0).amax(dim=1) + 1
    left = torch.where(cols, steps_w, float(width)).amin(dim=1)
    right = torch.where(cols, steps_w, -1.0).amax(dim=1) + 1
    empty = ~rows.any(dim=1)
    top[empty], left[empty], bottom[empty], right[empty] = 0.0, 0.0, float(height), float(width)
    return top, bottom, left, right


def crop_head(images: Tensor, masks: Tensor | None = None, *, margin: int = CROP_MARGIN_PX) -> Tensor:
    """uint8 images with each head zoomed to fill the frame: the square around the mask's bounding box (plus
    ``margin`` px, at most the frame) resized back to H x W, bilinear; outside the frame counts as 0.

    Square, so the head keeps its shape (a stretch would be a new trace of its size); meant after
    ``standardize_head``, whose background is 0. A scan without a head is returned as it is.
    """
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    n, _, height, width = images.shape
    _check_pixels(margin, "margin")
    top, bottom, left, right = _bounding_boxes(masks)  # an empty mask's box, the frame, maps to itself
    side = (torch.maximum(bottom - top, right - left) + 2 * margin).clamp(max=max(height, width))
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    # align_corners=False: normalized -1..1 spans the pixel edges 0..W, so a box maps by scale and shift.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side / width
    theta[:, 0, 2] = 2 * centre_x / width - 1
    theta[:, 1, 1] = side / height
    theta[:, 1, 2] = 2 * centre_y / height - 1
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    # Grey batches (what standardize_head returns) are sampled once, not three times.
    grey = bool((images[:, 1:] == images[:, :1]).all())
    source = images[:, :1] if grey else images
    cropped = F.grid_sample(source.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return cropped.round().clamp(0, LEVELS - 1).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------- probes


def _auc(scores: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``scores`` for ``positive`` (scikit-learn's), NaN when a side is empty."""
    from sklearn.metrics import roc_auc_score  # here: only the probes need scikit-learn

    if bool(positive.all()) or not bool(positive.any()):
        return float("nan")
    return float(roc_auc_score(positive.numpy(), scores.double().numpy()))


def _labelled(split: ArraySplit, what: str) -> tuple[Tensor, Tensor]:
    """(notumor, tumour) boolean index of ``split``; both must be non-empty."""
    notumor, tumour = split.labels == NOTUMOR, (split.labels >= 0) & (split.labels != NOTUMOR)
    if not bool(notumor.any()) or not bool(tumour.any()):
        raise ShortcutError(f"{what} needs both notumor and tumour images, got {int(notumor.sum())} notumor and "
                            f"{int(tumour.sum())} tumour")
    return notumor, tumour


def _predict(model: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(predicted class, notumor probability) per image."""
    probs = predict_logits(model, images, transform).float().softmax(dim=1)
    return probs.argmax(dim=1), probs[:, NOTUMOR]


def _share(values: Tensor) -> float:
    return float(values.float().mean()) if len(values) else float("nan")


@dataclass(frozen=True)
class BlankedHeadProbe:
    """The model on scans with the head blanked (``blank_head``)."""

    images: int
    accuracy: float  # on the blanked scans; chance is the majority class's share
    notumor_share: dict[str, float]  # per true class: the share of blanked scans predicted notumor
    notumor_separation: float  # AUC of P(notumor) on blanked scans, notumor vs tumour: 0.5 = no shortcut

    def to_dict(self) -> dict[str, float | int]:
        shares = {f"notumor_share_{name}": share for name, share in self.notumor_share.items()}
        return {"images": self.images, "accuracy": self.accuracy, "notumor_separation": self.notumor_separation,
                **shares}


def blanked_head_probe(model: nn.Module, split: ArraySplit, *,
                       transform: Callable[[Tensor], Tensor] = normalize) -> BlankedHeadProbe:
    """Predict ``split`` with every head blanked; ``transform`` is the model's uint8 -> input preprocessing."""
    notumor, _ = _labelled(split, "the blanked-head probe")
    predicted, p_notumor = _predict(model, blank_head(split.images), transform)
    labels = split.labels
    shares = {name: _share(predicted[labels == c] == NOTUMOR) for c, name in enumerate(CLASS_NAMES)
              if bool((labels == c).any())}
    return BlankedHeadProbe(images=len(split), accuracy=_share(predicted == labels), notumor_share=shares,
                            notumor_separation=_auc(p_notumor[labels >= 0], notumor[labels >= 0]))


@dataclass(frozen=True)
class RestyleProbe:
    """Tumour scans restyled to the notumor collection's profile, notumor scans to the tumour collections'; and, as
    a control for what restyling alone does, each restyled to its own kind's profile."""

    tumour_images: int
    tumour_accuracy_before: float
    tumour_accuracy_after: float
    tumour_flipped_to_notumor: float  # share of tumour scans not predicted notumor before, notumor after
    tumour_accuracy_control: float  # restyled to the tumour profile
    tumour_flipped_to_notumor_control: float
    notumor_images: int
    notumor_accuracy_before: float
    notumor_accuracy_after: float
    notumor_flipped_from_notumor: float  # share of notumor scans predicted notumor before, not after
    notumor_accuracy_control: float  # restyled to the notumor profile
    notumor_flipped_from_notumor_control: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _restyled(model: nn.Module, images: Tensor, labels: Tensor, profile: IntensityProfile, own: IntensityProfile,
              transform: Callable[[Tensor], Tensor]) -> tuple[float, float, float, float, float]:
    """(accuracy before, after restyling to ``profile``, its flip share, accuracy after restyling to ``own``, its
    flip share). A flip: a tumour scan that turns notumor, a notumor scan that stops being notumor."""
    masks = head_mask(images)
    before, _ = _predict(model, images, transform)
    after, _ = _predict(model, restyle(images, profile, masks), transform)
    control, _ = _predict(model, restyle(images, own, masks), transform)
    was_notumor = before == NOTUMOR
    healthy = bool((labels == NOTUMOR).all())
    flips = [was_notumor & (now != NOTUMOR) if healthy else ~was_notumor & (now == NOTUMOR) for now in (after, control)]
    return (_share(before == labels), _share(after == labels), _share(flips[0]), _share(control == labels),
            _share(flips[1]))


def restyle_probe(model: nn.Module, split: ArraySplit, reference: ArraySplit, *,
                  transform: Callable[[Tensor], Tensor] = normalize) -> RestyleProbe:
    """Restyle ``split``'s scans to profiles taken from ``reference``'s notumor and tumour scans and predict them."""
    notumor, tumour = _labelled(split, "the restyle probe")
    ref_notumor, ref_tumour = _labelled(reference, "the restyle probe's reference")
    notumor_profile = intensity_profile(reference.images[ref_notumor])
    tumour_profile = intensity_profile(reference.images[ref_tumour])
    tumour_rows = _restyled(model, split.images[tumour], split.labels[tumour], notumor_profile, tumour_profile,
                            transform)
    notumor_rows = _restyled(model, split.images[notumor], split.labels[notumor], tumour_profile, notumor_profile,
                             transform)
    return RestyleProbe(int(tumour.sum()), *tumour_rows, int(notumor.sum()), *notumor_rows)


def background_features(images: Tensor, masks: Tensor | None = None) -> Tensor:
    """(N, 40) float64 features of what lies outside each head only: the background's level histogram (16 bins),
    share of the frame, mean, std and colour (max - min channel); the head's bounding box (top, bottom, left,
    right, as shares of the frame); per side, the outermost 2 px and the next 6 px: share outside the head and
    mean level there."""
    masks = head_mask(images) if masks is None else _check_masks(masks, images)
    grey = _grey(images)
    n, height, width = grey.shape
    outside = ~masks
    histogram = _histograms(grey, outside).double()
    count = histogram.sum(dim=1)
    per_pixel = count.clamp(min=1)
    edges = _BACKGROUND_EDGES
    binned = torch.stack([histogram[:, a:b].sum(dim=1) for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=1)
    levels = torch.arange(LEVELS, dtype=torch.float64)
    mean = histogram @ levels / per_pixel
    std = (histogram @ levels.square() / per_pixel - mean.square()).clamp(min=0).sqrt()
    spread = images.amax(dim=1) - images.amin(dim=1)  # 0 on a grey pixel
    colour = torch.where(outside, spread, 0).reshape(n, -1).sum(dim=1, dtype=torch.float64) / per_pixel
    top, bottom, left, right = _bounding_boxes(masks)
    box = torch.stack([top / height, bottom / height, left / width, right / width], dim=1).double()
    features = [binned / per_pixel[:, None], (count / (height * width))[:, None], mean[:, None], std[:, None],
                colour[:, None], box]
    for start, stop in _BORDER_RINGS:
        sides = ((slice(start, stop), slice(None)), (slice(height - stop, height - start), slice(None)),
                 (slice(None), slice(start, stop)), (slice(None), slice(width - stop, width - start)))
        for row_part, col_part in sides:
            strip, free = grey[:, row_part, col_part], outside[:, row_part, col_part]
            free_count = free.reshape(n, -1).sum(dim=1).double()
            level = torch.where(free, strip, 0).reshape(n, -1).sum(dim=1, dtype=torch.float64)
            features += [(free_count / free[0].numel())[:, None], (level / free_count.clamp(min=1))[:, None]]
    return torch.cat(features, dim=1)


@dataclass(frozen=True)
class BackgroundClassifierProbe:
    """A logistic regression on ``background_features`` telling notumor from tumour: how much the data leaks
    outside the head, whatever model is trained on it."""

    train_images: int
    test_images: int
    features: int
    test_auc: float  # 0.5 = the background says nothing about the label
    test_accuracy: float  # at P(notumor) >= 0.5
    majority_accuracy: float  # always answering the test split's larger side
    train_auc: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def background_classifier_probe(train: ArraySplit, test: ArraySplit, *, c: float = 1.0) -> BackgroundClassifierProbe:
    """Fit on ``train``'s background features (standardized by ``train``'s mean and std), score ``test``."""
    if not c > 0:
        raise ShortcutError(f"the regularization c must be > 0, got {c}")
    train_notumor, _ = _labelled(train, "the background classifier's training split")
    test_notumor, _ = _labelled(test, "the background classifier's test split")
    train_known, test_known = train.labels >= 0, test.labels >= 0
    # scikit-learn is imported here: a device that predicts or trains never loads it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = background_features(train.images[train_known]).numpy()
    x_test = background_features(test.images[test_known]).numpy()
    y_train, y_test = train_notumor[train_known], test_notumor[test_known]
    # lbfgs on a strictly convex objective: the same fit on every run, no seed needed.
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x_train, y_train.numpy())
    test_scores = torch.from_numpy(classifier.decision_function(x_test))
    train_scores = torch.from_numpy(classifier.decision_function(x_train))
    positives = float(y_test.double().mean())
    return BackgroundClassifierProbe(
        train_images=len(y_train), test_images=len(y_test), features=x_train.shape[1],
        test_auc=_auc(test_scores, y_test), test_accuracy=_share((test_scores >= 0) == y_test),
        majority_accuracy=max(positives, 1 - positives), train_auc=_auc(train_scores, y_train))


def shortcut_report(model: nn.Module, dataset: Dataset, *,
                    transform: Callable[[Tensor], Tensor] = normalize) -> dict[str, Any]:
    """The blanked-head and restyle probes on Testing, with Training as the restyle reference."""
    return {"split": "Testing", "reference": "Training",
            "blanked_head": blanked_head_probe(model, dataset.test, transform=transform).to_dict(),
            "restyle": restyle_probe(model, dataset.test, dataset.train, transform=transform).to_dict()}


def apply_head_step(images: Tensor, step: str) -> Tensor:
    """A model's head step (``preprocessing["head"]``, core.config.HEAD_STEPS) on decoded uint8 scans: ``none`` returns
    them as they are; ``standardize-crop`` standardizes the head's intensities, then crops the frame to the head."""
    if step == "none":
        return images
    if step != "standardize-crop":
        raise ShortcutError(f"head step {step!r} is not allowed; allowed: none, standardize-crop")
    masks = head_mask(images)
    return crop_head(standardize_head(images, masks), masks)
