"""What every exported file promises, and the checks that keep the promise on both sides.

An exported model takes ``image``, float32 N x 3 x 128 x 128 already normalized, and gives
``logits``, float32 N x len(class_names), finite; it carries the class names, the
preprocessing: edgemri's, with the model's own per-channel mean and std (a personalized input
calibration folds into them, a norm-student's norms into its convs, so the file is always the
plain student), and the calibration temperature T: probabilities are softmax(logits / T), the
graph itself gives the raw logits. Export checks a checkpoint against this before writing anything, the
runtime checks a file against it before predicting anything: a model whose outputs do not
match its class names would otherwise print the wrong class, or crash mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgemri.core.data.images import HEAD_KEY, IMAGE_SIZE, PreprocessingError, normalize, parse_preprocessing
from edgemri.core.errors import printable, version
from edgemri.core.io import write_bytes
from edgemri.core.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from edgemri.core.training.checkpoint import check_temperature as check_checkpoint_temperature
from edgemri.core.training.shortcut import apply_head_step
from edgemri.edge.errors import EdgeError, first_line
from edgemri.models import build_model, fold_norms

MAX_METADATA_CHARS = 1_000_000  # an exported model's edgemri metadata is a few kB of JSON
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
METADATA_FILE = "edgemri.json"  # TorchScript extra file holding the same metadata as the ONNX file
INPUT_SHAPE = f"float32 N x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}"
PARITY_ATOL = 1e-4  # exported fp32 logits must match PyTorch's within this, times the largest logit
EXPORTABLE_MODELS = ("student", "norm-student")  # a norm-student is exported with its norms folded in


# ---------------------------------------------------------------- metadata


def check_preprocessing(preprocessing: object, source: str) -> dict[str, Any]:
    """The preprocessing to feed a model with: edgemri's, up to the model's own per-channel mean and std.

    Anything else (another size, resize or colour, a mean or std out of bounds) is refused.
    """
    try:
        return parse_preprocessing(preprocessing, source)
    except PreprocessingError as err:
        raise EdgeError(printable(str(err))) from None


def normalize_for(images: Tensor, preprocessing: Mapping[str, Any]) -> Tensor:
    """uint8 images as a model takes them (as ``check_preprocessing`` gives): its head step, if it has one, then
    normalized with its own mean and std."""
    images = apply_head_step(images, preprocessing.get(HEAD_KEY, "none"))
    return normalize(images, preprocessing["mean"], preprocessing["std"])


def check_class_names(class_names: object, source: str) -> list[str]:
    """A non-empty list of distinct, non-empty strings: what a prediction prints."""
    if (not isinstance(class_names, list | tuple) or not class_names
            or not all(isinstance(name, str) and name.strip() and name.isprintable() for name in class_names)
            or len(set(class_names)) != len(class_names)):
        raise EdgeError(f"{source} has class_names {printable(repr(class_names))[:200]}; "
                        f"expected a list of distinct, non-empty, printable names")
    return list(class_names)


def check_temperature(temperature: object, source: str) -> float:
    """The calibration temperature to divide logits by, bounded as in checkpoints (core.checkpoint)."""
    try:
        return check_checkpoint_temperature(temperature, source)
    except CheckpointError as err:
        raise EdgeError(printable(str(err))) from None


def check_metadata(meta: dict[str, Any], source: str) -> tuple[list[str], dict[str, Any], float]:
    """The class names, the preprocessing and the calibration temperature of a file's edgemri metadata, checked."""
    if "class_names" not in meta or "preprocessing" not in meta:
        raise EdgeError(f"{source} has no edgemri metadata (class_names, preprocessing); "
                        f"export it with `edgemri export CHECKPOINT`")
    preprocessing = check_preprocessing(meta["preprocessing"], source)
    # Files exported before calibration existed carry no temperature: their probabilities were plain softmax.
    temperature = check_temperature(meta.get("temperature", 1.0), source)
    return check_class_names(meta["class_names"], source), preprocessing, temperature


def edge_metadata(checkpoint: Checkpoint) -> dict[str, Any]:
    """What an exported file records: how to feed it, how to read it and where it came from."""
    source = f"the {checkpoint.role or 'given'} checkpoint"
    return {
        "class_names": list(checkpoint.class_names),
        "preprocessing": check_preprocessing(checkpoint.preprocessing, source),
        "temperature": check_temperature(checkpoint.temperature, source),
        "input": f"{INPUT_NAME}: {INPUT_SHAPE}, already normalized",
        "output": f"{OUTPUT_NAME}: float32 N x {len(checkpoint.class_names)}, before softmax; "
                  f"probabilities are softmax({OUTPUT_NAME} / temperature)",
        "source_model": checkpoint.model,
        "source_role": checkpoint.role,
        "source_seed": checkpoint.seed,
        "source_data_fingerprint": checkpoint.data_fingerprint,
        "source_created": checkpoint.created,
        "edgemri_version": version(),
    }


# ---------------------------------------------------------------- the model behind a file


def _finite(value: Tensor | np.ndarray) -> bool:
    if isinstance(value, Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    return not np.issubdtype(value.dtype, np.floating) or bool(np.isfinite(value).all())


def check_finite(tensors: Iterable[tuple[str, Tensor | np.ndarray]], source: str) -> None:
    """Refuse NaN or infinite weights: every prediction from them would be meaningless."""
    bad = [name for name, value in tensors if not _finite(value)]
    if bad:
        raise EdgeError(f"{source} has non-finite (NaN or infinite) weights in {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; retrain or re-export the model")


def example_batch(n: int = 4) -> Tensor:
    """Seeded random normalized images: the trace input, the parity check's and the probe's batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return normalize(images)


def check_logits(logits: Tensor, images: int, class_names: list[str], source: str) -> None:
    """Logits must be N x len(class_names) and finite."""
    expected = (images, len(class_names))
    if tuple(logits.shape) != expected:
        raise EdgeError(f"{source} gives outputs of shape {list(logits.shape)} for {images} images, but its "
                        f"{len(class_names)} class_names need {list(expected)}")
    if not bool(torch.isfinite(logits).all()):
        raise EdgeError(f"{source} gives non-finite (NaN or infinite) logits; retrain or re-export the model")


def probe(logits: Callable[[Tensor], Tensor], class_names: list[str], source: str) -> None:
    """Run the model once on the example batch, before any real image is predicted."""
    batch = example_batch(2)
    try:
        with torch.no_grad():
            output = logits(batch)
    # PyTorch, TorchScript and onnxruntime each raise their own exception types here.
    except Exception as err:
        raise EdgeError(f"{source} does not run on {INPUT_SHAPE} images: {first_line(err)}") from None
    check_logits(torch.as_tensor(output), len(batch), class_names, source)


def checked_model(checkpoint: Checkpoint, source: str) -> nn.Module:
    """The checkpoint's model in eval mode, refused unless it gives finite logits, one per class name.

    ``Checkpoint.build`` refuses unknown options and wrong or non-finite weights; the probe
    adds what only running the model shows (e.g. options that change the input size).
    """
    class_names = check_class_names(checkpoint.class_names, source)
    model = checkpoint.build()
    probe(model, class_names, source)
    return model


# ---------------------------------------------------------------- export


def check_exportable(checkpoint: Checkpoint, source: str) -> None:
    """Only the student goes to devices (a norm-student folded into one), with a preprocessing edgemri applies."""
    if checkpoint.model not in EXPORTABLE_MODELS:
        raise EdgeError(f"{source} holds a {checkpoint.model!r} model; only the student (or a norm-student, its "
                        f"norms folded into the convs) is exported for devices")
    check_preprocessing(checkpoint.preprocessing, source)


def load_student(path: str | Path) -> Checkpoint:
    """Read a checkpoint (ours or a paper-layout state dict) that can be exported."""
    checkpoint = load_checkpoint(path)
    check_exportable(checkpoint, printable(str(path)))
    return checkpoint


def student_model(checkpoint: Checkpoint) -> nn.Module:
    """The exportable student, checked against the contract before anything is written.

    A norm-student comes back as the plain student with its eval-mode norms folded into the convs,
    refused unless both give the same logits on the example batch.
    """
    source = f"the {checkpoint.role or 'given'} checkpoint"
    check_exportable(checkpoint, source)
    model = checked_model(checkpoint, source)
    if checkpoint.model == "student":
        return model
    try:
        folded = fold_norms(model.state_dict())
    except ValueError as err:
        raise EdgeError(f"{source}: {err}") from None
    student = build_model("student", **checkpoint.model_options)
    student.load_state_dict(folded, strict=True)
    student.eval()
    example = example_batch()
    with torch.no_grad():
        check_parity(model(example), student(example), "the folded norm-student's")
    return student


def check_parity(expected: Tensor, actual: np.ndarray | Tensor, what: str) -> None:
    """Refuse an export whose logits differ from PyTorch's beyond float32 rounding."""
    # Relative to the largest logit: random check images can give logits in the hundreds.
    tolerance = PARITY_ATOL * max(1.0, float(expected.abs().max()))
    diff = float((torch.as_tensor(actual) - expected).abs().max())
    if not diff <= tolerance:
        raise EdgeError(f"{what} logits differ from PyTorch's by {diff:.2e} (> {tolerance:.1e}); not written")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a folder, or an existing file unless asked to replace it; before any work is done."""
    if out.is_dir():
        raise EdgeError(f"output {printable(str(out))} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise EdgeError(f"{printable(str(out))} exists; choose another output or overwrite it (--overwrite)")


def write_output(out: Path, data: bytes) -> Path:
    """Write an exported file atomically; a full disk or a read-only folder is a one-line error."""
    try:
        return write_bytes(out, data)
    except OSError as err:
        raise EdgeError(f"cannot write {printable(str(out))}: {err.strerror or err}") from None
