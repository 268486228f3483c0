"""`edgemri federate`: partition, run the Flower app in simulation, add the pooled baseline.

Everything of a run lives in its folder: the resolved config, the manifests, each
client's state folder, the server's checkpoints, Flower's home and logs, the reports.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgemri.core.checkpoint import load_checkpoint
from edgemri.core.config import Config, ConfigError
from edgemri.core.data import load_dataset
from edgemri.core.io import write_json, write_text
from edgemri.core.partition import partition, read_manifest, write_manifests
from edgemri.core.privacy import PrivacyError, check_dp_model, plan_dp
from edgemri.models import build_model
from edgemri.reports.federation import build_federation_report, write_federation_report
from edgemri.reports.privacy import privacy_report_for_run
from edgemri.simulation.baselines import manifest_paths, pooled_accuracy
from edgemri.simulation.flower_run import FlowerRunError, run_simulation

log = logging.getLogger(__name__)

# The folder holding pyproject.toml's [tool.flwr.app]: the same app `flwr run .` runs.
APP_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FederationRun:
    out: Path
    report: dict
    paths: dict[str, Path]


def prepare_manifests(config: Config, data_root: Path, out: Path) -> list[Path]:
    """Write one manifest per client (kept as they are when the run resumes)."""
    folder = out / "manifests"
    existing = manifest_paths(folder)
    if existing:
        return existing
    dataset = load_dataset(data_root, cache_dir=config.data.cache_dir)
    return write_manifests(partition(dataset.train, data_root, config), folder)


def plan_privacy(config: Config, manifests: list[Path]) -> dict[str, dict]:
    """Each DP client's plan, before any training: bad settings fail here, clearly."""
    plans = {}
    for path in manifests:
        manifest = read_manifest(path)
        tier = config.privacy.tier(manifest.kind, manifest.client)
        if not tier.enabled:
            continue
        check_dp_model(build_model("student"), "student")
        spec = config.federation.tier(manifest.kind).train_spec()
        plan = plan_dp(tier, n=manifest.num_examples("train"), batch_size=spec.batch_size,
                       local_epochs=spec.epochs, rounds=config.federation.rounds, accountant=config.privacy.accountant)
        if plan.one_round_epsilon > plan.budget_epsilon:
            raise PrivacyError(f"{manifest.client}: budget_epsilon {plan.budget_epsilon} is too small for even one "
                               f"round (one round spends epsilon {plan.one_round_epsilon:.2f} at noise "
                               f"{plan.noise_multiplier})")
        plans[manifest.client] = plan.as_dict()
        if not plan.feasible:
            log.warning("%s will not train with DP: %s", manifest.client, plan.reason)
    return plans


def federate(config: Config, *, data_root: Path, out: Path, start_checkpoint: Path, resume: bool = False,
             audit: bool = False, timeout_s: float = 3600.0) -> FederationRun:
    out = out.resolve()
    if (out / "server").exists() and not resume:
        raise FileExistsError(f"{out} already holds a federation run; add --resume to continue it "
                              f"or choose another --out")
    start = load_checkpoint(start_checkpoint)  # fail early on a missing or corrupt start model
    if start.model != "student":
        raise ConfigError(f"the federation starts from a student; {start_checkpoint} holds {start.model!r}")
    out.mkdir(parents=True, exist_ok=True)
    config_path = write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    manifests = prepare_manifests(config, data_root.resolve(), out)
    log.info("%d clients: %s", len(manifests), ", ".join(read_manifest(p).client for p in manifests))
    write_json(out / "privacy-plan.json", plan_privacy(config, manifests))
    run_config = {
        "config": str(config_path), "run-dir": str(out), "data-root": str(data_root.resolve()),
        "manifests": str(out / "manifests"), "state-root": str(out / "clients"),
        "start-checkpoint": str(start_checkpoint.resolve()), "num-clients": len(manifests), "resume": resume,
        "audit-dir": str(out / "audit") if audit else "",
    }
    outcome = run_simulation(APP_DIR, out, run_config, num_supernodes=len(manifests), timeout_s=timeout_s)
    if not outcome.ok:
        raise FlowerRunError(f"federation run {outcome.run_id} ended {outcome.status}: "
                             f"{outcome.details.strip()[-1500:]}\nlogs: {out / 'logs'}")
    result = json.loads((out / "server" / "result.json").read_text())
    dataset = load_dataset(data_root, cache_dir=config.data.cache_dir)
    pooled = pooled_accuracy([read_manifest(p) for p in manifests], dataset, start.state_dict, config)
    report = build_federation_report(result, config.to_dict(), pooled)
    report["flower"] = {"run_id": outcome.run_id, "seconds": outcome.seconds}
    paths = write_federation_report(report, out)
    paths.update({f"privacy_{k}": v for k, v in privacy_report_for_run(out).items()})
    return FederationRun(out, report, paths)
