"""Sample-level DP-SGD planning, a device's own privacy floor, and a hash-chained privacy ledger.

Flower's own Opacus example builds a new PrivacyEngine every round, so its epsilon
restarts each round. Here each client keeps an append-only ledger of every round it
trained (noise, sample rate, steps, clipping, delta, cumulative epsilon). The
accountant's history is rebuilt from it whenever the client starts, and before a
round the client checks the epsilon it would reach against its budget. The ledger is a
hash chain with a separate head file, so deleting records or restoring an older copy is
refused instead of silently lowering epsilon (docs/PRIVACY.md, threat model).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edgemri.core.config import DPTierConfig
from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_text

LEDGER_FORMAT = "edgemri.privacy-ledger/3"  # 3: each record's stage
LEDGER_FORMAT_V2 = "edgemri.privacy-ledger/2"  # read and extended (round records only), never rewritten
STAGES = ("round", "personal")  # a federated round's training; the personal fine-tune (personal_epsilon)
HEAD_FORMAT = "edgemri.privacy-ledger-head/1"
LEDGER_FILE = "privacy-ledger.jsonl"
# The accountants a plan and a ledger record may name (config.PrivacyConfig.accountant): the ones
# Opacus ships, as ``mechanism()`` of RDPAccountant, PRVAccountant and GaussianAccountant names them
# (``create_accountant`` takes these names). Written out, so that importing this module does not
# import Opacus (half a second and SciPy): a client without DP never needs it.
ACCOUNTANTS = ("rdp", "prv", "gdp")
# Below this many expected examples per noisy step, the noise (sigma * C) drowns the
# clipped gradient sum (at most q * n * C): training would learn noise.
MIN_SIGNAL_TO_NOISE = 1.0


class PrivacyError(EdgemriError):
    """A privacy setting is invalid or cannot be met; the message names the value."""


class LedgerError(EdgemriError):
    """A privacy ledger is corrupt or rolled back; it is never silently treated as empty."""


def default_delta(n: int) -> float:
    """delta well below 1/n: a mechanism that leaks one whole record with probability delta
    must be unlikely to leak any of the n; 1e-5 caps it for large clients."""
    return min(1e-5, 0.1 / n)


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Cumulative epsilon of a history of (noise multiplier, sample rate, steps)."""
    return _epsilon_of(tuple(tuple(h) for h in history), delta, accountant)


# RDP at fractional orders costs tens of milliseconds per call and a client asks the same
# questions every message: the answers are pure functions of their arguments, so they are cached.
@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # here, not at the top: only DP clients need Opacus

    account = create_accountant(accountant)
    # GDP composes only identical steps; merge runs of equal (sigma, q), which every plan has.
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    if accountant == "gdp" and len(merged) > 1:
        raise PrivacyError("the gdp accountant composes only identical rounds; use rdp or prv")
    account.history = merged
    return float(account.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPPlan:
    """What a client's DP-SGD will do each round, decided before round 1.

    ``steps_per_epoch`` Poisson draws at ``sample_rate`` per local epoch, exactly: the
    training hook (``opacus_wrap``) takes that many, so the steps the budget check counts
    are the steps taken, whatever the number of scans that actually decoded.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    max_grad_norm: float
    delta: float
    budget_epsilon: float
    accountant: str
    planned_rounds: int
    planned_epsilon: float
    one_round_epsilon: float
    signal_to_noise: float
    feasible: bool
    reason: str
    steps_per_epoch: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1024)  # pure (see _epsilon_of); DPPlan is frozen, so sharing it is safe
def plan_dp(tier: DPTierConfig, *, n: int, batch_size: int, local_epochs: int, rounds: int,
            accountant: str) -> DPPlan:
    """Noise, sampling and steps per round for a client of ``n`` scans; infeasible plans say why."""
    if n < 1:
        raise PrivacyError(f"a DP client needs at least one training scan, has {n}")
    delta = tier.delta if tier.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise PrivacyError(f"privacy delta {delta} is not below 1/n = {1.0 / n:.3g} for a client with {n} scans")
    sample_rate = min(1.0, batch_size / n)
    steps_per_epoch = -(-n // batch_size)  # ceil(n / batch_size) in integers: no float rounding
    steps = local_epochs * steps_per_epoch
    total_steps = steps * rounds
    fixed = {"sample_rate": sample_rate, "steps_per_round": steps, "max_grad_norm": tier.max_grad_norm,
             "delta": delta, "budget_epsilon": tier.budget_epsilon, "accountant": accountant,
             "planned_rounds": rounds, "steps_per_epoch": steps_per_epoch}
    if tier.noise_multiplier is not None:
        sigma = tier.noise_multiplier
    else:
        from opacus.accountants.utils import get_noise_multiplier  # only DP clients need Opacus

        try:
            target = min(tier.target_epsilon, tier.budget_epsilon)
            sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                               steps=total_steps, accountant=accountant))
        except ValueError as err:
            return DPPlan(noise_multiplier=math.inf, planned_epsilon=math.inf, one_round_epsilon=math.inf,
                          signal_to_noise=0.0, feasible=False, reason=f"no noise level reaches the target: {err}",
                          **fixed)
    one_round = epsilon_of([(sigma, sample_rate, steps)], delta, accountant)
    planned = epsilon_of([(sigma, sample_rate, total_steps)], delta, accountant)
    signal_to_noise = sample_rate * n / sigma if sigma > 0 else math.inf
    feasible, reason = True, ""
    if one_round > tier.budget_epsilon:
        feasible, reason = False, (f"one round alone spends epsilon {one_round:.2f} > budget {tier.budget_epsilon}")
    elif signal_to_noise < MIN_SIGNAL_TO_NOISE:
        feasible, reason = False, (
            f"too few scans for this budget: {n} scans give about {sample_rate * n:.1f} per step against noise "
            f"sigma={sigma:.2f} (needs >= {MIN_SIGNAL_TO_NOISE:.0f}x); training would learn noise")
    return DPPlan(noise_multiplier=sigma, planned_epsilon=planned, one_round_epsilon=one_round,
                  signal_to_noise=signal_to_noise, feasible=feasible, reason=reason, **fixed)


def check_dp_model(model: nn.Module, name: str) -> None:
    """Opacus computes per-sample gradients only for some layers (no BatchNorm, ...)."""
    from opacus.validators import ModuleValidator  # only DP clients need Opacus

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"DP-SGD cannot train model {name!r}: " + "; ".join(str(e) for e in errors[:3]))


def opacus_wrap(plan: DPPlan, seed: int) -> Callable:
    """The training loop's hook: Opacus's PrivacyEngine with Poisson sampling of row indices.

    Rows are drawn at the plan's sample rate for exactly ``plan.steps_per_epoch`` steps per
    epoch, never Opacus's own 1/len(loader) rate: on a client where fewer scans decoded than
    its manifest lists, that rate is higher than the plan's and the ledger would under-count.
    Poisson sampling at rate q protects each row whatever the number of rows. More epochs
    than the plan's are refused. Batches are uneven and sometimes empty; Opacus still adds
    noise on empty steps.
    """

    def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int):
        from opacus import PrivacyEngine  # only DP clients need Opacus
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if n < 1:
            raise PrivacyError(f"DP-SGD needs at least one training scan, has {n}")
        rows = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, private_optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=rows, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed))
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=plan.sample_rate,
                                                generator=torch.Generator().manual_seed(seed + 1),
                                                steps=plan.steps_per_epoch)
        taken = 0

        def batches(_n: int, _batch_size: int, _generator: torch.Generator) -> Iterator[torch.Tensor]:
            nonlocal taken
            if taken + plan.steps_per_epoch > plan.steps_per_round:
                raise PrivacyError(f"training asked for more than the plan's {plan.steps_per_round} noisy steps "
                                   f"per round; the local epochs must match the DP plan's")
            taken += plan.steps_per_epoch
            return (torch.tensor(index, dtype=torch.long) for index in sampler)

        return private_model, private_optimizer, batches

    return wrap


# ---------------------------------------------------------------- the device's own floor

_POLICY_KEYS = {  # node-config key -> (field, what is allowed)
    "dp-required": ("require_dp", "true or false"),
    "dp-max-epsilon": ("max_epsilon", "a finite number > 0"),
    "dp-min-noise-multiplier": ("min_noise_multiplier", "a finite number >= 0"),
    "dp-max-grad-norm": ("max_grad_norm", "a finite number > 0"),
    "dp-max-delta": ("max_delta", "a number in (0, 1)"),
    "dp-accountants": ("accountants", f"a comma-separated list of {', '.join(ACCOUNTANTS)}"),
}
_NUMBER_OK: dict[str, Callable[[float], bool]] = {
    "max_epsilon": lambda v: 0 < v < math.inf,
    "min_noise_multiplier": lambda v: 0 <= v < math.inf,
    "max_grad_norm": lambda v: 0 < v < math.inf,
    "max_delta": lambda v: 0 < v < 1,
}


@dataclass(frozen=True)
class DevicePolicy:
    """The weakest DP-SGD a device accepts, from its own node config: the server cannot lower it.

    A server instruction weaker than this floor is refused (``check``), never tightened: the
    device then does not train, and its reply carries a coded status. Any floor implies DP
    is required: "at most epsilon 8" with DP off would be an unbounded epsilon.
    """

    require_dp: bool = False
    max_epsilon: float | None = None  # the tier's budget_epsilon may not exceed it
    min_noise_multiplier: float | None = None
    max_grad_norm: float | None = None  # bounds one scan's pull per step; epsilon itself does not depend on C
    max_delta: float | None = None
    accountants: tuple[str, ...] | None = None  # e.g. ("rdp", "prv"): refuse GDP's approximation

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> DevicePolicy:
        """Read the ``dp-*`` keys (``--node-config "dp-required=true dp-max-epsilon=8"``); others are not ours."""
        values: dict[str, Any] = {}
        for key, value in node_config.items():
            if not key.startswith("dp-"):
                continue
            if key not in _POLICY_KEYS:
                raise PrivacyError(f"node config key {key!r} is unknown; allowed: {', '.join(_POLICY_KEYS)}")
            name, allowed = _POLICY_KEYS[key]
            parsed = _policy_value(name, value)
            if parsed is None:
                raise PrivacyError(f"node config key {key!r} has value {str(value)[:80]!r}; allowed: {allowed}")
            values[name] = parsed
        return cls(**values)

    @property
    def requires_dp(self) -> bool:
        return self.require_dp or any(v is not None for v in (self.max_epsilon, self.min_noise_multiplier,
                                                              self.max_grad_norm, self.max_delta, self.accountants))

    def check(self, tier: DPTierConfig, plan: DPPlan | None = None) -> str | None:
        """Why the server's settings for this client are weaker than the floor, or None if they are not.

        ``tier`` is the client's resolved tier (budget overrides applied). A noise multiplier
        derived from a target, a default delta and the accountant are known only from the
        ``plan``; without one, a floor on them cannot be verified and is refused.
        """
        if not tier.enabled:
            return "the device requires DP-SGD (node config dp-required or a dp-* floor); the server sent " \
                "enabled=false" if self.requires_dp else None
        sigma = plan.noise_multiplier if plan is not None else tier.noise_multiplier
        delta = plan.delta if plan is not None else tier.delta
        accountant = plan.accountant if plan is not None else None
        reasons = []
        if self.max_epsilon is not None and tier.budget_epsilon > self.max_epsilon:
            reasons.append(f"budget_epsilon {tier.budget_epsilon} is above the device's dp-max-epsilon "
                           f"{self.max_epsilon}")
        if self.min_noise_multiplier is not None and (sigma is None or sigma < self.min_noise_multiplier):
            reasons.append(f"noise multiplier {'unknown before the plan' if sigma is None else sigma} is below "
                           f"the device's dp-min-noise-multiplier {self.min_noise_multiplier}")
        if self.max_grad_norm is not None and tier.max_grad_norm > self.max_grad_norm:
            reasons.append(f"max_grad_norm {tier.max_grad_norm} is above the device's dp-max-grad-norm "
                           f"{self.max_grad_norm}")
        if self.max_delta is not None and (delta is None or delta > self.max_delta):
            reasons.append(f"delta {'unknown before the plan' if delta is None else delta} is above the device's "
                           f"dp-max-delta {self.max_delta}")
        if self.accountants is not None and accountant not in self.accountants:
            reasons.append(f"accountant {'unknown before the plan' if accountant is None else repr(accountant)} "
                           f"is not one of the device's dp-accountants "
                           f"{', '.join(self.accountants)}")
        return "; ".join(reasons) or None


def _policy_value(name: str, value: Any) -> Any:
    """A node-config value as the policy field's type, or None if it is not one."""
    if name == "require_dp":
        if isinstance(value, bool):
            return value
        return {"true": True, "false": False}.get(str(value).strip().lower())
    if name == "accountants":
        names = tuple(a.strip() for a in str(value).split(",")) if isinstance(value, str) else ()
        return names if names and all(a in ACCOUNTANTS for a in names) else None
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if _NUMBER_OK[name](number) else None


# ---------------------------------------------------------------- the ledger


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# Every key of a round record, with what its value must be; "seq", "prev", "hash" chain the records.
_RECORD_V2: dict[str, tuple[Callable[[Any], bool], str]] = {  # a /2 ledger's records: every one a round
    "seq": (_count, "an integer >= 0"),
    "prev": (_digest, "a SHA-256 hex digest"),
    "round": (_count, "an integer >= 0"),
    "noise_multiplier": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "sample_rate": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "steps": (_count, "an integer >= 0"),
    "max_grad_norm": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "delta": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "accountant": (lambda v: v in ACCOUNTANTS, f"one of {', '.join(ACCOUNTANTS)}"),
    "budget_epsilon": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "epsilon": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "hash": (_digest, "a SHA-256 hex digest"),
}
_RECORD = {**_RECORD_V2, "stage": (lambda v: v in STAGES, f"one of {', '.join(STAGES)}")}
_GENESIS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v in (LEDGER_FORMAT, LEDGER_FORMAT_V2), f"{LEDGER_FORMAT} or {LEDGER_FORMAT_V2}"),
    "seq": (lambda v: v == 0, "0"),
    "client": (lambda v: isinstance(v, str) and v != "", "a client name"),
    "ledger_id": (_digest, "a random 256-bit hex id"),
    "hash": (_digest, "a SHA-256 hex digest"),
}
_HEAD: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == HEAD_FORMAT, HEAD_FORMAT),
    "ledger_id": (_digest, "the ledger's id"),
    "count": (_count, "an integer >= 0"),
    "head": (_digest, "a SHA-256 hex digest"),
}


def _hash(record: dict[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without its own hash; the record holds its predecessor's."""
    body = json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _parse(text: str, schema: dict[str, tuple[Callable[[Any], bool], str]], where: str) -> dict[str, Any]:
    """One JSON object with exactly ``schema``'s keys, each value allowed; else LedgerError naming ``where``."""
    try:
        record = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:
        raise LedgerError(f"{where} is not valid JSON ({str(err)[:80]}); the ledger is corrupt, "
                          f"restore it from a backup") from None
    if not isinstance(record, dict):
        raise LedgerError(f"{where} is a JSON {type(record).__name__}, not a record; the ledger is corrupt")
    if set(record) != set(schema):
        missing, extra = sorted(set(schema) - set(record)), sorted(set(record) - set(schema))
        raise LedgerError(f"{where} has the wrong keys (missing: {', '.join(missing) or '-'}; "
                          f"unexpected: {', '.join(extra)[:80] or '-'}); the ledger is corrupt")
    for key, (ok, allowed) in schema.items():
        if not ok(record[key]):
            raise LedgerError(f"{where}: key {key!r} has value {str(record[key])[:40]!r}; allowed: {allowed}")
    return record


def _refuse_old_format(path: Path, first_line: str) -> None:
    """A /1 ledger (CRC lines anyone can recompute) is refused, not migrated: nothing proves it was never cut."""
    try:
        header = json.loads(first_line)
    except (ValueError, RecursionError):
        return  # not JSON at all: _parse says so
    if isinstance(header, dict) and header.get("format") == "edgemri.privacy-ledger/1":
        raise LedgerError(f"{path} is an edgemri.privacy-ledger/1 ledger (no hash chain, cannot be verified against "
                          f"rollback) and is not migrated; finish this client's federation with the edgemri release "
                          f"that wrote it, or enrol the device under a new client name with a new state folder")


class Ledger:
    """Append-only, hash-chained record of every DP round a client trained, in its own folder.

    Line 1 is a genesis record binding the client name and a random ledger id; every later
    line is one round holding its sequence number and the SHA-256 of the line before. A
    second file, ``<ledger>.head``, holds the record count and the last hash, rewritten after
    each append: a ledger shorter than its head, or another one, is a rollback and refused.
    """

    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.records = records

    @property
    def head_path(self) -> Path:
        return self.path.with_suffix(".head")

    @classmethod
    def open(cls, path: Path, client: str) -> Ledger:
        """Read and verify the ledger (or start one); anything torn, broken or rolled back is a LedgerError."""
        path = Path(path)
        head_path = path.with_suffix(".head")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if head_path.exists():
                raise LedgerError(f"{path} is missing but {head_path.name} says rounds were recorded: the ledger "
                                  f"was deleted; refusing to reset epsilon to zero (restore both from a backup)"
                                  ) from None
            genesis: dict[str, Any] = {"format": LEDGER_FORMAT, "seq": 0, "client": client,
                                       "ledger_id": secrets.token_hex(32)}
            genesis["hash"] = _hash(genesis)
            return cls(path, genesis, [])
        except OSError as err:
            raise LedgerError(f"{path}: cannot read the privacy ledger ({err.strerror or err}); it must be a "
                              f"readable file") from None
        ledger = cls(path, *cls._verify_chain(path, data, client))
        ledger._verify_head()
        return ledger

    @staticmethod
    def _verify_chain(path: Path, data: bytes, client: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if not data:
            raise LedgerError(f"{path}: the ledger is empty; refusing to reset epsilon to zero "
                              f"(restore it from a backup)")
        lines = data.split(b"\n")
        if lines[-1]:
            raise LedgerError(f"{path}: line {len(lines)} is torn (no line end: an interrupted write or a "
                              f"truncated copy); refusing to guess, restore the ledger from a backup")
        parsed: list[dict[str, Any]] = []
        for number, raw in enumerate(lines[:-1], start=1):
            where = f"{path}: line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LedgerError(f"{where} is not UTF-8 text; the ledger is corrupt") from None
            if number == 1:
                _refuse_old_format(path, text)
                record = _parse(text, _GENESIS, where)
                if record["client"] != client:
                    raise LedgerError(f"{where}: the ledger belongs to client {record['client'][:64]!r}, not "
                                      f"{client!r}; a ledger cannot be copied between clients")
            else:
                record = _parse(text, _RECORD if parsed[0]["format"] == LEDGER_FORMAT else _RECORD_V2, where)
                if record["seq"] != number - 1:
                    raise LedgerError(f"{where} has sequence number {record['seq']}, expected {number - 1}: "
                                      f"records were removed, reordered or duplicated")
                if record["prev"] != parsed[-1]["hash"]:
                    raise LedgerError(f"{where} does not chain to line {number - 1}: a record before it was "
                                      f"changed or removed")
            if record["hash"] != _hash(record):
                raise LedgerError(f"{where} fails its hash: the record was changed; the ledger is corrupt")
            parsed.append(record)
        return parsed[0], parsed[1:]

    def _verify_head(self) -> None:
        """The head file must agree, or lag by the one record a crash between the two writes leaves."""
        count = len(self.records)
        try:
            text = self.head_path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            if count > 1:
                raise LedgerError(f"{self.head_path} is missing while {self.path.name} has {count} records: the "
                                  f"ledger may have been truncated with it; restore both from a backup") from None
            return  # a crash after the first round's ledger write, before its head
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"{self.head_path}: cannot read the ledger head ({err}); it must be a readable "
                              f"UTF-8 file") from None
        head = _parse(text, _HEAD, str(self.head_path))
        chain = [self.header, *self.records]
        if head["ledger_id"] != self.header["ledger_id"]:
            raise LedgerError(f"{self.path} is not the ledger its head {self.head_path.name} records (another "
                              f"ledger id): the ledger was replaced")
        if head["count"] > count:
            raise LedgerError(f"{self.path} has {count} records but its head {self.head_path.name} recorded "
                              f"{head['count']}: records were removed or an older copy restored (rolled back)")
        if count - head["count"] > 1 or chain[head["count"]]["hash"] != head["head"]:
            raise LedgerError(f"{self.path} does not match its head {self.head_path.name} (record "
                              f"{head['count']} differs): the ledger was replaced or edited")

    def head(self) -> tuple[int, int]:
        """(record count, first 48 bits of the last record's hash): for the client's reply metrics.

        The server remembers both; a count that goes down, or a different hash at an unchanged
        count, is a ledger rolled back on the device. 48 bits stay exact as a float metric.
        """
        last = self.records[-1] if self.records else self.header
        return len(self.records), int(last["hash"][:12], 16)

    @staticmethod
    def stage(record: dict[str, Any]) -> str:
        return record.get("stage", "round")  # a /2 ledger's records are all rounds

    def history(self) -> list[tuple[float, float, int]]:
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.records]

    def _delta(self, delta: float) -> float:
        """The smallest delta this ledger ever promised: a server raising delta cannot lower epsilon."""
        return min([delta, *(r["delta"] for r in self.records)])

    def epsilon(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history(), self._delta(delta), accountant)

    def epsilon_after(self, plan: DPPlan) -> float:
        """The epsilon this client would reach if it trained one more round of ``plan`` (its steps are a bound)."""
        return epsilon_of([*self.history(), (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
                          self._delta(plan.delta), plan.accountant)

    @property
    def rounds(self) -> list[int]:
        """The federated rounds recorded (not the personal fine-tunes)."""
        return [r["round"] for r in self.records if self.stage(r) == "round"]

    def append(self, server_round: int, plan: DPPlan, steps: int, stage: str = "round") -> dict[str, Any]:
        """Record a trained round (or, ``stage`` "personal", the personal fine-tune after round
        ``server_round``): the ledger file atomically, then its head.

        The record is written whatever happens (a ledger may over-count, never under-count);
        then a round that took more steps than planned, or ended above the budget, raises
        PrivacyError so that its update never leaves the device.
        """
        if not _count(server_round) or not _count(steps):
            raise PrivacyError(f"a ledger record needs a round and steps >= 0, got round {server_round!r}, "
                               f"steps {steps!r}")
        if stage not in STAGES:
            raise PrivacyError(f"a ledger record's stage is one of {', '.join(STAGES)}, got {stage!r}")
        v2 = self.header["format"] == LEDGER_FORMAT_V2
        if v2 and stage != "round":
            raise PrivacyError(f"{self.path} is an {LEDGER_FORMAT_V2} ledger, which records rounds only; a DP personal "
                               f"fine-tune needs a new client name and state folder (an {LEDGER_FORMAT} ledger)")
        previous = self.records[-1] if self.records else self.header
        record: dict[str, Any] = {
            "seq": len(self.records) + 1, "prev": previous["hash"], "round": server_round,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": steps,
            "max_grad_norm": plan.max_grad_norm, "delta": plan.delta, "accountant": plan.accountant,
            "budget_epsilon": plan.budget_epsilon, **({} if v2 else {"stage": stage}),
        }
        self.records.append(record)
        record["epsilon"] = self.epsilon(plan.delta, plan.accountant)
        record["hash"] = _hash(record)
        write_text(self.path, "".join(_line(r) for r in [self.header, *self.records]))
        # A crash here leaves the head one record behind: open() accepts that (it over-counts only).
        write_text(self.head_path, _line({"format": HEAD_FORMAT, "ledger_id": self.header["ledger_id"],
                                          "count": len(self.records), "head": record["hash"]}))
        if steps > plan.steps_per_round:
            raise PrivacyError(f"round {server_round} took {steps} noisy steps, more than the plan's "
                               f"{plan.steps_per_round}; recorded, and its update must not be sent")
        if record["epsilon"] > plan.budget_epsilon:
            raise PrivacyError(f"round {server_round} took epsilon to {record['epsilon']:.2f} > budget "
                               f"{plan.budget_epsilon}; recorded, and its update must not be sent")
        return record
