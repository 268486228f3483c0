"""docs/RESULTS.md and the README's headline table, generated from benchmarks/results/*.json.

    python -m benchmarks.report           # rewrite docs/RESULTS.md and the README block between its markers
    python -m benchmarks.report --check   # exit 1, naming the stale file, when either differs from the JSON

Every result number in the documentation lives in those two places, so a re-run benchmark needs only a re-run
of this script (``tests/test_results_doc.py`` fails until then). Pure file and JSON work: nothing of torch or
edgemri is imported. A key that a results file lacks (an older run) leaves out the row that needs it, never the
document. One rounding rule per unit, everywhere: accuracies in percent and differences in points to 1 decimal,
durations to 2 significant digits, throughputs and byte counts as whole numbers, AUC and ECE to 3 decimals,
epsilon to 2 decimals, PSNR margins in dB to 1 decimal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgemri.reports.common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path("benchmarks") / "results"
RESULTS_DOC = Path("docs") / "RESULTS.md"
README = Path("README.md")
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
DASH = "—"
TIERS = ("hospital", "phone", "all")
T = TypeVar("T")
Values = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- number formats

def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _number_format(spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[float | None], str]:
    """A formatter for one unit: ``scale * value`` in format ``spec`` then ``suffix``; a missing value is a dash."""
    def formatted(value: float | None) -> str:
        return DASH if _absent(value) else f"{scale * value:{spec}}{suffix}"
    return formatted


# One rule per unit (RESULTS.md's header lists them).
pct = _number_format(".1f")  # an accuracy (or any share) already in percent
pct_of = _number_format(".1f", 100)  # a fraction in [0, 1] shown in percent
pts = _number_format("+.1f")  # a difference in percentage points; also a PSNR margin in dB
db = pts
whole = _number_format(",.0f")  # a count, byte size, rate (img/s) or memory size
auc = _number_format(".3f")  # a ROC AUC or an ECE
share = _number_format(".0f", 100, "%")  # a fraction shown as a whole percentage (gap closed, headroom captured)
ratio = _number_format(".2f", suffix="x")  # a speed ratio


def sig(value: float | None, digits: int = 2) -> str:
    """A duration (ms, s): ``digits`` significant digits, never in exponent form above 1e-4."""
    if _absent(value):
        return DASH
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    if exponent < -4:
        return f"{value:.{digits - 1}e}"
    decimals = digits - 1 - exponent
    if decimals <= 0:
        return f"{round(value, decimals):,.0f}"
    return f"{value:.{decimals}f}"


def eps(value: float | None) -> str:
    """A privacy epsilon: 2 decimals (``None``, no noise at all: infinite)."""
    if value is None:
        return "∞"
    return DASH if _absent(value) else f"{value:,.2f}"


def ci(v: Values, prefix: str) -> str:
    """A paired difference in points from ``PREFIX_mean``, ``_low`` and ``_high``: ``+1.8 [+0.2, +3.3]``."""
    mean, low, high = v[f"{prefix}_mean"], v[f"{prefix}_low"], v[f"{prefix}_high"]
    return pts(mean) if _absent(low) or _absent(high) else f"{pts(mean)} [{pts(low)}, {pts(high)}]"


def mean_std(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation over seeds of a list of percentages."""
    if not values:
        raise KeyError("no values")
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def seeds_text(count: Any) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


# ---------------------------------------------------------------------------------------------- table assembly

def collect(items: Iterable[T], row: Callable[[T], Sequence[Any]]) -> list[list[str]]:
    """``row(item)`` for every item whose keys the results hold; an item with a missing key is left out."""
    rows = []
    for item in items:
        try:
            rows.append([str(cell) for cell in row(item)])
        except KeyError:
            continue
    return rows


def optional(v: Values, key: str, fmt: Callable[[Any], str]) -> str:
    """An optional cell: the formatted value, or a dash where this results file lacks the key."""
    return fmt(v[key]) if key in v else DASH


def block(title: str, note: str, headers: Sequence[str], rows: list[list[str]], align: str | None = None) -> str:
    """A titled table with its note (seeds, statistics) above it; columns holding only dashes are dropped, and
    a table without rows is no table."""
    if not rows:
        return ""
    keep = [i for i in range(len(headers)) if i == 0 or any(row[i] != DASH for row in rows)]
    align = align or "l" + "r" * (len(headers) - 1)
    table = markdown_table([headers[i] for i in keep], [[row[i] for i in keep] for row in rows],
                           "".join(align[i] for i in keep))
    return f"**{title}**. {note}\n\n{table}"


def stems(v: Values, pattern: str) -> list[str]:
    """The first group of ``pattern`` over every key, unique, in first-seen order."""
    regex = re.compile(pattern)
    found: dict[str, None] = {}
    for key in v:
        match = regex.fullmatch(key)
        if match:
            found.setdefault(match.group(1))
    return list(found)


def config_name(path: Any) -> str:
    """A config path as the repository names it (``configs/x.yaml``), whatever checkout ran the benchmark."""
    text = str(path)
    return "configs/" + text.rsplit("/configs/", 1)[1] if "/configs/" in text else text


# ---------------------------------------------------------------------------------------------- personalization

PERSONAL_COLUMNS = (("personalized_minus_start_pts", "− start"), ("personalized_minus_global_pts", "− global"),
                    ("personalized_minus_best_global_pts", "− best-global"),
                    ("personalized_minus_local_only_pts", "− local-only"), ("oracle_minus_start_pts", "oracle − start"))


def _methods_table(v: Values, scenario: str, seeds: str) -> str:
    methods = sorted(stems(v, rf"{re.escape(scenario)}\.([^.]+)\.[^.]+\.clients"))

    def row(item: tuple[str, str]) -> list[str]:
        p = f"{scenario}.{item[0]}.{item[1]}"
        return [item[0], item[1], whole(v[f"{p}.clients"]), pct(v[f"{p}.personalized_accuracy_pct"]),
                *(ci(v, f"{p}.{key}") for key, _ in PERSONAL_COLUMNS), share(v[f"{p}.headroom_captured_fraction"]),
                optional(v, f"{p}.worst_decile_personalized_minus_start_pts", pts)]

    rows = collect([(m, t) for m in methods for t in TIERS], row)
    headers = ["method", "tier", "client-runs", "personalized %", *(name for _, name in PERSONAL_COLUMNS),
               "captured", "worst decile − start"]
    return block(f"{scenario}: every method and tier", f"{seeds}; client-runs pooled over seeds; differences in "
                 "points, mean [95% CI]; pool accuracy.", headers, rows, "llrrrrrrrrr")


def _references_table(v: Values, scenario: str, seeds: str) -> str:
    """The reference models' pool accuracy, from the FedAvg run: its personalized model is the global model, and
    each reference is that accuracy less the paired difference (the pooled mean of a paired difference is the
    difference of the means)."""
    def row(tier: str) -> list[str]:
        p = f"{scenario}.fedavg.{tier}"
        personalized = v[f"{p}.personalized_accuracy_pct"]
        start = personalized - v[f"{p}.personalized_minus_start_pts_mean"]
        return [tier, pct(start), pct(personalized - v[f"{p}.personalized_minus_global_pts_mean"]),
                pct(personalized - v[f"{p}.personalized_minus_best_global_pts_mean"]),
                pct(personalized - v[f"{p}.personalized_minus_local_only_pts_mean"]),
                pct(start + v[f"{p}.oracle_minus_start_pts_mean"])]

    return block(f"{scenario}: the reference models", f"{seeds}; mean pool accuracy in %, from the FedAvg run.",
                 ["tier", "start (distilled)", "FedAvg global", "best-global", "local-only", "site oracle"],
                 collect(TIERS, row))


def _pool_mix_table(v: Values) -> str:
    sites = stems(v, r"pool_label_mix\.([^.]+)\.[^.]+")
    classes = stems(v, r"pool_label_mix\.[^.]+\.([^.]+)")
    rows = collect(sites, lambda site: [site, *(whole(v[f"pool_label_mix.{site}.{c}"]) for c in classes),
                                        whole(sum(v[f"pool_label_mix.{site}.{c}"] for c in classes))])
    return block("Evaluation pools", "Scans per class in each client site's pool.", ["site", *classes, "all"], rows)


def _sweeps_table(v: Values) -> str:
    rows = [["Ditto lambda", name, pct(v[f"ditto_lambda_{name}_hospital_val_pct"])]
            for name in stems(v, r"ditto_lambda_(.+)_hospital_val_pct")]
    rows += [["personal recipe distill_weight (fedavg-ft, select: last)", name,
              pct(v[f"recipe_distill_weight_{name}_hospital_val_pct"])]
             for name in stems(v, r"recipe_distill_weight_(.+)_hospital_val_pct")]
    return block("Sweeps", "Seed 0; mean personal-model accuracy on the hospitals' validation splits (never the "
                 "pools), in %.", ["sweep", "value", "hospitals' validation %"], rows, "llr")


def _timing_table(v: Values, seeds: str) -> str:
    names = (("time_distill_s", "distillation, s"), ("time_federation_wall_s", "federations, wall, s"),
             ("time_federation_rounds_s", "federation rounds, s"), ("time_client_train_s", "clients' own training, s"))
    rows = collect(names, lambda item: [item[1], sig(v[item[0]])])
    rows += collect(["time_rounds_over_client_train_ratio"], lambda key: ["rounds / clients' training", ratio(v[key])])
    return block("Where the time went", f"Summed over {seeds}.", ["stage", "value"], rows)


def personalization(v: Values) -> list[str]:
    seeds = seeds_text(v.get("seeds", "?"))
    chunks = [_pool_mix_table(v)]
    for scenario in stems(v, r"([^.]+)\.[^.]+\.[^.]+\.clients"):
        chunks += [_references_table(v, scenario, seeds), _methods_table(v, scenario, seeds)]
    return [*chunks, _sweeps_table(v), _timing_table(v, seeds)]


# ---------------------------------------------------------------------------------------------- DP on real scans

def _run_order(run: str) -> tuple[int, float, str]:
    """epsilon-1, epsilon-3, epsilon-8 by their number, then the other runs by name."""
    match = re.fullmatch(r"epsilon-(\d+(?:\.\d+)?)", run)
    return (0, float(match.group(1)), run) if match else (1, 0.0, run)


def dp_real(v: Values) -> list[str]:
    seeds = seeds_text(v.get("seeds", "?"))
    runs = sorted(stems(v, r"([^.]+)\.(?:hospital|phone)\.clients"), key=_run_order)

    def cost(run: str, tier: str) -> str:
        reference = "no-dp" if run.startswith("epsilon-") else "personal-outside-dp"
        key = f"{run}_minus_{reference}.{tier}".replace("-", "_") + "_pts"
        return f"{ci(v, key)} vs {reference}" if f"{key}_mean" in v else DASH

    def row(item: tuple[str, str]) -> list[str]:
        p = f"{item[0]}.{item[1]}"
        return [item[0], item[1], whole(v[f"{p}.clients"]), eps(v[f"{p}.max_epsilon"]),
                pct(v[f"{p}.mean_accuracy_pct"]), pct(v[f"{p}.worst_client_accuracy_pct"]),
                optional(v, f"{p}.personal_dp_fraction", share), cost(*item)]

    rows = collect([(r, t) for r in runs for t in ("hospital", "phone")], row)
    names = (("personal_rounds_epsilon", "rounds at target epsilon"), ("personal_personal_epsilon",
             "personal_epsilon"), ("personal_budget_epsilon", "budget"))
    settings = ", ".join(f"{name} {v[key]:g}" for key, name in names if key in v)
    note = (f"{seeds}; personalized models on the site pool; mean accuracy over clients and worst client in %; "
            f"the cost is paired per client, mean [95% CI] in points. Personal runs: {settings or DASH}.")
    return [block("Per run and tier", note, ["run", "tier", "client-runs", "max epsilon", "mean accuracy %",
                                             "worst client %", "fine-tune ran under DP", "− reference"],
                  rows, "llrrrrrl")]


def dp_speed(v: Values) -> list[str]:
    batches = stems(v, r"plain_batch(\d+)_img_per_s")
    rows = collect(batches, lambda b: [b, whole(v[f"plain_batch{b}_img_per_s"]), whole(v[f"dp_batch{b}_img_per_s"]),
                                       ratio(v[f"dp_speed_vs_plain_batch{b}_x"])])
    return [block("DP-SGD against plain training", f"One run on a {v.get('client_images', '?')}-image client.",
                  ["batch size", "plain, img/s", "DP-SGD, img/s", "DP-SGD / plain"], rows)]


# ---------------------------------------------------------------------------------------------- privacy attacks

ATTACK_ROWS = (
    ("membership_auc", "membership AUC, loss threshold (personalized model)", auc),
    ("calibrated_membership_auc", "membership AUC, calibrated by the start model", auc),
    ("learned_membership_auc", "membership AUC, learned attack (ART, held-out half)", auc),
    ("single_image_as_configured.analytic_margin_db", "one scan's step, analytic attack, dB", db),
    ("single_image_as_configured.inversion_margin_db", "one scan's step, inversion, dB", db),
    ("single_image_without_dp.analytic_margin_db", "the same step without DP, analytic attack, dB", db),
    ("single_image_without_dp.inversion_margin_db", "the same step without DP, inversion, dB", db),
    ("sent_update_analytic_margin_db", "the sent update, analytic attack, dB", db),
    ("max_epsilon", "largest epsilon spent", eps),
    ("clients", "clients attacked", whole),
)
AUDIT_SETTINGS = (("as_configured", "as configured"), ("weak", "weak (noise 0.1)"), ("dp_off", "DP off"))


def _attack_table(v: Values) -> str:
    columns = [(run, tier) for run in ("dp", "no_dp") for tier in ("hospital", "phone", "all")
               if f"{run}.{tier}.clients" in v]

    def row(item: tuple[str, str, Callable[[Any], str]]) -> list[str]:
        cells = [item[2](v[f"{run}.{tier}.{item[0]}"]) if f"{run}.{tier}.{item[0]}" in v else DASH
                 for run, tier in columns]
        if all(c == DASH for c in cells):
            raise KeyError(item[0])
        return [item[1], *cells]

    headers = ["", *(f"{'DP' if run == 'dp' else 'no DP'}, {tier}" for run, tier in columns)]
    seed = v.get("seed", "?")
    note = (f"1 seed (seed {seed}), {v.get('rounds', '?')} rounds, {v.get('method', '?')}; margins are PSNR over a "
            "random scan of the client's site (above 0: the attack learned something); AUC 0.5 is chance.")
    return block("Attacks", note, headers, collect(ATTACK_ROWS, row))


def _audit_table(v: Values) -> str:
    tiers = stems(v, r"audit\.([^.]+)\.n_train")

    def row(item: tuple[str, str, str]) -> list[str]:
        tier, key, name = item
        p = f"audit.{tier}.{key}"
        switched = "" if v.get(f"audit.{tier}.dp_enabled_in_config", True) else " (DP switched on)"
        return [f"{tier}, {whole(v[f'audit.{tier}.n_train'])} scans{switched}", name,
                sig(v[f"{p}.noise_multiplier"], 3), whole(v[f"{p}.steps"]), eps(v[f"{p}.accounted_epsilon"]),
                eps(v[f"{p}.empirical_epsilon"]), f"{whole(v[f'{p}.correct'])}/{whole(v[f'{p}.guesses'])}",
                eps(v[f"{p}.ceiling_epsilon"]), auc(v[f"{p}.scores_auc"])]

    rows = collect([(t, key, name) for t in tiers for key, name in AUDIT_SETTINGS], row)
    note = (f"{whole(v['audit.canaries']) if 'audit.canaries' in v else '?'} canaries; the empirical epsilon is a "
            f"lower bound at {100 * (1 - v.get('audit.beta', 0.05)):.0f}% confidence; the ceiling is the bound with "
            "every guess right.")
    return block("DP audit", note, ["client", "setting", "noise multiplier", "steps", "accounted epsilon",
                                    "empirical epsilon", "right guesses", "ceiling", "scores AUC"], rows, "llrrrrrrr")


def privacy_attacks(v: Values) -> list[str]:
    return [_attack_table(v), _audit_table(v)]


# ---------------------------------------------------------------------------------------------- Table 1 (kaggle)

PAPER_ROWS = (("teacher", "teacher"), ("baseline", "baseline"), ("paper-kd", "kd"), ("kd", None))
STAGE_NAMES = {"teacher": "teacher (from scratch)", "baseline": "baseline student (CE)",
               "paper-kd": "KD, the paper's recipe", "kd": "KD, the shipped recipe"}
PUBLISHED = {"paper-published-kd": "the paper's published KD student", "paper-published-baseline":
             "the paper's published baseline student"}
PROBE_COLUMNS = (("restyle.tumour_flipped_to_notumor", "tumour re-styled: flipped to notumor %"),
                 ("restyle.tumour_flipped_to_notumor_control", "control %"),
                 ("restyle.notumor_flipped_from_notumor", "notumor re-styled: flipped away %"),
                 ("restyle.notumor_flipped_from_notumor_control", "control % "))


def _table1(v: Values) -> str:
    def row(item: tuple[str, str | None]) -> list[str]:
        stage, paper = item
        paper_pct = f"{v[f'paper_table1.{paper}_pct']:.2f}" if paper and f"paper_table1.{paper}_pct" in v else DASH
        walls = v.get(f"{stage}.wall_seconds_per_seed") or []
        return [STAGE_NAMES.get(stage, stage), paper_pct, mean_std(v[f"{stage}.full_testing_accuracy_pct_values"]),
                mean_std(v[f"{stage}.dedup_testing_accuracy_pct_values"]),
                ci(v, f"{stage}.dedup_minus_baseline_pts") if f"{stage}.dedup_minus_baseline_pts_mean" in v else DASH,
                ci(v, f"{stage}.full_minus_baseline_pts") if f"{stage}.full_minus_baseline_pts_mean" in v else DASH,
                optional(v, f"{stage}.gap_closed_fraction", share),
                f"{v[f'{stage}.seeds_above_baseline']}/{v.get('seeds_run', '?')}"
                if f"{stage}.seeds_above_baseline" in v else DASH,
                f"{auc(v[f'{stage}.ece_uncalibrated_mean'])} → {auc(v[f'{stage}.ece_calibrated_mean'])}"
                if f"{stage}.ece_calibrated_mean" in v else DASH,
                sig(statistics.fmean(walls)) if walls else DASH]

    note = (f"{seeds_text(v.get('seeds_run', '?'))}; accuracy in %, mean ± std over seeds; − baseline: paired per "
            f"image, mean [95% CI] in points; ECE on deduplicated Testing; Testing: "
            f"{whole(v.get('testing_images_full'))} scans in full, {whole(v.get('testing_images_dedup'))} "
            "deduplicated.")
    headers = ["model", "paper, Table 1 (full Testing)", "full Testing %", "deduplicated Testing %",
               "− baseline, deduplicated", "− baseline, full", "gap closed", "seeds above baseline",
               "ECE raw → calibrated", "wall s per seed"]
    return block("Table 1", note, headers, collect(PAPER_ROWS, row))


def _published(v: Values) -> str:
    def row(name: str) -> list[str]:
        return [PUBLISHED[name], pct(v[f"{name}.full_testing_accuracy_pct"]),
                pct(v[f"{name}.dedup_testing_accuracy_pct"]), ci(v, f"kd_seed0_minus_{name}.full_pts"),
                ci(v, f"kd_seed0_minus_{name}.dedup_pts")]

    return block("The paper's published checkpoints, scored on the same images", "One checkpoint each; ours: "
                 "seed 0's shipped-recipe student, paired per image, mean [95% CI] in points.",
                 ["checkpoint", "full Testing %", "deduplicated Testing %", "ours − it, full",
                  "ours − it, deduplicated"], collect(PUBLISHED, row))


def _probe_mean(v: Values, stage: str, key: str) -> float:
    found = [value for k, value in v.items() if re.fullmatch(rf"seed\d+\.{re.escape(stage)}\.shortcut\.{key}", k)]
    if not found:
        raise KeyError(f"{stage}.shortcut.{key}")
    return statistics.fmean(found)


def _shortcut(v: Values) -> str:
    seeds = sorted({k.split(".")[0] for k in v if re.match(r"seed\d+\.[^.]+\.shortcut\.", k)})

    def value(name: str, key: str) -> float:
        return v[f"{name}.shortcut.{key}"] if name in PUBLISHED else _probe_mean(v, name, key)

    def row(name: str) -> list[str]:
        label = PUBLISHED[name] if name in PUBLISHED else f"{STAGE_NAMES.get(name, name)}, mean of the seeds"
        return [label, *(pct_of(value(name, key)) for key, _ in PROBE_COLUMNS),
                auc(value(name, "blanked_head.notumor_separation")), pct_of(value(name, "blanked_head.accuracy"))]

    headers = ["model", *(name for _, name in PROBE_COLUMNS), "head blanked: notumor separation AUC",
               "head blanked: accuracy %"]
    return block("The collection shortcut", f"{seeds_text(len(seeds))} per model; probes on full Testing.",
                 headers, collect([*STAGE_NAMES, *PUBLISHED], row))


def _data_probe(v: Values) -> str:
    steps = stems(v, r"data_probe\.([^.]+)\.test_auc")
    rows = collect(steps, lambda s: [s, auc(v[f"data_probe.{s}.test_auc"]),
                                     pct_of(v[f"data_probe.{s}.test_accuracy"]),
                                     pct_of(v[f"data_probe.{s}.majority_accuracy"]),
                                     auc(v[f"data_probe.{s}.train_auc"]), whole(v[f"data_probe.{s}.features"])])
    return block("Background-only classifier, notumor against tumour", "No model trained; a logistic regression on "
                 "what lies outside the head, per head step.", ["head step", "Testing AUC", "Testing accuracy %",
                                                                "majority class %", "Training AUC", "features"], rows)


def _teacher_sweep(v: Values) -> str:
    rows = collect(stems(v, r"sweep\.(.+)\.val_accuracy_pct"),
                   lambda s: [s, pct(v[f"sweep.{s}.val_accuracy_pct"]), auc(v[f"sweep.{s}.val_loss"]),
                              whole(v[f"sweep.{s}.best_epoch"]), sig(v.get(f"sweep.{s}.seconds"))])
    return block("Teacher sweep", "Seed 0's validation split only; w: width, v: augmented views per image.",
                 ["teacher", "validation %", "validation loss", "best epoch", "s"], rows)


def _kd_sweep(v: Values) -> str:
    rows = collect(stems(v, r"kd_sweep\.(.+)\.val_accuracy_pct"),
                   lambda s: [s, pct(v[f"kd_sweep.{s}.val_accuracy_pct"]), auc(v[f"kd_sweep.{s}.val_loss"]),
                              whole(v[f"kd_sweep.{s}.best_epoch"])])
    return block("KD recipe sweep", "Seed 0's teacher and validation split only; t: temperature, a: alpha, views: "
                 "cached augmented views.", ["recipe", "validation %", "validation loss", "best epoch"], rows)


def kaggle(v: Values) -> list[str]:
    overrides = ", ".join(f"`{o}`" for o in v.get("overrides") or [])
    setting = " ".join(part for part in (f"Config overrides: {overrides}." if overrides else "",
                                         f"Teacher: {v['teacher']}." if "teacher" in v else "") if part)
    return [setting, _table1(v), _published(v), _shortcut(v), _data_probe(v), _teacher_sweep(v), _kd_sweep(v)]


# ---------------------------------------------------------------------------------------------- synthetic distillation

def _distill_preset(v: Values, preset: str) -> str:
    stages = stems(v, rf"{re.escape(preset)}\.([^.]+)\.test_accuracy_pct_mean")
    order = {"teacher": 0, "baseline": 1, "paper-kd": 2, "kd": 3}
    stages.sort(key=lambda s: (order.get(s, 4), s))
    runs = v.get(f"{preset}.seeds_run", v.get("seeds", "?"))

    def row(stage: str) -> list[str]:
        p = f"{preset}.{stage}"
        gap = (f"{share(v[f'{p}.gap_closed_fraction'])} ({share(v[f'{p}.gap_closed_fraction_min_seed'])})"
               if f"{p}.gap_closed_fraction" in v else DASH)
        ece = (f"{auc(v[f'{p}.ece_uncalibrated_mean'])} → {auc(v[f'{p}.ece_calibrated_mean'])} "
               f"({auc(v[f'{p}.ece_noise_floor_mean'])})" if f"{p}.ece_calibrated_mean" in v else DASH)
        accepted = (f"{pct(v[f'{p}.accuracy_at_90_coverage_pct_mean'])} "
                    f"({pts(v[f'{p}.coverage_gain_at_90_pts_mean'])})" if f"{p}.accuracy_at_90_coverage_pct_mean"
                    in v else DASH)
        return [stage, f"{pct(v[f'{p}.test_accuracy_pct_mean'])} ± {pct(v[f'{p}.test_accuracy_pct_std'])}",
                ci(v, f"{p}.minus_baseline_pts") if f"{p}.minus_baseline_pts_mean" in v else DASH, gap,
                f"{v[f'{p}.seeds_above_baseline']}/{runs}" if f"{p}.seeds_above_baseline" in v else DASH, ece,
                accepted, optional(v, f"{p}.teacher_passes_per_seed", whole),
                ci(v, f"{p}.ingredient_gain_pts") if f"{p}.ingredient_gain_pts_mean" in v else DASH]

    name = {"quickstart": "quickstart preset", "kaggle": "kaggle-size synthetic preset"}.get(preset, preset)
    note = (f"{seeds_text(runs)}; {whole(v.get(f'{preset}.train_images'))} training images; accuracy in %, mean ± "
            "std over seeds; − baseline: paired, mean [95% CI] in points; gap closed: mean (worst seed); ECE raw → "
            "calibrated (noise floor); accepted at 90% coverage: accuracy % (gain in points); the last column is "
            "what the ingredient a row leaves out gave the recipe.")
    headers = ["student", "test accuracy %", "− baseline", "gap closed", "seeds above baseline", "ECE",
               "accepted at 90% coverage", "teacher passes per seed", "ingredient gave"]
    return block(f"The {name}", note, headers, collect(stages, row))


def distillation(v: Values) -> list[str]:
    sweep = collect(stems(v, r"sweep_(t[^_]+_a[^_]+)_val_accuracy_pct"),
                    lambda s: [re.sub(r"t(.+)_a(.+)", r"T=\1, alpha=\2", s), pct(v[f"sweep_{s}_val_accuracy_pct"]),
                               optional(v, f"sweep_{s}_val_loss", auc)])
    chosen = (f" Chosen: T={v['sweep_chosen_temperature']:g}, alpha={v['sweep_chosen_alpha']:g}."
              if "sweep_chosen_temperature" in v and "sweep_chosen_alpha" in v else "")
    presets = stems(v, r"([^.]+)\.seeds_run")
    return [*(_distill_preset(v, p) for p in presets),
            block("KD temperature and alpha sweep", "Quickstart preset, seed 0's validation split only." + chosen,
                  ["recipe", "validation %", "validation loss"], sweep)]


# ---------------------------------------------------------------------------------------------- data calibration

def data_calibration(v: Values) -> list[str]:
    probes = stems(v, r"probe_(.+)_test_acc_pct")
    rows = collect(["majority_class"], lambda k: ["majority class", pct(v[f"{k}_test_acc_pct"])])
    rows += collect(probes, lambda p: [f"one statistic: {p.replace('_', ' ')}", pct(v[f"probe_{p}_test_acc_pct"])])
    rows += collect(["student"], lambda k: ["the paper's student (CE)", pct(v[f"{k}_test_acc_pct"])])
    rows += collect(["large_model"], lambda k: [f"a larger model: {v.get(k, '?')}", pct(v[f"{k}_test_acc_pct"])])
    sites = stems(v, r"loso_(site[^_]+)_test_acc_pct")
    loso = collect(sites, lambda s: [s, pct(v[f"loso_{s}_test_acc_pct"]), pct(v[f"loso_{s}_all_sites_test_acc_pct"]),
                                     pts(v[f"loso_{s}_test_acc_pct"] - v[f"loso_{s}_all_sites_test_acc_pct"])])
    seed = f"1 seed (seed {v.get('seed', '?')}); {whole(v.get('test_images'))} Testing images"
    return [block("Probes and headroom", f"{seed}; Testing accuracy in %.", ["model", "Testing accuracy %"], rows),
            block("Leave one site out", f"{seed}; the student trained without the site against the all-sites "
                  "student on that site's Testing images, in %.", ["held-out site", "trained without it",
                                                                   "all-sites student", "difference, points"], loso)]


# ---------------------------------------------------------------------------------------------- latency

def _latency_variants(v: Values) -> str:
    variants = list(v.get("explored_variants") or stems(v, r"(.+)_p50_ms"))

    def file_bytes(name: str) -> Any:
        """A variant's file: its own, the file a session variant runs, the single-image static file, or the
        state dict PyTorch loads."""
        stem = name.removesuffix("_default_session")
        for key in (f"{name}_file_bytes", f"{stem}_file_bytes", f"{stem}_batch1_file_bytes",
                    "state_dict_file_bytes" if name == "pytorch_eager" else ""):
            if key in v:
                return v[key]
        return None

    def row(name: str) -> list[str]:
        return [name, sig(v[f"{name}_p50_ms"]), sig(v[f"{name}_p95_ms"]), whole(v[f"{name}_batch64_img_per_s"]),
                whole(file_bytes(name)), optional(v, f"{name}_max_abs_diff", sig)]

    note = (f"{v.get('threads', '?')} thread on {v.get('cores', '?')} core, {v.get('image_size_px', '?')} px, "
            f"{v.get('model_source', '?')}; p50 and p95 over {whole(v.get('single_image_runs'))} single-image calls; "
            "throughput: best window; parity: largest logit difference against PyTorch eager.")
    return block("Per variant", note, ["variant", "p50 ms", "p95 ms", "batch 64, img/s", "file bytes",
                                       "max abs diff"], collect(variants, row))


def latency(v: Values) -> list[str]:
    batches = sorted({int(b) for b in stems(v, r"onnx_fp32_batch(\d+)_img_per_s")})
    by_batch = collect(batches, lambda b: [str(b), whole(v[f"onnx_fp32_batch{b}_img_per_s"])])
    nodes = collect(stems(v, r"onnx_fp32_node_(.+)_us"), lambda n: [n, whole(v[f"onnx_fp32_node_{n}_us"])])
    predict_keys = (("predict_model_load_ms", "model load, ms"), ("predict_read_per_image_ms", "read, ms per image"),
                    ("predict_decode_resize_per_image_ms", "decode and resize, ms per image"),
                    ("predict_normalize_per_image_ms", "normalize, ms per image"),
                    ("predict_decode_preprocess_per_image_ms", "decode and preprocess in all, ms per image"),
                    ("predict_model_per_image_ms", "the model, ms per image"),
                    ("predict_total_s", "all images in-process, s"), ("predict_cli_wall_s", "the command, wall, s"),
                    ("predict_cli_imports_s", "of which starting Python and its imports, s"))
    predict = collect(predict_keys, lambda item: [item[1], sig(v[item[0]])])
    predict += collect(("predict_img_per_s", "predict_cli_img_per_s"),
                       lambda k: [("in-process" if k == "predict_img_per_s" else "the command") + ", img/s",
                                  whole(v[k])])
    return [_latency_variants(v),
            block("ONNX fp32 by batch size", "edgemri's session; best window.", ["batch", "img/s"], by_batch),
            block("Where one ONNX fp32 inference goes", "onnxruntime's profiler, one image.", ["node", "µs"], nodes),
            block("`edgemri predict` end to end", f"{whole(v.get('predict_images'))} synthetic "
                  f"{v.get('predict_jpeg_side_px', '?')} px grayscale JPEGs, the fp32 ONNX file.",
                  ["step", "value"], predict)]


# ---------------------------------------------------------------------------------------------- device footprint

FOOTPRINT_ROWS = (("round_seconds", "round, train + evaluate ClientApp wall time, s", sig),
                  ("round_cpu_seconds", "CPU time per round, s", sig),
                  ("idle_rss_mb", "idle memory between rounds, summed RSS, MB", whole),
                  ("peak_device_mb", "peak memory of the phone side, shared pages once, MB", whole),
                  ("peak_rss_mb", "peak memory, summed RSS, MB", whole),
                  ("clientapp_peak_rss_mb", "one ClientApp process at its peak, RSS, MB", whole),
                  ("processes_at_peak", "processes at the peak", whole),
                  ("payload_bytes_received_per_round", "payload received per round, bytes", whole),
                  ("payload_bytes_sent_per_round", "payload sent per round, bytes", whole),
                  ("array_bytes_received_per_round", "of which float32 model arrays received, bytes", whole),
                  ("array_bytes_sent_per_round", "of which float32 model arrays sent, bytes", whole))
STEP_ROWS = (("flower_start_s", "Flower's start: process or fork, Python, imports, connection, task pull, FAB"),
             ("app_import_s", "import of the app"), ("training_s", "training itself"),
             ("train_round_other_s", "rest of the train round (data, DP plan, model, Opacus, ledger, state)"),
             ("evaluate_s", "evaluation"), ("privacy_status_s", "privacy status (ledger, epsilon)"),
             ("reply_push_and_exit_s", "reply pushed, process exit"), ("total_s", "total"),
             ("peak_rss_mb", "peak RSS, MB"))


def device_footprint(v: Values) -> list[str]:
    rows = collect(FOOTPRINT_ROWS, lambda r: [r[1], optional(v, f"phone_{r[0]}", r[2]),
                                              optional(v, f"warm_phone_{r[0]}", r[2])])
    rows = [row for row in rows if row[1:] != [DASH, DASH]]
    rows += collect(["overhead_beyond_training_s"], lambda k: [
        "overhead beyond the round's training (train + evaluate), s",
        sig(v[f"phone_train_{k}"] + v[f"phone_evaluate_{k}"]),
        sig(v[f"warm_phone_train_{k}"] + v[f"warm_phone_evaluate_{k}"]) if f"warm_phone_train_{k}" in v else DASH])
    columns = [(p, m) for p in ("phone", "warm_phone") for m in ("train", "evaluate")]

    def step(item: tuple[str, str]) -> list[str]:
        cells = [optional(v, f"{p}_{m}_step_{item[0]}", whole if item[0].endswith("_mb") else sig)
                 for p, m in columns]
        if all(c == DASH for c in cells):
            raise KeyError(item[0])
        return [item[1], *cells]

    fresh = collect(stems(v, r"fresh_(.+_s)"), lambda k: [k.removesuffix("_s").replace("_", " ") + ", s",
                                                          sig(v[f"fresh_{k}"])])
    fresh += collect(stems(v, r"fresh_(.+_mb)"), lambda k: [k.removesuffix("_mb").replace("_", " ") + ", MB",
                                                            whole(v[f"fresh_{k}"])])
    note = (f"{v.get('rounds', '?')} rounds, one run in each mode; {v.get('transport', '')}; a DP phone with "
            f"{v.get('phone_train_examples', '?')} training scans.")
    return [block("Cold (Flower's SuperExec) and warm (`edgemri client serve`)", note, ["measure", "cold", "warm"],
                  rows),
            block("Where one message's time goes", "Seconds, mean of the rounds.",
                  ["step", "cold train", "cold evaluate", "warm train", "warm evaluate"], collect(STEP_ROWS, step)),
            block("In a fresh interpreter", "What a process cannot time itself.", ["measure", "value"], fresh)]


# ---------------------------------------------------------------------------------------------- training speed

def train_speed(v: Values) -> list[str]:
    names = (("paper_loop_img_per_s", "the paper's loop: decode every JPEG every epoch, batch 16"),
             ("ours_batch16_img_per_s", "ours: decoded cache, batch 16"),
             ("ours_kd_batch16_img_per_s", "ours, a KD epoch (teacher logits cached), batch 16"),
             ("ours_batch64_img_per_s", "ours, batch 64"),
             ("ours_batch16_channels_last_img_per_s", "ours, channels-last, batch 16"),
             ("ours_batch16_1thread_img_per_s", "ours, one thread, batch 16"),
             ("student_inference_batch64_img_per_s", "student inference, batch 64"))
    rows = collect(names, lambda item: [item[1], whole(v[item[0]])])
    ratios = collect((("speedup_vs_paper_x", "ours against the paper's loop"),
                      ("kd_epoch_time_vs_baseline_x", "KD epoch time against a baseline epoch")),
                     lambda item: [item[1], ratio(v[item[0]])])
    note = f"One run, {whole(v.get('images_per_epoch'))} images per epoch."
    return [block("Images per second", note, ["loop", "img/s"], rows),
            block("Ratios", note, ["ratio", "value"], ratios)]


# ---------------------------------------------------------------------------------------------- population scale

def _sizes(v: Values) -> list[int]:
    return sorted(n for n in v.get("sizes", []) if f"size{n}.clients" in v)


def yes_no(value: Any) -> str:
    return DASH if value is None else ("yes" if value else "no")


def cost_curve_rows(v: Values) -> list[list[str]]:
    """Per size: clients, the whole run, a round, its sampled clients' compute and their ratio, memory."""
    return collect(_sizes(v), lambda n: [
        whole(v[f"size{n}.clients"]), whole(v[f"size{n}.round_mean_sampled"]), sig(v[f"size{n}.wall_s"] / 60),
        sig(v[f"size{n}.round_mean_round_s"]), sig(v[f"size{n}.round_mean_train_handler_s"]),
        ratio(v[f"size{n}.round_over_sampled_compute_max"]), optional(v, f"size{n}.peak_pss_tree_mb", whole),
        whole(v[f"size{n}.peak_rss_tree_mb"]), whole(v[f"size{n}.peak_rss_server_mb"])])


COST_HEADERS = ["clients", "sampled a round", "whole run, min", "a round, s", "sampled clients' compute, s",
                "round / compute, worst", "the tree's memory (PSS), MiB", "its summed RSS, MiB", "server RSS, MiB"]
PHASES = (("setup_discovery_s", "discovery (every client's manifest query)"),
          ("round_mean_sampling_s", "sampling, a round"), ("round_mean_train_wait_s", "training wait, a round"),
          ("round_mean_aggregation_s", "aggregation, a round"),
          ("round_mean_evaluate_wait_s", "evaluation wait, a round"),
          ("final_evaluate_wait_s", "final evaluation (every client)"), ("final_reports_s", "reports"),
          ("runner_before_flower_s", "before Flower: data, partition, plans"))


def scale(v: Values) -> list[str]:
    sizes = _sizes(v)
    note = (f"One run per size, {v.get('rounds_asked', '?')} rounds, the synthetic `{v.get('data_preset', '?')}` "
            f"preset; one hospital a site, the rest phones of {v.get('phone_examples', '?')} scans, "
            f"{v.get('phone_sample_per_round', '?')} of them sampled a round; references "
            f"{'on' if v.get('references') else 'off'}. *compute*: the sampled clients' train handlers summed (two "
            "run at once on the two cores, so a round can take less).")
    phases = collect(PHASES, lambda item: [item[1], *(sig(v[f"size{n}.{item[0]}"]) for n in sizes)])
    goals = collect((("goal_round_within_1_5x_sampled_compute_every_size",
                      "every round within 1.5x its sampled clients' compute, every size"),
                     ("goal_tree_pss_under_4gb_at_1000", "peak PSS of the process tree under 4 GB at 1,000 clients"),
                     ("goal_tree_rss_under_4gb_at_1000",
                      "peak summed RSS of the process tree (shared pages counted in each process) under 4 GB"),
                     ("goal_5_rounds_under_15_min_at_1000", "5 rounds in under 15 minutes at 1,000 clients")),
                    lambda item: [item[1], yes_no(v[item[0]])])
    goals += collect(["server_rss_mb_per_added_client"],
                     lambda k: ["server RSS per client added, MB", sig(v[k])])
    return [block("The cost curve", note, COST_HEADERS, cost_curve_rows(v)),
            block("Where the time goes", "Seconds.", ["phase", *(f"{n:,} clients" for n in sizes)], phases),
            block("Goals", "Measured, never tuned.", ["goal", "met"], goals)]


# ---------------------------------------------------------------------------------------------- the load test

def _rounds(v: Values) -> list[int]:
    return sorted(int(r) for r in stems(v, r"round(\d+)_s"))


def _names(value: Any) -> str:
    return ", ".join(value) if value else DASH


def load(v: Values) -> list[str]:
    note = (f"{v.get('nodes', '?')} SuperNodes ({v.get('warm_nodes', '?')} warm, {v.get('cold_nodes', '?')} cold), "
            f"{v.get('rounds_asked', '?')} rounds, the synthetic `{v.get('data_preset', '?')}` set, DP-SGD on "
            f"every device; SIGKILLed in round {v.get('kill_round', '?')}: {_names(v.get('killed'))}; the SuperLink "
            f"restarted after round {v.get('link_restart_after_round', '?')}. *reply*: a train reply's time from "
            "its round's start.")
    rounds = collect(_rounds(v), lambda r: [
        r, whole(v[f"round{r}_trained"]), whole(len(v[f"round{r}_failed"])), _names(v[f"round{r}_up_not_trained"]),
        sig(v[f"round{r}_s"]), optional(v, f"round{r}_reply_after_round_start_s_p50", sig),
        optional(v, f"round{r}_reply_after_round_start_s_p90", sig),
        optional(v, f"round{r}_superlink_rss_peak_mb", whole)])
    events = collect((("rounds_completed", "rounds completed (aggregated)", whole),
                      ("run_finished", "federation finished (final evaluation held)", yes_no),
                      ("failed_unavailable", "round failures Flower answered for (`unavailable`)", whole),
                      ("failed_no_reply", "round failures without a reply (`no-reply`)", whole),
                      ("nodes_start_s", "all SuperNodes online, s", sig),
                      ("killed_down_s", "killed nodes down until listed online again, s", sig),
                      ("link_restart_s", "SuperLink restart (stop, start, healthy), s", sig),
                      ("flwr_runs", "`flwr run`s (the first, the resumed)", whole),
                      ("unplanned_resumes", "resumes for another reason than the restart", whole),
                      ("superexec_restarts", "ServerApps' SuperExec restarted by the watchdog", whole),
                      ("superlink_requests_failed_database_locked",
                       "SuperLink requests failed with `database is locked`", whole),
                      ("supernode_replies_dropped", "replies dropped by their SuperNode (it does not retry a 500)",
                       whole),
                      ("updates_lost", "updates lost, all devices", whole),
                      ("updates_lost_restarted_devices", "updates lost, restarted devices", whole),
                      ("ledgers_verified", "ledgers verified", whole),
                      ("ledger_errors", "ledgers missing or broken", lambda e: whole(len(e))),
                      ("epsilon_max", "largest epsilon spent", eps),
                      ("superlink_rss_last_over_first", "SuperLink RSS, last round over first", ratio),
                      ("superlink_rss_slope_mb_per_round", "SuperLink RSS slope, MB a round", sig),
                      ("serverapp_rss_peak_mb", "ServerApp peak RSS, MB", whole),
                      ("deployment_rss_peak_mb",
                       "whole deployment, RSS summed over its processes (shared pages in each), peak, MB", whole),
                      ("wall_s", "whole test, s", sig)),
                     lambda item: [item[1], item[2](v[item[0]])])
    latency = collect(("", "_warm", "_cold"), lambda kind: [
        kind.strip("_") or "all", sig(v[f"reply_after_round_start_s{kind}_p50"]),
        sig(v[f"reply_after_round_start_s{kind}_p90"]), sig(v[f"reply_after_round_start_s{kind}_max"]),
        sig(v[f"clientapp_s{kind}_p50"]), sig(v[f"clientapp_s{kind}_p90"])])
    goals = collect((("goal_every_round_completes_with_the_clients_up",
                      "every round completes with every client that stayed up"),
                     ("goal_nothing_lost_on_restarted_devices", "nothing lost on the restarted devices"),
                     ("goal_every_ledger_verifies_within_budget_never_refused",
                      "every ledger verifies, within budget, never refused"),
                     ("goal_superlink_rss_flat", "SuperLink RSS flat (every round within 1.2x the first)"),
                     ("goal_nothing_left_running", "nothing left running or listening")),
                    lambda item: [item[1], yes_no(v[item[0]])])
    return [block("Rounds", note, ["round", "trained", "failed", "up, not trained", "round, s", "reply p50, s",
                                   "reply p90, s", "SuperLink RSS peak, MB"], rounds),
            block("Faults and devices", "One run.", ["what", "value"], events),
            block("Latency", "Train replies, all rounds; *ClientApp*: from its start (a cold one's import, a warm "
                  "one's hand-over) to its reply.", ["nodes", "reply p50, s", "reply p90, s", "reply max, s",
                                                     "ClientApp p50, s", "ClientApp p90, s"], latency),
            block("Goals", "Measured, never tuned.", ["goal", "met"], goals)]


# ---------------------------------------------------------------------------------------------- any other file

def generic(v: Values) -> list[str]:
    rows = [[key, f"{value:.4g}" if isinstance(value, float) else str(value)] for key, value in v.items()
            if isinstance(value, int | float | str | bool) and not key.startswith(("machine_", "version_"))]
    return [block("Every value", "As the results file holds it.", ["key", "value"], rows, "ll")]


# ---------------------------------------------------------------------------------------------- the document

@dataclass(frozen=True)
class Benchmark:
    name: str  # the results file's stem
    title: str  # the section heading; its anchor is what the README and docs link to
    command: str
    measures: str
    render: Callable[[Values], list[str]]


BENCHMARKS = (
    Benchmark("personalization_real", "Personalization on real scans", "python -m benchmarks.personalization --real",
              "The real Kaggle scans in a federation (`configs/kaggle-federation.yaml`): the server distills teacher "
              "and KD student on one appearance site; hospitals and phones at the other site, which the student never "
              "saw, personalize it in Flower's simulation engine. Every model is scored on its client's site pool "
              "(Testing at that site less every copy of a Training scan). Differences are per client (personalized "
              "− reference), mean with a 95% bootstrap CI over clients × seeds (clients resampled within seeds); "
              "*captured* is (personalized − start) / (oracle − start); *worst decile* is the mean gain over the "
              "start of a tier's worst tenth of clients. The label-skew scenario repeats the FedAvg run with class "
              "mixes drawn from Dirichlet(0.5), each pool accuracy mixed by the client's own class mix.",
              personalization),
    Benchmark("dp_real", "DP-SGD on real scans", "python -m benchmarks.dp_real",
              "The real-data federation from each seed's distilled student with DP-SGD on every tier at target "
              "epsilon 1, 3 and 8 (budget = target) and without DP; then, at epsilon 3, the personal fine-tune "
              "outside and inside DP-SGD (`personal_epsilon`). A client whose plan is infeasible at its epsilon (too "
              "few scans for the noise) does not train.", dp_real),
    Benchmark("privacy_attacks_real", "Privacy attacks on real scans", "python -m benchmarks.privacy_attacks --real",
              "Two federations from seed 0's real-data student, DP-SGD on every tier and no DP, each attacked as "
              "`edgemri privacy attack` does: each attacked client's first trained round replayed exactly, the "
              "analytic head attack and a 300-step gradient inversion on the sent update and on a worst-case "
              "single-scan step, and membership inference on each personalized model (non-members: the client's "
              "site pool). Then `edgemri privacy audit`, the one-run audit of Steinke, Nasr and Jagielski (2023), on "
              "the largest phone and hospital. Reconstructions of real scans are scored, never written as images.",
              privacy_attacks),
    Benchmark("kaggle", "Table 1 on real scans",
              "python -m benchmarks.kaggle --data-root ../shared/data/brain-tumor-mri-224 --seeds 3 "
              "--paper-checkpoints DIR",
              "The paper's Table 1 on the real Kaggle Brain Tumor MRI scans (`configs/kaggle.yaml`): the server "
              "distills on all of Training less a 15% validation split, which selects every checkpoint and "
              "hyper-parameter; Testing is scored in full (the paper's protocol) and deduplicated (every Testing scan "
              "with a copy in Training left out). **The teacher is a slim VGG16 trained from scratch**, a stand-in "
              "for the paper's ImageNet VGG16, whose weights cannot be downloaded here. The collection-shortcut "
              "probes re-style tumour scans to the notumor collection's intensity profile (control: to their own), "
              "blank the head, and fit a classifier on the background alone.", kaggle),
    Benchmark("kaggle_head", "Table 1 behind the head step",
              "python -m benchmarks.kaggle --seeds 2 --name kaggle_head --out runs/bench/kaggle-head "
              "--set data.head=standardize-crop",
              "The same benchmark with every model trained and tested behind the head step "
              "(`data.head: standardize-crop`), the counter-measure to the collection shortcut.", kaggle),
    Benchmark("distillation", "Distillation on the synthetic presets", "python -m benchmarks.distillation",
              "Synthetic data, not clinical results. The baseline, the paper's KD, the improved recipe and one "
              "student per ingredient of the recipe left out, seen-sites, on the server's half of Training of the "
              "quickstart and kaggle-size synthetic presets; every student of a seed shares its teacher, split and "
              "Testing images, so differences are paired.", distillation),
    Benchmark("personalization", "Personalization on the synthetic clinics", "python -m benchmarks.personalization",
              "Synthetic data, not clinical results. The personalization benchmark on the `clinics` preset "
              "(`configs/quickstart.yaml`, new-sites): the server distills on two T1c-only sites and the clients sit "
              "at two clinics whose protocols mix T2 and FLAIR into T1c; pools of 300 held-out scans per clinic. "
              "Statistics as for the real scans.", personalization),
    Benchmark("privacy_attacks", "Privacy attacks on the synthetic clinics", "python -m benchmarks.privacy_attacks",
              "Synthetic data. The quickstart federation on the `clinics` data with the config's DP-SGD for phones "
              "and with it switched off, attacked and audited as on the real scans (the hospitals train without DP "
              "in this config; the audit switches it on).", privacy_attacks),
    Benchmark("data_calibration", "Calibration of the synthetic data", "python -m benchmarks.data_calibration",
              "Is the synthetic set a benchmark or a toy: how far one global statistic (intensity, size, file bytes, "
              "site) predicts the label, the paper's student against a larger model, and what leaving a site out "
              "costs.", data_calibration),
    Benchmark("latency", "Latency on one CPU thread", "python -m benchmarks.latency",
              "Single-image latency and batch throughput of the student on one CPU thread pinned to one core, per "
              "runtime (PyTorch eager and channels-last, TorchScript, ONNX Runtime fp32 and int8 in the default and "
              "in edgemri's session, offline-optimized, `.ort` and static-shape ONNX files, ExecuTorch XNNPACK); every "
              "fp32 variant's logits checked against PyTorch eager; where the time goes per node; and what "
              "`edgemri predict` costs end to end. Random weights: accuracy is not measured here.", latency),
    Benchmark("device_footprint", "What a phone pays per round", "python -m benchmarks.device_footprint",
              "A small real deployment on one machine (TLS, SuperNode authentication): memory, time and bytes per "
              "round of a phone-kind SuperNode, cold (Flower's SuperExec starts a ClientApp process per message) and "
              "warm (`edgemri client serve`).", device_footprint),
    Benchmark("train_speed", "Training speed", "python -m benchmarks.train_speed",
              "Our cached-tensor training loop against the paper's decode-every-epoch loop on the same data and "
              "machine, and what tuning gave.", train_speed),
    Benchmark("scale", "Cost at population scale", "python -m benchmarks.scale",
              "The quickstart federation as `edgemri federate` runs it (Flower's simulation engine, one virtual "
              "SuperNode per client) at 10, 100 and 1,000 clients, mostly phones sampled per round: the wall time of "
              "the run and of each round, the clients' own compute from their message timelines, the peak memory "
              "of the whole process tree (Ray's workers included) and of the ServerApp's process, sampled every "
              "0.5 s.", scale),
    Benchmark("load", "Many real devices under faults", "python -m benchmarks.load",
              "A TLS SuperLink with SuperNode authentication and real SuperNodes on 127.0.0.1, each with its own key, "
              "data, state folder and DP ledger, some with the warm ClientApp launcher and the rest cold; 10% of them "
              "SIGKILLed mid-round and restarted, the SuperLink restarted once between rounds (the run resumed, as "
              "Flower 1.42 ends a run whose SuperLink restarts).", load),
    Benchmark("dp_speed", "DP-SGD training speed", "python -m benchmarks.dp_speed",
              "DP-SGD local training speed against plain training on the same client data.", dp_speed),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def results_link(name: str, prefix: str = "docs/") -> str:
    """A relative link to a benchmark's section of RESULTS.md (``prefix``: the path from the linking file)."""
    benchmark = BY_NAME.get(name)
    return f"{prefix}RESULTS.md" + (f"#{anchor(benchmark.title)}" if benchmark else "")


def recorded(v: Values) -> str:
    """The machine and package versions the results file records."""
    machine = [f"{v['machine_platform']}" if "machine_platform" in v else "",
               f"{v['machine_cpus']} CPUs" if "machine_cpus" in v else "",
               f"{v['machine_torch_threads']} torch threads" if "machine_torch_threads" in v else ""]
    versions = {k.removeprefix("version_"): val for k, val in v.items() if k.startswith("version_")}
    versions |= {k.removesuffix("_version"): val for k, val in v.items() if k.endswith("_version")}
    parts = [", ".join(m for m in machine if m), ", ".join(f"{k} {val}" for k, val in versions.items())]
    if "measured_at_utc" in v:
        parts.append(f"measured {v['measured_at_utc']}")
    if "config" in v:
        parts.append(f"config `{config_name(v['config'])}`")
    return "; ".join(p for p in parts if p) or "not recorded"


def section(benchmark: Benchmark, v: Values) -> str:
    chunks = [f"## {benchmark.title}", benchmark.measures,
              f"Regenerate: `{benchmark.command}` (writes `benchmarks/results/{benchmark.name}.json`).",
              f"Recorded: {recorded(v)}.", *benchmark.render(v)]
    return "\n\n".join(c for c in chunks if c)


def render_results(results: Mapping[str, Values]) -> str:
    """The whole of docs/RESULTS.md: one section per results file, the known benchmarks in their order (real data
    first), any other file after them with its values as they are."""
    known = [b for b in BENCHMARKS if b.name in results]
    other = [Benchmark(name, name.replace("_", " ").capitalize(), f"python -m benchmarks.{name}",
                       "A results file this generator has no layout for; its values as they are.", generic)
             for name in sorted(results) if name not in BY_NAME]
    contents = "\n".join(f"- [{b.title}](#{anchor(b.title)})" for b in [*known, *other])
    head = ("# Results\n\nGenerated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by "
            "hand. `python -m benchmarks.report --check` (and `tests/test_results_doc.py`) fails when this file or "
            "the README's headline table is stale against the JSON. Real data first; results on synthetic data are "
            "not clinical results. Rounding: accuracies in % and differences in points to 1 decimal, durations to 2 "
            "significant digits, rates and sizes as whole numbers, AUC and ECE to 3 decimals, epsilon to 2 decimals. "
            "Decisions these numbers led to: [DECISIONS.md](DECISIONS.md).")
    body = [section(b, results[b.name]) for b in [*known, *other]]
    return "\n\n".join([head, contents, *body]) + "\n"


# ---------------------------------------------------------------------------------------------- README headline

def _headline_rows(results: Mapping[str, Values]) -> list[list[str]]:
    kaggle_v, fed, dp, attacks = (results.get(n, {}) for n in ("kaggle", "personalization_real", "dp_real",
                                                               "privacy_attacks_real"))
    lat, phone = results.get("latency", {}), results.get("device_footprint", {})
    link = {name: f"[{name}]({results_link(name)})" for name in BY_NAME}

    def table1(stage: str, label: str, paper: str | None) -> list[str]:
        paper_text = f"; the paper, full: {kaggle_v[f'paper_table1.{paper}_pct']:.2f}" if paper else ""
        return [label, f"full {mean_std(kaggle_v[f'{stage}.full_testing_accuracy_pct_values'])}, deduplicated "
                       f"{mean_std(kaggle_v[f'{stage}.dedup_testing_accuracy_pct_values'])} %{paper_text}",
                str(kaggle_v["seeds_run"]), link["kaggle"]]

    def federation(tier: str) -> list[str]:
        p = f"new-sites.fedavg.{tier}"
        pers = fed[f"{p}.personalized_accuracy_pct"]
        return [f"federation at a site the student never saw, {tier}s: start → FedAvg → fedavg-ft",
                f"{pct(pers - fed[f'{p}.personalized_minus_start_pts_mean'])} → {pct(pers)} → "
                f"{pct(fed[f'new-sites.fedavg-ft.{tier}.personalized_accuracy_pct'])} %", str(fed["seeds"]),
                link["personalization_real"]]

    teacher = kaggle_v.get("teacher", "trained from scratch")
    builders: list[Callable[[], list[str]]] = [
        lambda: table1("teacher", f"teacher: {teacher}", "teacher"),
        lambda: table1("baseline", "baseline student, 12,628 parameters", "baseline"),
        lambda: table1("paper-kd", "KD student, the paper's recipe", "kd"),
        lambda: table1("kd", "KD student, the shipped recipe", None),
        lambda: federation("hospital"), lambda: federation("phone"),
        lambda: ["DP-SGD at epsilon 3 against no DP, mean client accuracy: phones / hospitals",
                 f"{ci(dp, 'epsilon_3_minus_no_dp.phone_pts')} / {ci(dp, 'epsilon_3_minus_no_dp.hospital_pts')} "
                 "points", str(dp["seeds"]), link["dp_real"]],
        lambda: ["membership AUC on personalized models under DP (loss threshold): hospitals / phones",
                 f"{auc(attacks['dp.hospital.membership_auc'])} / {auc(attacks['dp.phone.membership_auc'])}",
                 "1", link["privacy_attacks_real"]],
        lambda: ["ONNX fp32 on one CPU thread: single-image p50 / batch-64 throughput",
                 f"{sig(lat['onnx_fp32_p50_ms'])} ms / {whole(lat['onnx_fp32_batch64_img_per_s'])} img/s", DASH,
                 link["latency"]],
        lambda: ["a phone's round, ClientApp wall time: cold / warm launcher",
                 f"{sig(phone['phone_round_seconds'])} s / {sig(phone['warm_phone_round_seconds'])} s", DASH,
                 link["device_footprint"]],
    ]
    return collect(builders, lambda build: build())


def render_headline(results: Mapping[str, Values]) -> str:
    """The README block between its markers (markers included)."""
    rows = _headline_rows(results)
    headers = ["real brain MRI (Kaggle set); the last two rows: speed", "result", "seeds", "details"]
    table = markdown_table(headers, rows, "llrl") if rows else "No results yet: run `make bench`."
    cost = cost_curve_rows(results.get("scale", {}))
    if cost:
        curve = markdown_table(COST_HEADERS, cost, "r" * len(COST_HEADERS))
        table += (f"\n\nWhat a federation costs on this machine (2 cores) as it grows, on synthetic data "
                  f"([scale]({results_link('scale')})):\n\n{curve}\n\n![cost curve](docs/img/scale.png)")
    return (f"{README_START}\n<!-- generated by `python -m benchmarks.report` from benchmarks/results/*.json; do not "
            f"edit by hand -->\n{table}\n{README_END}")


def replace_block(text: str, block_text: str) -> str:
    """``text`` with everything from the start marker to the end marker replaced by ``block_text``."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {README_START} ... {README_END}")
    return text[:start] + block_text + text[end + len(README_END):]


# ---------------------------------------------------------------------------------------------- files

def load_results(root: Path = ROOT) -> dict[str, dict[str, Any]]:
    """Every results file, by stem."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted((root / RESULTS_DIR).glob("*.json"))}


def expected(root: Path = ROOT) -> dict[Path, str]:
    """What docs/RESULTS.md and README.md should hold, by path relative to ``root``."""
    results = load_results(root)
    readme = (root / README).read_text(encoding="utf-8") if (root / README).is_file() else ""
    try:
        readme = replace_block(readme, render_headline(results))
    except ValueError:
        readme = ""  # no markers: stale, whatever the file holds
    return {RESULTS_DOC: render_results(results), README: readme}


def stale_files(root: Path = ROOT) -> list[str]:
    """The generated files that differ from what the results give (empty: all current)."""
    stale = []
    for relative, text in expected(root).items():
        path = root / relative
        if not text or not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(relative.as_posix())
    return stale


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and ``os.replace``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write(root: Path = ROOT) -> list[str]:
    """Regenerate both files; returns the ones that changed."""
    changed = []
    for relative, text in expected(root).items():
        if not text:
            raise SystemExit(f"{relative}: no {README_START} ... {README_END} markers to fill")
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_atomic(path, text)
            changed.append(relative.as_posix())
    return changed


def main(argv: Sequence[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(root)
        if stale:
            print(f"stale against benchmarks/results/*.json: {', '.join(stale)} (run python -m benchmarks.report)")
            return 1
        return 0
    changed = write(root)
    print(f"wrote {', '.join(changed)}" if changed else "docs/RESULTS.md and the README block are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
