from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import dp_accounting
import pytest
import torch
from opacus.accountants.rdp import RDPAccountant

from edgemri.clients.runtime import Client, ClientSetup, ClientState
from edgemri.core.config import ConfigError, DPTierConfig, TrainSpec
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, write_manifests
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import create_method
from edgemri.core.federation.protocol import RoundInstructions, Status
from edgemri.core.privacy.dp import PrivacyError, check_dp_model, epsilon_of, opacus_wrap, plan_dp
from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger, LedgerError, LedgerRollback, span
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.registries import parse_config
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, fit
from edgemri.models import Student, build_model
from edgemri.reports.privacy import build_privacy_report, render_markdown, write_privacy_report
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
        ({"tiers": {"phone": {"budget_epsilon": 0}}}, "'privacy.tiers.phone.budget_epsilon' has value 0.0"),
        ({"tiers": {"phone": {"delta": 1.0}}},
         "'privacy.tiers.phone.delta' has value 1.0; allowed: a number in (0, 1)"),
        ({"tiers": {"phone": {"noise_multiplier": -1.0}}}, "'privacy.tiers.phone.noise_multiplier' has value -1.0"),
        ({"tiers": {"phone": {"max_grad_norm": 0}}}, "'privacy.tiers.phone.max_grad_norm' has value 0.0"),
        ({"accountant": "moments"}, "allowed: 'rdp', 'prv', 'gdp'"),
    ],
)
def test_bad_privacy_settings_are_config_errors(privacy: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"privacy": privacy})
    assert message in str(err.value)


def test_dp_with_a_proximal_term_is_refused() -> None:
    with pytest.raises(ConfigError, match="proximal_mu"):
        parse_config({"federation": {"proximal_mu": 0.1}, "privacy": {"tiers": {"phone": {"enabled": True}}}})


def test_delta_not_below_one_over_n_is_an_error() -> None:
    with pytest.raises(PrivacyError, match="not below 1/n"):
        plan_dp(_tier(delta=0.2), n=10, batch_size=4, local_epochs=1, rounds=2, accountant="rdp")


def test_budget_too_small_for_one_round_fails_before_training(sited_data: Path, tmp_path: Path) -> None:
    config = parse_config({"data": {"client_fraction": 0.0}, "federation": {"tiers": {
                               "hospital": {"min_examples": 20},
                               "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}}},
                           "privacy": {"tiers": {
                               "phone": {"enabled": True, "noise_multiplier": 0.3, "budget_epsilon": 0.5}}}})
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, config), tmp_path / "m")
    with pytest.raises(PrivacyError, match="too small for even one round"):
        plan_privacy(config, manifests)


def test_a_model_opacus_cannot_handle_is_a_clear_error() -> None:
    with pytest.raises(PrivacyError, match="vgg16-slim.*BatchNorm"):
        check_dp_model(build_model("vgg16-slim"), "vgg16-slim")
    check_dp_model(Student(), "student")


def test_dp_training_handles_poisson_empty_batches_and_counts_steps() -> None:
    plan = plan_dp(_tier(target_epsilon=5.0), n=12, batch_size=2, local_epochs=3, rounds=1, accountant="rdp")
    images = torch.randint(0, 255, (12, 3, 128, 128), dtype=torch.uint8)
    model = Student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, TrainData(images, torch.arange(12) % 4), loss=cross_entropy,
                 spec=TrainSpec(epochs=3, batch_size=2), seed=0, select="last", wrap=opacus_wrap(plan, seed=1))
    assert result.optimizer_steps == plan.steps_per_round == 3 * 6  # Poisson batches: fixed steps, sizes vary
    assert result.images_seen != 3 * 12  # uneven batches (some empty) under Poisson sampling
    assert list(model.state_dict()) == list(before)  # no Opacus '_module.' prefix leaks out
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dp_sampling_follows_the_plan_even_when_fewer_scans_decoded() -> None:
    """The plan counted 12 scans, 9 decoded: Opacus's own rate 1/ceil(9/2) = 1/5 would exceed the ledger's 1/6."""
    plan = plan_dp(_tier(noise_multiplier=1.0, budget_epsilon=1e6), n=12, batch_size=2, local_epochs=200, rounds=1,
                   accountant="rdp")
    model = Student()
    _, _, batches = opacus_wrap(plan, seed=0)(model, torch.optim.SGD(model.parameters(), lr=0.1), 9, 2)
    sizes = [len(index) for _ in range(200) for index in batches(9, 2, torch.Generator())]
    assert len(sizes) == plan.steps_per_round == 200 * 6  # exactly the steps the budget check counted
    assert sum(sizes) / (len(sizes) * 9) == pytest.approx(plan.sample_rate, abs=0.01)
    with pytest.raises(PrivacyError, match="more than the plan's 1200 noisy steps"):
        batches(9, 2, torch.Generator())  # one epoch more than planned


def test_the_plan_counts_steps_in_integers() -> None:
    # 1 / (1 / 49) rounds up to 50 in floating point; Opacus would take 49 steps.
    plan = plan_dp(_tier(noise_multiplier=1.0), n=49, batch_size=1, local_epochs=2, rounds=1, accountant="rdp")
    assert (plan.steps_per_epoch, plan.steps_per_round) == (49, 98)




def _plan():
    return plan_dp(_tier(noise_multiplier=1.2, budget_epsilon=50.0), n=40, batch_size=8, local_epochs=1, rounds=5,
                   accountant="rdp")


def _ledger(path: Path, rounds: int = 3) -> Ledger:
    plan = _plan()
    ledger = Ledger.open(path, "phone-a")
    for server_round in range(1, rounds + 1):
        ledger.append(server_round, plan, plan.steps_per_round)
    return ledger


def test_ledger_rebuilds_the_accountant_and_never_resets(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    plan = _plan()
    _ledger(path)
    reopened = Ledger.open(path, "phone-a")  # a restarted client
    assert reopened.rounds == [1, 2, 3]
    expected = epsilon_of([(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)], plan.delta, "rdp")
    assert reopened.epsilon(plan.delta, "rdp") == pytest.approx(expected)
    assert reopened.epsilon_after(plan) > expected
    assert reopened.epsilon(plan.delta * 100, "rdp") == pytest.approx(expected)  # a larger delta later: no discount


def test_ledger_agrees_with_google_dp_accounting(tmp_path: Path) -> None:
    plan = _plan()
    _ledger(tmp_path / "l.jsonl", rounds=4)
    ours = Ledger.open(tmp_path / "l.jsonl", "phone-a").records[-1]["epsilon"]
    google = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    event = dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier))
    google.compose(event, 4 * plan.steps_per_round)
    assert ours == pytest.approx(google.get_epsilon(plan.delta), rel=0.01)


def test_the_ledger_is_a_hash_chain_with_a_head_the_server_can_compare(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _ledger(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["client"] == "phone-a" and len(lines[0]["ledger_id"]) == 64
    assert [r["seq"] for r in lines] == [0, 1, 2, 3]
    assert all(r["prev"] == before["hash"] for before, r in zip(lines, lines[1:], strict=False))
    head = json.loads(ledger.head_path.read_text())
    assert (head["count"], head["head"]) == (3, lines[-1]["hash"])
    assert ledger.head() == Ledger.open(path, "phone-a").head() == (3, int(lines[-1]["hash"][:12], 16))
    assert Ledger.open(tmp_path / "other.jsonl", "phone-a").head()[0] == 0


def test_deleting_records_or_restoring_an_older_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    plan = _plan()
    ledger = _ledger(path, rounds=1)
    after_one = path.read_bytes()
    for server_round in (2, 3):
        ledger.append(server_round, plan, plan.steps_per_round)
    complete = path.read_text()
    path.write_bytes(after_one)  # a backup restored: the epsilon of one round instead of three
    with pytest.raises(LedgerError, match=r"has 1 records but its head .* recorded 3: .*rolled back"):
        Ledger.open(path, "phone-a")
    path.write_text("".join(complete.splitlines(keepends=True)[:-1]))  # the last record cut off
    with pytest.raises(LedgerError, match="recorded 3: .*rolled back"):
        Ledger.open(path, "phone-a")
    path.unlink()  # the ledger deleted, its head left behind
    with pytest.raises(LedgerError, match="was deleted; refusing to reset epsilon"):
        Ledger.open(path, "phone-a")


def test_a_ledger_restored_deleted_or_rebuilt_as_a_whole_is_refused_below_the_servers_floor(tmp_path: Path) -> None:
    """The issue's finding: ledger and head restored together agree with each other; only the floor the
    server sends back (the most this client ever reported) tells the device, before it trains."""
    path, plan = tmp_path / LEDGER_FILE, _plan()
    ledger = _ledger(path, rounds=1)
    backup = {f: f.read_bytes() for f in (path, ledger.head_path)}
    ledger.append(2, plan, plan.steps_per_round)
    floor = (2, ledger.epsilon(plan.delta, "rdp"))  # what the client reported with round 2
    Ledger.open(path, "phone-a").check_floor(*floor, plan.delta, "rdp")  # the true ledger passes
    for file, data in backup.items():  # the phone restored from a backup taken after round 1
        file.write_bytes(data)
    restored = Ledger.open(path, "phone-a")  # consistent in itself: open() cannot tell
    with pytest.raises(LedgerRollback, match=r"holds 1 records .* less than the 2 records .* restored from a backup"):
        restored.check_floor(*floor, plan.delta, "rdp")
    path.unlink()
    restored.head_path.unlink()  # both deleted: a fresh, empty ledger
    with pytest.raises(LedgerRollback, match="holds 0 records"):
        Ledger.open(path, "phone-a").check_floor(*floor, plan.delta, "rdp")
    noisier = plan_dp(_tier(noise_multiplier=5.0, budget_epsilon=50.0), n=40, batch_size=8, local_epochs=1, rounds=5,
                      accountant="rdp")
    rebuilt = Ledger.open(path, "phone-a")  # rebuilt with as many records, at a lower epsilon
    for server_round in (1, 2):
        rebuilt.append(server_round, noisier, noisier.steps_per_round)
    with pytest.raises(LedgerRollback, match=r"holds 2 records \(epsilon"):
        rebuilt.check_floor(*floor, plan.delta, "rdp")


def test_a_resumed_ledger_is_stated_in_stretches_of_rounds_with_their_own_noise(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _ledger(path, rounds=2)
    resumed = plan_dp(_tier(noise_multiplier=1.43, budget_epsilon=50.0), n=40, batch_size=8, local_epochs=1,
                      rounds=5, accountant="rdp")
    for server_round in (3, 4):
        ledger.append(server_round, resumed, resumed.steps_per_round)
    stretches = Ledger.open(path, "phone-a").stretches()
    assert [(s["rounds"], s["noise_multiplier"]) for s in stretches] == [([1, 2], 1.2), ([3, 4], 1.43)]
    assert [span(s["rounds"]) for s in stretches] == ["rounds 1-2", "rounds 3-4"]
    assert span([1, 3]) == "rounds 1, 3" and span([2]) == "round 2"


def test_a_crash_between_the_ledger_and_its_head_only_over_counts(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _ledger(path, rounds=2)
    head_after_two = ledger.head_path.read_bytes()
    ledger.append(3, _plan(), _plan().steps_per_round)
    ledger.head_path.write_bytes(head_after_two)  # the ledger has round 3, the head was not yet rewritten
    assert Ledger.open(path, "phone-a").rounds == [1, 2, 3]
    ledger.head_path.unlink()  # no head at all: only a ledger of one round can be that crash
    with pytest.raises(LedgerError, match="head is missing|is missing while"):
        Ledger.open(path, "phone-a")
    first = tmp_path / "first" / LEDGER_FILE
    _ledger(first, rounds=1).head_path.unlink()
    assert Ledger.open(first, "phone-a").rounds == [1]


def _swap_lines(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join([lines[0], lines[2], lines[1], *lines[3:]])


def _edit_epsilon(text: str) -> str:
    lines = text.splitlines(keepends=True)
    record = json.loads(lines[2])
    record["epsilon"] = 0.0  # tampered: the chain's hash no longer matches
    return "".join([lines[0], lines[1], json.dumps(record) + "\n", *lines[3:]])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text + text.splitlines()[-1][:25], "line 5 is torn"),  # a half-written fourth record
        (lambda text: text[:-1], "line 4 is torn"),  # the last line lost its end
        (lambda text: text.replace(text.splitlines()[1], "{not json"), "line 2 is not valid JSON"),
        (_swap_lines, "line 2 has sequence number 2, expected 1"),
        (lambda text: text + text.splitlines(keepends=True)[-1], "line 5 has sequence number 3, expected 4"),
        (_edit_epsilon, "line 3 fails its hash"),
        (lambda text: "", "empty; refusing to reset epsilon"),
    ],
    ids=["torn-record", "torn-end", "not-json", "out-of-order", "duplicated", "edited", "empty"],
)
def test_torn_unparsable_reordered_or_edited_ledgers_are_refused(
        tmp_path: Path, damage: Callable[[str], str], message: str) -> None:
    path = tmp_path / LEDGER_FILE
    _ledger(path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(LedgerError, match=message) as err:
        Ledger.open(path, "phone-a")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _record_line(text: str, **changes: object) -> str:
    lines = text.splitlines(keepends=True)
    record = {**json.loads(lines[1]), **changes}
    record = {k: v for k, v in record.items() if v is not None}
    return "".join([lines[0], json.dumps(record) + "\n", *lines[2:]])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path, text: path.write_text(json.dumps([json.loads(x) for x in text.splitlines()]) + "\n"),
         "line 1 is a JSON list, not an object"),
        (lambda path, text: path.write_text(_record_line(text, steps=None)), "line 2 has the wrong keys .*steps"),
        (lambda path, text: path.write_text(_record_line(text, steps=-3)), "line 2: key 'steps' has value '-3'"),
        (lambda path, text: path.write_text(_record_line(text, noise_multiplier=-1.0)),
         "key 'noise_multiplier' has value '-1.0'"),
        (lambda path, text: path.write_text(_record_line(text, epsilon=float("nan"))), "line 2 is not valid JSON"),
        (lambda path, text: path.write_text(_record_line(text).replace('"epsilon": ', '"epsilon": 0.5, "x": ')),
         "line 2 has the wrong keys"),
        (lambda path, text: path.write_text(_record_line(text, accountant="moments")), "key 'accountant'"),
        (lambda path, text: path.write_bytes(text.encode().replace(b"phone-a", b"phone-\xff", 1)),
         "line 1 is not UTF-8"),
        (lambda path, text: (path.unlink(), path.mkdir()), "cannot read the privacy ledger"),
    ],
    ids=["list", "missing-key", "negative-steps", "negative-noise", "nan", "extra-key", "accountant", "bad-bytes",
         "folder"],
)
def test_malformed_ledgers_are_clear_errors(tmp_path: Path, write: Callable[[Path, str], object],
                                            message: str) -> None:
    path = tmp_path / LEDGER_FILE
    _ledger(path)
    write(path, path.read_text())
    with pytest.raises(LedgerError, match=message):
        Ledger.open(path, "phone-a")


def test_an_infinite_epsilon_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    _ledger(path)
    text = path.read_text()
    line = text.splitlines()[1]
    epsilon = json.dumps(json.loads(line)["epsilon"])
    path.write_text(text.replace(line, line.replace(f'"epsilon": {epsilon}', '"epsilon": 1e999')))
    with pytest.raises(LedgerError, match=r"line 2 is not valid JSON \(1e999 overflows a float\)"):
        Ledger.open(path, "phone-a")


def test_an_old_format_or_another_clients_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    _ledger(path)
    with pytest.raises(LedgerError, match="belongs to client 'phone-a', not 'phone-b'"):
        Ledger.open(path, "phone-b")  # a neighbour's fresher ledger copied in
    path.write_text(json.dumps({"client": "phone-a", "crc": 1, "format": "edgemri.privacy-ledger/1"}) + "\n")
    with pytest.raises(LedgerError, match="privacy-ledger/1 ledger .* not migrated; finish"):
        Ledger.open(path, "phone-a")


def test_a_round_never_ends_above_its_plan_or_budget(tmp_path: Path) -> None:
    plan = _plan()
    ledger = Ledger.open(tmp_path / LEDGER_FILE, "phone-a")
    with pytest.raises(PrivacyError, match="more than the plan's"):
        ledger.append(1, plan, plan.steps_per_round + 1)
    assert Ledger.open(tmp_path / LEDGER_FILE, "phone-a").history()[-1][2] == plan.steps_per_round + 1  # counted
    tight = plan_dp(_tier(noise_multiplier=1.2, budget_epsilon=3.0), n=40, batch_size=8, local_epochs=1, rounds=5,
                    accountant="rdp")
    while ledger.epsilon_after(tight) <= tight.budget_epsilon:
        ledger.append(len(ledger.rounds) + 1, tight, tight.steps_per_round)
    with pytest.raises(PrivacyError, match="> budget 3.0; recorded"):
        ledger.append(len(ledger.rounds) + 1, tight, tight.steps_per_round)


def test_a_client_stops_at_its_budget_even_across_a_restart(sited_data: Path, tmp_path: Path) -> None:
    config = parse_config({"data": {"client_fraction": 0.0}, "federation": {
        "rounds": 7, "tiers": {"hospital": {"min_examples": 20, "local_epochs": 1, "batch_size": 16},
                               "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}}},
        "privacy": {"tiers": {"hospital": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10.0}}}})
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, config), tmp_path / "m")
    hospital = next(p for p in manifests if "hospital" in p.read_text()[:300])
    setup = ClientSetup(hospital, sited_data, tmp_path / "state")
    method, start, state = create_method(config.federation), Student().state_dict(), ClientState()
    statuses = []
    for server_round in range(1, 8):
        client = Client(setup)  # a fresh process every round, as on a SuperNode
        reply = client.train_round(method, start, state, RoundInstructions.for_tier(config, "hospital", server_round))
        state = reply.state
        statuses.append(reply.status)
    assert Status.TRAINED in statuses and statuses[-1] == Status.BUDGET_EXHAUSTED
    assert statuses == sorted(statuses, key=lambda s: s != Status.TRAINED)  # trains, then stops for good
    ledger = Ledger.open(setup.state_dir / LEDGER_FILE, client.name)
    assert len(ledger.rounds) == statuses.count(Status.TRAINED)
    assert ledger.records[-1]["epsilon"] <= 10.0
    instructions = RoundInstructions.for_tier(config, "hospital", 7)
    assert math.isclose(ledger.records[-1]["epsilon"],
                        Client(setup).privacy_status(client.dp_plan(instructions))["epsilon"])
    # Restoring an older ledger does not buy the client another round.
    lines = (setup.state_dir / LEDGER_FILE).read_text().splitlines(keepends=True)
    (setup.state_dir / LEDGER_FILE).write_text("".join(lines[:2]))
    with pytest.raises(LedgerError, match="rolled back"):
        Client(setup).train_round(method, start, state, RoundInstructions.for_tier(config, "hospital", 8))


def test_the_device_policy_is_read_from_the_node_config() -> None:
    policy = DevicePolicy.from_node_config({"manifest": "m.json", "dp-required": True, "dp-max-epsilon": 8,
                                            "dp-min-noise-multiplier": "0.8", "dp-max-grad-norm": 1.5,
                                            "dp-max-delta": 1e-5, "dp-accountants": "rdp, prv"})
    assert policy == DevicePolicy(require_dp=True, max_epsilon=8.0, min_noise_multiplier=0.8, max_grad_norm=1.5,
                                  max_delta=1e-5, accountants=("rdp", "prv"))
    assert DevicePolicy.from_node_config({"partition-id": 3}) == DevicePolicy()
    assert DevicePolicy.from_node_config({"dp-required": "false"}).requires_dp is False
    assert DevicePolicy.from_node_config({"dp-max-epsilon": 8}).requires_dp  # any floor implies DP


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"dp-max-epsilon": -1}, "'dp-max-epsilon' has value '-1'; allowed: a finite number > 0"),
        ({"dp-max-epsilon": "eight"}, "'dp-max-epsilon' has value 'eight'"),
        ({"dp-max-epsilon": float("inf")}, "'dp-max-epsilon' has value 'inf'"),
        ({"dp-min-noise-multiplier": float("nan")}, "'dp-min-noise-multiplier' has value 'nan'"),
        ({"dp-max-grad-norm": True}, "'dp-max-grad-norm' has value 'True'"),
        ({"dp-max-delta": 1}, "'dp-max-delta' has value '1'; allowed: a number in \\(0, 1\\)"),
        ({"dp-required": "maybe"}, "'dp-required' has value 'maybe'; allowed: true or false"),
        ({"dp-accountants": "rdp,moments"}, "'dp-accountants' has value 'rdp,moments'; allowed: a comma"),
        ({"dp-max-epsilom": 8}, "'dp-max-epsilom' is unknown; allowed: dp-required, dp-max-epsilon"),
    ],
)
def test_bad_device_policy_values_name_the_key(node_config: dict, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        DevicePolicy.from_node_config(node_config)


def test_a_server_weaker_than_the_device_floor_is_refused() -> None:
    floor = DevicePolicy(require_dp=True, max_epsilon=8.0, min_noise_multiplier=0.8, max_delta=1e-5,
                         accountants=("rdp",))
    strong = _tier(budget_epsilon=8.0, target_epsilon=6.0)
    plan = plan_dp(strong, n=200, batch_size=16, local_epochs=1, rounds=5, accountant="rdp")
    assert floor.check(strong, plan) is None
    assert DevicePolicy().check(DPTierConfig(enabled=False)) is None  # no floor: the server decides
    assert "server sent enabled=false" in floor.check(DPTierConfig(enabled=False))
    assert "budget_epsilon 50.0 is above the device's dp-max-epsilon 8.0" in floor.check(
        _tier(budget_epsilon=50.0), plan)
    weak = _tier(noise_multiplier=0.3, budget_epsilon=8.0, delta=1e-3)
    reason = floor.check(weak, dataclasses.replace(plan, noise_multiplier=0.3, delta=1e-3, accountant="gdp"))
    assert "noise multiplier 0.3 is below" in reason and "delta 0.001 is above" in reason
    assert "accountant 'gdp' is not one of the device's dp-accountants rdp" in reason
    assert "unknown before the plan" in floor.check(strong)  # a derived noise level is checked on the plan


def _rounds(noise: dict[int, float], epsilons: dict[int, float]) -> list[p.RoundRecord]:
    return [p.RoundRecord(round=r, sampled=["phone-a"], trained=["phone-a"], train_metrics={"phone-a": {
        p.EPSILON: epsilons[r], "delta": 1e-3, "noise-multiplier": noise[r], "sample-rate": 0.2,
        "max-grad-norm": 1.0}}) for r in noise]


def test_the_privacy_report_states_each_stretch_of_rounds_and_never_less_than_the_server_saw() -> None:
    """The issue's findings: after a resume to more rounds one noise multiplier (the last) was stated for every
    round; and a ledger restored on the device made the report state its lower epsilon."""
    config = parse_config({"privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0,
                                                           "budget_epsilon": 12.0}}}})
    history = _rounds({1: 0.9, 2: 0.9, 3: 1.43, 4: 1.43}, {1: 2.0, 2: 3.0, 3: 3.5, 4: 4.0})
    result = p.FederationResult(
        clients={"phone-a": p.ClientInfo("phone-a", "phone", "site-a", 40)}, history=history,
        final={"phone-a": {p.EPSILON: 3.16}}, final_failed={}, retired={}, central_start={}, central_final={},
        central_dp={"enabled": False}, epsilon_seen={"phone-a": 4.0})
    report = build_privacy_report(result, config)
    phone = report["sample_level"]["phone-a"]
    assert [(s["rounds"], s["noise_multiplier"]) for s in phone["stretches"]] == [([1, 2], 0.9), ([3, 4], 1.43)]
    assert (phone["epsilon"], phone["epsilon_reported_last"], phone["ledger_behind"]) == (4.0, 3.16, True)
    text = render_markdown(report)
    assert "rounds 1-2: noise multiplier 0.90" in text and "rounds 3-4: noise multiplier 1.43" in text
    assert "(4.00, 1.0e-03)-DP" in text and "**Flagged:**" in text and "the server saw 4.00" in text
    honest = build_privacy_report(dataclasses.replace(result, final={"phone-a": {p.EPSILON: 4.0}}), config)
    assert not honest["sample_level"]["phone-a"]["ledger_behind"]
    assert "Flagged" not in render_markdown(honest)
    with pytest.raises(p.ProtocolError):  # a result.json is untrusted
        p.FederationResult.from_dict({**result.to_dict(), "epsilon_seen": {"phone-a": -1.0}})


def _population() -> p.FederationResult:
    """40 clients: hospital-00..09 without DP, phone-00..29 with DP-SGD and a budget of 8. phone-k spent 0.3 k
    (capped at the budget: phone-27..29 are at it); phone-00 and hospital-00 trained no round; phone-05's ledger
    now says 1.5 where the server saw 2.0 (flagged)."""
    clients = {**{f"hospital-{k:02d}": p.ClientInfo(f"hospital-{k:02d}", "hospital", "site-a", 40) for k in range(10)},
               **{f"phone-{k:02d}": p.ClientInfo(f"phone-{k:02d}", "phone", "site-b", 40) for k in range(30)}}
    spent = {f"phone-{k:02d}": min(8.0, 0.3 * k) for k in range(1, 30)}
    metrics = {name: {p.EPSILON: epsilon, "delta": 1e-3, "noise-multiplier": 1.1, "sample-rate": 0.2,
                      "max-grad-norm": 1.0} for name, epsilon in spent.items()}
    trained = [name for name in clients if name not in ("hospital-00", "phone-00")]
    return p.FederationResult(
        clients=clients, history=[p.RoundRecord(round=1, sampled=list(clients), trained=trained,
                                                train_metrics=metrics)],
        final={}, final_failed={}, retired={}, central_start={}, central_final={}, central_dp={"enabled": False},
        epsilon_seen={**spent, "phone-05": 2.0})


def test_many_clients_get_a_privacy_summary_per_tier_with_the_highest_spenders_and_every_flagged_client(
        tmp_path: Path) -> None:
    config = parse_config({"privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0,
                                                           "budget_epsilon": 8.0}}}})
    report = build_privacy_report(_population(), config)
    phone, hospital = report["summary"]["phone"], report["summary"]["hospital"]
    assert (phone["clients"], phone["dp"], phone["never_trained"], phone["at_or_above_budget"]) == (30, 30, 1, 3)
    assert phone["flagged"] == ["phone-05"] and report["sample_level"]["phone-05"]["epsilon"] == 2.0
    # sorted spends: 0, 0.3, ..., 1.2, 1.8, 2.0 (phone-05), 2.1, ..., 4.2 | 4.5, ...: the median is (4.2 + 4.5) / 2
    assert phone["epsilon"]["p50"] == pytest.approx(4.35) and phone["remaining_epsilon"]["p50"] == pytest.approx(3.65)
    # the 90th percentile lies a tenth of the way from 7.8 (phone-26) to 8.0 (phone-27)
    assert phone["epsilon"]["p90"] == pytest.approx(7.82) and phone["remaining_epsilon"]["p10"] == pytest.approx(0.18)
    assert phone["highest"] == ["phone-27", "phone-28", "phone-29", *(f"phone-{k}" for k in range(26, 19, -1))]
    assert (hospital["dp"], hospital["never_trained"], hospital["highest"]) == (0, 1, [])
    assert math.isnan(hospital["epsilon"]["p50"])
    paths = write_privacy_report(report, tmp_path)
    text = paths["md"].read_text()
    assert "| phone | 30 | 30 | 1 | 3 | 1 |" in text and "| hospital | 10 | 0 | 1 | 0 | 0 |" in text
    assert "| phone | epsilon spent | 0.87 | 2.17 | 4.35 | 6.52 | 7.82 |" in text
    assert "- **phone-29** (phone, n=40): (8.00, 1.0e-03)-DP" in text and "- **phone-20**" in text
    assert "- **phone-05**" in text and "**Flagged:**" in text  # not a high spender, but flagged: always named
    assert "phone-19" not in text and "hospital-03" not in text and "phone-01" not in text
    assert "- **hospital** (10 clients): no differential privacy" in text
    saved = json.loads(paths["json"].read_text())
    assert len(saved["sample_level"]) == 40 and saved["sample_level"]["phone-01"]["epsilon"] == pytest.approx(0.3)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
