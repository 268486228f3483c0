"""Sample-level DP-SGD planning with Opacus: the accountants, a client's plan (noise for a target epsilon, or
the epsilon a given noise reaches), and the Opacus wrapper the one training loop calls.

Flower's own Opacus example builds a new PrivacyEngine every round, so its epsilon restarts each round. Here a
client's accountant history is rebuilt from its ledger (core/privacy/ledger.py) whenever it starts, and before
a round the client checks the epsilon it would reach against its budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edgemri.core.config import DPTierConfig
from edgemri.core.errors import EdgemriError

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
