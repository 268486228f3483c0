"""The student as an ExecuTorch program (``.pte``): ``torch.export``, lowered to the XNNPACK backend.

The program's ``forward`` takes one image, float32 1 x 3 x 128 x 128 already normalized, and gives its
logits, 1 x len(class_names); a static shape lets XNNPACK run the whole graph as one delegate (a dynamic
batch axis split it in two around the flatten and bounded the batch at 15 images). The edgemri metadata
(the same keys as the ONNX file's) is inside the program: a second method, ``edgemri_metadata``, takes
nothing and returns them as one JSON string, so the file travels alone and a device reads it with the
same runtime call it predicts with. ``executorch`` is optional (``pip install 'edgemri[edge]'``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from edgemri.core.data.images import IMAGE_SIZE
from edgemri.core.training.checkpoint import Checkpoint
from edgemri.core.untrusted import parse_json
from edgemri.edge.contract import (
    INPUT_NAME,
    MAX_METADATA_CHARS,
    check_output,
    check_parity,
    edge_metadata,
    example_batch,
    student_model,
    write_output,
)
from edgemri.edge.errors import INSTALL_HINT, EdgeDependencyError, EdgeError, first_line

METADATA_METHOD = "edgemri_metadata"
PROGRAM_INPUT = [1, 3, IMAGE_SIZE, IMAGE_SIZE]  # one image per call
PROGRAM_INPUT_TEXT = f"{INPUT_NAME}: float32 1 x 3 x {IMAGE_SIZE} x {IMAGE_SIZE} (one image a call), already normalized"
FLOAT32 = 6  # ExecuTorch's ScalarType code for float32 (TensorInfo.dtype)


@contextmanager
def _pytree_notice_silenced() -> Iterator[None]:
    """torchao, which executorch imports, registers an Enum with torch's pytree, and torch 2.14 logs a
    deprecation warning for it on every import: torchao's to fix, not something a user can act on."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def require_executorch(module: str) -> ModuleType:
    """Import an executorch module, or raise EdgeDependencyError naming the install command."""
    try:
        with _pytree_notice_silenced():
            return importlib.import_module(module)
    except ImportError as err:
        raise EdgeDependencyError(f"ExecuTorch export and .pte models need the executorch package "
                                  f"({err.name or err} is missing): {INSTALL_HINT}") from None


# ---------------------------------------------------------------- export


def lower(model: nn.Module, metadata: dict[str, Any]) -> bytes:
    """``model`` as an ExecuTorch program for one image, on XNNPACK, with ``metadata`` as its JSON method."""
    exir = require_executorch("executorch.exir")
    xnnpack = require_executorch("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    with torch.no_grad():
        exported = torch.export.export(model, (example_batch(PROGRAM_INPUT[0]),))
    lowered = exir.to_edge_transform_and_lower(exported, partitioner=[xnnpack.XnnpackPartitioner()],
                                               constant_methods={METADATA_METHOD: json.dumps(metadata)})
    return lowered.to_executorch().buffer


def executorch_bytes(checkpoint: Checkpoint) -> bytes:
    """The student as an ExecuTorch program with its metadata, checked against PyTorch."""
    model = student_model(checkpoint)
    program = lower(model, {**edge_metadata(checkpoint), "input": PROGRAM_INPUT_TEXT})
    logits, _ = load_executorch(program, "the ExecuTorch export")
    example = example_batch()
    with torch.no_grad():
        check_parity(model(example), logits(example), "ExecuTorch")
    return program


def export_executorch(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the ExecuTorch program to ``out`` atomically."""
    out = Path(out)
    check_output(out, overwrite)
    return write_output(out, executorch_bytes(checkpoint))


# ---------------------------------------------------------------- load


def load_executorch(data: bytes, source: str) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """Logits for a normalized (N, 3, 128, 128) batch, one image per call, and the program's edgemri
    metadata (unchecked: see edge/runtime.py).

    The runtime verifies the flatbuffer's internal consistency first, which refuses truncated and damaged
    files (crafted ones have been reported to crash it all the same: docs/EDGE.md); the input signature is
    checked here, the outputs by the caller's probe.
    """
    runtime = require_executorch("executorch.runtime")
    try:
        program = runtime.Runtime.get().load_program(data, verification=runtime.Verification.InternalConsistency)
        missing = {"forward", METADATA_METHOD} - program.method_names
        if missing:
            raise EdgeError(f"{source} has no {' or '.join(sorted(missing))} method; export it with "
                            f"`edgemri export CHECKPOINT --format executorch`")
        signature = program.metadata("forward")
        inputs = [signature.input_tensor_meta(i) for i in range(signature.num_inputs())]
        if len(inputs) != 1 or list(inputs[0].sizes()) != PROGRAM_INPUT or inputs[0].dtype() != FLOAT32:
            found = ", ".join(f"{list(i.sizes())} (dtype {i.dtype()})" for i in inputs) or "nothing"
            raise EdgeError(f"{source} takes {found}, not one float32 image {PROGRAM_INPUT}")
        if signature.num_outputs() != 1:
            raise EdgeError(f"{source} gives {signature.num_outputs()} outputs, not one logits tensor")
        program.load_method("forward")  # now, so that a backend that cannot initialize is a load error
        values = program.load_method(METADATA_METHOD).execute([])
    except EdgeError:
        raise
    except Exception as err:  # the runtime raises RuntimeError with an error code, and logs the cause on stderr
        raise EdgeError(f"{source} is not a loadable ExecuTorch program: {first_line(err)}") from None
    meta = parse_json(values[0], f"{source}'s edgemri metadata", EdgeError, nonfinite=True,
                      max_chars=MAX_METADATA_CHARS) if len(values) == 1 and isinstance(values[0], str) else None
    if not isinstance(meta, dict):
        raise EdgeError(f"{source} has no readable edgemri metadata ({METADATA_METHOD}); "
                        f"export it with `edgemri export CHECKPOINT --format executorch`")

    def logits(batch: Tensor) -> Tensor:
        # Through the program, which caches the loaded method: the program owns the buffer the method runs from.
        forward = program.load_method("forward")
        return torch.cat([forward.execute([image])[0] for image in batch.float().contiguous().split(1)])

    return logits, meta
