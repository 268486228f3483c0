"""The one training loop: distillation, federated clients and DP training all call ``fit``.

What varies between them is passed in, never copied: the loss (cross-entropy, KD,
proximal terms), how batches are drawn (shuffled minibatches or Poisson sampling for
DP-SGD), and an optional hook that wraps model and optimizer (Opacus).
Each completed epoch can be saved atomically so an interrupted run resumes from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.config import TrainSpec
from edgemri.core.data import ArraySplit, normalize
from edgemri.core.errors import EdgemriError
from edgemri.core.evaluate import predict_logits
from edgemri.core.io import save_torch

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


@dataclass
class Batch:
    inputs: Tensor
    labels: Tensor
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


def _evaluate(model: nn.Module, data: TrainData) -> tuple[float, float]:
    logits = predict_logits(model, data.inputs, data.transform)
    loss = F.cross_entropy(logits, data.labels).item()
    accuracy = (logits.argmax(1) == data.labels).float().mean().item()
    return loss, accuracy


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    state_path: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` in place for ``spec.epochs`` with Adam; return the selected state.

    select="val" keeps the epoch with the best accuracy on ``val`` (ties: lower loss);
    select="last" keeps the final epoch (federated local steps). ``selected_on`` names
    the split ``val`` really is, so reports can say so. With ``state_path``, every
    completed epoch is saved; ``resume=True`` continues from the last one saved.
    """
    from tqdm import tqdm

    if select == "val" and val is None:
        raise ValueError("select='val' needs validation data")
    optimizer: torch.optim.Optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=spec.weight_decay
    )
    trained_model = model
    if wrap is not None:
        trained_model, optimizer, batches = wrap(model, optimizer, len(train), spec.batch_size)

    history: list[EpochRecord] = []
    best_key = (-math.inf, -math.inf)
    best_epoch = 0
    best_state = _state_copy(model)
    start_epoch = 1
    images_seen = 0
    optimizer_steps = 0
    signature = {"spec": asdict(spec), "seed": seed, "n": len(train), "select": select}
    if resume and state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved["signature"] != signature:
            raise ResumeMismatchError(
                f"{state_path} was saved with {saved['signature']}, this run has {signature}; "
                f"start without --resume or use the run's own settings"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = [EpochRecord(**r) for r in saved["history"]]
        best_key, best_epoch, best_state = tuple(saved["best_key"]), saved["best_epoch"], saved["best_state"]
        images_seen = saved["images_seen"]
        start_epoch = saved["epoch"] + 1

    started = time.perf_counter()
    for epoch in range(start_epoch, spec.epochs + 1):
        epoch_start = time.perf_counter()
        trained_model.train()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        total_loss, correct, seen = 0.0, 0, 0
        steps = tqdm(
            batches(len(train), spec.batch_size, generator),
            total=math.ceil(len(train) / spec.batch_size),
            desc=f"{desc} {epoch}/{spec.epochs}",
            disable=not progress,
            leave=False,
        )
        for index in steps:
            batch = Batch(
                inputs=train.transform(train.inputs[index]),
                labels=train.labels[index],
                extras=tuple(e[index] for e in train.extras),
            )
            optimizer.zero_grad(set_to_none=True)
            logits = trained_model(batch.inputs)
            # Poisson sampling (DP-SGD) can draw an empty batch: a zero loss still lets
            # Opacus take its noisy step, which the accounting counts.
            batch_loss = loss(logits, batch) if len(index) else logits.sum() * 0.0
            batch_loss.backward()
            optimizer.step()
            optimizer_steps += 1
            if len(index):
                total_loss += batch_loss.item() * len(index)
                correct += int((logits.argmax(1) == batch.labels).sum())
                seen += len(index)
                steps.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        images_seen += seen
        val_loss = val_accuracy = None
        if val is not None:
            val_loss, val_accuracy = _evaluate(model, val)
        record = EpochRecord(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            seconds=time.perf_counter() - epoch_start,
        )
        history.append(record)
        key = (val_accuracy, -val_loss) if select == "val" else (epoch, 0.0)
        if key > best_key:
            best_key, best_epoch, best_state = key, epoch, _state_copy(model)
        if progress:
            shown = f" val_acc={val_accuracy:.3f}" if val_accuracy is not None else ""
            tqdm.write(f"{desc} epoch {epoch}/{spec.epochs} loss={record.train_loss:.3f} "
                       f"acc={record.train_accuracy:.3f}{shown}")
        if state_path is not None:
            save_torch(state_path, {
                "signature": signature, "epoch": epoch, "model": _state_copy(model),
                "optimizer": optimizer.state_dict(), "history": [asdict(r) for r in history],
                "best_key": list(best_key), "best_epoch": best_epoch, "best_state": best_state,
                "images_seen": images_seen,
            })
    model.load_state_dict(best_state)
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_state=best_state,
        selected_on=selected_on if select == "val" else "last epoch",
        images_seen=images_seen,
        train_seconds=time.perf_counter() - started,
        optimizer_steps=optimizer_steps,
    )
