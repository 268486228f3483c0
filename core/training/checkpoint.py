"""The one checkpoint format: models, training-loop resume states, server and client states.

Every file this project saves with tensors in it is a ``Checkpoint`` written by
``save_checkpoint`` and read by ``load_checkpoint`` (one place to trust). ``kind`` says what it
holds: "model" (a usable model), "training" (the training loop's resume state), "server" (the
federation server's state) or "client" (a client's state). Files are read with
``torch.load(weights_only=True)``, so a crafted file can hold tensors, numbers, strings, lists
and dicts but never run code, and then validated field by field: registered model, known
options, exact state-dict keys and shapes, finite values, bounded size, a preprocessing
edgemri can apply (its own, up to a per-channel mean and std: ``core.data.images.parse_preprocessing``)
and a calibration temperature in bounds (``check_temperature``).
Model files of the previous format ("edgemri.checkpoint/1") and bare state dicts in the paper's
student layout load too, as kind "model".
"""

from __future__ import annotations

import datetime as dt
import inspect
import pickle
import types
import typing
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgemri.core.data.images import CLASS_NAMES, PREPROCESSING, PreprocessingError, parse_preprocessing
from edgemri.core.errors import EdgemriError, version
from edgemri.core.io import save_torch
from edgemri.models import MODEL_NAMES, Student, build_model, model_spec

FORMAT = "edgemri.checkpoint/2"
LEGACY_FORMAT = "edgemri.checkpoint/1"  # model files of earlier versions: read, never written
KINDS = ("model", "training", "server", "client")
# (what a file of this kind is, what a caller asked for): "X is a training-state checkpoint, not a model".
_NOUNS = {
    "model": ("model checkpoint", "a model"),
    "training": ("training-state checkpoint", "a training state"),
    "server": ("server-state checkpoint", "a server state"),
    "client": ("client-state checkpoint", "a client state"),
}
# Kinds whose state_dict is the whole model; a server's or client's may hold part of it (shared keys, a head).
_FULL_STATE_KINDS = ("model", "training")
MAX_BYTES = 1 << 30  # file size and total tensor size: far above any model here, far below a machine's memory
MAX_DEPTH = 32  # nesting of dicts and lists
_V1_FIELDS = frozenset({"model", "state_dict", "model_options", "class_names", "preprocessing", "config", "seed",
                        "metrics", "data_fingerprint", "role", "created", "edgemri_version"})
# Temperature scaling (Guo et al. 2017) divides the logits by T: outside these bounds the probabilities are
# one-hot or uniform to float precision, so such a value is a fitting bug or a crafted file, not a calibration.
MIN_CALIBRATION_TEMPERATURE = 0.05
MAX_CALIBRATION_TEMPERATURE = 20.0


class CheckpointError(EdgemriError):
    """A checkpoint file is missing, unreadable, malformed or not what the caller needs."""


@dataclass
class Checkpoint:
    model: str  # a name in edgemri.models' registry
    state_dict: dict[str, Tensor]
    kind: str = "model"  # one of KINDS
    model_options: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(PREPROCESSING))
    # The calibration temperature: probabilities are softmax(logits / temperature); 1.0 = uncalibrated.
    # Files written before it existed load as 1.0.
    temperature: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)  # the settings that made it (resume compares them)
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    role: str = ""  # e.g. "teacher", "baseline", "kd", "personalized"
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    edgemri_version: str = field(default_factory=version)
    optimizer: dict[str, Any] | None = None  # torch optimizer state dict (kind "training")
    step: int = 0  # completed epochs (training) or rounds (server)
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # plain data and tensors the kind needs besides these

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode; a mismatch is a CheckpointError."""
        where = f"the {self.role or self.model} checkpoint"
        model = _architecture(self.model, self.model_options, where)
        model.load_state_dict(check_state_dict(model, self.state_dict, where), strict=True)
        return model.eval()


def check_temperature(value: object, where: str) -> float:
    """``value`` as a float if it is a calibration temperature edgemri applies, else a one-line CheckpointError.

    Allowed: a finite number in [MIN_CALIBRATION_TEMPERATURE, MAX_CALIBRATION_TEMPERATURE].
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)  # True is an int to Python only
    if not (number and MIN_CALIBRATION_TEMPERATURE <= value <= MAX_CALIBRATION_TEMPERATURE):  # NaN fails too
        raise CheckpointError(f"{where}: calibration temperature is {repr(value)[:60]}; allowed: a finite number "
                              f"in [{MIN_CALIBRATION_TEMPERATURE}, {MAX_CALIBRATION_TEMPERATURE}]")
    return float(value)


def calibrated_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Class probabilities over the last axis with temperature scaling: softmax(logits / temperature)."""
    return torch.softmax(logits / temperature, dim=-1)


def check_state_dict(model: nn.Module | Mapping[str, Tensor], state: Any, where: str,
                     *, partial: bool = False) -> dict[str, Tensor]:
    """``state`` if it fits ``model`` (a module or its state dict): same keys, shapes, dtype kind, finite.

    ``partial=True`` allows a subset of the keys (a client's shared keys or personal head).
    Use it on every state dict that comes from a file or another party before loading it.
    """
    reference = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: the state dict is a {type(state).__name__}, not a mapping of names to tensors")
    unexpected = [key for key in state if key not in reference]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected state-dict key {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected); expected keys such as {next(iter(reference))!r}")
    missing = [key for key in reference if key not in state]
    if missing and not partial:
        raise CheckpointError(f"{where}: state dict lacks {missing[0]!r} ({len(missing)} keys missing)")
    for key, value in state.items():
        expected = reference[key]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{where}: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise CheckpointError(f"{where}: state-dict entry {key!r} is a {value.layout} tensor; only dense ones load")
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(f"{where}: state-dict entry {key!r} has shape {tuple(value.shape)}, "
                                  f"the model needs {tuple(expected.shape)}")
        if value.is_floating_point() != expected.is_floating_point():
            raise CheckpointError(f"{where}: state-dict entry {key!r} has dtype {value.dtype}, "
                                  f"the model needs {expected.dtype}")
    _check_finite(state, where)
    return dict(state)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Validate, then write atomically: nothing malformed or non-finite is ever saved."""
    path = Path(path)
    _validate(checkpoint, str(path))
    return save_torch(path, {"format": FORMAT, **_fields(checkpoint)})


def load_checkpoint(path: str | Path, kind: str | None = "model") -> Checkpoint:
    """Read and validate a checkpoint of ``kind`` (None: any kind); every problem is a one-line CheckpointError."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")  # a caller's bug
    path = Path(path)
    checkpoint = _parse(_read(path), path)
    _check_kind(checkpoint, str(path))
    if kind is not None and checkpoint.kind != kind:
        raise CheckpointError(f"{path} is a {_NOUNS[checkpoint.kind][0]}, not {_NOUNS[kind][1]}")
    _validate(checkpoint, str(path))
    return checkpoint


# -- reading -------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    if size > MAX_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes; checkpoints are at most {MAX_BYTES:,} bytes")
    try:
        _check_stored(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes means the same to the user
        lines = [line for line in str(err).splitlines() if line.strip()]
        if isinstance(err, pickle.UnpicklingError) and len(lines) >= 2:
            # torch's weights-only refusal: the useful line is the one before its closing advice.
            reason = f"only tensors, numbers, strings, lists and dicts are loaded, nothing run: {lines[-2].strip()}"
        else:
            reason = f"{err.__class__.__name__}: {lines[0] if lines else ''}"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason[:300]})") from None


def _check_stored(path: Path) -> None:
    """torch.save never compresses: a compressed entry could inflate far beyond the file-size bound."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format or garbage: torch.load refuses it, and its size is the file's
    with zipfile.ZipFile(path) as archive:
        packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"{path} holds compressed entries ({packed[0]}); torch.save writes none, "
                              f"so this file was not written by edgemri")


def _parse(obj: Any, path: Path) -> Checkpoint:
    """The Checkpoint a loaded object describes; field types checked, semantics left to ``_validate``."""
    if _is_paper_state_dict(obj):
        return Checkpoint(model="student", state_dict=dict(obj), role="paper-layout state dict")
    if not (isinstance(obj, dict) and obj.get("format") in (FORMAT, LEGACY_FORMAT)):
        found = sorted(map(str, obj))[:4] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is neither an {FORMAT} checkpoint nor a state dict in the paper's "
                              f"student layout (found {found})")
    _check_depth(obj, str(path))
    values = {k: v for k, v in obj.items() if k != "format"}
    allowed = {f.name for f in fields(Checkpoint)} if obj["format"] == FORMAT else _V1_FIELDS
    unknown = sorted(map(str, set(values) - allowed))
    if unknown:
        raise CheckpointError(f"{path}: unknown checkpoint field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    for name in ("model", "state_dict"):
        if name not in values:
            raise CheckpointError(f"{path}: malformed {obj['format']} checkpoint: no {name!r} field")
    hints = typing.get_type_hints(Checkpoint)
    for name, value in values.items():
        mismatch = _mismatch(value, hints[name], name)
        if mismatch:
            raise CheckpointError(f"{path}: checkpoint field {mismatch}")
    return Checkpoint(**values)


def _is_paper_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == set(Student().state_dict())


def _mismatch(value: Any, hint: Any, name: str) -> str | None:
    """Where loaded data first departs from a field's type hint ("state_dict['x'] holds a list, ..."), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and isinstance(value, list):
        return next((m for i, v in enumerate(value) if (m := _mismatch(v, args[0], f"{name}[{i}]"))), None)
    if origin is dict and isinstance(value, dict):
        return next((m for k, v in value.items()
                     if (m := _mismatch(k, args[0], f"a key of {name}") or _mismatch(v, args[1], f"{name}[{k!r}]"))),
                    None)
    if origin in (typing.Union, types.UnionType):
        fits = any(_mismatch(value, arg, name) is None for arg in args)
    elif hint in (int, float):  # bool is an int to Python, never to a checkpoint
        fits = isinstance(value, int | float if hint is float else int) and not isinstance(value, bool)
    else:
        fits = hint is Any or (value is None if hint is type(None) else isinstance(value, origin or hint))
    return None if fits else f"{name} holds a {type(value).__name__}, expected {_hint_name(hint)}"


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("torch.", "")


def _check_depth(obj: Any, where: str) -> None:
    """Refuse absurd nesting before anything walks it recursively (dataclass repr, equality, asdict)."""
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: data nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


# -- validation ----------------------------------------------------------------


def _fields(checkpoint: Checkpoint) -> dict[str, Any]:
    """The fields by name, without dataclasses.asdict's deep copy of every tensor."""
    return {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside dicts, lists and tuples, with a dotted path naming it."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{index}]")


def _check_finite(obj: Any, where: str) -> None:
    for name, tensor in _tensors(obj):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where} holds non-finite weights (NaN or Inf in {name!r}); "
                                  f"it cannot be used: retrain it or use another checkpoint")


def _architecture(name: str, options: dict[str, Any], where: str) -> nn.Module:
    """The registered model's architecture with ``options``, or a CheckpointError naming the bad option.

    A checkpoint carries all its weights, so pretrained starting weights are never fetched for it.
    """
    if name not in MODEL_NAMES:
        raise CheckpointError(f"{where} holds an unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    spec = model_spec(name)
    accepted = list(inspect.signature(spec.builder).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CheckpointError(f"{where}: model option {unknown[0]!r} is unknown to {name!r}; "
                              f"allowed options: {', '.join(accepted) or 'none'}")
    if spec.pretrained:
        options = {**options, "pretrained": False}
    try:
        return build_model(name, **options)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build {name!r} with options {options}: {err}") from None


def _outputs(model: nn.Module) -> int | None:
    """Classes the model predicts: its last Linear layer's outputs (every registered model ends in one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _check_kind(checkpoint: Checkpoint, where: str) -> None:
    if checkpoint.kind not in KINDS:
        raise CheckpointError(f"{where}: unknown checkpoint kind {checkpoint.kind!r}; allowed: {', '.join(KINDS)}")


def _validate(checkpoint: Checkpoint, where: str) -> None:
    """Everything a checkpoint must satisfy before it is saved or returned by ``load_checkpoint``."""
    _check_kind(checkpoint, where)
    total = sum(t.numel() * t.element_size() for _, t in _tensors(_fields(checkpoint)))
    if total > MAX_BYTES:  # checked before any tensor is read: a tiny file can describe huge strided views
        raise CheckpointError(f"{where}: tensors total {total:,} bytes; checkpoints hold at most {MAX_BYTES:,}")
    if checkpoint.step < 0:
        raise CheckpointError(f"{where}: step is {checkpoint.step}; allowed: an integer >= 0")
    check_temperature(checkpoint.temperature, where)
    try:  # edgemri's preprocessing, up to the model's own per-channel mean and std (a folded calibration)
        parse_preprocessing(checkpoint.preprocessing, where)
    except PreprocessingError as err:
        raise CheckpointError(str(err)) from None
    with torch.device("meta"):  # shapes only: no memory, no initialization
        model = _architecture(checkpoint.model, checkpoint.model_options, where)
    check_state_dict(model, checkpoint.state_dict, where, partial=checkpoint.kind not in _FULL_STATE_KINDS)
    outputs = _outputs(model)
    if outputs is not None and len(checkpoint.class_names) != outputs:
        raise CheckpointError(f"{where}: {len(checkpoint.class_names)} class names {checkpoint.class_names} "
                              f"for a model with {outputs} outputs")
    _check_finite({k: v for k, v in _fields(checkpoint).items() if k != "state_dict"}, where)
