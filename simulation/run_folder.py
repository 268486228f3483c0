"""A finished federation run folder, read and checked for `edgemri privacy attack` (untrusted).

The folder can come from anywhere: every JSON file goes through ``core.untrusted`` (strict parsing, then a
schema of named checks), every path inside it is confined to it (symlinks too; only the data folder and the
start model the run recorded may lie elsewhere), checkpoints load without unpickling, and every problem is one
``PrivacyAttackError`` line naming the file and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from edgemri.clients.runtime import Client, ClientSetup
from edgemri.core.config import Config, ConfigError
from edgemri.core.data.dataset import is_synthetic
from edgemri.core.data.images import normalize, parse_preprocessing
from edgemri.core.data.partition import manifest_paths, read_manifest
from edgemri.core.errors import EdgemriError
from edgemri.core.federation.personalize import State
from edgemri.core.federation.protocol import (
    CLIENT_NAME,
    START_ACCURACY,
    FederationResult,
    ProtocolError,
    check_client_name,
)
from edgemri.core.privacy.dp import ACCOUNTANTS
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import check_state_dict, load_checkpoint
from edgemri.core.untrusted import BOOL, check_record, number, one_of, read_json, text
from edgemri.models import Student

MAX_RUN_CONFIG_BYTES = 1 << 20
MAX_PATH_CHARS = 4096

_NAME = text(64, CLIENT_NAME, allowed="a plain name (1-64 letters, digits, '-', '_', '.')")
_COUNT = number(0, 1e9)
TRAIN_METRICS = {"train-loss": _COUNT, "steps": _COUNT}  # what the replay is checked against
RECORDED_PATHS = {"data-root": text(MAX_PATH_CHARS), "start-checkpoint": text(MAX_PATH_CHARS)}
ACCURACIES = {k: number(0, 1).or_nan() for k in ("personalized", "start", "global")}
INTERVAL = {**{k: number(-1, 1).or_nan() for k in ("mean", "low", "high")}, "n": number(0, 1e6)}
SAMPLE_LEVEL = {"epsilon": number(0, 1e6), "accountant": one_of(ACCOUNTANTS), "unit": text(200)}
CLIENT_LEVEL = {"epsilon": number(0, 1e6), "delta": number(0, 1), "side": text(20)}


class PrivacyAttackError(EdgemriError):
    """A run folder that cannot be attacked as asked; the message names the file or value and what is allowed."""


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refused unless it resolves (symlinks too) inside the run folder."""
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise PrivacyAttackError(f"{root.joinpath(*parts)} resolves outside the run folder {root}; refusing to "
                                 f"follow it")
    return path


def _or_none(value: float) -> float | None:
    """A checked number, NaN (the reports' missing value) as None."""
    return None if math.isnan(value) else float(value)


@dataclass
class RunFolder:
    """A finished federation run, read and checked."""

    root: Path
    config: Config
    result: FederationResult
    trained: dict[str, list[int]]  # client -> the rounds it trained, ascending
    manifests: dict[str, Path]
    data_root: Path
    start_path: Path
    start: State
    federation: dict[str, Any] | None
    privacy: dict[str, Any] | None
    _clients: dict[str, Client] = field(default_factory=dict)

    def received(self, server_round: int) -> State:
        """The global model the server sent in ``server_round``."""
        if server_round == 1:
            return self.start
        path = inside(self.root, "server", f"global-round-{server_round - 1:03d}.pt")
        checkpoint = load_checkpoint(path)
        if checkpoint.model != "student":
            raise PrivacyAttackError(f"{path} holds a {checkpoint.model!r}; a federation's global model is a student")
        return check_state_dict(Student(), checkpoint.state_dict, str(path))

    def client(self, name: str) -> Client:
        """The client as its own code sees itself: manifest, data folder, state folder (confined to the run)."""
        if name not in self._clients:
            state_dir = inside(self.root, "clients", check_client_name(name))
            for entry in state_dir.iterdir() if state_dir.is_dir() else ():  # its ledger, cache, models
                inside(self.root, "clients", name, entry.name)
            self._clients[name] = Client(ClientSetup(self.manifests[name], self.data_root, state_dir))
        return self._clients[name]

    def reported(self, name: str, server_round: int) -> dict[str, Any]:
        return next(h.train_metrics.get(name, {}) for h in self.result.history if h.round == server_round)

    @property
    def synthetic(self) -> bool:
        """The data folder is edgemri's synthetic set (its generator's synth.json), so no real person's scans."""
        return is_synthetic(self.data_root)

    def start_accuracy(self, name: str) -> float | None:
        """The start model's accuracy the client reported on its test split (result.json), if it did."""
        final = self.result.final.get(name, {})
        if final.get(START_ACCURACY) is None:
            return None
        check_record(final, {START_ACCURACY: number(0, 1)}, f"server/result.json: {name}'s final metrics",
                     PrivacyAttackError, extra=True)
        return float(final[START_ACCURACY])

    def personalized(self, name: str) -> tuple[nn.Module, Callable[[Tensor], Tensor]] | None:
        """The client's personalized model (clients/NAME/personalized.pt) and its own preprocessing; None if the
        client has none (it missed the final evaluation)."""
        path = inside(self.root, "clients", name, "personalized.pt")
        if not path.is_file():
            return None
        checkpoint = load_checkpoint(path)
        if checkpoint.model != "student":
            raise PrivacyAttackError(f"{path} holds a {checkpoint.model!r}; a personalized model is a student")
        preprocessing = parse_preprocessing(checkpoint.preprocessing, str(path))
        return checkpoint.build(), lambda x: normalize(x, preprocessing["mean"], preprocessing["std"])

    def accuracy(self, name: str, kind: str) -> dict[str, Any] | None:
        """The client's personalized gain over the start and global models, and its tier's paired CI: from
        federation.json's site-pool section where the run had pools, else its local test split."""
        if self.federation is None:
            return None
        where = f"{self.root}/federation.json"
        pool = self.federation.get("pool")
        section = pool if isinstance(pool, dict) else self.federation
        rows = section.get("clients")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PrivacyAttackError(f"{where}: 'clients' is not a list of rows")
        row = next((r for r in rows if r.get("client") == name), None)
        if row is None:
            return None
        check_record(row, ACCURACIES, f"{where}: {name}'s row", PrivacyAttackError, extra=True)
        values = {k: _or_none(row[k]) for k in ACCURACIES}
        paired = section.get("paired")
        groups = paired.get("groups", {}) if isinstance(paired, dict) else {}
        if not isinstance(groups, dict):
            raise PrivacyAttackError(f"{where}: 'paired.groups' is not a mapping")
        tier_group = groups.get(kind)
        tier: dict[str, Any] = {}
        for key in ("personalized - start", "personalized - global"):
            interval = tier_group.get(key) if isinstance(tier_group, dict) else None
            if interval is not None:
                check_record(interval, INTERVAL, f"{where}: the {kind} interval {key!r}", PrivacyAttackError,
                             extra=True)
                tier[key] = {**{k: _or_none(interval[k]) for k in ("mean", "low", "high")}, "n": int(interval["n"])}

        def gain(other: str) -> float | None:
            first, second = values["personalized"], values[other]
            return None if first is None or second is None else first - second

        return {"where": "site pool" if section is pool else "local test split", **values,
                "gain_over_start": gain("start"), "gain_over_global": gain("global"), "tier_paired": tier}

    def sample_level(self, name: str) -> dict[str, Any] | None:
        """A DP-SGD client's entry in privacy.json (its epsilon, accountant and unit), checked; None without one."""
        entry = (self.privacy or {}).get("sample_level", {}).get(name)
        if not entry:
            return None
        return check_record(entry, SAMPLE_LEVEL, f"{self.root}/privacy.json: {name}'s entry", PrivacyAttackError,
                            optional=("epsilon", "unit"), extra=True)

    def client_level(self) -> dict[str, Any]:
        """Client-level (central) DP as privacy.json reports what the server did; else as the config asked."""
        central = self.privacy.get("client_level") if self.privacy is not None else None
        if central is None:
            return {"enabled": self.config.privacy.central.enabled, "source": "config.yaml (no privacy.json)"}
        where = f"{self.root}/privacy.json: client_level"
        check_record(central, {"enabled": BOOL}, where, PrivacyAttackError, extra=True)
        if not central["enabled"]:
            return {"enabled": False, "source": "privacy.json"}
        check_record(central, CLIENT_LEVEL, where, PrivacyAttackError, optional=("side",), extra=True)
        return {"enabled": True, "source": "privacy.json", "epsilon": float(central["epsilon"]),
                "delta": float(central["delta"]), "side": central.get("side", "")}


def _trained_rounds(result: FederationResult, config: Config, where: Path) -> dict[str, list[int]]:
    """The parts of result.json the attack relies on, typed and bounded; the rounds each client trained."""
    client_schema = {"client": _NAME, "kind": one_of(config.federation.tier_names), "site": _NAME,
                     "num_examples": number(1, 10_000_000)}
    for name, info in result.clients.items():
        try:
            check_client_name(name)
        except ProtocolError as err:
            raise PrivacyAttackError(f"{where}: {err}") from None
        check_record(dataclasses.asdict(info), client_schema, f"{where}: client {name}", PrivacyAttackError)
    trained: dict[str, list[int]] = {name: [] for name in result.clients}
    last = 0
    for record in result.history:
        r = record.round
        if isinstance(r, bool) or not isinstance(r, int) or not last < r <= config.federation.rounds:
            raise PrivacyAttackError(f"{where}: history round {str(r)[:20]!r} is not a round after {last} and at "
                                     f"most federation.rounds = {config.federation.rounds}")
        last = r
        if not isinstance(record.trained, list) or not isinstance(record.train_metrics, dict):
            raise PrivacyAttackError(f"{where}: round {r} lacks its list of trained clients or their metrics")
        for name in record.trained:
            if not isinstance(name, str) or name not in trained:
                raise PrivacyAttackError(f"{where}: round {r} names a trained client {str(name)[:64]!r} that is not "
                                         f"one of the run's clients")
            check_record(record.train_metrics.get(name, {}), TRAIN_METRICS, f"{where}: round {r}: {name}'s metrics",
                         PrivacyAttackError, optional=TRAIN_METRICS, extra=True)
            trained[name].append(r)
    if not isinstance(result.final, dict) or not all(isinstance(v, dict) for v in result.final.values()):
        raise PrivacyAttackError(f"{where}: 'final' is not a mapping of clients to their metrics")
    return trained


def _recorded_run_config(root: Path) -> dict[str, Any]:
    """The Flower run config the runner wrote (logs/run_config.toml): where the data and the start model were."""
    path = inside(root, "logs", "run_config.toml")
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_RUN_CONFIG_BYTES:
            raise ValueError("over 1 MiB")
        recorded = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PrivacyAttackError(f"{path} is not a readable run config ({err.__class__.__name__})") from None
    return check_record(recorded, RECORDED_PATHS, str(path), PrivacyAttackError, optional=RECORDED_PATHS, extra=True)


def _manifests(root: Path, result: FederationResult, run_dir: Path) -> dict[str, Path]:
    """Each client's manifest in the run folder, agreeing with result.json on its kind and site."""
    manifests = {}
    for path in manifest_paths(inside(root, "manifests")):
        manifest = read_manifest(inside(root, "manifests", path.name))
        info = result.clients.get(manifest.client)
        if info is not None and (info.kind, info.site) != (manifest.kind, manifest.site):
            raise PrivacyAttackError(f"{path}: client {manifest.client} is a {manifest.kind} at {manifest.site} "
                                     f"here but a {info.kind} at {info.site} in server/result.json")
        manifests[manifest.client] = inside(root, "manifests", path.name)
    if not manifests:
        raise PrivacyAttackError(f"{run_dir}/manifests holds no client manifests: the replay needs each client's "
                                 f"manifest and data (a simulation's run folder)")
    return manifests


def _report(root: Path, name: str) -> dict[str, Any] | None:
    """federation.json or privacy.json, if the run wrote it: an object (its parts are checked where read)."""
    path = inside(root, f"{name}.json")
    if not path.is_file():
        return None
    return check_record(read_json(path, PrivacyAttackError, nonfinite=True), {}, str(path), PrivacyAttackError,
                        extra=True)


def read_run(run_dir: Path, *, data_root: Path | None = None, start: Path | None = None) -> RunFolder:
    """A finished run folder, checked; ``data_root`` and ``start`` override what the run recorded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PrivacyAttackError(f"{run_dir} is not a folder; expected a finished federation run "
                                 f"(the --out of `edgemri federate`)")
    root = run_dir.resolve()
    result_path = inside(root, "server", "result.json")
    if not result_path.is_file():
        raise PrivacyAttackError(f"{run_dir} is not a finished federation run: it has no server/result.json")
    try:
        config = load_config(inside(root, "config.yaml"))
    except ConfigError as err:  # e.g. a run of an older edgemri: its training cannot be replayed exactly
        raise PrivacyAttackError(f"{err}; this edgemri cannot replay the run's training from that config "
                                 f"(a run made by another version?): run the federation again") from None
    result = FederationResult.from_dict(read_json(result_path, PrivacyAttackError, nonfinite=True))
    trained = _trained_rounds(result, config, result_path)
    manifests = _manifests(root, result, run_dir)
    recorded = _recorded_run_config(root)
    data = data_root or recorded.get("data-root") or config.data.root
    if not data:
        raise PrivacyAttackError(f"{run_dir} records no data folder; pass --data-root DIR")
    start_path = start or recorded.get("start-checkpoint") or config.federation.start_checkpoint
    if not start_path:
        raise PrivacyAttackError(f"{run_dir} does not record its start model (no logs/run_config.toml); "
                                 f"pass --start PATH (the student the federation started from)")
    checkpoint = load_checkpoint(Path(start_path))
    if checkpoint.model != "student":
        raise PrivacyAttackError(f"{start_path} holds a {checkpoint.model!r}; the federation starts from a student")
    privacy = _report(root, "privacy")
    sample_level = (privacy or {}).get("sample_level", {})
    if not isinstance(sample_level, dict) or not all(isinstance(e, dict) for e in sample_level.values()):
        raise PrivacyAttackError(f"{root}/privacy.json: 'sample_level' is not a mapping of clients to entries")
    return RunFolder(root, config, result, trained, manifests, Path(data), Path(start_path),
                     check_state_dict(Student(), checkpoint.state_dict, str(start_path)),
                     _report(root, "federation"), privacy)
