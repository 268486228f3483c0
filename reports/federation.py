"""Federation report: federation.json, federation.md and federation.png."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from edgemri.core.config import Config
from edgemri.core.io import save_figure
from edgemri.core.protocol import (
    GLOBAL_ACCURACY,
    LOCAL_ONLY_ACCURACY,
    NUM_EXAMPLES,
    PERSONAL_ACCURACY,
    START_ACCURACY,
    FederationResult,
)
from edgemri.reports.common import machine, package_versions, write_report_files

COLUMNS = (("start", START_ACCURACY), ("global", GLOBAL_ACCURACY), ("personalized", PERSONAL_ACCURACY),
           ("local-only", LOCAL_ONLY_ACCURACY), ("pooled", "pooled-accuracy"))


def _summary(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "worst": float("nan")}
    return {"mean": statistics.fmean(values), "worst": min(values)}


def build_federation_report(result: FederationResult, config: Config,
                            pooled: dict[str, float] | None = None) -> dict[str, Any]:
    clients = result.clients
    rows = []
    for name in sorted(clients, key=lambda c: (clients[c].kind, c)):
        final = result.final.get(name)
        row = {"client": name, "kind": clients[name].kind, "site": clients[name].site,
               "num_train": clients[name].num_examples, "failed": name in result.final_failed}
        for column, key in COLUMNS:
            value = (pooled or {}).get(name) if column == "pooled" else (final or {}).get(key)
            row[column] = float("nan") if value is None else float(value)
        row["num_test"] = int((final or {}).get(NUM_EXAMPLES, 0))
        rows.append(row)
    groups = {"all": rows, **{kind: [r for r in rows if r["kind"] == kind] for kind in config.federation.tier_names}}
    summary = {group: {column: _summary([r[column] for r in members]) for column, _ in COLUMNS}
               for group, members in groups.items() if members}
    curves: dict[str, dict[str, list[float]]] = {}
    for group, members in groups.items():
        names = {r["client"] for r in members}
        curves[group] = {
            metric: [statistics.fmean([m[key] for c, m in h.eval_metrics.items() if c in names and key in m]
                                      or [math.nan])
                     for h in result.history]
            for metric, key in (("global", GLOBAL_ACCURACY), ("personalized", PERSONAL_ACCURACY))
        }
    return {
        "kind": "edgemri.federation-report/1",
        "method": config.federation.method,
        "config": config.to_dict(),
        "seed": config.seed,
        "rounds": [h.round for h in result.history],
        "clients": rows,
        "summary": summary,
        "curves": curves,
        "central": {"start": result.central_start, "final": result.central_final,
                    "per_round": [h.central for h in result.history]},
        "participation": [{"round": h.round, "sampled": h.sampled, "trained": h.trained, "failed": h.failed,
                           "declined": h.declined, "aggregated": h.aggregated, "seconds": h.seconds}
                          for h in result.history],
        "final_failed": result.final_failed,
        "excluded": result.excluded,
        "versions": package_versions(),
        "machine": machine(),
    }


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    headers = [c for c, _ in COLUMNS]
    lines = [f"# Federation report: `{report['method']}`, {len(report['rounds'])} rounds, seed {report['seed']}", "",
             "Accuracy (%) on each client's own local test split. *start*: the distilled student; *global*: the "
             "final global model; *personalized*: the client's own model; *local-only*: the same local budget "
             "from the same start without federation; *pooled*: one model trained centrally on all clients' "
             "training data (an upper bound that needs the data in one place).", "",
             "| client | kind | site | train n | test n | " + " | ".join(headers) + " |",
             "|---|---|---|---|---|" + "---|" * len(headers)]
    for r in report["clients"]:
        flag = " (failed)" if r["failed"] else ""
        lines.append(f"| {r['client']}{flag} | {r['kind']} | {r['site']} | {r['num_train']} | {r['num_test']} | "
                     + " | ".join(_pct(r[c]) for c in headers) + " |")
    lines += ["", "| group | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for group, stats in report["summary"].items():
        for which in ("mean", "worst"):
            lines.append(f"| {group} {which} | " + " | ".join(_pct(stats[c][which]) for c in headers) + " |")
    central = report["central"]
    if central["final"]:
        lines += ["", f"Global model on the Testing split: {_pct(central['start'].get('accuracy', math.nan))}% "
                      f"at the start, {_pct(central['final'].get('accuracy', math.nan))}% at the end."]
    lines += ["", "Participation per round:", "", "| round | sampled | trained | failed | seconds |",
              "|---|---|---|---|---|"]
    for p in report["participation"]:
        failed = "; ".join(f"{k}: {v}" for k, v in p["failed"].items()) or "—"
        lines.append(f"| {p['round']} | {len(p['sampled'])} | {len(p['trained'])} | {failed} | {p['seconds']:.1f} |")
    lines += ["", "![federation](federation.png)", "", "Results on synthetic data are not clinical results.", ""]
    return "\n".join(lines)


def plot_federation(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rounds_ax, clients_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    for group, style in (("hospital", "-"), ("phone", "--")):
        for metric, color in (("global", "tab:blue"), ("personalized", "tab:orange")):
            values = report["curves"].get(group, {}).get(metric)
            if values:
                rounds_ax.plot(report["rounds"], [100 * v for v in values], style, color=color, marker="o",
                               label=f"{group} {metric}")
    rounds_ax.set_xlabel("round")
    rounds_ax.set_ylabel("mean local test accuracy (%)")
    rounds_ax.grid(alpha=0.3)
    rounds_ax.legend(fontsize=8)
    rows = report["clients"]
    width = 0.8 / len(COLUMNS)
    for k, (column, _) in enumerate(COLUMNS):
        clients_ax.bar([i + k * width for i in range(len(rows))], [100 * r[column] for r in rows], width,
                       label=column)
    clients_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["client"] for r in rows],
                          rotation=60, ha="right", fontsize=7)
    clients_ax.set_ylabel("local test accuracy (%)")
    clients_ax.legend(fontsize=8, ncol=len(COLUMNS))
    fig.suptitle(f"Federation ({report['method']}): per round and per client")
    save_figure(path, fig)
    plt.close(fig)


def write_federation_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    return write_report_files(out, "federation", report, render_markdown, plot_federation)
