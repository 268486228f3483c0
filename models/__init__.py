"""Model architectures of edgemri: the paper's student and its VGG16 teachers.

This package imports nothing else of edgemri, so the models can be used, exported
and tested on their own.
"""

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
    "Student",
    "Teacher",
    "WeightsUnavailableError",
    "build_model",
    "model_spec",
    "summarize",
]
