"""Model architectures of edgemri: the paper's student, its training-time norm variant, the VGG16 teachers.

This package imports nothing else of edgemri, so the models can be used, exported
and tested on their own.
"""

from edgemri.models.norm_student import NormStudent, fold_norms
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
    "ModelSummary",
    "NormStudent",
    "Student",
    "Teacher",
    "WeightsUnavailableError",
    "build_model",
    "fold_norms",
    "model_spec",
    "summarize",
]
