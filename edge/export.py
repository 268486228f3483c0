"""Export a student checkpoint for devices: ONNX (fp32 or static int8) and TorchScript.

Every exported file takes the image exactly as training sees it after ``normalize``:
float32 N x 3 x 128 x 128 (input "image", output "logits", dynamic batch), and carries
the class names, the preprocessing and where the weights came from, so a device needs
nothing but the file. onnx and onnxruntime are optional (``pip install 'edgemri[edge]'``);
TorchScript needs only torch.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from edgemri.core.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from edgemri.core.data import IMAGE_SIZE, PREPROCESSING, normalize
from edgemri.core.errors import EdgemriError, version
from edgemri.core.io import write_bytes

if TYPE_CHECKING:
    import onnxruntime

ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
METADATA_FILE = "edgemri.json"  # TorchScript extra file holding the same metadata as the ONNX file
INSTALL_HINT = "pip install 'edgemri[edge]'"
PARITY_ATOL = 1e-4  # exported fp32 logits must match PyTorch's within this, times the largest logit
CALIBRATION_IMAGES = 200
# ONNX Runtime's NCHWc layout pass (part of the default ORT_ENABLE_ALL) pads the student's
# 3 channels to the 16-float SIMD block: measured 2x slower in batches (docs/EDGE.md).
# Everything else at ORT_ENABLE_ALL stays on, including the NHWC pass int8 models need.
ORT_DISABLED_OPTIMIZERS = ["NchwcTransformer"]


class EdgeError(EdgemriError):
    """A model cannot be exported or used for prediction as asked; the message says why."""


class EdgeDependencyError(EdgeError):
    """onnx or onnxruntime is not installed; the message says how to install them."""


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """Import onnx and onnxruntime, or raise EdgeDependencyError naming the install command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise EdgeDependencyError(
            f"ONNX export and ONNX models need onnx and onnxruntime ({err.name or err} is missing): "
            f"{INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


# ---------------------------------------------------------------- the student and its metadata


def check_preprocessing(preprocessing: dict[str, Any], source: str) -> None:
    """Refuse a model trained with another preprocessing than the one edgemri applies."""
    if json.dumps(preprocessing, sort_keys=True) != json.dumps(PREPROCESSING, sort_keys=True):
        raise EdgeError(f"{source} expects preprocessing {preprocessing}, but edgemri applies {PREPROCESSING}")


def check_exportable(checkpoint: Checkpoint, source: str) -> None:
    """Only the student goes to devices, and only with the preprocessing edgemri applies."""
    if checkpoint.model != "student":
        raise CheckpointError(f"{source} holds a {checkpoint.model!r} model; only the student is exported for devices")
    check_preprocessing(checkpoint.preprocessing, source)


def load_student(path: str | Path) -> Checkpoint:
    """Read a checkpoint (ours or a paper-layout state dict) that can be exported."""
    checkpoint = load_checkpoint(path)
    check_exportable(checkpoint, str(path))
    return checkpoint


def edge_metadata(checkpoint: Checkpoint) -> dict[str, Any]:
    """What an exported file records: how to feed it, how to read it and where it came from."""
    return {
        "class_names": list(checkpoint.class_names),
        "preprocessing": checkpoint.preprocessing,
        "input": f"{INPUT_NAME}: float32 N x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, already normalized",
        "output": f"{OUTPUT_NAME}: float32 N x {len(checkpoint.class_names)}, before softmax",
        "source_model": checkpoint.model,
        "source_role": checkpoint.role,
        "source_seed": checkpoint.seed,
        "source_data_fingerprint": checkpoint.data_fingerprint,
        "source_created": checkpoint.created,
        "edgemri_version": version(),
    }


def _student(checkpoint: Checkpoint) -> nn.Module:
    check_exportable(checkpoint, f"the {checkpoint.role or 'given'} checkpoint")
    return checkpoint.build()


def _example_batch(n: int = 4) -> Tensor:
    """Seeded random normalized images: the trace input and the parity check's batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return normalize(images)


def _check_parity(expected: Tensor, actual: np.ndarray | Tensor, what: str) -> None:
    """Refuse an export whose logits differ from PyTorch's beyond float32 rounding."""
    # Relative to the largest logit: random check images can give logits in the hundreds.
    tolerance = PARITY_ATOL * max(1.0, float(expected.abs().max()))
    diff = float((torch.as_tensor(actual) - expected).abs().max())
    if not diff <= tolerance:
        raise EdgeError(f"{what} logits differ from PyTorch's by {diff:.2e} (> {tolerance:.1e}); not written")


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or overwrite it (--overwrite)")


# ---------------------------------------------------------------- onnx


def onnx_session(model: bytes | str | Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU onnxruntime session with the optimizations measured fastest for the student."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
    except Exception as err:  # onnxruntime raises its own non-exported exception types
        where = "the model" if isinstance(model, bytes) else str(model)
        raise EdgeError(f"{where} is not a usable ONNX model: {str(err).splitlines()[0]}") from None


def run_onnx(session: onnxruntime.InferenceSession, images: Tensor) -> np.ndarray:
    """Logits for a normalized float32 batch."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


def _with_metadata(model_bytes: bytes, metadata: dict[str, Any], doc: str) -> bytes:
    """Set metadata_props (structured values as JSON) and check the model."""
    onnx, _ = require_onnx()
    model = onnx.load_from_string(model_bytes)
    onnx.helper.set_model_props(
        model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    )
    model.doc_string = doc
    model.producer_name, model.producer_version = "edgemri", version()
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_bytes(checkpoint: Checkpoint) -> bytes:
    """The student as an fp32 ONNX model with its metadata, checked against PyTorch."""
    require_onnx()
    model = _student(checkpoint)
    example = _example_batch()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The torch.export-based exporter needs onnxscript, which the edge extra does not
        # install; the TorchScript-based one handles this plain CNN exactly (parity below)
        # and warns only that it is deprecated, which is ours to know, not the user's.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example[:1],), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    exported = _with_metadata(buffer.getvalue(), edge_metadata(checkpoint), "edgemri student, fp32")
    with torch.no_grad():
        _check_parity(model(example), run_onnx(onnx_session(exported), example), "ONNX")
    return exported


def export_onnx(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the fp32 ONNX model to ``out`` atomically."""
    out = Path(out)
    _refuse_overwrite(out, overwrite)
    return write_bytes(out, onnx_bytes(checkpoint))


class ImageCalibrationReader:
    """Normalized uint8 images in batches for onnxruntime's calibrator.

    onnxruntime's CalibrationDataReader accepts any class with ``get_next``, so this
    module imports no onnxruntime until it is used.
    """

    def __init__(self, images: Tensor, batch_size: int = 32) -> None:
        self._batches = iter(images.split(batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: normalize(batch).numpy()}


def calibration_sample(images: Tensor, count: int = CALIBRATION_IMAGES, seed: int = 0) -> Tensor:
    """``count`` images drawn at random (seeded) from a uint8 image tensor."""
    if len(images) == 0:
        raise EdgeError("int8 calibration needs training images; the given set is empty")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


QUANTIZATION = {
    "method": "static (onnxruntime.quantization.quantize_static)",
    "format": "QDQ",
    "weights": "int8, symmetric, per output channel",
    "activations": "int8, per tensor, MinMax calibration",
}


def quantize(fp32_model: bytes, calibration_images: Tensor) -> bytes:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on uint8 images."""
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
            prepared, int8, ImageCalibrationReader(calibration_images),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return int8.read_bytes()


def onnx_accuracy(session: onnxruntime.InferenceSession, images: Tensor, labels: Tensor,
                  batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX session on uint8 images."""
    if len(images) == 0:
        raise EdgeError("no test images to measure accuracy on")
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = run_onnx(session, normalize(images[start:start + batch_size]))
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
) -> Int8Export:
    """Write a static-int8 ONNX model; calibrate on ~200 of ``calibration_images`` (uint8,
    e.g. ``load_dataset(root).train.images``) and measure fp32 and int8 test accuracy."""
    out = Path(out)
    _refuse_overwrite(out, overwrite)
    fp32 = onnx_bytes(checkpoint)
    sample = calibration_sample(calibration_images, seed=seed)
    int8 = quantize(fp32, sample)
    fp32_accuracy = onnx_accuracy(onnx_session(fp32), test_images, test_labels)
    int8_accuracy = onnx_accuracy(onnx_session(int8), test_images, test_labels)
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
    write_bytes(out, _with_metadata(int8, metadata, "edgemri student, static int8 (QDQ)"))
    return Int8Export(out, fp32_accuracy, int8_accuracy, len(test_images), len(sample))


# ---------------------------------------------------------------- torchscript


@contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    """torch 2.14 marks torch.jit deprecated (FutureWarning); the format is still asked for
    and loads wherever TorchScript runs, so users need not see it (docs/EDGE.md prefers ONNX)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def torchscript_bytes(checkpoint: Checkpoint) -> bytes:
    """The student traced to TorchScript, metadata in the ``edgemri.json`` extra file."""
    model = _student(checkpoint)
    example = _example_batch()
    buffer = io.BytesIO()
    with torch.no_grad(), _jit_deprecation_silenced():
        traced = torch.jit.trace(model, example[:1])
        _check_parity(model(example), traced(example), "TorchScript")
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(edge_metadata(checkpoint))})
    return buffer.getvalue()


def export_torchscript(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the TorchScript model to ``out`` atomically."""
    out = Path(out)
    _refuse_overwrite(out, overwrite)
    return write_bytes(out, torchscript_bytes(checkpoint))


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported TorchScript model in eval mode and its edgemri metadata."""
    files = {METADATA_FILE: ""}
    with _jit_deprecation_silenced():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return module.eval(), json.loads(files[METADATA_FILE])
