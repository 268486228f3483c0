"""Personalization on sites the server never saw: every method x tier, paired on the same pool images.

    python -m benchmarks.personalization [--seeds 5] [--data-root DIR] [--config YAML] [--name NAME] [--out DIR]
    python -m benchmarks.personalization --real   # the real Kaggle scans (../shared/data), 5 seeds

Data: the synthetic ``clinics`` preset (two T1c-only sites, two whose protocols mix T2 and FLAIR
into T1c), unless ``--data-root`` names another folder (with site metadata and pools, or a
Kaggle-layout folder: appearance sites that keep every class, pools from deduplicated Testing).
``--real`` is ``--data-root ../shared/data/brain-tumor-mri-224 --config configs/kaggle-federation.yaml
--name personalization_real``.
Per seed: distill on the source sites only (``federation.scenario: new-sites``), then run the
federations in Flower's simulation engine, as ``edgemri federate`` does. FedAvg's run also scores
fedavg-ft, fedavg-cal and label-free from the same global model (``compare_methods``), so those
comparisons are paired on the same images; lg-fedavg, ditto and fedbn get their own runs. The
label-skew scenario repeats the FedAvg run with phone class mixes drawn from Dirichlet(0.5), each
client's pool accuracy mixed by its own class mix.

Every client is scored on its site's evaluation pool (hundreds of held-out scans). Differences
are per client (personal - reference), mean with a 95% bootstrap CI over clients x seeds
(clients resampled within seeds). Hyper-parameters come from the config, never from the pools;
the sweeps here (seed 0, after every seed's runs: Ditto's lambda, the personal recipe's distillation
weight with selection off) are read on the hospitals' validation splits. Beside the mean, each tier's
worst decile of clients (personal - start) and each pool's label mix are reported.
Results land in benchmarks/results/NAME.json after every seed. A rerun resumes: each finished run leaves
``benchmark-run.json`` in its folder under ``--out``, and that record alone stands for the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    distill_seconds,
    distilled_student,
    quickstart_data,
    real_data_missing,
    write_result,
)
from edgemri.arguments import SEEDS
from edgemri.core.config import Config
from edgemri.core.data.partition import manifest_paths, read_manifest
from edgemri.core.io import write_json
from edgemri.core.registries import load_config
from edgemri.reports.common import markdown_table
from edgemri.reports.federation import paired_summary
from edgemri.simulation.federate import federate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
REAL = {"data_root": "../shared/data/brain-tumor-mri-224", "name": "personalization_real",
        "config": str(CONFIG.parent / "kaggle-federation.yaml")}
WORST_SHARE = 0.1  # the worst decile of clients
AFTER_ROUNDS = ("fedavg-ft", "fedavg-cal", "label-free")  # scored inside the FedAvg run
OWN_RUNS = ("lg-fedavg", "ditto", "fedbn")
LABEL_SKEW_ALPHA = 0.5
DITTO_LAMBDAS = (0.01, 0.1)  # besides the config's (1.0); seed 0, read on the hospitals' validation splits
# The personal recipe's distillation weight, fedavg-ft on seed 0 with selection off (select: last), so the
# hospitals' validation splits, which nothing selected on, can judge it.
RECIPE_WEIGHTS = (0.0, 0.5, 0.9)
REFERENCES = ("start", "oracle")  # the same in every run of a seed
RUN_COLUMNS = ("global", "best-global", "local-only")  # each method is paired with its own run's


def _federation(config: Config, method: str, *, label_skew: bool, compare: tuple[str, ...],
                ditto_lambda: float | None = None) -> Config:
    partition = dataclasses.replace(config.federation.partition,
                                    label_skew_alpha=LABEL_SKEW_ALPHA if label_skew else None)
    federation = dataclasses.replace(config.federation, method=method, compare_methods=compare, partition=partition,
                                     ditto_lambda=config.federation.ditto_lambda if ditto_lambda is None
                                     else ditto_lambda)
    return config.replace(federation=federation)


def _rows(run_dir: Path, method: str) -> dict[str, dict[str, Any]]:
    """Per client: its tier and pool accuracies of the personal model(s) and the references."""
    result = json.loads((run_dir / "server" / "result.json").read_text())
    references = json.loads((run_dir / "references.json").read_text())["clients"]
    rows = {}
    for client, final in result["final"].items():
        kind = result["clients"][client]["kind"]
        # The same start and references in every run of a seed; the global and local-only models are this run's.
        row = {"kind": kind, "start": final["pool-start-accuracy"],
               "oracle": references[client]["pool-oracle-accuracy"]}
        personal = {method: final["pool-personal-accuracy"],
                    **{name: final[f"pool-personal-accuracy@{name}"] for name in AFTER_ROUNDS
                       if f"pool-personal-accuracy@{name}" in final}}
        for name, value in personal.items():
            row.update({name: value, **{f"{name}:{column}": final[f"pool-{column}-accuracy"]
                                        for column in RUN_COLUMNS}})
        rows[client] = row
    train_seconds = sum(m.get("train-seconds", 0.0) + m.get("personal-train-seconds", 0.0)
                        for h in result["history"] for m in h["train_metrics"].values())
    return {"rows": rows, "client_train_s": train_seconds,
            "rounds_s": sum(h["seconds"] for h in result["history"])}


def _summaries(runs: dict[str, dict[int, dict[str, dict[str, Any]]]], out: dict[str, Any]) -> None:
    """Per scenario x method x tier, the federation report's paired comparisons pooled over seeds."""
    for scenario, by_seed in runs.items():
        methods = sorted({k for rows in by_seed.values() for r in rows.values() for k in r if ":" not in k}
                         - {"kind", *REFERENCES})
        for method in methods:
            rows_by_seed = {seed: [{**row, "client": client, "personalized": row[method],
                                    **{column: row[f"{method}:{column}"] for column in RUN_COLUMNS}}
                                   for client, row in rows.items() if method in row]
                            for seed, rows in by_seed.items()}
            summary = paired_summary(rows_by_seed, ("hospital", "phone"))
            for tier, comparisons in summary["groups"].items():
                prefix = f"{scenario}.{method}.{tier}"
                members = [r for rows in rows_by_seed.values() for r in rows if tier in ("all", r["kind"])]
                out[f"{prefix}.clients"] = len(members)
                out[f"{prefix}.personalized_accuracy_pct"] = 100 * statistics.fmean(r["personalized"]
                                                                                    for r in members)
                for name, ci in comparisons.items():
                    key = name.replace(" - ", "_minus_").replace("-", "_")
                    for part in ("mean", "low", "high"):
                        out[f"{prefix}.{key}_pts_{part}"] = 100 * ci[part]
                gains = sorted(r["personalized"] - r["start"] for r in members)
                worst = gains[: max(1, round(WORST_SHARE * len(gains)))]
                out[f"{prefix}.worst_decile_personalized_minus_start_pts"] = 100 * statistics.fmean(worst)
                headroom, gain = comparisons["oracle - start"]["mean"], comparisons["personalized - start"]["mean"]
                out[f"{prefix}.headroom_captured_fraction"] = gain / headroom if headroom > 0 else float("nan")


def _pool_label_mix(run_dir: Path) -> dict[str, int]:
    """Each client site's evaluation pool, by class: the label mix every pool number stands on."""
    mix: dict[str, int] = {}
    for path in manifest_paths(run_dir / "manifests"):
        manifest = read_manifest(path)
        for name, count in manifest.class_counts()["pool"].items():
            mix[f"pool_label_mix.{manifest.site}.{name}"] = count
    return mix


def _hospital_val(run_dir: Path) -> float:
    """Mean personal-model accuracy on the hospitals' validation splits (what a sweep may select on)."""
    final = json.loads((run_dir / "server" / "result.json").read_text())["final"]
    values = [m["personal-val-accuracy"] for m in final.values() if "personal-val-accuracy" in m]
    return 100 * sum(values) / len(values) if values else float("nan")


def table(values: dict[str, Any], scenario: str) -> str:
    """The README's table: every method x tier of one scenario, differences in points with their 95% CIs."""
    def ci(prefix: str, name: str) -> str:
        mean, low, high = (values[f"{prefix}.{name}_pts_{p}"] for p in ("mean", "low", "high"))
        return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"

    methods = sorted({k.split(".")[1] for k in values if k.startswith(f"{scenario}.") and k.endswith(".clients")})
    rows = []
    for method in methods:
        for tier in ("hospital", "phone", "all"):
            prefix = f"{scenario}.{method}.{tier}"
            if f"{prefix}.clients" not in values:
                continue
            rows.append([method, tier, values[f"{prefix}.clients"],
                         f"{values[f'{prefix}.personalized_accuracy_pct']:.1f}",
                         *(ci(prefix, n) for n in ("personalized_minus_start", "personalized_minus_global",
                                                   "personalized_minus_best_global", "personalized_minus_local_only",
                                                   "oracle_minus_start")),
                         f"{100 * values[f'{prefix}.headroom_captured_fraction']:.0f}%"])
    return markdown_table(["method", "tier", "clients", "personalized", "− start", "− global", "− best-global",
                           "− local-only", "oracle − start", "captured"], rows, align="ll" + "r" * 8)


def _run(config: Config, name: str, out: Path, root: Path) -> dict[str, Any]:
    """One federation's record under ``out``: its wall time, per-client rows and what the sweeps and tables read.
    The record alone resumes a rerun: copied into ``out`` (e.g. from another machine), it stands for the run."""
    run_dir = out / f"seed{config.seed}" / name
    record = run_dir / "benchmark-run.json"
    if not record.is_file():
        start = distilled_student(config, out / f"seed{config.seed}" / "distill")
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun keeps the runs that finished, restarts the others
        started = time.perf_counter()
        # The seed's first run computed the references; the others reuse them where their inputs match.
        federate(config, data_root=root, out=run_dir, start_checkpoint=start,
                 references_from=out / f"seed{config.seed}" / "new-sites-fedavg")
        write_json(record, {"wall_s": time.perf_counter() - started, **_rows(run_dir, config.federation.method),
                            "hospital_val_pct": _hospital_val(run_dir), "pool_label_mix": _pool_label_mix(run_dir)})
    result = json.loads(record.read_text())
    print(f"seed {config.seed} {name}: {result['wall_s']:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--real", action="store_true", help="the real Kaggle scans: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in REAL.items()))
    parser.add_argument("--name", default="personalization", help="the results file, benchmarks/results/NAME.json")
    parser.add_argument("--seeds", type=SEEDS, default=5, help=f"seeds to run ({SEEDS}, default 5)")
    parser.add_argument("--out", default="runs/bench/personalization")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--skip-sweeps", action="store_true", help="only the seeds' runs, no seed-0 sweeps")
    parser.add_argument("--table", action="store_true", help="print the tables of the last results and stop")
    args = parser.parse_args()
    if args.real:
        for key, value in REAL.items():
            setattr(args, key, value)
        args.out = "runs/bench/personalization-real" if args.out == parser.get_default("out") else args.out
    if args.table:
        values = json.loads((RESULTS / f"{args.name}.json").read_text())
        for scenario in ("new-sites", "label-skew"):
            print(f"\n{scenario} ({values['seeds']} seeds)\n\n{table(values, scenario)}")
        return
    if args.real and real_data_missing(args.name, Path(args.data_root)):
        return
    root = Path(args.data_root) if args.data_root else quickstart_data(None, preset="clinics")
    out = Path(args.out)
    base = load_config(args.config, [f"data.root={root}", "federation.scenario=new-sites"])
    runs: dict[str, dict[int, dict[str, dict[str, Any]]]] = {"new-sites": {}, "label-skew": {}}
    timing: dict[str, float] = defaultdict(float)
    values: dict[str, Any] = {"seeds": 0, "config": str(args.config), "data_root": str(root),
                              "label_skew_alpha": LABEL_SKEW_ALPHA}

    for seed in range(args.seeds):
        config = base.replace(seed=seed)
        plan = [("new-sites", "fedavg", False, AFTER_ROUNDS), *(("new-sites", m, False, ()) for m in OWN_RUNS),
                ("label-skew", "fedavg", True, AFTER_ROUNDS)]
        for scenario, method, skew, compare in plan:
            rows = _run(_federation(config, method, label_skew=skew, compare=compare), f"{scenario}-{method}", out,
                        root)
            timing["federation_wall_s"] += rows["wall_s"]
            timing["federation_rounds_s"] += rows["rounds_s"]
            timing["client_train_s"] += rows["client_train_s"]
            merged = runs[scenario].setdefault(seed, {})
            for client, row in rows["rows"].items():
                merged.setdefault(client, {}).update(row)
            if seed == 0 and scenario == "new-sites" and method == "ditto":
                values[f"ditto_lambda_{config.federation.ditto_lambda:g}_hospital_val_pct"] = rows["hospital_val_pct"]
            if seed == 0 and scenario == "new-sites" and method == "fedavg":
                values.update(rows["pool_label_mix"])
        timing["distill_s"] += distill_seconds(out / f"seed{seed}" / "distill")
        values["seeds"] = seed + 1
        _summaries(runs, values)
        values.update({f"time_{k}": v for k, v in timing.items()})
        values["time_rounds_over_client_train_ratio"] = timing["federation_rounds_s"] / max(timing["client_train_s"],
                                                                                            1e-9)
        write_result(args.name, values)
    if args.skip_sweeps:
        return
    config = base.replace(seed=0)  # the sweeps: seed 0, after every seed's runs
    for weight in DITTO_LAMBDAS:
        sweep = _run(_federation(config, "ditto", label_skew=False, compare=(), ditto_lambda=weight),
                     f"sweep-ditto-lambda-{weight:g}", out, root)
        values[f"ditto_lambda_{weight:g}_hospital_val_pct"] = sweep["hospital_val_pct"]
    for weight in RECIPE_WEIGHTS:
        hospital = config.federation.tier("hospital")
        recipe = dataclasses.replace(hospital.personal, distill_weight=weight, select="last")
        tiers = {**config.federation.tiers, "hospital": dataclasses.replace(hospital, personal=recipe)}
        swept = config.replace(federation=dataclasses.replace(config.federation, tiers=tiers))
        sweep = _run(_federation(swept, "fedavg-ft", label_skew=False, compare=()),
                     f"sweep-recipe-distill-weight-{weight:g}", out, root)
        values[f"recipe_distill_weight_{weight:g}_hospital_val_pct"] = sweep["hospital_val_pct"]
    write_result(args.name, values)
    for key in sorted(k for k in values if k.endswith("personalized_minus_start_pts_mean")):
        print(f"{key:70s} {values[key]:+6.1f}")


if __name__ == "__main__":
    main()
