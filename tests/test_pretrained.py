"""Shipped pretrained models run by name: predict, export, federate --start, and the registry's hash check."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemri.edge.pretrained import PretrainedModelError, resolve_model
from edgemri.main import main
from edgemri.models import (
    PRETRAINED,
    PretrainedUnavailableError,
    UnknownPretrainedError,
    build_model,
    file_sha256,
    pretrained_path,
)
from edgemri.models import pretrained as registry
from edgemri.simulation.pipeline import load_run_config, start_model
from tests.conftest import one_error_line

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
NAME = "kaggle-student"


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real student checkpoint registered as kaggle-student with its true hash, in a stand-in package folder."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    torch.manual_seed(0)
    path = save_checkpoint(folder / PRETRAINED[NAME].file,
                           Checkpoint(model="student", state_dict=build_model("student").state_dict(), role="kd",
                                      temperature=1.5, seed=0))
    (folder / PRETRAINED[NAME].card).write_text("# kaggle-student\n")
    monkeypatch.setattr(registry, "PRETRAINED_DIR", folder)
    monkeypatch.setitem(PRETRAINED, NAME, dataclasses.replace(PRETRAINED[NAME], sha256=file_sha256(path)))
    return path


@pytest.fixture
def scans(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "scans"
    folder.mkdir()
    files = [folder / f"scan{i}.png" for i in range(3)]
    for file in files:
        Image.fromarray(rng.integers(0, 256, (140, 150), dtype=np.uint8)).save(file)
    return files


def _predict_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["predict", *argv, "--json", "--top-k", "4"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_by_name_equals_predict_by_path(shipped: Path, scans: list[Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    images = list(map(str, scans))
    by_path = _predict_json(capsys, str(shipped), *images)
    assert by_path["predicted"] == len(scans) and by_path["temperature"] == 1.5
    assert _predict_json(capsys, NAME, *images) == by_path
    assert _predict_json(capsys, "--model", NAME, *images) == by_path
    assert _predict_json(capsys, *images, "--model", NAME) == by_path
    assert _predict_json(capsys, "--model", str(shipped), *images) == by_path


def test_export_by_name_writes_to_the_current_folder(shipped: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["export", NAME]) == 0
    assert (work / f"{NAME}.onnx").is_file()
    assert f"wrote {NAME}.onnx" in capsys.readouterr().out
    assert sorted(p.name for p in shipped.parent.iterdir()) == sorted([PRETRAINED[NAME].file, PRETRAINED[NAME].card])


def test_federate_start_resolves_a_name(shipped: Path) -> None:
    config = load_run_config(QUICKSTART, data_root="unused")
    assert start_model(config, NAME) == shipped
    assert start_model(config, str(shipped)) == shipped
    named = config.replace(federation=dataclasses.replace(config.federation, start_checkpoint=NAME))
    assert start_model(named) == shipped
    shipped.write_bytes(shipped.read_bytes() + b"\0")
    with pytest.raises(PretrainedModelError, match="changed or swapped"):
        start_model(config, NAME)


@pytest.mark.parametrize("command", [
    ["predict", "kaggle-studnet", "{scan}"],
    ["predict", "--model", "kaggle-studnet", "{scan}"],
    ["export", "kaggle-studnet"],
])
def test_an_unknown_name_is_one_line_listing_the_names(command: list[str], scans: list[Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([part.format(scan=scans[0], tmp=tmp_path) for part in command]) == 2
    line = one_error_line(capsys)
    assert "'kaggle-studnet'" not in line and "kaggle-studnet is neither a file nor a pretrained model" in line
    assert line.endswith(f"pretrained models: {', '.join(PRETRAINED)}")
    assert not list(tmp_path.glob("*.onnx"))


def test_federate_start_with_an_unknown_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --start that is no name is a file: federate's loader refuses it before anything is made."""
    argv = ["federate", "--config", str(QUICKSTART), "--data-root", str(tmp_path), "--start", "kaggle-studnet",
            "--out", str(tmp_path / "fed")]
    assert main(argv) == 2
    assert "kaggle-studnet" in one_error_line(capsys)
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize("command", [["predict", NAME, "{scan}"], ["predict", "--model", NAME, "{scan}"],
                                     ["export", NAME]])
def test_a_tampered_shipped_file_is_refused(command: list[str], shipped: Path, scans: list[Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    # Still a valid checkpoint, only other weights: the hash, not the loader, must catch the swap.
    save_checkpoint(shipped, dataclasses.replace(load_checkpoint(shipped), temperature=2.0))
    assert main([part.format(scan=scans[0]) for part in command]) == 2
    line = one_error_line(capsys)
    assert f"pretrained model {NAME!r}" in line and f"has sha256 {file_sha256(shipped)}" in line
    assert "reinstall edgemri" in line
    assert not list(tmp_path.glob("*.onnx"))


def test_a_missing_shipped_file_is_one_line(shipped: Path, scans: list[Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    shipped.unlink()
    assert main(["predict", "--model", NAME, str(scans[0])]) == 2
    assert f"pretrained model {NAME!r} is not installed: {shipped} is missing" in one_error_line(capsys)


def test_predict_needs_an_image_after_the_model(shipped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", NAME]) == 2
    assert "no image to predict" in one_error_line(capsys)


def test_the_registry_api_raises_plain_errors(shipped: Path, tmp_path: Path) -> None:
    assert pretrained_path(NAME) == shipped
    with pytest.raises(UnknownPretrainedError, match=f"allowed: {NAME}") as info:
        pretrained_path("nope")
    assert isinstance(info.value, ValueError)
    shipped.write_bytes(shipped.read_bytes() + b"\0")
    with pytest.raises(PretrainedUnavailableError, match="changed or swapped"):
        pretrained_path(NAME)
    # A Path is always a file, even when its text is a registered name.
    with pytest.raises(PretrainedModelError, match="neither a file nor a pretrained model"):
        resolve_model(Path(NAME))
    assert resolve_model(Path(__file__)) == Path(__file__)
    with pytest.raises(PretrainedModelError, match="is a folder"):
        resolve_model(str(tmp_path))


def test_the_wheel_carries_every_registered_file() -> None:
    """pyproject's package-data must match each checkpoint and card, or a wheel would ship without them."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for model in PRETRAINED.values():
        for file in (model.file, model.card):
            assert any(fnmatch.fnmatch(f"pretrained/{file}", p) for p in patterns["edgemri.models"]), file


def test_shipped_models_match_registry() -> None:
    """Every registered file is shipped, is the one the registry records, a loadable checkpoint, with its card."""
    for name, model in PRETRAINED.items():
        path = registry.PRETRAINED_DIR / model.file
        found = file_sha256(path)
        if found != model.sha256:
            pytest.fail(f"{path} changed: update PRETRAINED[{name!r}].sha256 to {found} in models/pretrained.py")
        assert pretrained_path(name) == path
        load_checkpoint(path)
        assert (registry.PRETRAINED_DIR / model.card).is_file(), f"{name}: model card {model.card} is missing"
        assert "\n" not in model.description


def test_the_shipped_student_predicts_exports_and_starts_a_federation(scans: list[Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The real kaggle-student as a user runs it: predict by name, export by name (ONNX parity is checked by the
    export itself), and the federation's start model; its card says what it is and what it is not."""
    result = _predict_json(capsys, "--model", NAME, *map(str, scans))
    assert result["predicted"] == len(scans) and result["temperature"] != 1.0  # calibrated on validation
    monkeypatch.chdir(tmp_path)
    assert main(["export", NAME]) == 0 and (tmp_path / f"{NAME}.onnx").stat().st_size > 40_000
    checkpoint = load_checkpoint(pretrained_path(NAME))
    assert checkpoint.model == "student" and checkpoint.role == "kd" and checkpoint.config["data"]["dedup"]
    config = load_run_config(REPO / "configs" / "kaggle.yaml", data_root=tmp_path)
    assert start_model(config, NAME) == pretrained_path(NAME)
    card = (registry.PRETRAINED_DIR / PRETRAINED[NAME].card).read_text()
    assert "Not a medical device" in card and "Deduplicated Testing" in card and "shortcut" in card
