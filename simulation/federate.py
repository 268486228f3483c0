"""`edgemri federate`: partition, run the Flower app in simulation, add the pooled and oracle references.

Everything of a run lives in its folder: the resolved config, the manifests, each
client's state folder, the server's checkpoints, Flower's home and logs, the reports.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from edgemri.core.config import Config, ConfigError
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.images import HEAD_KEY
from edgemri.core.data.partition import ensure_manifests, read_manifest
from edgemri.core.errors import EdgemriError
from edgemri.core.federation.personalize import create_method
from edgemri.core.federation.protocol import APP_ROOT, OWNER_LOCK, REFERENCES_FILE, ProtocolError, parse_references
from edgemri.core.io import owner_lock, write_json, write_text
from edgemri.core.privacy.dp import PrivacyError, check_dp_model, plan_dp
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint
from edgemri.core.training.distill import resume_settings
from edgemri.core.untrusted import read_json
from edgemri.models import build_model
from edgemri.simulation.baselines import reference_accuracies, references_key
from edgemri.simulation.flower_run import FlowerRunError, run_simulation

log = logging.getLogger(__name__)

# The folder holding pyproject.toml's [tool.flwr.app]: the same app `flwr run .` runs.
APP_DIR = APP_ROOT


@dataclass(frozen=True)
class FederationRun:
    out: Path
    report: dict
    paths: dict[str, Path]


def plan_privacy(config: Config, manifests: list[Path]) -> dict[str, dict]:
    """Each DP client's plan, before any training: bad settings fail here, clearly."""
    method = create_method(config.federation)
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
        if tier.personal_epsilon is not None and not method.fine_tunes:
            raise PrivacyError(f"privacy.tiers.{manifest.kind}.personal_epsilon is set, but federation.method "
                               f"{method.name!r} does not make the personal model by one fine-tune; use fedavg-ft")
        if not plan.feasible:
            log.warning("%s will not train with DP: %s", manifest.client, plan.reason)
    return plans


class RunFolderError(EdgemriError):
    """A run folder that already holds another run, or that a run left incomplete."""


class ProgressPrinter:
    """Prints the ServerApp's per-round lines (server/progress.log) to the terminal as they land."""

    def __init__(self, path: Path, stream: TextIO | None = None) -> None:
        self.path, self.stream, self.offset = path, stream or sys.stdout, 0

    def __call__(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            print(f"  {line}", file=self.stream, flush=True)


def check_start_split(config: Config, start_config: dict, start_checkpoint: Path) -> None:
    """Under new-sites the start model must have been distilled on the same source sites (else it saw the clients)."""
    wanted = resume_settings(config.to_dict())["federation"]
    if wanted["scenario"] != "new-sites":
        return
    made = resume_settings(start_config)["federation"] if start_config else {"scenario": "unknown"}
    split = {k: start_config.get("data", {}).get(k) for k in ("split_seed",)} if start_config else {}
    if made != wanted or split.get("split_seed") != config.data.split_seed:
        raise ConfigError(f"federation.scenario is new-sites, but {start_checkpoint} was distilled under "
                          f"{made['scenario']} (source sites {made.get('source_sites')}, split seed "
                          f"{split.get('split_seed')}): it may have seen the client sites; distill again with "
                          "the same federation.scenario, federation.source_sites and data.split_seed")


def federate(config: Config, *, data_root: Path, out: Path, start_checkpoint: Path, resume: bool = False,
             audit: bool = False, timeout_s: float = 3600.0, references_from: Path | None = None,
             progress: bool = True) -> FederationRun:
    """The federation in Flower's simulation engine; the ServerApp writes the reports (once). ``progress``: the
    decode bars and the ServerApp's per-round lines as they land (False: neither, as ``--quiet`` asks)."""
    out = out.resolve()
    if (out / "server").exists() and not resume:
        raise RunFolderError(f"{out} already holds a federation run; add --resume to continue it "
                             f"or choose another --out")
    start = load_checkpoint(start_checkpoint)  # fail early on a missing or corrupt start model
    if start.model != "student":
        raise ConfigError(f"the federation starts from a student; {start_checkpoint} holds {start.model!r}")
    check_start_split(config, start.config, start_checkpoint)
    if start.preprocessing.get(HEAD_KEY, "none") != "none":
        raise ConfigError(f"{start_checkpoint} takes scans after the head step {start.preprocessing[HEAD_KEY]!r}, "
                          f"which the federation's clients do not apply yet; start from a student without one")
    out.mkdir(parents=True, exist_ok=True)
    with owner_lock(out / OWNER_LOCK, RunFolderError) as lock:
        return _federate(config, start, data_root, out, start_checkpoint, resume, audit, timeout_s, references_from,
                         lock, progress)


def _federate(config: Config, start: Checkpoint, data_root: Path, out: Path, start_checkpoint: Path, resume: bool,
              audit: bool, timeout_s: float, references_from: Path | None, lock: Path,
              progress: bool) -> FederationRun:
    """``federate`` once it holds the run folder's lock: the apps it starts stop when the lock's holder dies."""
    config_path = write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    manifests = _prepare_clients(config, start, data_root, out, references_from, progress)
    run_config = {
        "config": str(config_path), "run-dir": str(out), "data-root": str(data_root.resolve()),
        "manifests": str(out / "manifests"), "state-root": str(out / "clients"),
        "start-checkpoint": str(start_checkpoint.resolve()), "num-clients": len(manifests), "resume": resume,
        "audit-dir": str(out / "audit") if audit else "", "owner-lock": str(lock), "pool-cache": str(out / "pools"),
    }
    progress_log = out / "server" / "progress.log"
    progress_log.unlink(missing_ok=True)
    result_file = out / "server" / "result.json"
    outcome = run_simulation(APP_DIR, out, run_config, num_supernodes=len(manifests), timeout_s=timeout_s,
                             on_poll=ProgressPrinter(progress_log) if progress else None)
    if not outcome.ok or not result_file.is_file():
        raise FlowerRunError(f"federation run {outcome.run_id} ended {outcome.status}: "
                             f"{outcome.error or outcome.details.strip()[-300:]}; "
                             f"logs: {out / 'logs'}")
    report = json.loads((out / "federation.json").read_text())
    return FederationRun(out, report, {"md": out / "federation.md", "json": out / "federation.json",
                                       "png": out / "federation.png", "privacy_md": out / "privacy.md"})


def _prepare_clients(config: Config, start: Checkpoint, data_root: Path, out: Path, references_from: Path | None,
                     progress: bool) -> list[Path]:
    """The clients' manifests, privacy plans and (where asked) references, from the decoded data set, which is
    released when this returns: the runner holds no scans while the federation runs."""
    dataset = load_dataset(data_root, cache_dir=config.data.cache_dir, progress=progress)
    manifests = ensure_manifests(out / "manifests", dataset, data_root.resolve(), config, progress=progress)
    log.info("%d clients: %s", len(manifests), ", ".join(read_manifest(m).client for m in manifests))
    write_json(out / "privacy-plan.json", plan_privacy(config, manifests))
    # The pooled and oracle references need the clients' data in one place: only this runner has it, never the
    # apps. ``references_from`` (a run on the same clients, start and seed) saves computing them again.
    if config.federation.references:
        clients = [read_manifest(m) for m in manifests]
        key = references_key(clients, start.state_dict, config)
        references = _cached_references(references_from or out, key)  # a resumed run keeps its own
        if references is None:
            references = reference_accuracies(clients, dataset, start.state_dict, config, str(data_root))
        write_json(out / REFERENCES_FILE, {"key": key, "clients": references})
    else:
        (out / REFERENCES_FILE).unlink(missing_ok=True)
    return manifests


def _cached_references(run_dir: Path | None, key: str) -> dict[str, dict[str, float]] | None:
    """Another run's references, if they were computed from exactly the same inputs."""
    path = run_dir / REFERENCES_FILE if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        saved = read_json(path, ProtocolError, nonfinite=True)
        return parse_references(saved, str(path)) if isinstance(saved, dict) and saved.get("key") == key else None
    except ProtocolError:  # unreadable or malformed: compute them again
        return None
