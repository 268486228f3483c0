"""The project's model format: a state dict plus everything needed to use it.

A checkpoint says which registered model it is, its class names and preprocessing,
and the config, seed, metrics and data fingerprint that made it. A bare state dict in
the paper's published layout loads too, with the paper's class names and preprocessing.
"""

from __future__ import annotations

import datetime as dt
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgemri.core.data import CLASS_NAMES, PREPROCESSING
from edgemri.core.errors import EdgemriError, version
from edgemri.core.io import save_torch
from edgemri.models import Student, build_model

FORMAT = "edgemri.checkpoint/1"


class CheckpointError(EdgemriError):
    """A checkpoint file is missing, unreadable or not a model this project knows."""


@dataclass
class Checkpoint:
    model: str  # a name in edgemri.models' registry
    state_dict: dict[str, Tensor]
    model_options: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(PREPROCESSING))
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    role: str = ""  # e.g. "teacher", "baseline", "kd", "personalized"
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    edgemri_version: str = field(default_factory=version)

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode."""
        model = build_model(self.model, **self.model_options)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        meta.pop("state_dict")
        return meta


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    return save_torch(Path(path), {"format": FORMAT, **asdict(checkpoint)})


def _paper_state_dict(obj: Any) -> bool:
    expected = set(Student().state_dict())
    return isinstance(obj, dict) and set(obj) == expected


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (ours, or a bare paper-layout student state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({err.__class__.__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        fields = {k: v for k, v in obj.items() if k != "format"}
        try:
            return Checkpoint(**fields)
        except TypeError as err:
            raise CheckpointError(f"{path}: malformed {FORMAT} checkpoint: {err}") from None
    if _paper_state_dict(obj):
        return Checkpoint(model="student", state_dict=obj, role="paper-layout state dict")
    keys = sorted(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{path} is neither an {FORMAT} checkpoint nor a state dict in the paper's student layout "
        f"(found {keys})"
    )
