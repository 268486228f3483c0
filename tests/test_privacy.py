from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from opacus.accountants.rdp import RDPAccountant

from edgemri.clients.runtime import Client, ClientSetup, ClientState
from edgemri.core.config import ConfigError, DPTierConfig, TrainSpec, parse_config
from edgemri.core.data import load_dataset
from edgemri.core.losses import cross_entropy
from edgemri.core.partition import partition, write_manifests
from edgemri.core.personalize import create_method
from edgemri.core.privacy import (
    Ledger,
    LedgerError,
    PrivacyError,
    check_dp_model,
    epsilon_of,
    opacus_wrap,
    plan_dp,
)
from edgemri.core.train import TrainData, fit
from edgemri.models import Student, build_model
from edgemri.simulation.federate import plan_privacy


def _tier(**kw: object) -> DPTierConfig:
    return DPTierConfig(**{"enabled": True, "target_epsilon": 3.0, "budget_epsilon": 5.0, **kw})


def test_noise_is_derived_from_the_target_over_the_planned_rounds() -> None:
    plan = plan_dp(_tier(), n=200, batch_size=16, local_epochs=2, rounds=5, accountant="rdp")
    assert plan.feasible and plan.delta == 1e-5
    assert plan.sample_rate == pytest.approx(16 / 200) and plan.steps_per_round == 2 * 13
    assert 2.9 < plan.planned_epsilon <= 3.0
    assert plan.one_round_epsilon < plan.planned_epsilon
    small = plan_dp(_tier(), n=20, batch_size=8, local_epochs=1, rounds=5, accountant="rdp")
    assert small.delta == pytest.approx(min(1e-5, 0.1 / 20)) and small.delta < 1 / 20


def test_a_phone_too_small_for_its_budget_is_told_so_instead_of_training_noise() -> None:
    plan = plan_dp(_tier(target_epsilon=1.0), n=8, batch_size=8, local_epochs=1, rounds=5, accountant="rdp")
    assert not plan.feasible and "too few scans" in plan.reason


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_every_accountant_is_selectable(accountant: str) -> None:
    plan = plan_dp(_tier(), n=300, batch_size=16, local_epochs=1, rounds=3, accountant=accountant)
    assert 2.5 < plan.planned_epsilon <= 3.05


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"phone": {"budget_epsilon": 0}}, "'privacy.phone.budget_epsilon' has value 0.0"),
        ({"phone": {"delta": 1.0}}, "'privacy.phone.delta' has value 1.0; allowed: a number in (0, 1)"),
        ({"phone": {"noise_multiplier": -1.0}}, "'privacy.phone.noise_multiplier' has value -1.0"),
        ({"phone": {"max_grad_norm": 0}}, "'privacy.phone.max_grad_norm' has value 0.0"),
        ({"accountant": "moments"}, "allowed: 'rdp', 'prv', 'gdp'"),
    ],
)
def test_bad_privacy_settings_are_config_errors(privacy: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"privacy": privacy})
    assert message in str(err.value)


def test_dp_with_a_proximal_term_is_refused() -> None:
    with pytest.raises(ConfigError, match="proximal_mu"):
        parse_config({"federation": {"proximal_mu": 0.1}, "privacy": {"phone": {"enabled": True}}})


def test_delta_not_below_one_over_n_is_an_error() -> None:
    with pytest.raises(PrivacyError, match="not below 1/n"):
        plan_dp(_tier(delta=0.2), n=10, batch_size=4, local_epochs=1, rounds=2, accountant="rdp")


def test_budget_too_small_for_one_round_fails_before_training(sited_data: Path, tmp_path: Path) -> None:
    config = parse_config({"data": {"client_fraction": 0.0}, "federation": {"hospital": {"min_examples": 20},
                                          "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}},
                           "privacy": {"phone": {"enabled": True, "noise_multiplier": 0.3, "budget_epsilon": 0.5}}})
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, config), tmp_path / "m")
    with pytest.raises(PrivacyError, match="too small for even one round"):
        plan_privacy(config, manifests)


def test_a_model_opacus_cannot_handle_is_a_clear_error() -> None:
    with pytest.raises(PrivacyError, match="vgg16-slim.*BatchNorm"):
        check_dp_model(build_model("vgg16-slim"), "vgg16-slim")
    check_dp_model(Student(), "student")


def test_dp_training_handles_poisson_empty_batches_and_counts_steps() -> None:
    plan = plan_dp(_tier(target_epsilon=5.0), n=12, batch_size=2, local_epochs=1, rounds=1, accountant="rdp")
    images = torch.randint(0, 255, (12, 3, 128, 128), dtype=torch.uint8)
    model = Student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, TrainData(images, torch.arange(12) % 4), loss=cross_entropy,
                 spec=TrainSpec(epochs=3, batch_size=2), seed=0, select="last", wrap=opacus_wrap(plan, seed=1))
    assert result.optimizer_steps == 3 * 6  # Poisson batches: the step count is fixed, sizes vary
    assert result.images_seen != 3 * 12  # uneven batches (some empty) under Poisson sampling
    assert list(model.state_dict()) == list(before)  # no Opacus '_module.' prefix leaks out
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _plan():
    return plan_dp(_tier(noise_multiplier=1.2, budget_epsilon=50.0), n=40, batch_size=8, local_epochs=1, rounds=5,
                   accountant="rdp")


def test_ledger_rebuilds_the_accountant_and_never_resets(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.jsonl"
    plan = _plan()
    ledger = Ledger.open(path, "phone-a")
    for server_round in (1, 2, 3):
        ledger.append(server_round, plan, plan.steps_per_round)
    reopened = Ledger.open(path, "phone-a")  # a restarted client
    assert reopened.rounds == [1, 2, 3]
    expected = epsilon_of([(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)], plan.delta, "rdp")
    assert reopened.epsilon(plan.delta, "rdp") == pytest.approx(expected)
    assert reopened.epsilon_after(plan) > expected


def test_ledger_agrees_with_google_dp_accounting(tmp_path: Path) -> None:
    plan = _plan()
    ledger = Ledger.open(tmp_path / "l.jsonl", "phone-a")
    for server_round in range(1, 5):
        ledger.append(server_round, plan, plan.steps_per_round)
    ours = Ledger.open(tmp_path / "l.jsonl", "phone-a").records[-1]["epsilon"]
    google = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    event = dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier))
    google.compose(event, 4 * plan.steps_per_round)
    assert ours == pytest.approx(google.get_epsilon(plan.delta), rel=0.01)


def test_corrupt_ledgers_are_errors_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.jsonl"
    plan = _plan()
    ledger = Ledger.open(path, "phone-a")
    for server_round in (1, 2):
        ledger.append(server_round, plan, plan.steps_per_round)
    good = path.read_text()
    path.write_text(good + good.splitlines()[-1][:25])  # a half-written third record
    assert Ledger.open(path, "phone-a").rounds == [1, 2]
    lines = good.splitlines()
    record = json.loads(lines[1])
    record["epsilon"] = 0.0  # tampered: epsilon rewritten without its checksum
    path.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    with pytest.raises(LedgerError, match="checksum"):
        Ledger.open(path, "phone-a")
    path.write_text(lines[0] + "\n{not json\n" + lines[2] + "\n")
    with pytest.raises(LedgerError, match="line 2 is not valid JSON"):
        Ledger.open(path, "phone-a")
    path.write_text("")
    with pytest.raises(LedgerError, match="refusing to reset"):
        Ledger.open(path, "phone-a")


def test_a_client_stops_at_its_budget_even_across_a_restart(sited_data: Path, tmp_path: Path) -> None:
    config = parse_config({"data": {"client_fraction": 0.0}, "federation": {"hospital": {"min_examples": 20},
                                          "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}},
                           "privacy": {"hospital": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10.0}}})
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, config), tmp_path / "m")
    hospital = next(p for p in manifests if "hospital" in p.read_text()[:300])
    setup = ClientSetup(hospital, sited_data, tmp_path / "state")
    method, spec = create_method(config.federation), TrainSpec(epochs=1, batch_size=16)
    start, state = Student().state_dict(), ClientState()
    statuses = []
    for server_round in range(1, 8):
        client = Client(setup)  # a fresh process every round, as on a SuperNode
        reply = client.train_round(method, start, state, spec, server_round, 0, config.privacy, rounds=7)
        state = reply.state
        statuses.append(reply.status)
    assert "trained" in statuses and statuses[-1] == "budget-exhausted"
    assert statuses == sorted(statuses, key=lambda s: s != "trained")  # trains, then stops for good
    ledger = Ledger.open(setup.state_dir / "privacy-ledger.jsonl", "x")
    assert len(ledger.rounds) == statuses.count("trained")
    assert ledger.records[-1]["epsilon"] <= 10.0
    assert math.isclose(ledger.records[-1]["epsilon"], Client(setup).privacy_status(
        client.dp_plan(config.privacy, spec, 7))["epsilon"])
