"""`edgemri privacy sweep`: the same federation at several target epsilons and without DP."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from edgemri.core.config import Config
from edgemri.core.federation.protocol import FederationResult
from edgemri.core.io import write_json
from edgemri.core.registries import load_config
from edgemri.reports.privacy import build_privacy_report, read_json, write_privacy_report
from edgemri.simulation.federate import federate
from edgemri.simulation.pipeline import UsageError


def with_target_epsilon(config: Config, epsilon: float | None) -> Config:
    """DP-SGD on every tier at ``epsilon`` (budget = target), or DP off for None."""
    privacy = config.privacy
    tiers = {kind: (dataclasses.replace(tier, enabled=False) if epsilon is None else
                    dataclasses.replace(tier, enabled=True, noise_multiplier=None, target_epsilon=epsilon,
                                        budget_epsilon=epsilon))
             for kind, tier in privacy.tiers.items()}
    return config.replace(privacy=dataclasses.replace(privacy, tiers=tiers))


def check_epsilons(epsilons: list[float]) -> None:
    """Target epsilons must be finite and positive: the no-DP run is added by the sweep itself."""
    if not epsilons or not all(math.isfinite(e) and e > 0 for e in epsilons):
        raise UsageError(f"target epsilons (--epsilons) must be finite positive numbers, got {epsilons}")


def sweep(config: Config, *, epsilons: list[float], data_root: Path, out: Path, start_checkpoint: Path,
          resume: bool = False) -> dict[str, Path]:
    """One federation per target epsilon and one without DP (kept when ``resume``); the privacy/accuracy table."""
    check_epsilons(epsilons)
    rows: list[dict[str, Any]] = []
    last_dp_run: Path | None = None
    for epsilon in [*sorted(epsilons), None]:
        label = "no DP" if epsilon is None else f"epsilon={epsilon:g}"
        run_dir = out / ("no-dp" if epsilon is None else f"epsilon-{epsilon:g}")
        done = (run_dir / "federation.json").is_file() and resume
        if not done:
            federate(with_target_epsilon(config, epsilon), data_root=data_root, out=run_dir,
                     start_checkpoint=start_checkpoint, resume=resume)
        report = read_json(run_dir / "federation.json")
        rows.append({"label": label, "epsilon": math.inf if epsilon is None else epsilon,
                     "summary": report["summary"], "run": run_dir.name})
        if epsilon is not None:
            last_dp_run = run_dir
    write_json(out / "privacy-sweep.json", rows)
    anchor = last_dp_run or run_dir
    result = FederationResult.from_dict(read_json(anchor / "server" / "result.json"))
    return write_privacy_report(build_privacy_report(result, load_config(anchor / "config.yaml"), rows), out)
