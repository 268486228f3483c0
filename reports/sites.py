"""`edgemri data sites`: the appearance sites of data without site labels, shown: label mix, pools, example grids.

The sites are ``edgemri.core.sites``'s (appearance within each class, so every site keeps every class); the report
says how many there are and why (each candidate count's silhouette), which sites the server distills on under
new-sites, each site's label mix in Training, in Testing and in its evaluation pool (Testing less every copy of a
Training scan: the duplicate audit), and draws a grid of example scans per site, a row per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgemri.core.config import Config
from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES, DataError
from edgemri.core.data.partition import site_pools
from edgemri.core.data.sites import SITE_COUNT_CANDIDATES, fit_sites, with_sites
from edgemri.core.data.splits import PSEUDO_SITES_KEY, pick_source_sites
from edgemri.reports.common import markdown_table, write_report_files

EXAMPLES_PER_CLASS = 4


def _mix(split: ArraySplit, site: str) -> dict[str, int]:
    labels = [int(label) for label, s in zip(split.labels.tolist(), split.sites, strict=True) if s == site]
    return {name: labels.count(k) for k, name in enumerate(CLASS_NAMES)}


def build_sites_report(dataset: Dataset, config: Config, *, progress: bool = False) -> dict[str, Any]:
    """The sites of ``dataset`` under ``config`` (federation.partition.pseudo_sites, data.split_seed)."""
    if dataset.train.sites:
        raise DataError(f"{dataset.root} names its sites in metadata.csv; appearance sites are for data without")
    count, seed = config.federation.partition.pseudo_sites, config.data.split_seed
    # One clustering: the sites, their silhouettes, and the pools (site_pools keeps a sited dataset's sites).
    sites, model = fit_sites(dataset.train, count, seed, setting=PSEUDO_SITES_KEY, progress=progress)
    sited = with_sites(dataset, sites, model)
    pools = site_pools(sited, config, progress=progress)
    names = sorted(set(sited.train.sites))
    source = pick_source_sites(sited.train, config.federation.source_sites, seed) if len(names) > 1 else ()
    return {
        "kind": "edgemri.sites/1", "root": str(dataset.root), "seed": seed, "config": config.to_dict(),
        "count": len(names), "count_rule": "configured" if count is not None else
        f"the highest silhouette among {SITE_COUNT_CANDIDATES.start}-{SITE_COUNT_CANDIDATES.stop - 1} sites whose "
        f"sites each keep every class",
        "silhouettes": {str(k): v for k, v in model.silhouettes.items()},
        "new_sites_source": list(source),
        "sites": {site: {"training": _mix(sited.train, site), "testing": _mix(sited.test, site),
                         "pool": _mix(pools[site], site) if site in pools else dict.fromkeys(CLASS_NAMES, 0)}
                  for site in names},
        "examples": {site: {name: [f for f, s, label in zip(sited.train.files, sited.train.sites,
                                                              sited.train.labels.tolist(), strict=True)
                                   if s == site and label == k][:EXAMPLES_PER_CLASS]
                            for k, name in enumerate(CLASS_NAMES)} for site in names},
    }


def render_sites(report: dict[str, Any]) -> str:
    lines = [f"# Appearance sites of {report['root']}", "",
             f"{report['count']} sites ({report['count_rule']}; split seed {report['seed']}).", ""]
    if report["silhouettes"]:
        lines += [markdown_table(["sites", "silhouette"], [[k, f"{v:.3f}"] for k, v in report["silhouettes"].items()],
                                 align="rr"), ""]
    if report["new_sites_source"]:
        lines += [f"Under new-sites the server distills on {', '.join(report['new_sites_source'])}; the clients "
                  f"are at the others.", ""]
    lines.append(markdown_table(["site", "split", *CLASS_NAMES, "all"],
                                [[site, split, *(mix[c] for c in CLASS_NAMES), sum(mix.values())]
                                 for site, mixes in report["sites"].items() for split, mix in mixes.items()],
                                align="ll" + "r" * (len(CLASS_NAMES) + 1)))
    lines += ["", "pool: the site's share of Testing less every scan with a copy in Training (the duplicate audit): "
              "the clients' evaluation pool."]
    return "\n".join(lines) + "\n"


def _plot_sites(images: dict[str, dict[str, np.ndarray]]):
    def plot(report: dict[str, Any], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sites = list(report["sites"])
        fig, axes = plt.subplots(len(CLASS_NAMES), EXAMPLES_PER_CLASS * len(sites),
                                 figsize=(1.3 * EXAMPLES_PER_CLASS * len(sites), 1.4 * len(CLASS_NAMES)),
                                 squeeze=False)
        for s, site in enumerate(sites):
            for row, name in enumerate(CLASS_NAMES):
                for k in range(EXAMPLES_PER_CLASS):
                    ax = axes[row][s * EXAMPLES_PER_CLASS + k]
                    ax.axis("off")
                    shown = images[site][name]
                    if k < len(shown):
                        ax.imshow(shown[k].transpose(1, 2, 0))
                    if k == 0 and s == 0:
                        ax.text(-8, 64, name, ha="right", va="center", fontsize=8)
            axes[0][s * EXAMPLES_PER_CLASS].set_title(site, loc="left", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)

    return plot


def write_sites_report(report: dict[str, Any], dataset: Dataset, out: Path) -> dict[str, Path]:
    """sites.json, sites.md and sites.png (the example grid) in ``out``."""
    index = {f: k for k, f in enumerate(dataset.train.files)}
    images = {site: {name: dataset.train.images[[index[f] for f in files]].numpy() if files else np.zeros((0,))
                     for name, files in classes.items()} for site, classes in report["examples"].items()}
    return write_report_files(out, "sites", report, render_sites, _plot_sites(images))
