from __future__ import annotations

from pathlib import Path

import pytest

from edgemri.core.config import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["quickstart.yaml", "paper.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.distill.kd.temperature == 1.0 and config.distill.kd.alpha == 0.5


def test_paper_config_is_the_papers_setting() -> None:
    distill = load_config(CONFIGS / "paper.yaml").distill
    assert distill.teacher.name == "vgg16-imagenet"
    assert (distill.kd.train.epochs, distill.kd.train.batch_size, distill.kd.train.lr) == (50, 16, 1e-3)
    assert distill.baseline.weight_decay == 0.01 and distill.kd.train.weight_decay == 0.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"distill": {"kd": {"alhpa": 0.5}}},
         "unknown config key 'distill.kd.alhpa'; allowed keys in distill.kd: temperature, alpha, train"),
        ({"distill": {"teacher": {"name": "resnet18"}}},
         "'distill.teacher.name' has value 'resnet18'; allowed: 'vgg16-slim', 'vgg16-imagenet'"),
        ({"distill": {"kd": {"alpha": 1.5}}}, "'distill.kd.alpha' has value 1.5; allowed: a number in [0, 1]"),
        ({"distill": {"baseline": {"epochs": 0}}}, "'distill.baseline.epochs' has value 0"),
        ({"distill": {"baseline": {"epochs": "ten"}}},
         "'distill.baseline.epochs' has value 'ten'; allowed: an integer"),
        ({"data": {"val_fraction": 0.9}}, "'data.val_fraction' has value 0.9"),
        ({"distill": {"paper_compat": "yes"}}, "allowed: true or false"),
        ({"federated": {}}, "unknown config key 'federated'"),
        ({"federation": {"method": "fedsgd"}},
         "'federation.method' has value 'fedsgd'; allowed: 'fedavg', 'fedavg-ft', 'fedper', 'ditto'"),
        ({"federation": {"phone": {"availability": 0}}}, "'federation.phone.availability' has value 0.0"),
    ],
)
def test_bad_configs_name_the_key_and_the_allowed_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  kd: {temperature: -1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'distill.kd.temperature'"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_partial_sections_keep_their_own_defaults() -> None:
    config = parse_config({"federation": {"hospital": {"local_epochs": 3}}})
    assert config.federation.hospital.local_epochs == 3
    assert config.federation.hospital.min_examples == 100  # the hospital default, not the generic tier's
    assert config.federation.phone.availability == 0.7


def test_overrides_set_nested_keys_and_are_validated() -> None:
    overrides = ["federation.method=fedper", "seed=3", "distill.kd.temperature=4", "privacy.hospital.enabled=true"]
    config = load_config(CONFIGS / "quickstart.yaml", overrides)
    assert (config.federation.method, config.seed, config.distill.kd.temperature) == ("fedper", 3, 4.0)
    assert config.privacy.hospital.enabled is True
    assert config.federation.rounds == load_config(CONFIGS / "quickstart.yaml").federation.rounds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.method", "must look like dotted.key=value"),
        ("federation.methd=fedper", "unknown config key 'federation.methd'"),
        ("federation.method=fedsgd", "federation.method"),
        ("seed.value=1", "'seed' is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "quickstart.yaml", [override])
