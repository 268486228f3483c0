"""The duplicate audit: exact and near copies, groups across splits, label conflicts, the hash cache, the index."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import make_kaggle_folder
from PIL import Image, ImageDraw, ImageFilter

from edgemri.core.data import audit
from edgemri.core.data.audit import AuditError, audit_dataset, hamming, near_pairs
from edgemri.core.data.dataset import load_dataset
from edgemri.core.io import load_npz, save_npz
from edgemri.main import main


def _scan_like(seed: int, size: int = 180) -> Image.Image:
    """A smooth grey "slice": an ellipse of blurred noise with a bright blob; each seed is another scan."""
    rng = np.random.default_rng(seed)
    texture = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    texture = Image.eval(texture.filter(ImageFilter.GaussianBlur(5)), lambda v: max(0, min(255, (v - 128) * 8 + 128)))
    mask = Image.new("L", (size, size), 0)
    left, top = rng.integers(5, 40, 2).tolist()
    ImageDraw.Draw(mask).ellipse((left, top, size - left, size - top), fill=255)
    image = Image.composite(texture, Image.new("L", (size, size), 0), mask)
    cx, cy = rng.integers(50, size - 50, 2).tolist()
    ImageDraw.Draw(image).ellipse((cx - 15, cy - 15, cx + 15, cy + 15), fill=230)
    return image.filter(ImageFilter.GaussianBlur(1.5)).convert("RGB")


def _near_copy(source: Path, target: Path) -> Path:
    """The same image re-encoded at another JPEG quality and resized: a near duplicate, not a byte copy."""
    with Image.open(source) as image:
        image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC).save(target, quality=55)
    return target


@pytest.fixture()
def folder(tmp_path: Path, user_cache: Path) -> Path:
    """A small Kaggle-layout folder of distinct smooth scans, with copies planted by each test."""
    root = make_kaggle_folder(tmp_path / "data", {"Training": 3, "Testing": 2})
    for k, path in enumerate(sorted(root.glob("*/*/*.jpg"))):
        _scan_like(k).save(path, quality=92)
    return root


def _index(dataset_files: list[str], rel: str) -> int:
    return dataset_files.index(rel)


def assert_consistent(result: audit.DuplicateAudit) -> None:
    """The per-class counts add up to the per-split-pair ones (each image counted under its own class)."""
    counts, per_class = result.counts(), result.per_class()
    for pair in ("Training-Training", "Testing-Testing"):
        for kind in ("exact", "near"):
            assert sum(c[pair][kind] for c in per_class.values()) == counts[pair][kind]["images"], (pair, kind)
    for kind in ("exact", "near", "grouped"):
        assert sum(c["Testing-Training"][kind] for c in per_class.values()) == counts["Testing-Training"][kind]
    assert counts["Testing-Training"]["grouped"] == len(result.leaked_test())


def test_exact_and_near_copies_are_grouped_and_a_distinct_image_is_not(folder: Path) -> None:
    train = folder / "Training"
    (train / "glioma" / "Tr-gl_copy.jpg").write_bytes((train / "glioma" / "Tr-gl_0000.jpg").read_bytes())
    _near_copy(train / "meningioma" / "Tr-me_0000.jpg", train / "meningioma" / "Tr-me_near.jpg")
    dataset = load_dataset(folder)
    result = audit_dataset(dataset)
    files = dataset.train.files
    group = result.train_groups()
    original, copy = _index(files, "Training/glioma/Tr-gl_0000.jpg"), _index(files, "Training/glioma/Tr-gl_copy.jpg")
    me, near = (_index(files, f"Training/meningioma/Tr-me_{n}.jpg") for n in ("0000", "near"))
    assert group[original] == group[copy] and group[me] == group[near]
    assert len(set(group)) == len(files) - 2  # every other image is its own group
    within = result.counts()["Training-Training"]
    assert within["exact"] == {"images": 2, "groups": 1, "redundant": 1}
    assert within["near"] == {"images": 4, "groups": 2, "redundant": 2}
    assert result.counts()["Testing-Training"] == {"exact": 0, "exact_contents": 0, "near": 0, "grouped": 0}
    assert result.leaked_test() == [] and result.label_conflicts() == []
    assert sorted(map(sorted, result.groups())) == [
        ["Training/glioma/Tr-gl_0000.jpg", "Training/glioma/Tr-gl_copy.jpg"],
        ["Training/meningioma/Tr-me_0000.jpg", "Training/meningioma/Tr-me_near.jpg"]]
    per_class = result.per_class()
    assert per_class["glioma"]["Training-Training"] == {"exact": 2, "near": 2}
    assert per_class["meningioma"]["Training-Training"] == {"exact": 0, "near": 2}
    assert result.max_distance == audit.NEAR_MAX_DISTANCE and result.min_correlation == audit.NEAR_MIN_CORRELATION
    assert_consistent(result)


def test_a_cross_split_copy_is_leaked_and_a_label_conflict_is_reported(folder: Path) -> None:
    train, test = folder / "Training", folder / "Testing"
    (test / "glioma" / "Te-gl_copy.jpg").write_bytes((train / "glioma" / "Tr-gl_0001.jpg").read_bytes())
    _near_copy(train / "notumor" / "Tr-no_0002.jpg", test / "pituitary" / "Te-pi_near.jpg")  # and another label
    (train / "meningioma" / "Tr-me_gl.jpg").write_bytes((train / "glioma" / "Tr-gl_0002.jpg").read_bytes())
    dataset = load_dataset(folder)
    result = audit_dataset(dataset)
    leaked = {dataset.test.files[i] for i in result.leaked_test()}
    assert leaked == {"Testing/glioma/Te-gl_copy.jpg", "Testing/pituitary/Te-pi_near.jpg"}
    assert result.counts()["Testing-Training"] == {"exact": 1, "exact_contents": 1, "near": 2, "grouped": 2}
    conflicts = {frozenset(m["file"] for m in c["members"]): c for c in result.label_conflicts()}
    assert set(conflicts) == {frozenset({"Training/glioma/Tr-gl_0002.jpg", "Training/meningioma/Tr-me_gl.jpg"}),
                              frozenset({"Training/notumor/Tr-no_0002.jpg", "Testing/pituitary/Te-pi_near.jpg"})}
    exact_conflict = conflicts[frozenset({"Training/glioma/Tr-gl_0002.jpg", "Training/meningioma/Tr-me_gl.jpg"})]
    assert exact_conflict["exact"] is True
    assert {m["class"] for m in exact_conflict["members"]} == {"glioma", "meningioma"}
    near_conflict = conflicts[frozenset({"Training/notumor/Tr-no_0002.jpg", "Testing/pituitary/Te-pi_near.jpg"})]
    assert near_conflict["exact"] is False
    assert_consistent(result)
    report = json.loads(json.dumps(result.to_dict()))  # JSON-ready as it is
    assert report["leaked_test"] == 2 and len(report["label_conflicts"]) == 2
    assert report["per_class"]["pituitary"]["Testing-Training"]["grouped"] == 1


def test_train_groups_keep_every_copy_on_one_side_of_a_split(folder: Path) -> None:
    train = folder / "Training"
    for n in range(3):
        (train / "pituitary" / f"Tr-pi_copy{n}.jpg").write_bytes((train / "pituitary" / "Tr-pi_0000.jpg").read_bytes())
    _near_copy(train / "pituitary" / "Tr-pi_copy1.jpg", train / "notumor" / "Tr-no_near.jpg")
    dataset = load_dataset(folder)
    groups = np.array(audit_dataset(dataset).train_groups())
    assert len(groups) == len(dataset.train)
    copies = [dataset.train.files.index(f"Training/pituitary/Tr-pi_{n}.jpg") for n in ("0000", "copy0", "copy2")]
    copies.append(dataset.train.files.index("Training/notumor/Tr-no_near.jpg"))
    # Any split by group id (here: even ids validate) keeps all five copies on one side.
    val = groups % 2 == 0
    assert len({bool(val[i]) for i in copies}) == 1 and len(set(groups[copies].tolist())) == 1
    assert len(set(groups.tolist())) == len(dataset.train) - 4


def test_blank_slices_are_one_group_and_cost_no_pair_search(folder: Path) -> None:
    for n, size in enumerate((150, 200, 224)):
        Image.new("RGB", (size, size), (0, 0, 0)).save(folder / "Training" / "notumor" / f"Tr-no_blank{n}.png")
    Image.new("RGB", (160, 160), (0, 0, 0)).save(folder / "Testing" / "notumor" / "Te-no_blank.jpg", quality=70)
    dataset = load_dataset(folder)
    result = audit_dataset(dataset)
    blanks = [f for f in dataset.train.files + dataset.test.files if "blank" in f]
    assert [sorted(g) for g in result.groups()] == [sorted(blanks)]
    assert result.counts()["Testing-Training"]["grouped"] == 1


def test_hashes_are_cached_and_a_corrupt_or_stale_cache_is_rebuilt(folder: Path, user_cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    train = folder / "Training"
    (train / "glioma" / "Tr-gl_copy.jpg").write_bytes((train / "glioma" / "Tr-gl_0000.jpg").read_bytes())
    dataset = load_dataset(folder)
    first = audit_dataset(dataset)
    assert first.hashes_cached == {"Training": False, "Testing": False}
    caches = sorted(user_cache.glob("decoded/*/audit-*.npz"))
    assert [p.name.split("-")[1] for p in caches] == ["testing", "training"]
    assert {p.parent for p in caches} == {next(user_cache.glob("decoded/*/training-*.npz")).parent}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in caches)

    real_hash = audit.perceptual_hash

    def refuse(_grey: np.ndarray) -> int:
        raise AssertionError("hashed again although the cache is current")

    monkeypatch.setattr(audit, "perceptual_hash", refuse)
    second = audit_dataset(dataset)
    assert second.hashes_cached == {"Training": True, "Testing": True}
    assert second.to_dict()["groups"] == first.to_dict()["groups"]

    monkeypatch.setattr(audit, "perceptual_hash", real_hash)
    training = next(p for p in caches if p.name.startswith("audit-training-"))
    training.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="edgemri.core.data.audit"):
        rebuilt = audit_dataset(dataset)
    assert rebuilt.hashes_cached == {"Training": False, "Testing": True}
    assert "ignoring the duplicate-audit cache" in caplog.text and rebuilt.groups() == first.groups()

    # Plain arrays of the wrong dtype are refused the same way, never trusted.
    arrays = load_npz(training)
    save_npz(training, {**arrays, "phash": arrays["phash"].astype(np.int64)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgemri.core.data.audit"):
        assert audit_dataset(dataset).hashes_cached["Training"] is False
    assert "phash must be" in caplog.text

    # A changed folder is another key: Testing is hashed again and the stale file goes.
    _scan_like(99).save(folder / "Testing" / "glioma" / "Te-gl_new.jpg")
    changed = audit_dataset(load_dataset(folder))
    assert changed.hashes_cached == {"Training": True, "Testing": False}
    assert len(list(user_cache.glob("decoded/*/audit-testing-*.npz"))) == 1


def test_multi_index_search_finds_exactly_the_brute_force_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    copies = base[rng.integers(0, len(base), 200)]
    for k, bits in enumerate(rng.integers(0, 9, len(copies)).tolist()):  # near copies 0..8 bits away
        for bit in rng.choice(64, size=bits, replace=False).tolist():
            copies[k] ^= np.uint64(1) << np.uint64(bit)
    hashes = np.concatenate([base, copies, base[:5]])  # and a few equal hashes
    distance = hamming(hashes[:, None], hashes[None, :])
    for block in (audit._PAIR_BLOCK, 3):  # 3: every bucket takes the blocked path of a huge one
        monkeypatch.setattr(audit, "_PAIR_BLOCK", block)
        for t in (0, 1, 3, 4, 6, 10):
            i, j = np.nonzero(np.triu(distance <= t, k=1))
            expected = np.stack([i, j], axis=1)
            assert np.array_equal(near_pairs(hashes, t), expected), (block, t)
    assert near_pairs(np.array([5], dtype=np.uint64), 4).shape == (0, 2)


@pytest.mark.parametrize("bad", [-1, audit.MAX_SEARCH_DISTANCE + 1, True, 2.0])
def test_a_bad_distance_is_refused(bad: object) -> None:
    with pytest.raises(AuditError, match="max_distance"):
        near_pairs(np.zeros(3, dtype=np.uint64), bad)  # type: ignore[arg-type]


def test_data_info_prints_the_audit_and_json_lists_the_groups(folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    train, test = folder / "Training", folder / "Testing"
    (test / "glioma" / "Te-gl_copy.jpg").write_bytes((train / "glioma" / "Tr-gl_0001.jpg").read_bytes())
    assert main(["data", "info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Testing images with a copy in Training: exact 1 (1 distinct contents), near 1" in out
    assert "label conflicts: none" in out and "hint: 1 of 9 Testing images are copies" in out
    assert main(["data", "info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total"] == 21 and info["duplicates"]["leaked_test"] == 1
    (group,) = info["duplicates"]["groups"]
    assert group["files"] == ["Training/glioma/Tr-gl_0001.jpg", "Testing/glioma/Te-gl_copy.jpg"]
