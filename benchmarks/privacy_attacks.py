"""What a curious server gets out of the quickstart federation with and without DP-SGD, and the DP audit.

    python -m benchmarks.privacy_attacks [--quick] [--data-root DIR] [--start STUDENT.pt] [--out DIR]
    python -m benchmarks.privacy_attacks --real   # the real scans: configs/kaggle-federation.yaml, DP on every tier

(a) The quickstart config (new-sites, seed 0) on the synthetic ``clinics`` data, unless ``--data-root`` names
another folder: distill on the source sites (or take ``--start``), then two federations in Flower's simulation
engine, as ``edgemri federate`` runs them: the config's DP-SGD for phones, and ``privacy.tiers.phone.enabled=false``.
Each finished run is attacked as ``edgemri privacy attack`` does (4 clients by tier, each one's first trained
round, 300 inversion steps, seed 0), and its report with the model cards is written into the run folder.
(b) ``edgemri privacy audit`` on the same config and start model: the largest phone and the largest hospital,
each as configured (the hospitals' DP is off in the config: audited with its DP settings switched on), at the
weak setting (noise multiplier 0.1) and with DP off, 1,000 canaries, seed 0.

The goal figures (issue 16): the reconstruction's PSNR over a random same-site image (``*_margin_db``: within 1 dB
at the default epsilon), membership AUC (at most 0.55 at the default epsilon), and the empirical epsilon beside the
accounted one; issue 23 adds the membership AUC goal for every tier (``goal.dp.<tier>.*``). One flat JSON,
benchmarks/results/privacy_attacks.json (``--real``: privacy_attacks_real.json, seed 0's student of
``benchmarks.personalization --real``; reconstructions of real scans are never written as images). ``--quick`` (2
rounds, a one-epoch distillation, 2 clients, 50 inversion steps, 100 canaries) is a smoke run: its JSON goes to
``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import quickstart_data, real_data_missing, write_result
from edgemri.core.config import Config
from edgemri.core.io import write_json
from edgemri.core.registries import load_config
from edgemri.reports.privacy_attacks import write_privacy_attack_report
from edgemri.reports.privacy_audit import write_audit_report
from edgemri.simulation.federate import federate
from edgemri.simulation.pipeline import distill
from edgemri.simulation.privacy_attack import AttackSettings, attack_run
from edgemri.simulation.privacy_audit import AuditSettings, audit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
RUNS = {"dp": [], "no_dp": ["privacy.tiers.phone.enabled=false"]}  # config overrides of each federation
# --real: DP-SGD on every tier in the DP run (the config's hospitals train without it), none in the other.
REAL = {"data_root": "../shared/data/brain-tumor-mri-224", "config": str(CONFIG.parent / "kaggle-federation.yaml"),
        "start": "runs/bench/personalization-real/seed0/distill/student.pt", "name": "privacy_attacks_real",
        "runs": {"dp": ["privacy.tiers.hospital.enabled=true"],
                 "no_dp": ["privacy.tiers.phone.enabled=false", "privacy.tiers.hospital.enabled=false"]}}
FULL = {"clients": 4, "inversion_steps": 300, "canaries": 1000, "overrides": []}
QUICK = {"clients": 2, "inversion_steps": 50, "canaries": 100,
         "overrides": ["federation.rounds=2", "distill.teacher.train.epochs=1", "distill.baseline.epochs=1",
                       "distill.kd.train.epochs=1", "distill.kd.views=1", "distill.compare=none"]}
GROUPS = ("all", "hospital", "phone")
GOAL_MARGIN_DB, GOAL_MEMBERSHIP_AUC = 1.0, 0.55


def attack_values(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The attack report's summary per tier, flat: margins over a random same-site image, AUCs, identifications."""
    values: dict[str, Any] = {}
    for group in GROUPS:
        summary = report["summary"].get(group)
        if summary is None:
            continue
        prefix = f"{name}.{group}"
        values.update({f"{prefix}.clients": summary["clients"], f"{prefix}.updates": summary["updates"],
                       f"{prefix}.replays_matching": summary["replays_matching"],
                       f"{prefix}.sent_update_analytic_margin_db": summary["analytic_sent_margin_db"],
                       f"{prefix}.membership_auc": summary["membership_auc"],
                       f"{prefix}.calibrated_membership_auc": summary["calibrated_membership_auc"],
                       f"{prefix}.learned_membership_auc": summary.get("learned_membership_auc")})
        for variant, steps in summary["single_image"].items():
            step = f"{prefix}.single_image_{variant}"
            values.update({f"{step}.inversion_margin_db": steps["inversion_margin_db"],
                           f"{step}.analytic_margin_db": steps["analytic_margin_db"],
                           f"{step}.inversion_identified": steps["inversion_identified"],
                           f"{step}.analytic_identified": steps["analytic_identified"],
                           f"{step}.identified_by_chance": steps["identified_by_chance"],
                           f"{step}.steps": steps["steps"]})
        epsilons = [c["privacy"]["epsilon"] for c in report["clients"].values()
                    if group in ("all", c["kind"]) and c["privacy"]["dp"]]
        if epsilons:
            values[f"{prefix}.max_epsilon"] = max(epsilons)
    return values


def goal_values(values: dict[str, Any]) -> dict[str, Any]:
    """Issue 16's goal lines for the phones at the default epsilon (the DP run): every reconstruction (single-scan
    inversion and analytic attack, the sent update's analytic attack) within 1 dB of a random same-site scan."""
    step = "dp.phone.single_image_as_configured"
    margins = [values.get(f"{step}.inversion_margin_db"), values.get(f"{step}.analytic_margin_db"),
               values.get("dp.phone.sent_update_analytic_margin_db")]
    goals: dict[str, Any] = {"goal.dp.phone.reconstruction_within_1db": None if None in margins
                             else all(m <= GOAL_MARGIN_DB for m in margins)}
    for tier in GROUPS[1:]:
        if (auc := values.get(f"dp.{tier}.membership_auc")) is not None:
            goals[f"goal.dp.{tier}.membership_auc_at_most_0_55"] = auc <= GOAL_MEMBERSHIP_AUC
    return goals


def audit_values(report: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {"audit.canaries": report["canaries"], "audit.beta": report["beta"],
                              "audit.seconds": report["seconds"]}
    for kind, tier in report["tiers"].items():
        values[f"audit.{kind}.n_train"] = tier["n_train"]
        values[f"audit.{kind}.dp_enabled_in_config"] = tier["dp_enabled_in_config"]
        for setting, result in tier["settings"].items():
            prefix = f"audit.{kind}.{setting}"
            values[f"{prefix}.noise_multiplier"] = result["noise_multiplier"]
            if not result["trained"]:
                values[f"{prefix}.not_trained"] = result["why"]
                continue
            values.update({f"{prefix}.steps": result["steps"], f"{prefix}.sample_rate": result["sample_rate"],
                           f"{prefix}.accounted_epsilon": result["accounted_epsilon"],
                           f"{prefix}.empirical_epsilon": result["empirical_epsilon"],
                           f"{prefix}.ceiling_epsilon": result["ceiling_epsilon"],
                           f"{prefix}.correct": result["correct"], f"{prefix}.guesses": result["guesses"],
                           f"{prefix}.scores_auc": result["scores_auc"],
                           f"{prefix}.empirical_at_or_below_accounted": result["empirical_at_or_below_accounted"]})
    return values


def _federation(config: Config, root: Path, run_dir: Path, student: Path, references: Path) -> float:
    """A finished run is kept (a rerun continues); an unfinished one is started again. Its wall time."""
    wall_file = run_dir / "benchmark-wall-s.json"
    if not (run_dir / "server" / "result.json").is_file() or not wall_file.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        federate(config, data_root=root, out=run_dir, start_checkpoint=student, references_from=references)
        write_json(wall_file, {"wall_s": time.perf_counter() - started})
    return float(json.loads(wall_file.read_text())["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="a data folder with sites (default: fresh clinics data)")
    parser.add_argument("--start", default=None, help="a student distilled on this config (default: distill one)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default=None, help="run folders (default: runs/bench/privacy_attacks[-quick])")
    parser.add_argument("--quick", action="store_true", help="a smoke run; its JSON goes to --out only")
    parser.add_argument("--real", action="store_true", help="the real scans, by default " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in REAL.items() if k not in ("runs", "name")))
    args = parser.parse_args()
    runs, name = RUNS, "privacy_attacks"
    if args.real:  # its defaults, where the command line does not name its own
        args.data_root, args.start = args.data_root or REAL["data_root"], args.start or REAL["start"]
        args.config = REAL["config"] if args.config == parser.get_default("config") else args.config
        name, runs = REAL["name"], REAL["runs"]
    if args.real and real_data_missing(name, Path(args.data_root)):
        return
    scale = QUICK if args.quick else FULL
    out = Path(args.out or f"runs/bench/{name}{'-quick' if args.quick else ''}")
    root = Path(args.data_root) if args.data_root else quickstart_data(None, preset="clinics")
    base = [f"data.root={root}", "federation.scenario=new-sites", *scale["overrides"]]
    configs = {run: load_config(args.config, [*base, *extra]) for run, extra in runs.items()}
    values: dict[str, Any] = {"config": str(args.config), "quick": args.quick, "seed": configs["dp"].seed,
                              "rounds": configs["dp"].federation.rounds, "method": configs["dp"].federation.method}
    started = time.perf_counter()
    student = Path(args.start) if args.start else distill(configs["dp"], out / "distill", resume=True).student
    values["time_distill_s"] = time.perf_counter() - started
    for run, config in configs.items():
        run_dir = out / f"federation-{run}"
        values[f"time_federation_{run}_s"] = _federation(config, root, run_dir, student, out / "federation-dp")
        print(f"federation {run}: {values[f'time_federation_{run}_s']:.0f} s; attacking", flush=True)
        started = time.perf_counter()
        outcome = attack_run(run_dir, AttackSettings(clients=scale["clients"], seed=0,
                                                     inversion_steps=scale["inversion_steps"]),
                             lambda line: print(line, flush=True))
        write_privacy_attack_report(outcome.report, run_dir, outcome.examples)
        values[f"time_attack_{run}_s"] = time.perf_counter() - started
        values.update(attack_values(run, outcome.report))
    values.update(goal_values(values))
    report = audit(configs["dp"], AuditSettings(tiers=("phone", "hospital"), canaries=scale["canaries"], seed=0,
                                                start=student), lambda line: print(line, flush=True))
    write_audit_report(report, out / "audit")
    for kind, tier in report["tiers"].items():
        print(f"audit {kind}: {tier['reading']}", flush=True)
    values.update(audit_values(report))
    for key in sorted(k for k in values if k.endswith(("_margin_db", "_auc", "_epsilon")) or k.startswith("goal.")):
        print(f"{key:70s} {values[key]}")
    if args.quick:
        print(f"wrote {write_json(out / f'{name}.json', values)} (a smoke run: not in benchmarks/results)")
    else:
        write_result(name, values)


if __name__ == "__main__":
    main()
