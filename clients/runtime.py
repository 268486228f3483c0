"""One client of the federation: its manifest, its data, its state folder.

Flower-free: the ClientApp is a thin adapter that turns messages into calls here.
Where the client's files are comes from the node config on a real device
(``manifest``, ``data-dir``, ``state-dir``) or, in simulation, from the partition
manifests by partition id; both resolve to a ``ClientSetup`` and share one code path.
State that must outlive a process (the personal model, round counters) is saved
atomically in the state folder after every round, so a restarted client carries on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgemri.core.data.dataset import ArraySplit
from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.data.partition import (
    LocalData,
    Manifest,
    ManifestError,
    load_local_data,
    load_local_data_cache,
    load_pool,
    load_pool_cache,
    pool_cache_name,
    read_manifest,
    save_local_data,
    save_pool,
)
from edgemri.core.federation.personalize import (
    METHODS,
    LocalTrainer,
    Method,
    RoundOutput,
    State,
    evaluate_state,
    exportable,
    local_only,
    pool_accuracy,
    predicted_classes,
    state_digest,
    student_from,
)
from edgemri.core.federation.protocol import (
    BEST_GLOBAL_ACCURACY,
    EPSILON,
    GLOBAL_ACCURACY,
    GLOBAL_VAL_ACCURACY,
    LEDGER_RECORDS,
    LOCAL_ONLY_ACCURACY,
    MAX_EPSILON_REPORTED,
    PERSONAL_ACCURACY,
    PERSONAL_DP,
    PERSONAL_NOISE,
    PERSONAL_VAL_ACCURACY,
    POOL_EXAMPLES,
    POOL_PREFIX,
    START_ACCURACY,
    VAL_EXAMPLES,
    LedgerFloor,
    RoundInstructions,
    Status,
    check_client_name,
    run_path,
)
from edgemri.core.privacy.dp import DPPlan, PrivacyError, check_dp_model, opacus_wrap, plan_dp
from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from edgemri.core.untrusted import check_record, mapping_of, number, text
from edgemri.models import NormStudent, Student

STATE_FILE = "client-state.pt"  # the one checkpoint format, kind "client"
SENT_FILE = "sent-update.pt"  # the last DP round's update, to send again if its reply was lost (kind "client")
_SENT = {"round": number(1, 2**31 - 1, integer=True), "fingerprint": text(64),
         "metrics": mapping_of(text(100), number(-MAX_EPSILON_REPORTED, MAX_EPSILON_REPORTED))}
SHARED_MODELS = (START_ACCURACY, GLOBAL_ACCURACY, BEST_GLOBAL_ACCURACY)  # the server's: every client gets the same
_MAX_SHARED_PREDICTIONS = 16  # a run has three shared models; a few sites' worth fit


# The shared models' predictions on a site pool, per process: in simulation one process serves many clients of a
# site, and each would otherwise score the same models on the same scans (most of a population's final evaluation).
_shared_predictions: dict[tuple[str, str], torch.Tensor] = {}


def shared_predictions(state: State, pool: ArraySplit, pool_key: str) -> torch.Tensor:
    """``predicted_classes(state, pool)``, computed once per process for each state and pool (``pool_key``)."""
    key = (state_digest(state), pool_key)
    if key not in _shared_predictions:
        if len(_shared_predictions) >= _MAX_SHARED_PREDICTIONS:
            _shared_predictions.clear()
        _shared_predictions[key] = predicted_classes(state, pool)
    return _shared_predictions[key]


@dataclass(frozen=True)
class ClientSetup:
    manifest: Path
    data_root: Path
    state_dir: Path
    pool_dir: Path | None = None  # where the site pool's decoded cache lives; None: the state folder




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
    partition_id = node_config["partition-id"]
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < 100_000:
        raise ManifestError(f"node config partition-id is {partition_id!r}; expected an integer in [0, 100000)")
    manifest = run_path(run_config, "manifests") / f"client-{partition_id:03d}.json"
    name = check_client_name(read_manifest(manifest).client)  # a name, so the state folder stays inside state-root
    # A site's simulated clients share one decoded pool: a thousand phones at a site would each cache its hundreds
    # of scans otherwise (gigabytes, and a decode per client).
    pool_dir = run_path(run_config, "pool-cache") if run_config.get("pool-cache") else None
    return ClientSetup(manifest, run_path(run_config, "data-root"), run_path(run_config, "state-root") / name,
                       pool_dir)


@dataclass
class RoundReply:
    shared: State | None  # None: the client did not train this round
    state: ClientState
    metrics: dict[str, float]
    status: Status
    reason: str  # for the device's own log; only the status travels


def round_fingerprint(global_state: State, instructions: RoundInstructions) -> str:
    """What a round's training depends on: the global model and the instructions (the ledger floor aside, a check
    the server asks for, not a training input)."""
    config = dataclasses.replace(instructions, ledger_floor=LedgerFloor()).to_config()
    return hashlib.sha256((state_digest(global_state) + json.dumps(config, sort_keys=True)).encode()).hexdigest()


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    personal: State | None = None
    rounds_trained: int = 0
    last_round: int = 0


class Client:
    def __init__(self, setup: ClientSetup, policy: DevicePolicy | None = None) -> None:
        self.setup = setup
        self.policy = policy or DevicePolicy()
        self.manifest: Manifest = read_manifest(setup.manifest)
        setup.state_dir.mkdir(parents=True, exist_ok=True)
        self._data: LocalData | None = None
        self._pool: ArraySplit | None = None

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
            cache = self.setup.state_dir / f"local-data-{digest}.npz"
            self._data = load_local_data_cache(cache, self.manifest)
            if self._data is None:
                self._data = load_local_data(self.manifest, self.setup.data_root)
                save_local_data(cache, self._data)
        return self._data

    def site_pool(self) -> ArraySplit | None:
        """The evaluation pool of this client's site that its manifest lists, if it lists one; decoded once and
        cached under its files' digest (``pool_dir``), checked against the manifest whenever it is read."""
        if not any(f.split == "pool" for f in self.manifest.files):
            return None
        if self._pool is None:
            cache = (self.setup.pool_dir or self.setup.state_dir) / pool_cache_name(self.manifest)
            self._pool = load_pool_cache(cache, self.manifest)
            if self._pool is None:
                self._pool = load_pool(self.manifest, self.setup.data_root)
                save_pool(cache, self._pool)
        return self._pool

    # -- state ---------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.setup.state_dir / STATE_FILE

    def load_state(self) -> ClientState:
        if not self.state_path.is_file():
            return ClientState()
        saved = load_checkpoint(self.state_path, kind="client")
        counters = saved.extra.get("counters", {})
        rounds_trained, last_round = counters.get("rounds_trained", 0), counters.get("last_round", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1_000_000
                   for v in (rounds_trained, last_round)):
            raise ManifestError(f"{self.state_path}: round counters are not small non-negative integers")
        return ClientState(saved.state_dict or None, rounds_trained, last_round)

    def save_state(self, state: ClientState) -> None:
        personal = state.personal or {}
        # FedBN's personal norms are keys of the training-time NormStudent, not of the student.
        model = "norm-student" if any(k.startswith(NormStudent.NORM_PREFIX) for k in personal) else "student"
        save_checkpoint(self.state_path, Checkpoint(
            model=model, kind="client", state_dict=personal, role=f"client state of {self.name}",
            step=state.last_round,
            extra={"counters": {"rounds_trained": state.rounds_trained, "last_round": state.last_round}}))

    @property
    def sent_path(self) -> Path:
        return self.setup.state_dir / SENT_FILE

    def save_sent(self, server_round: int, fingerprint: str, shared: State, metrics: dict[str, float]) -> None:
        save_checkpoint(self.sent_path, Checkpoint(
            model="student", kind="client", state_dict=shared, role=f"update sent by {self.name}", step=server_round,
            extra={"sent": {"round": server_round, "fingerprint": fingerprint,
                            "metrics": {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}}}))

    def sent_update(self, server_round: int, fingerprint: str) -> tuple[State, dict[str, float]] | None:
        """The update this device sent for ``server_round`` and its metrics, if it was trained from exactly the
        global model and instructions that ``fingerprint`` names; else None."""
        if not self.sent_path.is_file():
            return None
        saved = load_checkpoint(self.sent_path, kind="client")
        sent = check_record(saved.extra.get("sent"), _SENT, str(self.sent_path), CheckpointError)
        if sent["round"] != server_round or sent["fingerprint"] != fingerprint:
            return None
        return check_state_dict(Student(), saved.state_dict, str(self.sent_path), partial=True), sent["metrics"]

    # -- work ------------------------------------------------------------------

    def trainer(self, instructions: RoundInstructions, server_round: int | None = None) -> LocalTrainer:
        """This client's trainer for a round (``server_round`` overrides the instructions', e.g. 0 for baselines)."""
        server_round = instructions.server_round if server_round is None else server_round
        seed = (instructions.seed * 1_000_003 + server_round * 7919 + zlib.crc32(self.name.encode())) % 2**31
        data = self.data()
        return LocalTrainer(data.train, instructions.spec, seed,
                            personal=instructions.federation.tier(self.kind).personal, val=data.val)

    # -- privacy ---------------------------------------------------------------

    @property
    def ledger_path(self) -> Path:
        return self.setup.state_dir / LEDGER_FILE

    def open_ledger(self, instructions: RoundInstructions, plan: DPPlan) -> Ledger:
        """This client's privacy ledger, verified in itself and against the floor the server sent back."""
        ledger = Ledger.open(self.ledger_path, self.name)
        floor = instructions.ledger_floor
        ledger.check_floor(floor.records, floor.epsilon, plan.delta, plan.accountant)
        return ledger

    def dp_plan(self, instructions: RoundInstructions) -> DPPlan | None:
        tier = instructions.privacy.tier(self.kind, self.name)
        if not tier.enabled:
            return None
        spec = instructions.spec
        return plan_dp(tier, n=self.manifest.num_examples("train"), batch_size=spec.batch_size,
                       local_epochs=spec.epochs, rounds=instructions.federation.rounds,
                       accountant=instructions.privacy.accountant)

    def personal_dp_plan(self, instructions: RoundInstructions) -> DPPlan | None:
        """The DP plan of the personal fine-tune (privacy.tiers.<kind>.personal_epsilon), else None: the
        noise that spends that epsilon in one run of the personal recipe."""
        tier = instructions.privacy.tier(self.kind, self.name)
        if not tier.enabled or tier.personal_epsilon is None:
            return None
        personal = dataclasses.replace(tier, noise_multiplier=None, target_epsilon=tier.personal_epsilon)
        recipe = instructions.federation.tier(self.kind).personal
        return plan_dp(personal, n=self.manifest.num_examples("train"), batch_size=instructions.spec.batch_size,
                       local_epochs=recipe.epochs, rounds=1, accountant=instructions.privacy.accountant)

    def personal_under_dp(self, method: Method, trainer: LocalTrainer, instructions: RoundInstructions
                          ) -> dict[str, float]:
        """Put the personal fine-tune under DP-SGD where the tier asks for it: its ledger entry (stage "personal")
        is written first, so a crash can only over-count. Returns its metrics; where the plan is infeasible or
        the budget has no room, the fine-tune does not run (the personal model is the global one) and the
        metrics say so. Never trains the personal recipe outside DP when DP was asked for."""
        plan = self.personal_dp_plan(instructions)
        if plan is None:
            return {}
        if not method.fine_tunes:
            raise PrivacyError(f"privacy.tiers.{self.kind}.personal_epsilon is set, but method {method.name!r} does "
                               f"not make its personal model by one fine-tune of the student; use fedavg-ft")
        ledger = self.open_ledger(instructions, plan)
        # The device's own floor binds the fine-tune as it binds every round (budget, noise, clipping, delta).
        refused = self.policy.check(instructions.privacy.tier(self.kind, self.name), plan)
        if refused or not plan.feasible or ledger.epsilon_after(plan) > plan.budget_epsilon:
            return {PERSONAL_DP: 0.0}
        check_dp_model(Student(), "student")
        ledger.append(instructions.federation.rounds, plan, plan.steps_per_round, stage="personal")
        trainer.personal_wrap = opacus_wrap(plan, trainer.seed + 1)
        return {PERSONAL_DP: 1.0, PERSONAL_NOISE: plan.noise_multiplier}

    def privacy_status(self, plan: DPPlan | None) -> dict[str, float]:
        """The ledger's totals as reply metrics (scalars only)."""
        if plan is None:
            return {"dp": 0.0}
        ledger = Ledger.open(self.ledger_path, self.name)
        return {"dp": 1.0, EPSILON: ledger.epsilon(plan.delta, plan.accountant), "delta": plan.delta,
                "budget-epsilon": plan.budget_epsilon, "noise-multiplier": plan.noise_multiplier,
                "sample-rate": plan.sample_rate, "max-grad-norm": plan.max_grad_norm,
                LEDGER_RECORDS: float(len(ledger.records))}

    # -- a round ---------------------------------------------------------------

    def train_round(self, method: Method, global_state: State, state: ClientState,
                    instructions: RoundInstructions) -> RoundReply:
        """Train one round, or say why not (the device's privacy floor, DP budget, DP infeasible)."""
        check_state_dict(Student(), global_state, "the server's global model")
        server_round = instructions.server_round
        plan = self.dp_plan(instructions)
        if refusal := self.policy.check(instructions.privacy.tier(self.kind, self.name), plan):
            return RoundReply(None, state, {}, Status.POLICY_REFUSED, refusal)
        ledger = None
        if plan is not None:
            if not plan.feasible:
                return RoundReply(None, state, self.privacy_status(plan), Status.DP_INFEASIBLE, plan.reason)
            ledger = self.open_ledger(instructions, plan)
            if server_round in ledger.rounds:  # the reply was lost after the ledger was written
                if sent := self.sent_update(server_round, round_fingerprint(global_state, instructions)):
                    # The same release again (same model, same instructions): it spends no more privacy, and a
                    # server that lost the reply (a SuperLink restarted mid-round) does not lose the round.
                    return RoundReply(sent[0], state, {**sent[1], **self.privacy_status(plan)}, Status.TRAINED,
                                      f"round {server_round} sent again")
                return RoundReply(None, state, self.privacy_status(plan), Status.ALREADY_TRAINED,
                                  f"round {server_round} is already in the privacy ledger")
            reach = ledger.epsilon_after(plan)
            if reach > plan.budget_epsilon:
                return RoundReply(None, state, self.privacy_status(plan), Status.BUDGET_EXHAUSTED,
                                  f"one more round would reach epsilon {reach:.2f} > budget {plan.budget_epsilon}")
        out = self.local_training(method, global_state, state.personal, instructions, plan)
        if ledger is not None:
            # Spent before the update leaves the client, and on disk before anything else can fail.
            ledger.append(server_round, plan, int(out.metrics["steps"]))
        new_state = ClientState(out.personal, state.rounds_trained + 1, server_round)
        self.save_state(new_state)
        if ledger is not None:  # only a round in the ledger is refused a second training; it is sent again
            self.save_sent(server_round, round_fingerprint(global_state, instructions), out.shared, out.metrics)
        return RoundReply(out.shared, new_state, {**out.metrics, **self.privacy_status(plan)}, Status.TRAINED, "")

    def local_training(self, method: Method, global_state: State, personal: State | None,
                       instructions: RoundInstructions, plan: DPPlan | None) -> RoundOutput:
        """The round's training itself, once ``train_round``'s checks passed: the tier's trainer and seed, and
        DP-SGD through Opacus when ``plan`` is given (feasible). A privacy attack replays exactly this."""
        trainer = self.trainer(instructions)
        if plan is not None:
            check_dp_model(student_from(global_state), "student")
            trainer.wrap = opacus_wrap(plan, trainer.seed)
        return method.train_round(global_state, personal, trainer)

    def evaluate(self, method: Method, global_state: State, state: ClientState, instructions: RoundInstructions
                 ) -> dict[str, float]:
        """A round's metrics: the global model on the test and validation splits (federated validation: the
        server keeps the best round's model), and the personal model where the method keeps one every round
        (a model made only at the end is not trained every round just for a curve)."""
        check_state_dict(Student(), global_state, "the server's global model")
        test, val = self.data().test, self.data().val
        metrics = {GLOBAL_ACCURACY: evaluate_state(global_state, test)["accuracy"]}
        if method.keeps_personal_state:
            personal = method.personalize(global_state, state.personal, self.trainer(instructions))
            metrics[PERSONAL_ACCURACY] = evaluate_state(personal, test)["accuracy"]
        if len(val):
            metrics.update({GLOBAL_VAL_ACCURACY: evaluate_state(global_state, val)["accuracy"],
                            VAL_EXAMPLES: float(len(val))})
        return metrics

    def final_evaluate(self, method: Method, start: State, best: State, global_state: State, state: ClientState,
                       instructions: RoundInstructions) -> dict[str, float]:
        """The report's columns for this client; saves its personalized model (the one checkpoint format).

        The personal model starts from the final global model: federated validation over a few dozen
        hospital scans is too coarse to pick the base (the round it prefers, ``best``, is scored as a
        reference). On the site pool, under label skew, accuracy is mixed by this client's class mix."""
        for model, what in ((start, "start"), (best, "best global"), (global_state, "global")):
            check_state_dict(Student(), model, f"the server's {what} model")
        data = self.data()
        trainer = self.trainer(instructions)
        personal_dp = self.personal_under_dp(method, trainer, instructions)
        personal = method.personalize(global_state, state.personal, trainer) if personal_dp.get(PERSONAL_DP, 1.0) \
            else global_state
        trainer.personal_wrap = None  # the references below (local-only, compared methods) are the benchmark's
        models = {START_ACCURACY: start, GLOBAL_ACCURACY: global_state, BEST_GLOBAL_ACCURACY: best,
                  PERSONAL_ACCURACY: personal}
        if instructions.federation.references:  # a model of its own to train and score: off in a population run
            models[LOCAL_ONLY_ACCURACY] = local_only(start, self.trainer(instructions, server_round=0),
                                                     instructions.federation.rounds)
        for name in instructions.federation.compare_methods:  # same global model, same images: paired
            models[f"{PERSONAL_ACCURACY}@{name}"] = METHODS[name](instructions.federation).personalize(
                global_state, state.personal, trainer)
        metrics = {key: evaluate_state(model, data.test)["accuracy"] for key, model in models.items()} | personal_dp
        if len(data.val):
            metrics.update({GLOBAL_VAL_ACCURACY: evaluate_state(global_state, data.val)["accuracy"],
                            VAL_EXAMPLES: float(len(data.val))})
            if not (method.selects_on_validation and trainer.personal.select == "val"):  # else it is in-sample
                metrics[PERSONAL_VAL_ACCURACY] = evaluate_state(personal, data.val)["accuracy"]
        if pool := self.site_pool():  # hundreds of held-out scans of this client's site: the primary metric
            weights = self.class_mix() if instructions.federation.partition.label_skew_alpha is not None else None
            pool_key = pool_cache_name(self.manifest)
            for key, model in models.items():
                predictions = (shared_predictions(model, pool, pool_key) if key in SHARED_MODELS
                               else predicted_classes(model, pool))
                metrics[POOL_PREFIX + key] = pool_accuracy(predictions, pool.labels, weights)
            metrics[POOL_EXAMPLES] = float(len(pool))
        exported, preprocessing = exportable(personal)
        save_checkpoint(self.setup.state_dir / "personalized.pt", Checkpoint(
            model="student", state_dict=exported, role="personalized", preprocessing=preprocessing,
            config={"federation": json.loads(json.dumps(dataclasses.asdict(instructions.federation)))},
            seed=instructions.seed,
            metrics={k: float(v) for k, v in metrics.items()},
            data_fingerprint=hashlib.sha256(self.setup.manifest.read_bytes()).hexdigest()[:16],
        ))
        return metrics

    def class_mix(self) -> torch.Tensor:
        """This client's class shares over its own labelled scans (train, val and test)."""
        data = self.data()
        labels = torch.cat([data.train.labels, data.val.labels, data.test.labels])
        counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).float()
        return counts / counts.sum()
