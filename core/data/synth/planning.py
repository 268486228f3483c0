"""Planning: which image is drawn at which site under which file name, before anything is drawn.

Each site gets its own class mix (a Dirichlet draw around the preset's class shares) and
every site gets every class; file names follow the Kaggle set (``Tr-gl_0000.jpg``).
Each site's evaluation pool (``Pools/<site>/<class>/Po-gl_0000.jpg``) is planned after the
Kaggle splits from seed keys of its own, so adding it changes no Training or Testing image.
Each site's unlabeled transfer images (``Unlabeled/<site>/Un_0000.jpg``) are planned likewise
from streams of their own; their classes are drawn in a shuffled order and recorded nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemri.core.data.synth.presets import CLASS_NAMES, SynthPreset
from edgemri.core.data.synth.scanner import SiteProfile

ABBREVIATIONS = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
SPLITS = ("Training", "Testing")
PREFIXES = {"Training": "Tr", "Testing": "Te"}
POOL_SPLIT = "Pool"  # the split column of pool rows in metadata.csv
POOL_DIR = "Pools"  # the data root's folder of per-site evaluation pools
_POOL_STREAM = 7003  # first seed-key entry of pool images: a stream no Training/Testing key uses
UNLABELED_SPLIT = "Unlabeled"  # the split of unlabeled jobs (never written to metadata.csv)
UNLABELED_DIR = "Unlabeled"  # the data root's folder of per-site unlabeled images (the distillation transfer set)
_UNLABELED_STREAM = 7004  # seed keys of unlabeled images
# Their classes: a stream of its own, as SeedSequence([a, b, c]) equals SeedSequence([a, b, c, 0]).
_UNLABELED_CLASS_STREAM = 7005


@dataclass(frozen=True)
class Job:
    """One image to draw: its seed key, split, class, site and where it goes."""

    seed_key: tuple[int, ...]
    split: str
    label: str
    site: SiteProfile
    path: Path
    rel: str


def class_mix(preset: SynthPreset, seed: int) -> np.ndarray:
    """Each site's class mix (sites x classes): a Dirichlet draw around the preset's class shares."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7001]))
    total = np.array([preset.train_counts[c] + preset.test_counts[c] for c in CLASS_NAMES], np.float64)
    prior = total / total.sum() if total.sum() else np.full(len(CLASS_NAMES), 1 / len(CLASS_NAMES))
    return rng.dirichlet(prior * preset.class_mix_concentration, size=preset.num_sites)


def _assign_sites(n: int, weights: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Site index of each of n images: one per site first (every site has every class), then by weight."""
    sites = len(weights)
    base = list(range(sites)) if n >= sites else []
    extra = rng.choice(sites, size=n - len(base), p=weights / weights.sum()).tolist()
    assigned = base + extra
    rng.shuffle(assigned)
    return assigned


def plan_jobs(preset: SynthPreset, seed: int, out_dir: Path, limit: int | None) -> list[Job]:
    """Every image of the preset in a fixed order; ``limit`` caps the images per class and split."""
    mix = class_mix(preset, seed)
    volume = np.array([s.volume for s in preset.sites])
    jobs = []
    for split_id, split in enumerate(SPLITS):
        for class_id, label in enumerate(CLASS_NAMES):
            n = preset.counts(split)[label]
            n = min(n, limit) if limit is not None else n
            # P(site | class) is proportional to the site's volume times its share of this class.
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7002, split_id, class_id]))
            sites = _assign_sites(n, volume * mix[:, class_id], rng)
            for index, site_id in enumerate(sites):
                name = f"{PREFIXES[split]}-{ABBREVIATIONS[label]}_{index:04d}.jpg"
                rel = f"{split}/{label}/{name}"
                jobs.append(Job((seed, split_id, class_id, index), split, label, preset.sites[site_id],
                                out_dir / rel, rel))
    return jobs


def site_class_shares(preset: SynthPreset, seed: int) -> np.ndarray:
    """Each site's expected Training class shares (sites x classes), as ``plan_jobs`` deals the images."""
    volume = np.array([s.volume for s in preset.sites])
    weights = volume[:, None] * class_mix(preset, seed)  # P(site | class) up to each class's total
    per_class = np.array([preset.train_counts[c] for c in CLASS_NAMES], np.float64)
    expected = per_class * weights / weights.sum(axis=0)
    totals = expected.sum(axis=1, keepdims=True)
    return np.divide(expected, totals, out=np.full_like(expected, 1 / len(CLASS_NAMES)), where=totals > 0)


def _pool_counts(shares: np.ndarray, size: int) -> list[int]:
    """``size`` images over the classes: one of each first, the rest by ``shares`` (largest remainder)."""
    rest = size - len(shares)
    quota = shares * rest
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota, kind="stable")[: rest - counts.sum()]] += 1
    return (counts + 1).tolist()


def plan_pool_jobs(preset: SynthPreset, seed: int, out_dir: Path, size: int) -> list[Job]:
    """``size`` images per site drawn like that site's Training images (its scanner and class shares)."""
    jobs = []
    for site_id, (site, shares) in enumerate(zip(preset.sites, site_class_shares(preset, seed), strict=True)):
        for class_id, (label, n) in enumerate(zip(CLASS_NAMES, _pool_counts(shares, size), strict=True)):
            for index in range(n):
                rel = f"{POOL_DIR}/{site.name}/{label}/Po-{ABBREVIATIONS[label]}_{index:04d}.jpg"
                jobs.append(Job((seed, _POOL_STREAM, site_id, class_id, index), POOL_SPLIT, label, site,
                                out_dir / rel, rel))
    return jobs


def plan_unlabeled_jobs(preset: SynthPreset, seed: int, out_dir: Path, size: int) -> list[Job]:
    """``size`` images per site drawn like that site's Training images, each of a class drawn from the site's
    class shares; the file name is the image's index alone, so neither it nor the order gives the class away."""
    jobs = []
    for site_id, (site, shares) in enumerate(zip(preset.sites, site_class_shares(preset, seed), strict=True)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _UNLABELED_CLASS_STREAM, site_id]))
        for index, class_id in enumerate(rng.choice(len(CLASS_NAMES), size=size, p=shares).tolist()):
            rel = f"{UNLABELED_DIR}/{site.name}/Un_{index:04d}.jpg"
            jobs.append(Job((seed, _UNLABELED_STREAM, site_id, index), UNLABELED_SPLIT, CLASS_NAMES[class_id], site,
                            out_dir / rel, rel))
    return jobs
