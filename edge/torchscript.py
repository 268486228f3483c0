"""The student as TorchScript (``torch.jit.trace``), its metadata in the ``edgemri.json`` extra file.

TorchScript needs only torch on the device. A TorchScript file is code: ``torch.jit.load``
runs what the file contains, so load only files you exported yourself (docs/EDGE.md);
edgemri prefers ONNX, which is data.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edgemri.core.errors import printable
from edgemri.core.training.checkpoint import Checkpoint
from edgemri.core.untrusted import parse_json
from edgemri.edge.contract import (
    MAX_METADATA_CHARS,
    METADATA_FILE,
    check_output,
    check_parity,
    edge_metadata,
    example_batch,
    student_model,
    write_output,
)
from edgemri.edge.errors import EdgeError, first_line

CODE_NOTICE = "a TorchScript file is code that torch.jit.load runs: load only TorchScript files you exported yourself"


@contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    """torch 2.14 marks torch.jit deprecated (FutureWarning); the format is still asked for
    and loads wherever TorchScript runs, so users need not see it (docs/EDGE.md prefers ONNX)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def torchscript_bytes(checkpoint: Checkpoint) -> bytes:
    """The student traced to TorchScript, metadata in the ``edgemri.json`` extra file."""
    model = student_model(checkpoint)
    example = example_batch()
    buffer = io.BytesIO()
    with torch.no_grad(), _jit_deprecation_silenced():
        traced = torch.jit.trace(model, example[:1])
        check_parity(model(example), traced(example), "TorchScript")
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(edge_metadata(checkpoint))})
    return buffer.getvalue()


def export_torchscript(checkpoint: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the TorchScript model to ``out`` atomically."""
    out = Path(out)
    check_output(out, overwrite)
    return write_output(out, torchscript_bytes(checkpoint))


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported TorchScript model in eval mode and its edgemri metadata (unchecked: see edge/runtime.py)."""
    source = printable(str(path))
    files = {METADATA_FILE: ""}
    try:
        with _jit_deprecation_silenced():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    # torch.jit.load raises RuntimeError, torch.jit.Error or OSError for damaged or foreign files.
    except Exception as err:
        raise EdgeError(f"{source} is not a loadable TorchScript file: {first_line(err)}") from None
    meta = parse_json(files[METADATA_FILE], f"{source}'s edgemri metadata", EdgeError, nonfinite=True,
                      max_chars=MAX_METADATA_CHARS) if files[METADATA_FILE] else None
    if not isinstance(meta, dict):
        raise EdgeError(f"{source} has no readable edgemri metadata ({METADATA_FILE}); "
                        f"export it with `edgemri export CHECKPOINT --format torchscript`")
    return module.eval(), meta
