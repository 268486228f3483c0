"""Privacy-budget reports: privacy.json, privacy.md, privacy.png.

Built from what the server received (each client's cumulative epsilon after every
round it trained, its delta, budget, noise, clipping and sampling) and from the
server's own client-level (central) DP accounting, so it works for a deployment as
well as a simulation. Each statement follows the structure the DP community
recommends: the unit protected, the neighbouring relation, the accountant, epsilon and
delta, over which rounds, and what is not protected.

privacy.json keeps every client's entry. privacy.md states each client only when there are few; above that it
summarises each tier (percentiles of epsilon spent and of the budget left, how many clients reached their budget
or never trained) and names the highest spenders, and always every flagged client.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgemri.core import untrusted
from edgemri.core.config import Config
from edgemri.core.errors import EdgemriError
from edgemri.core.federation.protocol import EPSILON, FederationResult
from edgemri.core.io import save_figure
from edgemri.core.privacy.ledger import plan_stretches, span
from edgemri.core.registries import load_config
from edgemri.reports.common import FEW_CLIENTS, PERCENTILES, markdown_table, write_report_files

NOT_PROTECTED = ("the metrics each client reports (accuracies, losses, epsilon itself), its number of "
                 "examples, which rounds it took part in, and the personal model kept on the device "
                 "(never sent, so never noised)")


# A client whose ledger now states less than it reported before: what the report says of it.
LEDGER_BEHIND = ("its ledger now states less than it reported to the server earlier (restored from a backup, "
                 "deleted or rebuilt on the device); the higher value is stated")


# The reply metrics that hold each round's DP-SGD parameters, by the ledger's names for them.
_PLAN_METRICS = {"noise_multiplier": "noise-multiplier", "sample_rate": "sample-rate", "max_grad_norm": "max-grad-norm"}


def _sample_level(name: str, node: Any, result: FederationResult, config: Config) -> dict[str, Any]:
    """One client's sample-level statement: what it reported with each round, and the most the server saw."""
    tier = config.privacy.tier(node.kind, name)
    rounds = [{"round": h.round, "epsilon": h.train_metrics[name][EPSILON],
               **{key: h.train_metrics[name].get(metric) for key, metric in _PLAN_METRICS.items()}}
              for h in result.history if name in h.trained and EPSILON in h.train_metrics.get(name, {})]
    # A client that missed the final evaluation (offline, killed) still reported its DP
    # settings with every round it trained: fall back to its last train reply.
    last_train = next((h.train_metrics[name] for h in reversed(result.history) if name in h.train_metrics), {})
    final = {**last_train, **result.final.get(name, {})}
    status = result.retired.get(name, "")
    entry: dict[str, Any] = {"kind": node.kind, "site": node.site, "n": node.num_examples, "dp": tier.enabled,
                             "status": status or ("trained" if rounds or not tier.enabled else "never trained")}
    if not tier.enabled:
        return entry
    reported = float(final.get(EPSILON, rounds[-1]["epsilon"] if rounds else 0.0))
    seen = result.epsilon_seen.get(name, 0.0)
    epsilon = max(reported, seen)  # never less than the server saw this client spend
    entry.update({
        "unit": "one scan of this client (add/remove one record of its training set)",
        "accountant": config.privacy.accountant, "delta": final.get("delta"), "budget_epsilon": tier.budget_epsilon,
        "epsilon": epsilon, "epsilon_reported_last": reported, "epsilon_server_seen": seen,
        "ledger_behind": reported < seen * (1 - 1e-9), "remaining_epsilon": tier.budget_epsilon - epsilon,
        "epsilon_per_round": [{"round": r["round"], "epsilon": r["epsilon"]} for r in rounds],
        "stretches": plan_stretches([r for r in rounds if r["noise_multiplier"] is not None]),
        "sampling": "Poisson", "rounds_trained": [r["round"] for r in rounds]})
    return entry


HIGHEST_SHOWN = 10  # clients stated by name per tier, highest epsilon first, when there are many


def _percentiles(values: list[float]) -> dict[str, float]:
    """The PERCENTILES of ``values`` (numpy's linear interpolation), NaN when there are none. No interval: these
    are all of the run's clients, not a sample of them."""
    points = np.percentile(values, PERCENTILES) if values else [math.nan] * len(PERCENTILES)
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, points, strict=True)}


def _tier_summaries(clients: dict[str, dict[str, Any]], trained: set[str], tiers: tuple[str, ...]
                    ) -> dict[str, dict[str, Any]]:
    """Per tier: how many clients, with DP-SGD, that trained no round, at or above their budget, flagged (by name),
    the spread of epsilon spent and of the budget left, and the HIGHEST_SHOWN spenders by name."""
    summaries = {}
    for tier in tiers:
        members = {name: c for name, c in clients.items() if c["kind"] == tier}
        if not members:
            continue
        private = {name: c for name, c in members.items() if c["dp"]}
        summaries[tier] = {
            "clients": len(members), "dp": len(private), "never_trained": len(members.keys() - trained),
            "at_or_above_budget": sum(c["remaining_epsilon"] <= 0 for c in private.values()),
            "flagged": sorted(name for name, c in private.items() if c["ledger_behind"]),
            "epsilon": _percentiles([c["epsilon"] for c in private.values()]),
            "remaining_epsilon": _percentiles([c["remaining_epsilon"] for c in private.values()]),
            "highest": sorted(private, key=lambda name: (-private[name]["epsilon"], name))[:HIGHEST_SHOWN]}
    return summaries


def build_privacy_report(result: FederationResult, config: Config,
                         sweep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    clients = {name: _sample_level(name, node, result, config) for name, node in sorted(result.clients.items())}
    trained = {name for h in result.history for name in h.trained}
    return {"kind": "edgemri.privacy-report/2", "seed": config.seed, "accountant": config.privacy.accountant,
            "sample_level": clients,
            "summary": _tier_summaries(clients, trained, config.federation.tier_names),
            # What the server did, not what the config asked.
            "client_level": result.central_dp,
            "not_protected": NOT_PROTECTED, "sweep": sweep or []}


def _stretch(s: dict[str, Any]) -> str:
    return (f"{span(s['rounds'])}: noise multiplier {s['noise_multiplier']:.2f}, Poisson sampling rate "
            f"{s['sample_rate']:.3f}, clipping norm {s['max_grad_norm']}")


def _statement(name: str, c: dict[str, Any]) -> str:
    if not c["dp"]:
        return (f"- **{name}** ({c['kind']}, n={c['n']}): no differential privacy. Its model updates are sent as "
                "trained; only the scans themselves stay on the device.")
    rounds = c["rounds_trained"]
    flag = (f" **Flagged:** {LEDGER_BEHIND} (its ledger now: {c['epsilon_reported_last']:.2f}; the server saw "
            f"{c['epsilon_server_seen']:.2f})." if c["ledger_behind"] else "")
    if not rounds and not c["epsilon"]:
        return (f"- **{name}** ({c['kind']}, n={c['n']}): DP-SGD on, but it trained no round ({c['status']}); "
                f"it released no update, so it spent no privacy in this run.")
    note = f" Status: {c['status']}." if c["status"] not in ("trained",) else ""
    plans = "; ".join(map(_stretch, c["stretches"])) or "no round in this run"
    return (f"- **{name}** ({c['kind']}, n={c['n']}): ({c['epsilon']:.2f}, {c['delta']:.1e})-DP for the unit "
            f"*one scan of this client* (neighbouring training sets differ by adding or removing one scan), "
            f"cumulative over everything its ledger recorded ({span(rounds)} in this run, {len(rounds)} rounds), "
            f"{c['accountant'].upper()} accountant. DP-SGD per stretch of rounds: {plans}. Budget "
            f"{c['budget_epsilon']}, remaining {c['remaining_epsilon']:.2f}.{note}{flag}")


def _client_level(c: dict[str, Any]) -> list[str]:
    """The plain statement for client-level (central) DP, one bullet per part of the structure."""
    if not c["enabled"]:
        return ["Client-level (central) DP: off in this run. Nothing below bounds what the global models "
                "reveal about a client as a whole."]
    noisy = [r for r in c["epsilon_per_round"] if r["clients"]]
    span = (f"rounds {noisy[0]['round']}-{noisy[-1]['round']} ({len(noisy)} noisy aggregations)" if noisy
            else "no round (no global model was released)")
    per_round = ", ".join(f"round {r['round']}: {r['epsilon']:.2f}" for r in c["epsilon_per_round"]) or "none"
    rates = ", ".join(f"{r['sample_rate']:.2f}" for r in c["epsilon_per_round"]) or "none"
    where = "on the server" if c["side"] == "server" else "on each client before it replies (the server checks)"
    seen = ("every client's unclipped update" if c["side"] == "server"
            else "every client's clipped update, without noise")
    stop = (f"the run stopped after round {c['stopped_at_round']}: {c['stop_reason']}." if c["stop_reason"]
            else f"every configured round stayed within max_epsilon={c['max_epsilon']}.")
    return [
        f"- **Guarantee:** ({c['epsilon']:.2f}, {c['delta']:.1e})-DP for the unit *one whole client* (all its "
        "scans and everything its updates carry). Neighbouring federations differ by adding or removing one "
        f"client's participation. It covers every global model the server released, over {span}.",
        f"- **Mechanism:** each update (shared arrays minus the global model) clipped to L2 norm "
        f"{c['clipping_norm']} {where}; {c['aggregation']}; Gaussian noise of standard deviation "
        f"{c['noise_multiplier']} x {c['clipping_norm']} / m on the mean of the m clients of the round.",
        f"- **Accountant:** {c['accountant']['name'].upper()} ({c['accountant']['implementation']}), composed over "
        f"the rounds, without amplification by sampling: the sampling rates (sampled/total: {rates}) are not used, "
        "because who trains is decided by seeded availability draws, not by secret random sampling. "
        f"Cumulative epsilon at delta {c['delta']:g}: {per_round}.",
        f"- **Stop rule:** no round may take epsilon above max_epsilon={c['max_epsilon']}; {stop}",
        f"- **Not protected:** the server itself sees {seen} (no secure aggregation), so this guarantee is about "
        "what the global models reveal to other clients and to whoever receives them; which clients took part "
        "in which round and how many; the metrics clients report; the personal models kept on the devices.",
    ]


def _summary_markdown(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Per tier: the counts, and the percentiles of epsilon spent and of the budget left over its DP clients."""
    counts = [[tier, s["clients"], s["dp"], s["never_trained"], s["at_or_above_budget"], len(s["flagged"])]
              for tier, s in summary.items()]
    spread = [[tier, what, *(f"{s[key][f'p{q}']:.2f}" for q in PERCENTILES)] for tier, s in summary.items()
              if s["dp"] for what, key in (("epsilon spent", "epsilon"), ("budget left", "remaining_epsilon"))]
    lines = ["Per tier: its clients, those with DP-SGD on, those that trained no round in this run, those at or "
             "above their budget, and those flagged (their ledger now states less than the server saw).", "",
             markdown_table(["tier", "clients", "DP-SGD on", "trained no round", "at or above budget", "flagged"],
                            counts)]
    if spread:
        lines += ["", "Epsilon spent and budget left over each tier's DP clients (percentiles of all of them: "
                      "this run's clients, not a sample, so no interval):", "",
                  markdown_table(["tier", "of", *(f"p{q}" for q in PERCENTILES)], spread,
                                 align="ll" + "r" * len(PERCENTILES))]
    return lines


def _sample_level_markdown(report: dict[str, Any]) -> list[str]:
    """The tiers' summary, then a statement per client when there are few; else the highest spenders of each tier
    and every flagged client, by name."""
    clients, summary = report["sample_level"], report["summary"]
    lines = _summary_markdown(summary) + [""]
    if len(clients) <= FEW_CLIENTS:
        return lines + [_statement(name, c) for name, c in clients.items()]
    for tier, s in summary.items():
        if not s["dp"]:
            lines += [f"- **{tier}** ({s['clients']} clients): no differential privacy. Their model updates are "
                      "sent as trained; only the scans themselves stay on the device.", ""]
        else:
            lines += [f"The {min(HIGHEST_SHOWN, s['dp'])} highest spenders of the {s['dp']} {tier} clients "
                      "with DP-SGD:", "", *(_statement(name, clients[name]) for name in s["highest"]), ""]
    flagged = [name for s in summary.values() for name in s["flagged"] if name not in s["highest"]]
    if flagged:
        lines += ["Flagged clients that are not among the highest spenders:", "",
                  *(_statement(name, clients[name]) for name in flagged), ""]
    return lines + [f"Every one of the {len(clients)} clients has its full entry in privacy.json (`sample_level`); "
                    f"this page states them one by one only up to {FEW_CLIENTS} clients."]


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Privacy report", "",
             "Two separate guarantees. **Sample-level** DP-SGD protects *one scan* of a client, in every update "
             "that client sends, also against the server. **Client-level** (central) DP protects *one whole client*, "
             "in the global models the server releases.", "",
             "## Sample-level DP (unit: one scan)", "",
             "DP-SGD (Opacus) on the clients that have it on, with a cumulative per-client ledger: "
             "epsilon below is everything the client has spent in this federation, not one round.", ""]
    lines += _sample_level_markdown(report)
    lines += ["", f"**Not protected:** {report['not_protected']}.", "",
              "## Client-level (central) DP (unit: one whole client)", ""]
    lines += _client_level(report["client_level"])
    if report["sweep"]:
        rows = []
        for row in report["sweep"]:
            for tier, summary in row["summary"].items():
                s = summary["personalized"]
                rows.append([row["label"], tier, f"{100 * s['mean']:.1f}", f"{100 * s['worst']:.1f}"])
        lines += ["", "## Privacy against accuracy (sweep)", "",
                  markdown_table(["target epsilon", "tier", "mean personalized acc (%)", "worst personalized acc (%)"],
                                 rows, align="llll")]
    lines += ["", "![privacy](privacy.png)", ""]
    return "\n".join(lines)


def plot_privacy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report["sweep"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    few = len(report["sample_level"]) <= FEW_CLIENTS
    (_plot_each_client if few else _plot_each_tier)(report["sample_level"], ax)
    central = report["client_level"]
    if central["enabled"] and central["epsilon_per_round"]:
        line, = ax.plot([r["round"] for r in central["epsilon_per_round"]],
                        [r["epsilon"] for r in central["epsilon_per_round"]], marker="s", color="black",
                        label="client-level (whole client)")
        ax.axhline(central["max_epsilon"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon (dotted: budget, max_epsilon)")
    ax.set_title(f"Privacy spent (per {'client' if few else 'tier'}; black: client-level)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    if report["sweep"]:
        ax = axes[0][1]
        for tier in sorted({t for row in report["sweep"] for t in row["summary"]} - {"all"}):
            points = [(row["epsilon"], 100 * row["summary"][tier]["personalized"]["mean"])
                      for row in report["sweep"] if tier in row["summary"]]
            finite = sorted(p for p in points if math.isfinite(p[0]))
            if finite:
                ax.plot(*zip(*finite, strict=True), marker="o", label=f"{tier} (DP)")
            for eps, acc in points:
                if not math.isfinite(eps):
                    ax.axhline(acc, linestyle="--", linewidth=1, label=f"{tier} without DP")
        ax.set_xscale("log")
        ax.set_xlabel("target epsilon")
        ax.set_ylabel("mean personalized accuracy (%)")
        ax.set_title("Privacy against accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(path, fig)
    plt.close(fig)


def _plot_each_client(clients: dict[str, dict[str, Any]], ax: Any) -> None:
    for name, c in clients.items():
        if c["dp"] and c["epsilon_per_round"]:
            line, = ax.plot([r["round"] for r in c["epsilon_per_round"]],
                            [r["epsilon"] for r in c["epsilon_per_round"]], marker="o", label=name)
            ax.axhline(c["budget_epsilon"], color=line.get_color(), linestyle=":", linewidth=1)


def _plot_each_tier(clients: dict[str, dict[str, Any]], ax: Any) -> None:
    """Per tier, the median client's cumulative epsilon after each round and the 10th-90th percentile band: a
    client's epsilon holds from a round it trained until the next, and is 0 before its first in this run."""
    rounds = sorted({r["round"] for c in clients.values() if c["dp"] for r in c["epsilon_per_round"]})
    tiers = sorted({c["kind"] for c in clients.values() if c["dp"]})
    for k, tier in enumerate(tiers):
        private = [c for c in clients.values() if c["dp"] and c["kind"] == tier]
        spent = np.zeros((len(private), len(rounds)))
        for row, c in zip(spent, private, strict=True):
            for r in c["epsilon_per_round"]:
                row[rounds.index(r["round"]):] = r["epsilon"]
        if rounds:
            low, median, high = np.percentile(spent, [10, 50, 90], axis=0)
            ax.plot(rounds, median, marker="o", color=f"C{k}", label=f"{tier}: median of {len(private)} clients")
            ax.fill_between(rounds, low, high, color=f"C{k}", alpha=0.2, label=f"{tier}: 10th-90th percentile")
        for budget in sorted({c["budget_epsilon"] for c in private}):
            ax.axhline(budget, color=f"C{k}", linestyle=":", linewidth=1)


def write_privacy_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    return write_report_files(out, "privacy", report, render_markdown, plot_privacy)


def privacy_report_for_run(run_dir: Path) -> dict[str, Path]:
    """`edgemri privacy report RUN_DIR`: rebuild the report from the run's saved result and config."""
    result_path = run_dir / "server" / "result.json"
    if not result_path.is_file():
        raise ReportError(f"{result_path} not found: is {run_dir} a finished federation run?")
    result = FederationResult.from_dict(read_json(result_path))
    config = load_config(run_dir / "config.yaml")
    sweep_path = run_dir / "privacy-sweep.json"
    sweep = read_json(sweep_path) if sweep_path.is_file() else None
    if sweep is not None and not isinstance(sweep, list):
        raise ReportError(f"{sweep_path} is not a list of sweep rows")
    return write_privacy_report(build_privacy_report(result, config, sweep), run_dir)


class ReportError(EdgemriError):
    """A run folder's saved result cannot be read back."""


def read_json(path: Path) -> Any:
    """A JSON file from a run folder (untrusted: one clear error for unreadable or invalid files). NaN and
    Infinity are accepted: the reports write them for a missing accuracy and an unbounded epsilon."""
    return untrusted.read_json(path, ReportError, nonfinite=True)
