"""Per-site evaluation pools: drawn like each site's Training images, loaded safely, and no change to the rest."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_kaggle_folder, read_metadata

from edgemri.core.data import synth
from edgemri.core.data.dataset import POOL_DIR, load_dataset, load_pools, pools_from_testing
from edgemri.core.data.images import CLASS_NAMES, DataError
from edgemri.core.data.partition import site_pools
from edgemri.core.data.synth.planning import plan_jobs, plan_pool_jobs
from edgemri.core.errors import EdgemriError
from edgemri.core.registries import parse_config

POOL_SIZE = 8  # images per site: 32 over the quickstart's 4 sites
LIMIT = 2  # Training/Testing images per class


def _jpgs(root: Path, *tops: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for top in tops for p in sorted((root / top).rglob("*.jpg"))}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pooled") / "data"
    return root, synth.generate(root, "quickstart", seed=5, workers=1, progress=False, limit=LIMIT,
                                pool_size=POOL_SIZE)


def test_presets_have_pools_of_hundreds() -> None:
    assert synth.PRESETS["quickstart"].pool_per_site == 300 and synth.PRESETS["kaggle"].pool_per_site == 400
    assert synth.POOL_DIR == POOL_DIR


def test_every_site_has_a_pool_of_the_requested_size_with_every_class(pooled: tuple[Path, dict]) -> None:
    root, summary = pooled
    sites = [s.name for s in synth.PRESETS["quickstart"].sites]
    assert sorted(p.name for p in (root / POOL_DIR).iterdir()) == sites
    for site in sites:
        counts = {label: len(list((root / POOL_DIR / site / label).glob("*.jpg"))) for label in CLASS_NAMES}
        assert sum(counts.values()) == POOL_SIZE and min(counts.values()) >= 1, (site, counts)
        assert summary["pools"][site] == counts
    assert summary["total"] == 2 * LIMIT * len(CLASS_NAMES) + POOL_SIZE * len(sites)


def test_metadata_lists_each_pool_image_at_its_folder_site(pooled: tuple[Path, dict]) -> None:
    root, _ = pooled
    rows = [r for r in read_metadata(root) if r["split"] == synth.POOL_SPLIT]
    assert sorted(r["file"] for r in rows) == sorted(_jpgs(root, POOL_DIR))
    for r in rows:
        top, site, label, _ = r["file"].split("/")
        assert (top, r["site"], r["label"]) == (POOL_DIR, site, label)


def test_pools_change_no_training_or_testing_image(pooled: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = pooled
    plain = tmp_path / "plain"
    synth.generate(plain, "quickstart", seed=5, workers=1, progress=False, limit=LIMIT, pools=False)
    assert not (plain / POOL_DIR).exists()
    assert _jpgs(plain, *synth.SPLITS) == _jpgs(root, *synth.SPLITS)
    kaggle_rows = [r for r in read_metadata(root) if r["split"] != synth.POOL_SPLIT]
    assert kaggle_rows == read_metadata(plain)
    assert load_dataset(root).train.files == load_dataset(plain).train.files


def test_pool_images_follow_their_site_class_mix_from_streams_of_their_own() -> None:
    preset = synth.PRESETS["kaggle"]
    train = [j for j in plan_jobs(preset, 0, Path("unused"), None) if j.split == "Training"]
    pool = plan_pool_jobs(preset, 0, Path("unused"), 400)
    assert not {j.seed_key for j in train} & {j.seed_key for j in pool}
    for site in preset.sites:
        mine = [j for j in pool if j.site == site]
        assert len(mine) == 400
        trained, pooled = (Counter(j.label for j in jobs if j.site == site) for jobs in (train, mine))
        shares = [np.array([c[label] for label in CLASS_NAMES]) / sum(c.values()) for c in (trained, pooled)]
        assert np.abs(shares[0] - shares[1]).max() < 0.06, (site.name, shares)


def test_load_pools_decodes_each_site_once_and_caches(pooled: tuple[Path, dict], user_cache: Path) -> None:
    root, _ = pooled
    pools = load_pools(root)
    assert list(pools) == [s.name for s in synth.PRESETS["quickstart"].sites]
    for site, pool in pools.items():
        assert len(pool) == POOL_SIZE and set(pool.sites) == {site}
        assert tuple(pool.images.shape[1:]) == (3, 128, 128) and pool.images.dtype == torch.uint8
        assert [CLASS_NAMES[k] for k in pool.labels.tolist()] == [f.split("/")[2] for f in pool.files]
    assert len(list(user_cache.rglob("pools-*.npz"))) == 1
    again = load_pools(root)
    assert all(again[s].files == pools[s].files and bool((again[s].images == pools[s].images).all()) for s in pools)
    dataset = load_dataset(root)
    assert not set(dataset.train.files + dataset.test.files) & {f for p in pools.values() for f in p.files}
    assert site_pools(dataset, parse_config({})).keys() == pools.keys()


def test_data_without_pools_uses_each_sites_share_of_testing(tiny_data: Path, sited_data: Path) -> None:
    assert load_pools(tiny_data) == {}
    assert pools_from_testing(load_dataset(tiny_data)) == {}
    dataset = load_dataset(sited_data)
    pools = site_pools(dataset, parse_config({}))
    assert list(pools) == ["site-a", "site-b"]
    assert sum(len(p) for p in pools.values()) == len(dataset.test)
    assert all(set(p.sites) == {site} for site, p in pools.items())


def _with_pool(tmp_path: Path) -> Path:
    root = make_kaggle_folder(tmp_path / "data", {"Training": 1, "Testing": 1})
    shutil.copytree(root / "Testing", root / POOL_DIR / "site-a")
    return root


@pytest.mark.parametrize(("damage", "message"), [
    (lambda pools: (pools / "site-a").rename(pools / "no site!"), "is not a site name"),
    (lambda pools: shutil.rmtree(pools / "site-a" / "glioma"), "missing class folder"),
    (lambda pools: (shutil.rmtree(pools), pools.write_text("x")), "is not a folder"),
    (lambda pools: [p.write_bytes(b"junk") for p in pools.rglob("*.jpg")], "no readable images"),
])
def test_unusable_pools_raise_one_line_errors(tmp_path: Path, damage, message: str) -> None:
    root = _with_pool(tmp_path)
    assert list(load_pools(root, tmp_path / "cache")) == ["site-a"]
    damage(root / POOL_DIR)
    with pytest.raises(DataError, match=message) as err:
        load_pools(root, tmp_path / "cache")
    assert isinstance(err.value, EdgemriError) and "\n" not in str(err.value)


@pytest.mark.parametrize("size", [-1, 2])
def test_a_pool_too_small_for_every_class_is_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(synth.SynthError, match="pool_size must be 0"):
        synth.generate(tmp_path / "x", "quickstart", progress=False, limit=1, pool_size=size)
    assert not (tmp_path / "x").exists()
    with pytest.raises(synth.SynthError, match="pool_per_site"):
        synth.SynthPreset("p", synth.PRESETS["quickstart"].train_counts, synth.PRESETS["quickstart"].test_counts, 2,
                          pool_per_site=size)
