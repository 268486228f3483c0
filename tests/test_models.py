from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import vgg16

from edgemri.models import MODEL_NAMES, Student, WeightsUnavailableError, build_model, summarize
from edgemri.models.registry import imagenet_weights_path

PAPER_KEYS = [
    "conv_block_1.0.weight", "conv_block_1.0.bias", "conv_block_1.2.weight", "conv_block_1.2.bias",
    "conv_block_2.0.weight", "conv_block_2.0.bias", "conv_block_2.2.weight", "conv_block_2.2.bias",
    "classifier.1.weight", "classifier.1.bias",
]


def _count(model: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def test_student_matches_paper_parameter_count_and_keys() -> None:
    student = Student()
    assert _count(student) == (12_628, 12_628)
    assert list(student.state_dict()) == PAPER_KEYS
    assert student(torch.zeros(2, 3, 128, 128)).shape == (2, 4)


def test_paper_layout_state_dict_loads_strictly() -> None:
    shapes = {
        "conv_block_1.0.weight": (3, 3, 3, 3), "conv_block_1.0.bias": (3,),
        "conv_block_1.2.weight": (3, 3, 3, 3), "conv_block_1.2.bias": (3,),
        "conv_block_2.0.weight": (3, 3, 3, 3), "conv_block_2.0.bias": (3,),
        "conv_block_2.2.weight": (3, 3, 3, 3), "conv_block_2.2.bias": (3,),
        "classifier.1.weight": (4, 3072), "classifier.1.bias": (4,),
    }
    state = {k: torch.randn(shape) for k, shape in shapes.items()}
    student = Student()
    student.load_state_dict(state, strict=True)
    assert torch.equal(student.classifier[1].weight, state["classifier.1.weight"])


def test_unknown_model_name_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="allowed: student, vgg16-slim, vgg16-imagenet"):
        build_model("resnet18")


def _write_stand_in_weights(torch_home: Path) -> dict[str, torch.Tensor]:
    """VGG16 features of the right shapes, where torchvision's weights API looks."""
    torch.manual_seed(1)
    features = {k: torch.randn_like(v) for k, v in vgg16(weights=None).state_dict().items()
                if k.startswith("features.")}
    path = torch_home / "hub" / "checkpoints" / imagenet_weights_path().name
    path.parent.mkdir(parents=True)
    torch.save(features, path)
    return features


def test_imagenet_teacher_loads_through_weights_api_from_cache(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    features = _write_stand_in_weights(tmp_path)
    teacher = build_model("vgg16-imagenet")
    assert _count(teacher) == (14_815_044, 100_356)
    assert torch.equal(teacher.features[0].weight, features["features.0.weight"])
    assert torch.equal(teacher.features[28].bias, features["features.28.bias"])
    assert teacher.classifier.in_features == 25088
    assert teacher.features_frozen
    assert teacher.features(torch.zeros(1, 3, 128, 128)).shape == (1, 512, 8, 8)


def test_imagenet_teacher_without_weights_fails_with_clear_message(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("vgg16-imagenet")
    message = str(err.value)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path) in message and "TORCH_HOME" in message
    assert "vgg16-slim" in message


def test_slim_teacher_width_is_configurable() -> None:
    narrow, wide = build_model("vgg16-slim", width=0.125), build_model("vgg16-slim", width=0.25)
    assert _count(narrow)[0] < _count(wide)[0]
    convs = [m for m in narrow.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 64
    with pytest.raises(ValueError, match="width"):
        build_model("vgg16-slim", width=0.0)


def test_estimated_size_reproduces_paper_table() -> None:
    assert summarize("student", Student()).estimated_size_mb == 2.25
    teacher = build_model("vgg16-imagenet", pretrained=False)
    summary = summarize("vgg16-imagenet", teacher)
    assert summary.estimated_size_mb == 128.14
    assert summary.trainable_params == 100_356


def test_models_summary_cli_json() -> None:
    result = subprocess.run([sys.executable, "-m", "edgemri", "models", "summary", "--json"],
                            capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(MODEL_NAMES)
    assert rows["student"]["total_params"] == 12_628
    assert rows["vgg16-imagenet"]["total_params"] == 14_815_044
    assert rows["vgg16-imagenet"]["trainable_params"] == 100_356
    assert 50_000 < rows["student"]["state_dict_bytes"] < 60_000
