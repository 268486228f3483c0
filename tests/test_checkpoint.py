"""The one checkpoint format: every kind round-trips, and no crafted file runs code or gives a traceback."""

from __future__ import annotations

import io
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgemri.core.errors import EdgemriError
from edgemri.core.io import ArtefactError, load_npz, owner_gone, owner_lock, save_npz
from edgemri.core.training.checkpoint import (
    FORMAT,
    KINDS,
    LEGACY_FORMAT,
    Checkpoint,
    CheckpointError,
    calibrated_probabilities,
    check_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from edgemri.models import Student, build_model


def _fields(**changes: Any) -> dict[str, Any]:
    """A valid checkpoint's stored fields, with ``changes``."""
    stored = {"format": FORMAT, **vars(Checkpoint(model="student", state_dict=Student().state_dict()))}
    return {**stored, **changes}


def _write(path: Path, obj: Any) -> Path:
    """Saved with torch.save directly: what a careless or hostile tool could put on disk."""
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_and_other_kinds_are_refused(tmp_path: Path, kind: str) -> None:
    state = Student().state_dict()
    partial = kind in ("server", "client")
    checkpoint = Checkpoint(
        model="student", state_dict={} if kind == "client" else state, kind=kind, step=3, best_metric=0.5,
        history=[{"epoch": 1, "loss": 0.7}], config={"spec": {"epochs": 3}}, seed=1,
        optimizer={"state": {}, "param_groups": []} if kind == "training" else None,
        extra={"start": state, "retired": {"phone-1": "budget-exhausted"}, "counters": [1, 2]} if partial else {},
    )
    path = save_checkpoint(tmp_path / f"{kind}.pt", checkpoint)
    loaded = load_checkpoint(path, kind=kind)
    assert (loaded.kind, loaded.step, loaded.history, loaded.extra.keys()) == (
        kind, 3, [{"epoch": 1, "loss": 0.7}], checkpoint.extra.keys())
    assert load_checkpoint(path, kind=None).kind == kind
    other = next(k for k in KINDS if k != kind)
    noun = {"model": "model checkpoint", "training": "training-state checkpoint",
            "server": "server-state checkpoint", "client": "client-state checkpoint"}[kind]
    with pytest.raises(CheckpointError, match=f"{path.name} is a {noun}, not a"):
        load_checkpoint(path, kind=other)


def test_a_training_state_is_not_a_model(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "s.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                         kind="training"))
    with pytest.raises(CheckpointError, match=r"s\.pt is a training-state checkpoint, not a model$"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle, refused anyway
@pytest.mark.parametrize("layout", ["torch.save", "raw pickle"])
def test_a_crafted_pickle_is_never_executed(tmp_path: Path, layout: str) -> None:
    marker, path = tmp_path / "executed", tmp_path / "student.pt"
    payload = _fields(metrics={"x": _Payload(marker)})
    if layout == "torch.save":
        _write(path, payload)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint .*nothing run"):
        load_checkpoint(path, kind=None)
    assert not marker.exists()


def test_old_model_files_and_paper_state_dicts_still_load(tmp_path: Path) -> None:
    state = Student().state_dict()
    legacy = {"format": LEGACY_FORMAT, "model": "student", "state_dict": state, "model_options": {},
              "role": "kd", "seed": 3}
    loaded = load_checkpoint(_write(tmp_path / "v1.pt", legacy))
    assert (loaded.kind, loaded.role, loaded.seed, loaded.temperature) == ("model", "kd", 3, 1.0)
    paper = load_checkpoint(_write(tmp_path / "paper.pt", dict(state)))
    assert paper.model == "student" and torch.equal(paper.build().classifier[1].bias, state["classifier.1.bias"])
    assert paper.temperature == 1.0
    before_calibration = {k: v for k, v in _fields().items() if k != "temperature"}  # /2 before the field existed
    assert load_checkpoint(_write(tmp_path / "v2-uncalibrated.pt", before_calibration)).temperature == 1.0
    with pytest.raises(CheckpointError, match="unknown checkpoint field 'kind'"):  # /1 had no kinds
        load_checkpoint(_write(tmp_path / "v1-kind.pt", {**legacy, "kind": "training"}))


def _bad_shape() -> dict[str, torch.Tensor]:
    state = Student().state_dict()
    state["classifier.1.weight"] = torch.zeros(4, 3)  # broadcasts nowhere, loads nowhere
    return state


def _nan() -> dict[str, torch.Tensor]:
    state = Student().state_dict()
    state["conv_block_2.0.bias"][1] = float("nan")
    return state


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mystery": 1}, "unknown checkpoint field 'mystery'"),
        ({"seed": "zero"}, r"field seed holds a str, expected int \| None"),
        ({"class_names": "glioma"}, "field class_names holds a str"),
        ({"model": "resnet18"}, "unknown model 'resnet18'; known models: student, vgg16-slim, vgg16-imagenet"),
        ({"model_options": {"depth": 3}}, "model option 'depth' is unknown to 'student'; allowed options: "
                                          "num_classes, image_size"),
        ({"model_options": {"num_classes": -1}}, r"num_classes must be an integer in \[2, 1000\], got -1"),
        ({"model_options": {"image_size": -128}}, r"image_size must be an integer in \[16, 1024\], got -128"),
        ({"model_options": {"image_size": 10**9}}, r"image_size must be an integer in \[16, 1024\]"),
        ({"model_options": {"image_size": True}}, r"image_size must be an integer"),
        ({"kind": "optimizer"}, "unknown checkpoint kind 'optimizer'; allowed: model, training, server, client"),
        ({"state_dict": _bad_shape()},
         r"'classifier.1.weight' has shape \(4, 3\), the model needs \(4, 3072\)"),
        ({"state_dict": {k: v for k, v in Student().state_dict().items() if k != "classifier.1.bias"}},
         "state dict lacks 'classifier.1.bias'"),
        ({"state_dict": {**Student().state_dict(), "extra.weight": torch.zeros(1)}},
         "unexpected state-dict key 'extra.weight'"),
        ({"state_dict": {**Student().state_dict(), "classifier.1.bias": [0.0] * 4}},
         r"field state_dict\['classifier.1.bias'\] holds a list, expected Tensor"),
        ({"state_dict": _nan()}, r"holds non-finite weights \(NaN or Inf in 'conv_block_2.0.bias'\)"),
        ({"extra": {"best_state": {"w": torch.tensor([float("inf")])}}}, "holds non-finite weights"),
        ({"class_names": ["glioma", "notumor"]}, "2 class names .* for a model with 4 outputs"),
        ({"step": -1}, "step is -1"),
        ({"temperature": 0.0}, r"calibration temperature is 0.0; allowed: a finite number in \[0.05, 20.0\]"),
        ({"temperature": -1}, "calibration temperature is -1; allowed"),
        ({"temperature": float("nan")}, "calibration temperature is nan; allowed"),
        ({"temperature": 1e6}, "calibration temperature is 1000000.0; allowed"),
        ({"temperature": "2.0"}, "field temperature holds a str, expected float"),
        ({"temperature": True}, "field temperature holds a bool, expected float"),
        ({"metrics": {"deep": _nested(40)}}, "nested deeper than 32 levels"),
    ],
)
def test_malformed_checkpoints_are_one_line_errors_naming_the_file(tmp_path: Path, changes: dict,
                                                                   message: str) -> None:
    path = _write(tmp_path / "bad.pt", _fields(**changes))
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path, kind=None)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_tiny_file_describing_huge_tensors_is_refused_before_reading_them(tmp_path: Path) -> None:
    huge = torch.zeros(1).as_strided((2_000_000_000,), (0,))  # 8 GB as a view of one float
    path = _write(tmp_path / "huge.pt", _fields(extra={"views": huge}))
    assert path.stat().st_size < 100_000  # the student's weights and one float
    with pytest.raises(CheckpointError, match="tensors total 8,000,0[0-9,]+ bytes; checkpoints hold at most"):
        load_checkpoint(path)


def test_compressed_archives_are_refused(tmp_path: Path) -> None:
    plain = _write(tmp_path / "plain.pt", _fields())
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert torch.load(packed, weights_only=True)["model"] == "student"  # torch itself would inflate it
    with pytest.raises(CheckpointError, match="compressed entries"):
        load_checkpoint(packed)


def test_nothing_non_finite_or_mismatched_is_saved(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save_checkpoint(tmp_path / "nan.pt", Checkpoint(model="student", state_dict=_nan()))
    with pytest.raises(CheckpointError, match="has shape"):
        save_checkpoint(tmp_path / "shape.pt", Checkpoint(model="student", state_dict=_bad_shape()))
    for temperature in (0.0, float("inf"), 25.0, True):
        with pytest.raises(CheckpointError, match="calibration temperature is"):
            save_checkpoint(tmp_path / "hot.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                            temperature=temperature))
    assert not list(tmp_path.iterdir())


def test_the_calibration_temperature_round_trips_and_scales_the_logits(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "calibrated.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                                  temperature=2.5))
    assert load_checkpoint(path).temperature == 2.5
    logits = torch.tensor([[4.0, 2.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    calibrated = calibrated_probabilities(logits, 2.5)
    weights = [math.exp(x / 2.5) for x in (4.0, 2.0, 0.0, -2.0)]
    assert torch.allclose(calibrated[0], torch.tensor([w / sum(weights) for w in weights]))
    assert torch.allclose(calibrated.sum(dim=1), torch.ones(2))
    assert torch.equal(calibrated_probabilities(logits, 1.0), torch.softmax(logits, dim=1))
    assert calibrated[0, 0] < torch.softmax(logits, dim=1)[0, 0]  # T > 1 softens an overconfident model
    assert torch.allclose(calibrated[1], torch.full((4,), 0.25))


def test_build_never_raises_a_raw_runtime_error() -> None:
    with pytest.raises(CheckpointError, match="has shape"):
        Checkpoint(model="student", state_dict=_bad_shape()).build()
    with pytest.raises(CheckpointError, match="cannot build 'vgg16-slim'"):
        Checkpoint(model="vgg16-slim", state_dict={}, model_options={"width": 0.0}).build()


def test_a_trained_imagenet_teacher_builds_without_downloading(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no weights cached, and no download allowed
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    teacher = build_model("vgg16-imagenet", pretrained=False)
    path = save_checkpoint(tmp_path / "teacher.pt", Checkpoint(model="vgg16-imagenet", state_dict=teacher.state_dict()))
    rebuilt = load_checkpoint(path).build()
    assert torch.equal(rebuilt.classifier.weight, teacher.classifier.weight)


def test_check_state_dict_for_federation_states() -> None:
    model = Student()
    head = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    assert check_state_dict(model, head, "client reply", partial=True).keys() == head.keys()
    with pytest.raises(CheckpointError, match="client reply: state dict lacks"):
        check_state_dict(model, head, "client reply")
    with pytest.raises(CheckpointError, match="client reply: state-dict entry 'classifier.1.bias' has dtype"):
        check_state_dict(model, {**head, "classifier.1.bias": torch.zeros(4, dtype=torch.int64)}, "client reply",
                         partial=True)
    with pytest.raises(CheckpointError, match="not a mapping"):
        check_state_dict(model.state_dict(), [1, 2], "client reply")


def _forged_npz(path: Path, member: bytes, compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("images.npy", member)
    return path


def test_an_npz_declaring_more_than_it_stores_is_refused_before_allocating(tmp_path: Path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 750)})
    huge = _forged_npz(tmp_path / "state.npz", header.getvalue() + bytes(64))  # declares 6 GB, stores 64 bytes
    with pytest.raises(ArtefactError, match="declares 6,000,000,000 bytes of data but stores"):
        load_npz(huge)
    bomb = _forged_npz(tmp_path / "bomb.npz", bytes(10**6), zipfile.ZIP_DEFLATED)
    with pytest.raises(ArtefactError, match="is compressed"):
        load_npz(bomb)
    save_npz(tmp_path / "fine.npz", {"images": np.zeros((2, 3), np.uint8)})
    assert load_npz(tmp_path / "fine.npz")["images"].shape == (2, 3)


def test_a_run_folder_has_one_owner_and_its_apps_see_when_it_is_gone(tmp_path: Path) -> None:
    """The lock `edgemri federate` holds: a second command on the folder is refused, and the apps it started learn
    that it died from the kernel dropping the lock (a SIGKILLed command included: its process is gone)."""
    lock = tmp_path / "run" / "owner.lock"
    assert owner_gone(lock) and not lock.exists()  # a check never creates the file
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from edgemri.core.errors import EdgemriError\nfrom edgemri.core.io import owner_lock\n"
                               f"with owner_lock(Path({str(lock)!r}), EdgemriError):\n"
                               "    print('held', flush=True)\n    time.sleep(600)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not owner_gone(lock)
        with pytest.raises(EdgemriError, match="another edgemri command is working in"), owner_lock(lock, EdgemriError):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert owner_gone(lock)
    with owner_lock(lock, EdgemriError):  # free again
        assert not owner_gone(lock)


def test_a_second_owner_may_wait_for_the_first_to_end(tmp_path: Path) -> None:
    """``wait_s``: the lock is taken once its holder lets go within the wait, and refused (saying so) after it."""
    lock = tmp_path / "run" / "owner.lock"
    holder = threading.Thread(target=_hold_for, args=(lock, 2.5))
    holder.start()
    while owner_gone(lock):
        time.sleep(0.01)
    with pytest.raises(EdgemriError, match=r"\(waited 0.2 s\); wait for it to end"), \
            owner_lock(lock, EdgemriError, wait_s=0.2):
        pass
    waiting = time.monotonic()
    with owner_lock(lock, EdgemriError, wait_s=30.0):  # the holder lets go after 2.5 s: this one goes on
        assert time.monotonic() - waiting > 0.5  # it waited for the holder, not for nothing
    holder.join()


def _hold_for(lock: Path, seconds: float) -> None:
    with owner_lock(lock, EdgemriError):
        time.sleep(seconds)
