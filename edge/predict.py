"""Predict image files with a model from ``edge.runtime.load_model``.

Images go through the training preprocessing itself (``load_image_uint8`` + ``normalize``
from edgemri.core.data, with the model's own mean and std: ``LoadedModel.normalize``), in
batches. A file that cannot be used gets its own error and the others are still predicted.
Images with a side under 16 px are such errors, by the same rule as in training: the model
never saw one, and a 12 px thumbnail upscaled to 128 px would get a confident-looking guess,
not a diagnosis. File names are reported printable (bytes that are not UTF-8 as ``\\xNN``),
so no name can stop the run.

Probabilities are calibrated: softmax(logits / T) with the model's calibration temperature
(``LoadedModel.temperature``, 1.0 for models without one). Selective prediction: with
``refer_below=P`` every prediction whose top probability is below P is marked ``refer``
(send the scan to a doctor); without it no prediction carries a ``refer`` mark.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgemri.core.data.dataset import IMAGE_EXTENSIONS
from edgemri.core.data.images import BadImageError, load_image_uint8
from edgemri.core.errors import printable
from edgemri.edge.errors import EdgeError
from edgemri.edge.runtime import LoadedModel


@dataclass
class Prediction:
    """One file's result: a class with its probability and the top k, or an error."""

    file: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    refer: bool | None = None  # predicted with a referral threshold: is the top probability below it; else None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        if not self.ok:
            return {"file": self.file, "error": self.error}
        result = {"file": self.file, "class": self.label, "probability": self.probability,
                  "top_k": [{"class": name, "probability": p} for name, p in self.top_k]}
        return result if self.refer is None else {**result, "refer": self.refer}


def check_refer_below(threshold: float) -> float:
    """A referral threshold is a probability strictly between 0 and 1 (0 would refer no scan, 1 nearly all)."""
    if not 0 < threshold < 1:  # NaN fails too
        raise EdgeError(f"--refer-below is {threshold}; allowed: a probability strictly between 0 and 1, e.g. 0.8")
    return threshold


def _images_in(folder: Path) -> list[Path]:
    """The image files under a folder, recursive and sorted, hidden files and folders skipped as in training."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def find_images(paths: Iterable[str | Path]) -> Iterator[Path | Prediction]:
    """Each named file, and the image files under each named folder.

    A missing or unreadable path, or a folder without images, comes back as a Prediction
    carrying the error.
    """
    for raw in paths:
        path = Path(raw)
        try:
            found = [path] if path.is_file() else _images_in(path) if path.is_dir() else None
        except OSError as err:  # e.g. a name too long for the file system, a folder that cannot be listed
            yield Prediction(printable(str(path)), error=f"cannot read: {err.strerror or err}")
            continue
        if found is None:
            yield Prediction(printable(str(path)), error="no such file or folder")
        elif not found:
            yield Prediction(printable(str(path)),
                             error=f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder")
        yield from found or []


def _fill(model: LoadedModel, results: list[Prediction], pending: list[tuple[int, np.ndarray]], top_k: int,
          refer_below: float | None) -> None:
    """Run one batch and write class, calibrated probability, top k and referral (or a non-finite-logits error)
    into its results."""
    with torch.no_grad():
        logits = model.logits(model.normalize(torch.from_numpy(np.stack([array for _, array in pending])))).float()
    finite = torch.isfinite(logits).all(dim=1).tolist()
    probabilities, indices = model.probabilities(logits).topk(min(top_k, logits.shape[1]), dim=1)
    for (slot, _), ok, probs, idx in zip(pending, finite, probabilities.tolist(), indices.tolist(), strict=True):
        if not ok:
            results[slot].error = "the model gave non-finite (NaN or infinite) logits for this image"
            continue
        ranked = [(model.class_names[i], p) for i, p in zip(idx, probs, strict=True)]
        results[slot].label, results[slot].probability = ranked[0]
        results[slot].top_k = ranked
        if refer_below is not None:
            results[slot].refer = ranked[0][1] < refer_below


def predict_paths(model: LoadedModel, paths: Sequence[str | Path], *, top_k: int = 1,
                  batch_size: int = 64, refer_below: float | None = None) -> list[Prediction]:
    """Predict every image file in ``paths`` (files or folders), in order, batched.

    With ``refer_below``, each prediction is marked ``refer`` when its top probability is below it.
    """
    if top_k < 1:
        raise EdgeError(f"top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise EdgeError(f"batch size must be >= 1, got {batch_size}")
    if refer_below is not None:
        check_refer_below(refer_below)
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []
    for item in find_images(paths):
        if isinstance(item, Prediction):
            results.append(item)
            continue
        try:
            array = load_image_uint8(item)
        except BadImageError as err:
            results.append(Prediction(printable(str(item)), error=printable(str(err))))
            continue
        results.append(Prediction(printable(str(item))))
        pending.append((len(results) - 1, array))
        if len(pending) == batch_size:
            _fill(model, results, pending, top_k, refer_below)
            pending = []
    if pending:
        _fill(model, results, pending, top_k, refer_below)
    return results
