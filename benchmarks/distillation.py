"""Distillation beyond the paper: baseline, the paper's KD and the improved recipe, with one ablation per ingredient.

    python -m benchmarks.distillation [--seeds 3] [--presets quickstart kaggle] [--out DIR]
                                      [--data-quickstart DIR] [--data-kaggle DIR] [--compare ablation|paper]

Per preset (the synthetic quickstart and kaggle-size sets, seen-sites, the server's half of Training as in
README §2): ``edgemri distill`` with ``distill.compare: ablation`` for ``--seeds`` seeds, so every student of
a seed shares its teacher, its data split and its Testing images (paired comparisons). First, on the
quickstart preset's seed 0, a small sweep of the KD temperature and alpha, read on the validation split only
(the best epoch's validation accuracy); the runs then use its choice. Everything is resumable: a rerun keeps
finished stages. Results: benchmarks/results/distillation.json, the reports in ``--out``/<preset>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, quickstart_data, write_result
from edgemri.arguments import SEEDS
from edgemri.core.config import Config
from edgemri.core.data.dataset import load_dataset
from edgemri.core.registries import load_config
from edgemri.core.training.distill import Distiller, run_distillation
from edgemri.reports.common import markdown_table
from edgemri.reports.distill import build_report, write_report

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
PRESETS = ("quickstart", "kaggle")
TEMPERATURES = (2.0, 4.0)  # the paper's T=1, alpha=0.5 is the kd-without-temperature-alpha ablation
ALPHAS = (0.5, 0.9)
GOAL_GAP_CLOSED = 0.5
GOAL_ECE = 0.03
GOAL_COVERAGE_GAIN_PTS = 5.0


def _config(data_root: Path, compare: str, kd: dict[str, float] | None = None) -> Config:
    config = load_config(CONFIG, [f"data.root={data_root}", "federation.scenario=seen-sites",
                                  f"distill.compare={compare}"])
    if kd:
        config = config.replace(distill=dataclasses.replace(
            config.distill, kd=dataclasses.replace(config.distill.kd, **kd)))
    return config


def sweep(data_root: Path, out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """(T, alpha) on seed 0, judged by the best epoch's validation accuracy; returns the choice and the table."""
    config = _config(data_root, "none")
    dataset = load_dataset(data_root)
    distiller = Distiller(config, dataset, 0, out, resume=True, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    _, teacher, teacher_logits, _, _ = distiller.teacher()
    cache: dict[Any, Any] = {}
    values: dict[str, Any] = {}
    best: tuple[tuple[float, float], dict[str, float]] = ((-1.0, 0.0), {})
    for temperature in TEMPERATURES:
        for alpha in ALPHAS:
            kd = dataclasses.replace(config.distill.kd, temperature=temperature, alpha=alpha)
            teaching, *_ = distiller.teaching(kd, teacher, teacher_logits, cache)
            stage = distiller.student(f"sweep-t{temperature:g}-a{alpha:g}", kd, teaching)
            # The training's own selection rule: best validation accuracy, ties to the lower validation loss.
            val = max((h["val_accuracy"], -h["val_loss"]) for h in stage.history)
            values[f"sweep_t{temperature:g}_a{alpha:g}_val_accuracy_pct"] = 100 * val[0]
            values[f"sweep_t{temperature:g}_a{alpha:g}_val_loss"] = -val[1]
            print(f"sweep T={temperature:g} alpha={alpha:g}: validation {100 * val[0]:.2f}% (loss {-val[1]:.3f})",
                  flush=True)
            if val > best[0]:
                best = (val, {"temperature": temperature, "alpha": alpha})
    values.update({"sweep_chosen_temperature": best[1]["temperature"], "sweep_chosen_alpha": best[1]["alpha"]})
    return best[1], values


def _summary(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The report's headline numbers, flat: accuracy, gap closed, ECE, selective accuracy, teacher passes."""
    out: dict[str, Any] = {f"{prefix}.train_images": report["data"]["train_images_per_seed"][0],
                           f"{prefix}.teacher_forward_images_per_seed": report["teacher_forward_images"][0]}
    for stage, m in report["models"].items():
        key = f"{prefix}.{stage}"
        out[f"{key}.test_accuracy_pct_mean"] = 100 * m["test_accuracy"]["mean"]
        out[f"{key}.test_accuracy_pct_std"] = 100 * m["test_accuracy"]["std"]
        if "test_ece_uncalibrated" in m:
            out[f"{key}.ece_uncalibrated_mean"] = m["test_ece_uncalibrated"]["mean"]
            out[f"{key}.ece_calibrated_mean"] = m["test_ece"]["mean"]
            out[f"{key}.ece_calibrated_max"] = max(m["test_ece"]["values"])
            out[f"{key}.ece_noise_floor_mean"] = m["test_ece_noise_floor"]["mean"]
            out[f"{key}.accuracy_at_90_coverage_pct_mean"] = 100 * m["test_accuracy_at_90_coverage"]["mean"]
            out[f"{key}.coverage_gain_at_90_pts_mean"] = 100 * (m["test_accuracy_at_90_coverage"]["mean"]
                                                                 - m["test_accuracy"]["mean"])
            out[f"{key}.teacher_passes_per_seed"] = m["teacher_passes"][0]
    for stage, c in report["comparisons"].items():
        key = f"{prefix}.{stage}"
        out[f"{key}.gap_closed_fraction"] = c["gap_closed"]
        out[f"{key}.gap_closed_fraction_min_seed"] = min(g for g in c["gap_closed_per_seed"] if g is not None)
        out[f"{key}.seeds_above_baseline"] = c["seeds_above_baseline"]
        for part in ("mean", "low", "high"):
            out[f"{key}.minus_baseline_pts_{part}"] = 100 * c["minus_baseline"][part]
            if "kd_minus_this" in c:
                out[f"{key}.ingredient_gain_pts_{part}"] = 100 * c["kd_minus_this"][part]
    kd = report["comparisons"]["kd"]
    out[f"{prefix}.goal_met"] = bool(
        kd["gap_closed"] >= GOAL_GAP_CLOSED and kd["seeds_above_baseline"] == len(report["seeds"])
        and out[f"{prefix}.kd.ece_calibrated_max"] <= GOAL_ECE
        and out[f"{prefix}.kd.coverage_gain_at_90_pts_mean"] >= GOAL_COVERAGE_GAIN_PTS)
    return out


def table(values: dict[str, Any], preset: str) -> str:
    """README §2's table for one preset: every student with its paired difference to the baseline and its ECE."""
    def ci(key: str) -> str:
        mean, low, high = (values[f"{key}_pts_{p}"] for p in ("mean", "low", "high"))
        return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"

    rows = []
    stages = sorted({k.split(".")[1] for k in values if k.startswith(f"{preset}.") and k.endswith("_pct_mean")},
                    key=lambda s: (s != "teacher", s != "baseline", s != "paper-kd", s != "kd", s))
    for stage in stages:
        key = f"{preset}.{stage}"
        accuracy = f"{values[f'{key}.test_accuracy_pct_mean']:.1f} ± {values[f'{key}.test_accuracy_pct_std']:.1f}"
        if stage == "teacher":
            rows.append(["teacher", accuracy, "", "", "", "", "", "", ""])
            continue
        ece = (f"{values[f'{key}.ece_uncalibrated_mean']:.3f} → {values[f'{key}.ece_calibrated_mean']:.3f} "
               f"({values[f'{key}.ece_noise_floor_mean']:.3f})")
        accepted = (f"{values[f'{key}.accuracy_at_90_coverage_pct_mean']:.1f} "
                    f"({values[f'{key}.coverage_gain_at_90_pts_mean']:+.1f})")
        if stage == "baseline":
            rows.append(["baseline (CE)", accuracy, "", "", "", ece, accepted, 0, ""])
            continue
        gap, worst = values[f"{key}.gap_closed_fraction"], values[f"{key}.gap_closed_fraction_min_seed"]
        rows.append([stage, accuracy, ci(f"{key}.minus_baseline"), f"{100 * gap:.0f}% ({100 * worst:.0f}%)",
                     f"{values[f'{key}.seeds_above_baseline']}/{values[f'{preset}.seeds_run']}", ece, accepted,
                     f"{values[f'{key}.teacher_passes_per_seed']:,}",
                     ci(f"{key}.ingredient_gain") if f"{key}.ingredient_gain_pts_mean" in values else ""])
    return markdown_table(["student", "test accuracy %", "− baseline (paired)", "gap closed (worst seed)",
                           "seeds > baseline", "ECE raw → calibrated (floor)", "accepted at 90% coverage",
                           "teacher passes", "what it gave the recipe"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=SEEDS, default=3, help=f"seeds to run ({SEEDS}, default 3)")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--out", default="runs/bench/distillation")
    parser.add_argument("--data-quickstart", default=None, help="a synthetic quickstart set (default: generate one)")
    parser.add_argument("--data-kaggle", default=None, help="a synthetic kaggle-size set (default: generate one)")
    parser.add_argument("--compare", choices=("ablation", "paper"), default="ablation",
                        help="paper: only the paper's KD beside the recipe (no ablation students)")
    parser.add_argument("--table", action="store_true", help="print README §2's tables from the last results")
    args = parser.parse_args()
    if args.table:
        values = json.loads((RESULTS / "distillation.json").read_text())
        for preset in PRESETS:
            if f"{preset}.seeds_run" in values:
                print(f"\n{preset} ({values[f'{preset}.seeds_run']} seeds)\n\n{table(values, preset)}")
        return
    out = Path(args.out)
    given = {"quickstart": args.data_quickstart, "kaggle": args.data_kaggle}
    roots = {preset: quickstart_data(given[preset], preset) for preset in {*args.presets, "quickstart"}}
    # Presets run in separate invocations keep each other's results (a rerun of the sweep resumes its stages).
    previous = RESULTS / "distillation.json"
    values: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    values.update({"config": str(CONFIG), "scenario": "seen-sites"})  # seeds: per preset, PRESET.seeds_run
    started = time.perf_counter()
    chosen, swept = sweep(roots["quickstart"], out / "sweep")
    values.update(swept)
    values["sweep_s"] = time.perf_counter() - started
    for preset in args.presets:
        root = roots[preset]
        config = _config(root, args.compare, chosen)
        dataset = load_dataset(root)
        started = time.perf_counter()
        results, _ = run_distillation(config, dataset, out / preset, seeds=args.seeds, resume=True, progress=False)
        seconds = time.perf_counter() - started
        report = build_report(config, dataset, results, seconds, out / preset)
        paths = write_report(report, out / preset)
        values = {k: v for k, v in values.items() if not k.startswith(f"{preset}.")}  # none left of an old recipe
        values.update(_summary(report, preset))
        values[f"{preset}.seconds"] = seconds
        values[f"{preset}.compare"] = args.compare
        values[f"{preset}.seeds_run"] = len(results)
        print(f"{preset}: {paths['md']}", flush=True)
        write_result("distillation", values)
    for preset in args.presets:
        gaps = [values[f"{preset}.{s}.gap_closed_fraction"] for s in ("paper-kd", "kd")]
        ece = (values[f"{preset}.kd.ece_uncalibrated_mean"], values[f"{preset}.kd.ece_calibrated_mean"])
        print(f"{preset}: gap closed paper-KD {100 * gaps[0]:.0f}%, improved {100 * gaps[1]:.0f}%; "
              f"ECE {ece[0]:.3f} -> {ece[1]:.3f}"
              f"; goal met: {values[f'{preset}.goal_met']}")


if __name__ == "__main__":
    main()
