"""The one resolver from what a user types (a shipped model's name or a file) to a model file.

``edgemri predict``, ``edgemri export`` and ``edgemri federate --start`` all take either; a
registered name wins over a file of the same name (write ``./kaggle-student`` for the file).
"""

from __future__ import annotations

from pathlib import Path

from edgemri.core.errors import printable
from edgemri.edge.errors import EdgeError
from edgemri.models import PRETRAINED, PretrainedUnavailableError, pretrained_path


class PretrainedModelError(EdgeError):
    """A model is neither a shipped name nor an existing file, or a shipped file is missing or altered."""


def is_pretrained_name(value: str | Path) -> bool:
    """Whether ``value`` names a shipped model (``edgemri.models.PRETRAINED``); a ``Path`` is always a file."""
    return isinstance(value, str) and value in PRETRAINED


def resolve_model(value: str | Path) -> Path:
    """A shipped model's name -> its checked file; an existing file -> itself; else a one-line error.

    The error lists the shipped names, so a mistyped name shows what was meant.
    """
    if is_pretrained_name(value):
        try:
            return pretrained_path(str(value))
        except PretrainedUnavailableError as err:
            raise PretrainedModelError(str(err)) from None
    path = Path(value)
    try:
        if path.is_file():
            return path
        reason = "is a folder; give the model file" if path.is_dir() else "is neither a file nor a pretrained model"
    except OSError as err:  # e.g. a name too long for the file system
        reason = f"cannot be read ({err.strerror or err})"
    raise PretrainedModelError(f"model {printable(str(value))} {reason}; pretrained models: "
                               f"{', '.join(PRETRAINED) or 'none'}")
