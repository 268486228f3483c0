"""How Training is shared: the stratified (or duplicate-grouped) train/validation split, and the server/client
split of a scenario (seen-sites: a share of every site each; new-sites: the clients are at sites the server never
saw), with appearance sites for data that has none (core/data/sites.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from edgemri.core.config import Config
from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES, DataError
from edgemri.core.data.sites import cluster_sites, with_appearance_sites

# How Training is shared between the server's distillation and the clients (federation.scenario):
# seen-sites, a share of every site each; new-sites, the clients are at sites the server never saw.
SCENARIOS: tuple[str, ...] = ("seen-sites", "new-sites")
PSEUDO_SITES_KEY = "federation.partition.pseudo_sites"  # the count of appearance sites for data without sites


def stratified_split(labels: Tensor, fraction: float, seed: int,
                     groups: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Indices (train, val): ``fraction`` of each class goes to val, seeded.

    ``groups`` (one id per row, e.g. the duplicate audit's groups of one scan): every group goes whole to one
    side, so no copy of a validation scan is trained on; a group counts toward the class of its first row.
    """
    if groups is not None:
        return _grouped_split(labels, fraction, seed, groups)
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = int(round(len(members) * fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) > 1 else 0
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _grouped_split(labels: Tensor, fraction: float, seed: int, groups: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``stratified_split`` over whole groups: per class, groups in seeded order go to val until it holds
    ``fraction`` of the class's rows (at least one group, never every group of a class)."""
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} ids for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(int(group), []).append(row)
    by_class: dict[int, list[list[int]]] = {}
    for rows in members.values():
        by_class.setdefault(int(labels[rows[0]]), []).append(rows)
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in sorted(by_class):
        class_groups = by_class[label]
        quota = round(sum(len(g) for g in class_groups) * fraction)
        taken = 0
        for k in torch.randperm(len(class_groups), generator=generator).tolist()[: max(len(class_groups) - 1, 0)]:
            if taken >= max(quota, 1):
                break
            val += class_groups[k]
            taken += len(class_groups[k])
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[torch.tensor(val, dtype=torch.long)] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def pick_source_sites(split: ArraySplit, count: int | None, seed: int) -> tuple[str, ...]:
    """The sites the server distills on under new-sites (sorted names): ``count`` of them (None: half, rounded
    down, at least 1), a seeded choice over the sorted site names, so every run seed keeps the same split.

    Raises DataError when an image has no site or too few sites are left for the clients.
    """
    unsited = next((f for f, s in zip(split.files, split.sites or [""] * len(split), strict=True) if not s), None)
    if unsited is not None:
        what = "this data has no site metadata" if not split.sites else f"Training image {unsited} has none"
        raise DataError(f"federation.scenario 'new-sites' needs a scanner site for every Training image (the data "
                        f"folder's metadata.csv, columns 'file' and 'site'); {what}; use federation.scenario "
                        f"seen-sites")
    names = sorted(set(split.sites))
    if len(names) < 2:
        raise DataError(f"federation.scenario 'new-sites' needs at least 2 sites in Training (source sites for "
                        f"the server, the others for the clients); this data has 1 ({names[0]}); use "
                        f"federation.scenario seen-sites")
    count = max(1, len(names) // 2) if count is None else count
    if not 1 <= count < len(names):
        raise DataError(f"federation.source_sites is {count} but Training has {len(names)} sites "
                        f"({', '.join(names)}); allowed: 1 to {len(names) - 1} (at least one site is left for the "
                        f"clients), or null for half of them")
    picked = np.random.default_rng(seed).choice(len(names), size=count, replace=False)
    return tuple(sorted(names[i] for i in picked))


def server_client_split(split: ArraySplit, client_fraction: float, seed: int, *, scenario: str = "seen-sites",
                        source_sites: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices (server, clients) of Training, disjoint, fixed by ``seed`` (data.split_seed) alone.

    The server distills on its share; the federation's clients hold the rest, so every
    client's local test is data the distilled student never saw. seen-sites: stratified by
    site and class, ``client_fraction`` of every site goes to the clients (0: they reuse the
    server's data). new-sites: by site, the server takes every image of the source sites
    (``pick_source_sites``) and the clients every image of the others, so no client is at a
    site the student has seen; ``client_fraction`` is not used.
    """
    if scenario not in SCENARIOS:
        raise DataError(f"federation.scenario {scenario!r} is not allowed; allowed: {', '.join(SCENARIOS)}")
    if scenario == "new-sites":
        source = set(pick_source_sites(split, source_sites, seed))
        at_source = torch.tensor([site in source for site in split.sites])
        return torch.nonzero(at_source).flatten(), torch.nonzero(~at_source).flatten()
    everything = torch.arange(len(split))
    if client_fraction == 0:
        return everything, everything
    site_ids = {site: k for k, site in enumerate(sorted(set(split.sites)))} if split.sites else {}
    strata = split.labels + len(CLASS_NAMES) * torch.tensor([site_ids.get(s, 0) for s in split.sites]
                                                           if split.sites else [0] * len(split))
    return stratified_split(strata, client_fraction, seed)


def sited_training(split: ArraySplit, config: Config, *, progress: bool = False) -> ArraySplit:
    """Training with metadata.csv's sites, else with ``federation.partition.pseudo_sites`` appearance sites
    (``edgemri.core.data.sites``) clustered over the whole split and seeded by ``data.split_seed`` alone, so the
    server's distillation and the clients' partition find the same sites. Raises DataError for a bad count.
    """
    if split.sites:
        return split

    sites = cluster_sites(split, config.federation.partition.pseudo_sites, config.data.split_seed,
                          setting=PSEUDO_SITES_KEY, progress=progress)
    return ArraySplit(split.images, split.labels, split.files, sites)


def sited_dataset(dataset: Dataset, config: Config, *, progress: bool = False) -> Dataset:
    """Both splits with sites: metadata.csv's, else Training's appearance sites as ``sited_training`` finds
    them and each Testing image at its nearest one (``pools_from_testing`` then has per-site pools)."""

    return with_appearance_sites(dataset, config.federation.partition.pseudo_sites, config.data.split_seed,
                                 setting=PSEUDO_SITES_KEY, progress=progress)


def scenario_split(split: ArraySplit, config: Config, *, progress: bool = False) -> tuple[Tensor, Tensor]:
    """``server_client_split`` under the config's scenario: the one call distillation and partitioning make,
    so the server and the clients can never disagree on who holds which image.

    new-sites splits data without metadata.csv by its appearance sites (``sited_training``); seen-sites
    splits it by class alone, as it always has, so appearance sites never move the distillation share.
    """
    if config.federation.scenario == "new-sites" and not split.sites:
        if (config.federation.partition.pseudo_sites or 2) < 2:  # null: automatic, at least 2
            raise DataError(f"federation.scenario 'new-sites' on data without site metadata needs at least 2 "
                            f"appearance sites (source sites for the server, the others for the clients); "
                            f"{PSEUDO_SITES_KEY} is {config.federation.partition.pseudo_sites}; allowed: 2 or more")
        split = sited_training(split, config, progress=progress)
    return server_client_split(split, config.data.client_fraction, config.data.split_seed,
                               scenario=config.federation.scenario, source_sites=config.federation.source_sites)
