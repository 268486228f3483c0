"""Scanner sites from image appearance, for data without site labels (the real Kaggle set).

The real set pools three source collections (figshare, SARTAJ, Br35H) that differ in image
size, intensity histogram and JPEG handling. What of that survives the 128 px decode is the
background (noise floor, zero padding, noise texture), the brain's intensity distribution, the
scalp's brightness and the sharpness of the slice: ``appearance_features`` measures those per
image. On the real set collection and label are confounded (every notumor scan is Br35H's), so
clusters of the raw features are mostly label groups, and a site without a class measures a
missing class, not a new scanner. ``fit_sites`` therefore clusters each image's appearance
*relative to its class* (features standardized within the class), by seeded k-means++, so that
every site keeps every class while its scans differ in how they look; it keeps the centres and
the class statistics so that other images (Testing) go to their nearest site. Without a count,
the number of sites is the one with the highest silhouette among ``SITE_COUNT_CANDIDATES``.
Flower-free; numpy, and scikit-learn's KMeans and silhouette score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES, DataError
from edgemri.core.progress import ProgressBar

MAX_SITES = 50  # more clusters than this are no longer sites but noise in the features
SITE_PREFIX = "appearance-site-"
# Grey levels (0-255) that split an image: at or below _ZERO is padding that carries no noise,
# at or below _DARK is background, below _FOREGROUND is background plus its noise floor.
_ZERO, _DARK, _FOREGROUND = 2, 8, 24
_HISTOGRAM_BINS = 4  # coarse: finer bins of the bright tail follow tumours (the label), not the scanner
_BORDER_PX = 4
_SCALP_PX, _BRAIN_PX = 3, 6  # erosions of the foreground: its outer ring, and the brain well inside it
_CHUNK = 128  # images per vectorised step: bounds the temporary float arrays to tens of MB
_RESTARTS = 10
_MAX_ITERATIONS = 100
SITE_COUNT_CANDIDATES = range(2, 7)  # the automatic count: more sites than this split the real set into noise
_SILHOUETTE_SAMPLE = 3000  # images the silhouette is scored on (seeded): its cost grows with the square
FEATURE_NAMES: tuple[str, ...] = (
    "dark_fraction", "zero_fraction", "background_level", "background_noise", "background_texture",
    "border_level", *(f"foreground_histogram_{k}" for k in range(_HISTOGRAM_BINS)), "brain_median",
    "scalp_ratio", "colour", "sharpness",
)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (values * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)


def _masked_std(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mean = _masked_mean(values, mask)
    return np.sqrt(np.maximum(_masked_mean(values * values, mask) - mean**2, 0))


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion of (N, H, W) masks by a 4-neighbour cross, ``steps`` times."""
    for _ in range(steps):
        padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        mask = (padded[:, 1:-1, 1:-1] & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
                & padded[:, 1:-1, 2:])
    return mask


def _histograms(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 256) counts of each image's grey levels under its mask."""
    n = len(grey)
    index = (grey.astype(np.int64) + 256 * np.arange(n)[:, None, None])[mask]
    return np.bincount(index, minlength=256 * n).reshape(n, 256)


def _median(histograms: np.ndarray) -> np.ndarray:
    cumulative = np.cumsum(histograms, axis=1)
    return (cumulative < 0.5 * cumulative[:, -1:]).sum(axis=1).astype(np.float64)


def _lag_correlation(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Correlation of horizontally and of vertically adjacent pixels both under the mask, averaged."""
    pairs = ((grey[:, :, :-1], grey[:, :, 1:], mask[:, :, :-1] & mask[:, :, 1:]),
             (grey[:, :-1, :], grey[:, 1:, :], mask[:, :-1, :] & mask[:, 1:, :]))
    correlations = []
    for a, b, both in pairs:
        a_centred = a - _masked_mean(a, both)[:, None, None]
        b_centred = b - _masked_mean(b, both)[:, None, None]
        spread = _masked_std(a, both) * _masked_std(b, both)
        covariance = _masked_mean(a_centred * b_centred, both)
        correlations.append(np.divide(covariance, spread, out=np.zeros_like(covariance), where=spread > 1e-6))
    return (correlations[0] + correlations[1]) / 2


def _chunk_features(images: np.ndarray) -> np.ndarray:
    """Raw features (N, len(FEATURE_NAMES)) of uint8 (N, 3, H, W) images."""
    rgb = images.astype(np.int16)
    grey_levels = rgb.sum(axis=1) // 3
    grey = grey_levels.astype(np.float32)
    background = grey_levels < _FOREGROUND
    foreground = ~background
    scalp_inner = _erode(foreground, _SCALP_PX)
    brain = _erode(scalp_inner, _BRAIN_PX - _SCALP_PX)
    frame = np.ones(grey.shape[1:], bool)
    frame[_BORDER_PX:-_BORDER_PX, _BORDER_PX:-_BORDER_PX] = False

    counts = _histograms(grey_levels, foreground)[:, _FOREGROUND:]
    edges = np.linspace(0, counts.shape[1], _HISTOGRAM_BINS + 1).round().astype(int)
    shares = np.add.reduceat(counts, edges[:-1], axis=1) / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    brain_histograms = _histograms(grey_levels, brain)
    # A slice with too little tissue for the eroded brain mask falls back to its whole foreground.
    empty = brain_histograms.sum(axis=1) == 0
    brain_histograms[empty] = _histograms(grey_levels[empty], foreground[empty])
    brain_median = np.maximum(_median(brain_histograms), 1.0)
    steps = np.abs(grey[:, :, 1:] - grey[:, :, :-1])
    return np.column_stack([
        (grey_levels <= _DARK).mean(axis=(1, 2)),
        (grey_levels <= _ZERO).mean(axis=(1, 2)),
        _masked_mean(grey, background),
        _masked_std(grey, background),
        _lag_correlation(grey, background),
        grey[:, frame].mean(axis=1),
        shares,
        brain_median,
        _masked_mean(grey, foreground & ~scalp_inner) / brain_median,
        (np.abs(rgb[:, 0] - rgb[:, 1]) + np.abs(rgb[:, 2] - rgb[:, 1])).mean(axis=(1, 2)),
        _masked_mean(steps, brain[:, :, 1:] & brain[:, :, :-1]) / brain_median,
    ])


def _raw_features(split: ArraySplit, bar: ProgressBar | None = None) -> np.ndarray:
    """Each image's features, measured a chunk at a time (``bar`` moves on by each chunk's images)."""
    images = split.images.numpy()
    if len(images) == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    chunks = []
    for start in range(0, len(images), _CHUNK):
        chunks.append(_chunk_features(images[start:start + _CHUNK]))
        if bar is not None:
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)


def _standardization(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's mean and scale (its standard deviation; 1 for a constant feature, which becomes 0)."""
    spread = raw.std(axis=0)
    return raw.mean(axis=0), np.where(spread > 1e-12, spread, 1.0)


def _class_standardization(raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class (rows: class index), the mean and scale of its images' raw features; a class without
    images gets mean 0 and scale 1 (it has nothing to standardize)."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    means, scales = np.zeros((classes, raw.shape[1])), np.ones((classes, raw.shape[1]))
    for c in range(classes):
        if (labels == c).any():
            means[c], scales[c] = _standardization(raw[labels == c])
    return means, scales


def _within_class(raw: np.ndarray, labels: np.ndarray, means: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Each image's features in its own class's standardized units: how it looks against its class."""
    if len(labels) and int(labels.max()) >= len(means):
        raise DataError(f"class index {int(labels.max())} has no appearance statistics: the sites were fitted "
                        f"on images without that class")
    return (raw - means[labels]) / scales[labels]


def appearance_features(split: ArraySplit) -> np.ndarray:
    """Per-image appearance features (N, len(FEATURE_NAMES)), each standardized to mean 0 and
    standard deviation 1 over the split (a constant feature is 0): deterministic, from the
    decoded images alone.
    """
    raw = _raw_features(split)
    if len(raw) == 0:
        return raw
    mean, scale = _standardization(raw)
    return (raw - mean) / scale


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.maximum((points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None, :], 0)


def _kmeans(points: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of scikit-learn's k-means++ KMeans, the lowest inertia of _RESTARTS seeded runs, each run
    to convergence (tol 0: until no label moves)."""
    # Imported here: scikit-learn (and SciPy) would otherwise load in every device's ClientApp process, which
    # imports this module through the config's registries but never clusters.
    from sklearn.cluster import KMeans

    fitted = KMeans(count, init="k-means++", n_init=_RESTARTS, max_iter=_MAX_ITERATIONS, tol=0.0,
                    random_state=seed).fit(points)
    return fitted.labels_, fitted.cluster_centers_


def _ranked_names(labels: np.ndarray) -> dict[int, str]:
    """Cluster k becomes appearance-site-<rank>, ranked by size (largest first), ties by first member,
    so the same grouping gets the same names whatever labels k-means gave it."""
    clusters = np.unique(labels)
    sizes = np.array([(labels == k).sum() for k in clusters])
    first = np.array([int(np.argmax(labels == k)) for k in clusters])
    return {int(clusters[i]): f"{SITE_PREFIX}{r}" for r, i in enumerate(np.lexsort((first, -sizes)))}


@dataclass(frozen=True, eq=False)
class SiteModel:
    """Appearance sites fitted on one split: their centres in within-class standardized feature units."""

    names: tuple[str, ...]  # the site of each centre
    centres: np.ndarray  # (sites, len(FEATURE_NAMES))
    means: np.ndarray  # (classes, len(FEATURE_NAMES)): the fitting split's raw feature means and scales per class
    scales: np.ndarray
    silhouettes: dict[int, float]  # the automatic count's evidence: candidate count -> silhouette ({} when given)

    def assign(self, split: ArraySplit) -> list[str]:
        """Each image's nearest site, its features standardized as the fitting split's images of its class were."""
        if len(split) == 0:
            return []
        points = _within_class(_raw_features(split), split.labels.numpy(), self.means, self.scales)
        return [self.names[k] for k in _squared_distances(points, self.centres).argmin(axis=1)]


def _missing_classes(labels: np.ndarray, sites: np.ndarray) -> list[tuple[int, list[int]]]:
    """(site, the classes of the split it holds no image of) for each site that lacks one."""
    classes = np.unique(labels)
    return [(int(k), [int(c) for c in classes if not ((sites == k) & (labels == c)).any()])
            for k in np.unique(sites) if not np.isin(classes, labels[sites == k]).all()]


def _silhouette(points: np.ndarray, sites: np.ndarray, seed: int) -> float:
    # Imported here: scikit-learn (and SciPy) would otherwise load in every device's ClientApp process, which
    # imports this module through the config's registries but never clusters.
    from sklearn.metrics import silhouette_score

    sample = min(len(points), _SILHOUETTE_SAMPLE)
    return float(silhouette_score(points, sites, sample_size=sample, random_state=seed))


def _choose_count(points: np.ndarray, labels: np.ndarray, distinct: int, seed: int,
                  setting: str) -> tuple[int, dict[int, float]]:
    """The candidate count with the highest silhouette among those whose sites all keep every class."""
    scores: dict[int, float] = {}
    for count in (k for k in SITE_COUNT_CANDIDATES if k <= min(distinct, len(points) - 1)):
        sites, _ = _kmeans(points, count, seed)
        if not _missing_classes(labels, sites):
            scores[count] = _silhouette(points, sites, seed)
    if not scores:
        raise DataError(f"{setting} is null (automatic) but no count from {SITE_COUNT_CANDIDATES.start} to "
                        f"{SITE_COUNT_CANDIDATES.stop - 1} gives sites that each keep every class of the "
                        f"{len(points)} images; set {setting} to 1")
    return max(scores, key=lambda k: (scores[k], -k)), scores  # ties: the fewer sites


def fit_sites(split: ArraySplit, count: int | None, seed: int, *, setting: str = "count",
              progress: bool = False) -> tuple[list[str], SiteModel]:
    """Each image's site, ``appearance-site-0`` (the largest) to ``appearance-site-<count - 1>``, and the
    model that puts other images at those sites: seeded k-means++ (several restarts, the lowest inertia
    kept) over the features standardized within each class. ``count`` None: the candidate count with the
    highest silhouette whose sites each keep every class (the scores are kept in the model).

    ``setting`` names the count in errors (e.g. the config key it came from). Raises DataError when
    ``count`` is not 1 to min(MAX_SITES, images), exceeds the number of distinct appearances, or makes a
    site that lacks a class. ``progress``: a bar over the images measured; it ends when the clustering does.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"the site-clustering seed must be an integer >= 0, got {seed!r}")
    if len(split) == 0:
        raise DataError("there are no images to cluster into sites")
    allowed = min(MAX_SITES, len(split))
    if count is not None and (isinstance(count, bool) or not isinstance(count, int | np.integer)
                              or not 1 <= count <= allowed):
        raise DataError(f"{setting} is {count!r}; allowed: an integer from 1 to {allowed} (at most {MAX_SITES} "
                        f"sites and at most one per image; there are {len(split)} images), or null (automatic)")
    with ProgressBar("appearance sites", len(split), enabled=progress, unit="images") as bar:
        return _fit_sites(split, count, seed, setting, bar)


def _fit_sites(split: ArraySplit, count: int | None, seed: int, setting: str,
               bar: ProgressBar) -> tuple[list[str], SiteModel]:
    """``fit_sites`` once its arguments are checked."""
    labels = split.labels.numpy()
    raw = _raw_features(split, bar)
    means, scales = _class_standardization(raw, labels)
    points = _within_class(raw, labels, means, scales)
    distinct = len(np.unique(points, axis=0))
    silhouettes: dict[int, float] = {}
    if count is None:
        count, silhouettes = _choose_count(points, labels, distinct, seed, setting)
    if count > distinct:
        raise DataError(f"{setting} is {count} but the {len(split)} images have only {distinct} distinct "
                        f"appearance(s); allowed: 1 to {distinct}")
    clusters, centres = _kmeans(points, int(count), seed)
    names = _ranked_names(clusters)
    if lacking := _missing_classes(labels, clusters):
        site, classes = lacking[0]
        raise DataError(f"{setting} is {count}, but appearance site {names[site]!r} would hold no "
                        f"{'/'.join(CLASS_NAMES[c] for c in classes)} scan: a site without a class measures the "
                        f"missing class, not the scanner; choose fewer sites or null (automatic)")
    # A centre left without members (a tie among duplicate images) is no site: Testing never goes there.
    kept = sorted(names)
    model = SiteModel(tuple(names[k] for k in kept), centres[kept], means, scales, silhouettes)
    return [names[int(k)] for k in clusters], model


def cluster_sites(split: ArraySplit, count: int | None, seed: int, *, setting: str = "count",
                  progress: bool = False) -> list[str]:
    """Each image's site as ``fit_sites`` finds it (without the model)."""
    return fit_sites(split, count, seed, setting=setting, progress=progress)[0]


def _sited(split: ArraySplit, sites: list[str]) -> ArraySplit:
    return ArraySplit(split.images, split.labels, split.files, sites)


def with_appearance_sites(dataset: Dataset, count: int | None, seed: int, *, setting: str = "count",
                          progress: bool = False) -> Dataset:
    """``dataset`` as it is when Training has sites (metadata.csv's); else with ``count`` appearance sites
    fitted on Training (``fit_sites``) and each Testing image at its nearest one, so Testing's per-site
    shares are evaluation pools of the very sites the clients are at. Raises DataError as ``fit_sites``.
    """
    if dataset.train.sites:
        return dataset
    return with_sites(dataset, *fit_sites(dataset.train, count, seed, setting=setting, progress=progress))


def with_sites(dataset: Dataset, sites: list[str], model: SiteModel) -> Dataset:
    """``dataset`` with Training at ``sites`` and each Testing image at its nearest site under ``model``, both
    from ``fit_sites`` on that Training (one clustering for a caller that also needs the model)."""
    return replace(dataset, train=_sited(dataset.train, sites), test=_sited(dataset.test, model.assign(dataset.test)))
