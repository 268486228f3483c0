"""The contract between the server and the clients: what each message holds, typed and validated.

Flower-free, so both sides (``server/`` and ``clients/``) import it and neither imports the
other. Every value read from the other side is untrusted: the parsers here check types and
ranges and raise ``ProtocolError`` (one line, no paths) instead of letting a bad value through.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgemri.core.config import Config, FederationConfig, PrivacyConfig, Registries, TrainSpec, from_dict
from edgemri.core.errors import EdgemriError
from edgemri.core.io import owner_gone
from edgemri.core.untrusted import (
    Check,
    check_record,
    check_value,
    mapping_of,
    number,
    one_of,
    parse_json,
    read_json,
    text,
)


class ProtocolError(EdgemriError):
    """A message or run setting does not follow the server/client contract."""


# The folder holding pyproject.toml's [tool.flwr.app] (the checkout): relative paths of the run config
# are taken from here, whatever the working directory of the process Flower starts an app in.
APP_ROOT = Path(__file__).resolve().parents[2]

# Records inside a message's RecordDict.
ARRAYS, CONFIG, METRICS, INFO, START, BEST = "arrays", "config", "metrics", "info", "start", "best"

# The key Flower's client-side DP wrapper writes into the TRAIN config and its ``fixedclipping_mod`` reads.
# Flower keeps this constant outside its public API, so it is restated here; a test checks the two agree.
CLIPPING_NORM_KEY = "clipping_norm"


class Status(StrEnum):
    """What a client did with a round: coded, so no free text (paths, exception messages) leaves a device."""

    TRAINED = "trained"
    BUDGET_EXHAUSTED = "budget-exhausted"  # its sample-level DP budget cannot afford another round
    DP_INFEASIBLE = "dp-infeasible"  # too little data for DP-SGD at its settings
    ALREADY_TRAINED = "already-trained"  # the round is in its ledger: a reply was lost
    POLICY_REFUSED = "policy-refused"  # the server asked for weaker privacy than the device allows
    FAILED = "failed"  # anything else; the reason is a code, the details stay in the device's log

    @property
    def retires(self) -> bool:
        """A client in this state will never train again in this run."""
        return self in (Status.BUDGET_EXHAUSTED, Status.DP_INFEASIBLE, Status.POLICY_REFUSED)


class FailureCode(StrEnum):
    """Why a client failed a round (sent by the client) or was refused (decided by the server)."""

    DATA = "data-error"  # its images or manifest could not be read
    PRIVACY = "privacy-error"  # its ledger or DP plan is broken
    CONFIG = "config-error"  # the server's instructions did not parse
    INTERNAL = "internal-error"  # a bug: see the device's log
    NO_REPLY = "no-reply"
    # Flower answered for the client (its node was gone, or its reply was lost in the SuperLink): not its fault
    UNAVAILABLE = "unavailable"
    BAD_REPLY = "bad-reply"  # the server refused the reply (shape, values, metrics)
    LEDGER_ROLLBACK = "ledger-rollback"  # its ledger went below what it reported before (server or device saw it)
    NOT_CLIPPED = "not-clipped"  # client-side clipping was asked for and the update is larger
    UPDATE_TOO_LARGE = "update-too-large"  # the update's norm exceeds federation.max_update_norm


# Metric keys (MetricRecord) both sides use.
NUM_EXAMPLES = "num-examples"
ROUNDS_TRAINED = "rounds-trained"
GLOBAL_ACCURACY, PERSONAL_ACCURACY = "global-accuracy", "personal-accuracy"
START_ACCURACY, LOCAL_ONLY_ACCURACY = "start-accuracy", "local-only-accuracy"
BEST_GLOBAL_ACCURACY = "best-global-accuracy"  # the global model federated validation preferred
GLOBAL_VAL_ACCURACY, VAL_EXAMPLES = "global-val-accuracy", "val-examples"  # on a client's validation split
# The personal model on the client's validation split, sent only where nothing selected on that split:
# what a hyper-parameter sweep may select on (benchmarks/personalization.py).
PERSONAL_VAL_ACCURACY = "personal-val-accuracy"
POOL_PREFIX, POOL_EXAMPLES = "pool-", "pool-examples"  # the same accuracies on the client's site pool
EPSILON, LEDGER_RECORDS = "epsilon", "rounds-dp"
# The personal fine-tune ran under DP-SGD (1) or was skipped for want of budget (0), and its noise multiplier.
PERSONAL_DP, PERSONAL_NOISE = "personal-dp", "personal-noise-multiplier"
# The runner's references (pooled, site oracle), in the run folder:
# {"key": what they were computed from, "clients": {client: {metric key: accuracy}}}.
REFERENCES_FILE = "references.json"


# Bounds on what a reply may claim; anything outside is a bad reply.
MAX_EXAMPLES = 10_000_000
MAX_EPSILON_REPORTED = 1e6
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VALID_CLIENT_NAME = text(64, CLIENT_NAME, allowed="1-64 letters, digits, '-', '_', '.'")
# A references file: what they were computed from, and per client its metric keys' accuracies (NaN where a
# reference had nothing to score, as the runner writes it).
_REFERENCES = {"key": text(), "clients": mapping_of(VALID_CLIENT_NAME, mapping_of(text(), number(0, 1).or_nan()))}


_EPSILON_SEEN = mapping_of(VALID_CLIENT_NAME, number(0, MAX_EPSILON_REPORTED))


def parse_references(raw: Any, where: str = REFERENCES_FILE) -> dict[str, dict[str, float]]:
    """The clients' references from a references file's JSON (read with ``nonfinite=True``); else ProtocolError."""
    clients = check_record(raw, _REFERENCES, where, ProtocolError, optional=("key",))["clients"]
    return {client: {key: float(v) for key, v in values.items()} for client, values in clients.items()}


def read_references(path: Path) -> dict[str, dict[str, float]]:
    """``parse_references`` of a references file."""
    return parse_references(read_json(path, ProtocolError, nonfinite=True), str(path))


def check_client_name(name: object) -> str:
    return check_value(name, VALID_CLIENT_NAME, "client name", ProtocolError)


def check_metric(key: str, value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high] (bools are not numbers here)."""
    return float(check_value(value, number(low, high), f"metric {key!r}", ProtocolError))


# -- the run's settings ([tool.flwr.app.config] -> context.run_config) --------------------------


@dataclass(frozen=True)
class RunSettings:
    """The Flower run config, parsed once. Paths are the operator's, never sent to a client."""

    config: Path
    run_dir: Path
    data_root: Path | None  # None on a real deployment: the server holds no data
    manifests: Path | None  # simulation only: on a device, its node config names its manifest
    state_root: Path | None  # simulation only: on a device, its node config names its state folder
    start_checkpoint: Path
    num_clients: int
    resume: bool = False
    audit_dir: Path | None = None
    owner_lock: Path | None = None  # simulation: held by the command that started the run (core/io.owner_lock)
    pool_cache: Path | None = None  # simulation: one folder where a site's clients share its decoded pool

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], base: Path = APP_ROOT) -> RunSettings:
        """Parse the run config; relative paths are taken from ``base`` (the app's folder), not the cwd."""
        known = {"config", "run-dir", "data-root", "manifests", "state-root", "start-checkpoint", "num-clients",
                 "resume", "audit-dir", "owner-lock", "pool-cache"}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ProtocolError(f"unknown run config key '{unknown[0]}'; allowed: {', '.join(sorted(known))}")

        def path(key: str, required: bool = True) -> Path | None:
            value = run_config.get(key, "")
            if not isinstance(value, str) or (required and not value):
                raise ProtocolError(f"run config '{key}' must be a non-empty path string, got {value!r}")
            if not value:
                return None
            return base / value  # an absolute value stays as it is

        num = run_config.get("num-clients", 0)
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 10_000:
            raise ProtocolError(f"run config 'num-clients' is {num!r}; expected an integer in [1, 10000]")
        resume = run_config.get("resume", False)
        if not isinstance(resume, bool):
            raise ProtocolError(f"run config 'resume' is {resume!r}; expected true or false")
        return cls(config=path("config"), run_dir=path("run-dir"), data_root=path("data-root", required=False),
                   manifests=path("manifests", required=False), state_root=path("state-root", required=False),
                   start_checkpoint=path("start-checkpoint"), num_clients=num, resume=resume,
                   audit_dir=path("audit-dir", required=False), owner_lock=path("owner-lock", required=False),
                   pool_cache=path("pool-cache", required=False))


OWNER_LOCK = "owner.lock"  # in a simulated run's folder, held by the edgemri command that runs it


class OwnerGone(EdgemriError):
    """The command that started a simulated run has died: nothing more may train."""


def check_owner(lock: Path | None) -> None:
    """In simulation, stop (OwnerGone) once the command that started the run holds its ``lock`` no more: a
    ServerApp thread outlives a stopped simulation process and would otherwise train on, spending DP budget.
    ``None`` (a deployment): nothing to check."""
    if lock is not None and owner_gone(lock):
        raise OwnerGone("the edgemri command that started this run is gone; nothing more is trained "
                        "(continue with `edgemri federate --resume`)")


def run_path(run_config: dict[str, Any], key: str) -> Path:
    """One path of the run config, relative to the app's folder."""
    return APP_ROOT / str(run_config[key])


# -- what the server sends ------------------------------------------------------------------------


FLOOR_RECORDS_KEY, FLOOR_EPSILON_KEY = "ledger-floor-records", "ledger-floor-epsilon"


@dataclass(frozen=True)
class LedgerFloor:
    """The longest ledger and highest cumulative epsilon a client ever reported to this server."""

    records: int = 0
    epsilon: float = 0.0


@dataclass(frozen=True)
class RoundInstructions:
    """The TRAIN/EVALUATE config for one client: the federation and privacy settings, its tier's spec."""

    server_round: int
    seed: int
    federation: FederationConfig
    privacy: PrivacyConfig
    spec: TrainSpec
    final: bool = False
    clipping_norm: float | None = None  # client-level DP with client-side clipping
    # The most this client's privacy ledger ever reported to the server: the device refuses to train on a
    # ledger below it (restored from a backup, deleted or rebuilt), whatever its own files say.
    ledger_floor: LedgerFloor = LedgerFloor()

    @classmethod
    def for_tier(cls, config: Config, kind: str, server_round: int, *, final: bool = False,
                 clipping_norm: float | None = None, ledger_floor: LedgerFloor = LedgerFloor()
                 ) -> RoundInstructions:
        return cls(server_round, config.seed, dataclasses.replace(config.federation, start_checkpoint=None),
                   config.privacy, config.federation.tier(kind).train_spec(), final, clipping_norm, ledger_floor)

    def to_config(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "server-round": self.server_round, "seed": self.seed, "final": self.final,
            "federation-json": json.dumps(dataclasses.asdict(self.federation)),
            "privacy-json": json.dumps(dataclasses.asdict(self.privacy)),
            "spec-json": json.dumps(dataclasses.asdict(self.spec))}
        if self.clipping_norm is not None:
            record[CLIPPING_NORM_KEY] = self.clipping_norm
        if self.ledger_floor.records:
            record[FLOOR_RECORDS_KEY] = self.ledger_floor.records
            record[FLOOR_EPSILON_KEY] = self.ledger_floor.epsilon
        return record

    @classmethod
    def from_config(cls, record: dict[str, Any], names: Registries) -> RoundInstructions:
        """Parse (and validate, with the config's own rules and the registries' ``names``) what a server sent."""
        def settings(key: str) -> Any:
            return parse_json(str(record[key]), f"'{key}'", ProtocolError)

        try:
            federation = from_dict(FederationConfig, settings("federation-json"), "federation")
            privacy = from_dict(PrivacyConfig, settings("privacy-json"), "privacy")
            spec = from_dict(TrainSpec, settings("spec-json"), "spec")
            federation.validate("federation", names)
            privacy.validate("privacy", names)
            spec.validate("spec")
            server_round, seed = record["server-round"], record["seed"]
            clipping = record.get(CLIPPING_NORM_KEY)
            floor = LedgerFloor(
                check_value(record.get(FLOOR_RECORDS_KEY, 0), number(0, MAX_EXAMPLES, integer=True),
                            f"the server's {FLOOR_RECORDS_KEY!r}", ProtocolError),
                check_metric(FLOOR_EPSILON_KEY, record.get(FLOOR_EPSILON_KEY, 0.0), 0, MAX_EPSILON_REPORTED))
        except (KeyError, EdgemriError) as err:
            raise ProtocolError(f"the server's round config is malformed: {str(err).splitlines()[0][:200]}") from None
        for key, value in (("server-round", server_round), ("seed", seed)):
            check_value(value, number(0, 2**31 - 1, integer=True), f"the server's {key!r}", ProtocolError)
        if clipping is not None:
            clipping = check_metric(CLIPPING_NORM_KEY, clipping, 1e-12, 1e6)
        return cls(server_round, seed, federation, privacy, spec, bool(record.get("final", False)), clipping, floor)


# -- what the clients send ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientInfo:
    """A node's answer to the discovery query: names and counts, never paths."""

    client: str
    kind: str
    site: str
    num_examples: int

    def to_record(self) -> tuple[dict[str, str], dict[str, int]]:
        return {"client": self.client, "kind": self.kind, "site": self.site}, {NUM_EXAMPLES: self.num_examples}

    @classmethod
    def from_record(cls, info: dict[str, Any], metrics: dict[str, Any], kinds: tuple[str, ...]) -> ClientInfo:
        kind = check_value(info.get("kind"), one_of(kinds), "client kind", ProtocolError)
        site = check_value(info.get("site"), VALID_CLIENT_NAME, "site", ProtocolError)
        n = check_metric(NUM_EXAMPLES, metrics.get(NUM_EXAMPLES), 1, MAX_EXAMPLES)
        check_value(n, Check(float.is_integer, "a whole number"), f"metric {NUM_EXAMPLES!r}", ProtocolError)
        return cls(check_client_name(info.get("client")), str(kind), site, int(n))


# -- the federation's result, as the reports read it ----------------------------------------------


@dataclass
class RoundRecord:
    round: int
    sampled: list[str]
    trained: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # client -> coded reason
    declined: dict[str, str] = field(default_factory=dict)  # client -> status
    aggregated: bool = False
    seconds: float = 0.0
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    central: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None  # client-level DP: cumulative epsilon after this round
    federated_val: float | None = None  # the global model's accuracy on the clients' validation splits


@dataclass
class FederationResult:
    """Everything a federation run produced; saved as result.json, read back by the reports."""

    clients: dict[str, ClientInfo]
    history: list[RoundRecord]
    final: dict[str, dict[str, float]]
    final_failed: dict[str, str]
    retired: dict[str, str]
    central_start: dict[str, float]
    central_final: dict[str, float]
    central_dp: dict[str, Any]
    excluded: dict[str, str] = field(default_factory=dict)  # nodes refused at discovery -> why
    best_round: int | None = None  # the round whose global model federated validation preferred
    # client -> the highest cumulative epsilon it ever reported to the server: a report never states less
    epsilon_seen: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def all_failed(self) -> str | None:
        """Why the run failed as a whole when no client trained in any round and clients failed: the codes and
        how often (a run of declines, such as exhausted budgets, is not a failure); else None."""
        if any(h.trained for h in self.history):
            return None
        codes = Counter(code for h in self.history for code in h.failed.values())
        if not codes:
            return None
        return ", ".join(f"{code} x{count}" for code, count in codes.most_common())

    @classmethod
    def from_dict(cls, data: Any) -> FederationResult:
        """Read back a result.json (untrusted: a run folder may come from anywhere)."""
        try:
            fields = dict(data)
            fields["clients"] = {k: ClientInfo(**v) for k, v in data["clients"].items()}
            fields["history"] = [RoundRecord(**h) for h in data["history"]]
            fields["epsilon_seen"] = check_value(data.get("epsilon_seen", {}), _EPSILON_SEEN, "epsilon_seen",
                                                 ProtocolError)
            return cls(**fields)
        except (TypeError, KeyError, AttributeError, ValueError) as err:
            raise ProtocolError(f"not an edgemri federation result: {str(err).splitlines()[0][:200]}") from None
