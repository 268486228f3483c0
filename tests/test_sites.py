"""Appearance sites: clustering finds the synthetic set's scanner sites without reading its labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemri.core import synth
from edgemri.core.config import Config, parse_config
from edgemri.core.data import ArraySplit, DataError, load_dataset
from edgemri.core.partition import partition
from edgemri.core.sites import FEATURE_NAMES, MAX_SITES, appearance_features, cluster_sites

LIMIT = 24  # images per class and split: 96 Training images over 4 sites, about 2 s to draw
# Measured 0.62-0.76 over generator seeds 0-3; random buckets of 4 reach at most 0.47 on 96 images.
MIN_PURITY = 0.55


def _purity(true: list[str], predicted: list[str]) -> float:
    """Share of images whose cluster's most common true site is their own."""
    members: dict[str, list[str]] = {}
    for site, cluster in zip(true, predicted, strict=True):
        members.setdefault(cluster, []).append(site)
    return sum(Counter(sites).most_common(1)[0][1] for sites in members.values()) / len(true)


def _unsited(split: ArraySplit) -> ArraySplit:
    return ArraySplit(split.images, split.labels, split.files)


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory: pytest.TempPathFactory) -> ArraySplit:
    """A small quickstart set's Training split, with the generator's true sites."""
    root = tmp_path_factory.mktemp("sites") / "data"
    synth.generate(root, "quickstart", seed=0, workers=1, progress=False, limit=LIMIT)
    return load_dataset(root, workers=1).train


def test_clusters_recover_the_synthetic_sites_far_better_than_random_buckets(synthetic_train: ArraySplit) -> None:
    true = synthetic_train.sites
    count = len(set(true))
    assert count == 4
    predicted = cluster_sites(_unsited(synthetic_train), count, seed=0)
    assert set(predicted) == {f"appearance-site-{k}" for k in range(count)}
    random_buckets = [f"b{b}" for b in np.random.default_rng(0).integers(0, count, len(true))]
    assert _purity(true, random_buckets) < MIN_PURITY < _purity(true, predicted)


def test_features_are_standardized_and_deterministic(synthetic_train: ArraySplit) -> None:
    features = appearance_features(_unsited(synthetic_train))
    assert features.shape == (len(synthetic_train), len(FEATURE_NAMES))
    assert np.array_equal(features, appearance_features(synthetic_train))
    varying = features.std(axis=0) > 0
    assert np.allclose(features[:, varying].mean(axis=0), 0, atol=1e-9)
    assert np.allclose(features[:, varying].std(axis=0), 1)
    # Grey slices saved as RGB: the colour feature is constant, so standardized to 0, not NaN.
    assert not np.isnan(features).any() and not features[:, FEATURE_NAMES.index("colour")].any()


def test_clustering_is_seeded_and_names_rank_by_size(synthetic_train: ArraySplit) -> None:
    split = _unsited(synthetic_train)
    first = cluster_sites(split, 3, seed=5)
    assert cluster_sites(split, 3, seed=5) == first
    sizes = Counter(first)
    assert [sizes[f"appearance-site-{k}"] for k in range(3)] == sorted(sizes.values(), reverse=True)


def test_duplicate_images_cluster_together_and_bound_the_count(synthetic_train: ArraySplit) -> None:
    picks = [0, 1, 2] * 4
    duplicated = _unsited(synthetic_train).subset(picks)
    sites = cluster_sites(duplicated, 3, seed=0)
    assert len(set(sites)) == 3
    assert all(sites[k] == sites[k % 3] for k in range(len(picks)))
    with pytest.raises(DataError, match="only 3 distinct appearance"):
        cluster_sites(duplicated, 4, seed=0)


@pytest.mark.parametrize("count", [0, -1, MAX_SITES + 1, 97, True, 2.5, "3", None])
def test_bad_counts_name_the_setting_and_the_allowed_range(synthetic_train: ArraySplit, count: object) -> None:
    with pytest.raises(DataError, match=r"^my\.sites is .*; allowed: an integer from 1 to 50 ") as err:
        cluster_sites(_unsited(synthetic_train), count, seed=0, setting="my.sites")  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_the_count_is_at_most_one_site_per_image(synthetic_train: ArraySplit) -> None:
    few = _unsited(synthetic_train).subset([0, 1, 2])
    with pytest.raises(DataError, match="allowed: an integer from 1 to 3 "):
        cluster_sites(few, 4, seed=0)
    empty = ArraySplit(torch.empty(0, 3, 128, 128, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [])
    with pytest.raises(DataError, match="no images"):
        cluster_sites(empty, 1, seed=0)
    with pytest.raises(DataError, match="seed must be an integer >= 0"):
        cluster_sites(few, 1, seed=-1)


def _config(pseudo_sites: int) -> Config:
    return parse_config({"data": {"client_fraction": 0.0}, "federation": {
        "partition": {"pseudo_sites": pseudo_sites},
        "tiers": {"hospital": {"min_examples": 8}, "phone": {"per_site": 1, "min_examples": 4, "max_examples": 6}}}})


def test_partition_of_data_without_metadata_uses_appearance_sites(tiny_data: Path) -> None:
    config = _config(2)
    train = load_dataset(tiny_data).train
    assert not train.sites
    manifests = partition(train, tiny_data, config)
    assert {m.site for m in manifests} == {"appearance-site-0", "appearance-site-1"}
    assert sorted(m.client for m in manifests) == ["hospital-appearance-site-0", "hospital-appearance-site-1",
                                                   "phone-appearance-site-0-0", "phone-appearance-site-1-0"]
    assert [m.to_dict() for m in partition(train, tiny_data, config)] == [m.to_dict() for m in manifests]
    with pytest.raises(DataError, match="federation.partition.pseudo_sites is 60; allowed"):
        partition(train, tiny_data, _config(60))
