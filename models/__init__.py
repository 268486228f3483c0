"""Model architectures of edgemri: the paper's student, its training-time norm variant, the VGG16 teachers,
and the trained models shipped with the package (``pretrained``).

This package imports nothing else of edgemri, so the models can be used, exported
and tested on their own.
"""

from edgemri.models.norm_student import NormStudent, fold_norms
from edgemri.models.pretrained import (
    PRETRAINED,
    PretrainedModel,
    PretrainedUnavailableError,
    UnknownPretrainedError,
    file_sha256,
    pretrained_model,
    pretrained_path,
)
from edgemri.models.registry import (
    MODEL_NAMES,
    WeightsUnavailableError,
    build_model,
    model_spec,
)
from edgemri.models.student import Student
from edgemri.models.summary import ModelSummary, summarize
from edgemri.models.teacher import Teacher

__all__ = [
    "MODEL_NAMES",
    "PRETRAINED",
    "ModelSummary",
    "NormStudent",
    "PretrainedModel",
    "PretrainedUnavailableError",
    "Student",
    "Teacher",
    "UnknownPretrainedError",
    "WeightsUnavailableError",
    "build_model",
    "file_sha256",
    "fold_norms",
    "model_spec",
    "pretrained_model",
    "pretrained_path",
    "summarize",
]
