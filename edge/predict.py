"""Predict image files with a checkpoint, an exported ONNX model or a TorchScript model.

Images go through the training preprocessing itself (``load_image_uint8`` + ``normalize``
from edgemri.core.data), in batches. A file that cannot be used gets its own error and
the others are still predicted. Images with a side under 16 px are such errors, by the
same rule as in training: the model never saw one, and a 12 px thumbnail upscaled to
128 px would get a confident-looking guess, not a diagnosis.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from edgemri.core.checkpoint import load_checkpoint
from edgemri.core.data import IMAGE_EXTENSIONS, IMAGE_SIZE, BadImageError, load_image_uint8, normalize
from edgemri.edge.export import (
    INPUT_NAME,
    METADATA_FILE,
    EdgeError,
    check_preprocessing,
    load_torchscript,
    onnx_session,
    run_onnx,
)

ModelKind = Literal["checkpoint", "onnx", "torchscript"]


@dataclass
class LoadedModel:
    """A model ready to predict: logits for a normalized float32 (N, 3, 128, 128) batch."""

    path: Path
    kind: ModelKind
    class_names: list[str]
    logits: Callable[[Tensor], Tensor]


def _onnx_model(path: Path) -> LoadedModel:
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    if "class_names" not in meta or "preprocessing" not in meta:
        raise EdgeError(f"{path} has no edgemri metadata (class_names, preprocessing); "
                        f"export it with `edgemri export CHECKPOINT --format onnx`")
    check_preprocessing(json.loads(meta["preprocessing"]), str(path))
    image = session.get_inputs()[0]
    if image.name != INPUT_NAME or list(image.shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
        raise EdgeError(f"{path} takes {image.name} {image.shape}, not {INPUT_NAME} [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}]")
    return LoadedModel(path, "onnx", json.loads(meta["class_names"]),
                       lambda batch: torch.from_numpy(run_onnx(session, batch)))


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives that edgemri exported carry ``extra/edgemri.json``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())


def _torchscript_model(path: Path) -> LoadedModel:
    module, meta = load_torchscript(path)
    check_preprocessing(meta["preprocessing"], str(path))
    return LoadedModel(path, "torchscript", meta["class_names"], module)


def load_model(path: str | Path) -> LoadedModel:
    """An ``.onnx`` file, an edgemri TorchScript file, or a checkpoint (incl. a paper-layout state dict)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"model not found: {path}")
    if path.suffix.lower() == ".onnx":
        return _onnx_model(path)
    if _is_torchscript(path):
        return _torchscript_model(path)
    checkpoint = load_checkpoint(path)
    check_preprocessing(checkpoint.preprocessing, str(path))
    return LoadedModel(path, "checkpoint", list(checkpoint.class_names), checkpoint.build())


@dataclass
class Prediction:
    """One file's result: a class with its probability and the top k, or an error."""

    file: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        if not self.ok:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "class": self.label, "probability": self.probability,
                "top_k": [{"class": name, "probability": p} for name, p in self.top_k]}


def find_images(paths: Iterable[str | Path]) -> Iterator[Path | Prediction]:
    """Each named file, and the image files under each named folder (recursive, sorted).

    Hidden files and folders are skipped, as in training; a missing path or a folder
    without images comes back as a Prediction carrying the error.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            yield path
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                yield Prediction(str(path), error=f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder")
            yield from found
        else:
            yield Prediction(str(path), error="no such file or folder")


def _fill(model: LoadedModel, results: list[Prediction], pending: list[tuple[int, np.ndarray]], top_k: int) -> None:
    """Run one batch and write class, probability and top k into its results."""
    with torch.no_grad():
        logits = model.logits(normalize(torch.from_numpy(np.stack([array for _, array in pending]))))
    probabilities, indices = torch.softmax(logits.float(), dim=1).topk(min(top_k, logits.shape[1]), dim=1)
    for (slot, _), probs, idx in zip(pending, probabilities.tolist(), indices.tolist(), strict=True):
        ranked = [(model.class_names[i], p) for i, p in zip(idx, probs, strict=True)]
        results[slot].label, results[slot].probability = ranked[0]
        results[slot].top_k = ranked


def predict_paths(model: LoadedModel, paths: Sequence[str | Path], *, top_k: int = 1,
                  batch_size: int = 64) -> list[Prediction]:
    """Predict every image file in ``paths`` (files or folders), in order, batched."""
    if top_k < 1:
        raise EdgeError(f"top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise EdgeError(f"batch size must be >= 1, got {batch_size}")
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []
    for item in find_images(paths):
        if isinstance(item, Prediction):
            results.append(item)
            continue
        try:
            array = load_image_uint8(item)
        except BadImageError as err:
            results.append(Prediction(str(item), error=str(err)))
            continue
        results.append(Prediction(str(item)))
        pending.append((len(results) - 1, array))
        if len(pending) == batch_size:
            _fill(model, results, pending, top_k)
            pending = []
    if pending:
        _fill(model, results, pending, top_k)
    return results
