"""Trained models shipped inside the package, run by name (``edgemri predict --model kaggle-student``).

Each file lies in ``models/pretrained/`` next to its model card and is an edgemri checkpoint
(``core.checkpoint``). Its sha256 is recorded here and checked on every lookup, so a swapped or
damaged file is refused rather than silently used. To ship a new file, copy it and its card into
``models/pretrained/`` and run ``pytest tests/test_pretrained.py``: the failure names the hash to paste.

Like the rest of this package it imports nothing else of edgemri: its errors are plain exceptions
that the callers (``edge.pretrained``) turn into one-line edgemri errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Beside this file in the checkout (the editable install) and in an installed wheel
# (pyproject.toml's package-data); never fetched from the network.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


class UnknownPretrainedError(ValueError):
    """The name is not in ``PRETRAINED``; the message lists the names that are."""


class PretrainedUnavailableError(RuntimeError):
    """A registered model's file is missing, unreadable, or not the file whose sha256 is recorded."""


@dataclass(frozen=True)
class PretrainedModel:
    """One shipped model: its files in ``PRETRAINED_DIR`` and the sha256 its checkpoint must have."""

    name: str
    file: str  # the checkpoint, e.g. "kaggle-student.pt"
    card: str  # the model card (Markdown): data, training, results, intended use
    description: str  # one line, shown in help texts
    sha256: str


PRETRAINED: dict[str, PretrainedModel] = {
    model.name: model
    for model in (
        PretrainedModel(
            "kaggle-student", "kaggle-student.pt", "kaggle-student.md",
            "the paper's 12,628-parameter student distilled on the Kaggle brain-MRI set",
            "41bb010bd1310837e80e0c5858090b19ed5087e8a8ff303bfb4085e670e3c317",
        ),
    )
}


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pretrained_model(name: str) -> PretrainedModel:
    """The registry entry for ``name``; an unknown name lists the allowed ones."""
    try:
        return PRETRAINED[name]
    except KeyError:
        raise UnknownPretrainedError(f"unknown pretrained model {name!r}; "
                                     f"allowed: {', '.join(PRETRAINED) or 'none'}") from None


def pretrained_path(name: str) -> Path:
    """The shipped checkpoint of ``name``, after checking it is the file the registry records."""
    model = pretrained_model(name)
    path = PRETRAINED_DIR / model.file
    try:
        found = file_sha256(path)
    except FileNotFoundError:
        raise PretrainedUnavailableError(f"pretrained model {name!r} is not installed: {path} is missing "
                                         f"(reinstall edgemri, or use a checkpoint file)") from None
    except OSError as err:
        raise PretrainedUnavailableError(f"pretrained model {name!r}: cannot read {path} "
                                         f"({err.strerror or err})") from None
    if found != model.sha256:
        raise PretrainedUnavailableError(f"pretrained model {name!r}: {path} has sha256 {found}, not the recorded "
                                         f"{model.sha256}; the file was changed or swapped: reinstall edgemri")
    return path
