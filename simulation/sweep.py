"""`edgemri privacy sweep`: the same federation at several target epsilons and without DP."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from edgemri.core.config import Config
from edgemri.core.io import write_json
from edgemri.reports.privacy import build_privacy_report, write_privacy_report
from edgemri.simulation.federate import federate


def with_target_epsilon(config: Config, epsilon: float | None) -> Config:
    """DP-SGD on every tier at ``epsilon`` (budget = target), or DP off for None."""
    privacy = config.privacy
    tiers = {}
    for kind in ("hospital", "phone"):
        tier = getattr(privacy, kind)
        tiers[kind] = (dataclasses.replace(tier, enabled=False) if epsilon is None else
                       dataclasses.replace(tier, enabled=True, noise_multiplier=None, target_epsilon=epsilon,
                                           budget_epsilon=epsilon))
    return config.replace(privacy=dataclasses.replace(privacy, **tiers))


def sweep(config: Config, *, epsilons: list[float], data_root: Path, out: Path, start_checkpoint: Path,
          resume: bool = False) -> dict[str, Path]:
    rows: list[dict[str, Any]] = []
    last_dp_run: Path | None = None
    for epsilon in [*sorted(epsilons), None]:
        label = "no DP" if epsilon is None else f"epsilon={epsilon:g}"
        run_dir = out / ("no-dp" if epsilon is None else f"epsilon-{epsilon:g}")
        done = (run_dir / "federation.json").is_file() and resume
        if not done:
            federate(with_target_epsilon(config, epsilon), data_root=data_root, out=run_dir,
                     start_checkpoint=start_checkpoint, resume=resume)
        report = json.loads((run_dir / "federation.json").read_text())
        rows.append({"label": label, "epsilon": math.inf if epsilon is None else epsilon,
                     "summary": report["summary"], "run": run_dir.name})
        if epsilon is not None:
            last_dp_run = run_dir
    write_json(out / "privacy-sweep.json", rows)
    anchor = last_dp_run or run_dir
    result = json.loads((anchor / "server" / "result.json").read_text())
    anchor_config = json.loads((anchor / "federation.json").read_text())["config"]
    return write_privacy_report(build_privacy_report(result, anchor_config, rows), out)
