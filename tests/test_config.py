from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgemri.core import config as config_module
from edgemri.core.config import ConfigError
from edgemri.core.data import synth
from edgemri.core.federation import personalize
from edgemri.core.privacy import dp
from edgemri.core.registries import REGISTRIES, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["quickstart.yaml", "paper.yaml"])
def test_shipped_configs_load(name: str) -> None:
    distill = load_config(CONFIGS / name).distill
    # The paper's recipe is paper.yaml's KD student and the quickstart's compared one (its own is the improved one).
    paper = distill.kd if name == "paper.yaml" else distill.paper_kd
    assert (paper.temperature, paper.alpha, paper.views, paper.transfer_root) == (1.0, 0.5, 0, None)
    assert distill.calibrate == (name != "paper.yaml")


def test_code_defaults_are_the_recommended_federation_settings() -> None:
    """A config without a federation section (paper.yaml) federates as the shipped federation configs do."""
    defaults = parse_config({}).federation
    assert load_config(CONFIGS / "paper.yaml").federation == defaults
    for name in ("quickstart.yaml", "kaggle-federation.yaml"):
        shipped = load_config(CONFIGS / name).federation
        assert (defaults.method, defaults.ditto_lambda, defaults.ditto_lr) == (
            shipped.method, shipped.ditto_lambda, shipped.ditto_lr)
        for kind in ("hospital", "phone"):
            assert defaults.tier(kind).personal == shipped.tier(kind).personal
            assert defaults.tier(kind).val_fraction == shipped.tier(kind).val_fraction


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
         "'federation.method' has value 'fedsgd'; allowed: 'fedavg', 'fedavg-ft', 'fedavg-cal', 'label-free', "
         "'fedper', 'lg-fedavg', 'ditto', 'fedbn'"),
        ({"federation": {"tiers": {"hospital": {"personal": {"optimizer": "rmsprop"}}}}},
         "'federation.tiers.hospital.personal.optimizer' has value 'rmsprop'; allowed: 'adam', 'sgd'"),
        ({"federation": {"tiers": {"phone": {"personal": {"select": "val"}}}}},
         "'federation.tiers.phone.personal.select' has value 'val'; allowed: 'last' when "
         "federation.tiers.phone.val_fraction is 0"),
        ({"federation": {"compare_methods": ["ditto"]}},
         "'federation.compare_methods' has value 'ditto'; allowed: 'fedavg', 'fedavg-ft', 'fedavg-cal', "
         "'label-free'"),
        ({"federation": {"compare_methods": "fedavg-ft"}}, "allowed: a list of at most 16 items"),
        ({"federation": {"compare_methods": ["fedavg-ft", "fedavg-ft"]}}, "allowed: each method at most once"),
        ({"federation": {"tiers": {"hospital": {"personal": {"distill_weight": 1.5}}}}},
         "'federation.tiers.hospital.personal.distill_weight' has value 1.5"),
        ({"federation": {"tiers": {"phone": {"availability": 0}}}},
         "'federation.tiers.phone.availability' has value 0.0"),
        *(({"federation": {"tiers": {"phone": {"sample_per_round": bad}}}},
           f"'federation.tiers.phone.sample_per_round' has value {bad!r}; allowed: null (every online client), "
           f"an integer in [1, 100000] or a fraction in (0, 1)") for bad in (0, -5, 100_001, 0.0, 1.0, 2.5)),
        ({"federation": {"tiers": {"phone": {"sample_per_round": "ten"}}}},
         "'federation.tiers.phone.sample_per_round' has value 'ten'; allowed: a finite number"),
        # Every number finite and bounded, the bound in the message.
        ({"distill": {"kd": {"temperature": float("inf")}}},
         "'distill.kd.temperature' has value inf; allowed: a finite number"),
        ({"distill": {"kd": {"temperature": float("nan")}}}, "allowed: a finite number"),
        ({"distill": {"kd": {"temperature": 1000.0}}}, "allowed: a number in (0, 100]"),
        ({"distill": {"baseline": {"epochs": 10**20}}}, "allowed: an integer in [1, 10000]"),
        ({"distill": {"baseline": {"batch_size": 10**6}}}, "allowed: an integer in [1, 65536]"),
        ({"distill": {"baseline": {"lr": 1e3}}},
         "'distill.baseline.lr' has value 1000.0; allowed: a number in (0, 10]"),
        ({"federation": {"rounds": 10**6}}, "'federation.rounds' has value 1000000; allowed: an integer in [1, 10000]"),
        ({"federation": {"round_timeout_s": 1e9}}, "allowed: a number in (0, 86400]"),
        ({"federation": {"tiers": {"phone": {"max_examples": 10**9}}}}, "allowed: an integer in [1, 10000000]"),
        ({"privacy": {"tiers": {"phone": {"budget_epsilon": 1e12}}}}, "allowed: a number in (0, 1000]"),
        ({"privacy": {"central": {"delta": float("nan")}}}, "allowed: a finite number"),
        ({"seed": 2**40}, "'seed' has value 1099511627776; allowed: an integer in [0, 2147483647]"),
        # Tiers are data, but only kinds the partition can carve.
        ({"federation": {"tiers": {"clinic": {"per_site": 1}}}},
         "'federation.tiers.clinic' is not a client kind; allowed: hospital, phone"),
        ({"privacy": {"tiers": {"clinic": {"enabled": True}}}}, "'privacy.tiers.clinic' names no federation tier"),
        ({"federation": {"tiers": {"hospital": {"per_site": 0}, "phone": {"per_site": 0}}}},
         "at least one client per site over all tiers"),
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
    config = parse_config({"federation": {"tiers": {"hospital": {"local_epochs": 3}}}})
    assert config.federation.tier("hospital").local_epochs == 3
    assert config.federation.tier("hospital").min_examples == 100  # the hospital default, not the generic tier's
    assert config.federation.tier("phone").availability == 0.7  # a tier not listed keeps its defaults
    assert config.federation.tier_names == ("hospital", "phone") == config.privacy.tier_names


def test_sample_per_round_is_a_count_or_a_fraction_of_the_tier_and_all_by_default() -> None:
    config = parse_config({"federation": {"tiers": {"phone": {"sample_per_round": 50}}}})
    hospital, phone = config.federation.tier("hospital"), config.federation.tier("phone")
    assert hospital.sample_per_round is None and hospital.sample_size(1_000) is None  # cross-silo: all train
    assert phone.sample_per_round == 50 and isinstance(phone.sample_per_round, int)  # a count stays an integer
    assert phone.sample_size(1_000) == phone.sample_size(10) == 50  # capped by who is online, not here
    fraction = parse_config({"federation": {"tiers": {"phone": {"sample_per_round": "7e-2"}}}}).federation
    assert [fraction.tier("phone").sample_size(n) for n in (1_000, 100, 10, 1)] == [70, 7, 1, 1]  # rounded up
    assert parse_config(config.to_dict()).federation == config.federation  # survives the run's saved config
    assert load_config(CONFIGS / "quickstart.yaml").federation.tier("phone").sample_per_round is None


def test_unknown_client_kinds_are_config_errors() -> None:
    config = parse_config({})
    with pytest.raises(ConfigError, match="unknown client kind 'clinic'; federation.tiers has: hospital, phone"):
        config.federation.tier("clinic")
    with pytest.raises(ConfigError, match="unknown client kind 'clinic'; privacy.tiers has: hospital, phone"):
        config.privacy.tier("clinic", "clinic-1")


def test_the_project_registries_are_the_owners_key_sets() -> None:
    assert REGISTRIES.methods == tuple(personalize.METHODS)
    assert REGISTRIES.accountants == dp.ACCOUNTANTS
    assert REGISTRIES.synth_presets == tuple(synth.PRESETS)
    assert "fedavg-ft" in REGISTRIES.after_round_methods and "ditto" not in REGISTRIES.after_round_methods


def test_allowed_names_are_the_registries_handed_in() -> None:
    data = {"federation": {"method": "fedfoo"}, "privacy": {"accountant": "pld"}, "data": {"synth_preset": "tiny"}}
    with pytest.raises(ConfigError, match="'tiny'; allowed: 'quickstart'"):
        config_module.parse_config(data, REGISTRIES)
    names = dataclasses.replace(REGISTRIES, methods=(*REGISTRIES.methods, "fedfoo"),
                                accountants=(*REGISTRIES.accountants, "pld"),
                                synth_presets=(*REGISTRIES.synth_presets, "tiny"))
    config = config_module.parse_config(data, names)
    assert (config.federation.method, config.privacy.accountant, config.data.synth_preset) == ("fedfoo", "pld", "tiny")


def test_overrides_set_nested_keys_and_are_validated() -> None:
    overrides = ["federation.method=fedper", "seed=3", "distill.kd.temperature=4",
                 "privacy.tiers.hospital.enabled=true"]
    config = load_config(CONFIGS / "quickstart.yaml", overrides)
    assert (config.federation.method, config.seed, config.distill.kd.temperature) == ("fedper", 3, 4.0)
    assert config.privacy.tier("hospital", "hospital-a").enabled is True
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


@pytest.mark.parametrize(("text", "value"), [("1e-4", 1e-4), ("5e3", 5000.0)])
def test_scientific_notation_is_a_number_for_float_fields(tmp_path: Path, text: str, value: float) -> None:
    # YAML 1.1 reads 1e-4 (no dot) as a string, in --set values and in files alike.
    overridden = load_config(CONFIGS / "quickstart.yaml", [f"federation.ditto_lambda={text}"])
    assert overridden.federation.ditto_lambda == value
    path = tmp_path / "c.yaml"
    path.write_text(f"federation:\n  ditto_lambda: {text}\n")
    assert load_config(path).federation.ditto_lambda == value


def test_a_negative_exponent_number_is_read_as_a_number_then_bounded() -> None:
    with pytest.raises(ConfigError, match=r"'federation.ditto_lambda' has value -0.01; allowed: a number in \[0, "):
        load_config(CONFIGS / "quickstart.yaml", ["federation.ditto_lambda=-1E-2"])


def test_an_infinite_temperature_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  kd: {temperature: .inf}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'distill.kd.temperature' has value inf"):
        load_config(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"- seed: 1\n", "the top level is a list; it must be a mapping of sections"),
        (b"seed: 1\ndistill:\n  kd:\n    alpha: 0.5\n    alpha: 0.9\n",
         "duplicate key 'alpha' at line 5 (first given at line 4); give each key once"),
        (b"seed: 1\nseed: 2\n", "duplicate key 'seed' at line 2"),
        (b"seed: [1\n", "not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
        (b"seed: 1\n# r\xe9sum\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 11); save it as UTF-8"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_an_unreadable_config_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot read the config \(Permission denied\)"):
        load_config(path)


def test_duplicate_keys_in_overrides_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="override .*duplicate key 'enabled'"):
        load_config(CONFIGS / "quickstart.yaml", ["privacy.tiers.phone={enabled: true, enabled: false}"])


def test_a_list_setting_round_trips_through_yaml() -> None:
    import yaml

    config = parse_config({"federation": {"compare_methods": ["fedavg-ft", "label-free"]}})
    assert config.federation.compare_methods == ("fedavg-ft", "label-free")
    data = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert data["federation"]["compare_methods"] == ["fedavg-ft", "label-free"]
    assert parse_config(data) == config


@pytest.mark.parametrize(("text", "message"), [
    ("distill: {compare: " + "[" * 10_000 + "]" * 10_000 + "}", "nested deeper than 32 levels"),
    ("seed: " + "9" * 5_000, "an integer of 5000 digits"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", "YAML aliases"),
])
def test_a_small_config_cannot_make_the_loader_recurse_or_allocate_without_bound(tmp_path: Path, text: str,
                                                                                   message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    key, _, value = text.partition(": ")
    if "\n" not in text:  # the same value through --set
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIGS / "quickstart.yaml", [f"{key}={value}"])


def test_a_config_larger_than_the_bound_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * 1_000_001 + "\nseed: 1\n")
    with pytest.raises(ConfigError, match="a config may have at most 1,000,000"):
        load_config(path)
