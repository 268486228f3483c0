"""The collection-shortcut probes and head preprocessing on hand-built scans: a disc "head" on a background.

Two toy collections mimic the real set: the notumor collection has a grey background (30) with a white frame
line and a dim head (60..140, a left-to-right ramp); the tumour collection a black background and a bright head
(140..160) with a brighter blob (250) at its centre. A model that reads only the border must show a strong
shortcut on every probe; one that reads only the blob (centre against the ring around it) must show none.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import MEAN, STD
from edgemri.core.training.shortcut import (
    NOTUMOR,
    ShortcutError,
    _dilate,
    background_classifier_probe,
    blank_head,
    blanked_head_probe,
    crop_head,
    head_mask,
    intensity_profile,
    restyle,
    restyle_probe,
    shortcut_report,
    standardize_head,
)

SIZE = 64
GLIOMA = 0
_ROWS, _COLS = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")


def _scan(*, head: tuple[float, float], background: float, frame: float | None = None, blob: float | None = None,
          centre: tuple[float, float] = (32.0, 32.0), radius: float = 20.0, seed: int = 0) -> Tensor:
    """One uint8 (3, SIZE, SIZE) grey scan: a disc with a horizontal ramp ``head`` = (low, high) on a noisy
    background, optionally a 1-px ``frame`` line and a radius-4 ``blob`` at the disc's centre."""
    noise = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 1.5
    distance = ((_ROWS - centre[0]) ** 2 + (_COLS - centre[1]) ** 2).sqrt()
    ramp = head[0] + (head[1] - head[0]) * ((_COLS - centre[1]) / radius + 1) / 2
    grey = torch.where(distance <= radius, ramp, torch.full_like(ramp, background)) + noise
    if blob is not None:
        grey = torch.where(distance <= 4, torch.full_like(grey, blob), grey)
    if frame is not None:
        grey[[0, -1], :] = frame
        grey[:, [0, -1]] = frame
    return grey.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).clone()


def _notumor(seed: int) -> Tensor:
    return _scan(head=(60, 140), background=30, frame=200, seed=seed)


def _tumour(seed: int) -> Tensor:
    return _scan(head=(140, 160), background=0, blob=250, seed=seed)


def _split(count: int, seed: int) -> ArraySplit:
    """``count`` notumor then ``count`` glioma scans of the two toy collections."""
    images = torch.stack([_notumor(seed + i) for i in range(count)] + [_tumour(seed + i) for i in range(count)])
    labels = torch.tensor([NOTUMOR] * count + [GLIOMA] * count)
    return ArraySplit(images, labels, [f"s{seed}_{i}.png" for i in range(2 * count)])


def _raw_grey(x: Tensor) -> Tensor:
    """The grey levels (0..255) behind a normalized batch's first channel."""
    return (x[:, 0] * STD[0] + MEAN[0]) * 255


class _BackgroundModel(nn.Module):
    """Says notumor when the outermost 2-px ring is brighter than 15: it reads only the background."""

    def forward(self, x: Tensor) -> Tensor:
        grey = _raw_grey(x)
        ring = torch.ones(grey.shape[1:], dtype=torch.bool)
        ring[2:-2, 2:-2] = False
        logits = torch.zeros(len(x), 4)
        logits[:, NOTUMOR] = (grey[:, ring].mean(dim=1) - 15) / 5
        return logits


class _BlobModel(nn.Module):
    """Says tumour when the centre is 20 levels brighter than the ring 8..12 px around it: it reads only the head."""

    def forward(self, x: Tensor) -> Tensor:
        grey = _raw_grey(x)
        distance = ((_ROWS - 32) ** 2 + (_COLS - 32) ** 2).sqrt()
        contrast = grey[:, distance <= 3].mean(dim=1) - grey[:, (distance >= 8) & (distance <= 12)].mean(dim=1)
        logits = torch.zeros(len(x), 4)
        logits[:, NOTUMOR] = (20 - contrast) / 2
        return logits


def test_the_head_mask_is_the_disc_without_frame_or_background() -> None:
    images = torch.stack([_notumor(0), _tumour(1)])
    masks = head_mask(images, dilate=0)
    disc = ((_ROWS - 32) ** 2 + (_COLS - 32) ** 2).sqrt() <= 20
    for mask in masks:
        assert int((mask ^ disc).sum()) <= 0.03 * int(disc.sum())  # a few edge pixels of the round disc
        assert not mask[0].any() and not mask[:, 0].any()  # the frame line is not head
    assert torch.equal(head_mask(images), _dilate(masks, 3))  # dilated 3 px by default
    assert not head_mask(torch.full((1, 3, SIZE, SIZE), 40, dtype=torch.uint8)).any()  # a flat image: no head
    noise_only = _scan(head=(0, 0), background=0, radius=0)  # background noise of +-1.5 levels
    speck = _scan(head=(200, 200), background=0, radius=3)  # 29 px: text or a marker, not a head
    assert not head_mask(torch.stack([noise_only, speck])).any()


def test_the_dilation_is_a_square_max_filter() -> None:
    mask = torch.rand(4, 20, 24, generator=torch.Generator().manual_seed(0)) > 0.9
    expected = F.max_pool2d(mask[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
    assert torch.equal(_dilate(mask, 2), expected)


def test_a_blanked_scan_keeps_nothing_of_the_head() -> None:
    images = torch.stack([_tumour(0), _scan(head=(40, 220), background=0, seed=0)])  # same background, other head
    masks = head_mask(images)
    blanked = blank_head(images, masks)
    assert torch.equal(blanked[:, :, ~masks[0]], images[:, :, ~masks[0]])  # the background is untouched
    assert int(blanked[0][:, masks[0]].max()) <= 2  # the head is the background's level (noise around 0)
    assert torch.equal(blanked[0], blanked[1])  # two different heads on one background blank alike
    framed = blank_head(_notumor(0)[None])[0]
    assert framed[:, head_mask(_notumor(0)[None])[0]].unique().tolist() == [30]  # the grey background's level
    assert framed[0, 0, 20] == 200  # the frame line stays: it is what the probe is about


def test_restyle_moves_the_head_histogram_to_the_reference_and_sets_its_background() -> None:
    reference = torch.stack([_notumor(i) for i in range(4)])
    profile = intensity_profile(reference)
    tumours = torch.stack([_tumour(10 + i) for i in range(4)])
    masks = head_mask(tumours)
    restyled = restyle(tumours, profile, masks)

    def quantiles(images: Tensor, where: Tensor) -> Tensor:
        return torch.quantile(images[:, 0][where].float(), torch.tensor([0.25, 0.5, 0.75]))

    target, before, after = (quantiles(reference, head_mask(reference)), quantiles(tumours, masks),
                             quantiles(restyled, masks))
    assert (before - target).abs().min() > 25  # the tumour heads start far from the reference
    assert torch.allclose(after, target, atol=4)
    assert set(restyled[:, :, ~masks[0]].unique().tolist()) == {round(profile.background)}
    centre = ((_ROWS - 32) ** 2 + (_COLS - 32) ** 2).sqrt() <= 3
    assert restyled[:, 0][:, centre].float().mean() > restyled[:, 0][masks].float().mean()  # monotone: blob stays


def test_standardize_head_stretches_the_head_and_zeroes_the_background() -> None:
    scan = _notumor(0)
    dim = (scan.float() * 0.5 + 10).round().to(torch.uint8)  # the same head, darker and flatter
    out = standardize_head(torch.stack([scan, dim]))
    masks = head_mask(scan[None])
    assert out.dtype == torch.uint8 and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert int(out[0][:, ~masks[0]].max()) == 0  # background, frame line included
    assert int(out[0].max()) == 255 and int(out[0][:, masks[0]].float().quantile(0.01)) == 0
    assert (out[0].float() - out[1].float()).abs().mean() < 3  # brightness and contrast are gone


def test_crop_head_zooms_a_small_off_centre_head_to_fill_the_frame() -> None:
    small = _scan(head=(100, 120), background=0, centre=(16.0, 44.0), radius=10.0)  # 21 px across
    cropped = crop_head(standardize_head(small[None]))
    mask = head_mask(cropped, dilate=0)[0]
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    # The dilated mask (27 px) plus the margins (31 px) now spans the frame: the disc is 64 / 31 times larger.
    assert len(rows) >= 42 and len(cols) >= 42
    assert abs(float(rows.float().mean()) - 31.5) < 1.5 and abs(float(cols.float().mean()) - 31.5) < 1.5
    flat = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    assert torch.equal(crop_head(flat), flat)  # no head: nothing to crop


def test_the_blanked_head_probe_exposes_a_background_model_and_clears_a_head_model() -> None:
    split = _split(6, seed=0)
    background = blanked_head_probe(_BackgroundModel(), split)
    assert background.notumor_separation == 1.0 and background.accuracy == 1.0
    assert background.notumor_share == {"glioma": 0.0, "notumor": 1.0}
    blob = blanked_head_probe(_BlobModel(), split)
    assert blob.notumor_separation == 0.5  # every blanked scan looks the same to it
    assert blob.notumor_share == {"glioma": 1.0, "notumor": 1.0}
    assert set(blob.to_dict()) == {"images", "accuracy", "notumor_separation", "notumor_share_glioma",
                                   "notumor_share_notumor"}


def test_the_restyle_probe_flips_a_background_model_and_not_a_head_model() -> None:
    split, reference = _split(5, seed=0), _split(5, seed=100)
    background = restyle_probe(_BackgroundModel(), split, reference)
    assert background.tumour_accuracy_before == 1.0 and background.tumour_flipped_to_notumor == 1.0
    assert background.notumor_flipped_from_notumor == 1.0
    assert background.tumour_flipped_to_notumor_control == 0.0  # restyling alone (to its own profile) flips none
    blob = restyle_probe(_BlobModel(), split, reference)
    assert blob.tumour_accuracy_before == blob.tumour_accuracy_after == blob.tumour_accuracy_control == 1.0
    assert blob.tumour_flipped_to_notumor == 0.0 and blob.notumor_flipped_from_notumor == 0.0
    assert all(isinstance(v, int | float) for v in blob.to_dict().values())


def test_the_background_classifier_sees_a_background_difference_and_nothing_else() -> None:
    leaky = background_classifier_probe(_split(20, seed=0), _split(20, seed=500))
    assert leaky.test_auc == 1.0 and leaky.test_accuracy == 1.0 and leaky.majority_accuracy == 0.5
    assert leaky.features == 40 and leaky.train_images == leaky.test_images == 40

    def same_background(count: int, seed: int) -> ArraySplit:
        # Both kinds on one black background; only the head (ramp, blob) tells them apart.
        healthy = [_scan(head=(60, 140), background=0, seed=seed + i) for i in range(count)]
        tumour = [_tumour(seed + count + i) for i in range(count)]
        return ArraySplit(torch.stack(healthy + tumour), torch.tensor([NOTUMOR] * count + [GLIOMA] * count),
                          [str(i) for i in range(2 * count)])

    clean = background_classifier_probe(same_background(40, 0), same_background(40, 1000))
    assert abs(clean.test_auc - 0.5) < 0.2


def test_the_report_runs_both_model_probes_on_testing() -> None:
    dataset = Dataset(root=Path("toy"), train=_split(4, seed=100), test=_split(4, seed=0), skipped=[],
                      fingerprint="toy")
    report = shortcut_report(_BackgroundModel(), dataset)
    assert report["split"] == "Testing" and report["reference"] == "Training"
    assert report["blanked_head"]["notumor_separation"] == 1.0
    assert report["restyle"]["tumour_flipped_to_notumor"] == 1.0


def test_bad_inputs_raise_one_line_errors() -> None:
    with pytest.raises(ShortcutError, match="uint8 tensor"):
        head_mask(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ShortcutError, match="uint8 tensor"):
        head_mask(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ShortcutError, match="bool tensor of shape"):
        standardize_head(_notumor(0)[None], torch.ones(1, 8, 8, dtype=torch.bool))
    only_tumour = ArraySplit(_tumour(0)[None], torch.tensor([GLIOMA]), ["t.png"])
    with pytest.raises(ShortcutError, match="0 notumor and 1 tumour"):
        blanked_head_probe(_BlobModel(), only_tumour)
    with pytest.raises(ShortcutError, match="no head region|at least one"):
        intensity_profile(torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ShortcutError, match="dilate must be a whole number"):
        head_mask(_notumor(0)[None], dilate=-1)
    with pytest.raises(ShortcutError, match="margin must be a whole number"):
        crop_head(_notumor(0)[None], margin=1.5)  # type: ignore[arg-type]
    with pytest.raises(ShortcutError, match="c must be > 0"):
        background_classifier_probe(_split(2, 0), _split(2, 1), c=0.0)
