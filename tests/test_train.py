from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from edgemri.core.config import TrainSpec
from edgemri.core.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from edgemri.core.training.losses import cross_entropy, kd_loss, make_kd_loss
from edgemri.core.training.train import (
    Checkpointing,
    ResumeMismatchError,
    TrainData,
    TrainingDivergedError,
    fit,
    shuffled_batches,
)
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
            checkpointing=Checkpointing(state))
    saved = load_checkpoint(state, kind="training")  # the one checkpoint format, kind "training"
    assert saved.step == 2 and len(saved.history) == 2 and saved.optimizer is not None

    torch.manual_seed(99)  # a different init: everything must come from the saved state
    resumed = Student()
    result = fit(resumed, train, loss=cross_entropy, spec=spec, seed=5, val=val,
                 checkpointing=Checkpointing(state, resume=True))
    assert [r.epoch for r in result.history] == [1, 2, 3]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    data = _separable_data(16, 0)
    fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data,
        checkpointing=Checkpointing(state))
    with pytest.raises(ResumeMismatchError, match=r"spec\.epochs: 1 saved, 2 now.*start without --resume") as err:
        fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=2), seed=0, val=data,
            checkpointing=Checkpointing(state, resume=True))
    assert "\n" not in str(err.value)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_resume_state_is_never_executed(tmp_path: Path) -> None:
    marker, state = tmp_path / "executed", tmp_path / "student.state.pt"
    torch.save({"signature": {}, "epoch": 1, "model": _Payload(marker)}, state)  # the old format's layout
    data = _separable_data(16, 0)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data,
            checkpointing=Checkpointing(state, resume=True))
    assert not marker.exists()


def test_a_model_checkpoint_is_not_a_resume_state(tmp_path: Path) -> None:
    from edgemri.core.training.checkpoint import Checkpoint

    state = save_checkpoint(tmp_path / "s.pt", Checkpoint(model="student", state_dict=Student().state_dict()))
    data = _separable_data(16, 0)
    with pytest.raises(CheckpointError, match="is a model checkpoint, not a training state"):
        fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data,
            checkpointing=Checkpointing(state, resume=True))


def test_a_resume_state_whose_optimizer_does_not_fit_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    data = _separable_data(16, 0)
    fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data,
        checkpointing=Checkpointing(state))
    saved = load_checkpoint(state, kind="training")
    saved.optimizer["state"][0]["exp_avg"] = torch.zeros(7)  # would fail deep inside Adam's next step
    save_checkpoint(state, saved)
    with pytest.raises(CheckpointError, match="optimizer state 'exp_avg' has shape"):
        fit(Student(), data, loss=cross_entropy, spec=TrainSpec(epochs=1), seed=0, val=data,
            checkpointing=Checkpointing(state, resume=True))


def test_an_infinite_kd_temperature_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    data = _separable_data(32, 0)
    data.extras = (torch.randn(32, 4),)  # cached teacher logits
    state = tmp_path / "kd.state.pt"
    with pytest.raises(TrainingDivergedError, match=r"the loss became nan in epoch 1, batch 1 of 2"):
        fit(Student(), data, loss=make_kd_loss(math.inf, 0.5), spec=TrainSpec(epochs=2, batch_size=16), seed=0,
            val=data, checkpointing=Checkpointing(state))
    assert not state.exists()  # nothing of a diverged run is saved


def test_a_loss_turning_nan_later_keeps_the_last_finite_epoch(tmp_path: Path) -> None:
    data, calls = _separable_data(32, 0), {"n": 0}

    def nan_in_epoch_two(logits: torch.Tensor, batch) -> torch.Tensor:
        calls["n"] += 1
        return cross_entropy(logits, batch) * (math.nan if calls["n"] == 4 else 1.0)

    state = tmp_path / "s.pt"
    with pytest.raises(TrainingDivergedError, match="epoch 2, batch 2 of 2"):
        fit(Student(), data, loss=nan_in_epoch_two, spec=TrainSpec(epochs=3, batch_size=16), seed=0, val=data,
            checkpointing=Checkpointing(state))
    assert load_checkpoint(state, kind="training").step == 1  # finite, loadable, resumable


def test_weights_turning_nan_under_a_finite_loss_stop_training(tmp_path: Path) -> None:
    data, model, state = _separable_data(16, 0), Student(), tmp_path / "s.pt"
    model.classifier[1].bias.register_hook(lambda grad: grad * math.nan)  # a finite loss, a NaN gradient
    with pytest.raises(TrainingDivergedError, match="weights became non-finite .*classifier.1.bias.* in epoch 1"):
        fit(model, data, loss=cross_entropy, spec=TrainSpec(epochs=1, batch_size=16), seed=0, val=data,
            checkpointing=Checkpointing(state))
    assert not state.exists()
