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

from edgemri.core import data as data_module
from edgemri.core.data import (
    CLASS_NAMES,
    DataError,
    load_dataset,
    load_image_uint8,
    normalize,
    open_image,
    scan_folder,
    stratified_split,
)

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
