"""The personal fine-tune under DP-SGD: its own ledger entry, the budget it must fit, and the settings it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from edgemri.clients.runtime import Client, ClientState, resolve_setup
from edgemri.core.config import ConfigError
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, read_manifest, write_manifests
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import create_method
from edgemri.core.privacy.dp import PrivacyError, plan_dp
from edgemri.core.privacy.ledger import LEDGER_FILE, LEDGER_FORMAT_V2, Ledger, _hash, _line
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import load_checkpoint
from edgemri.models import Student

PHONE_DP = {"enabled": True, "target_epsilon": 4.0, "budget_epsilon": 10.0, "personal_epsilon": 2.0}


def _config(phone_dp: dict[str, Any] | None = None, **federation: Any) -> Any:
    return parse_config({"seed": 0, "data": {"client_fraction": 0.0}, "federation": {
        "method": "fedavg-ft", "rounds": 2, **federation, "tiers": {
            "hospital": {"min_examples": 20, "local_epochs": 1},
            "phone": {"per_site": 1, "min_examples": 30, "max_examples": 40, "batch_size": 8,
                      "personal": {"epochs": 2, "select": "last"}}}},
        "privacy": {"tiers": {"phone": phone_dp or PHONE_DP}}})


@pytest.fixture()
def phone(sited_data: Path, tmp_path: Path) -> dict[str, str]:
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, _config()), tmp_path / "m")
    manifest = next(m for m in manifests if read_manifest(m).kind == "phone")
    return {"manifest": str(manifest), "data-dir": str(sited_data), "state-dir": str(tmp_path / "state")}


def _final(phone: dict[str, str], config: Any) -> tuple[dict[str, float], Client]:
    client = Client(resolve_setup(phone, {}))
    torch.manual_seed(0)
    start = Student().state_dict()
    metrics = client.final_evaluate(create_method(config.federation), start, start, start, ClientState(),
                                    p.RoundInstructions.for_tier(config, "phone", 2, final=True))
    return metrics, client


def test_the_personal_fine_tune_spends_its_own_ledger_entry(phone: dict[str, str]) -> None:
    config = _config()
    metrics, client = _final(phone, config)
    ledger = Ledger.open(client.ledger_path, client.name)
    assert [Ledger.stage(r) for r in ledger.records] == ["personal"] and ledger.rounds == []
    record = ledger.records[0]
    plan = client.personal_dp_plan(p.RoundInstructions.for_tier(config, "phone", 2, final=True))
    assert plan is not None and record["steps"] == plan.steps_per_round == 2 * plan.steps_per_epoch
    # The noise was chosen for personal_epsilon alone: that one entry spends it (within the search's tolerance).
    assert record["epsilon"] == pytest.approx(PHONE_DP["personal_epsilon"], rel=0.05)
    assert metrics[p.PERSONAL_DP] == 1.0 and metrics[p.PERSONAL_NOISE] == pytest.approx(plan.noise_multiplier)
    # The fine-tune ran: the saved personal model is not the global (here: start) model it began from.
    personal = load_checkpoint(client.setup.state_dir / "personalized.pt").state_dict
    torch.manual_seed(0)
    assert any(not torch.equal(personal[k], v) for k, v in Student().state_dict().items())
    # The status the final reply carries counts the entry: the server's rollback check sees epsilon rise.
    status = client.privacy_status(client.dp_plan(p.RoundInstructions.for_tier(config, "phone", 2)))
    assert status[p.EPSILON] == pytest.approx(record["epsilon"]) and status[p.LEDGER_RECORDS] == 1


def test_no_budget_left_means_no_fine_tune_never_one_outside_dp(phone: dict[str, str]) -> None:
    tight = {**PHONE_DP, "target_epsilon": 1.0, "budget_epsilon": 1.0, "personal_epsilon": 1.0}
    config = _config(tight)
    client = Client(resolve_setup(phone, {}))
    round_plan = client.dp_plan(p.RoundInstructions.for_tier(config, "phone", 1))
    ledger = Ledger.open(client.ledger_path, client.name)
    ledger.append(1, round_plan, round_plan.steps_per_round)  # a round already spent most of the budget
    metrics, _ = _final(phone, config)
    assert metrics[p.PERSONAL_DP] == 0.0
    assert metrics[p.PERSONAL_ACCURACY] == metrics[p.GLOBAL_ACCURACY]  # the global model, not a raw fine-tune
    assert [Ledger.stage(r) for r in Ledger.open(client.ledger_path, client.name).records] == ["round"]


def test_the_devices_floor_binds_the_personal_fine_tune(phone: dict[str, str]) -> None:
    config = _config()
    client = Client(resolve_setup(phone, {}), DevicePolicy.from_node_config({"dp-min-noise-multiplier": 50.0}))
    torch.manual_seed(0)
    start = Student().state_dict()
    metrics = client.final_evaluate(create_method(config.federation), start, start, start, ClientState(),
                                    p.RoundInstructions.for_tier(config, "phone", 2, final=True))
    assert metrics[p.PERSONAL_DP] == 0.0 and metrics[p.PERSONAL_ACCURACY] == metrics[p.GLOBAL_ACCURACY]
    assert not client.ledger_path.exists() or not Ledger.open(client.ledger_path, client.name).records


def test_settings_that_would_leak_outside_the_ledger_are_refused(phone: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"'federation.tiers.hospital.personal.select' has value 'val'; allowed: "
                                          r"last while privacy.tiers.hospital.personal_epsilon is set"):
        parse_config({"privacy": {"tiers": {"hospital": PHONE_DP}}})  # hospitals select on validation by default
    with pytest.raises(ConfigError, match="'federation.compare_methods' .* allowed: \\[\\] while"):
        _config(compare_methods=["label-free"])
    with pytest.raises(ConfigError, match="personal_epsilon' has value 11.0; allowed: a number in \\(0, 10\\]"):
        _config({**PHONE_DP, "personal_epsilon": 11.0})
    config = _config(method="ditto")
    with pytest.raises(PrivacyError, match="method 'ditto' does not make its personal model by one fine-tune"):
        _final(phone, config)


def test_a_v2_ledger_still_opens_and_takes_rounds_but_not_a_personal_entry(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    genesis = {"format": LEDGER_FORMAT_V2, "seq": 0, "client": "phone-a", "ledger_id": "ab" * 32}
    genesis["hash"] = _hash(genesis)
    path.write_text(_line(genesis))
    ledger = Ledger.open(path, "phone-a")
    plan = plan_dp(parse_config({}).privacy.tier("phone", "phone-a"), n=40, batch_size=8, local_epochs=1, rounds=2,
                   accountant="rdp")
    ledger.append(1, plan, plan.steps_per_round)
    assert "stage" not in json.loads(path.read_text().splitlines()[1])  # still a /2 ledger, readable as one
    again = Ledger.open(path, "phone-a")
    assert again.rounds == [1] and Ledger.stage(again.records[0]) == "round"
    with pytest.raises(PrivacyError, match="records rounds only; a DP personal fine-tune needs a new client name"):
        again.append(2, plan, plan.steps_per_round, stage="personal")


def test_the_attack_card_counts_a_dp_fine_tuned_personal_model_as_under_dp() -> None:
    from edgemri.simulation.privacy_attack import personal_model_under_dp

    assert not personal_model_under_dp("fedavg-ft", {p.PERSONAL_ACCURACY: 0.8})  # fine-tuned on raw scans
    assert personal_model_under_dp("fedavg-ft", {p.PERSONAL_DP: 0.0})  # no budget: the global model, no fine-tune
    assert personal_model_under_dp("fedavg-ft", {p.PERSONAL_DP: 1.0})
    assert personal_model_under_dp("fedavg", {})  # the global model itself
