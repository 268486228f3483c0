"""The synthetic generator writes the Kaggle layout, deterministically, with honest metadata."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metadata
from PIL import Image

from edgemri.core.data import synth
from edgemri.core.data.dataset import UNKNOWN_LABEL, UNLABELED_DIR, ArraySplit, is_synthetic, load_unlabeled
from edgemri.core.data.splits import pick_source_sites

LIMIT = 8  # images per class and split: 64 in all, a couple of seconds


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.generate(root, "kaggle", seed=3, workers=1, progress=False, limit=LIMIT)
    return root, summary


def test_kaggle_layout_and_file_names(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    for split, prefix in (("Training", "Tr"), ("Testing", "Te")):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(synth.CLASS_NAMES)
        for label in synth.CLASS_NAMES:
            names = sorted(p.name for p in (root / split / label).iterdir())
            abbr = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}[label]
            assert names == [f"{prefix}-{abbr}_{i:04d}.jpg" for i in range(LIMIT)]
    assert summary["total"] == 2 * len(synth.CLASS_NAMES) * LIMIT
    assert summary["counts"]["Testing"] == dict.fromkeys(synth.CLASS_NAMES, LIMIT)
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "temp files left behind"


def test_images_are_grey_rgb_jpegs_of_varied_size(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    sizes = set()
    for rel in _files(root):
        with Image.open(root / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            pixels = np.asarray(im)
            sizes.add(im.size)
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
        assert pixels.std() > 10, f"{rel} is nearly blank"
        assert min(im.size) >= 190 and max(im.size) <= 520
    assert len(sizes) >= 4
    assert any(w != h for w, h in sizes), "some sites write non-square images"


def test_metadata_has_one_valid_row_per_file(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    rows = read_metadata(root)
    assert set(synth.METADATA_COLUMNS) <= set(rows[0])
    assert sorted(r["file"] for r in rows) == _files(root)
    info = json.loads((root / "synth.json").read_text())
    sites = {s["name"] for s in info["sites"]}
    assert len(sites) == synth.PRESETS["kaggle"].num_sites and info["seed"] == 3
    assert is_synthetic(root)  # what the reports read to draw scans unasked
    for r in rows:
        split, label, name = r["file"].split("/")
        assert (r["split"], r["label"]) == (split, label)
        assert r["site"] in sites and r["view"] in synth.VIEWS and r["sequence"] in synth.SEQUENCES
        with Image.open(root / r["file"]) as im:
            assert im.size == (int(r["width"]), int(r["height"]))
        if label == "notumor":
            assert float(r["tumour_size"]) == 0 and r["subtle"] == "no"
        else:
            assert float(r["tumour_size"]) > 0 and r["subtle"] in ("yes", "no")


def test_same_seed_same_bytes_whatever_the_workers(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    again = tmp_path / "again"
    synth.generate(again, "kaggle", seed=3, workers=2, progress=False, limit=LIMIT)
    assert _files(again) == _files(root)
    for rel in [*_files(root), "metadata.csv"]:
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_other_seed_other_images(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    other = tmp_path / "other"
    synth.generate(other, "kaggle", seed=4, workers=1, progress=False, limit=2)
    for rel in _files(other):
        assert (other / rel).read_bytes() != (root / rel).read_bytes(), rel


def test_unknown_preset_names_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(synth.SynthError, match="kaggle.*quickstart"):
        synth.generate(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()


def test_non_empty_out_dir_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(synth.SynthError, match="overwrite"):
        synth.generate(out, "quickstart", progress=False, limit=1)
    stale = out / "Training" / "glioma" / "Tr-gl_0099.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    synth.generate(out, "quickstart", workers=1, progress=False, limit=1, overwrite=True)
    assert not stale.exists() and (out / "keep.txt").read_text() == "mine"
    assert len(_files(out)) == 8


def test_presets_match_the_brief() -> None:
    kaggle, quick = synth.PRESETS["kaggle"], synth.PRESETS["quickstart"]
    assert kaggle.train_counts == {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457}
    assert kaggle.test_counts == {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300}
    assert kaggle.num_sites in (5, 6) and quick.num_sites == 4
    assert sum(quick.train_counts.values()) == 1600 and sum(quick.test_counts.values()) == 400


@pytest.mark.parametrize("name", sorted(synth.PRESETS))
def test_every_site_has_every_class_with_its_own_mix(name: str) -> None:
    preset = synth.PRESETS[name]
    jobs = synth.planning.plan_jobs(preset, 0, Path("unused"), None)
    for split in synth.SPLITS:
        mix = {(j.site.name, j.label) for j in jobs if j.split == split}
        assert len(mix) == preset.num_sites * len(synth.CLASS_NAMES)
    shares = synth.planning.class_mix(preset, 0)
    assert not np.allclose(shares, shares[0]), "sites differ in class mix"
    assert re.fullmatch(r"(site|clinic)\d", jobs[0].site.name)


def test_the_clinics_preset_mixes_sequences_only_at_the_clinics() -> None:
    preset = synth.PRESETS["clinics"]
    sequences = {site.name: site.sequences for site in preset.sites}
    assert list(sequences) == ["clinic1", "clinic2", "site3", "site4"]
    for name, weights in sequences.items():
        t2_and_flair = weights[synth.SEQUENCES.index("t2")] + weights[synth.SEQUENCES.index("flair")]
        assert (t2_and_flair >= 0.3) == name.startswith("clinic")
    # The benchmark's and the demo's claim: with data.split_seed 0 the server distills on the T1c-only sites.
    split = ArraySplit(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                       [f"f{i}" for i in range(4)], list(sequences))
    assert pick_source_sites(split, None, 0) == ("site3", "site4")
    with pytest.raises(synth.SynthError, match="site_names must name"):
        dataclasses.replace(preset, site_names=("clinic1", "nowhere", "site3", "site4"))


def test_sample_grid(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    png = tmp_path / "grid.png"
    synth.write_sample_grid(root, png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert png.stat().st_size < 400_000


# ---------------------------------------------------------------- the unlabeled transfer set

UNLABELED = 3  # per site: 12 over the clinics preset's 4 sites


@pytest.fixture(scope="module")
def with_and_without_unlabeled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("unlabeled")
    settings = {"seed": 2, "workers": 1, "progress": False, "limit": 1, "pool_size": 4}
    synth.generate(base / "without", "clinics", unlabeled_size=0, **settings)
    summary = synth.generate(base / "with", "clinics", unlabeled_size=UNLABELED, **settings)
    return base / "with", base / "without", summary


def test_presets_have_unlabeled_transfer_images() -> None:
    per_site = {name: preset.unlabeled_per_site for name, preset in synth.PRESETS.items()}
    assert per_site == {"quickstart": 300, "clinics": 300, "kaggle": 500}
    assert synth.UNLABELED_DIR == UNLABELED_DIR


def test_each_site_gets_its_unlabeled_images_with_no_label_anywhere(
        with_and_without_unlabeled: tuple[Path, Path, dict]) -> None:
    root, _, summary = with_and_without_unlabeled
    sites = [s.name for s in synth.PRESETS["clinics"].sites]
    assert sorted(p.name for p in (root / UNLABELED_DIR).iterdir()) == sites
    for site in sites:
        names = sorted(p.name for p in (root / UNLABELED_DIR / site).iterdir())
        assert names == [f"Un_{i:04d}.jpg" for i in range(UNLABELED)]
    assert summary["unlabeled"] == dict.fromkeys(sites, UNLABELED)
    info = json.loads((root / "synth.json").read_text())
    assert info["unlabeled_per_site"] == UNLABELED and info["unlabeled"] == dict.fromkeys(sites, UNLABELED)
    assert not [r for r in read_metadata(root) if r["file"].startswith(UNLABELED_DIR)]
    words = [*synth.CLASS_NAMES, *synth.ABBREVIATIONS.values()]
    paths = [p.relative_to(root).as_posix() for p in (root / UNLABELED_DIR).rglob("*")]
    assert not [p for p in paths if any(w in p.lower() for w in words)]
    assert all(p.endswith(".jpg") for p in paths if p.count("/") == 2)  # images only: no metadata file inside
    split = load_unlabeled(root / UNLABELED_DIR)
    assert len(split) == UNLABELED * len(sites) and set(split.labels.tolist()) == {UNKNOWN_LABEL}
    assert split.sites == [site for site in sites for _ in range(UNLABELED)]


def test_unlabeled_images_change_no_other_byte(with_and_without_unlabeled: tuple[Path, Path, dict]) -> None:
    root, plain, _ = with_and_without_unlabeled
    assert not (plain / UNLABELED_DIR).exists()
    others = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))
              if p.is_file() and p.relative_to(root).parts[0] != UNLABELED_DIR]
    assert others == [p.relative_to(plain).as_posix() for p in sorted(plain.rglob("*")) if p.is_file()]
    assert {"Training", "Testing", "Pools", "metadata.csv"} <= {rel.split("/")[0] for rel in others}
    for rel in others:
        if rel != "synth.json":
            assert (root / rel).read_bytes() == (plain / rel).read_bytes(), rel
    recipe, plain_recipe = (json.loads((folder / "synth.json").read_text()) for folder in (root, plain))
    assert (recipe.pop("unlabeled_per_site"), plain_recipe.pop("unlabeled_per_site")) == (UNLABELED, 0)
    assert plain_recipe.pop("unlabeled") == {} and len(recipe.pop("unlabeled")) == synth.PRESETS["clinics"].num_sites
    assert recipe == plain_recipe


def test_unlabeled_classes_follow_the_site_mix_in_an_order_that_hides_them() -> None:
    preset = synth.PRESETS["clinics"]
    jobs = synth.planning.plan_unlabeled_jobs(preset, 0, Path("unused"), 200)
    for site in preset.sites:
        labels = [job.label for job in jobs if job.site == site]
        assert len(labels) == 200 and len(set(labels)) == len(synth.CLASS_NAMES)
        assert sum(a != b for a, b in zip(labels, labels[1:], strict=False)) > 100  # not grouped by class
    again = synth.planning.plan_unlabeled_jobs(preset, 0, Path("unused"), 200)
    assert [j.label for j in again] == [j.label for j in jobs]
    assert len({j.seed_key for j in jobs}) == len(jobs)


@pytest.mark.parametrize("size", [-1, synth.MAX_UNLABELED_PER_SITE + 1, True, 2.5])
def test_a_bad_unlabeled_size_is_refused(tmp_path: Path, size: object) -> None:
    with pytest.raises(synth.SynthError, match="unlabeled_size must be a whole number"):
        synth.generate(tmp_path / "x", "quickstart", progress=False, limit=1, unlabeled_size=size)
    assert not (tmp_path / "x").exists()
    with pytest.raises(synth.SynthError, match="unlabeled_per_site"):
        dataclasses.replace(synth.PRESETS["quickstart"], unlabeled_per_site=size)
