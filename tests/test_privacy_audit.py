"""`edgemri privacy audit`: the one-run audit of the real DP-SGD path stays below the accounted epsilon, rises far
above zero without DP, and the CLI writes its report; a bad argument is one line and exit 2.

The audited runs are small (20 scans, 40 canaries, 18 noisy steps): the bound they can reach is about 1.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from edgemri.core.config import DPTierConfig, TrainSpec
from edgemri.core.data.dataset import load_dataset
from edgemri.core.privacy import attacks
from edgemri.core.privacy.dp import plan_dp
from edgemri.core.registries import load_config
from edgemri.main import main
from edgemri.models import Student
from edgemri.simulation import privacy_audit as pa

TIER = DPTierConfig(enabled=True, target_epsilon=8.0, budget_epsilon=10.0)
SPEC = TrainSpec(epochs=2, batch_size=8, lr=1e-3)
ROUNDS, CANARIES, SCANS = 3, 40, 20


@pytest.fixture(scope="module")
def audited(tiny_data: Path) -> dict:
    """One client's DP-SGD as configured and with DP off, each audited once."""
    train = load_dataset(tiny_data).train
    train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:SCANS])
    torch.manual_seed(0)
    return pa.audit_client(train, TIER, SPEC, rounds=ROUNDS, accountant="rdp", start=Student().state_dict(),
                           canaries=CANARIES, seed=0, settings=("as_configured", "dp_off"))


def test_the_audit_runs_the_planned_dp_sgd_and_its_bound_stays_below_the_accounted_epsilon(audited) -> None:
    plan = plan_dp(TIER, n=SCANS, batch_size=SPEC.batch_size, local_epochs=SPEC.epochs, rounds=ROUNDS,
                   accountant="rdp")  # what Client.dp_plan makes for this client
    configured = audited["as_configured"]
    assert configured["trained"] and configured["noise_multiplier"] == plan.noise_multiplier
    assert configured["steps"] == plan.steps_per_round * ROUNDS  # every planned noisy step, no more
    assert configured["accounted_epsilon"] == pytest.approx(plan.planned_epsilon)
    assert configured["guesses"] == 2 * (CANARIES // pa.GUESS_SHARE)
    assert 0 <= configured["empirical_epsilon"] <= configured["accounted_epsilon"]
    assert configured["empirical_at_or_below_accounted"]


def test_without_noise_and_clipping_the_bound_is_clearly_larger(audited) -> None:
    off, configured = audited["dp_off"], audited["as_configured"]
    assert off["accounted_epsilon"] is None and off["max_grad_norm"] is None  # no DP: epsilon infinite
    assert off["steps"] == configured["steps"]  # the same sampling and steps, only the noise and clipping differ
    assert off["empirical_epsilon"] >= 1.0
    assert off["empirical_epsilon"] >= configured["empirical_epsilon"] + 0.8
    assert off["correct"] > configured["correct"]


def test_margin_gain_scores_cancel_a_drift_shared_by_a_label() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    before = torch.zeros(4, 3)
    after = before.clone()
    after[:, 0] += 5.0  # every image moves towards class 0: no canary's own doing
    after[0, 0] += 1.0  # canary 0 alone moves further
    scores = attacks.margin_gain_scores(before, after, labels)
    assert int(scores.argmax()) == 0
    assert torch.allclose(scores[labels == 1], torch.zeros(2, dtype=torch.float64))
    assert float(scores[labels == 0].sum()) == pytest.approx(0.0)
    images, drawn = attacks.noise_canaries(8, 3, shape=(3, 4, 4))
    again = attacks.noise_canaries(8, 3, shape=(3, 4, 4))
    assert images.dtype == torch.uint8 and torch.equal(images, again[0]) and torch.equal(drawn, again[1])


def _write_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "seed": 0, "data": {"client_fraction": 0.0},
        "federation": {"rounds": 2, "method": "fedavg",
                       "tiers": {"hospital": {"min_examples": 20, "local_epochs": 1},
                                 "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}}},
        "privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}))
    return path


def test_the_cli_writes_the_report_with_both_epsilons(sited_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "audit"
    code = main(["privacy", "audit", "--config", str(_write_config(tmp_path / "config.yaml")), "--data-root",
                 str(sited_data), "--tier", "phone", "--canaries", "20", "--seed", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "privacy-audit.json").read_text())
    assert report["seed"] == 1 and report["config"]["federation"]["rounds"] == 2 and "torch" in report["versions"]
    phone = report["tiers"]["phone"]
    assert list(report["tiers"]) == ["phone"] and phone["dp_enabled_in_config"]
    assert set(phone["settings"]) == set(pa.SETTINGS)
    for result in phone["settings"].values():
        assert result["empirical_epsilon"] <= (result["accounted_epsilon"] or float("inf"))
    assert "empirical epsilon (95% lower bound)" in (out / "privacy-audit.md").read_text()
    assert (out / "privacy-audit.png").read_bytes()[:4] == b"\x89PNG"
    assert "privacy audit, phone:" in capsys.readouterr().out


@pytest.mark.parametrize(("argument", "value", "named"), [("--tier", "tablet", "--tier is 'tablet'")])
def test_a_bad_argument_is_one_line_and_exit_2(sited_data: Path, tmp_path: Path, capsys, argument: str, value: str,
                                               named: str) -> None:
    code = main(["privacy", "audit", "--config", str(_write_config(tmp_path / "config.yaml")), "--data-root",
                 str(sited_data), argument, value, "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err and "allowed" in err
    assert not (tmp_path / "audit").exists()
    # --canaries out of range is argparse's usage error (tests/test_cli.py); the settings refuse it too.
    with pytest.raises(pa.PrivacyAuditError, match="--canaries is 5; allowed"):
        pa.AuditSettings(canaries=5).check(load_config(tmp_path / "config.yaml"))
