"""The improved KD recipe's parts: cached augmented views, the transfer-set loss, calibration, selective prediction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgemri.core.config import AugmentConfig, ConfigError, DistillConfig, KDConfig, TrainSpec
from edgemri.core.data.dataset import UNKNOWN_LABEL, load_dataset
from edgemri.core.data.images import normalize
from edgemri.core.registries import parse_config
from edgemri.core.training.augment import ViewData, apply_views, draw_views, view_logits
from edgemri.core.training.distill import ForwardCounter, run_distillation
from edgemri.core.training.evaluate import coverage_curve, fit_temperature, refer_threshold, selective_accuracy
from edgemri.core.training.losses import kd_loss
from edgemri.core.training.train import TrainData


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_views_are_reproducible_view_zero_is_the_image_and_others_differ() -> None:
    images = _images()
    params = draw_views(len(images), 4, AugmentConfig(), seed=3)
    assert torch.equal(params, draw_views(len(images), 4, AugmentConfig(), seed=3))
    assert not torch.equal(params, draw_views(len(images), 4, AugmentConfig(), seed=4))
    assert torch.equal(apply_views(images, params[:, 0]), images.float())
    views = apply_views(images, params[:, 1])
    assert views.shape == images.shape and views.dtype == torch.float32
    assert float(views.min()) >= 0 and float(views.max()) <= 255
    assert not torch.allclose(views, images.float())
    # Rebuilding a view gives the same pixels (what the student trains on is what the teacher scored).
    assert torch.equal(views, apply_views(images, params[:, 1]))


def test_flip_only_view_mirrors_the_image() -> None:
    images = _images(2)
    still = AugmentConfig(rotate_deg=0, scale=0, translate=0, contrast=0, gamma=0)
    params = draw_views(2, 64, still, seed=0)
    flipped = params[0, (params[0, :, 0] < 0).nonzero()[0, 0]]
    mirrored = apply_views(images[:1], flipped[None])
    assert torch.allclose(mirrored, images[:1].float().flip(-1), atol=1e-3)


def test_teacher_scores_each_view_once_and_batches_carry_that_views_logits() -> None:
    images = _images(10)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    params = draw_views(len(images), 3, AugmentConfig(), seed=0)
    known = teacher(normalize(images[:4]))  # view 0 of the first 4 images was scored already
    counter = ForwardCounter(teacher)
    logits = view_logits(teacher, images, params, normalize, known=known)
    assert counter.close() == 10 * 3 - 4
    assert logits.shape == (10, 3, 4)
    data = ViewData(images, torch.arange(10) % 4, extras=(logits,), view_params=params)
    batch = data.batch(torch.arange(10), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(teacher(batch.inputs), batch.extras[0], atol=1e-5)
    # Without views the plain rows are returned as they are.
    plain = TrainData(images, torch.zeros(10, dtype=torch.long), extras=(logits[:, 0],))
    assert torch.equal(plain.batch(torch.arange(3), torch.Generator()).extras[0], logits[:3, 0])


def test_kd_loss_uses_only_soft_labels_for_unlabeled_images_and_matches_eq1_otherwise() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    t, alpha = 2.0, 0.3
    soft = torch.nn.functional.kl_div(torch.log_softmax(student / t, 1), torch.softmax(teacher / t, 1),
                                      reduction="batchmean")
    hard = torch.nn.functional.cross_entropy(student, labels)
    expected = alpha * t * t * soft + (1 - alpha) * hard
    assert torch.allclose(kd_loss(student, teacher, labels, temperature=t, alpha=alpha), expected, atol=1e-6)
    unlabeled = torch.full((6,), UNKNOWN_LABEL)
    assert torch.allclose(kd_loss(student, teacher, unlabeled, temperature=t, alpha=alpha), t * t * soft, atol=1e-6)


def test_temperature_scaling_recovers_the_overconfidence_factor_and_keeps_predictions() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = 1.5 * torch.randn(4000, 4, generator=generator)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert torch.equal((overconfident / temperature).argmax(1), overconfident.argmax(1))
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_refer_threshold_and_selective_accuracy_on_a_hand_built_example() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 0])  # the 0.6 one is wrong
    threshold = refer_threshold(probs, 0.5)
    assert threshold == pytest.approx(0.8)
    assert selective_accuracy(probs, labels, threshold) == (0.5, 1.0)
    coverage, accuracy = selective_accuracy(probs, labels, 0.0)
    assert coverage == 1.0 and accuracy == 0.75
    assert selective_accuracy(probs, labels, 0.95)[0] == 0.0
    curve = coverage_curve(probs, labels, points=4)
    assert [round(p["accuracy"], 3) for p in curve] == [1.0, 1.0, 0.667, 0.75]


def test_config_bounds_and_ablations_differ_from_the_recipe_in_one_ingredient() -> None:
    with pytest.raises(ConfigError, match="views"):
        parse_config({"distill": {"kd": {"views": 65}}})
    with pytest.raises(ConfigError, match="transfer_root"):
        parse_config({"distill": {"kd": {"transfer_root": "../elsewhere"}}})
    with pytest.raises(ConfigError, match="compare"):
        parse_config({"distill": {"compare": "all"}})
    with pytest.raises(ConfigError, match="schedule"):
        parse_config({"distill": {"kd": {"train": {"schedule": "step"}}}})
    improved = KDConfig(temperature=4.0, alpha=0.9, views=4, transfer_root="Unlabeled",
                        train=TrainSpec(epochs=30, schedule="cosine"))
    recipes = DistillConfig(kd=improved, compare="ablation").kd_recipes()
    assert list(recipes) == ["kd", "paper-kd", "kd-without-views", "kd-without-transfer",
                             "kd-without-temperature-alpha", "kd-without-schedule"]
    assert recipes["kd-without-views"].views == 0 and recipes["kd-without-views"].transfer_root == "Unlabeled"
    assert recipes["kd-without-schedule"].train.epochs == 15 and recipes["kd-without-schedule"].views == 4
    assert list(DistillConfig(kd=improved).kd_recipes()) == ["kd"]


def test_distillation_with_views_transfer_and_ablation_reports_every_student(tiny_data: Path, tmp_path: Path) -> None:
    """One small run of the whole recipe: view-consistent teaching on train + transfer images, calibration."""
    transfer = tmp_path / "transfer"
    transfer.mkdir()
    dataset = load_dataset(tiny_data)
    from PIL import Image

    for k, image in enumerate(dataset.test.images[:12]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(transfer / f"u{k}.png")
    config = parse_config({
        "seed": 0, "data": {"val_fraction": 0.2},
        "distill": {
            "teacher": {"name": "vgg16-slim", "width": 0.0625, "train": {"epochs": 1, "batch_size": 32}},
            "baseline": {"epochs": 1, "batch_size": 16},
            "kd": {"temperature": 2.0, "alpha": 0.5, "views": 3, "transfer_root": str(transfer),
                   "train": {"epochs": 2, "batch_size": 16, "schedule": "cosine"}},
            "paper_kd": {"train": {"epochs": 1, "batch_size": 16}},
            "compare": "ablation",
        },
    })
    results, _ = run_distillation(config, dataset, tmp_path / "run")
    result = results[0]
    n = result.train_images
    assert list(result.stages) == ["teacher", "baseline", "kd", "paper-kd", "kd-without-views",
                                   "kd-without-transfer", "kd-without-temperature-alpha", "kd-without-schedule"]
    kd = result.stages["kd"]
    assert kd.transfer_images == 12 and kd.teacher_passes == (n + 12) * 3
    assert result.stages["kd-without-views"].teacher_passes == n + 12
    assert result.stages["paper-kd"].teacher_passes == n and result.stages["paper-kd"].transfer_images == 0
    # Shared views are scored once per seed: (n + 12) x 3, then view 0 of the transfer images (without views)
    # and n x 3 train views (without transfer) reuse nothing, so they cost their own passes, minus known logits.
    assert result.teacher_forward_images == n + ((n + 12) * 3 - n) + 12 + (n * 3 - n)
    assert kd.test["temperature"] > 0 and 0 <= kd.test["ece"] <= 1
    assert len(kd.test["correct"]) == len(dataset.test)
    assert math.isclose(kd.test["accuracy"], sum(kd.test["correct"]) / len(dataset.test))
    from edgemri.core.training.checkpoint import load_checkpoint

    saved = load_checkpoint(kd.checkpoint)
    assert saved.temperature == pytest.approx(kd.test["temperature"])
    assert saved.metrics["calibration"]["refer_below"]["coverage"] == 0.9
    from edgemri.reports.distill import build_report, write_report

    report = build_report(config, dataset, results, 1.0, tmp_path / "run")
    paths = write_report(report, tmp_path / "run")
    markdown = paths["md"].read_text()
    assert "KD without views" in markdown and "ECE before → after calibration" in markdown
    assert paths["reliability"].stat().st_size > 0 and paths["coverage"].stat().st_size > 0
    saved_report = json.loads(paths["json"].read_text())
    assert set(saved_report["comparisons"]) == set(result.stages) - {"teacher", "baseline"}
    assert "kd_minus_this" in saved_report["comparisons"]["kd-without-transfer"]

    # A resumed run reuses every finished stage and the teacher's view logits saved on disk: no view is scored
    # again (only the teacher's own pass over the train images, which resuming repeats).
    again, _ = run_distillation(config, dataset, tmp_path / "run", resume=True)
    assert again[0].teacher_forward_images == n
    assert again[0].stages["kd"].test["accuracy"] == kd.test["accuracy"]
    assert again[0].stages["kd"].history == kd.history


def test_a_missing_transfer_folder_names_the_setting(tiny_data: Path, tmp_path: Path) -> None:
    from edgemri.core.data.images import DataError
    from edgemri.core.training.distill import Distiller

    config = parse_config({"distill": {"kd": {"transfer_root": "Unlabeled", "views": 2}}})
    distiller = Distiller(config, load_dataset(tiny_data), 0, tmp_path, resume=False, progress=False)
    with pytest.raises(DataError, match=r"distill.kd.transfer_root 'Unlabeled'.*set it to null") as err:
        distiller.transfer_set(config.distill.kd)
    assert "\n" not in str(err.value)


def test_ece_noise_floor_shrinks_with_more_images() -> None:
    from edgemri.core.training.evaluate import ece_noise_floor

    one = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    small, large = ece_noise_floor(one.repeat(100, 1)), ece_noise_floor(one.repeat(2000, 1))
    # One confidence bin: the floor is E|0.7 - accuracy of n Bernoulli(0.7) draws| ~ sqrt(0.21 / n) * 0.8.
    assert small == pytest.approx(0.8 * math.sqrt(0.21 / 100), rel=0.25)
    assert large == pytest.approx(0.8 * math.sqrt(0.21 / 2000), rel=0.25)
