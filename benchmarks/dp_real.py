"""What DP-SGD costs the clients on real scans: the privacy sweep and the DP personal fine-tune, paired per client.

    python -m benchmarks.dp_real [--seeds 3] [--data-root DIR] [--out DIR]

The real-data federation (configs/kaggle-federation.yaml: the server distills on one appearance site, hospitals
and phones personalize at the other) from each seed's distilled student, the very students
``benchmarks.personalization --real`` distills (same folder: its student.pt, distilled here only where missing).
Per seed:
- the sweep, as ``edgemri privacy sweep`` runs it: DP-SGD on every tier at target epsilon 1, 3 and 8 (budget =
  target), and no DP;
- the personal fine-tune under DP-SGD (``personal_epsilon`` 1 on top of the rounds' epsilon 3, so the ledger's
  total stays under a budget of 5) against the same federation with the fine-tune outside DP; both select the
  last epoch (a DP fine-tune cannot select on validation scans).
Every number is a client's personalized model on its site's evaluation pool (Testing at its site, less every copy
of a Training scan). Differences are per client, same clients and pool images in every run of a seed, mean with
a 95% bootstrap CI over clients x seeds (clients resampled within seeds), per tier; beside them each tier's mean
and worst-client accuracy. Goal (issue 23): epsilon 3 costs at most 1 point of mean client accuracy against no
DP. Results: benchmarks/results/dp_real.json after every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, distilled_student, real_data_missing, write_result
from edgemri.arguments import SEEDS
from edgemri.core.config import Config, apply_overrides
from edgemri.core.registries import load_config, parse_config
from edgemri.core.stats import bootstrap_ci_clustered
from edgemri.reports.common import markdown_table
from edgemri.simulation.federate import federate
from edgemri.simulation.sweep import with_target_epsilon

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "kaggle-federation.yaml"
EPSILONS = (1.0, 3.0, 8.0)
PERSONAL = {"rounds_epsilon": 3.0, "personal_epsilon": 1.0, "budget_epsilon": 5.0}
GOAL_EPSILON, GOAL_COST_PTS = 3.0, 1.0
TIERS = ("hospital", "phone")


def _personal_runs(config: Config) -> dict[str, Config]:
    """The same DP federation with the personal fine-tune outside and inside DP-SGD, both selecting the last epoch."""
    base = with_target_epsilon(config, PERSONAL["rounds_epsilon"])
    overrides = [f"federation.tiers.{tier}.personal.select=last" for tier in TIERS]
    overrides += [f"privacy.tiers.{tier}.budget_epsilon={PERSONAL['budget_epsilon']}" for tier in TIERS]
    inside = overrides + [f"privacy.tiers.{tier}.personal_epsilon={PERSONAL['personal_epsilon']}" for tier in TIERS]
    return {"personal-outside-dp": parse_config(apply_overrides(base.to_dict(), overrides)),
            "personal-under-dp": parse_config(apply_overrides(base.to_dict(), inside))}


def _clients(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per client: its tier, its personalized model's pool accuracy, and whether its fine-tune ran under DP."""
    result = json.loads((run_dir / "server" / "result.json").read_text())
    return {client: {"kind": result["clients"][client]["kind"], "accuracy": final["pool-personal-accuracy"],
                     "personal_dp": final.get("personal-dp"), "epsilon": final.get("epsilon", 0.0)}
            for client, final in result["final"].items() if "pool-personal-accuracy" in final}


def _summaries(runs: dict[str, dict[int, dict[str, dict[str, Any]]]], values: dict[str, Any]) -> None:
    for name, by_seed in runs.items():
        for tier in TIERS:
            members = [c for clients in by_seed.values() for c in clients.values() if c["kind"] == tier]
            if not members:
                continue
            values[f"{name}.{tier}.clients"] = len(members)
            values[f"{name}.{tier}.mean_accuracy_pct"] = 100 * statistics.fmean(c["accuracy"] for c in members)
            values[f"{name}.{tier}.worst_client_accuracy_pct"] = 100 * min(c["accuracy"] for c in members)
            values[f"{name}.{tier}.max_epsilon"] = max(c["epsilon"] for c in members)
            if name == "personal-under-dp":  # the share whose fine-tune fitted the budget and ran under DP-SGD
                values[f"{name}.{tier}.personal_dp_fraction"] = statistics.fmean(
                    float(c["personal_dp"] or 0.0) for c in members)
    pairs = [(f"epsilon-{e:g}", "no-dp") for e in EPSILONS] + [("personal-under-dp", "personal-outside-dp")]
    for first, second in pairs:
        for tier in TIERS:
            diffs = {seed: [100 * (runs[first][seed][c]["accuracy"] - runs[second][seed][c]["accuracy"])
                            for c, row in clients.items() if row["kind"] == tier and c in runs[first].get(seed, {})]
                     for seed, clients in runs[second].items() if seed in runs[first]}
            ci = bootstrap_ci_clustered(diffs)
            key = f"{first}_minus_{second}.{tier}".replace("-", "_")
            values.update({f"{key}_pts_mean": ci.mean, f"{key}_pts_low": ci.low, f"{key}_pts_high": ci.high})
    for tier in TIERS:
        low = values.get(f"epsilon_{GOAL_EPSILON:g}_minus_no_dp.{tier}_pts_low")
        if low is not None:
            values[f"goal_epsilon_{GOAL_EPSILON:g}_costs_at_most_{GOAL_COST_PTS:g}_pt.{tier}"] = bool(
                low >= -GOAL_COST_PTS)


def table(values: dict[str, Any]) -> str:
    """The README's table: per run and tier, mean and worst-client pool accuracy, and the paired cost against its
    reference run with its 95% CI."""
    references = {**{f"epsilon-{e:g}": "no-dp" for e in EPSILONS}, "personal-under-dp": "personal-outside-dp"}
    rows = []
    for name in (*(f"epsilon-{e:g}" for e in EPSILONS), "no-dp", "personal-outside-dp", "personal-under-dp"):
        for tier in TIERS:
            prefix = f"{name}.{tier}"
            if f"{prefix}.clients" not in values:
                continue
            cost = "—"
            if name in references:
                key = f"{name}_minus_{references[name]}.{tier}".replace("-", "_")
                cost = (f"{values[f'{key}_pts_mean']:+.1f} [{values[f'{key}_pts_low']:+.1f}, "
                        f"{values[f'{key}_pts_high']:+.1f}] vs {references[name]}")
            rows.append([name, tier, values[f"{prefix}.clients"], f"{values[f'{prefix}.max_epsilon']:.2f}",
                         f"{values[f'{prefix}.mean_accuracy_pct']:.1f}",
                         f"{values[f'{prefix}.worst_client_accuracy_pct']:.1f}", cost])
    return markdown_table(["run", "tier", "clients", "max epsilon", "mean accuracy", "worst client",
                           "− reference [95% CI]"], rows, align="llrrrrl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/brain-tumor-mri-224")
    parser.add_argument("--seeds", type=SEEDS, default=3, help=f"seeds to run ({SEEDS}, default 3)")
    parser.add_argument("--out", default="runs/bench/dp-real")
    parser.add_argument("--students", default="runs/bench/personalization-real",
                        help="where benchmarks.personalization --real distils each seed's student (resumed)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--table", action="store_true", help="print the table of the last results and stop")
    args = parser.parse_args()
    if args.table:
        values = json.loads((RESULTS / "dp_real.json").read_text())
        print(f"{values['seeds']} seed(s)\n\n{table(values)}")
        return
    root, out = Path(args.data_root), Path(args.out)
    if real_data_missing("dp_real", root):
        return
    base = load_config(args.config, [f"data.root={root}"])
    runs: dict[str, dict[int, dict[str, dict[str, Any]]]] = defaultdict(dict)
    values: dict[str, Any] = {"seeds": 0, "config": str(args.config), "data_root": str(root),
                              "epsilons": list(EPSILONS), **{f"personal_{k}": v for k, v in PERSONAL.items()}}
    for seed in range(args.seeds):
        config = base.replace(seed=seed)
        student = distilled_student(config, Path(args.students) / f"seed{seed}" / "distill")
        plan = {**{f"epsilon-{e:g}": with_target_epsilon(config, e) for e in EPSILONS},
                "no-dp": with_target_epsilon(config, None), **_personal_runs(config)}
        for name, run_config in plan.items():
            run_dir = out / f"seed{seed}" / name
            if not (run_dir / "server" / "result.json").is_file():
                federate(run_config, data_root=root, out=run_dir, start_checkpoint=student,
                         resume=(run_dir / "server").exists(),
                         references_from=Path(args.students) / f"seed{seed}" / "new-sites-fedavg")
            runs[name][seed] = _clients(run_dir)
            print(f"seed {seed} {name}: done", flush=True)
        values["seeds"] = seed + 1
        _summaries(runs, values)
        write_result("dp_real", values)


if __name__ == "__main__":
    main()
