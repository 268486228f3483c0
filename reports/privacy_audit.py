"""The DP audit's report: privacy-audit.json, .md and .png.

Built from ``simulation.privacy_audit.audit``'s report: per audited tier, its client and, for each setting (as
configured, weak noise, DP off), the accounted epsilon beside the empirical lower bound of the one-run audit and
what that bound rests on (noise, clipping, rate, steps, right guesses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemri.core.io import save_figure
from edgemri.reports.common import markdown_table, write_report_files

STEM = "privacy-audit"
HEADERS = ("setting", "noise multiplier", "clipping", "sample rate", "steps", "delta", "accounted epsilon",
           "empirical epsilon (95% lower bound)", "right guesses", "score AUC (in vs out)", "seconds")


def noise_text(result: dict[str, Any]) -> str:
    return "∞" if result["noise_multiplier"] is None else f"{result['noise_multiplier']:.3g}"


def clipping_text(result: dict[str, Any]) -> str:
    return "off" if result["max_grad_norm"] is None else f"{result['max_grad_norm']:.3g}"


def _row(name: str, r: dict[str, Any]) -> tuple[Any, ...]:
    """One setting's row; a setting whose plan would not train says why."""
    plan = (name, noise_text(r), clipping_text(r), f"{r['sample_rate']:.3g}")
    if not r["trained"]:
        return (*plan, "—", f"{r['delta']:.1e}", "—", f"not trained: {r['why']}", "—", "—", "—")
    accounted = "∞ (no noise)" if r["accounted_epsilon"] is None else \
        f"{r['accounted_epsilon']:.3g} ({r['accountant']})"
    return (*plan, r["steps"], f"{r['delta']:.1e}", accounted, f"{r['empirical_epsilon']:.2f}",
            f"{r['correct']}/{r['guesses']}", f"{r['scores_auc']:.2f}", f"{r['seconds']:.0f}")


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Privacy audit: an empirical lower bound on epsilon", "",
             f"{report['method']}; {report['canaries']} canaries ({report['canary_kind']}); score: "
             f"{report['score']}; guesses: {report['guesses']}; beta {report['beta']} (95% confidence); "
             f"seed {report['seed']}; start model: {report['start_model']}; data: {report['data_root']}.", "",
             "With probability at least 95% over the coins, DP-SGD that really meets (epsilon, delta) gives an "
             "empirical bound no larger than epsilon. A bound above the accounted epsilon means the implementation "
             "or the accounting is wrong; a bound far below it does not mean the accounting is loose (one run, the "
             "final model only, m canaries: the method cannot show more than a few units of epsilon).", ""]
    for kind, tier in report["tiers"].items():
        dp = "on" if tier["dp_enabled_in_config"] else "off in the config, audited with its DP settings switched on"
        lines += [f"## {kind}: {tier['client']} ({tier['n_train']} training scans; DP {dp})", "",
                  markdown_table(HEADERS, [_row(name, r) for name, r in tier["settings"].items()]),
                  "", f"Reading: {tier['reading']}.", ""]
    lines += [f"![privacy audit]({STEM}.png)", "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; "
              f"{report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot_privacy_audit(report: dict[str, Any], path: Path) -> None:
    """Per tier, each setting's empirical bound (bars) under what every guess right could show (the ceiling), with
    the accounted epsilon written above: the bound should rise as the noise goes and never pass the accounted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = report["tiers"]
    fig, axes = plt.subplots(1, max(len(tiers), 1), figsize=(5 * max(len(tiers), 1), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (kind, tier) in zip(axes[0], tiers.items(), strict=False):
        trained = {name: r for name, r in tier["settings"].items() if r["trained"]}
        names = list(trained)
        ax.bar(names, [r["empirical_epsilon"] for r in trained.values()], color="tab:blue",
               label="empirical epsilon (95% lower bound)")
        ax.scatter(names, [r["ceiling_epsilon"] for r in trained.values()], marker="_", s=400, color="black",
                   label="every guess right")
        for x, r in enumerate(trained.values()):
            accounted = "∞" if r["accounted_epsilon"] is None else f"{r['accounted_epsilon']:.3g}"
            ax.annotate(f"accounted {accounted}", (x, r["ceiling_epsilon"]), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7)
        ax.set_title(f"{kind}: {tier['client']} ({tier['n_train']} scans)", fontsize=9)
        ax.set_ylabel("epsilon")
        ax.set_ylim(0, 1.5 * max([1.0, *(r["ceiling_epsilon"] for r in trained.values())]))  # room for the legend
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    save_figure(path, fig)
    plt.close(fig)


def write_audit_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """privacy-audit.json, .md and .png in ``out``, each written atomically."""
    return write_report_files(Path(out), STEM, report, render_markdown, plot_privacy_audit)
