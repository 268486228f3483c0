"""Images in, uint8 tensors out: the paper's preprocessing and the Kaggle-layout loader.

Every image is decoded once, resized to 128 x 128 (bilinear) and stored as uint8 in an
on-disk cache keyed by the data folder, its file list, sizes, mtimes and the preprocessing;
no epoch decodes a JPEG again. ``normalize`` applies the ImageNet mean/std on the fly, so
the cache holds exactly what torchvision's ``ToTensor`` would see, times 255.

A data folder is untrusted input (a downloaded archive): nothing in it is ever unpickled,
and the cache lives in the user's own cache folder (``EDGEMRI_CACHE_DIR``, else
``$XDG_CACHE_HOME/edgemri``, else ``~/.cache/edgemri``), where an archive cannot plant it.
The cache is plain arrays (.npz, read without pickle) checked against the folder as it is.

Each scanner site's evaluation pool (``load_pools``: the synthetic set's ``Pools/<site>/``,
else ``pools_from_testing``: the site's share of Testing) is hundreds of held-out images,
enough to resolve a few points of accuracy where a client's own test split cannot.

``load_unlabeled`` reads any folder of images without labels (the synthetic set's ``Unlabeled/<site>/``):
the transfer set that knowledge distillation scores with the teacher.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from edgemri.core.config import HEAD_STEPS, Config
from edgemri.core.errors import EdgemriError
from edgemri.core.io import ArtefactError, load_npz, save_npz

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
IMAGE_SIZE = 128
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("Training", "Testing")
POOL_DIR = "Pools"  # per-site evaluation pools, Pools/<site>/<class>/*.jpg (edgemri.core.synth.POOL_DIR)
UNLABELED_DIR = "Unlabeled"  # per-site transfer images, Unlabeled/<site>/*.jpg (edgemri.core.synth.UNLABELED_DIR)
UNKNOWN_LABEL = -1  # the label of every image load_unlabeled returns
MAX_UNLABELED_IMAGES = 200_000  # more is a wrong folder (a home folder?), and would not fit in memory decoded
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
MIN_SIDE_PX = 16  # smaller than this is no MRI slice: a thumbnail or an icon
MAX_PIXELS = 64_000_000  # larger is treated as a decompression bomb, before decoding
MAX_FILE_BYTES = 256 * 2**20  # an MRI slice is kilobytes; a bigger file is not read into memory
# Site names end up in client names, file names and reports: a short, path-safe token (or empty).
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
CACHE_ENV = "EDGEMRI_CACHE_DIR"
PREPROCESSING = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "interpolation": "bilinear",
    "color": "RGB",
    "scale": "1/255",
    "mean": list(MEAN),
    "std": list(STD),
}
_PREPROCESSING_JSON = json.dumps(PREPROCESSING, sort_keys=True)
_PREPROCESSING_VERSION = hashlib.sha256(_PREPROCESSING_JSON.encode()).hexdigest()[:12]
_CACHE_FORMAT = "edgemri.decoded/1"
# How Training is shared between the server's distillation and the clients (federation.scenario):
# seen-sites, a share of every site each; new-sites, the clients are at sites the server never saw.
SCENARIOS: tuple[str, ...] = ("seen-sites", "new-sites")
PSEUDO_SITES_KEY = "federation.partition.pseudo_sites"  # the count of appearance sites for data without sites


class DataError(EdgemriError):
    """A data folder cannot be used as given; the message names the path."""


class BadImageError(EdgemriError):
    """One file cannot be used as an image; the message says why."""


class UnreadableFileError(BadImageError):
    """The file could not be read (permissions, I/O): a property of the moment, not of its content."""


def display_path(path: str | Path) -> str:
    """A path as printable text: bytes that are not UTF-8 (possible on Linux) shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


# ---------------------------------------------------------------- one image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit grey (single-channel sources) or RGB, without clipping or inventing colour.

    Grey stays one channel until after the resize (``preprocess``): resizing one channel and copying it is
    bit-identical to resizing three equal ones, and a third of the work."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float images: scale the full range down, never clip at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become black, the background of an MRI slice.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "1"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGB


def read_image_bytes(path: str | Path) -> bytes:
    """The raw bytes of one image file.

    I/O failures raise UnreadableFileError (worth retrying later); an empty or oversized
    file raises BadImageError (a property of the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise BadImageError("empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise BadImageError(f"file of {size:,} bytes exceeds the {MAX_FILE_BYTES:,}-byte limit")
        return path.read_bytes()
    except OSError as err:
        raise UnreadableFileError(f"cannot read the file: {err.strerror or err}") from None


def _decode(data: bytes) -> Image.Image:
    """Decode one image file's bytes as upright 8-bit grey or RGB, or raise BadImageError with the reason."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImageError(
                    f"{width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                )
            if min(width, height) < MIN_SIDE_PX:
                raise BadImageError(f"too small: {width}x{height} px (minimum side {MIN_SIDE_PX} px)")
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_8bit(upright)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        # The bytes are in memory: PIL's OSError here means truncated data, SyntaxError a broken header.
        raise BadImageError(f"corrupt or truncated image: {err}") from None


def open_image(path: str | Path) -> Image.Image:
    """Open one image file as upright 8-bit RGB (as training decodes it), or raise BadImageError with the reason."""
    image = _decode(read_image_bytes(path))
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize to 128 x 128 bilinear (as torchvision's Resize on PIL) -> uint8 (3, H, W); grey: 3 equal channels."""
    resized = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    if resized.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(resized, (3, IMAGE_SIZE, IMAGE_SIZE)))
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def image_uint8(data: bytes) -> np.ndarray:
    """Decode and preprocess one file's bytes: what train, predict and export all use."""
    return preprocess(_decode(data))


def load_image_uint8(path: str | Path) -> np.ndarray:
    """Decode and preprocess one file: the single entry point for train, predict, export."""
    return image_uint8(read_image_bytes(path))


def _per_channel_255(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1) * 255.0


_MEAN_T = _per_channel_255(MEAN)
_STD_T = _per_channel_255(STD)


def normalize(images: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(images / 255 - mean) / std`` per channel; by default the ImageNet mean/std.

    A model may carry its own per-channel constants (``parse_preprocessing``, ``calibrated_preprocessing``);
    the defaults use tensors built once, as this runs on every training batch.
    """
    mean_t = _MEAN_T if mean is MEAN else _per_channel_255(mean)
    std_t = _STD_T if std is STD else _per_channel_255(std)
    return (images.float() - mean_t) / std_t


NORMALIZATION_BOUND = 10.0  # a model's own |mean| and std: far beyond any calibration, and no overflow
_PER_MODEL_KEYS = ("mean", "std")  # the preprocessing a model may carry its own of; the rest is edgemri's
# An optional step on the decoded 128 px scan, before normalization (``preprocessing["head"]``, ``data.head``):
# standardize-crop stretches the head's intensities to a fixed range on a black background and crops the frame
# to the head (core/shortcut.py), which takes away what identifies a scan's source collection. Absent: none.
HEAD_KEY = "head"


class PreprocessingError(EdgemriError):
    """Preprocessing constants that edgemri cannot apply; the message names the bad value."""


def _channel_values(preprocessing: Mapping[str, Any], name: str, where: str) -> list[float]:
    """3 finite numbers within the bounds of ``name`` (mean: [-B, B], std: (0, B]), as floats."""
    values = preprocessing[name]
    allowed = (f"[{-NORMALIZATION_BOUND:g}, {NORMALIZATION_BOUND:g}]" if name == "mean"
               else f"(0, {NORMALIZATION_BOUND:g}]")
    if not (isinstance(values, list | tuple) and len(values) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
        raise PreprocessingError(f"{where}: preprocessing {name} is {repr(values)[:120]}; "
                                 f"allowed: 3 numbers in {allowed}, one per RGB channel")
    low = -NORMALIZATION_BOUND if name == "mean" else 0.0
    # Chained comparisons are False for NaN; infinities and huge ints fail the bound before float() sees them.
    fits = all((low <= v if name == "mean" else low < v) and v <= NORMALIZATION_BOUND for v in values)
    if not fits:
        raise PreprocessingError(f"{where}: preprocessing {name} {list(values)} is not allowed; "
                                 f"allowed: 3 finite numbers in {allowed}")
    return [float(v) for v in values]


def parse_preprocessing(preprocessing: object, where: str) -> dict[str, Any]:
    """``preprocessing`` as a fresh dict if edgemri can apply it: ``PREPROCESSING`` up to its own per-channel
    ``mean`` and ``std`` (3 finite numbers each, mean in [-10, 10], std in (0, 10]); the decoder and the
    decoded cache apply only ``PREPROCESSING``'s size, resize and colour, so those must match exactly.

    Raises PreprocessingError (message starting with ``where``).
    """
    fixed = {k: v for k, v in PREPROCESSING.items() if k not in _PER_MODEL_KEYS}
    if not isinstance(preprocessing, Mapping):
        raise PreprocessingError(f"{where}: preprocessing is a {type(preprocessing).__name__}, "
                                 f"expected a mapping such as {PREPROCESSING}")
    rest = {k: v for k, v in preprocessing.items() if k not in (*_PER_MODEL_KEYS, HEAD_KEY)}
    head = preprocessing.get(HEAD_KEY, "none")
    if not (isinstance(head, str) and head in HEAD_STEPS):
        raise PreprocessingError(f"{where}: preprocessing head {repr(head)[:80]} is not allowed; allowed: "
                                 f"{', '.join(HEAD_STEPS)}")
    try:
        same = json.dumps(rest, sort_keys=True) == json.dumps(fixed, sort_keys=True)
    except (TypeError, ValueError):  # tensors, objects, circular data: nothing edgemri wrote
        same = False
    if not same or any(k not in preprocessing for k in _PER_MODEL_KEYS):
        raise PreprocessingError(f"{where} expects preprocessing {repr(dict(preprocessing))[:300]}, but edgemri "
                                 f"applies {fixed} with a per-channel mean and std")
    return {**fixed, **{name: _channel_values(preprocessing, name, where) for name in _PER_MODEL_KEYS},
            **({HEAD_KEY: head} if head != "none" else {})}


def calibrated_preprocessing(scale: Sequence[float] | Tensor, shift: Sequence[float] | Tensor,
                             base: Mapping[str, Any] = PREPROCESSING) -> dict[str, Any]:
    """The preprocessing whose normalized input is ``scale * x + shift`` per channel, ``x`` normalized by ``base``.

    With x = (u / 255 - mean) / std, scale * x + shift = (u / 255 - mean') / std' for std' = std / scale and
    mean' = mean - shift * std / scale: an input calibration trained on normalized images folds into the
    constants exactly, and the model that uses them stays the plain student. ``scale`` and ``shift`` hold 3
    values each (a tensor of any shape with 3 elements, e.g. (1, 3, 1, 1)); ``scale`` must be > 0.

    Raises PreprocessingError for a bad scale or shift, or constants out of ``parse_preprocessing``'s bounds.
    """
    factors = []
    for name, values, rule in (("scale", scale, " > 0"), ("shift", shift, "")):
        flat = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
        fits = flat.numel() == 3 and bool(torch.isfinite(flat).all()) and (not rule or bool((flat > 0).all()))
        if not fits:
            raise PreprocessingError(f"calibration {name} {flat.tolist()[:6]} is not allowed; allowed: 3 finite "
                                     f"numbers{rule}, one per RGB channel")
        factors.append(flat)
    scale_64, shift_64 = factors
    start = parse_preprocessing(base, "the base preprocessing")
    mean, std = (torch.tensor(start[k], dtype=torch.float64) for k in _PER_MODEL_KEYS)
    calibrated = {**start, "mean": (mean - shift_64 * std / scale_64).tolist(), "std": (std / scale_64).tolist()}
    return parse_preprocessing(calibrated, f"calibration scale {scale_64.tolist()}, shift {shift_64.tolist()}")


# ---------------------------------------------------------------- a folder


@dataclass
class SkippedFile:
    path: str  # printable (see display_path)
    reason: str


@dataclass
class ArraySplit:
    """Decoded images of one split: uint8 images, int64 labels (UNKNOWN_LABEL for unlabeled images), file names,
    sites (one per image, or [] when none has a site)."""

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
        """Images per class; images of unknown class are not counted."""
        counts = torch.bincount(self.labels[self.labels >= 0], minlength=len(CLASS_NAMES)).tolist()
        return dict(zip(CLASS_NAMES, counts, strict=True))


def split_to_arrays(split: ArraySplit, prefix: str = "") -> dict[str, np.ndarray]:
    """An ArraySplit as plain arrays (uint8, int64, unicode) for an .npz: nothing to unpickle."""
    return {
        f"{prefix}images": split.images.numpy(),
        f"{prefix}labels": split.labels.numpy().astype(np.int64),
        f"{prefix}files": np.array(split.files, dtype=str),
        f"{prefix}sites": np.array(split.sites, dtype=str),
    }


def split_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str = "", *,
                      unknown_labels: bool = False) -> ArraySplit:
    """The inverse of ``split_to_arrays``, checking every dtype, shape and label (with ``unknown_labels``, a
    label may also be UNKNOWN_LABEL).

    Raises ArtefactError with the bad array's name; callers add the file.
    """
    try:
        images, labels = arrays[f"{prefix}images"], arrays[f"{prefix}labels"]
        files, sites = arrays[f"{prefix}files"], arrays[f"{prefix}sites"]
    except KeyError as err:
        raise ArtefactError(f"array {err.args[0]!r} is missing") from None
    n = len(labels) if labels.ndim == 1 else -1
    if images.dtype != np.uint8 or images.shape != (n, 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ArtefactError(f"{prefix}images must be uint8 of shape (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                            f"got {images.dtype} {images.shape}")
    lowest = UNKNOWN_LABEL if unknown_labels else 0
    if labels.dtype != np.int64 or (n > 0 and not lowest <= labels.min() <= labels.max() < len(CLASS_NAMES)):
        raise ArtefactError(f"{prefix}labels must be int64 class indices {lowest}..{len(CLASS_NAMES) - 1}")
    if files.dtype.kind != "U" or files.shape != (n,):
        raise ArtefactError(f"{prefix}files must be N strings")
    if sites.dtype.kind != "U" or sites.shape not in ((n,), (0,)):
        raise ArtefactError(f"{prefix}sites must be N or 0 strings")
    return ArraySplit(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.copy()),
                      files.tolist(), sites.tolist())


@dataclass
class FolderScan:
    root: Path
    files: dict[str, list[tuple[Path, int]]]  # split -> (file, label)
    ignored: list[SkippedFile]  # not an image by extension, or a name that is not UTF-8

    def cache_key(self, split: str) -> str:
        digest = hashlib.sha256(_PREPROCESSING_VERSION.encode())
        for path, label in self.files[split]:
            try:
                stat = path.stat()
            except OSError as err:
                raise DataError(f"cannot read {display_path(path)}: {err.strerror or err}") from None
            rel = path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def scan_folder(root: str | Path) -> FolderScan:
    """List the images of a Kaggle-layout folder, or raise DataError saying what is wrong."""
    return _listed(_scan, Path(root))


def scan_pools(root: str | Path) -> FolderScan:
    """List the evaluation pools of a data folder (``Pools/<site>/<class>/*``), as one split ``Pools``."""
    return _listed(_scan_pools, Path(root))


def _listed(scan: Callable[[Path], FolderScan], root: Path) -> FolderScan:
    try:
        return scan(root)
    except OSError as err:  # a folder or file without read permission, an I/O error
        where = display_path(err.filename) if err.filename else display_path(root)
        raise DataError(f"cannot read {where}: {err.strerror or err}; check its permissions") from None


def _require_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder does not exist: {display_path(root)}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {display_path(root)}")


def _scan(root: Path) -> FolderScan:
    _require_folder(root)
    files: dict[str, list[tuple[Path, int]]] = {}
    ignored: list[SkippedFile] = []
    expected = f"expected {display_path(root)}/<Training|Testing>/<{'|'.join(CLASS_NAMES)}>/*.jpg (the Kaggle layout)"
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"missing folder {display_path(split_dir)}; {expected}")
        files[split] = _scan_classes(split_dir, expected, ignored)
    return FolderScan(root=root, files=files, ignored=ignored)


def _scan_pools(root: Path) -> FolderScan:
    """No Pools folder is no pools (the real set); a site folder is held to the layout of a split."""
    _require_folder(root)
    pools = root / POOL_DIR
    ignored: list[SkippedFile] = []
    if not pools.exists():
        return FolderScan(root=root, files={POOL_DIR: []}, ignored=ignored)
    expected = f"expected {display_path(pools)}/<site>/<{'|'.join(CLASS_NAMES)}>/*.jpg (one folder per site)"
    if not pools.is_dir():
        raise DataError(f"{display_path(pools)} is not a folder; {expected}, or no {POOL_DIR} at all")
    entries: list[tuple[Path, int]] = []
    for site_dir in sorted(p for p in pools.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not SITE_NAME.fullmatch(site_dir.name):
            raise DataError(f"pool folder {display_path(site_dir)} is not a site name; a site is 1-48 letters, "
                            f"digits, '.', '_' or '-', starting with a letter or digit")
        entries += _scan_classes(site_dir, expected, ignored)
    return FolderScan(root=root, files={POOL_DIR: entries}, ignored=ignored)


def _unlabeled_site(rel: str) -> str:
    """The site of an unlabeled image: its first folder below the root when that is a site name, else ''."""
    first, below, _ = rel.partition("/")
    return first if below and SITE_NAME.fullmatch(first) else ""


def _link_refused(link: Path, top: Path, blocked: list[Path]) -> str | None:
    """Why a symbolic link is not followed (it leads outside the scanned folder or into an excluded site), or None."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return "a symbolic link that cannot be resolved; not followed"
    if not target.is_relative_to(top):
        return "a symbolic link to outside the folder; not followed"
    if any(target.is_relative_to(folder) for folder in blocked):
        return "a symbolic link into an excluded site's folder; not followed"
    return None


def _scan_unlabeled(root: Path, excluded: frozenset[str]) -> FolderScan:
    """Every image file under root as one split ``Unlabeled`` (sorted by path, label UNKNOWN_LABEL): hidden names
    skipped, excluded sites' folders not entered, links to files followed only inside root and outside those
    folders. Links to folders are not followed: every folder inside root is scanned at its own path, so one
    would only list images twice (or loop)."""
    _require_folder(root)
    top = root.resolve()
    blocked = [(root / site).resolve() for site in sorted(excluded) if site and (root / site).is_dir()]
    entries: list[tuple[Path, int]] = []
    ignored: list[SkippedFile] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if not _is_utf8(path.name):
                ignored.append(SkippedFile(display_path(path), "name is not valid UTF-8; rename it"))
                continue
            is_dir = path.is_dir()
            if folder == root and (path.name if is_dir and SITE_NAME.fullmatch(path.name) else "") in excluded:
                continue
            if path.is_symlink():
                refused = _link_refused(path, top, blocked)
                if refused is None and is_dir:
                    refused = "a symbolic link to a folder; not followed (each folder inside is read at its own path)"
                if refused is not None:
                    ignored.append(SkippedFile(display_path(path), refused))
                    continue
            if is_dir:
                folders.append(path)
            elif not path.is_file():
                continue
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(SkippedFile(display_path(path), f"not an image extension ({path.suffix or 'none'})"))
            elif len(entries) == MAX_UNLABELED_IMAGES:
                raise DataError(f"{display_path(root)} holds more than {MAX_UNLABELED_IMAGES:,} images; allowed: at "
                                f"most {MAX_UNLABELED_IMAGES:,} (MAX_UNLABELED_IMAGES); point at the transfer folder "
                                f"itself, e.g. ROOT/{UNLABELED_DIR}")
            else:
                entries.append((path, UNKNOWN_LABEL))
    entries.sort(key=lambda entry: entry[0].relative_to(root).as_posix())
    return FolderScan(root=root, files={UNLABELED_DIR: entries}, ignored=ignored)


def _scan_classes(split_dir: Path, expected: str, ignored: list[SkippedFile]) -> list[tuple[Path, int]]:
    """(file, label) of every image under split_dir/<class>/; every class folder must exist and hold one."""
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p for p in class_dirs if p.name not in CLASS_NAMES]
    if unknown:
        raise DataError(f"unknown class folder {display_path(unknown[0])}; allowed class folders: "
                        f"{', '.join(CLASS_NAMES)}")
    entries: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(f"missing class folder {display_path(class_dir)}; {expected}")
        found = 0
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if not _is_utf8(path.name):
                ignored.append(SkippedFile(display_path(path), "file name is not valid UTF-8; rename the file"))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(SkippedFile(display_path(path), f"not an image extension ({path.suffix or 'none'})"))
                continue
            entries.append((path, label))
            found += 1
        if found == 0:
            raise DataError(f"class folder {display_path(class_dir)} has no images; every class needs at least one")
    return entries


def _decode_one(path: Path) -> tuple[np.ndarray | None, str | None, bool]:
    """(pixels, None, False), or (None, reason, retry): retry when the file could not be read just now."""
    try:
        return load_image_uint8(path), None, False
    except BadImageError as err:
        return None, str(err), isinstance(err, UnreadableFileError)


def _read_sites(root: Path) -> dict[str, str]:
    """Site of each file from metadata.csv (the synthetic set and partition manifests)."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        return {}
    shown = display_path(meta)
    sites: dict[str, str] = {}
    try:
        with meta.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "file" not in (reader.fieldnames or []):
                raise DataError(f"{shown} has no 'file' column; it needs 'file' and 'site' columns")
            for row in reader:
                site = row.get("site") or ""
                if site and not SITE_NAME.fullmatch(site):
                    raise DataError(f"{shown} line {reader.line_num}: site {site[:80]!r} is not allowed; a site is "
                                    f"1-48 letters, digits, '.', '_' or '-', starting with a letter or digit")
                if row.get("file"):
                    sites[row["file"]] = site
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {shown}: {err}; it must be a UTF-8 CSV with 'file' and 'site' columns") from None
    return sites


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
            "root": display_path(self.root),
            "fingerprint": self.fingerprint,
            "Training": self.train.class_counts(),
            "Testing": self.test.class_counts(),
            "skipped": len(self.skipped),
        }


# ---------------------------------------------------------------- the decoded cache


def user_cache_dir() -> Path:
    """The user's own cache folder: $EDGEMRI_CACHE_DIR, else $XDG_CACHE_HOME/edgemri, else ~/.cache/edgemri."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "edgemri"
    try:
        return Path.home() / ".cache" / "edgemri"
    except RuntimeError:  # no HOME and no passwd entry
        raise DataError(f"cannot find a folder for the decoded-image cache; set {CACHE_ENV} or data.cache_dir") \
            from None


def _cache_file(scan: FolderScan, split: str, key: str, cache_dir: str | Path | None) -> Path:
    # One subfolder per data folder (by its resolved absolute path), so two folders never share files.
    folder = hashlib.sha256(os.fsencode(scan.root.resolve())).hexdigest()[:16]
    base = Path(cache_dir) if cache_dir else user_cache_dir()
    return base / "decoded" / folder / f"{split.lower()}-{key[:20]}.npz"


def cache_path(scan: FolderScan, split: str, cache_dir: str | Path | None = None) -> Path:
    """Where the decoded cache of this split of this folder, as it is now, lives."""
    return _cache_file(scan, split, scan.cache_key(split), cache_dir)


def _read_cache(path: Path, scan: FolderScan, split: str, key: str) -> tuple[ArraySplit, list[SkippedFile]] | None:
    """The cached split, or None when there is none or it is not exactly this split's (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        expected = {"format", "key", "preprocessing", "images", "labels", "files", "sites", "skipped_files",
                    "skipped_reasons"}
        if set(arrays) != expected:
            raise ArtefactError(f"arrays {sorted(arrays)}, expected {sorted(expected)}")
        header = [arrays[name] for name in ("format", "key", "preprocessing")]
        wanted = [_CACHE_FORMAT, key, _PREPROCESSING_JSON]
        if [str(a) if a.dtype.kind == "U" and a.shape == () else None for a in header] != wanted:
            raise ArtefactError("it was written for another folder state, preprocessing or format")
        cached = split_from_arrays(arrays, unknown_labels=split == UNLABELED_DIR)
        skipped, reasons = arrays["skipped_files"], arrays["skipped_reasons"]
        if {skipped.dtype.kind, reasons.dtype.kind} != {"U"} or skipped.ndim != 1 or skipped.shape != reasons.shape:
            raise ArtefactError("skipped_files and skipped_reasons must be strings of one length")
        # Every file of the split exactly once, either decoded (with its folder's label) or skipped.
        labels = {scan.rel(p): label for p, label in scan.files[split]}
        decoded_labels = [labels.get(f) for f in cached.files]
        if sorted(cached.files + skipped.tolist()) != sorted(labels) or cached.labels.tolist() != decoded_labels:
            raise ArtefactError("its files or labels are not this folder's")
    except ArtefactError as err:
        log.warning("ignoring the decoded cache %s (%s); decoding the images again", path, err)
        return None
    return cached, [SkippedFile(display_path(scan.root / rel), str(reason))
                    for rel, reason in zip(skipped.tolist(), reasons.tolist(), strict=True)]


def _write_cache(path: Path, split: str, key: str, data: ArraySplit, skipped: list[tuple[str, str]]) -> None:
    """Save the split (mode 0600: decoded scans are patient data) and drop the folder's older caches.

    A cache that cannot be written is only a warning: the images are decoded again next time.
    """
    arrays = {
        "format": np.array(_CACHE_FORMAT), "key": np.array(key),
        "preprocessing": np.array(_PREPROCESSING_JSON),
        **split_to_arrays(data),
        "skipped_files": np.array([rel for rel, _ in skipped], dtype=str),
        "skipped_reasons": np.array([reason for _, reason in skipped], dtype=str),
    }
    write_cache_file(path, arrays, f"{split.lower()}-*.npz", "the decoded cache", "decoded")


def write_cache_file(path: Path, arrays: Mapping[str, np.ndarray], stale: str, what: str, redo: str) -> None:
    """Save a cache of plain arrays (mode 0600: derived from patient data) and drop the older files its folder
    holds for the same thing (``stale``, a glob). A cache that cannot be written is only a warning: the work is
    redone next time (``redo``: what is done again, e.g. "decoded")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_npz(path, dict(arrays), mode=0o600)
        for old in path.parent.glob(stale):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not write %s %s (%s); the images will be %s again next time", what, path,
                    err.strerror or err, redo)


def _decode_split(
    scan: FolderScan, split: str, workers: int, progress: bool
) -> tuple[ArraySplit, list[tuple[str, str]], list[tuple[str, str]]]:
    """Decode every file: (split, skips of bad content, skips of files that could not be read now)."""
    from tqdm import tqdm

    entries = scan.files[split]
    paths = [p for p, _ in entries]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results: Iterable = pool.map(_decode_one, paths, chunksize=32)
            results = list(tqdm(results, total=len(paths), desc=f"decode {split}", disable=not progress))
    else:
        results = [_decode_one(p) for p in tqdm(paths, desc=f"decode {split}", disable=not progress)]
    images, labels, files, bad, unreadable = [], [], [], [], []
    for (path, label), (array, reason, retry) in zip(entries, results, strict=True):
        rel = scan.rel(path)
        if array is None:
            (unreadable if retry else bad).append((rel, reason or "unreadable"))
            continue
        images.append(array)
        labels.append(label)
        files.append(rel)
    stacked = (
        torch.from_numpy(np.stack(images))
        if images
        else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    )
    return ArraySplit(images=stacked, labels=torch.tensor(labels, dtype=torch.long), files=files), bad, unreadable


def cache_status(root: str | Path, cache_dir: str | Path | None = None) -> dict[str, bool]:
    """Whether each split's decoded cache matches the folder as it is now."""
    scan = scan_folder(root)
    return {split: cache_path(scan, split, cache_dir).is_file() for split in SPLITS}


def _load_split(scan: FolderScan, split: str, cache_dir: str | Path | None, workers: int,
                progress: bool) -> tuple[ArraySplit, list[SkippedFile]]:
    """One split from its verified cache, or decoded and cached; a file that could not be read is not
    cached as skipped, so it is tried again next time."""
    key = scan.cache_key(split)
    path = _cache_file(scan, split, key, cache_dir)
    cached = _read_cache(path, scan, split, key)
    if cached is not None:
        return cached
    data, bad, unreadable = _decode_split(scan, split, workers, progress)
    if unreadable:
        log.warning("%d file(s) of %s in %s could not be read; not caching %s, so they are tried again next time",
                    len(unreadable), split, display_path(scan.root), split)
    else:
        _write_cache(path, split, key, data, bad)
    return data, [SkippedFile(display_path(scan.root / rel), reason) for rel, reason in bad + unreadable]


def _require_usable(scan: FolderScan, split: str, data: ArraySplit, skipped: list[SkippedFile]) -> None:
    """Training needs a readable image of every class (else the model learns a class from nothing)."""
    if len(data) == 0:
        raise DataError(f"no readable images in {display_path(scan.root / split)}; every file was skipped "
                        f"(see the warnings above)")
    if split != "Training":
        return
    for name, count in data.class_counts().items():
        if count == 0:
            folder = display_path(scan.root / split / name)
            first = next((s for s in skipped if s.path.startswith(folder + os.sep)), None)
            why = f" (e.g. {first.path}: {first.reason})" if first else ""
            raise DataError(f"class folder {folder} has no usable image: every file was skipped{why}; every "
                            f"class needs at least one readable image in Training")


def _with_sites(split: ArraySplit, sites: dict[str, str]) -> ArraySplit:
    site_list = [sites.get(f, "") for f in split.files]
    return ArraySplit(split.images, split.labels, split.files, site_list if any(site_list) else [])


def load_dataset(
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> Dataset:
    """Scan, decode (once, cached) and return both splits of a Kaggle-layout folder.

    Sites are read from metadata.csv on every load (cheap), so editing it needs no re-decode.
    """
    scan = scan_folder(root)
    workers = _workers(workers)
    sites = _read_sites(scan.root)
    splits: dict[str, ArraySplit] = {}
    skipped: list[SkippedFile] = []
    for split in (None, *SPLITS):
        if split is None:  # what the scan ignored
            split_skipped = scan.ignored
        else:
            split_data, split_skipped = _load_split(scan, split, cache_dir, workers, progress)
        for item in split_skipped:
            log.warning("skipped %s: %s", item.path, item.reason)
        skipped.extend(split_skipped)
        if split is not None:
            _require_usable(scan, split, split_data, split_skipped)
            splits[split] = _with_sites(split_data, sites)
    fingerprint = hashlib.sha256(
        "".join(scan.cache_key(s) for s in SPLITS).encode()
    ).hexdigest()[:16]
    return Dataset(root=scan.root, train=splits["Training"], test=splits["Testing"],
                   skipped=skipped, fingerprint=fingerprint)


def _workers(workers: int | None) -> int:
    return workers or min(4, os.cpu_count() or 1)


def load_pools(root: str | Path, cache_dir: str | Path | None = None, *, workers: int | None = None,
               progress: bool = False) -> dict[str, ArraySplit]:
    """Each site's evaluation pool, ``Pools/<site>/<class>/*.jpg`` (sorted by site; sites from the folder names),
    decoded once and cached like Training and Testing; {} when the folder has no Pools (the real set: see
    ``pools_from_testing``). Training, Testing and the fingerprint do not depend on the pools.
    """
    scan = scan_pools(root)
    if not scan.files[POOL_DIR]:
        return {}
    data, skipped = _load_split(scan, POOL_DIR, cache_dir, _workers(workers), progress)
    for item in [*scan.ignored, *skipped]:
        log.warning("skipped %s: %s", item.path, item.reason)
    members: dict[str, list[int]] = {}
    for index, rel in enumerate(data.files):
        members.setdefault(rel.split("/")[1], []).append(index)
    pools = {}
    for site in sorted({scan.rel(path).split("/")[1] for path, _ in scan.files[POOL_DIR]}):
        pool = data.subset(members.get(site, []))
        _require_usable(scan, f"{POOL_DIR}/{site}", pool, skipped)
        pools[site] = ArraySplit(pool.images, pool.labels, pool.files, [site] * len(pool))
    return pools


def load_unlabeled(root: str | Path, cache_dir: str | Path | None = None, *, exclude_sites: Collection[str] = (),
                   workers: int | None = None, progress: bool = False) -> ArraySplit:
    """Every image under ``root`` with label UNKNOWN_LABEL (-1): the unlabeled transfer set that distillation scores
    with the teacher (the synthetic set's ``ROOT/Unlabeled``, or any folder of images).

    The folder is scanned recursively and sorted by path (hidden names skipped, other files skipped with a
    warning, symbolic links followed only inside ``root``) and decoded once and cached like Training and Testing.
    An image's site is its first folder below ``root`` when that is a site name, else "" (``sites`` is [] when
    no image has one). ``exclude_sites`` (site names, or "" for images without one) drops those sites' images
    before anything is read: the server must not see the federation's new sites.

    Raises DataError (one line) for a missing folder, a bad excluded site, no images (left), more than
    MAX_UNLABELED_IMAGES, or no readable image.
    """
    if isinstance(exclude_sites, str):
        raise TypeError(f"exclude_sites must be a collection of site names, not the string {exclude_sites!r}")
    excluded = frozenset(exclude_sites)
    bad = next((s for s in sorted(excluded, key=repr) if not isinstance(s, str) or (s and not SITE_NAME.fullmatch(s))),
               None)
    if bad is not None:
        raise DataError(f"excluded site {str(bad)[:80]!r} is not a site name; a site is 1-48 letters, digits, '.', "
                        f"'_' or '-', starting with a letter or digit (or '' for images without a site)")
    root = Path(root)
    scan = _listed(partial(_scan_unlabeled, excluded=excluded), root)
    if not scan.files[UNLABELED_DIR]:
        left = f" outside the excluded sites {sorted(excluded)}" if excluded else ""
        raise DataError(f"no images in {display_path(root)}{left}; expected image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}), e.g. {display_path(root)}/<site>/*.jpg")
    data, skipped = _load_split(scan, UNLABELED_DIR, cache_dir, _workers(workers), progress)
    for item in [*scan.ignored, *skipped]:
        log.warning("skipped %s: %s", item.path, item.reason)
    if len(data) == 0:
        raise DataError(f"no readable images in {display_path(root)}; every file was skipped (see the warnings above)")
    return _with_sites(data, {rel: _unlabeled_site(rel) for rel in data.files})


def pools_from_testing(dataset: Dataset) -> dict[str, ArraySplit]:
    """Each site's share of Testing as its evaluation pool (sorted by site): the stand-in for ``Pools/`` on data
    that has none, such as the real set (pass ``sited_dataset``'s: appearance sites); {} when Testing has no sites."""
    sites = dataset.test.sites
    unsited = sites.count("")
    if unsited:
        log.warning("%d Testing image(s) of %s have no site and are in no evaluation pool", unsited,
                    display_path(dataset.root))
    return {site: dataset.test.subset([i for i, s in enumerate(sites) if s == site])
            for site in sorted(set(sites) - {""})}


def stratified_split(labels: Tensor, fraction: float, seed: int,
                     groups: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Indices (train, val): ``fraction`` of each class goes to val, seeded.

    ``groups`` (one id per row, e.g. the duplicate audit's groups of one scan): every group goes whole to one
    side, so no copy of a validation scan is trained on; a group counts toward the class of its first row.
    """
    if groups is not None:
        return _grouped_split(labels, fraction, seed, groups)
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


def _grouped_split(labels: Tensor, fraction: float, seed: int, groups: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``stratified_split`` over whole groups: per class, groups in seeded order go to val until it holds
    ``fraction`` of the class's rows (at least one group, never every group of a class)."""
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} ids for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(int(group), []).append(row)
    by_class: dict[int, list[list[int]]] = {}
    for rows in members.values():
        by_class.setdefault(int(labels[rows[0]]), []).append(rows)
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in sorted(by_class):
        class_groups = by_class[label]
        quota = round(sum(len(g) for g in class_groups) * fraction)
        taken = 0
        for k in torch.randperm(len(class_groups), generator=generator).tolist()[: max(len(class_groups) - 1, 0)]:
            if taken >= max(quota, 1):
                break
            val += class_groups[k]
            taken += len(class_groups[k])
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[torch.tensor(val, dtype=torch.long)] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def _stored_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the header; None when the file cannot be opened now."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError):
        return None


def describe_folder(root: str | Path, cache_dir: str | Path | None = None,
                    progress: bool = False) -> dict[str, object]:
    """What the loader sees in a folder (``edgemri data info``); decodes it once if needed."""
    was_current = cache_status(root, cache_dir)
    dataset = load_dataset(root, cache_dir=cache_dir, progress=progress)
    sizes = [size for rel in dataset.train.files + dataset.test.files
             if (size := _stored_size(dataset.root / rel)) is not None]
    widths, heights = [w for w, _ in sizes] or [0], [h for _, h in sizes] or [0]
    return {
        "root": display_path(dataset.root),
        "images": {"Training": dataset.train.class_counts(), "Testing": dataset.test.class_counts()},
        "total": len(dataset.train) + len(dataset.test),
        "sites": sorted(set(dataset.train.sites) | set(dataset.test.sites)),
        "width_range": [min(widths), max(widths)],
        "height_range": [min(heights), max(heights)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in dataset.skipped],
        "cache_was_current": was_current,
        "fingerprint": dataset.fingerprint,
    }


def pick_source_sites(split: ArraySplit, count: int | None, seed: int) -> tuple[str, ...]:
    """The sites the server distills on under new-sites (sorted names): ``count`` of them (None: half, rounded
    down, at least 1), a seeded choice over the sorted site names, so every run seed keeps the same split.

    Raises DataError when an image has no site or too few sites are left for the clients.
    """
    unsited = next((f for f, s in zip(split.files, split.sites or [""] * len(split), strict=True) if not s), None)
    if unsited is not None:
        what = "this data has no site metadata" if not split.sites else f"Training image {unsited} has none"
        raise DataError(f"federation.scenario 'new-sites' needs a scanner site for every Training image (the data "
                        f"folder's metadata.csv, columns 'file' and 'site'); {what}; use federation.scenario "
                        f"seen-sites")
    names = sorted(set(split.sites))
    if len(names) < 2:
        raise DataError(f"federation.scenario 'new-sites' needs at least 2 sites in Training (source sites for "
                        f"the server, the others for the clients); this data has 1 ({names[0]}); use "
                        f"federation.scenario seen-sites")
    count = max(1, len(names) // 2) if count is None else count
    if not 1 <= count < len(names):
        raise DataError(f"federation.source_sites is {count} but Training has {len(names)} sites "
                        f"({', '.join(names)}); allowed: 1 to {len(names) - 1} (at least one site is left for the "
                        f"clients), or null for half of them")
    picked = np.random.default_rng(seed).choice(len(names), size=count, replace=False)
    return tuple(sorted(names[i] for i in picked))


def server_client_split(split: ArraySplit, client_fraction: float, seed: int, *, scenario: str = "seen-sites",
                        source_sites: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices (server, clients) of Training, disjoint, fixed by ``seed`` (data.split_seed) alone.

    The server distills on its share; the federation's clients hold the rest, so every
    client's local test is data the distilled student never saw. seen-sites: stratified by
    site and class, ``client_fraction`` of every site goes to the clients (0: they reuse the
    server's data). new-sites: by site, the server takes every image of the source sites
    (``pick_source_sites``) and the clients every image of the others, so no client is at a
    site the student has seen; ``client_fraction`` is not used.
    """
    if scenario not in SCENARIOS:
        raise DataError(f"federation.scenario {scenario!r} is not allowed; allowed: {', '.join(SCENARIOS)}")
    if scenario == "new-sites":
        source = set(pick_source_sites(split, source_sites, seed))
        at_source = torch.tensor([site in source for site in split.sites])
        return torch.nonzero(at_source).flatten(), torch.nonzero(~at_source).flatten()
    everything = torch.arange(len(split))
    if client_fraction == 0:
        return everything, everything
    site_ids = {site: k for k, site in enumerate(sorted(set(split.sites)))} if split.sites else {}
    strata = split.labels + len(CLASS_NAMES) * torch.tensor([site_ids.get(s, 0) for s in split.sites]
                                                           if split.sites else [0] * len(split))
    return stratified_split(strata, client_fraction, seed)


def sited_training(split: ArraySplit, config: Config) -> ArraySplit:
    """Training with metadata.csv's sites, else with ``federation.partition.pseudo_sites`` appearance sites
    (``edgemri.core.sites``) clustered over the whole split and seeded by ``data.split_seed`` alone, so the
    server's distillation and the clients' partition find the same sites. Raises DataError for a bad count.
    """
    if split.sites:
        return split
    from edgemri.core.sites import cluster_sites  # not at the top: edgemri.core.sites builds on this module

    sites = cluster_sites(split, config.federation.partition.pseudo_sites, config.data.split_seed,
                          setting=PSEUDO_SITES_KEY)
    return ArraySplit(split.images, split.labels, split.files, sites)


def sited_dataset(dataset: Dataset, config: Config) -> Dataset:
    """Both splits with sites: metadata.csv's, else Training's appearance sites as ``sited_training`` finds
    them and each Testing image at its nearest one (``pools_from_testing`` then has per-site pools)."""
    from edgemri.core.sites import with_appearance_sites  # not at the top: it builds on this module

    return with_appearance_sites(dataset, config.federation.partition.pseudo_sites, config.data.split_seed,
                                 setting=PSEUDO_SITES_KEY)


def scenario_split(split: ArraySplit, config: Config) -> tuple[Tensor, Tensor]:
    """``server_client_split`` under the config's scenario: the one call distillation and partitioning make,
    so the server and the clients can never disagree on who holds which image.

    new-sites splits data without metadata.csv by its appearance sites (``sited_training``); seen-sites
    splits it by class alone, as it always has, so appearance sites never move the distillation share.
    """
    if config.federation.scenario == "new-sites" and not split.sites:
        if (config.federation.partition.pseudo_sites or 2) < 2:  # null: automatic, at least 2
            raise DataError(f"federation.scenario 'new-sites' on data without site metadata needs at least 2 "
                            f"appearance sites (source sites for the server, the others for the clients); "
                            f"{PSEUDO_SITES_KEY} is {config.federation.partition.pseudo_sites}; allowed: 2 or more")
        split = sited_training(split, config)
    return server_client_split(split, config.data.client_fraction, config.data.split_seed,
                               scenario=config.federation.scenario, source_sites=config.federation.source_sites)
