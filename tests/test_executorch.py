"""ExecuTorch export (.pte through torch.export and XNNPACK) and prediction: parity, the metadata inside the
program, a personalized student, and the files that must be refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("executorch")

from edgemri.core.data.images import CLASS_NAMES, PREPROCESSING, calibrated_preprocessing, load_image_uint8  # noqa: E402
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from edgemri.edge.contract import edge_metadata  # noqa: E402
from edgemri.edge.errors import INSTALL_HINT, EdgeDependencyError, EdgeError  # noqa: E402
from edgemri.edge.executorch import (  # noqa: E402
    METADATA_METHOD,
    check_program_header,
    export_executorch,
    load_executorch,
)
from edgemri.edge.predict import predict_paths  # noqa: E402
from edgemri.edge.runtime import load_model  # noqa: E402
from edgemri.main import main  # noqa: E402
from edgemri.models import NormStudent, Student  # noqa: E402

TEMPERATURE = 4.0
PARITY = 1e-4


def _images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8, generator=generator)


def _student() -> Student:
    """Random weights with a sharpened head: logits of a few units, so probabilities differ between classes."""
    torch.manual_seed(0)
    model = Student().eval()
    with torch.no_grad():
        model.classifier[1].weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated student's checkpoint, its .pte (exported by the command) and six PNG scans."""
    root = tmp_path_factory.mktemp("executorch")
    checkpoint = Checkpoint(model="student", state_dict=_student().state_dict(), role="kd", seed=7,
                            temperature=TEMPERATURE)
    paths = {"checkpoint": save_checkpoint(root / "student.pt", checkpoint)}
    assert main(["export", str(paths["checkpoint"]), "--format", "executorch"]) == 0
    paths["pte"] = root / "student.pte"  # the default output name
    for index, image in enumerate(_images(6, seed=3)):
        paths[f"scan{index}"] = root / f"scan-{index}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[f"scan{index}"])
    return paths


def _scans(files: dict[str, Path]) -> list[Path]:
    return [path for key, path in sorted(files.items()) if key.startswith("scan")]


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgemri: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- export


def test_the_program_matches_pytorch_and_carries_the_metadata(files: dict[str, Path]) -> None:
    data = files["pte"].read_bytes()
    assert b"XnnpackBackend" in data  # lowered to the XNNPACK delegate, not the portable kernels
    logits, meta = load_executorch(data, "student.pte")
    # The ONNX export's metadata, but for the input line: the program takes one image a call.
    onnx_meta = edge_metadata(load_checkpoint(files["checkpoint"]))
    assert {**meta, "input": onnx_meta["input"]} == onnx_meta
    assert (meta["source_role"], meta["source_seed"]) == ("kd", 7)
    assert meta["temperature"] == TEMPERATURE and meta["preprocessing"] == PREPROCESSING
    assert meta["input"].startswith("image: float32 1 x 3 x 128 x 128")
    batch = load_model(files["pte"]).normalize(_images(6, seed=1))
    with torch.no_grad():
        expected = _student()(batch)
    assert expected.abs().max() > 1  # real logits, so the comparison means something
    assert (logits(batch) - expected).abs().max() <= PARITY
    assert len(data) < 80_000  # the 12,628 float32 weights (50.5 KB) and little else


def test_predict_on_a_pte_gives_the_checkpoints_calibrated_probabilities(files: dict[str, Path],
                                                                         capsys: pytest.CaptureFixture) -> None:
    model = load_model(files["pte"])
    assert (model.kind, model.class_names, model.temperature) == ("executorch", list(CLASS_NAMES), TEMPERATURE)
    scans = _scans(files)
    images = torch.from_numpy(np.stack([load_image_uint8(path) for path in scans]))
    with torch.no_grad():
        logits = _student()(model.normalize(images))
    expected = torch.softmax(logits / TEMPERATURE, dim=1)
    assert (expected - torch.softmax(logits, dim=1)).abs().max() > 0.05  # the temperature matters
    results = predict_paths(model, scans, top_k=len(CLASS_NAMES), batch_size=4)  # batches of 4 and 2
    for result, row in zip(results, expected, strict=True):
        assert result.ok and result.label == CLASS_NAMES[int(row.argmax())]
        assert [dict(result.top_k)[name] for name in CLASS_NAMES] == pytest.approx(row.tolist(), abs=PARITY)

    capsys.readouterr()
    assert main(["predict", str(files["pte"]), *map(str, scans), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["temperature"], report["predicted"]) == ("executorch", TEMPERATURE, 6)
    assert main(["predict", str(files["checkpoint"]), *map(str, scans)]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["predict", str(files["pte"]), *map(str, scans)]) == 0
    assert capsys.readouterr().out == from_checkpoint  # the same lines, to the printed 4 decimals


def test_a_personalized_norm_student_exports_with_its_norms_and_constants(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = NormStudent.from_student_state(_student().state_dict())
    with torch.no_grad():  # norms as a client's FedBN training leaves them: away from identity
        for norm in model.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    constants = calibrated_preprocessing(torch.tensor([1.5, 0.7, 1.1]), torch.tensor([0.3, -0.2, 0.1]))
    checkpoint = Checkpoint(model="norm-student", state_dict=model.state_dict(), role="personalized",
                            preprocessing=constants)
    out = export_executorch(checkpoint, tmp_path / "client.pte")
    loaded = load_model(out)
    assert loaded.preprocessing == constants
    _, meta = load_executorch(out.read_bytes(), "client.pte")
    assert (meta["source_model"], meta["source_role"]) == ("norm-student", "personalized")
    batch = loaded.normalize(_images(4, seed=6))
    with torch.no_grad():
        expected = model(batch)
        assert (_student()(batch) - expected).abs().max() > 1e-2  # the norms change the logits
        assert (loaded.logits(batch) - expected).abs().max() <= PARITY


def test_export_command_refuses_int8_and_existing_files(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(files["checkpoint"]), "--format", "executorch", "--int8"]) == 2
    assert "--format onnx" in _one_line_error(capsys)
    assert main(["export", str(files["checkpoint"]), "--format", "executorch"]) == 2  # student.pte exists
    assert "--overwrite" in _one_line_error(capsys)


def test_without_executorch_export_and_predict_say_how_to_install(files: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("executorch.exir", "executorch.runtime"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    hint = INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")
    checkpoint = Checkpoint(model="student", state_dict=_student().state_dict())
    with pytest.raises(EdgeDependencyError, match=hint):
        export_executorch(checkpoint, tmp_path / "never.pte")
    assert not (tmp_path / "never.pte").exists()
    with pytest.raises(EdgeDependencyError, match=hint):
        load_model(files["pte"])


# ---------------------------------------------------------------- files that must be refused


def _tampered(source: Path, out: Path, old: str, new: str) -> Path:
    """``source`` with one string of its metadata JSON replaced in place (same length: the flatbuffer stays valid)."""
    data = source.read_bytes()
    assert len(old) == len(new) and data.count(old.encode()) == 1, old
    out.write_bytes(data.replace(old.encode(), new.encode()))
    return out


TAMPERED = {  # metadata as someone could edit it in a .pte: each must be refused, before any image is predicted
    "temperature": ('"temperature": 4.0', '"temperature": 1e6', "calibration temperature is 1000000.0"),
    "duplicate-class": ('"meningioma"', '"notumor"   ', "expected a list of distinct"),
    "three-classes": ('"notumor", "pituitary"]', '"notumor"]             ', "its 3 class_names need [2, 3]"),
    "std": ('"std": [0.229', '"std": [0.000', "std [0.0, 0.224, 0.225] is not allowed"),
    "not-json": ('{"class_names"', '["class_names"', "edgemri metadata is not valid JSON"),
    "no-metadata": (METADATA_METHOD, "edgemri_metadatx", f"has no {METADATA_METHOD} method"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_metadata_is_a_one_line_error(files: dict[str, Path], tmp_path: Path, case: str,
                                               capsys: pytest.CaptureFixture) -> None:
    old, new, reason = TAMPERED[case]
    path = _tampered(files["pte"], tmp_path / "tampered.pte", old, new)
    assert main(["predict", str(path), str(files["scan0"])]) == 2
    line = _one_line_error(capsys)
    assert reason in line and str(path) in line, line
    assert capsys.readouterr().out == ""  # nothing predicted


def test_damaged_files_and_foreign_programs_are_one_line_errors(files: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    data = files["pte"].read_bytes()
    broken = {"junk.pte": b"not an ExecuTorch program", "truncated.pte": data[: len(data) // 2],
              "empty.pte": b""}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        assert main(["predict", str(tmp_path / name), str(files["scan0"])]) == 2
        assert "is not a loadable ExecuTorch program" in _one_line_error(capsys), name
    # A valid program with edgemri's metadata that takes 64 px images (portable kernels: quicker to lower).
    from executorch.exir import to_edge_transform_and_lower

    meta = json.dumps(edge_metadata(Checkpoint(model="student", state_dict=Student().state_dict())))
    exported = torch.export.export(Student(image_size=64).eval(), (torch.zeros(1, 3, 64, 64),))
    small = to_edge_transform_and_lower(exported, constant_methods={METADATA_METHOD: meta}).to_executorch().buffer
    with pytest.raises(EdgeError, match=r"takes \[1, 3, 64, 64\] \(dtype 6\), not one float32 image \[1, 3, 128"):
        load_executorch(small, "small.pte")


# ---------------------------------------------------------------- files that aborted the process


def _random_file(seed: int, head: bytes = b"") -> bytes:
    """5 KB of seeded random bytes, the first of them replaced by ``head``."""
    data = bytearray(np.random.default_rng(seed).bytes(5120))
    data[:len(head)] = head
    return bytes(data)


def _with(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


ET_MAGIC = (64).to_bytes(4, "little") + b"ET12"  # a root table offset inside the file, the file identifier
ABORTED = {  # a 5 KB .pte that aborted `edgemri predict` (exit 134), and what the one line says now
    "random-0": (lambda pte: _random_file(0), "not the file identifier"),
    "random-1": (lambda pte: _random_file(1), "not the file identifier"),
    "random-2": (lambda pte: _random_file(2), "not the file identifier"),
    # Past the header check: the runtime's verification refuses it, and its logged cause joins the line.
    "random-after-magic": (lambda pte: _random_file(3, ET_MAGIC), "Verification failed"),
    "random-extended-header": (lambda pte: _random_file(4, ET_MAGIC + b"eh00"), "extended header"),
    # A body no header check sees: it passes verification and aborted when the runtime logged the backend's name.
    "backend-name-not-utf8": (lambda pte: pte.replace(b"XnnpackBackend", b"\xffnnpackBackend"),
                              "crashed the ExecuTorch runtime (Aborted) in a trial load"),
}


@pytest.mark.parametrize("case", sorted(ABORTED))
def test_a_file_that_aborted_predict_is_one_error_line(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, reason = ABORTED[case]
    path = tmp_path / f"{case}.pte"
    path.write_bytes(make(files["pte"].read_bytes()))
    done = subprocess.run([sys.executable, "-m", "edgemri", "predict", str(path), str(files["scan0"])],
                          capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    [line] = done.stderr.splitlines()  # nothing else: no runtime log, no "terminate called", no traceback
    assert line.startswith(f"edgemri: error: {path} is not a loadable ExecuTorch program: ") and reason in line, line


HEADERS = {  # the exported file with one header field damaged -> what the refusal says
    "short": (lambda pte: pte[:63], "63 bytes, shorter than the 64-byte head"),
    "identifier": (lambda pte: _with(pte, 4, b"\xcf\xeb\x0f\xa3"), r"bytes 4-7 are b'\xcf\xeb\x0f\xa3', not the file"),
    "header-length": (lambda pte: _with(pte, 12, (16).to_bytes(4, "little")), "header says it is 16 bytes long"),
    "program-size": (lambda pte: _with(pte, 16, (10**9).to_bytes(8, "little")), "gives the program data 1,000,000,000"),
    "segments": (lambda pte: _with(pte, 24, (10**9).to_bytes(8, "little")), "its segments lie at bytes 1,000,000,000"),
    "truncated": (lambda pte: pte[:len(pte) // 2], "a truncated file?"),
    "root": (lambda pte: _with(pte, 0, (2**31).to_bytes(4, "little")), "root table offset 2,147,483,648"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_bad_header_is_refused_before_the_runtime_is_touched(files: dict[str, Path], case: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    make, reason = HEADERS[case]
    data = files["pte"].read_bytes()
    check_program_header(data, "student.pte")  # the exported file passes
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # reaching the runtime would be a dependency error
    with pytest.raises(EdgeError) as refused:
        load_executorch(make(data), "damaged.pte")
    assert type(refused.value) is EdgeError and reason in str(refused.value)
    assert str(refused.value).startswith("damaged.pte is not a loadable ExecuTorch program: ")


def test_the_runtimes_cause_joins_the_one_line(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "other-backend.pte"
    path.write_bytes(files["pte"].read_bytes().replace(b"XnnpackBackend", b"YnnpackBackend"))
    capsys.readouterr()
    assert main(["predict", str(path), str(files["scan0"])]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Backend YnnpackBackend is not registered.)" in err, err
