"""Which images of a Kaggle-layout folder are the same scan: exact and near duplicates, grouped.

A test accuracy that counts a Testing image whose copy is in Training measures memory, not skill, and
a validation split that puts two copies of one scan on both sides is the same leak one level down.
``audit_dataset`` finds the copies so that distillation can keep every group on one side
(``DuplicateAudit.train_groups``) and score Testing without the leaked images (``leaked_test``).

Two images are the same scan when
- **exact**: their files have the same SHA-256 (byte-identical copies), or
- **near**: their decoded 128 px grey images have pHash (``imagehash.phash``, 64 bits) within
  ``NEAR_MAX_DISTANCE`` bits *and* a Pearson correlation of at least ``NEAR_MIN_CORRELATION``
  (identical decoded pixels always count: every exact copy is also a near one);

and a group is every image linked to another by either rule, transitively (union-find).

Why pHash alone is not enough, measured on the real set (../shared/data/brain-tumor-mri-224,
7,019 images, every pair compared; docs/DATA.md, "Duplicate audit"): axial MRI slices all look alike
at pHash's 8 x 8 DCT scale, so the distance distribution of pairs has no gap between copies and
different scans (phash sets exactly 32 of 64 bits, so distances are even):

    distance              0      2      4      6       8
    pairs             2,307  2,170  1,942  2,892   5,764
    different labels      0      3     36    293   1,541   (certainly different scans)

Rendered pairs at distance 2 to 4 include different patients and tumour types (a glioma and a
meningioma at 2 bits, a sagittal and an axial slice at 4), and grouping by pHash alone chains
hundreds of scans into one group from 6 bits on. Copies, on the other hand, reach 4 to 8 bits when
re-windowed or sharpened. So pHash finds candidates within ``NEAR_MAX_DISTANCE`` = 4 bits and the
pixels decide: at r >= 0.95 every rendered pair was the same slice (re-encoded, resized,
re-windowed), or now and then the adjacent slice of the same series, which is the same patient and
label and belongs in one group anyway; pairs of different labels reach r = 0.944 at most. On the
real set this rule finds no label conflict at all; pHash alone at 4 bits would report 18 false ones.

The search never compares all pairs: multi-index hashing (``near_pairs``) splits the 64 bits into
``max_distance + 1`` chunks, and two hashes within ``max_distance`` bits agree exactly on at least
one chunk (pigeonhole), so only hashes that share a (chunk index, chunk value) bucket are compared.
Identical decoded images (byte copies, blank slices) are one node before the search, so a bucket of
ten thousand blank images costs nothing; a large bucket is compared in blocks of bounded memory.

The per-file hashes are cached next to the decoded-image cache (same folder), as plain arrays keyed by
the split's ``FolderScan.cache_key`` and checked on read; a second audit of the real set takes about a
second.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemri.core.data.dataset import Dataset, FolderScan, cache_path, load_dataset, scan_folder, write_cache_file
from edgemri.core.data.images import CLASS_NAMES, BadImageError, DataError, read_image_bytes
from edgemri.core.errors import EdgemriError, printable
from edgemri.core.io import ArtefactError, load_npz
from edgemri.core.progress import ProgressBar

log = logging.getLogger(__name__)

HASH_BITS = 64
NEAR_MAX_DISTANCE = 4  # pHash bits: candidates; see the module docstring for the evidence
NEAR_MIN_CORRELATION = 0.95  # Pearson r of the 128 px grey images that confirms a candidate
MAX_SEARCH_DISTANCE = 16  # beyond it chunks are under 4 bits and the index compares nearly all pairs
SPLIT_PAIRS = ("Training-Training", "Testing-Testing", "Testing-Training")
_CACHE_FORMAT = "edgemri.audit-hashes/1"
_CACHE_ARRAYS = frozenset({"format", "key", "files", "sha256", "phash", "pixels"})
_PAIR_BLOCK = 4_000_000  # candidate pairs held at once while searching a chunk
_HASH_BLOCK = 256  # images converted to grey at once
_CORRELATION_BATCH = 256  # image pairs whose pixels are compared at once (2 x 256 x 16,384 floats)


class AuditError(EdgemriError):
    """The duplicate audit cannot run as asked; the message names the bad value or file."""


# ---------------------------------------------------------------- hashes


def grey_pixels(images: np.ndarray) -> np.ndarray:
    """Decoded uint8 (B, 3, H, W) images as grey uint8 (B, H, W), with PIL's own "L" formula (ITU-R 601)."""
    rgb = images.astype(np.uint32)
    return ((rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def perceptual_hash(grey: np.ndarray) -> int:
    """The 64-bit pHash (``imagehash.phash``) of one grey uint8 (H, W) image, as an int (first bit highest)."""
    import imagehash  # not at the top: only the audit needs it, and it pulls in scipy

    bits = imagehash.phash(Image.fromarray(grey, mode="L")).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.astype(np.uint64).view(np.uint8).reshape(*values.shape, 8)
    return _BYTE_BITS[as_bytes].sum(axis=-1)


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between 64-bit hashes (element-wise)."""
    return _popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def _chunks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_distance + 1`` chunks that cover the 64 bits, as even as they split."""
    count = max_distance + 1
    base, extra = divmod(HASH_BITS, count)
    chunks, top = [], HASH_BITS
    for width in [base + 1] * extra + [base] * (count - extra):
        top -= width
        chunks.append((top, width))
    return chunks


def _bucket_pairs(members: np.ndarray, sizes: np.ndarray, starts: np.ndarray) -> Iterator[np.ndarray]:
    """Every pair (i < j by position) inside each bucket, as (P, 2) blocks of at most about _PAIR_BLOCK pairs.

    ``members`` lists the buckets one after another, bucket k at ``starts[k]`` with ``sizes[k]`` members.
    """
    for size in np.unique(sizes[sizes >= 2]).tolist():
        first = starts[sizes == size]
        per_bucket = size * (size - 1) // 2
        if per_bucket <= _PAIR_BLOCK:
            left, right = np.triu_indices(size, 1)
            step = max(1, _PAIR_BLOCK // per_bucket)
            for k in range(0, len(first), step):
                rows = members[first[k:k + step, None] + np.arange(size)]
                yield np.stack([rows[:, left].ravel(), rows[:, right].ravel()], axis=1)
            continue
        # One huge bucket: each block of rows against every later member, so memory stays bounded.
        rows_per_block = max(1, _PAIR_BLOCK // size)
        for start in first.tolist():
            bucket = members[start:start + size]
            for r0 in range(0, size - 1, rows_per_block):
                rr, cc = np.nonzero(np.arange(r0, min(r0 + rows_per_block, size))[:, None] < np.arange(size))
                yield np.stack([bucket[rr + r0], bucket[cc]], axis=1)


def _distinct_value_pairs(values: np.ndarray, max_distance: int) -> np.ndarray:
    """(P, 2) indices a < b into distinct ``values`` within ``max_distance`` bits, by multi-index hashing."""
    n = len(values)
    found: list[np.ndarray] = []
    for shift, width in _chunks(max_distance):
        keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        cuts = np.flatnonzero(np.diff(keys[order])) + 1
        starts = np.concatenate([[0], cuts])
        sizes = np.diff(np.concatenate([starts, [n]]))
        for pairs in _bucket_pairs(order, sizes, starts):
            close = pairs[hamming(values[pairs[:, 0]], values[pairs[:, 1]]) <= max_distance]
            # A close pair shares several chunks: one code per pair lets np.unique drop the repeats.
            found.append(close.min(axis=1).astype(np.int64) * n + close.max(axis=1))
    codes = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    return np.stack([codes // n, codes % n], axis=1) if n else np.empty((0, 2), dtype=np.int64)


def _check_distance(max_distance: object) -> None:
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) \
            or not 0 <= max_distance <= MAX_SEARCH_DISTANCE:
        raise AuditError(f"max_distance {max_distance!r} is not allowed; allowed: an integer 0..{MAX_SEARCH_DISTANCE}")


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, of 64-bit ``hashes`` within ``max_distance`` bits (sorted (P, 2) int64).

    Multi-index hashing: the search compares hashes that share a chunk bucket, never all pairs; equal
    hashes are searched once and their pairs added back. Raises AuditError for a distance outside
    0..MAX_SEARCH_DISTANCE.
    """
    _check_distance(max_distance)
    hashes = np.asarray(hashes, dtype=np.uint64).ravel()
    if len(hashes) < 2:
        return np.empty((0, 2), dtype=np.int64)
    values, inverse = np.unique(hashes, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    cuts = np.flatnonzero(np.diff(inverse[order])) + 1
    members = np.split(order, cuts)  # members[v]: indices of hashes equal to values[v], ascending
    out: list[np.ndarray] = [np.empty((0, 2), dtype=np.int64)]
    for group in members:  # equal hashes: distance 0
        if len(group) > 1:
            left, right = np.triu_indices(len(group), 1)
            out.append(np.stack([group[left], group[right]], axis=1))
    distinct = _distinct_value_pairs(values, max_distance)
    sizes = np.array([len(g) for g in members], dtype=np.int64)
    single = (sizes[distinct[:, 0]] == 1) & (sizes[distinct[:, 1]] == 1)
    firsts = np.array([g[0] for g in members], dtype=np.int64)
    out.append(np.stack([firsts[distinct[single, 0]], firsts[distinct[single, 1]]], axis=1))
    for a, b in distinct[~single].tolist():  # values shared by several hashes: every combination
        left, right = np.meshgrid(members[a], members[b], indexing="ij")
        out.append(np.stack([left.ravel(), right.ravel()], axis=1))
    pairs = np.concatenate(out).astype(np.int64)
    pairs = np.stack([pairs.min(axis=1), pairs.max(axis=1)], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


# ---------------------------------------------------------------- the per-file hash cache


@dataclass
class _SplitHashes:
    sha256: np.ndarray  # (N,) hex of the file bytes
    phash: np.ndarray  # (N,) uint64
    pixels: np.ndarray  # (N,) hex digest of the decoded uint8 image
    cached: bool = False


def _hash_cache_path(scan: FolderScan, split: str, key: str, cache_dir: str | Path | None) -> Path:
    # The decoded cache's own folder (one per data folder), so clearing that folder clears both.
    return cache_path(scan, split, cache_dir).parent / f"audit-{split.lower()}-{key[:20]}.npz"


def _read_hashes(path: Path, key: str, files: list[str]) -> _SplitHashes | None:
    """The cached hashes of exactly these files, or None (then they are computed again)."""
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        if set(arrays) != _CACHE_ARRAYS:
            raise ArtefactError(f"arrays {sorted(arrays)}, expected {sorted(_CACHE_ARRAYS)}")
        header = [arrays["format"], arrays["key"]]
        if [str(a) if a.dtype.kind == "U" and a.shape == () else None for a in header] != [_CACHE_FORMAT, key]:
            raise ArtefactError("it was written for another folder state or format")
        n = len(files)
        cached_files, sha, phash, pixels = (arrays[k] for k in ("files", "sha256", "phash", "pixels"))
        if cached_files.dtype.kind != "U" or cached_files.shape != (n,) or cached_files.tolist() != files:
            raise ArtefactError("its files are not this split's")
        for name, hexes, length in (("sha256", sha, 64), ("pixels", pixels, 32)):
            lengths = set(np.char.str_len(hexes).tolist()) if hexes.dtype.kind == "U" else {-1}
            if hexes.shape != (n,) or (n and lengths != {length}):
                raise ArtefactError(f"{name} must be {n} hex strings of {length} characters")
        if phash.dtype != np.uint64 or phash.shape != (n,):
            raise ArtefactError(f"phash must be {n} uint64, got {phash.dtype} {phash.shape}")
    except ArtefactError as err:
        log.warning("ignoring the duplicate-audit cache %s (%s); hashing the images again", path, err)
        return None
    return _SplitHashes(sha, phash, pixels, cached=True)


def _write_hashes(path: Path, split: str, key: str, files: list[str], hashes: _SplitHashes) -> None:
    """Save (mode 0600, like the decoded cache) and drop the split's older hash files; failing is a warning."""
    arrays = {"format": np.array(_CACHE_FORMAT), "key": np.array(key), "files": np.array(files, dtype=str),
              "sha256": hashes.sha256, "phash": hashes.phash, "pixels": hashes.pixels}
    write_cache_file(path, arrays, f"audit-{split.lower()}-*.npz", "the duplicate-audit cache", "hashed")


def _hash_split(root: Path, split: str, images: np.ndarray, files: list[str], progress: bool) -> _SplitHashes:
    """SHA-256 of each file, pHash and digest of each decoded image."""
    sha = np.empty(len(files), dtype="<U64")
    phash = np.empty(len(files), dtype=np.uint64)
    pixels = np.empty(len(files), dtype="<U32")
    with ProgressBar(f"hash {split}", len(files), enabled=progress, unit="images") as bar:
        for start in range(0, len(files), _HASH_BLOCK):
            grey = grey_pixels(images[start:start + _HASH_BLOCK])
            for i in range(start, start + len(grey)):
                path = root / files[i]
                try:
                    sha[i] = hashlib.sha256(read_image_bytes(path)).hexdigest()
                except BadImageError as err:
                    raise AuditError(f"cannot hash {printable(path)}: {err}") from None
                phash[i] = perceptual_hash(grey[i - start])
                pixels[i] = hashlib.blake2b(images[i].tobytes(), digest_size=16).hexdigest()
            bar.update(len(grey))
    return _SplitHashes(sha, phash, pixels)


def _split_hashes(dataset: Dataset, scan: FolderScan | None, split: str, cache_dir: str | Path | None,
                  progress: bool) -> _SplitHashes:
    data = dataset.train if split == "Training" else dataset.test
    files = list(data.files)
    images = data.images.numpy()
    if scan is None:
        return _hash_split(dataset.root, split, images, files, progress)
    key = scan.cache_key(split)
    path = _hash_cache_path(scan, split, key, cache_dir)
    cached = _read_hashes(path, key, files)
    if cached is not None:
        return cached
    hashes = _hash_split(dataset.root, split, images, files, progress)
    _write_hashes(path, split, key, files, hashes)
    return hashes


# ---------------------------------------------------------------- grouping


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps later finds short
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(x) for x in range(len(self.parent))], dtype=np.int64)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    forest = _UnionFind(n)
    for a, b in edges.tolist():
        forest.union(a, b)
    return forest.roots()


def _dense(ids: np.ndarray) -> np.ndarray:
    """Ids renumbered 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _grey(train: np.ndarray, test: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Grey uint8 pixels (B, H * W) of images ``index`` (Training first, then Testing), as PIL's "L" computes them."""
    out = np.empty((len(index), train.shape[-2] * train.shape[-1]), dtype=np.uint8)
    for start in range(0, len(index), _CORRELATION_BATCH):
        idx = index[start:start + _CORRELATION_BATCH]
        in_test = idx >= len(train)
        rgb = np.empty((len(idx), *train.shape[1:]), dtype=np.uint8)
        rgb[~in_test], rgb[in_test] = train[idx[~in_test]], test[idx[in_test] - len(train)]
        out[start:start + len(idx)] = grey_pixels(rgb).reshape(len(idx), -1)
    return out


def _correlations(train: np.ndarray, test: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of the grey images of each pair (a[k], b[k]); 1 for two flat images, 0 for one.

    Each image is converted to grey once (uint8, a third of its decoded size), however many pairs it is in."""
    involved, position = np.unique(np.concatenate([a, b]), return_inverse=True)
    position = position.ravel()
    grey = _grey(train, test, involved)
    mean = np.empty(len(involved), dtype=np.float32)
    norm = np.empty(len(involved), dtype=np.float32)
    for start in range(0, len(involved), _CORRELATION_BATCH):
        block = grey[start:start + _CORRELATION_BATCH].astype(np.float32)
        mean[start:start + len(block)] = block.mean(axis=1)
        norm[start:start + len(block)] = np.linalg.norm(block - mean[start:start + len(block), None], axis=1)
    flat = norm < 1e-3  # a blank slice has no correlation; its twin is another blank
    pa, pb = position[:len(a)], position[len(a):]
    out = np.empty(len(a), dtype=np.float64)
    for start in range(0, len(a), _CORRELATION_BATCH):
        i, j = pa[start:start + _CORRELATION_BATCH], pb[start:start + _CORRELATION_BATCH]
        x = grey[i].astype(np.float32) - mean[i, None]
        y = grey[j].astype(np.float32) - mean[j, None]
        r = np.einsum("ij,ij->i", x, y) / np.maximum(norm[i] * norm[j], 1e-12)
        out[start:start + len(i)] = np.where(flat[i] | flat[j], (flat[i] & flat[j]).astype(np.float64), r)
    return out


@dataclass
class DuplicateAudit:
    """Duplicate groups of one dataset: images are Training (in ``dataset.train`` order), then Testing.

    ``group[k]`` is image k's group (0, 1, ... by first member; a singleton has its own id);
    ``exact[k]`` its byte-identical set; ``split_group[k]`` its near group among its own split's images
    alone (what a within-split count uses); ``near_train[k]`` / ``near_test[k]`` whether another image of
    that split is a direct near duplicate of it (exact copies included).
    """

    files: list[str]
    labels: np.ndarray
    n_train: int
    group: np.ndarray
    exact: np.ndarray
    split_group: np.ndarray
    near_train: np.ndarray
    near_test: np.ndarray
    max_distance: int = NEAR_MAX_DISTANCE
    min_correlation: float = NEAR_MIN_CORRELATION
    hashes_cached: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    # ------------------------------------------------ what distillation uses

    def train_groups(self) -> list[int]:
        """A group id per Training image (dataset.train order): split Training by these ids, and every copy of
        a scan lands on the same side. Ids are shared with Testing images of the same group."""
        return self.group[:self.n_train].tolist()

    def leaked_test(self) -> list[int]:
        """Indices into ``dataset.test`` of Testing images in a group with a Training image (an exact or near
        copy of one, directly or through other copies): a held-out score must leave them out."""
        return np.flatnonzero(self._in_train_group()[self.n_train:]).tolist()

    def kept_test(self) -> list[int]:
        """Indices into ``dataset.test`` of the deduplicated Testing: every image ``leaked_test`` leaves out."""
        return np.flatnonzero(~self._in_train_group()[self.n_train:]).tolist()

    def groups(self) -> list[list[str]]:
        """The files of every group of two or more images, by first member."""
        return [[self.files[k] for k in members] for members in self._members()]

    def _members(self) -> list[list[int]]:
        """Image indices of every group of two or more, by first member."""
        members: dict[int, list[int]] = {}
        for k, g in enumerate(self.group.tolist()):
            members.setdefault(g, []).append(k)
        return [m for m in members.values() if len(m) > 1]

    # ------------------------------------------------ counts

    def _in_train_group(self) -> np.ndarray:
        return np.isin(self.group, self.group[:self.n_train])

    def _split_masks(self) -> tuple[np.ndarray, np.ndarray]:
        train = np.arange(len(self.files)) < self.n_train
        return train, ~train

    def _exact_in(self, split_mask: np.ndarray) -> np.ndarray:
        """Whether another image of the split has the same bytes."""
        count = np.bincount(self.exact[split_mask], minlength=int(self.exact.max(initial=-1)) + 1)
        return count[self.exact] - split_mask > 0

    def _within(self, split_mask: np.ndarray, ids: np.ndarray) -> dict[str, int]:
        """Images of the split with a copy in it, the groups they form, and how many are redundant."""
        count = np.bincount(ids[split_mask], minlength=int(ids.max(initial=-1)) + 1)
        images, groups = int(count[count > 1].sum()), int((count > 1).sum())
        return {"images": images, "groups": groups, "redundant": images - groups}

    def counts(self) -> dict[str, Any]:
        """Per split pair. Within a split: images with a copy in it, the groups they form and the redundant
        ones (images - groups). Testing-Training: Testing images with a byte-identical Training file (exact;
        exact_contents counts their distinct contents), with an exact or near copy in Training (near), and
        in a group with a Training image (grouped: ``leaked_test``)."""
        train, test = self._split_masks()
        within = {name: {"exact": self._within(mask, self.exact), "near": self._within(mask, self.split_group)}
                  for name, mask in zip(SPLIT_PAIRS[:2], (train, test), strict=True)}
        return {**within, SPLIT_PAIRS[2]: self._cross(test)}

    def _cross(self, test_mask: np.ndarray) -> dict[str, int]:
        train, _ = self._split_masks()
        exact = test_mask & self._exact_in(train)
        return {"exact": int(exact.sum()), "exact_contents": len(np.unique(self.exact[exact])),
                "near": int((test_mask & self.near_train).sum()),
                "grouped": int((test_mask & self._in_train_group()).sum())}

    def per_class(self) -> dict[str, dict[str, dict[str, int]]]:
        """Images of each class (their own label) with a copy: within Training, within Testing, and Testing
        images with a copy in Training."""
        train, test = self._split_masks()
        exact_train, exact_test = self._exact_in(train), self._exact_in(test)
        out = {}
        for label, name in enumerate(CLASS_NAMES):
            mine = self.labels == label
            out[name] = {
                "Training-Training": {"exact": int((mine & train & exact_train).sum()),
                                      "near": int((mine & train & self.near_train).sum())},
                "Testing-Testing": {"exact": int((mine & test & exact_test).sum()),
                                    "near": int((mine & test & self.near_test).sum())},
                "Testing-Training": self._cross(mine & test),
            }
        return out

    def label_conflicts(self) -> list[dict[str, Any]]:
        """Groups whose members carry different class labels: each with its files and classes, and whether
        byte-identical files disagree (certain) or only near copies do (worth a look)."""
        conflicts = []
        for listed in self._members():
            members = np.array(listed)
            if len(set(self.labels[members].tolist())) < 2:
                continue
            exact_sets = [members[self.exact[members] == e] for e in np.unique(self.exact[members])]
            conflicts.append({
                "group": int(self.group[members[0]]),
                "exact": any(len(set(self.labels[s].tolist())) > 1 for s in exact_sets),
                "members": [{"file": self.files[k], "class": self._class(k)} for k in members.tolist()],
            })
        return conflicts

    def _class(self, k: int) -> str:
        label = int(self.labels[k])
        return CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else "unknown"

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: the rule, the counts, the conflicts and every group's files."""
        return {
            "rule": {
                "exact": "SHA-256 of the file bytes",
                "near": f"pHash (imagehash.phash, 64 bits, of the 128 px grey decoded image) within "
                        f"{self.max_distance} bits and Pearson r >= {self.min_correlation} of those images",
                "max_distance": self.max_distance,
                "min_correlation": self.min_correlation,
                "groups": "exact or near copies, transitively",
            },
            "images": {"Training": self.n_train, "Testing": len(self.files) - self.n_train},
            "counts": self.counts(),
            "per_class": self.per_class(),
            "label_conflicts": self.label_conflicts(),
            "leaked_test": len(self.leaked_test()),
            "groups": [{"group": int(self.group[m[0]]), "files": [self.files[k] for k in m],
                        "classes": [self._class(k) for k in m]} for m in self._members()],
            "hashes_cached": dict(self.hashes_cached),
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------- the audit


def _scan_of(dataset: Dataset) -> FolderScan | None:
    """The folder as it is now, for the cache key; None (no cache) when it is no longer a Kaggle-layout folder."""
    try:
        return scan_folder(dataset.root)
    except DataError as err:
        log.warning("not caching the duplicate-audit hashes of %s (%s)", printable(dataset.root), err)
        return None


def audit_dataset(dataset: Dataset, cache_dir: str | Path | None = None, progress: bool = False, *,
                  max_distance: int = NEAR_MAX_DISTANCE,
                  min_correlation: float = NEAR_MIN_CORRELATION) -> DuplicateAudit:
    """Exact and near duplicates of a decoded dataset (``load_dataset``), grouped across both splits.

    ``cache_dir`` is the decoded-image cache's (None: the user's cache folder): the per-file hashes are kept
    there, next to the decoded images. Raises AuditError for a bad threshold or a file that cannot be read.
    """
    if isinstance(min_correlation, bool) or not isinstance(min_correlation, int | float) \
            or not -1.0 <= min_correlation <= 1.0:
        raise AuditError(f"min_correlation {min_correlation!r} is not allowed; allowed: a number in [-1, 1]")
    _check_distance(max_distance)
    start = time.perf_counter()
    scan = _scan_of(dataset)
    hashes = {split: _split_hashes(dataset, scan, split, cache_dir, progress) for split in ("Training", "Testing")}
    train, test = hashes["Training"], hashes["Testing"]
    n_train, n = len(dataset.train), len(dataset.train) + len(dataset.test)
    files = list(dataset.train.files) + list(dataset.test.files)
    labels = np.concatenate([dataset.train.labels.numpy(), dataset.test.labels.numpy()]).astype(np.int64)
    exact = _dense(np.concatenate([train.sha256, test.sha256]))

    # One node per distinct decoded image: byte copies and blank slices are searched once.
    _, first, node_of = np.unique(np.concatenate([train.pixels, test.pixels]), return_index=True,
                                  return_inverse=True)
    node_of = node_of.ravel()
    phash = np.concatenate([train.phash, test.phash])
    candidates = near_pairs(phash[first], max_distance)
    r = _correlations(dataset.train.images.numpy(), dataset.test.images.numpy(), first[candidates[:, 0]],
                      first[candidates[:, 1]])
    edges = candidates[r >= min_correlation]
    group = _dense(_components(len(first), edges)[node_of])

    in_train = np.zeros(n, dtype=bool)
    in_train[:n_train] = True
    split_group = np.empty(n, dtype=np.int64)
    near = {}
    for name, mask in (("Training", in_train), ("Testing", ~in_train)):
        # Near copies within one split: nodes that hold one of its images, linked by edges between two such.
        holds = np.bincount(node_of[mask], minlength=len(first))
        both = (holds[edges[:, 0]] > 0) & (holds[edges[:, 1]] > 0)
        split_group[mask] = _components(len(first), edges[both])[node_of[mask]] + (0 if name == "Training" else n)
        # A node is next to the split when an edge leads to a node holding one of its images (bincount, not
        # fancy-index |=, which keeps only the last of repeated indices).
        linked = (holds > 0).astype(np.float64)
        neighbour = (np.bincount(edges[:, 0], weights=linked[edges[:, 1]], minlength=len(first))
                     + np.bincount(edges[:, 1], weights=linked[edges[:, 0]], minlength=len(first))) > 0
        near[name] = (holds[node_of] - mask > 0) | neighbour[node_of]
    audit = DuplicateAudit(
        files=files, labels=labels, n_train=n_train, group=group, exact=exact, split_group=_dense(split_group),
        near_train=near["Training"], near_test=near["Testing"], max_distance=max_distance,
        min_correlation=float(min_correlation),
        hashes_cached={split: h.cached for split, h in hashes.items()},
        seconds=time.perf_counter() - start,
    )
    log.debug("duplicate audit of %s: %d candidate pairs within %d bits, %d confirmed, %.1f s",
              printable(dataset.root), len(candidates), max_distance, len(edges), audit.seconds)
    return audit


def audit_folder(root: str | Path, cache_dir: str | Path | None = None, progress: bool = False) -> DuplicateAudit:
    """Load (decoded cache) and audit a Kaggle-layout folder: what ``edgemri data info`` prints."""
    return audit_dataset(load_dataset(root, cache_dir=cache_dir, progress=progress), cache_dir, progress)
