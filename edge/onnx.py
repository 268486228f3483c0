"""The student as an fp32 ONNX model: export, metadata, and the parity check against PyTorch.

The file takes the image exactly as training sees it after ``normalize`` (input "image",
output "logits", dynamic batch by default) and carries the class names, the preprocessing (with the
model's own mean and std) and where the weights came from, so a device needs nothing but
the file. onnx and onnxruntime are
optional (``pip install 'edgemri[edge]'``).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from edgemri.core.errors import version
from edgemri.core.training.checkpoint import Checkpoint
from edgemri.edge.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_output,
    check_parity,
    edge_metadata,
    example_batch,
    student_model,
    write_output,
)
from edgemri.edge.errors import EdgeError, require_onnx
from edgemri.edge.runtime import onnx_session, run_onnx

ONNX_OPSET = 17
MAX_STATIC_BATCH = 256  # the largest batch the latency benchmark sweeps; the parity check runs one such batch


def with_metadata(model_bytes: bytes, metadata: dict[str, Any], doc: str) -> bytes:
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


def onnx_bytes(checkpoint: Checkpoint, *, static_batch: int | None = None) -> bytes:
    """The student as an fp32 ONNX model with its metadata, checked against PyTorch.

    The batch dimension is dynamic unless ``static_batch`` fixes it (static shapes, which
    some runtimes plan memory and kernels for; benchmarks/latency.py measures them).
    """
    if static_batch is not None and not (
            isinstance(static_batch, int) and not isinstance(static_batch, bool)
            and 1 <= static_batch <= MAX_STATIC_BATCH):
        raise EdgeError(f"static batch is {static_batch!r}; allowed: None (dynamic) or an integer "
                        f"from 1 to {MAX_STATIC_BATCH}")
    require_onnx()
    model = student_model(checkpoint)
    dynamic = static_batch is None
    example = example_batch() if dynamic else example_batch(static_batch)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The torch.export-based exporter needs onnxscript, which the edge extra does not
        # install; the TorchScript-based one handles this plain CNN exactly (parity below)
        # and warns only that it is deprecated, which is ours to know, not the user's.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example[:1] if dynamic else example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None,
        )
    doc = "edgemri student, fp32" + ("" if dynamic else f", static batch {static_batch}")
    exported = with_metadata(buffer.getvalue(), edge_metadata(checkpoint), doc)
    with torch.no_grad():
        check_parity(model(example), run_onnx(onnx_session(exported), example), "ONNX")
    return exported


def export_onnx(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the fp32 ONNX model to ``out`` atomically."""
    out = Path(out)
    check_output(out, overwrite)
    return write_output(out, onnx_bytes(checkpoint))
