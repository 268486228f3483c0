"""Federation report: federation.json, federation.md and federation.png.

The JSON keeps one row per client; the Markdown and the figure summarise each tier (percentiles of the paired
differences, the shares of clients helped and hurt, the worst clients by name), so they still read at a thousand
clients, and list every client only when there are few.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgemri.core.config import Config
from edgemri.core.federation.protocol import (
    BEST_GLOBAL_ACCURACY,
    GLOBAL_ACCURACY,
    LOCAL_ONLY_ACCURACY,
    NUM_EXAMPLES,
    PERSONAL_ACCURACY,
    POOL_EXAMPLES,
    POOL_PREFIX,
    START_ACCURACY,
    FederationResult,
)
from edgemri.core.io import save_figure
from edgemri.core.stats import bootstrap_ci, bootstrap_ci_clustered, bootstrap_percentiles, paired_differences
from edgemri.reports.common import (
    FEW_CLIENTS,
    PERCENTILES,
    machine,
    markdown_table,
    package_versions,
    write_report_files,
)

COLUMNS = (("start", START_ACCURACY), ("global", GLOBAL_ACCURACY), ("best-global", BEST_GLOBAL_ACCURACY),
           ("personalized", PERSONAL_ACCURACY), ("local-only", LOCAL_ONLY_ACCURACY), ("pooled", "pooled-accuracy"),
           ("oracle", "oracle-accuracy"))
REFERENCE_COLUMNS = ("pooled", "oracle")  # computed by the runner, which holds all the data (references.json)
# The paired comparisons (first - second, per client on the same test images) of the "paired" section.
COMPARISONS = (("personalized", "start"), ("personalized", "global"), ("personalized", "best-global"),
               ("personalized", "local-only"), ("oracle", "start"), ("oracle", "personalized"))
CI_LEVEL, CI_RESAMPLES = 0.95, 10_000
# The comparisons whose spread over a tier's clients the "distribution" section gives.
SPREAD_COMPARISONS = (("personalized", "start"), ("personalized", "global"))
# Helped (hurt): the personalized model at least this far above (below) the reference; closer counts as neither.
# Half a point: under two scans of a 300-scan site pool, so one scan either way is not called a change.
TIE_BAND = 0.005
WORST_SHOWN = 10  # clients named per tier, lowest personalized - start first


def _summary(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "worst": float("nan")}
    return {"mean": statistics.fmean(values), "worst": min(values)}


def comparison_key(first: str, second: str) -> str:
    """The name of a comparison in the "paired" section, e.g. "personalized - start"."""
    return f"{first} - {second}"


def paired_summary(rows_by_seed: Mapping[Hashable, Sequence[Mapping[str, Any]]],
                   tiers: Sequence[str] | None = None, *, resamples: int = CI_RESAMPLES,
                   seed: int = 0) -> dict[str, Any]:
    """Per tier and overall, each comparison's mean paired difference with its 95% bootstrap CI.

    ``rows_by_seed`` maps a run's seed to its report rows (``report["clients"]``); a client is a
    (seed, client) pair, resampled within its seed, so a benchmark pools several runs by passing
    them all. ``tiers`` defaults to the kinds the rows hold. Values are accuracy fractions.
    """
    if tiers is None:
        tiers = sorted({r["kind"] for rows in rows_by_seed.values() for r in rows})
    groups: dict[str, dict[str, Any]] = {}
    for group in ("all", *tiers):
        members = {(run, r["client"]): r for run, rows in rows_by_seed.items() for r in rows
                   if group in ("all", r["kind"])}
        if not members:
            continue
        groups[group] = {}
        for first, second in COMPARISONS:
            by_seed: dict[Hashable, list[float]] = defaultdict(list)
            for (run, _), value in paired_differences({k: r[first] for k, r in members.items()},
                                                      {k: r[second] for k, r in members.items()}).items():
                by_seed[run].append(value)
            groups[group][comparison_key(first, second)] = bootstrap_ci_clustered(
                by_seed, level=CI_LEVEL, resamples=resamples, seed=seed).to_dict()
    return {"level": CI_LEVEL, "resamples": resamples, "seeds": list(rows_by_seed),
            "bootstrap": "percentile bootstrap of the mean over clients, clients resampled within each seed",
            "groups": groups}


def _differences(rows: Sequence[Mapping[str, Any]], first: str, second: str) -> dict[str, float]:
    """Client -> ``first - second`` for the clients that have both (a failed client has no pair)."""
    return paired_differences({r["client"]: r[first] for r in rows}, {r["client"]: r[second] for r in rows})


def _spread(values: list[float], resamples: int, seed: int) -> dict[str, Any]:
    """One tier's differences: their percentiles and the shares helped and hurt, each with its bootstrap CI."""
    settings = {"level": CI_LEVEL, "resamples": resamples, "seed": seed}
    return {"n": len(values),
            "percentiles": [p.to_dict() for p in bootstrap_percentiles(values, PERCENTILES, **settings)],
            "helped": bootstrap_ci([float(v >= TIE_BAND) for v in values], **settings).to_dict(),
            "hurt": bootstrap_ci([float(v <= -TIE_BAND) for v in values], **settings).to_dict()}


def distribution_summary(rows: Sequence[Mapping[str, Any]], tiers: Sequence[str], *, resamples: int = CI_RESAMPLES,
                         seed: int = 0) -> dict[str, Any]:
    """Per tier, how each SPREAD_COMPARISONS difference spreads over its clients, and who fared worst.

    Percentiles of the per-client differences and the shares of clients helped and hurt (beyond TIE_BAND),
    each with a 95% percentile-bootstrap CI over the tier's clients; the WORST_SHOWN clients by personalized -
    start. Values are accuracy fractions; ``rows`` are a report's rows (``report["clients"]``).
    """
    groups: dict[str, dict[str, Any]] = {}
    for tier in tiers:
        members = [r for r in rows if r["kind"] == tier]
        if not members:
            continue
        by_name = {r["client"]: r for r in members}
        differences = {comparison_key(*c): _differences(members, *c) for c in SPREAD_COMPARISONS}
        gains = differences[comparison_key("personalized", "start")]
        worst = sorted(gains, key=lambda c: (gains[c], c))[:WORST_SHOWN]
        groups[tier] = {
            "clients": len(members),
            **{key: _spread(list(values.values()), resamples, seed) for key, values in differences.items()},
            "worst": [{"client": c, "site": by_name[c]["site"], "start": by_name[c]["start"],
                       "personalized": by_name[c]["personalized"],
                       **{key: values.get(c, math.nan) for key, values in differences.items()}} for c in worst]}
    return {"level": CI_LEVEL, "resamples": resamples, "seed": seed, "percentiles": list(PERCENTILES),
            "tie_band": TIE_BAND,
            "bootstrap": "percentile bootstrap over the tier's clients (each percentile and share resampled)",
            "groups": groups}


def _rows(result: FederationResult, references: dict[str, dict[str, float]] | None, prefix: str = "",
          count_key: str = NUM_EXAMPLES) -> list[dict[str, Any]]:
    """One row per client: its columns from the final metrics (``prefix``: the same, on its site pool)."""
    clients = result.clients
    rows = []
    for name in sorted(clients, key=lambda c: (clients[c].kind, c)):
        final = result.final.get(name) or {}
        row = {"client": name, "kind": clients[name].kind, "site": clients[name].site,
               "num_train": clients[name].num_examples, "failed": name in result.final_failed}
        for column, key in COLUMNS:
            source = (references or {}).get(name, {}) if column in REFERENCE_COLUMNS else final
            value = source.get(prefix + key)
            row[column] = float("nan") if value is None else float(value)
        row["num_test"] = int(final.get(count_key, 0))
        rows.append(row)
    return rows


def _groups(rows: list[dict[str, Any]], config: Config) -> dict[str, list[dict[str, Any]]]:
    return {"all": rows, **{kind: [r for r in rows if r["kind"] == kind] for kind in config.federation.tier_names}}


def _summaries(rows: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    return {group: {column: _summary([r[column] for r in members]) for column, _ in COLUMNS}
            for group, members in _groups(rows, config).items() if members}


def _pool_section(result: FederationResult, config: Config, references: dict[str, dict[str, float]] | None
                  ) -> dict[str, Any] | None:
    """The same columns on each client's site pool (hundreds of held-out scans), when the clients had pools."""
    if not any(POOL_EXAMPLES in m for m in result.final.values()):
        return None
    rows = _rows(result, references, POOL_PREFIX, POOL_EXAMPLES)
    return {"clients": rows, "summary": _summaries(rows, config),
            "paired": paired_summary({config.seed: rows}, config.federation.tier_names),
            "distribution": distribution_summary(rows, config.federation.tier_names)}


def build_federation_report(result: FederationResult, config: Config,
                            references: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    rows = _rows(result, references)
    groups = _groups(rows, config)
    summary = _summaries(rows, config)
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
        "paired": paired_summary({config.seed: rows}, config.federation.tier_names),
        "distribution": distribution_summary(rows, config.federation.tier_names),
        "pool": _pool_section(result, config, references),
        "curves": curves,
        "central": {"start": result.central_start, "final": result.central_final,
                    "per_round": [h.central for h in result.history]},
        "best_round": result.best_round,
        "federated_val": [h.federated_val for h in result.history],
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


def _points(value: float, low: float = math.nan, high: float = math.nan) -> str:
    """A difference in percentage points, with its CI where it has one: "+1.2 [-0.8, +3.1]"."""
    if math.isnan(value):
        return "—"
    text = f"{100 * value:+.1f}"
    return text if math.isnan(low) else f"{text} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _pp(interval: Mapping[str, Any]) -> str:
    """A paired difference in percentage points: "+1.2 [-0.8, +3.1] (n=8)"."""
    if interval["n"] == 0:
        return "—"
    if interval["n"] == 1:
        return f"{_points(interval['mean'])} (n=1, no CI)"
    return f"{_points(interval['mean'], interval['low'], interval['high'])} (n={interval['n']})"


def _share(interval: Mapping[str, Any]) -> str:
    """A share of clients in percent with its CI: "62.5 [47.5, 77.5]"."""
    if interval["n"] == 0:
        return "—"
    mean, low, high = (100 * interval[k] for k in ("mean", "low", "high"))
    return f"{mean:.1f}" if math.isnan(low) else f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _paired_markdown(report: dict[str, Any]) -> list[str]:
    paired, keys = report["paired"], [comparison_key(*c) for c in COMPARISONS]
    tested = [r["num_test"] for r in report["clients"] if r["num_test"]]
    sizes = f"{min(tested)}-{max(tested)}" if tested else "no"
    sizes_text = (f"With a handful of test images per client ({sizes} here) these intervals are wide"
                  if max(tested or [0]) < 100 else
                  f"With {sizes} test images per client the intervals resolve a few points")
    lines = ["", f"Paired differences (percentage points), each client's models compared on the same test images: "
                 f"the mean over clients with a {100 * paired['level']:.0f}% percentile-bootstrap confidence "
                 f"interval ({paired['resamples']:,} resamples of the clients) and the number of clients. "
                 f"{sizes_text}, and this is one run, one seed (the multi-seed "
                 f"benchmark pools clients × seeds); with only a few clients in "
                 f"a tier the bootstrap cannot reach beyond the differences observed, so read such an interval as "
                 f"the range of the clients, not a guarantee.", "",
             markdown_table(["group", *keys], [[group, *(_pp(intervals[k]) for k in keys)]
                                               for group, intervals in paired["groups"].items()])]
    return lines


def _spread_markdown(section: dict[str, Any]) -> list[str]:
    """The tiers' spread table (percentiles, helped, hurt) and their worst clients by name."""
    spread, keys = section["distribution"], [comparison_key(*c) for c in SPREAD_COMPARISONS]
    band = f"{100 * spread['tie_band']:g}"
    rows = [[tier, key, f"{group[key]['n']} of {group['clients']}",
             *(_points(p["value"], p["low"], p["high"]) for p in group[key]["percentiles"]),
             _share(group[key]["helped"]), _share(group[key]["hurt"])]
            for tier, group in spread["groups"].items() for key in keys]
    worst = [[tier, w["client"], w["site"], _pct(w["start"]), _pct(w["personalized"]), *(_points(w[k]) for k in keys)]
             for tier, group in spread["groups"].items() for w in group["worst"]]
    return ["", f"How each tier's clients spread (percentage points): percentiles of the per-client difference, each "
                f"with a {100 * spread['level']:.0f}% percentile-bootstrap CI ({spread['resamples']:,} resamples of "
                f"the tier's clients). *helped* / *hurt*: the share of clients (%) whose personalized model is at "
                f"least {band} points above / below the reference (closer counts as neither), with its CI. "
                "*clients*: those with both scores, of the tier's clients.", "",
            markdown_table(["tier", "comparison", "clients", *(f"p{q:g}" for q in spread["percentiles"]),
                            "helped %", "hurt %"], rows, align="lll" + "r" * (2 + len(spread["percentiles"]))),
            "", f"The {WORST_SHOWN} clients of each tier with the lowest personalized - start "
                "(accuracy %, differences in points):", "",
            markdown_table(["tier", "client", "site", "start", "personalized", *keys], worst,
                           align="lll" + "r" * (2 + len(keys)))]


def _section(section: dict[str, Any], headers: list[str]) -> list[str]:
    """One section (local test splits or site pools): each group's mean and worst accuracy, the tiers' spread and
    worst clients, the paired means, and a row per client when there are few."""
    groups = [[f"{group} {which}", *(_pct(stats[c][which]) for c in headers)]
              for group, stats in section["summary"].items() for which in ("mean", "worst")]
    lines = [markdown_table(["group", *headers], groups, align="l" * (1 + len(headers)))]
    lines += _spread_markdown(section) + _paired_markdown(section)
    count = len(section["clients"])
    if count > FEW_CLIENTS:
        return [*lines, "", f"Every one of the {count} clients has its row in federation.json; this page lists "
                            f"them one by one only up to {FEW_CLIENTS} clients."]
    clients = [[r["client"] + (" (failed)" if r["failed"] else ""), r["kind"], r["site"], r["num_train"], r["num_test"],
                *(_pct(r[c]) for c in headers)] for r in section["clients"]]
    return [*lines, "", "Every client:", "",
            markdown_table(["client", "kind", "site", "train n", "test n", *headers], clients,
                           align="l" * (5 + len(headers)))]


def render_markdown(report: dict[str, Any]) -> str:
    headers = [c for c, _ in COLUMNS]
    lines = [f"# Federation report: `{report['method']}`, {len(report['rounds'])} rounds, seed {report['seed']}", "",
             "Accuracy (%) on each client's own local test split. *start*: the distilled student; *global*: the "
             "final global model; *best-global*: the global model of the round federated validation preferred "
             f"(round {report['best_round']}: the clients' validation splits, weighted by size); "
             "*personalized*: the client's own model; *local-only*: the same local budget "
             "from the same start without federation; *pooled*: the start model fine-tuned centrally on all "
             "clients' training data; *oracle*: the start model fine-tuned centrally on all of the client's site's "
             "client training data, early-stopped on their validation splits: the headroom no federated method "
             "can beat (both need the data in one place).", ""]
    lines += _section(report, headers)
    if report.get("pool"):
        lines += ["", "## On each client's site pool", "",
                  "The same models scored on hundreds of held-out scans of each client's site, generated with "
                  "that site's scanner profile (`Pools/<site>/` of the data folder): the primary metric, since a "
                  "local test split of a few scans cannot resolve differences of a few points. *test n* is the "
                  "pool's size here. Under label skew each client's pool accuracy mixes the per-class accuracies "
                  "by the client's own class mix.", ""]
        lines += _section(report["pool"], headers)
    central = report["central"]
    if central["final"]:
        lines += ["", f"Global model on the Testing split: {_pct(central['start'].get('accuracy', math.nan))}% "
                      f"at the start, {_pct(central['final'].get('accuracy', math.nan))}% at the end."]
    participation = [[p["round"], len(p["sampled"]), len(p["trained"]),
                      "; ".join(f"{k}: {v}" for k, v in p["failed"].items()) or "—", f"{p['seconds']:.1f}"]
                     for p in report["participation"]]
    lines += ["", "Participation per round:", "",
              markdown_table(["round", "sampled", "trained", "failed", "seconds"], participation, align="lllll")]
    lines += ["", "![federation](federation.png)", "", "Results on synthetic data are not clinical results.", ""]
    return "\n".join(lines)


def plot_federation(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rounds_ax, spread_ax, paired_ax) = plt.subplots(1, 3, figsize=(19, 4.5),
                                                          gridspec_kw={"width_ratios": [1, 1.3, 1.1]})
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
    _plot_spread(report, spread_ax)
    _plot_paired(report, paired_ax)
    fig.suptitle(f"Federation ({report['method']}): per round and across clients")
    save_figure(path, fig)
    plt.close(fig)


def _plot_spread(report: dict[str, Any], ax: Any) -> None:
    """Per tier, the ECDF of each client's personalized - start (solid) and personalized - global (dashed): readable
    at any number of clients (on the site pools where the clients had them)."""
    where = "site pools" if report.get("pool") else "local test splits"
    section = report.get("pool") or report
    for k, tier in enumerate(section["distribution"]["groups"]):
        members = [r for r in section["clients"] if r["kind"] == tier]
        for (first, second), style in zip(SPREAD_COMPARISONS, ("-", "--"), strict=True):
            differences = sorted(100 * v for v in _differences(members, first, second).values())
            if differences:  # from 0 at the lowest client up to 1 at the highest
                ax.step([differences[0], *differences], [i / len(differences) for i in range(len(differences) + 1)],
                        where="post", linestyle=style, color=f"C{k}", label=f"{tier}: {first} - {second}")
    band = 100 * section["distribution"]["tie_band"]
    ax.axvspan(-band, band, color="grey", alpha=0.2, label=f"neither helped nor hurt (±{band:g})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("paired difference per client (points)")
    ax.set_ylabel("share of the tier's clients at or below")
    ax.set_title(f"on the {where}: cumulative share of clients", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_paired(report: dict[str, Any], ax: Any) -> None:
    """Each client's personalized - start and personalized - global as points, by tier, with the tier's mean and CI
    (on the site pools where the clients had them: the primary metric). Clients are ordered by personalized - start
    and drawn smaller when there are many, so a tier of hundreds reads as a band rather than a cloud."""
    where = "site pools" if report.get("pool") else "local test splits"
    report = report.get("pool") or report
    x = 0
    centres, names = [], []
    for tier, intervals in report["paired"]["groups"].items():
        if tier == "all":
            continue
        rows = sorted((r for r in report["clients"] if r["kind"] == tier and not math.isnan(r["personalized"])),
                      key=lambda r: r["personalized"] - r["start"])
        positions, size = range(x, x + len(rows)), 18 if len(rows) <= FEW_CLIENTS else 3
        for offset, (second, color) in ((-0.15, ("start", "tab:green")), (0.15, ("global", "tab:blue"))):
            ax.scatter([i + offset for i in positions], [100 * (r["personalized"] - r[second]) for r in rows],
                       color=color, s=size, label=f"personalized - {second}" if x == 0 else None)
            ci = intervals[comparison_key("personalized", second)]
            if ci["n"] >= 2:
                ax.errorbar(x + len(rows) + offset, 100 * ci["mean"], color=color, fmt="D", capsize=4, zorder=3,
                            yerr=[[100 * (ci["mean"] - ci["low"])], [100 * (ci["high"] - ci["mean"])]])
        centres.append(x + len(rows) / 2)
        names.append(tier)
        x += len(rows) + 2
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(centres, names, fontsize=8)
    ax.set_ylabel("paired difference per client (points)")
    ax.set_title(f"on the {where}; dots: clients; diamonds: tier mean, 95% bootstrap CI", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def write_federation_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    return write_report_files(out, "federation", report, render_markdown, plot_federation)
