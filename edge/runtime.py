"""Load a model file for prediction: an exported ONNX, ExecuTorch or TorchScript file, or a checkpoint.

Whatever the kind, ``load_model`` checks the file against the contract (edge/contract.py)
before it predicts anything: the edgemri metadata and its preprocessing (the model's own
mean and std, which ``LoadedModel.normalize`` applies) and calibration temperature (which
``LoadedModel.probabilities`` applies), the input and output shapes against
the class names, finite weights, and one probe batch giving finite logits. ONNX files are
protobuf data and checkpoints load with ``weights_only=True``; an ExecuTorch program is data too,
parsed by a native runtime, so its headers are checked first and it is loaded and run once in a child
process before this one loads it (edge/executorch.py, docs/EDGE.md); a TorchScript file is code
(torch.jit.load runs it), so only load your own.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from edgemri.core.data.images import IMAGE_SIZE
from edgemri.core.errors import printable
from edgemri.core.training.checkpoint import calibrated_probabilities, load_checkpoint
from edgemri.core.untrusted import parse_json
from edgemri.edge.contract import (
    INPUT_NAME,
    MAX_METADATA_CHARS,
    METADATA_FILE,
    OUTPUT_NAME,
    check_finite,
    check_metadata,
    check_preprocessing,
    check_temperature,
    checked_model,
    normalize_for,
    probe,
)
from edgemri.edge.errors import EdgeError, first_line, require_onnx
from edgemri.edge.executorch import load_executorch
from edgemri.edge.torchscript import load_torchscript

if TYPE_CHECKING:
    import onnxruntime

ModelKind = Literal["checkpoint", "onnx", "executorch", "torchscript"]
# ONNX Runtime's NCHWc layout pass (part of the default ORT_ENABLE_ALL) pads the student's
# 3 channels to the 16-float SIMD block: measured 2x slower in batches (docs/EDGE.md).
# Everything else at ORT_ENABLE_ALL stays on, including the NHWC pass int8 models need.
ORT_DISABLED_OPTIMIZERS = ["NchwcTransformer"]


# ---------------------------------------------------------------- onnxruntime


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
        where = "the model" if isinstance(model, bytes) else printable(str(model))
        raise EdgeError(f"{where} is not a usable ONNX model: {first_line(err)}") from None


def run_onnx(session: onnxruntime.InferenceSession, images: Tensor) -> np.ndarray:
    """Logits for a normalized float32 batch."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


# ---------------------------------------------------------------- a model ready to predict


@dataclass
class LoadedModel:
    """A model ready to predict: logits for a float32 (N, 3, 128, 128) batch normalized by ``normalize``."""

    path: Path
    kind: ModelKind
    class_names: list[str]
    logits: Callable[[Tensor], Tensor]
    preprocessing: dict[str, Any]  # checked (edge.contract.check_preprocessing): the model's own mean and std
    temperature: float  # checked calibration temperature; 1.0 for files and checkpoints without one

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, 128, 128) images as this model takes them: normalized with its own mean and std."""
        return normalize_for(images, self.preprocessing)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated class probabilities for this model's logits: softmax(logits / temperature)."""
        return calibrated_probabilities(logits, self.temperature)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise EdgeError(f"cannot read model {printable(str(path))}: {err.strerror or err}") from None


def _onnx_model(path: Path) -> LoadedModel:
    onnx, _ = require_onnx()
    source = printable(str(path))
    data = _read(path)
    try:
        proto = onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError, or onnx's own checks
        raise EdgeError(f"{source} is not a usable ONNX model: {first_line(err)}") from None
    # Weights in side files could be read from anywhere on disk; edgemri writes one self-contained file.
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise EdgeError(f"{source} keeps weights in external files; give a self-contained ONNX model")
    session = onnx_session(data)
    meta = session.get_modelmeta().custom_metadata_map
    # NaN passes the parser so that the temperature check can name it; every other bound is parse_json's.
    parsed = {key: parse_json(meta[key], f"{source}'s edgemri metadata {key!r}", EdgeError, nonfinite=True,
                              max_chars=MAX_METADATA_CHARS)
              for key in ("class_names", "preprocessing", "temperature") if key in meta}
    class_names, preprocessing, temperature = check_metadata(parsed, source)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or list(inputs[0].shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
        found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise EdgeError(f"{source} takes {found}, not one input {INPUT_NAME} [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}]")
    if len(outputs) != 1 or outputs[0].name != OUTPUT_NAME or outputs[0].shape[1:] != [len(class_names)]:
        found = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise EdgeError(f"{source} gives {found}, but its {len(class_names)} class_names need one output "
                        f"{OUTPUT_NAME} [N, {len(class_names)}]")
    check_finite(((t.name, onnx.numpy_helper.to_array(t)) for t in proto.graph.initializer), source)

    def logits(batch: Tensor) -> Tensor:
        return torch.from_numpy(run_onnx(session, batch))

    probe(logits, class_names, source)
    return LoadedModel(path, "onnx", class_names, logits, preprocessing, temperature)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives that edgemri exported carry ``extra/edgemri.json``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip archive: a checkpoint loader will say what it is
        return False


def _torchscript_model(path: Path) -> LoadedModel:
    source = printable(str(path))
    module, meta = load_torchscript(path)
    class_names, preprocessing, temperature = check_metadata(meta, source)
    check_finite(module.state_dict().items(), source)
    probe(module, class_names, source)
    return LoadedModel(path, "torchscript", class_names, module, preprocessing, temperature)


def _executorch_model(path: Path) -> LoadedModel:
    source = printable(str(path))
    # The weights sit inside the XNNPACK delegate, out of reach: the probe's finite-logits check stands in.
    logits, meta = load_executorch(_read(path), source)
    class_names, preprocessing, temperature = check_metadata(meta, source)
    probe(logits, class_names, source)
    return LoadedModel(path, "executorch", class_names, logits, preprocessing, temperature)


def _checkpoint_model(path: Path) -> LoadedModel:
    source = printable(str(path))
    checkpoint = load_checkpoint(path)
    preprocessing = check_preprocessing(checkpoint.preprocessing, source)
    model = checked_model(checkpoint, source)
    return LoadedModel(path, "checkpoint", list(checkpoint.class_names), model, preprocessing,
                       check_temperature(checkpoint.temperature, source))


def model_kind(path: str | Path) -> ModelKind:
    """What ``load_model`` would load: by the ``.onnx`` or ``.pte`` suffix, TorchScript's metadata entry, else a
    checkpoint."""
    path = Path(path)
    try:
        if path.is_dir():
            raise EdgeError(f"model {printable(str(path))} is a folder; give the model file")
        if not path.is_file():
            raise EdgeError(f"model not found: {printable(str(path))}")
    except OSError as err:  # e.g. a name too long for the file system
        raise EdgeError(f"cannot read model {printable(str(path))}: {err.strerror or err}") from None
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".pte":
        return "executorch"
    return "torchscript" if _is_torchscript(path) else "checkpoint"


_LOADERS: dict[ModelKind, Callable[[Path], LoadedModel]] = {
    "onnx": _onnx_model, "executorch": _executorch_model, "torchscript": _torchscript_model,
    "checkpoint": _checkpoint_model,
}


def load_model(path: str | Path) -> LoadedModel:
    """An ``.onnx`` or ``.pte`` file, an edgemri TorchScript file, or a checkpoint (incl. a paper-layout state dict)."""
    return _LOADERS[model_kind(path)](Path(path))
