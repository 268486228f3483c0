"""Export-time folds: a per-model input calibration into the preprocessing constants, a norm-student's
BatchNorms into its convs; both keep the exported model the paper's plain student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edgemri.core.data.images import (
    MEAN,
    PREPROCESSING,
    STD,
    PreprocessingError,
    calibrated_preprocessing,
    load_image_uint8,
    normalize,
    parse_preprocessing,
)
from edgemri.core.training.checkpoint import FORMAT, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from edgemri.edge.errors import EdgeError
from edgemri.edge.int8 import export_onnx_int8
from edgemri.edge.onnx import export_onnx
from edgemri.edge.predict import predict_paths
from edgemri.edge.runtime import load_model
from edgemri.edge.torchscript import export_torchscript
from edgemri.models import NormStudent, Student, build_model, fold_norms

ATOL = 1e-5


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8, generator=generator)


def _student(seed: int = 0) -> Student:
    torch.manual_seed(seed)
    return Student().eval()


def _affine(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random per-channel calibration: scale in [0.5, 2], shift in [-0.5, 0.5]."""
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 + 1.5 * torch.rand(3, generator=generator, dtype=torch.float64)
    shift = torch.rand(3, generator=generator, dtype=torch.float64) - 0.5
    return scale, shift


def _calibrated_logits(model: torch.nn.Module, images: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    """The calibration as trained: an affine on the default-normalized input, in front of the student."""
    x = normalize(images) * scale.float().view(1, 3, 1, 1) + shift.float().view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- normalize and the constants


def test_default_normalize_is_unchanged_and_custom_constants_apply() -> None:
    images = _images(2)
    expected = (images.float() - torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0) / (torch.tensor(STD).view(1, 3, 1, 1)
                                                                               * 255.0)
    assert torch.equal(normalize(images), expected)
    assert torch.equal(normalize(images, list(MEAN), list(STD)), expected)  # same values, same bytes
    mean, std = [0.1, 0.2, 0.3], [0.5, 1.0, 2.0]
    manual = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images, mean, std).double(), manual, atol=1e-5)


def test_calibrated_preprocessing_folds_the_affine_into_mean_and_std() -> None:
    scale, shift = _affine()
    calibrated = calibrated_preprocessing(scale, shift)
    images = _images(2)
    affine = normalize(images) * scale.float().view(1, 3, 1, 1) + shift.float().view(1, 3, 1, 1)
    assert (normalize(images, calibrated["mean"], calibrated["std"]) - affine).abs().max() <= ATOL
    assert {k: v for k, v in calibrated.items() if k not in ("mean", "std")} == {
        k: v for k, v in PREPROCESSING.items() if k not in ("mean", "std")}
    assert calibrated["std"] == pytest.approx([s / a for s, a in zip(STD, scale.tolist(), strict=True)])
    assert PREPROCESSING["mean"] == list(MEAN)  # the shared constants are not modified
    # The identity calibration gives edgemri's own constants; a tensor of shape (1, 3, 1, 1) is fine.
    assert calibrated_preprocessing(torch.ones(1, 3, 1, 1), torch.zeros(3)) == parse_preprocessing(PREPROCESSING, "")
    # Calibrating twice composes: the second affine acts on the first one's normalized input.
    twice = calibrated_preprocessing(scale, shift, calibrated)
    assert (normalize(images, twice["mean"], twice["std"])
            - (affine * scale.float().view(1, 3, 1, 1) + shift.float().view(1, 3, 1, 1))).abs().max() <= 1e-4


@pytest.mark.parametrize(("scale", "shift", "reason"), [
    ([1.0, 0.0, 1.0], [0.0, 0.0, 0.0], r"calibration scale \[1.0, 0.0, 1.0\] is not allowed; allowed: .* > 0"),
    ([1.0, -2.0, 1.0], [0.0, 0.0, 0.0], "calibration scale"),
    ([1.0, 1.0], [0.0, 0.0, 0.0], "3 finite numbers"),
    ([1.0, 1.0, 1.0], [0.0, float("nan"), 0.0], "calibration shift"),
    ([1e-3, 1.0, 1.0], [0.0, 0.0, 0.0], r"preprocessing std \[229.*allowed: 3 finite numbers in \(0, 10\]"),
    ([1.0, 1.0, 1.0], [100.0, 0.0, 0.0], r"preprocessing mean .* in \[-10, 10\]"),
])
def test_bad_calibrations_are_one_line_errors(scale: list[float], shift: list[float], reason: str) -> None:
    with pytest.raises(PreprocessingError, match=reason) as err:
        calibrated_preprocessing(scale, shift)
    assert "\n" not in str(err.value)


BAD_PREPROCESSINGS = [
    ({**PREPROCESSING, "std": [0.2, 0.0, 0.2]}, r"std \[0.2, 0.0, 0.2\] is not allowed"),
    ({**PREPROCESSING, "std": [0.2, 11.0, 0.2]}, "std .* is not allowed"),
    ({**PREPROCESSING, "mean": [0.2, float("nan"), 0.2]}, "mean .* is not allowed"),
    ({**PREPROCESSING, "mean": [0.2, float("inf"), 0.2]}, "mean .* is not allowed"),
    ({**PREPROCESSING, "mean": [0.2, 0.2]}, "mean is .*; allowed: 3 numbers"),
    ({**PREPROCESSING, "mean": [True, 0.2, 0.2]}, "mean is .*; allowed: 3 numbers"),
    ({**PREPROCESSING, "std": "0.2"}, "std is '0.2'; allowed: 3 numbers"),
    ({**PREPROCESSING, "resize": [224, 224]}, "expects preprocessing .*224.*but edgemri applies"),
    ({k: v for k, v in PREPROCESSING.items() if k != "mean"}, "but edgemri applies"),
    ({**PREPROCESSING, "extra": 1}, "but edgemri applies"),
]


@pytest.mark.parametrize(("preprocessing", "reason"), BAD_PREPROCESSINGS)
def test_checkpoints_with_bad_constants_are_refused_on_load_and_save(tmp_path: Path, preprocessing: dict,
                                                                     reason: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"format": FORMAT, "model": "student", "state_dict": Student().state_dict(),
                "preprocessing": preprocessing}, path)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=reason):
        save_checkpoint(tmp_path / "never.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                          preprocessing=preprocessing))
    assert not (tmp_path / "never.pt").exists()


def test_a_checkpoint_keeps_its_own_constants(tmp_path: Path) -> None:
    calibrated = calibrated_preprocessing(*_affine())
    path = save_checkpoint(tmp_path / "own.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                           preprocessing=calibrated))
    assert load_checkpoint(path).preprocessing == calibrated


# ---------------------------------------------------------------- edgemri predict applies the model's constants


@pytest.fixture(scope="module")
def calibrated_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], list[Path]]:
    """A calibrated student's checkpoint, its ONNX and TorchScript exports, and PNG scans."""
    root = tmp_path_factory.mktemp("fold")
    checkpoint = Checkpoint(model="student", state_dict=_student().state_dict(), role="personalized",
                            preprocessing=calibrated_preprocessing(*_affine()))
    files = {"checkpoint": save_checkpoint(root / "student.pt", checkpoint),
             "onnx": export_onnx(checkpoint, root / "student.onnx"),
             "torchscript": export_torchscript(checkpoint, root / "student.torchscript.pt")}
    scans = []
    for index, image in enumerate(_images(5, seed=3)):
        scans.append(root / f"scan-{index}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(scans[-1])
    return root, files, scans


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "torchscript"])
def test_predict_applies_the_models_own_constants(calibrated_files: tuple[Path, dict[str, Path], list[Path]],
                                                  kind: str) -> None:
    _, files, scans = calibrated_files
    images = torch.from_numpy(np.stack([load_image_uint8(path) for path in scans]))
    scale, shift = _affine()
    expected = _calibrated_logits(_student(), images, scale, shift)
    with torch.no_grad():
        plain = _student()(normalize(images))
    assert (expected - plain).abs().max() > 1e-3  # the calibration changes the logits, so the check means something
    model = load_model(files[kind])
    assert model.kind == kind and model.preprocessing == calibrated_preprocessing(scale, shift)
    with torch.no_grad():
        assert (model.logits(model.normalize(images)) - expected).abs().max() <= ATOL
    results = predict_paths(model, scans, top_k=4, batch_size=2)
    probabilities = torch.softmax(expected, dim=1)
    for result, row in zip(results, probabilities, strict=True):
        assert result.ok and result.label == model.class_names[int(row.argmax())]
        assert result.probability == pytest.approx(float(row.max()), abs=ATOL)
        by_class = dict(result.top_k)
        assert [by_class[name] for name in model.class_names] == pytest.approx(row.tolist(), abs=ATOL)


def test_exports_carry_the_checkpoints_constants(calibrated_files: tuple[Path, dict[str, Path], list[Path]]) -> None:
    root, files, _ = calibrated_files
    calibrated = calibrated_preprocessing(*_affine())
    props = {p.key: p.value for p in onnx.load(str(files["onnx"])).metadata_props}
    assert json.loads(props["preprocessing"]) == calibrated
    checkpoint = load_checkpoint(files["checkpoint"])
    int8 = export_onnx_int8(checkpoint, root / "student.int8.onnx", _images(16, seed=4), _images(8, seed=5),
                            torch.zeros(8, dtype=torch.long))
    int8_props = {p.key: p.value for p in onnx.load(str(int8.path)).metadata_props}
    assert json.loads(int8_props["preprocessing"]) == calibrated
    assert load_model(int8.path).preprocessing == calibrated


def _edited_metadata(source: Path, out: Path, preprocessing: dict) -> Path:
    model = onnx.load(str(source))
    next(p for p in model.metadata_props if p.key == "preprocessing").value = json.dumps(preprocessing)
    out.write_bytes(model.SerializeToString())
    return out


@pytest.mark.parametrize(("preprocessing", "reason"), BAD_PREPROCESSINGS[:2] + BAD_PREPROCESSINGS[7:8])
def test_onnx_files_with_bad_constants_are_refused_at_load(
        calibrated_files: tuple[Path, dict[str, Path], list[Path]], tmp_path: Path, preprocessing: dict,
        reason: str) -> None:
    _, files, _ = calibrated_files
    with pytest.raises(EdgeError, match=reason) as err:
        load_model(_edited_metadata(files["onnx"], tmp_path / "edited.onnx", preprocessing))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the norm-student


def test_norm_student_keys_are_the_students_plus_norms() -> None:
    student_keys, keys = list(Student().state_dict()), list(NormStudent().state_dict())
    assert keys[:len(student_keys)] == student_keys
    assert all(key.startswith(NormStudent.NORM_PREFIX) for key in keys[len(student_keys):])
    assert len(keys) - len(student_keys) == 4 * 5  # weight, bias, running mean and variance, batches tracked
    convs = [name for name, module in Student().named_modules() if isinstance(module, torch.nn.Conv2d)]
    assert list(NormStudent.NORMED_CONVS) == convs
    assert isinstance(build_model("norm-student"), NormStudent)


def test_identity_norms_give_exactly_the_students_logits() -> None:
    student = _student()
    model = NormStudent.from_student_state(student.state_dict()).eval()
    batch = normalize(_images(4))
    with torch.no_grad():
        assert torch.equal(model(batch), student(batch))
    folded = fold_norms(model.state_dict())
    assert all(torch.equal(folded[key], value) for key, value in student.state_dict().items())
    with pytest.raises(ValueError, match="'norms.0.weight' is unexpected"):
        NormStudent.from_student_state(model.state_dict())
    with pytest.raises(ValueError, match="'classifier.1.bias' is missing"):
        NormStudent.from_student_state({k: v for k, v in student.state_dict().items() if k != "classifier.1.bias"})


def _trained_norm_student(seed: int = 0) -> NormStudent:
    """A few SGD steps in train mode: gamma, beta and the running statistics all move away from identity."""
    torch.manual_seed(seed)
    model = NormStudent.from_student_state(Student().state_dict()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    images, labels = _images(16, seed=seed + 10), torch.arange(16) % 4
    for step in range(6):
        batch = slice(4 * (step % 4), 4 * (step % 4) + 4)
        # A per-channel offset and gain unlike ImageNet's, as a new scanner site would give.
        x = normalize(images[batch]) * torch.tensor([1.5, 0.7, 1.1]).view(1, 3, 1, 1) + 0.3
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels[batch]).backward()
        optimizer.step()
    return model.eval()


def test_folded_norms_give_the_norm_students_logits() -> None:
    model = _trained_norm_student()
    norm = model.norms[0]
    assert (norm.running_var - (1 - norm.eps)).abs().max() > 1e-2 and norm.running_mean.abs().max() > 1e-2
    assert (norm.weight - 1).abs().max() > 1e-3 and norm.bias.abs().max() > 1e-3
    folded = fold_norms(model.state_dict())
    assert list(folded) == list(Student().state_dict())
    student = Student().eval()
    student.load_state_dict(folded, strict=True)
    unfolded = Student().eval()
    unfolded.load_state_dict({k: v for k, v in model.state_dict().items() if k in folded}, strict=True)
    batch = normalize(_images(8, seed=2))
    with torch.no_grad():
        expected = model(batch)
        assert (student(batch) - expected).abs().max() <= ATOL
        assert (unfolded(batch) - expected).abs().max() > 1e-3  # the norms matter, so the fold is tested


def test_fold_norms_refuses_what_cannot_be_folded() -> None:
    state = NormStudent().state_dict()
    with pytest.raises(ValueError, match="no 'norms.3.running_var'"):
        fold_norms({k: v for k, v in state.items() if k != "norms.3.running_var"})
    with pytest.raises(ValueError, match="norm 1 has a running variance below -eps"):
        fold_norms({**state, "norms.1.running_var": torch.full((3,), -1.0)})


def test_a_norm_student_checkpoint_exports_as_the_plain_student(tmp_path: Path) -> None:
    model = _trained_norm_student(seed=1)
    path = save_checkpoint(tmp_path / "norm.pt", Checkpoint(model="norm-student", state_dict=model.state_dict(),
                                                            role="fedbn"))
    checkpoint = load_checkpoint(path)
    out = export_onnx(checkpoint, tmp_path / "norm.onnx")
    graph = onnx.load(str(out)).graph
    assert sum(int(np.prod(t.dims)) for t in graph.initializer) == 12_628  # the paper's student, no norms
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["source_model"] == "norm-student"
    batch = normalize(_images(4, seed=6))
    loaded = load_model(out)
    with torch.no_grad():
        assert (loaded.logits(batch) - model(batch)).abs().max() <= ATOL
    # A norm-student checkpoint also predicts directly, norms unfolded.
    with torch.no_grad():
        assert (load_model(path).logits(batch) - model(batch)).abs().max() <= ATOL
