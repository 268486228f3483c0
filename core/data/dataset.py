"""A Kaggle-layout folder in, uint8 arrays out: the folder scan, the decoded cache and the loaders.

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
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from edgemri.core.data.images import (
    CLASS_NAMES,
    IMAGE_SIZE,
    PREPROCESSING,
    BadImageError,
    DataError,
    UnreadableFileError,
    is_utf8,
    load_image_uint8,
)
from edgemri.core.errors import printable
from edgemri.core.io import ArtefactError, load_npz, save_npz
from edgemri.core.progress import track
from edgemri.core.untrusted import read_json
from edgemri.core.workers import worker_pool

log = logging.getLogger(__name__)
SPLITS = ("Training", "Testing")
POOL_DIR = "Pools"  # per-site evaluation pools, Pools/<site>/<class>/*.jpg (core/data/synth)
UNLABELED_DIR = "Unlabeled"  # per-site transfer images, Unlabeled/<site>/*.jpg (core/data/synth)
UNKNOWN_LABEL = -1  # the label of every image load_unlabeled returns
MAX_UNLABELED_IMAGES = 200_000  # more is a wrong folder (a home folder?), and would not fit in memory decoded
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SYNTH_GENERATOR = "edgemri.core.synth"  # the "generator" core/data/synth writes into the set's synth.json
# Site names end up in client names, file names and reports: a short, path-safe token (or empty).
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
CACHE_ENV = "EDGEMRI_CACHE_DIR"
_PREPROCESSING_JSON = json.dumps(PREPROCESSING, sort_keys=True)
_PREPROCESSING_VERSION = hashlib.sha256(_PREPROCESSING_JSON.encode()).hexdigest()[:12]
_CACHE_FORMAT = "edgemri.decoded/1"


# ---------------------------------------------------------------- a folder


@dataclass
class SkippedFile:
    path: str  # printable (core/errors.printable)
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
                raise DataError(f"cannot read {printable(path)}: {err.strerror or err}") from None
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
        where = printable(err.filename) if err.filename else printable(root)
        raise DataError(f"cannot read {where}: {err.strerror or err}; check its permissions") from None


def confined(path: Path, root: Path) -> Path:
    """``path`` (below ``root``) with every symbolic link resolved; DataError, before anything there is opened, when
    that leaves the resolved ``root``: a link in a downloaded data folder must not make the loader read, count or
    list a file outside it (``/etc/passwd``, another patient's scans). Links that stay inside are fine."""
    rel, shown_root = printable(path.relative_to(root).as_posix()), printable(root)
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        raise DataError(f"{rel} in the data root {shown_root} is a symbolic link that cannot be resolved (a loop?); "
                        f"remove it") from None
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{rel} leaves the data root {shown_root} (a symbolic link that resolves outside the data "
                        f"root); links may only point inside it, so copy the file in instead")
    return target


def _require_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder does not exist: {printable(root)}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {printable(root)}")


def _scan(root: Path) -> FolderScan:
    _require_folder(root)
    files: dict[str, list[tuple[Path, int]]] = {}
    ignored: list[SkippedFile] = []
    expected = f"expected {printable(root)}/<Training|Testing>/<{'|'.join(CLASS_NAMES)}>/*.jpg (the Kaggle layout)"
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"missing folder {printable(split_dir)}; {expected}")
        files[split] = _scan_classes(root, split_dir, expected, ignored)
    return FolderScan(root=root, files=files, ignored=ignored)


def _scan_pools(root: Path) -> FolderScan:
    """No Pools folder is no pools (the real set); a site folder is held to the layout of a split."""
    _require_folder(root)
    pools = root / POOL_DIR
    ignored: list[SkippedFile] = []
    if not pools.exists():
        return FolderScan(root=root, files={POOL_DIR: []}, ignored=ignored)
    expected = f"expected {printable(pools)}/<site>/<{'|'.join(CLASS_NAMES)}>/*.jpg (one folder per site)"
    if not pools.is_dir():
        raise DataError(f"{printable(pools)} is not a folder; {expected}, or no {POOL_DIR} at all")
    entries: list[tuple[Path, int]] = []
    for site_dir in sorted(p for p in pools.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not SITE_NAME.fullmatch(site_dir.name):
            raise DataError(f"pool folder {printable(site_dir)} is not a site name; a site is 1-48 letters, "
                            f"digits, '.', '_' or '-', starting with a letter or digit")
        entries += _scan_classes(root, site_dir, expected, ignored)
    return FolderScan(root=root, files={POOL_DIR: entries}, ignored=ignored)


def _unlabeled_site(rel: str) -> str:
    """The site of an unlabeled image: its first folder below the root when that is a site name, else ''."""
    first, below, _ = rel.partition("/")
    return first if below and SITE_NAME.fullmatch(first) else ""


def _link_refused(link: Path, root: Path, blocked: list[Path]) -> str | None:
    """Why a symbolic link is not followed (it leads outside the scanned folder or into an excluded site), or None."""
    try:
        target = confined(link, root)
    except DataError:
        return "a symbolic link to outside the folder, or one that cannot be resolved; not followed"
    if any(target.is_relative_to(folder) for folder in blocked):
        return "a symbolic link into an excluded site's folder; not followed"
    return None


def _scan_unlabeled(root: Path, excluded: frozenset[str]) -> FolderScan:
    """Every image file under root as one split ``Unlabeled`` (sorted by path, label UNKNOWN_LABEL): hidden names
    skipped, excluded sites' folders not entered, links to files followed only inside root and outside those
    folders. Links to folders are not followed: every folder inside root is scanned at its own path, so one
    would only list images twice (or loop)."""
    _require_folder(root)
    blocked = [(root / site).resolve() for site in sorted(excluded) if site and (root / site).is_dir()]
    entries: list[tuple[Path, int]] = []
    ignored: list[SkippedFile] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if not is_utf8(path.name):
                ignored.append(SkippedFile(printable(path), "name is not valid UTF-8; rename it"))
                continue
            is_dir = path.is_dir()
            if folder == root and (path.name if is_dir and SITE_NAME.fullmatch(path.name) else "") in excluded:
                continue
            if path.is_symlink():
                refused = _link_refused(path, root, blocked)
                if refused is None and is_dir:
                    refused = "a symbolic link to a folder; not followed (each folder inside is read at its own path)"
                if refused is not None:
                    ignored.append(SkippedFile(printable(path), refused))
                    continue
            if is_dir:
                folders.append(path)
            elif not path.is_file():
                continue
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(SkippedFile(printable(path), f"not an image extension ({path.suffix or 'none'})"))
            elif len(entries) == MAX_UNLABELED_IMAGES:
                raise DataError(f"{printable(root)} holds more than {MAX_UNLABELED_IMAGES:,} images; allowed: at "
                                f"most {MAX_UNLABELED_IMAGES:,} (MAX_UNLABELED_IMAGES); point at the transfer folder "
                                f"itself, e.g. ROOT/{UNLABELED_DIR}")
            else:
                entries.append((path, UNKNOWN_LABEL))
    entries.sort(key=lambda entry: entry[0].relative_to(root).as_posix())
    return FolderScan(root=root, files={UNLABELED_DIR: entries}, ignored=ignored)


def _scan_classes(root: Path, split_dir: Path, expected: str, ignored: list[SkippedFile]) -> list[tuple[Path, int]]:
    """(file, label) of every image under split_dir/<class>/; every class folder must exist and hold one. Each folder
    and each link on the way is ``confined`` to ``root`` (a plain entry of a confined folder is inside it)."""
    confined(split_dir, root)
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p for p in class_dirs if p.name not in CLASS_NAMES]
    if unknown:
        raise DataError(f"unknown class folder {printable(unknown[0])}; allowed class folders: "
                        f"{', '.join(CLASS_NAMES)}")
    entries: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(f"missing class folder {printable(class_dir)}; {expected}")
        confined(class_dir, root)
        found = 0
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_symlink():
                confined(path, root)
            if not path.is_file():
                continue
            if not is_utf8(path.name):
                ignored.append(SkippedFile(printable(path), "file name is not valid UTF-8; rename the file"))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(SkippedFile(printable(path), f"not an image extension ({path.suffix or 'none'})"))
                continue
            entries.append((path, label))
            found += 1
        if found == 0:
            raise DataError(f"class folder {printable(class_dir)} has no images; every class needs at least one")
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
    confined(meta, root)
    shown = printable(meta)
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


def is_synthetic(root: str | Path) -> bool:
    """Whether ``root`` is edgemri's synthetic set (its generator's synth.json), so holds no real person's scans:
    the reports draw scans from it without being asked."""
    try:
        info = read_json(Path(root) / "synth.json", DataError)
    except DataError:
        return False
    return isinstance(info, dict) and info.get("generator") == SYNTH_GENERATOR


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
            "root": printable(self.root),
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
    return cached, [SkippedFile(printable(scan.root / rel), str(reason))
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
    entries = scan.files[split]
    paths = [p for p, _ in entries]
    if workers > 1 and len(paths) > 64:
        with worker_pool(workers) as pool:
            results: Iterable = pool.map(_decode_one, paths, chunksize=32)
            results = list(track(results, f"decode {split}", total=len(paths), enabled=progress, unit="images"))
    else:
        results = [_decode_one(p) for p in track(paths, f"decode {split}", enabled=progress, unit="images")]
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
                    len(unreadable), split, printable(scan.root), split)
    else:
        _write_cache(path, split, key, data, bad)
    return data, [SkippedFile(printable(scan.root / rel), reason) for rel, reason in bad + unreadable]


def _require_usable(scan: FolderScan, split: str, data: ArraySplit, skipped: list[SkippedFile]) -> None:
    """Training needs a readable image of every class (else the model learns a class from nothing)."""
    if len(data) == 0:
        raise DataError(f"no readable images in {printable(scan.root / split)}; every file was skipped "
                        f"(see the warnings above)")
    if split != "Training":
        return
    for name, count in data.class_counts().items():
        if count == 0:
            folder = printable(scan.root / split / name)
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
        raise DataError(f"no images in {printable(root)}{left}; expected image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}), e.g. {printable(root)}/<site>/*.jpg")
    data, skipped = _load_split(scan, UNLABELED_DIR, cache_dir, _workers(workers), progress)
    for item in [*scan.ignored, *skipped]:
        log.warning("skipped %s: %s", item.path, item.reason)
    if len(data) == 0:
        raise DataError(f"no readable images in {printable(root)}; every file was skipped (see the warnings above)")
    return _with_sites(data, {rel: _unlabeled_site(rel) for rel in data.files})


def pools_from_testing(dataset: Dataset) -> dict[str, ArraySplit]:
    """Each site's share of Testing as its evaluation pool (sorted by site): the stand-in for ``Pools/`` on data
    that has none, such as the real set (pass ``sited_dataset``'s: appearance sites); {} when Testing has no sites."""
    sites = dataset.test.sites
    unsited = sites.count("")
    if unsited:
        log.warning("%d Testing image(s) of %s have no site and are in no evaluation pool", unsited,
                    printable(dataset.root))
    return {site: dataset.test.subset([i for i, s in enumerate(sites) if s == site])
            for site in sorted(set(sites) - {""})}


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
        "root": printable(dataset.root),
        "images": {"Training": dataset.train.class_counts(), "Testing": dataset.test.class_counts()},
        "total": len(dataset.train) + len(dataset.test),
        "sites": sorted(set(dataset.train.sites) | set(dataset.test.sites)),
        "width_range": [min(widths), max(widths)],
        "height_range": [min(heights), max(heights)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in dataset.skipped],
        "cache_was_current": was_current,
        "fingerprint": dataset.fingerprint,
    }
