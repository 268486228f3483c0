"""A device's own DP floor, from its node config: the weakest DP-SGD it accepts, which the server cannot lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemri.core.config import DPTierConfig
from edgemri.core.privacy.dp import ACCOUNTANTS, DPPlan, PrivacyError

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
