"""Sample-level DP-SGD planning and a cumulative, enforced, restart-proof privacy ledger.

Flower's own Opacus example builds a new PrivacyEngine every round, so its epsilon
restarts each round. Here each client keeps an append-only ledger of every round it
trained (noise, sample rate, steps, clipping, delta, cumulative epsilon). The
accountant's history is rebuilt from it whenever the client starts, and before a
round the client checks the epsilon it would reach against its budget.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edgemri.core.config import DPTierConfig
from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_text

LEDGER_FORMAT = "edgemri.privacy-ledger/1"
LEDGER_FILE = "privacy-ledger.jsonl"
# Below this many expected examples per noisy step, the noise (sigma * C) drowns the
# clipped gradient sum (at most q * n * C): training would learn noise.
MIN_SIGNAL_TO_NOISE = 1.0


class PrivacyError(EdgemriError):
    """A privacy setting is invalid or cannot be met; the message names the value."""


class LedgerError(EdgemriError):
    """A privacy ledger is corrupt; it is never silently treated as empty."""


def default_delta(n: int) -> float:
    """delta well below 1/n: a mechanism that leaks one whole record with probability delta
    must be unlikely to leak any of the n; 1e-5 caps it for large clients."""
    return min(1e-5, 0.1 / n)


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Cumulative epsilon of a history of (noise multiplier, sample rate, steps)."""
    if not history:
        return 0.0
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
    """What a client's DP-SGD will do each round, decided before round 1."""

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_dp(tier: DPTierConfig, *, n: int, batch_size: int, local_epochs: int, rounds: int,
            accountant: str) -> DPPlan:
    """Noise, sampling and steps per round for a client of ``n`` scans; infeasible plans say why."""
    if n < 1:
        raise PrivacyError(f"a DP client needs at least one training scan, has {n}")
    delta = tier.delta if tier.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise PrivacyError(f"privacy delta {delta} is not below 1/n = {1.0 / n:.3g} for a client with {n} scans")
    sample_rate = min(1.0, batch_size / n)
    steps = local_epochs * math.ceil(1.0 / sample_rate)
    total_steps = steps * rounds
    reason = ""
    if tier.noise_multiplier is not None:
        sigma = tier.noise_multiplier
    else:
        try:
            target = min(tier.target_epsilon, tier.budget_epsilon)
            sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                               steps=total_steps, accountant=accountant))
        except ValueError as err:
            return DPPlan(math.inf, sample_rate, steps, tier.max_grad_norm, delta, tier.budget_epsilon, accountant,
                          rounds, math.inf, math.inf, 0.0, False, f"no noise level reaches the target: {err}")
    one_round = epsilon_of([(sigma, sample_rate, steps)], delta, accountant)
    planned = epsilon_of([(sigma, sample_rate, total_steps)], delta, accountant)
    signal_to_noise = sample_rate * n / sigma if sigma > 0 else math.inf
    feasible = True
    if one_round > tier.budget_epsilon:
        feasible, reason = False, (f"one round alone spends epsilon {one_round:.2f} > budget {tier.budget_epsilon}")
    elif signal_to_noise < MIN_SIGNAL_TO_NOISE:
        feasible, reason = False, (
            f"too few scans for this budget: {n} scans give about {sample_rate * n:.1f} per step against noise "
            f"sigma={sigma:.2f} (needs >= {MIN_SIGNAL_TO_NOISE:.0f}x); training would learn noise")
    return DPPlan(sigma, sample_rate, steps, tier.max_grad_norm, delta, tier.budget_epsilon, accountant, rounds,
                  planned, one_round, signal_to_noise, feasible, reason)


def check_dp_model(model: nn.Module, name: str) -> None:
    """Opacus computes per-sample gradients only for some layers (no BatchNorm, ...)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"DP-SGD cannot train model {name!r}: " + "; ".join(str(e) for e in errors[:3]))


def opacus_wrap(plan: DPPlan, seed: int) -> Callable:
    """The training loop's hook: Opacus's PrivacyEngine with Poisson sampling of row indices.

    Poisson sampling gives uneven and sometimes empty batches; the loop takes the sampled
    indices from Opacus's DPDataLoader and Opacus still adds noise on empty steps.
    """

    def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int):
        rows = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, private_optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=rows, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed))
        loader.batch_sampler.generator = torch.Generator().manual_seed(seed + 1)

        def batches(_n: int, _batch_size: int, _generator: torch.Generator) -> Iterator[torch.Tensor]:
            for (index,) in loader:
                yield index

        return private_model, private_optimizer, batches

    return wrap


# ---------------------------------------------------------------- the ledger


def _crc(record: dict[str, Any]) -> int:
    body = json.dumps({k: v for k, v in record.items() if k != "crc"}, sort_keys=True)
    return zlib.crc32(body.encode())


class Ledger:
    """Append-only record of every DP round a client trained, in its own folder."""

    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.records = records

    @classmethod
    def open(cls, path: Path, client: str) -> Ledger:
        """Read the ledger (or start one); corrupt lines are errors, a torn last line is dropped."""
        if not path.exists():
            return cls(path, {"format": LEDGER_FORMAT, "client": client}, [])
        lines = path.read_text(encoding="utf-8").split("\n")
        complete, torn = (lines[:-1], lines[-1]) if lines else ([], "")
        if not complete:
            raise LedgerError(f"{path}: the ledger is empty or truncated before its header; refusing to reset "
                              f"epsilon to zero (restore it from a backup)")
        parsed = []
        for number, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise LedgerError(f"{path}: line {number} is not valid JSON; the ledger is corrupt") from None
            if record.get("crc") != _crc(record):
                raise LedgerError(f"{path}: line {number} fails its checksum; the ledger is corrupt")
            parsed.append(record)
        header, records = parsed[0], parsed[1:]
        if header.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{path}: not an {LEDGER_FORMAT} ledger")
        if torn:  # a half-written final line: the last complete record wins
            header = {**header, "dropped_partial_line": True}
        return cls(path, header, records)

    def history(self) -> list[tuple[float, float, int]]:
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.records]

    def epsilon(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history(), delta, accountant)

    def epsilon_after(self, plan: DPPlan) -> float:
        """The epsilon this client would reach if it trained one more round of ``plan``."""
        return epsilon_of([*self.history(), (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
                          plan.delta, plan.accountant)

    @property
    def rounds(self) -> list[int]:
        return [r["round"] for r in self.records]

    def append(self, server_round: int, plan: DPPlan, steps: int) -> dict[str, Any]:
        """Record a trained round; the whole file is rewritten atomically."""
        record: dict[str, Any] = {
            "round": server_round, "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps": steps, "max_grad_norm": plan.max_grad_norm, "delta": plan.delta,
            "accountant": plan.accountant, "budget_epsilon": plan.budget_epsilon,
        }
        self.records.append(record)
        record["epsilon"] = self.epsilon(plan.delta, plan.accountant)
        record["crc"] = _crc(record)
        header = {k: v for k, v in self.header.items() if k not in ("crc", "dropped_partial_line")}
        header["crc"] = _crc(header)
        write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in [header, *self.records]))
        return record
