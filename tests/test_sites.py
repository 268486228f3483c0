"""Appearance sites: clustering finds the synthetic set's scanner sites without reading its labels."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemri.core.config import Config, ConfigError
from edgemri.core.data import synth
from edgemri.core.data.dataset import ArraySplit, load_dataset
from edgemri.core.data.images import DataError
from edgemri.core.data.partition import partition, site_pools
from edgemri.core.data.sites import FEATURE_NAMES, MAX_SITES, appearance_features, cluster_sites, fit_sites
from edgemri.core.data.splits import scenario_split, sited_dataset, sited_training
from edgemri.core.registries import parse_config
from edgemri.core.training.distill import Distiller

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
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small quickstart set, with the generator's true sites in its metadata.csv."""
    root = tmp_path_factory.mktemp("sites") / "data"
    synth.generate(root, "quickstart", seed=0, workers=1, progress=False, limit=LIMIT)
    return root


@pytest.fixture(scope="module")
def synthetic_train(synthetic_root: Path) -> ArraySplit:
    return load_dataset(synthetic_root, workers=1).train


@pytest.fixture(scope="module")
def unlabelled_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images without metadata.csv: a folder like the real Kaggle set."""
    root = tmp_path_factory.mktemp("unlabelled") / "data"
    for split in ("Training", "Testing"):
        shutil.copytree(synthetic_root / split, root / split)
    return root


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


@pytest.mark.parametrize("count", [0, -1, MAX_SITES + 1, 97, True, 2.5, "3"])
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
    # The sites are Training's as a whole (clustered once), whatever share the clients hold.
    sites = dict(zip(train.files, sited_training(train, config).sites, strict=True))
    assert all(sites[f.path] == m.site for m in manifests for f in m.files)
    assert _config(MAX_SITES).federation.partition.pseudo_sites == MAX_SITES
    with pytest.raises(ConfigError, match=f"pseudo_sites' has value {MAX_SITES + 1}; allowed: an integer in "
                                          f"\\[1, {MAX_SITES}\\]"):
        _config(MAX_SITES + 1)


def test_testing_images_go_to_the_nearest_site_of_the_training_fit(synthetic_root: Path) -> None:
    labelled = load_dataset(synthetic_root, workers=1)
    train, test = _unsited(labelled.train), _unsited(labelled.test)
    sites, model = fit_sites(train, 4, seed=0)
    assert model.assign(train) == sites and set(model.names) == set(sites)
    assigned = model.assign(test)
    # Standardized by Training's statistics, not its own: one image alone goes where it goes in the batch.
    assert [model.assign(test.subset([k]))[0] for k in range(0, len(test), 9)] == assigned[::9]
    assert _purity(labelled.test.sites, assigned) > MIN_PURITY


NEW_SITES = {"seed": 0, "data": {"split_seed": 3}, "federation": {
    "scenario": "new-sites", "partition": {"pseudo_sites": 4},
    "tiers": {"hospital": {"min_examples": 2, "test_fraction": 0.25},  # the smallest site holds 5 scans
              "phone": {"per_site": 1, "min_examples": 1, "max_examples": 2}}}}


def test_new_sites_on_data_without_metadata_keeps_clients_at_unseen_appearance_sites(
        unlabelled_root: Path, tmp_path: Path) -> None:
    config = parse_config(NEW_SITES)
    dataset = load_dataset(unlabelled_root, workers=1)
    assert not dataset.train.sites and not dataset.test.sites
    sited = sited_dataset(dataset, config)
    names = {f"appearance-site-{k}" for k in range(4)}
    assert set(sited.train.sites) == names and set(sited.test.sites) <= names
    assert sited.train.sites == sited_training(dataset.train, config).sites
    site_of = dict(zip(sited.train.files, sited.train.sites, strict=True))
    # The server distills at some appearance sites; every client is at another, holding none of its images.
    distiller = Distiller(config, dataset, 0, tmp_path, resume=False, progress=False)
    distilled = set(distiller.train_split.files + distiller.val_split.files)
    source = {site_of[f] for f in distilled}
    server, clients = scenario_split(dataset.train, config)
    assert distilled == {dataset.train.files[i] for i in server.tolist()} and len(source) == 2
    manifests = partition(dataset.train, unlabelled_root, config)
    client_sites = {m.site for m in manifests}
    assert client_sites == names - source
    held = [f.path for m in manifests for f in m.files]
    assert not distilled & set(held) and sorted(held) == sorted(dataset.train.files[i] for i in clients.tolist())
    # Testing's share of each site is that site's evaluation pool, the clients' sites included.
    pools = site_pools(dataset, config)
    assert client_sites <= set(pools) and sum(len(p) for p in pools.values()) == len(dataset.test)
    assert all(set(pool.sites) == {site} for site, pool in pools.items())
    # A second load (from the decoded cache) finds the very same sites.
    again = sited_dataset(load_dataset(unlabelled_root, workers=1), config)
    assert (again.train.sites, again.test.sites) == (sited.train.sites, sited.test.sites)


def test_new_sites_needs_two_appearance_sites_and_seen_sites_ignores_them(unlabelled_root: Path) -> None:
    dataset = load_dataset(unlabelled_root, workers=1)
    one_site = parse_config({**NEW_SITES, "federation": {**NEW_SITES["federation"], "partition": {"pseudo_sites": 1}}})
    with pytest.raises(DataError, match="needs at least 2 appearance sites .*pseudo_sites is 1; allowed: 2 or more"):
        scenario_split(dataset.train, one_site)
    # seen-sites splits such data by class alone, so the distillation share is as it was without clustering.
    seen = parse_config({"data": {"client_fraction": 0.5}})
    unclustered = ArraySplit(dataset.train.images, dataset.train.labels, dataset.train.files)
    assert all(a.equal(b) for a, b in zip(scenario_split(dataset.train, seen), scenario_split(unclustered, seen),
                                           strict=True))
    labelled = replace(dataset, train=ArraySplit(unclustered.images, unclustered.labels, unclustered.files,
                                                 ["site-a"] * len(unclustered)))
    assert sited_dataset(labelled, seen) is labelled  # metadata.csv's sites are kept


def test_pools_leave_out_every_testing_copy_of_a_training_scan(unlabelled_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(unlabelled_root, root)
    original = sorted((root / "Training" / "glioma").glob("*.jpg"))[0]
    shutil.copy(original, root / "Testing" / "glioma" / "copy-of-a-training-scan.jpg")
    config = parse_config(NEW_SITES)
    dataset = load_dataset(root, workers=1)
    pools = site_pools(dataset, config)
    pooled = {f for pool in pools.values() for f in pool.files}
    assert "Testing/glioma/copy-of-a-training-scan.jpg" not in pooled
    assert len(pooled) == len(dataset.test) - 1  # the synthetic Testing has no other copy
    # A dataset already sited gives the same pools and is not clustered again.
    sited = sited_dataset(dataset, config)
    monkeypatch.setattr("edgemri.core.data.sites.fit_sites", lambda *a, **k: pytest.fail("clustered again"))
    assert {site: pool.files for site, pool in site_pools(sited, config).items()} == \
        {site: pool.files for site, pool in pools.items()}
    monkeypatch.undo()
    # Every client at a site lists that site's pool in its manifest, and trains on none of it.
    for manifest in partition(dataset.train, root, config, pools=pools):
        listed = [f.path for f in manifest.files if f.split == "pool"]
        assert listed == pools[manifest.site].files
        assert not set(listed) & {f.path for f in manifest.files if f.split != "pool"}


def test_the_sites_command_writes_the_label_mix_and_the_example_grid(unlabelled_root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edgemri.main import main

    config = tmp_path / "sites.yaml"
    config.write_text("federation: {partition: {pseudo_sites: null}}\n")
    assert main(["data", "sites", "--config", str(config), "--data-root", str(unlabelled_root),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "sites.json").read_text())
    assert report["count"] == int(max(report["silhouettes"], key=report["silhouettes"].get))
    assert all(all(mix["training"].values()) for mix in report["sites"].values())  # every site keeps every class
    assert (tmp_path / "out" / "sites.png").stat().st_size > 10_000
    assert "silhouette" in capsys.readouterr().out
