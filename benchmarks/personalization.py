"""Personalization on sites the server never saw: every method x tier, paired on the same pool images.

    python -m benchmarks.personalization [--seeds 5] [--data-root DIR] [--out DIR]

Per seed: distill on the source sites only (``federation.scenario: new-sites``), then run the
federations in the in-process engine (the same Flower apps, no Ray). FedAvg's run also scores
fedavg-ft, fedavg-cal and label-free from the same global model (``compare_methods``), so those
comparisons are paired on the same images; lg-fedavg and ditto get their own runs. The label-skew
scenario repeats the FedAvg run with phone class mixes drawn from Dirichlet(0.5).

Every client is scored on its site's evaluation pool (hundreds of held-out scans). Differences
are per client (personal - reference), mean with a 95% bootstrap CI over clients x seeds
(clients resampled within seeds). Hyper-parameters come from the config, never from the pools.
Results land in benchmarks/results/personalization.json after every seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import quickstart_data, write_result
from edgemri.core.config import Config, load_config
from edgemri.core.stats import bootstrap_ci_clustered, paired_differences
from edgemri.simulation.federate import federate
from edgemri.simulation.pipeline import distill

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
AFTER_ROUNDS = ("fedavg-ft", "fedavg-cal", "label-free")  # scored inside the FedAvg run
OWN_RUNS = ("lg-fedavg", "ditto")
LABEL_SKEW_ALPHA = 0.5
REFERENCES = ("start", "best-global", "local-only", "oracle")


def _federation(config: Config, method: str, *, label_skew: bool, compare: tuple[str, ...]) -> Config:
    partition = dataclasses.replace(config.federation.partition,
                                    label_skew_alpha=LABEL_SKEW_ALPHA if label_skew else None)
    return config.replace(federation=dataclasses.replace(config.federation, method=method, compare_methods=compare,
                                                         partition=partition))


def _rows(run_dir: Path, method: str) -> dict[str, dict[str, Any]]:
    """Per client: its tier and pool accuracies of the personal model(s) and the references."""
    result = json.loads((run_dir / "server" / "result.json").read_text())
    references = json.loads((run_dir / "references.json").read_text())
    rows = {}
    for client, final in result["final"].items():
        kind = result["clients"][client]["kind"]
        row = {"kind": kind, "start": final["pool-start-accuracy"], "global": final["pool-global-accuracy"],
               "best-global": final["pool-best-global-accuracy"], "local-only": final["pool-local-only-accuracy"],
               "oracle": references[client]["pool-oracle-accuracy"],
               "pooled": references[client]["pool-pooled-accuracy"],
               method: final["pool-personal-accuracy"]}
        for name in AFTER_ROUNDS:
            if f"pool-personal-accuracy@{name}" in final:
                row[name] = final[f"pool-personal-accuracy@{name}"]
        rows[client] = row
    train_seconds = sum(m.get("train-seconds", 0.0) + m.get("personal-train-seconds", 0.0)
                        for h in result["history"] for m in h["train_metrics"].values())
    return {"rows": rows, "client_train_s": train_seconds,
            "rounds_s": sum(h["seconds"] for h in result["history"])}


def _summaries(runs: dict[str, dict[int, dict[str, dict[str, Any]]]], out: dict[str, Any]) -> None:
    """Paired differences per scenario x method x tier, pooled over seeds."""
    for scenario, by_seed in runs.items():
        methods = sorted({k for rows in by_seed.values() for r in rows.values() for k in r}
                         - {"kind", "global", "pooled", *REFERENCES} | {"fedavg"})
        for method in methods:
            for tier in ("all", "hospital", "phone"):
                def column(name: str, tier: str = tier, by_seed: dict = by_seed) -> dict[tuple[int, str], float]:
                    return {(seed, c): r[name] for seed, rows in by_seed.items() for c, r in rows.items()
                            if name in r and tier in ("all", r["kind"])}

                personal = column(method)
                if not personal:
                    continue
                prefix = f"{scenario}.{method}.{tier}"
                out[f"{prefix}.clients"] = len(personal)
                out[f"{prefix}.personalized_accuracy_pct"] = 100 * sum(personal.values()) / len(personal)
                for reference in (*REFERENCES, "global"):
                    first, second = (column("oracle"), personal) if reference == "oracle" else \
                        (personal, column(reference))
                    diffs = paired_differences(first, second)
                    grouped: dict[int, list[float]] = defaultdict(list)
                    for (seed, _), value in diffs.items():
                        grouped[seed].append(100 * value)
                    ci = bootstrap_ci_clustered(grouped, seed=0)
                    name = "oracle_minus_personalized" if reference == "oracle" else f"personalized_minus_{reference}"
                    out[f"{prefix}.{name}_pts_mean"] = ci.mean
                    out[f"{prefix}.{name}_pts_ci_low"] = ci.low
                    out[f"{prefix}.{name}_pts_ci_high"] = ci.high
                headroom = paired_differences(column("oracle"), column("start"))
                gain = paired_differences(personal, column("start"))
                if headroom:
                    mean_headroom = sum(headroom.values()) / len(headroom)
                    out[f"{prefix}.oracle_headroom_pts_mean"] = 100 * mean_headroom
                    out[f"{prefix}.headroom_captured_fraction"] = (
                        (sum(gain.values()) / len(gain)) / mean_headroom if mean_headroom > 0 else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="runs/bench/personalization")
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args()
    root = quickstart_data(args.data_root)
    out = Path(args.out)
    base = load_config(args.config, [f"data.root={root}", "federation.scenario=new-sites"])
    runs: dict[str, dict[int, dict[str, dict[str, Any]]]] = {"new-sites": {}, "label-skew": {}}
    timing: dict[str, float] = defaultdict(float)
    values: dict[str, Any] = {"seeds": 0, "config": str(args.config), "label_skew_alpha": LABEL_SKEW_ALPHA}
    for seed in range(args.seeds):
        config = base.replace(seed=seed)
        started = time.perf_counter()
        student = distill(config, out / f"seed{seed}" / "distill", resume=True).student  # resume: a rerun continues
        timing["distill_s"] += time.perf_counter() - started
        plan = [("new-sites", "fedavg", False, AFTER_ROUNDS), *(("new-sites", m, False, ()) for m in OWN_RUNS),
                ("label-skew", "fedavg", True, AFTER_ROUNDS)]
        for scenario, method, skew, compare in plan:
            run_dir = out / f"seed{seed}" / f"{scenario}-{method}"
            started = time.perf_counter()
            if not (run_dir / "server" / "result.json").is_file():  # a rerun keeps the runs that finished
                federate(_federation(config, method, label_skew=skew, compare=compare), data_root=root, out=run_dir,
                         start_checkpoint=student, engine="inprocess")
            wall = time.perf_counter() - started
            run = _rows(run_dir, method)
            timing["federation_wall_s"] += wall
            timing["federation_rounds_s"] += run["rounds_s"]
            timing["client_train_s"] += run["client_train_s"]
            merged = runs[scenario].setdefault(seed, {})
            for client, row in run["rows"].items():
                merged.setdefault(client, {}).update(row)
            print(f"seed {seed} {scenario} {method}: {wall:.0f} s", flush=True)
        values["seeds"] = seed + 1
        _summaries(runs, values)
        values.update({f"time_{k}": v for k, v in timing.items()})
        values["time_rounds_over_client_train_ratio"] = timing["federation_rounds_s"] / max(timing["client_train_s"],
                                                                                            1e-9)
        write_result("personalization", values)
    for key in sorted(k for k in values if k.endswith("personalized_minus_start_pts_mean")):
        print(f"{key:70s} {values[key]:+6.1f}")


if __name__ == "__main__":
    main()
