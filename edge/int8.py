"""Static int8 quantization of the fp32 ONNX student, and its accuracy before and after.

onnxruntime's ``quantize_static`` after ``quant_pre_process`` (shape inference): QDQ format,
int8 weights per output channel, int8 activations per tensor, MinMax calibration on ~200
training images normalized exactly as in training, with the model's own mean and std
(docs/EDGE.md says why).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from edgemri.core.data.images import CLASS_NAMES, PREPROCESSING
from edgemri.core.errors import printable
from edgemri.core.training.checkpoint import Checkpoint
from edgemri.edge.contract import (
    INPUT_NAME,
    check_output,
    check_preprocessing,
    edge_metadata,
    normalize_for,
    write_output,
)
from edgemri.edge.errors import EdgeError, require_onnx
from edgemri.edge.onnx import onnx_bytes, with_metadata
from edgemri.edge.runtime import onnx_session, run_onnx

if TYPE_CHECKING:
    import onnxruntime

CALIBRATION_IMAGES = 200
QUANTIZATION = {
    "method": "static (onnxruntime.quantization.quantize_static)",
    "format": "QDQ",
    "weights": "int8, symmetric, per output channel",
    "activations": "int8, per tensor, MinMax calibration",
}


class ImageCalibrationReader:
    """uint8 images in batches for onnxruntime's calibrator, normalized with the model's mean and std.

    onnxruntime's CalibrationDataReader accepts any class with ``get_next``, so this
    module imports no onnxruntime until it is used.
    """

    def __init__(self, images: Tensor, batch_size: int = 32, *,
                 preprocessing: Mapping[str, Any] = PREPROCESSING) -> None:
        self._batches = iter(images.split(batch_size))
        self._preprocessing = preprocessing

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: normalize_for(batch, self._preprocessing).numpy()}


def check_data_classes(class_names: Sequence[str], data_class_names: Sequence[str] = CLASS_NAMES) -> None:
    """The model's classes must be the data's class folders, in order: the test labels index the folders, so a
    model with other classes would be calibrated on images it never learned and scored against labels it
    cannot give (a 2-class model on 4-class data scored 25 % before and after, without a word)."""
    if list(class_names) != list(data_class_names):
        raise EdgeError(f"the model's classes [{printable(', '.join(class_names))}] are not the data's class "
                        f"folders [{', '.join(data_class_names)}]; int8 calibration and its accuracy need data with "
                        f"the model's classes, in its order")


def calibration_sample(images: Tensor, count: int = CALIBRATION_IMAGES, seed: int = 0) -> Tensor:
    """``count`` images drawn at random (seeded) from a uint8 image tensor."""
    if len(images) == 0:
        raise EdgeError("int8 calibration needs training images; the given set is empty")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


def quantize(fp32_model: bytes, calibration_images: Tensor, *,
             preprocessing: Mapping[str, Any] = PREPROCESSING) -> bytes:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on uint8 images, normalized as the
    model's ``preprocessing`` says."""
    require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgemri-int8.") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(fp32_model)
        # Shape inference first, as onnxruntime recommends: the quantizer needs every tensor's shape.
        quant_pre_process(fp32, prepared)
        # S8S8 is onnxruntime's default and its choice for ARM devices; U8S8, its x86 choice,
        # and per-tensor weights measured the same accuracy and speed here (docs/EDGE.md).
        quantize_static(
            prepared, int8, ImageCalibrationReader(calibration_images, preprocessing=preprocessing),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return int8.read_bytes()


def onnx_accuracy(session: onnxruntime.InferenceSession, images: Tensor, labels: Tensor,
                  batch_size: int = 256, *, preprocessing: Mapping[str, Any] = PREPROCESSING) -> float:
    """Top-1 accuracy of an ONNX session on uint8 images, normalized as the model's ``preprocessing`` says."""
    if len(images) == 0:
        raise EdgeError("no test images to measure accuracy on")
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = run_onnx(session, normalize_for(images[start:start + batch_size], preprocessing))
        correct += int((torch.from_numpy(logits).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


@dataclass(frozen=True)
class Int8Export:
    """The int8 file and the test accuracy before and after quantization."""

    path: Path
    fp32_accuracy: float
    int8_accuracy: float
    test_images: int
    calibration_images: int

    @property
    def change_points(self) -> float:
        return 100.0 * (self.int8_accuracy - self.fp32_accuracy)


def export_onnx_int8(
    checkpoint: Checkpoint,
    out: str | Path,
    calibration_images: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    overwrite: bool = False,
    seed: int = 0,
    label_names: Sequence[str] = CLASS_NAMES,
) -> Int8Export:
    """Write a static-int8 ONNX model; calibrate on ~200 of ``calibration_images`` (uint8,
    e.g. ``load_dataset(root).train.images``) and measure fp32 and int8 test accuracy.

    ``label_names`` are the classes ``test_labels`` index (``load_dataset``'s: its class folders); they must be
    the checkpoint's."""
    check_data_classes(checkpoint.class_names, label_names)
    out = Path(out)
    check_output(out, overwrite)
    fp32 = onnx_bytes(checkpoint)
    preprocessing = check_preprocessing(checkpoint.preprocessing, f"the {checkpoint.role or 'given'} checkpoint")
    sample = calibration_sample(calibration_images, seed=seed)
    int8 = quantize(fp32, sample, preprocessing=preprocessing)
    fp32_accuracy = onnx_accuracy(onnx_session(fp32), test_images, test_labels, preprocessing=preprocessing)
    int8_accuracy = onnx_accuracy(onnx_session(int8), test_images, test_labels, preprocessing=preprocessing)
    metadata = {
        **edge_metadata(checkpoint),
        "quantization": {
            **QUANTIZATION,
            "calibration_images": len(sample),
            "test_images": len(test_images),
            "test_accuracy_fp32": fp32_accuracy,
            "test_accuracy_int8": int8_accuracy,
        },
    }
    write_output(out, with_metadata(int8, metadata, "edgemri student, static int8 (QDQ)"))
    return Int8Export(out, fp32_accuracy, int8_accuracy, len(test_images), len(sample))
