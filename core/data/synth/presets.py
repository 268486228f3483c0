"""Presets: how many images of each class per split, from how many sites, and how hard."""

from __future__ import annotations

from dataclasses import dataclass

from edgemri.core.data.synth.scanner import SITE_PROFILES, SiteProfile
from edgemri.core.errors import EdgemriError

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
MAX_UNLABELED_PER_SITE = 10_000  # file names hold 4 digits; 6 sites stay far below data.MAX_UNLABELED_IMAGES


class SynthError(EdgemriError):
    """The generator was asked for something it cannot do; the message names the setting."""


def check_pool_size(size: int, name: str) -> None:
    """A pool holds every class at least once (so it can score every class), or is off (0)."""
    if size != 0 and size < len(CLASS_NAMES):
        raise SynthError(f"{name} must be 0 (no pools) or at least {len(CLASS_NAMES)} images per site (one of each "
                         f"class), got {size}")


def check_unlabeled_size(size: int, name: str) -> None:
    """Unlabeled images per site: 0 (none) to MAX_UNLABELED_PER_SITE."""
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_UNLABELED_PER_SITE):
        raise SynthError(f"{name} must be a whole number of images per site from 0 (none) to "
                         f"{MAX_UNLABELED_PER_SITE:,}, got {size!r}")


@dataclass(frozen=True)
class SynthPreset:
    """How many images of each class per split, from how many sites, and how hard."""

    name: str
    train_counts: dict[str, int]
    test_counts: dict[str, int]
    num_sites: int
    class_mix_concentration: float = 40.0  # Dirichlet concentration of each site's class mix; lower: more skew
    subtle_share: float = 0.16  # share of tumours that are small and/or low-contrast
    pool_per_site: int = 0  # images in each site's evaluation pool (``Pools/<site>/``); 0: no pools
    unlabeled_per_site: int = 0  # each site's unlabeled transfer images (``Unlabeled/<site>/``); 0: none
    description: str = ""
    site_names: tuple[str, ...] = ()  # the sites by name; empty: the first num_sites of SITE_PROFILES

    def __post_init__(self) -> None:
        if not 1 <= self.num_sites <= len(SITE_PROFILES):
            raise SynthError(f"num_sites must be in 1..{len(SITE_PROFILES)}, got {self.num_sites}")
        known = [p.name for p in SITE_PROFILES]
        if self.site_names and (len(self.site_names) != self.num_sites
                                or not set(self.site_names) <= set(known)):
            raise SynthError(f"site_names must name num_sites={self.num_sites} of {', '.join(known)}; "
                             f"got {self.site_names}")
        for counts in (self.train_counts, self.test_counts):
            if set(counts) != set(CLASS_NAMES) or min(counts.values()) < 0:
                raise SynthError(f"counts must give a non-negative number for each of {CLASS_NAMES}, got {counts}")
        check_pool_size(self.pool_per_site, "pool_per_site")
        check_unlabeled_size(self.unlabeled_per_site, "unlabeled_per_site")

    @property
    def sites(self) -> tuple[SiteProfile, ...]:
        if self.site_names:
            return tuple(next(p for p in SITE_PROFILES if p.name == name) for name in self.site_names)
        return SITE_PROFILES[: self.num_sites]

    def counts(self, split: str) -> dict[str, int]:
        return self.train_counts if split == "Training" else self.test_counts


# The Kaggle class proportions at 2,000 images.
QUICKSTART_TRAIN = {"glioma": 370, "meningioma": 375, "notumor": 447, "pituitary": 408}
QUICKSTART_TEST = {"glioma": 92, "meningioma": 93, "notumor": 124, "pituitary": 91}

PRESETS: dict[str, SynthPreset] = {
    "quickstart": SynthPreset(
        "quickstart",
        train_counts=QUICKSTART_TRAIN,
        test_counts=QUICKSTART_TEST,
        num_sites=4,
        pool_per_site=300,
        unlabeled_per_site=300,
        description="the Kaggle class proportions at 2,000 images from 4 sites: a CPU demo in minutes",
    ),
    "clinics": SynthPreset(
        "clinics",
        train_counts=QUICKSTART_TRAIN,
        test_counts=QUICKSTART_TEST,
        num_sites=4,
        pool_per_site=300,
        unlabeled_per_site=300,
        site_names=("clinic1", "clinic2", "site3", "site4"),
        description="quickstart's size, where two sites' protocols mix T2 and FLAIR into T1c (as the real set's "
                    "SARTAJ and Br35H do): the new-sites benchmark, distilling on the T1c-only sites",
    ),
    "kaggle": SynthPreset(
        "kaggle",
        train_counts={"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457},
        test_counts={"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
        num_sites=6,
        pool_per_site=400,
        unlabeled_per_site=500,
        description="the real set's class counts (7,023 images) from 6 sites",
    ),
}


def get_preset(name: str) -> SynthPreset:
    """The named preset, or SynthError listing the allowed names."""
    if name not in PRESETS:
        raise SynthError(f"unknown synthetic preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
