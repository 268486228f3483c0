"""The one training loop: distillation, federated clients and DP training all call ``fit``.

What varies between them is passed in, never copied: the loss (cross-entropy, KD,
proximal terms), how batches are drawn (shuffled minibatches or Poisson sampling for
DP-SGD), and an optional hook that wraps model and optimizer (Opacus).
Each completed epoch can be saved atomically (a kind "training" checkpoint, the one format)
so an interrupted run resumes from it. A non-finite loss or weight stops training at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.config import TrainSpec
from edgemri.core.data.dataset import UNKNOWN_LABEL, ArraySplit
from edgemri.core.data.images import normalize
from edgemri.core.errors import EdgemriError
from edgemri.core.progress import ProgressBar
from edgemri.core.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from edgemri.core.training.evaluate import predict_logits

Transform = Callable[[Tensor], Tensor]


def as_float(inputs: Tensor) -> Tensor:
    """Transform for inputs that are already features (e.g. cached float16 conv maps)."""
    return inputs.float()


@dataclass
class TrainData:
    """Tensors the loop draws batches from; ``extras`` ride along row by row."""

    inputs: Tensor
    labels: Tensor
    extras: tuple[Tensor, ...] = ()
    transform: Transform = normalize

    @classmethod
    def from_split(cls, split: ArraySplit, extras: tuple[Tensor, ...] = ()) -> TrainData:
        return cls(split.images, split.labels, extras)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor, generator: torch.Generator) -> Batch:
        """The rows ``index`` as the model trains on them (``generator``: the epoch's, for random views)."""
        return Batch(self.transform(self.inputs[index]), self.labels[index], tuple(e[index] for e in self.extras))


@dataclass
class Batch:
    inputs: Tensor
    labels: Tensor  # UNKNOWN_LABEL for an image only the teacher scored (a transfer-set image)
    extras: tuple[Tensor, ...]



BatchSampler = Callable[[int, int, torch.Generator], Iterator[Tensor]]
# A hook that takes over model, optimizer and batch sampling (Opacus's DP-SGD):
# (model, optimizer, n, batch_size) -> (model, optimizer, batches).
Wrap = Callable[[nn.Module, torch.optim.Optimizer, int, int], tuple[nn.Module, torch.optim.Optimizer, BatchSampler]]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """A fresh permutation each epoch, cut into batches (the last may be smaller)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, Tensor]
    selected_on: str
    images_seen: int = 0
    train_seconds: float = 0.0
    optimizer_steps: int = 0  # noisy steps under DP-SGD: what the privacy ledger counts

    def history_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.history]


class ResumeMismatchError(EdgemriError):
    """The saved training state was made with other settings than this run's."""


class TrainingDivergedError(EdgemriError):
    """The loss or the weights became NaN or Inf: training stopped before anything non-finite was saved."""


@dataclass(frozen=True)
class Checkpointing:
    """Save every completed epoch to ``path`` (kind "training"); ``resume`` continues from it.

    ``model`` and ``model_options`` name the registered model the file holds. ``module`` is that
    model when the trained module is only a part of it (the frozen ImageNet teacher trains its
    head alone, on cached features); by default the trained module is the registered model.
    """

    path: Path
    model: str = "student"
    model_options: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None
    resume: bool = False


@dataclass
class _Progress:
    """What the loop carries from epoch to epoch: all of it is saved and restored on resume."""

    history: list[EpochRecord] = field(default_factory=list)
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch: int = 0
    best_state: dict[str, Tensor] = field(default_factory=dict)
    images_seen: int = 0
    optimizer_steps: int = 0

    @property
    def epoch(self) -> int:
        return len(self.history)


def _evaluate(model: nn.Module, data: TrainData) -> tuple[float, float]:
    logits = predict_logits(model, data.inputs, data.transform)
    loss = F.cross_entropy(logits, data.labels).item()
    accuracy = (logits.argmax(1) == data.labels).float().mean().item()
    return loss, accuracy


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _selection_key(record: EpochRecord, select: str) -> tuple[float, float]:
    """Best validation accuracy, ties to the lower loss; or simply the latest epoch."""
    return (record.val_accuracy, -record.val_loss) if select == "val" else (record.epoch, 0.0)


def _save_state(saving: Checkpointing, saved: nn.Module, optimizer: torch.optim.Optimizer,
                progress: _Progress, signature: dict[str, Any], select: str) -> None:
    best = progress.history[progress.best_epoch - 1] if progress.best_epoch else None
    save_checkpoint(saving.path, Checkpoint(
        model=saving.model, state_dict=_state_copy(saved), kind="training", model_options=dict(saving.model_options),
        config=signature, seed=signature["seed"], optimizer=optimizer.state_dict(), step=progress.epoch,
        best_metric=best.val_accuracy if best is not None and select == "val" else None,
        history=[asdict(r) for r in progress.history],
        extra={"best_epoch": progress.best_epoch, "best_state": progress.best_state,
               "images_seen": progress.images_seen, "optimizer_steps": progress.optimizer_steps},
    ))


def check_same_settings(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Resume only what this run would make: a ResumeMismatchError names the first settings that differ."""
    differences = _differences(saved, current)
    if differences:
        raise ResumeMismatchError(f"{path} was saved with other settings ({'; '.join(differences[:3])}); "
                                  f"start without --resume (or in a new --out) or use the run's own settings")


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: A saved, B now' for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} saved, {new!r} now")
    return out


def _resume(saving: Checkpointing, saved: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
            signature: dict[str, Any], select: str) -> _Progress:
    """The progress of an earlier run with the same settings, loaded into ``saved`` and ``optimizer``."""
    path = saving.path
    state = load_checkpoint(path, kind="training")
    current = {"model": saving.model, "model_options": dict(saving.model_options), **signature}
    check_same_settings(path, {"model": state.model, "model_options": state.model_options, **state.config}, current)
    extra = state.extra
    try:
        history = [EpochRecord(**record) for record in state.history]
        best_epoch, images_seen, steps = (int(extra[k]) for k in ("best_epoch", "images_seen", "optimizer_steps"))
        best_state = check_state_dict(model, extra["best_state"], f"{path} (best_state)")
        if len(history) != state.step or not 0 <= best_epoch <= state.step:
            raise ValueError(f"step {state.step}, {len(history)} epochs of history, best epoch {best_epoch}")
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed training state ({err.__class__.__name__}: {err})") from None
    saved.load_state_dict(state.state_dict)
    _load_optimizer(optimizer, state.optimizer, path)
    best_key = _selection_key(history[best_epoch - 1], select) if best_epoch else _Progress.best_key
    return _Progress(history, best_key, best_epoch, best_state, images_seen, steps)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None, path: Path) -> None:
    """Load the optimizer's saved state; its tensors must fit the parameters (else a late RuntimeError)."""
    try:
        if state is None:
            raise ValueError("no optimizer state")
        optimizer.load_state_dict(state)
    except (TypeError, KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model ({err})") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(f"{path}: optimizer state {name!r} has shape {tuple(value.shape)} "
                                          f"for a parameter of shape {tuple(param.shape)}")


def _check_weights(model: nn.Module, desc: str, epoch: int) -> None:
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainingDivergedError(f"{desc}: the weights became non-finite ({name!r}) in epoch {epoch}; "
                                        f"lower the learning rate and start again (nothing of this epoch was saved)")


def make_optimizer(spec: TrainSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (``config.OPTIMIZERS``)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


class _EpochTotals(NamedTuple):
    loss: float  # summed over the labelled and unlabelled rows seen
    correct: int
    seen: int
    labelled: int
    steps: int  # optimizer steps, an empty (Poisson) batch included


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainData,
                 loss: Callable[[Tensor, Batch], Tensor], spec: TrainSpec, steps: Iterator[Tensor],
                 generator: torch.Generator, desc: str, epoch: int, total_batches: int,
                 bar: ProgressBar) -> _EpochTotals:
    """One epoch over ``steps`` (the batch indices), moving the stage's ``bar`` on by each batch."""
    total_loss, correct, seen, labelled, optimizer_steps = 0.0, 0, 0, 0, 0
    done_before = (epoch - 1) * total_batches
    for number, index in enumerate(steps, start=1):
        batch = train.batch(index, generator)
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch.inputs.contiguous(memory_format=torch.channels_last) if spec.channels_last
                       else batch.inputs)
        # Poisson sampling (DP-SGD) can draw an empty batch: a zero loss still lets
        # Opacus take its noisy step, which the accounting counts.
        batch_loss = loss(logits, batch) if len(index) else logits.sum() * 0.0
        value = batch_loss.item()
        if not math.isfinite(value):  # checked before the step: the weights stay as they were
            raise TrainingDivergedError(
                f"{desc}: the loss became {value} in epoch {epoch}, batch {number} of {total_batches}; "
                f"lower the learning rate (or kd.temperature) or check the data for NaN values")
        batch_loss.backward()
        optimizer.step()
        optimizer_steps += 1
        if len(index):
            total_loss += value * len(index)
            correct += int((logits.argmax(1) == batch.labels).sum())  # never true for UNKNOWN_LABEL rows
            seen += len(index)
            labelled += int((batch.labels != UNKNOWN_LABEL).sum())
            bar.set_postfix(loss=total_loss / seen, acc=correct / max(labelled, 1))
        # Poisson sampling (DP-SGD) draws a varying number of batches: the bar stays within the epoch's share.
        bar.advance_to(done_before + min(number, total_batches))
    return _EpochTotals(total_loss, correct, seen, labelled, optimizer_steps)


def fit(
    model: nn.Module,
    train: TrainData,
    *,
    loss: Callable[[Tensor, Batch], Tensor],
    spec: TrainSpec,
    seed: int,
    val: TrainData | None = None,
    select: Literal["val", "last"] = "val",
    selected_on: str = "validation",
    batches: BatchSampler = shuffled_batches,
    wrap: Wrap | None = None,
    checkpointing: Checkpointing | None = None,
    progress: bool = False,
    desc: str = "train",
    keep_start: bool = False,
) -> FitResult:
    """Train ``model`` in place for ``spec.epochs`` with ``spec.optimizer``; return the selected state.

    select="val" keeps the epoch with the best accuracy on ``val`` (ties: lower loss);
    select="last" keeps the final epoch (federated local steps). ``selected_on`` names
    the split ``val`` really is, so reports can say so. ``keep_start`` makes the model as it came in a
    candidate of the selection (best epoch 0: nothing kept). With ``checkpointing``, every
    completed epoch is saved and an interrupted run can continue from the last one.
    A NaN or Inf loss or weight raises TrainingDivergedError naming the epoch and batch. With ``progress``, one
    bar for the whole run (``core.progress``): epoch x/N, the train loss and accuracy, the last validation's.
    """
    if select == "val" and val is None:
        raise ValueError("select='val' needs validation data")
    if keep_start and checkpointing is not None:
        raise ValueError("keep_start is for short in-memory runs; a resumed run would not know the start's score")
    optimizer = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    trained_model = model
    if wrap is not None:
        trained_model, optimizer, batches = wrap(model, optimizer, len(train), spec.batch_size)

    saved = model if checkpointing is None or checkpointing.module is None else checkpointing.module
    signature = {"spec": asdict(spec), "seed": seed, "n": len(train), "select": select}
    state = _Progress(best_state=_state_copy(model))
    if keep_start and val is not None and select == "val":
        # The unchanged model is a candidate too: fine-tuning that only hurts on validation is not kept.
        val_loss, val_accuracy = _evaluate(model, val)
        state.best_key = (val_accuracy, -val_loss)
    if checkpointing is not None and checkpointing.resume and checkpointing.path.is_file():
        state = _resume(checkpointing, saved, model, optimizer, signature, select)

    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    total_batches = math.ceil(len(train) / spec.batch_size)
    with ProgressBar(f"{desc} epoch {min(state.epoch + 1, spec.epochs)}/{spec.epochs}", spec.epochs * total_batches,
                     enabled=progress, unit="batches", initial=state.epoch * total_batches) as bar:
        for epoch in range(state.epoch + 1, spec.epochs + 1):
            epoch_start = time.perf_counter()
            trained_model.train()
            if spec.schedule == "cosine":  # set per epoch from the epoch number alone, so a resumed run agrees
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / spec.epochs))
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            bar.set_description(f"{desc} epoch {epoch}/{spec.epochs}")
            totals = _train_epoch(trained_model, optimizer, train, loss, spec, batches(len(train), spec.batch_size,
                                  generator), generator, desc, epoch, total_batches, bar)
            total_loss, correct, seen, labelled, steps_taken = totals
            state.optimizer_steps += steps_taken
            _check_weights(model, desc, epoch)
            state.images_seen += seen
            val_loss = val_accuracy = None
            if val is not None:
                val_loss, val_accuracy = _evaluate(model, val)
            record = EpochRecord(epoch=epoch, train_loss=total_loss / max(seen, 1),
                                 train_accuracy=correct / max(labelled, 1), val_loss=val_loss,
                                 val_accuracy=val_accuracy, seconds=time.perf_counter() - epoch_start)
            state.history.append(record)
            key = _selection_key(record, select)
            if key > state.best_key:
                state.best_key, state.best_epoch, state.best_state = key, epoch, _state_copy(model)
            if val_loss is not None and val_accuracy is not None:
                bar.set_postfix(val_loss=val_loss, val_acc=val_accuracy)
            bar.advance_to(epoch * total_batches)
            if checkpointing is not None:
                _save_state(checkpointing, saved, optimizer, state, signature, select)
    model.load_state_dict(state.best_state)
    if spec.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return FitResult(
        history=state.history,
        best_epoch=state.best_epoch,
        best_state=state.best_state,
        selected_on=selected_on if select == "val" else "last epoch",
        images_seen=state.images_seen,
        train_seconds=time.perf_counter() - started,
        optimizer_steps=state.optimizer_steps,
    )
