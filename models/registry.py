"""One registry from model names to builders, used by every command.

Like torchvision's weights enums, a name says both the architecture and where its
starting weights come from; ``build_model(name, **options)`` is the only way in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgemri.models.norm_student import NormStudent
from edgemri.models.student import Student
from edgemri.models.teacher import Teacher


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the torch cache nor downloadable."""


@dataclass(frozen=True)
class ModelSpec:
    """What a registered name builds and how it is trained."""

    name: str
    builder: Callable[..., nn.Module]
    role: str  # "student" or "teacher"
    pretrained: bool
    description: str


# The options a model may be built with, bounded before anything is allocated: they also come from checkpoints,
# which are untrusted input (a negative or huge size would fail deep in torch or exhaust memory).
MAX_CLASSES = 1_000
IMAGE_SIZES = (16, 1_024)  # smallest and largest side, in pixels


def _integer_in(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]}")
    return value


def _student_options(num_classes: object, image_size: object) -> dict[str, int]:
    return {"num_classes": _integer_in("num_classes", num_classes, 2, MAX_CLASSES),
            "image_size": _integer_in("image_size", image_size, *IMAGE_SIZES)}


def _build_student(*, num_classes: int = 4, image_size: int = 128) -> Student:
    return Student(**_student_options(num_classes, image_size))


def _build_norm_student(*, num_classes: int = 4, image_size: int = 128) -> NormStudent:
    return NormStudent(**_student_options(num_classes, image_size))


def _build_vgg16_slim(
    *, num_classes: int = 4, width: float = 0.125, batch_norm: bool = True
) -> Teacher:
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width <= 1:
        raise ValueError(f"vgg16-slim width must be in (0, 1], got {str(width)[:40]}")
    if not isinstance(batch_norm, bool):
        raise ValueError(f"batch_norm must be true or false, got {str(batch_norm)[:40]}")
    return Teacher(width=width, batch_norm=batch_norm, num_classes=_integer_in("num_classes", num_classes, 2,
                                                                                MAX_CLASSES))


def imagenet_weights_path() -> Path:
    """Where torchvision's weights API looks for VGG16's ImageNet weights."""
    from torchvision.models import VGG16_Weights  # here, not at the top: a client round never needs torchvision

    filename = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _build_vgg16_imagenet(*, num_classes: int = 4, pretrained: bool = True) -> Teacher:
    """The paper's teacher: ImageNet VGG16 features, frozen, and a new Linear head.

    ``pretrained=False`` builds the architecture only, for checkpoints that carry
    their own weights (a trained teacher needs no ImageNet download to be loaded).
    """
    teacher = Teacher(width=1.0, batch_norm=False, num_classes=_integer_in("num_classes", num_classes, 2, MAX_CLASSES))
    teacher.freeze_features()
    if not pretrained:
        return teacher
    from torchvision.models import VGG16_Weights

    path = imagenet_weights_path()
    try:
        # torchvision reads its cache first and downloads only when the file is missing.
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise WeightsUnavailableError(
            f"VGG16 ImageNet weights are not in the torch cache and could not be downloaded "
            f"({err.__class__.__name__}: {err}).\n"
            f"  expected file: {path}\n"
            f"  cache folder:  {path.parent} (set TORCH_HOME to use another)\n"
            f"  copy {path.name} there on a machine without internet, or use the offline "
            f"teacher 'vgg16-slim' (teacher.name: vgg16-slim in the config)."
        ) from None
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    # The truncated body has no module 30 (the dropped max-pool has no weights anyway).
    teacher.features.load_state_dict(features, strict=True)
    return teacher


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("student", _build_student, "student", False,
                  "the paper's 12,628-parameter student CNN"),
        ModelSpec("vgg16-slim", _build_vgg16_slim, "teacher", False,
                  "VGG16 layout at reduced width with batch norm, trained from scratch (offline default)"),
        ModelSpec("vgg16-imagenet", _build_vgg16_imagenet, "teacher", True,
                  "the paper's teacher: frozen ImageNet VGG16 features and a Linear(25088, 4) head"),
        ModelSpec("norm-student", _build_norm_student, "student", False,
                  "the student with a BatchNorm2d after each conv, for training (FedBN); exported folded "
                  "into the plain student"),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a clear error names the allowed names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}") from None


def build_model(name: str, **options: object) -> nn.Module:
    """Build a registered model by name with keyword-only options."""
    return model_spec(name).builder(**options)
