"""One client of the federation: its manifest, its data, its state folder.

Flower-free: the ClientApp is a thin adapter that turns messages into calls here.
Where the client's files are comes from the node config on a real device
(``manifest``, ``data-dir``, ``state-dir``) or, in simulation, from the partition
manifests by partition id; both resolve to a ``ClientSetup`` and share one code path.
State that must outlive a process (the personal model, round counters) is saved
atomically in the state folder after every round, so a restarted client carries on.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgemri.core.checkpoint import Checkpoint, save_checkpoint
from edgemri.core.config import PrivacyConfig, TrainSpec
from edgemri.core.io import save_torch
from edgemri.core.partition import LocalData, Manifest, ManifestError, load_local_data, read_manifest
from edgemri.core.personalize import LocalTrainer, Method, State, evaluate_state, local_only, student_from
from edgemri.core.privacy import LEDGER_FILE, DPPlan, Ledger, check_dp_model, opacus_wrap, plan_dp

STATE_FILE = "client-state.pt"


@dataclass(frozen=True)
class ClientSetup:
    manifest: Path
    data_root: Path
    state_dir: Path


def resolve_setup(node_config: dict[str, Any], run_config: dict[str, Any]) -> ClientSetup:
    """Paths from the node config (deployment) or the partition id (simulation)."""
    if "manifest" in node_config:
        missing = [k for k in ("data-dir", "state-dir") if k not in node_config]
        if missing:
            raise ManifestError(f"node config has 'manifest' but lacks {', '.join(missing)}; "
                                f"start the SuperNode with --node-config \"manifest='...' data-dir='...' "
                                f"state-dir='...'\"")
        return ClientSetup(Path(str(node_config["manifest"])), Path(str(node_config["data-dir"])),
                           Path(str(node_config["state-dir"])))
    if "partition-id" not in node_config:
        raise ManifestError("node config names neither a manifest (deployment) nor a partition-id (simulation)")
    manifest = Path(str(run_config["manifests"])) / f"client-{int(node_config['partition-id']):03d}.json"
    name = read_manifest(manifest).client
    return ClientSetup(manifest, Path(str(run_config["data-root"])), Path(str(run_config["state-root"])) / name)


@dataclass
class RoundReply:
    shared: State | None  # None: the client did not train this round
    state: ClientState
    metrics: dict[str, float]
    status: str  # trained, budget-exhausted, dp-infeasible, already-trained
    reason: str


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    personal: State | None = None
    rounds_trained: int = 0
    last_round: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"personal": self.personal, "rounds_trained": self.rounds_trained, "last_round": self.last_round}


class Client:
    def __init__(self, setup: ClientSetup) -> None:
        self.setup = setup
        self.manifest: Manifest = read_manifest(setup.manifest)
        setup.state_dir.mkdir(parents=True, exist_ok=True)
        self._data: LocalData | None = None

    @property
    def name(self) -> str:
        return self.manifest.client

    @property
    def kind(self) -> str:
        return self.manifest.kind

    # -- data, decoded once per manifest and cached in the state folder ----------

    def data(self) -> LocalData:
        if self._data is None:
            digest = hashlib.sha256(self.setup.manifest.read_bytes()).hexdigest()[:16]
            cache = self.setup.state_dir / f"local-data-{digest}.pt"
            if cache.is_file():
                self._data = torch.load(cache, weights_only=False)
            else:
                self._data = load_local_data(self.manifest, self.setup.data_root)
                save_torch(cache, self._data)
        return self._data

    # -- state ---------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.setup.state_dir / STATE_FILE

    def load_state(self) -> ClientState:
        if not self.state_path.is_file():
            return ClientState()
        saved = torch.load(self.state_path, weights_only=True)
        return ClientState(saved["personal"], saved["rounds_trained"], saved["last_round"])

    def save_state(self, state: ClientState) -> None:
        save_torch(self.state_path, state.to_dict())

    # -- work ------------------------------------------------------------------

    def trainer(self, spec: TrainSpec, server_round: int, run_seed: int) -> LocalTrainer:
        seed = (run_seed * 1_000_003 + server_round * 7919 + zlib.crc32(self.name.encode())) % 2**31
        return LocalTrainer(self.data().train, spec, seed)

    # -- privacy ---------------------------------------------------------------

    @property
    def ledger_path(self) -> Path:
        return self.setup.state_dir / LEDGER_FILE

    def dp_plan(self, privacy: PrivacyConfig, spec: TrainSpec, rounds: int) -> DPPlan | None:
        tier = privacy.tier(self.kind, self.name)
        if not tier.enabled:
            return None
        return plan_dp(tier, n=self.manifest.num_examples("train"), batch_size=spec.batch_size,
                       local_epochs=spec.epochs, rounds=rounds, accountant=privacy.accountant)

    def privacy_status(self, plan: DPPlan | None) -> dict[str, float]:
        """The ledger's totals as reply metrics (scalars only)."""
        if plan is None:
            return {"dp": 0.0}
        ledger = Ledger.open(self.ledger_path, self.name)
        return {"dp": 1.0, "epsilon": ledger.epsilon(plan.delta, plan.accountant), "delta": plan.delta,
                "budget-epsilon": plan.budget_epsilon, "noise-multiplier": plan.noise_multiplier,
                "sample-rate": plan.sample_rate, "max-grad-norm": plan.max_grad_norm,
                "rounds-dp": float(len(ledger.records))}

    # -- a round ---------------------------------------------------------------

    def train_round(self, method: Method, global_state: State, state: ClientState, spec: TrainSpec,
                    server_round: int, run_seed: int, privacy: PrivacyConfig, rounds: int) -> RoundReply:
        """Train one round, or say why not (DP budget exhausted, DP infeasible for this data)."""
        trainer = self.trainer(spec, server_round, run_seed)
        plan = self.dp_plan(privacy, spec, rounds)
        ledger = None
        if plan is not None:
            if not plan.feasible:
                return RoundReply(None, state, self.privacy_status(plan), "dp-infeasible", plan.reason)
            ledger = Ledger.open(self.ledger_path, self.name)
            if server_round in ledger.rounds:  # the reply was lost after the ledger was written
                return RoundReply(None, state, self.privacy_status(plan), "already-trained",
                                  f"round {server_round} is already in the privacy ledger")
            reach = ledger.epsilon_after(plan)
            if reach > plan.budget_epsilon:
                return RoundReply(None, state, self.privacy_status(plan), "budget-exhausted",
                                  f"one more round would reach epsilon {reach:.2f} > budget {plan.budget_epsilon}")
            check_dp_model(student_from(global_state), "student")
            trainer.wrap = opacus_wrap(plan, trainer.seed)
        out = method.train_round(global_state, state.personal, trainer)
        if ledger is not None:
            # Spent before the update leaves the client, and on disk before anything else can fail.
            ledger.append(server_round, plan, int(out.metrics["steps"]))
        new_state = ClientState(out.personal, state.rounds_trained + 1, server_round)
        self.save_state(new_state)
        return RoundReply(out.shared, new_state, {**out.metrics, **self.privacy_status(plan)}, "trained", "")

    def evaluate(self, method: Method, global_state: State, state: ClientState, spec: TrainSpec,
                 server_round: int, run_seed: int) -> tuple[dict[str, float], State]:
        """Global and personalized accuracy on the client's own test split."""
        test = self.data().test
        personal = method.personalize(global_state, state.personal, self.trainer(spec, server_round, run_seed))
        metrics = {"global-accuracy": evaluate_state(global_state, test)["accuracy"],
                   "personal-accuracy": evaluate_state(personal, test)["accuracy"]}
        return metrics, personal

    def final_evaluate(self, method: Method, start: State, global_state: State, state: ClientState,
                       spec: TrainSpec, rounds: int, run_seed: int, metadata: dict[str, Any]) -> dict[str, float]:
        """The report's columns for this client; saves its personalized checkpoint."""
        metrics, personal = self.evaluate(method, global_state, state, spec, rounds, run_seed)
        test = self.data().test
        local = local_only(start, self.trainer(spec, 0, run_seed), rounds)
        metrics["start-accuracy"] = evaluate_state(start, test)["accuracy"]
        metrics["local-only-accuracy"] = evaluate_state(local, test)["accuracy"]
        save_checkpoint(self.setup.state_dir / "personalized.pt", Checkpoint(
            model="student", state_dict=personal, role="personalized", config=metadata.get("config", {}),
            seed=run_seed, metrics={k: float(v) for k, v in metrics.items()},
            data_fingerprint=hashlib.sha256(self.setup.manifest.read_bytes()).hexdigest()[:16],
        ))
        return metrics
