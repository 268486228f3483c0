"""Real-data distillation settings on tiny data: dedup splits and metrics, the augmented teacher, the preflight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from edgemri.core.config import ConfigError
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.images import DataError
from edgemri.core.data.splits import stratified_split
from edgemri.core.registries import load_config, parse_config
from edgemri.core.training import distill as distill_module
from edgemri.core.training.augment import ViewData
from edgemri.core.training.distill import Distiller, run_distillation
from edgemri.reports.distill import build_report, render_markdown
from tests.conftest import make_kaggle_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "seed": 0,
    "data": {"val_fraction": 0.2, "client_fraction": 0.0, "dedup": True},
    "distill": {
        "teacher": {"name": "vgg16-slim", "width": 0.0625, "views": 4, "train": {"epochs": 1, "batch_size": 32}},
        "baseline": {"epochs": 1, "batch_size": 16},
        "kd": {"temperature": 2.0, "alpha": 0.5, "views": 2, "train": {"epochs": 1, "batch_size": 16}},
    },
}


def _config(**data_changes: object):
    data = json.loads(json.dumps(FAST))
    data["data"].update(data_changes)
    return parse_config(data)


@pytest.fixture(scope="module")
def leaky_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny set where 3 Testing files are copies of Training files, and 2 Training files have a copy."""
    root = make_kaggle_folder(tmp_path_factory.mktemp("leaky") / "data", {"Training": 12, "Testing": 4}, seed=5)
    for k, name in enumerate(("glioma", "meningioma", "pituitary")):
        shutil.copy(root / "Training" / name / f"Tr-{name[:2]}_0000.jpg", root / "Testing" / name / f"Te-copy{k}.jpg")
    for name in ("glioma", "notumor"):
        shutil.copy(root / "Training" / name / f"Tr-{name[:2]}_0001.jpg", root / "Training" / name / "Tr-copy.jpg")
    return root


def test_grouped_split_keeps_each_group_on_one_side_and_stays_stratified() -> None:
    labels = torch.tensor([0] * 30 + [1] * 30)
    groups = [i // 3 for i in range(60)]  # 20 groups of 3 copies
    train, val = stratified_split(labels, 0.2, seed=1, groups=groups)
    assert not set(train.tolist()) & set(val.tolist()) and len(train) + len(val) == 60
    val_groups, train_groups = {groups[i] for i in val.tolist()}, {groups[i] for i in train.tolist()}
    assert not val_groups & train_groups
    assert sorted(torch.bincount(labels[val]).tolist()) == [6, 6]
    again, _ = stratified_split(labels, 0.2, seed=1, groups=groups)
    other, _ = stratified_split(labels, 0.2, seed=2, groups=groups)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_dedup_keeps_copies_out_of_validation_and_testing_metrics(leaky_data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(leaky_data)
    distiller = Distiller(_config(), dataset, 0, tmp_path / "seed-0", resume=False, progress=False)
    copies = {f for f in dataset.test.files if "copy" in f}
    kept = {dataset.test.files[i] for i in distiller.test_keep.tolist()}
    assert len(copies) == 3 and not kept & copies and len(kept) == len(dataset.test) - 3
    for name in ("glioma", "notumor"):  # a Training file and its copy are on one side of train/validation
        pair = {f"Training/{name}/Tr-{name[:2]}_0001.jpg", f"Training/{name}/Tr-copy.jpg"}
        assert pair <= set(distiller.train_split.files) or pair <= set(distiller.val_split.files)
    plain = Distiller(_config(dedup=False), dataset, 0, tmp_path / "plain", resume=False, progress=False)
    assert len(plain.test_keep) == len(dataset.test)


def test_dedup_run_reports_both_testing_variants(leaky_data: Path, tmp_path: Path, distill_fits: list) -> None:
    dataset = load_dataset(leaky_data)
    results, seconds = run_distillation(_config(), dataset, tmp_path / "run")
    teacher_data = distill_fits[0][0]
    assert isinstance(teacher_data, ViewData) and teacher_data.view_params.shape[1] == 4
    kd = results[0].stages["kd"].test
    assert kd["testing_images"] == len(dataset.test) - 3 and len(kd["correct"]) == kd["testing_images"]
    assert kd["full_testing_images"] == len(dataset.test) == len(kd["full_testing_correct"])
    assert kd["full_testing_accuracy"] == pytest.approx(sum(kd["full_testing_correct"]) / len(dataset.test))
    report = build_report(_config(), dataset, results, seconds, tmp_path / "run")
    assert report["data"]["deduplicated"] and "minus_baseline_full_testing" in report["comparisons"]["kd"]
    assert "full Testing acc" in render_markdown(report)


def test_a_missing_transfer_folder_fails_before_any_training(tiny_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads(json.dumps(FAST))
    data["distill"]["kd"]["transfer_root"] = "Unlabeled"
    trained = []
    monkeypatch.setattr(distill_module, "fit", lambda *a, **k: trained.append(1))
    with pytest.raises(DataError, match="distill.kd.transfer_root 'Unlabeled'"):
        run_distillation(parse_config(data), load_dataset(tiny_data), tmp_path / "run")
    assert not trained


def test_a_share_without_a_class_fails_before_any_training(tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = load_dataset(tiny_data)
    monkeypatch.setattr(distill_module, "scenario_split",
                        lambda split, config, progress=False: (torch.nonzero(split.labels != 2).flatten(),
                                                               torch.tensor([])))
    with pytest.raises(DataError, match="has no notumor image"):
        Distiller(_config(dedup=False), dataset, 0, tmp_path, resume=False, progress=False)


def test_kaggle_config_loads_and_teacher_views_are_bounded() -> None:
    config = load_config(ROOT / "configs" / "kaggle.yaml")
    assert config.data.dedup and config.data.client_fraction == 0 and config.distill.kd.transfer_root is None
    assert set(config.distill.kd_recipes()) == {"kd", "paper-kd"} and config.data.head in ("none", "standardize-crop")
    with pytest.raises(ConfigError, match="distill.teacher.views"):
        load_config(ROOT / "configs" / "kaggle.yaml", ["distill.teacher.views=1000"])


def test_head_step_is_recorded_applied_by_edge_and_refused_by_the_federation(
        tiny_data: Path, tmp_path: Path) -> None:
    from edgemri.core.config import ConfigError
    from edgemri.core.data.images import PREPROCESSING, PreprocessingError, normalize, parse_preprocessing
    from edgemri.core.training.checkpoint import load_checkpoint
    from edgemri.core.training.shortcut import apply_head_step
    from edgemri.edge.contract import normalize_for
    from edgemri.edge.onnx import export_onnx
    from edgemri.edge.runtime import load_model
    from edgemri.simulation.federate import federate

    config = _config(dedup=False, head="standardize-crop")
    results, _ = run_distillation(config, load_dataset(tiny_data), tmp_path / "run")
    student = load_checkpoint(results[0].stages["kd"].checkpoint)
    assert student.preprocessing["head"] == "standardize-crop"
    images = load_dataset(tiny_data).test.images[:8]
    stepped = apply_head_step(images, "standardize-crop")
    assert not torch.equal(stepped, images)
    assert torch.equal(normalize_for(images, student.preprocessing), normalize(stepped))
    assert torch.equal(normalize_for(images, PREPROCESSING), normalize(images))
    exported = export_onnx(load_checkpoint(results[0].stages["kd"].checkpoint), tmp_path / "kd.onnx")
    loaded = load_model(exported)
    assert loaded.preprocessing["head"] == "standardize-crop"
    assert torch.equal(loaded.normalize(images), normalize(stepped))
    with pytest.raises(PreprocessingError, match="head 'blur' is not allowed"):
        parse_preprocessing({**PREPROCESSING, "head": "blur"}, "x")
    with pytest.raises(ConfigError, match="data.head"):
        _config(head="blur")
    with pytest.raises(ConfigError, match="head step 'standardize-crop'"):
        federate(config, data_root=tiny_data, out=tmp_path / "fed", start_checkpoint=results[0].stages["kd"].checkpoint)
