"""Images in, uint8 tensors out: the paper's preprocessing and the Kaggle-layout loader.

Every image is decoded once, resized to 128 x 128 (bilinear) and stored as uint8 in an
on-disk cache keyed by the file list, sizes, mtimes and the preprocessing; no epoch
decodes a JPEG again. ``normalize`` applies the ImageNet mean/std on the fly, so the
cache holds exactly what torchvision's ``ToTensor`` would see, times 255.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from edgemri.core.errors import EdgemriError
from edgemri.core.io import save_torch

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
IMAGE_SIZE = 128
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("Training", "Testing")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
MIN_SIDE_PX = 16  # smaller than this is no MRI slice: a thumbnail or an icon
MAX_PIXELS = 64_000_000  # larger is treated as a decompression bomb, before decoding
PREPROCESSING = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "interpolation": "bilinear",
    "color": "RGB",
    "scale": "1/255",
    "mean": list(MEAN),
    "std": list(STD),
}
_PREPROCESSING_VERSION = hashlib.sha256(json.dumps(PREPROCESSING, sort_keys=True).encode()).hexdigest()[:12]


class DataError(EdgemriError):
    """A data folder cannot be used as given; the message names the path."""


class BadImageError(EdgemriError):
    """One file cannot be used as an image; the message says why."""


# ---------------------------------------------------------------- one image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping or inventing colour."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float images: scale the full range down, never clip at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become black, the background of an MRI slice.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def open_image(path: str | Path) -> Image.Image:
    """Open one image file as upright 8-bit RGB, or raise BadImageError with the reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImageError(
                    f"{width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                )
            if min(width, height) < MIN_SIDE_PX:
                raise BadImageError(f"too small: {width}x{height} px (minimum side {MIN_SIDE_PX} px)")
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL raises OSError for truncated data and SyntaxError for broken headers.
        raise BadImageError(f"corrupt or truncated image: {err}") from None


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize to 128 x 128 bilinear (as torchvision's Resize on PIL) -> uint8 (3, H, W)."""
    resized = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def load_image_uint8(path: str | Path) -> np.ndarray:
    """Decode and preprocess one file: the single entry point for train, predict, export."""
    return preprocess(open_image(path))


_MEAN_T = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
_STD_T = torch.tensor(STD).view(1, 3, 1, 1) * 255.0


def normalize(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 normalized with the ImageNet mean/std."""
    return (images.float() - _MEAN_T) / _STD_T


# ---------------------------------------------------------------- a folder


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class ArraySplit:
    """Decoded images of one split: uint8 images, int64 labels, file names, sites."""

    images: Tensor
    labels: Tensor
    files: list[str]
    sites: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | Tensor) -> ArraySplit:
        idx = torch.as_tensor(index, dtype=torch.long)
        picks = idx.tolist()
        return ArraySplit(
            images=self.images[idx],
            labels=self.labels[idx],
            files=[self.files[i] for i in picks],
            sites=[self.sites[i] for i in picks] if self.sites else [],
        )

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()
        return dict(zip(CLASS_NAMES, counts, strict=True))


@dataclass
class FolderScan:
    root: Path
    files: dict[str, list[tuple[Path, int]]]  # split -> (file, label)
    ignored: list[SkippedFile]  # not an image by extension

    def cache_key(self, split: str) -> str:
        digest = hashlib.sha256(_PREPROCESSING_VERSION.encode())
        for path, label in self.files[split]:
            stat = path.stat()
            rel = path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def scan_folder(root: str | Path) -> FolderScan:
    """List the images of a Kaggle-layout folder, or raise DataError saying what is wrong."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    files: dict[str, list[tuple[Path, int]]] = {}
    ignored: list[SkippedFile] = []
    expected = f"expected {root}/<Training|Testing>/<{'|'.join(CLASS_NAMES)}>/*.jpg (the Kaggle layout)"
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"missing folder {split_dir}; {expected}")
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in class_dirs if p.name not in CLASS_NAMES]
        if unknown:
            raise DataError(
                f"unknown class folder {split_dir / unknown[0]}; allowed class folders: {', '.join(CLASS_NAMES)}"
            )
        entries: list[tuple[Path, int]] = []
        for label, name in enumerate(CLASS_NAMES):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                raise DataError(f"missing class folder {class_dir}; {expected}")
            found = 0
            for path in sorted(class_dir.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(SkippedFile(str(path), f"not an image extension ({path.suffix or 'none'})"))
                    continue
                entries.append((path, label))
                found += 1
            if found == 0:
                raise DataError(f"class folder {class_dir} has no images; every class needs at least one")
        files[split] = entries
    return FolderScan(root=root, files=files, ignored=ignored)


def _decode_one(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image_uint8(path), None
    except BadImageError as err:
        return None, str(err)


def _read_sites(root: Path) -> dict[str, str]:
    """Site of each file from metadata.csv (the synthetic set and partition manifests)."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        return {}
    with meta.open(newline="", encoding="utf-8") as fh:
        return {row["file"]: row.get("site", "") for row in csv.DictReader(fh)}


@dataclass
class Dataset:
    """The decoded Training and Testing splits of one folder."""

    root: Path
    train: ArraySplit
    test: ArraySplit
    skipped: list[SkippedFile]
    fingerprint: str  # hash of both cache keys: file list, sizes, mtimes, preprocessing

    def summary(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "fingerprint": self.fingerprint,
            "Training": self.train.class_counts(),
            "Testing": self.test.class_counts(),
            "skipped": len(self.skipped),
        }


def _cache_dir(root: Path, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else root / ".edgemri-cache"


def cache_path(scan: FolderScan, split: str, cache_dir: str | Path | None = None) -> Path:
    return _cache_dir(scan.root, cache_dir) / f"{split.lower()}-{scan.cache_key(split)[:20]}.pt"


def _decode_split(
    scan: FolderScan, split: str, workers: int, progress: bool
) -> tuple[ArraySplit, list[SkippedFile]]:
    from tqdm import tqdm

    entries = scan.files[split]
    paths = [p for p, _ in entries]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results: Iterable = pool.map(_decode_one, paths, chunksize=32)
            results = list(tqdm(results, total=len(paths), desc=f"decode {split}", disable=not progress))
    else:
        results = [_decode_one(p) for p in tqdm(paths, desc=f"decode {split}", disable=not progress)]
    sites = _read_sites(scan.root)
    images, labels, files, site_list, skipped = [], [], [], [], []
    for (path, label), (array, reason) in zip(entries, results, strict=True):
        if array is None:
            skipped.append(SkippedFile(str(path), reason or "unreadable"))
            continue
        rel = path.relative_to(scan.root).as_posix()
        images.append(array)
        labels.append(label)
        files.append(rel)
        site_list.append(sites.get(rel, ""))
    stacked = (
        torch.from_numpy(np.stack(images))
        if images
        else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    )
    split_data = ArraySplit(
        images=stacked,
        labels=torch.tensor(labels, dtype=torch.long),
        files=files,
        sites=site_list if any(site_list) else [],
    )
    return split_data, skipped


def cache_status(root: str | Path, cache_dir: str | Path | None = None) -> dict[str, bool]:
    """Whether each split's decoded cache matches the folder as it is now."""
    scan = scan_folder(root)
    return {split: cache_path(scan, split, cache_dir).is_file() for split in SPLITS}


def load_dataset(
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> Dataset:
    """Scan, decode (once, cached) and return both splits of a Kaggle-layout folder."""
    scan = scan_folder(root)
    workers = workers or min(4, os.cpu_count() or 1)
    splits: dict[str, ArraySplit] = {}
    skipped: list[SkippedFile] = list(scan.ignored)
    for split in SPLITS:
        path = cache_path(scan, split, cache_dir)
        if path.is_file():
            cached = torch.load(path, weights_only=False)
            split_data, split_skipped = cached["split"], cached["skipped"]
        else:
            split_data, split_skipped = _decode_split(scan, split, workers, progress)
            save_torch(path, {"split": split_data, "skipped": split_skipped, "preprocessing": PREPROCESSING})
            for stale in path.parent.glob(f"{split.lower()}-*.pt"):
                if stale != path:
                    stale.unlink(missing_ok=True)
        if len(split_data) == 0:
            raise DataError(f"no readable images in {scan.root / split}")
        splits[split] = split_data
        skipped.extend(split_skipped)
    for item in skipped:
        log.warning("skipped %s: %s", item.path, item.reason)
    fingerprint = hashlib.sha256(
        "".join(scan.cache_key(s) for s in SPLITS).encode()
    ).hexdigest()[:16]
    return Dataset(root=scan.root, train=splits["Training"], test=splits["Testing"],
                   skipped=skipped, fingerprint=fingerprint)


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, val): ``fraction`` of each class goes to val, seeded."""
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = int(round(len(members) * fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) > 1 else 0
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def describe_folder(root: str | Path, cache_dir: str | Path | None = None,
                    progress: bool = False) -> dict[str, object]:
    """What the loader sees in a folder (``edgemri data info``); decodes it once if needed."""
    scan = scan_folder(root)
    was_current = cache_status(root, cache_dir)
    dataset = load_dataset(root, cache_dir=cache_dir, progress=progress)
    usable = {item.path for item in dataset.skipped}
    widths, heights = [], []
    for entries in scan.files.values():
        for path, _ in entries:
            if str(path) in usable:
                continue
            with Image.open(path) as image:
                widths.append(image.size[0])
                heights.append(image.size[1])
    return {
        "root": str(dataset.root),
        "images": {"Training": dataset.train.class_counts(), "Testing": dataset.test.class_counts()},
        "total": len(dataset.train) + len(dataset.test),
        "sites": sorted(set(dataset.train.sites) | set(dataset.test.sites)),
        "width_range": [min(widths), max(widths)],
        "height_range": [min(heights), max(heights)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in dataset.skipped],
        "cache_was_current": was_current,
        "fingerprint": dataset.fingerprint,
    }


def server_client_split(split: ArraySplit, client_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (server, clients) of Training: disjoint, stratified by site and class.

    The server distills on its share; the federation's clients hold the rest, so every
    client's local test is data the distilled student never saw.
    """
    everything = torch.arange(len(split))
    if client_fraction == 0:
        return everything, everything
    site_ids = {site: k for k, site in enumerate(sorted(set(split.sites)))} if split.sites else {}
    strata = split.labels + len(CLASS_NAMES) * torch.tensor([site_ids.get(s, 0) for s in split.sites]
                                                           if split.sites else [0] * len(split))
    return stratified_split(strata, client_fraction, seed)
