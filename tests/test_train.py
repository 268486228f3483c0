from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgemri.core.config import TrainSpec
from edgemri.core.losses import cross_entropy, kd_loss
from edgemri.core.train import ResumeMismatchError, TrainData, fit, shuffled_batches
from edgemri.models import Student


def test_kd_loss_matches_a_hand_computed_value() -> None:
    student = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    # By hand: q_s = softmax(1,0,0,0) = (e, 1, 1, 1) / (e + 3); p_t uniform 1/4.
    e = math.e
    q_s = [e / (e + 3)] + [1 / (e + 3)] * 3
    kl = sum(0.25 * math.log(0.25 / q) for q in q_s)
    ce = -math.log(q_s[0])
    expected = 0.5 * 1.0 * kl + 0.5 * ce
    got = kd_loss(student, teacher, labels, temperature=1.0, alpha=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # T = 2: soft term uses logits / 2 and is scaled by T^2 = 4.
    q2 = torch.softmax(student / 2, dim=1)[0].tolist()
    kl2 = sum(0.25 * math.log(0.25 / q) for q in q2)
    got2 = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    assert got2.item() == pytest.approx(0.3 * 4 * kl2 + 0.7 * ce, rel=1e-6)


def test_paper_code_kl_mean_is_a_quarter_of_batchmean_for_four_classes() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    soft_batchmean = kd_loss(s, t, y, temperature=1.0, alpha=1.0, reduction="batchmean")
    soft_mean = kd_loss(s, t, y, temperature=1.0, alpha=1.0, reduction="mean")
    assert soft_mean.item() == pytest.approx(soft_batchmean.item() / 4, rel=1e-6)


def _separable_data(n: int, seed: int) -> TrainData:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 3, 128, 128), generator=generator, dtype=torch.uint8)
    for label in range(4):  # a bright quadrant per class
        rows, cols = divmod(label, 2)
        images[labels == label, :, rows * 64:(rows + 1) * 64, cols * 64:(cols + 1) * 64] += 150
    return TrainData(images, labels)


def test_fit_learns_and_selects_the_best_validation_epoch() -> None:
    torch.manual_seed(0)
    model = Student()
    train, val = _separable_data(64, 0), _separable_data(32, 1)
    result = fit(model, train, loss=cross_entropy, spec=TrainSpec(epochs=4, batch_size=16), seed=0, val=val)
    accuracies = [r.val_accuracy for r in result.history]
    assert max(accuracies) > 0.9
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))
    assert result.selected_on == "validation"
    # The model ends holding the selected epoch's weights.
    with torch.no_grad():
        final = (model(val.transform(val.inputs)).argmax(1) == val.labels).float().mean().item()
    assert final == pytest.approx(max(accuracies))


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_result(tmp_path: Path) -> None:
    spec = TrainSpec(epochs=3, batch_size=16)
    train, val = _separable_data(48, 0), _separable_data(16, 1)

    torch.manual_seed(0)
    reference = Student()
    fit(reference, train, loss=cross_entropy, spec=spec, seed=5, val=val)

    calls = {"n": 0}

    def crashing_batches(n: int, batch_size: int, generator: torch.Generator):
        calls["n"] += 1
        if calls["n"] == 3:  # die at the start of epoch 3
            raise _Interrupt
        return shuffled_batches(n, batch_size, generator)

    state = tmp_path / "student.state.pt"
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        fit(Student(), train, loss=cross_entropy, spec=spec, seed=5, val=val, batches=crashing_batches,
            state_path=state)
    assert torch.load(state, weights_only=False)["epoch"] == 2

    torch.manual_seed(99)  # a different init: everything must come from the saved state
    resumed = Student()
    result = fit(resumed, train, loss=cross_entropy, spec=spec, seed=5, val=val, state_path=state, resume=True)
    assert [r.epoch for r in result.history] == [1, 2, 3]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    data = _separable_data(16, 0)
    fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data, state_path=state)
    with pytest.raises(ResumeMismatchError, match="start without --resume"):
        fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=2), seed=0, val=data, state_path=state,
            resume=True)
