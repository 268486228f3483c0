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
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

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

# The .pte headers, as ExecuTorch's docs lay them out (pte-file-format: "Headers") and its runtime reads them
# (schema/extended_header.cpp); every number little-endian.
HEAD_BYTES = 64  # the runtime reads this much first to find both headers, and refuses a shorter file
FILE_IDENTIFIER = re.compile(rb"ET[0-9]{2}")  # bytes 4-7: "ET" and two ASCII digits, the format's version
EXTENDED_HEADER = b"eh00"  # bytes 8-11 when the extended header is there: the version this runtime parses
EXTENDED_HEADER_FIELDS = struct.Struct("<IQQ")  # its length, the program data's size, the first segment's offset
EXTENDED_HEADER_MIN = 24  # magic, length, program size, segment offset: the runtime's minimum
SEGMENT_DATA_SIZE = struct.Struct("<Q")  # bytes 32-39 of a header of 32 bytes or more: the segments' total size
TRIAL_LOAD_TIMEOUT_S = 120  # the student loads in well under a second; a program that hangs is refused


def check_program_header(data: bytes, source: str) -> None:
    """Refuse a file whose headers are not an ExecuTorch program's, before the runtime reads a byte of it.

    Bytes 0-3 are the offset of the flatbuffer's root table, 4-7 the file identifier; an extended header
    (``eh00`` at byte 8) gives its own length, the size of the program data (headers included) and the offset
    of the first segment (0 when there are none), and from 32 bytes on the segments' total size. The runtime
    logs a wrong identifier through Python's ``sys.stderr`` as UTF-8, which four random bytes are not: that
    aborted the process (exit 134), so nothing but a plausible header reaches it.
    """
    def refuse(reason: str) -> NoReturn:
        raise EdgeError(f"{source} is not a loadable ExecuTorch program: {reason}")

    if len(data) < HEAD_BYTES:
        refuse(f"{len(data)} bytes, shorter than the {HEAD_BYTES}-byte head of every program")
    if not FILE_IDENTIFIER.fullmatch(data[4:8]):
        refuse(f"bytes 4-7 are {data[4:8]!r}, not the file identifier: \"ET\" and two digits")
    program_size, root_from = len(data), 8
    if data[8:12] == EXTENDED_HEADER:
        length, program_size, segments = EXTENDED_HEADER_FIELDS.unpack_from(data, 12)
        if length < EXTENDED_HEADER_MIN:
            refuse(f"its extended header says it is {length} bytes long, under the {EXTENDED_HEADER_MIN} it holds")
        root_from = 8 + length
        if not root_from <= program_size <= len(data):
            refuse(f"its extended header gives the program data {program_size:,} bytes; the file has {len(data):,}")
        segments_end = segments + (SEGMENT_DATA_SIZE.unpack_from(data, 32)[0] if length >= 32 else 0)
        if segments and not program_size <= segments <= segments_end <= len(data):
            refuse(f"its segments lie at bytes {segments:,}-{segments_end:,}, not between the program data's end "
                   f"({program_size:,}) and the file's ({len(data):,}); a truncated file?")
    root = int.from_bytes(data[:4], "little")
    if not root_from <= root < program_size:
        refuse(f"its root table offset {root:,} is not within the program data, bytes {root_from}-{program_size:,}")


def _open_program(runtime: ModuleType, data: bytes, source: str) -> tuple[Any, list[Any]]:
    """The loaded program, its input signature checked, ``forward`` loaded, and what its metadata method returns.

    The runtime verifies the flatbuffer's internal consistency first, which refuses truncated and damaged
    files; the outputs are checked by the caller's probe.
    """
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
    return program, program.load_method(METADATA_METHOD).execute([])


def _load_and_run(runtime: ModuleType, data: bytes, image: Tensor) -> None:
    """The forked child's work: what ``load_executorch`` does, and one ``forward`` on ``image``."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    for stream in (1, 2):  # the runtime's log and an abort's message: the parent reports in one line
        os.dup2(quiet, stream)
    program, _ = _open_program(runtime, data, "the program")
    program.load_method("forward").execute([image])


def _check_survives_loading(runtime: ModuleType, data: bytes, source: str) -> None:
    """Load and run the program once in a forked child, so that a file that aborts or crashes the runtime
    ends the child, not this process, and becomes one error line.

    The header check cannot see the body, and the runtime's verification checks the flatbuffer's structure,
    not its strings: a backend name that is not UTF-8 passes it and aborts the process when the runtime logs
    the name. Forked, not started afresh: the child has the runtime imported already (about 0.1 s, where a
    new interpreter would spend seconds importing executorch again), and it calls the runtime only, never a torch
    operator, whose thread pool does not survive a fork (the child would hang).
    """
    image = example_batch(1)  # made here, for the same reason
    child = multiprocessing.get_context("fork").Process(target=_load_and_run, args=(runtime, data, image))
    child.start()
    try:
        child.join(TRIAL_LOAD_TIMEOUT_S)
        finished = child.exitcode is not None
    finally:  # timed out, or this process was interrupted while it waited
        if child.is_alive():
            child.kill()
            child.join()
    if not finished:
        raise EdgeError(f"{source} did not load within {TRIAL_LOAD_TIMEOUT_S} s; not a usable ExecuTorch program")
    if child.exitcode < 0:  # a signal ended it; an exception exits 1, and the load below reports it
        how = signal.strsignal(-child.exitcode) or f"signal {-child.exitcode}"
        raise EdgeError(f"{source} is not a loadable ExecuTorch program: it crashed the ExecuTorch runtime "
                        f"({how}) in a trial load")


def load_executorch(data: bytes, source: str) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """Logits for a normalized (N, 3, 128, 128) batch, one image per call, and the program's edgemri
    metadata (unchecked: see edge/runtime.py).

    The headers are checked first, then the program is loaded and run once in a child process
    (``_check_survives_loading``), then here. The runtime's log (its cause of a failure, XNNPACK's start-up
    lines) is kept off stderr: a failure's last line joins the one error line.
    """
    check_program_header(data, source)
    runtime = require_executorch("executorch.runtime")
    _check_survives_loading(runtime, data, source)
    log = io.StringIO()
    try:
        with redirect_stderr(log):
            program, values = _open_program(runtime, data, source)
    except EdgeError:
        raise
    except Exception as err:  # the runtime raises RuntimeError with an error code, and logs the cause
        cause = log.getvalue().strip().splitlines()[-1:]
        raise EdgeError(f"{source} is not a loadable ExecuTorch program: {first_line(err)}"
                        f"{''.join(f' ({line})' for line in cause)}") from None
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
