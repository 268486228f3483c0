from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_kaggle_folder
from PIL import Image
from torchvision import transforms

from edgemri.core.data import dataset as data_module
from edgemri.core.data.dataset import (
    UNKNOWN_LABEL,
    UNLABELED_DIR,
    cache_status,
    describe_folder,
    load_dataset,
    load_pools,
    load_unlabeled,
    scan_folder,
)
from edgemri.core.data.images import CLASS_NAMES, DataError, load_image_uint8, normalize, open_image
from edgemri.core.data.splits import stratified_split

pytestmark = pytest.mark.usefixtures("user_cache")  # each test decodes into its own cache folder


def test_preprocessing_equals_the_papers_torchvision_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "scan.jpg"
    Image.fromarray(rng.integers(0, 255, (301, 257), dtype=np.uint8), mode="L").convert("RGB").save(path)
    paper = transforms.Compose([
        transforms.Resize((128, 128)), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    expected = paper(Image.open(path).convert("RGB"))
    ours = normalize(torch.from_numpy(load_image_uint8(path))[None])[0]
    assert ours.shape == (3, 128, 128)
    assert torch.allclose(ours, expected, atol=1e-5)


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def test_image_modes_are_converted_correctly(tmp_path: Path) -> None:
    gray = _save(Image.new("L", (64, 64), 100), tmp_path / "gray.png")
    assert open_image(gray).getpixel((5, 5)) == (100, 100, 100)
    # 16-bit: full range scaled down, never clipped at 255.
    sixteen = Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    path16 = _save(sixteen, tmp_path / "deep.png")
    assert open_image(path16).getpixel((5, 5)) == (128, 128, 128)
    # Transparent pixels become the black MRI background; opaque ones keep their value.
    rgba = Image.new("RGBA", (64, 64), (200, 200, 200, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))
    converted = open_image(_save(rgba, tmp_path / "alpha.png"))
    assert converted.getpixel((0, 0)) == (0, 0, 0) and converted.getpixel((5, 5)) == (200, 200, 200)
    palette = Image.new("L", (64, 64), 77).convert("P")
    assert open_image(_save(palette, tmp_path / "pal.png")).getpixel((3, 3)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # no ink: white
    assert min(open_image(_save(cmyk, tmp_path / "cmyk.jpg")).getpixel((3, 3))) > 245


def test_grey_scans_are_resized_as_one_channel_bit_identical_to_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 255, (301, 257), dtype=np.uint8), mode="L")
    sources = {"grey.jpg": grey, "grey.png": grey, "bilevel.png": grey.convert("1"),
               "deep.png": Image.fromarray(rng.integers(0, 65535, (90, 70), dtype=np.uint16))}
    for name, image in sources.items():
        path = _save(image, tmp_path / name)
        via_rgb = np.asarray(open_image(path).resize((128, 128), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        ours = load_image_uint8(path)
        assert ours.shape == (3, 128, 128) and ours.flags.c_contiguous
        assert np.array_equal(ours, via_rgb), name


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("L", (80, 40), 0)
    image.paste(255, (0, 0, 20, 40))  # bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(image.convert("RGB"), tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = open_image(path)
    assert upright.size == (40, 80)
    assert upright.getpixel((20, 5))[0] > 200  # the bright edge is now on top


@pytest.fixture()
def messy_data(tmp_path: Path) -> Path:
    root = make_kaggle_folder(tmp_path / "messy", {"Training": 6, "Testing": 3})
    glioma = root / "Training" / "glioma"
    (glioma / "empty.jpg").write_bytes(b"")
    good = (glioma / "Tr-gl_0000.jpg").read_bytes()
    (glioma / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (glioma / "notes.jpg").write_text("this is a text file with an image extension")
    Image.new("RGB", (8, 8)).save(glioma / "tiny.png")
    Image.new("1", (9000, 8000)).save(glioma / "bomb.png")  # 72 Mpx of nothing
    return root


def test_bad_files_are_skipped_with_a_reason_each(messy_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = load_dataset(messy_data)
    reasons = {Path(s.path).name: s.reason for s in dataset.skipped}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.jpg", "tiny.png", "bomb.png"}
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "too small" in reasons["tiny.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert dataset.train.class_counts() == dict.fromkeys(CLASS_NAMES, 6)
    assert sum("skipped" in r.message for r in caplog.records) == 5


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: shutil.rmtree(root / "Testing"), "missing folder"),
        (lambda root: (root / "Training" / "astrocytoma").mkdir(), "unknown class folder"),
        (lambda root: [p.unlink() for p in (root / "Training" / "pituitary").iterdir()], "has no images"),
        (lambda root: shutil.rmtree(root), "does not exist"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path: Path, breakage, message: str) -> None:
    root = make_kaggle_folder(tmp_path / "d", {"Training": 2, "Testing": 2})
    breakage(root)
    with pytest.raises(DataError, match=message) as err:
        scan_folder(root)
    assert str(tmp_path / "d") in str(err.value)


def test_decoded_cache_is_reused_and_rebuilt_when_files_change(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_kaggle_folder(tmp_path / "d", {"Training": 3, "Testing": 2})
    first = load_dataset(root)

    def no_decoding(*_args: object) -> None:
        raise AssertionError("decoded again although the cache is current")

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "_decode_split", no_decoding)
        second = load_dataset(root)
    assert torch.equal(first.train.images, second.train.images)
    assert second.fingerprint == first.fingerprint
    changed = root / "Training" / "glioma" / "Tr-gl_0000.jpg"
    Image.new("RGB", (150, 150), (255, 255, 255)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = load_dataset(root)
    assert third.fingerprint != first.fingerprint
    index = third.train.files.index("Training/glioma/Tr-gl_0000.jpg")
    assert int(third.train.images[index].min()) == 255


def test_stratified_split_is_disjoint_seeded_and_per_class() -> None:
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 10 + [3] * 30)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == len(labels)
    assert torch.bincount(labels[val]).tolist() == [8, 4, 2, 6]
    again, _ = stratified_split(labels, 0.2, seed=3)
    other, _ = stratified_split(labels, 0.2, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemri", *args], capture_output=True, text=True)


def test_data_info_reports_counts_and_skips(messy_data: Path) -> None:
    result = _cli("data", "info", str(messy_data))
    assert result.returncode == 0, result.stderr
    assert "Training  glioma=6" in result.stdout
    assert "skipped: 5" in result.stdout and "tiny.png: too small" in result.stdout
    assert "decoded cache was current: {'Training': False, 'Testing': False}" in result.stdout
    assert "{'Training': True, 'Testing': True}" in _cli("data", "info", str(messy_data)).stdout


def test_data_info_fails_clearly_on_an_unusable_folder(tmp_path: Path) -> None:
    result = _cli("data", "info", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "data folder does not exist" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- the unlabeled transfer set


def _grey(path: Path, level: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), (level, level, level)).save(path)
    return path


@pytest.fixture()
def unlabeled(tmp_path: Path) -> Path:
    """Images at two sites (one nested deeper), one at the top, one under a folder that is no site name."""
    root = tmp_path / "transfer"
    for level, rel in enumerate(["site-a/a0.jpg", "site-a/a1.png", "site-a/deeper/a2.jpg", "site-b/b0.jpg",
                                 "loose.jpg", "not a site/c0.jpg", ".hidden/h.jpg", "site-b/.h.jpg"]):
        _grey(root / rel, 20 * level + 10)
    (root / "site-b" / "notes.txt").write_text("not an image")
    return root


def test_unlabeled_images_are_found_nested_sorted_with_unknown_labels_and_folder_sites(
        unlabeled: Path, caplog: pytest.LogCaptureFixture) -> None:
    split = load_unlabeled(unlabeled)
    assert split.files == ["loose.jpg", "not a site/c0.jpg", "site-a/a0.jpg", "site-a/a1.png", "site-a/deeper/a2.jpg",
                           "site-b/b0.jpg"]
    assert split.sites == ["", "", "site-a", "site-a", "site-a", "site-b"]
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == [UNKNOWN_LABEL] * 6
    assert split.images.dtype == torch.uint8 and split.images.shape == (6, 3, 128, 128)
    assert torch.equal(split.images[4], torch.from_numpy(load_image_uint8(unlabeled / "site-a/deeper/a2.jpg")))
    assert split.class_counts() == dict.fromkeys(CLASS_NAMES, 0)  # unknown labels count for no class
    assert [r.message for r in caplog.records if "notes.txt" in r.message]  # a non-image is a warning
    assert not [r for r in caplog.records if "hidden" in r.message or ".h.jpg" in r.message]


def test_excluded_sites_are_not_read(unlabeled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    real_load = data_module.load_image_uint8
    monkeypatch.setattr(data_module, "load_image_uint8", lambda path: opened.append(Path(path).name) or real_load(path))
    split = load_unlabeled(unlabeled, exclude_sites={"site-a"}, workers=1)
    assert split.files == ["loose.jpg", "not a site/c0.jpg", "site-b/b0.jpg"] and split.sites == ["", "", "site-b"]
    assert sorted(opened) == ["b0.jpg", "c0.jpg", "loose.jpg"]
    assert load_unlabeled(unlabeled, exclude_sites=[""]).files == ["site-a/a0.jpg", "site-a/a1.png",
                                                                   "site-a/deeper/a2.jpg", "site-b/b0.jpg"]
    with pytest.raises(DataError, match="no images in .* outside the excluded sites") as err:
        load_unlabeled(unlabeled, exclude_sites=("site-a", "site-b", ""))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="'../x' is not a site name"):
        load_unlabeled(unlabeled, exclude_sites=["../x"])
    with pytest.raises(TypeError, match="not the string"):
        load_unlabeled(unlabeled, exclude_sites="site-a")


def test_unlabeled_symlinks_are_followed_only_to_files_inside_the_folder(unlabeled: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "elsewhere"
    secret = _grey(outside / "secret.jpg", 200)
    (unlabeled / "site-b" / "secret.jpg").symlink_to(secret)
    (unlabeled / "site-c").symlink_to(outside, target_is_directory=True)
    (unlabeled / "site-b" / "loop").symlink_to(unlabeled, target_is_directory=True)
    (unlabeled / "site-b" / "alias.jpg").symlink_to(unlabeled / "site-a" / "a0.jpg")
    (unlabeled / "site-b" / "into-a.jpg").symlink_to(unlabeled / "site-a" / "a1.png")
    split = load_unlabeled(unlabeled, exclude_sites={"site-a"})
    assert split.files == ["loose.jpg", "not a site/c0.jpg", "site-b/b0.jpg"]
    reasons = {Path(r.message.split(": ")[0].removeprefix("skipped ")).name: r.message for r in caplog.records}
    assert "to outside the folder" in reasons["secret.jpg"] and "to outside the folder" in reasons["site-c"]
    assert "to a folder" in reasons["loop"] and "excluded site" in reasons["alias.jpg"]
    assert "site-b/alias.jpg" in load_unlabeled(unlabeled).files  # a link to a file inside is followed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("file", "not a folder"),
        ([], "no images in"),
        (["site-a/notes.txt", "site-a/.x.jpg"], "no images in"),
        (["s/0.jpg", "s/1.jpg", "2.jpg"], "more than 2 images"),
    ],
)
def test_unusable_unlabeled_folders_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        content: str | list[str] | None, message: str) -> None:
    monkeypatch.setattr(data_module, "MAX_UNLABELED_IMAGES", 2)
    root = tmp_path / "transfer"
    if content == "file":
        root.write_text("x")
    elif content is not None:
        root.mkdir()
        for level, rel in enumerate(content):
            if rel.endswith(".jpg"):
                _grey(root / rel, level)
            else:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text("x")
    with pytest.raises(DataError, match=message) as err:
        load_unlabeled(root)
    assert str(tmp_path / "transfer") in str(err.value) and "\n" not in str(err.value)


def test_a_corrupt_unlabeled_image_is_skipped_and_none_usable_is_an_error(unlabeled: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    good = (unlabeled / "site-b" / "b0.jpg").read_bytes()
    (unlabeled / "site-b" / "b1.jpg").write_bytes(good[: len(good) // 3])
    split = load_unlabeled(unlabeled)
    assert "site-b/b1.jpg" not in split.files and len(split) == 6
    assert [r for r in caplog.records if "b1.jpg" in r.message and "truncated" in r.message]
    (unlabeled / "site-b" / "b0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images"):
        load_unlabeled(unlabeled, exclude_sites={"site-a", ""})


def test_the_unlabeled_set_is_decoded_once_and_cached(unlabeled: Path, user_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_unlabeled(unlabeled)
    assert len(list(user_cache.glob("decoded/*/unlabeled-*.npz"))) == 1

    def no_decoding(*_args: object) -> None:
        raise AssertionError("decoded again although the cache is current")

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "_decode_split", no_decoding)
        second = load_unlabeled(unlabeled)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert (first.files, first.sites) == (second.files, second.sites)
    changed = _grey(unlabeled / "site-a" / "a0.jpg", 255)
    os.utime(changed, ns=(1, 1))
    assert int(load_unlabeled(unlabeled).images[2].min()) == 255


def test_an_unlabeled_folder_changes_nothing_the_data_root_scans_see(tmp_path: Path) -> None:
    root = make_kaggle_folder(tmp_path / "d", {"Training": 2, "Testing": 1})
    before = describe_folder(root)
    _grey(root / UNLABELED_DIR / "site-a" / "u0.jpg", 90)
    (root / UNLABELED_DIR / "site-a" / "notes.txt").write_text("x")
    assert cache_status(root) == {"Training": True, "Testing": True}
    after = describe_folder(root)
    assert after == {**before, "cache_was_current": {"Training": True, "Testing": True}}
    assert load_pools(root) == {} and load_dataset(root).fingerprint == before["fingerprint"]
    assert load_unlabeled(root / UNLABELED_DIR).sites == ["site-a"]
