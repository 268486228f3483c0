"""Split a data folder into per-client manifests: one hospital and a few phones per site.

A manifest lists exactly the files a client may read (by path and SHA-256), its kind
and site, its class counts and its own train/val/test split, plus its site's evaluation
pool (split ``pool``: held-out scans it never trains on). Partitioning is deterministic for
a seed. Sites come from the data's metadata.csv (the synthetic set); data without it (the
real Kaggle set) is clustered into appearance sites over the whole Training split
(``edgemri.core.data.splits.sited_training``), the sites new-sites splits by too, and its pools are
each site's share of Testing without any copy of a Training scan (``site_pools``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from edgemri.core.config import Config, TierConfig
from edgemri.core.data.audit import audit_dataset
from edgemri.core.data.dataset import (
    SITE_NAME,
    ArraySplit,
    Dataset,
    confined,
    load_pools,
    pools_from_testing,
    split_from_arrays,
    split_to_arrays,
)
from edgemri.core.data.images import (
    CLASS_NAMES,
    IMAGE_SIZE,
    BadImageError,
    DataError,
    image_uint8,
    read_image_bytes,
)
from edgemri.core.data.splits import scenario_split, sited_dataset, sited_training
from edgemri.core.errors import EdgemriError, printable
from edgemri.core.io import ArtefactError, load_npz, save_npz, write_json
from edgemri.core.untrusted import (
    OBJECT,
    SHA256,
    Check,
    check_record,
    list_of,
    number,
    one_of,
    read_json,
    text,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "edgemri.manifest/2"  # 2: the site's evaluation pool, split "pool"
LOCAL_SPLITS = ("train", "val", "test", "pool")  # pool: the site's held-out evaluation scans, never trained on
# The client kinds a manifest may name and federation.tiers may list (Registries.client_kinds): the partition
# carves exactly these from each site.
CLIENT_KINDS: tuple[str, ...] = ("hospital", "phone")
# A client name becomes a folder name, a log field and a Flower metric prefix: a short, path-safe token.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_MANIFEST_BYTES = 16 * 2**20  # the whole Kaggle set in one manifest is about 1.5 MB
MAX_MANIFEST_FILES = 100_000
OWN_SPLITS = LOCAL_SPLITS[:3]  # a client's own scans; its site's pool is the same for every client there
_LOCAL_DATA_FORMAT = "edgemri.local-data/2"  # 2: the client's own splits only; the site pool is cached apart
_POOL_FORMAT = "edgemri.site-pool/1"


class ManifestError(EdgemriError):
    """A manifest is missing, malformed, or its files changed since partitioning."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative to the data root
    sha256: str
    label: int
    split: str  # train / val / test (the client's own split), or pool (its site's evaluation pool)


@dataclass(frozen=True)
class Manifest:
    client: str
    kind: str  # hospital or phone
    site: str
    files: tuple[ManifestFile, ...]
    seed: int
    config: dict[str, Any]

    def num_examples(self, split: str) -> int:
        return sum(1 for f in self.files if f.split == split)

    def class_counts(self) -> dict[str, dict[str, int]]:
        counts = {split: dict.fromkeys(CLASS_NAMES, 0) for split in LOCAL_SPLITS}
        for f in self.files:
            counts[f.split][CLASS_NAMES[f.label]] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "client": self.client, "kind": self.kind, "site": self.site,
                "seed": self.seed, "num_examples": len(self.files), "class_counts": self.class_counts(),
                "files": [asdict(f) for f in self.files], "config": self.config}


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read {printable(path)}: {err.strerror or err}") from None


def _draw_phone(pool: list[int], labels: np.ndarray, n: int, alpha: float | None,
                rng: np.random.Generator) -> list[int]:
    """n indices from the site's pool; with alpha, class shares drawn from Dirichlet(alpha)."""
    if alpha is None:
        return [int(i) for i in rng.choice(pool, size=n, replace=False)]
    shares = rng.dirichlet([alpha] * len(CLASS_NAMES))
    by_class = {c: [i for i in pool if labels[i] == c] for c in range(len(CLASS_NAMES))}
    picked: list[int] = []
    for _ in range(n):
        available = np.array([shares[c] if by_class[c] else 0.0 for c in range(len(CLASS_NAMES))])
        c = int(rng.choice(len(CLASS_NAMES), p=available / available.sum()))
        picked.append(by_class[c].pop(int(rng.integers(len(by_class[c])))))
    return picked


def _split_hospitals(pool: list[int], labels: np.ndarray, count: int, alpha: float | None,
                     rng: np.random.Generator) -> list[list[int]]:
    """The site's remaining scans among its ``count`` hospitals: in turn, or with alpha, each class cut among them
    by shares drawn from Dirichlet(alpha) (label skew across hospitals); each share in the pool's order."""
    if alpha is None:
        return [pool[h::count] for h in range(count)]
    position = {i: k for k, i in enumerate(pool)}
    shares: list[list[int]] = [[] for _ in range(count)]
    for c in range(len(CLASS_NAMES)):
        members = [i for i in pool if labels[i] == c]
        cuts = (np.cumsum(rng.dirichlet([alpha] * count))[:-1] * len(members)).round().astype(int)
        for h, part in enumerate(np.split(np.array(members, dtype=np.int64), cuts)):
            shares[h] += part.tolist()
    return [sorted(share, key=position.__getitem__) for share in shares]


def _local_split(indices: list[int], tier: TierConfig, rng: np.random.Generator) -> dict[int, str]:
    """The client's own train/val/test split; at least one train and one test scan."""
    order = [indices[i] for i in rng.permutation(len(indices))]
    n_test = max(1, round(len(order) * tier.test_fraction))
    n_val = round(len(order) * tier.val_fraction)
    n_test = min(n_test, len(order) - 1)
    n_val = min(n_val, len(order) - 1 - n_test)
    return {i: ("test" if k < n_test else "val" if k < n_test + n_val else "train") for k, i in enumerate(order)}


def site_pools(dataset: Dataset, config: Config, *, progress: bool = False) -> dict[str, ArraySplit]:
    """Each site's evaluation pool: the folder's ``Pools/<site>/`` (the synthetic set), else the site's share of
    Testing (each scan at its nearest appearance site) less every scan the duplicate audit finds a copy of in
    Training, so no pool scores what a client or the server may have trained on. A dataset whose Training has
    sites keeps them (``sited_dataset``): pass one already sited to cluster no more."""
    if pools := load_pools(dataset.root, config.data.cache_dir):
        return pools
    kept = audit_dataset(dataset, config.data.cache_dir, progress).kept_test()
    return pools_from_testing(sited_dataset(replace(dataset, test=dataset.test.subset(kept)), config,
                                            progress=progress))


def partition(split: ArraySplit, root: Path, config: Config, *,
              pools: dict[str, ArraySplit] | None = None, progress: bool = False) -> list[Manifest]:
    """Manifests for every client, from the clients' share of Training (files and sites), each listing its
    site's pool from ``pools`` (None: the folder's ``Pools/``, if it has them; ``site_pools`` for any data)."""
    if pools is None:
        pools = load_pools(root, config.data.cache_dir)
    hashes: dict[str, str] = {}

    def sha256(rel: str) -> str:  # a pool file is listed by every client at its site: hashed once
        if rel not in hashes:  # confined: a manifest names only files inside the data root
            hashes[rel] = _sha256(confined(root / rel, root))
        return hashes[rel]

    fed = config.federation
    # Appearance sites (data without metadata.csv) differ in what the scanner did to the images: feature
    # shift, not random buckets. Clustered once over all of Training: the sites new-sites distills by.
    sited = sited_training(split, config, progress=progress)
    # seen-sites splits such data by class alone, exactly as distillation does.
    _, client_idx = scenario_split(sited if fed.scenario == "new-sites" else split, config)
    split = sited.subset(client_idx)
    rng = np.random.default_rng(config.seed)
    labels = split.labels.numpy()
    sites = split.sites
    config_dict = config.to_dict()
    manifests: list[Manifest] = []
    phone, hospital = fed.tier("phone"), fed.tier("hospital")
    for site in sorted(set(sites)):
        pool = [i for i, s in enumerate(sites) if s == site]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        clients: list[tuple[str, list[int]]] = []
        for p in range(phone.per_site):
            tier = phone
            n = (int(rng.integers(tier.min_examples, tier.max_examples + 1)) if fed.partition.quantity_skew
                 else (tier.min_examples + tier.max_examples) // 2)
            if n > len(pool) - hospital.min_examples * hospital.per_site:
                raise DataError(f"site {site!r} has {len(pool)} training scans: too few for "
                                f"{phone.per_site} phones and {hospital.per_site} hospital(s)")
            chosen = _draw_phone(pool, labels, n, fed.partition.label_skew_alpha, rng)
            pool = [i for i in pool if i not in set(chosen)]
            clients.append((f"phone-{site}-{p}", chosen))
        for h, share in enumerate(_split_hospitals(pool, labels, hospital.per_site, fed.partition.label_skew_alpha,
                                                   rng)):
            share = share[: hospital.max_examples]
            if len(share) < hospital.min_examples:
                raise DataError(f"site {site!r} leaves {len(share)} scans for hospital {h}; "
                                f"federation.tiers.hospital.min_examples is {hospital.min_examples}")
            clients.append((f"hospital-{site}" + (f"-{h}" if hospital.per_site > 1 else ""), share))
        for name, indices in clients:
            kind = name.split("-", 1)[0]
            local = _local_split(indices, fed.tier(kind), rng)
            pool = pools.get(site)
            files = tuple(
                ManifestFile(path=split.files[i], sha256=sha256(split.files[i]), label=int(labels[i]), split=local[i])
                for i in sorted(indices)
            ) + tuple(ManifestFile(path=rel, sha256=sha256(rel), label=int(label), split="pool")
                      for rel, label in zip(pool.files if pool else [], pool.labels.tolist() if pool else [],
                                            strict=True))
            manifests.append(Manifest(client=name, kind=kind, site=site, files=files, seed=config.seed,
                                      config=config_dict))
    return manifests


def write_manifests(manifests: list[Manifest], out: Path) -> list[Path]:
    """One JSON per client, client-NNN.json in a stable order, plus an index."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, manifest in enumerate(manifests):
        paths.append(write_json(out / f"client-{k:03d}.json", manifest.to_dict()))
    write_json(out / "index.json", {"format": "edgemri.manifest-index/1",
                                    "clients": [{"file": p.name, "client": m.client, "kind": m.kind,
                                                 "site": m.site, "num_examples": len(m.files)}
                                                for p, m in zip(paths, manifests, strict=True)]})
    return paths


def _is_safe_relative(path: Any) -> bool:
    """A normalised relative POSIX path: no '..', not absolute, no NUL, valid UTF-8 (resolving comes later)."""
    if not isinstance(path, str) or not 0 < len(path) <= 1024 or "\0" in path:
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and pure.as_posix() == path and ".." not in pure.parts


_MANIFEST_SCHEMA = {
    "format": Check(one_of((MANIFEST_FORMAT,)), f"{MANIFEST_FORMAT} (write it with `edgemri partition`)"),
    "client": text(64, CLIENT_NAME, allowed="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    "kind": one_of(CLIENT_KINDS),
    "site": text(48, re.compile(f"|{SITE_NAME.pattern}"), allowed="empty or 1-48 letters, digits, '.', '_' or '-'"),
    "seed": number(0, 2**63 - 1, integer=True),
    "num_examples": number(1, MAX_MANIFEST_FILES, integer=True),
    "class_counts": OBJECT,
    "files": list_of(OBJECT, 1, MAX_MANIFEST_FILES),
    "config": Check(OBJECT, "a JSON object (the configuration the manifest was made with)"),
}
_FILE_SCHEMA = {
    "path": Check(_is_safe_relative, "a relative path inside the data root (no '..', no leading '/')"),
    "sha256": SHA256,
    "label": Check(number(0, len(CLASS_NAMES) - 1, integer=True),
                   f"a class index 0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)})"),
    "split": one_of(LOCAL_SPLITS),
}


def _parse_manifest(obj: Any, where: str) -> Manifest:
    """The manifest in ``obj``, every field checked; ManifestError names the file and the field."""
    check_record(obj, _MANIFEST_SCHEMA, where, ManifestError)
    files = tuple(ManifestFile(**check_record(entry, _FILE_SCHEMA, where, ManifestError, within=f"files[{k}]"))
                  for k, entry in enumerate(obj["files"]))
    manifest = Manifest(client=obj["client"], kind=obj["kind"], site=obj["site"], files=files, seed=obj["seed"],
                        config=obj["config"])
    # What the manifest claims about its files, against the files.
    paths = {f.path for f in files}
    check_record(obj, {
        "files": Check(lambda _: len(paths) == len(files) and manifest.num_examples("train") > 0,
                       "each path at most once, at least one of them in the train split"),
        "num_examples": Check(lambda n: n == len(files), f"the number of files ({len(files)})"),
        "class_counts": Check(lambda c: c == manifest.class_counts(), "the per-split class counts of the files listed"),
    }, where, ManifestError, extra=True)
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Read and check one manifest: untrusted input, so every field is validated (ManifestError)."""
    where = printable(Path(path))
    return _parse_manifest(read_json(path, ManifestError, max_bytes=MAX_MANIFEST_BYTES, where=where), where)


@dataclass
class LocalData:
    """A client's own decoded scans, split as its manifest says."""

    train: ArraySplit
    val: ArraySplit
    test: ArraySplit

    def num_examples(self) -> int:
        return len(self.train)


def _confined(root: Path, rel: str, client: str) -> Path:
    """``root / rel`` resolved, refused (as the folder scan refuses it) unless that stays inside the data root."""
    try:
        return confined(root / rel, root)
    except DataError as err:
        raise ManifestError(f"{client}: a file its manifest lists: {err}") from None


def _to_split(items: list[tuple[np.ndarray, int, str]]) -> ArraySplit:
    if not items:
        return ArraySplit(torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8),
                          torch.empty(0, dtype=torch.long), [])
    return ArraySplit(torch.from_numpy(np.stack([i[0] for i in items])),
                      torch.tensor([i[1] for i in items]), [i[2] for i in items])


def _decode(manifest: Manifest, data_root: Path, splits: tuple[str, ...]) -> dict[str, ArraySplit]:
    """Decode the manifest's files of ``splits``, each confined to the data root and checked against its hash.

    Each file is read once: the bytes that are hashed are the bytes that are decoded.
    """
    root = Path(data_root).resolve()
    rows: dict[str, list[tuple[np.ndarray, int, str]]] = {s: [] for s in splits}
    for f in manifest.files:
        if f.split not in rows:
            continue
        path = _confined(root, f.path, manifest.client)
        if not path.is_file():
            raise ManifestError(f"{manifest.client}: file {printable(path)} listed in its manifest is missing")
        try:
            data = read_image_bytes(path)
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise ManifestError(f"{manifest.client}: file {printable(path)} changed since partitioning "
                                    f"(hash mismatch)")
            rows[f.split].append((image_uint8(data), f.label, f.path))
        except BadImageError as err:
            raise ManifestError(f"{manifest.client}: file {printable(path)} cannot be used: {err}") from None
    return {s: _to_split(rows[s]) for s in splits}


def load_local_data(manifest: Manifest, data_root: Path) -> LocalData:
    """Decode exactly the manifest's files of the client's own splits (``_decode``)."""
    return LocalData(**_decode(manifest, data_root, OWN_SPLITS))


def load_pool(manifest: Manifest, data_root: Path) -> ArraySplit:
    """Decode only the site pool the manifest lists (empty when it lists none)."""
    return _decode(manifest, data_root, ("pool",))["pool"]


def pool_cache_name(manifest: Manifest) -> str:
    """The file name of the site pool's cache: every manifest that lists the same pool files names the same one,
    so a folder shared by a site's simulated clients decodes each pool once."""
    listed = [(f.path, f.sha256, f.label) for f in manifest.files if f.split == "pool"]
    return f"pool-{hashlib.sha256(repr(listed).encode()).hexdigest()[:16]}.npz"


def _save_splits(path: Path, splits: dict[str, ArraySplit], fmt: str) -> Path:
    """Decoded scans as a plain .npz (mode 0600: patient data), atomically; never a pickle."""
    arrays = {"format": np.array(fmt)}
    for split, data in splits.items():
        arrays.update(split_to_arrays(data, prefix=f"{split}_"))
    return save_npz(Path(path), arrays, mode=0o600)


def _load_splits_cache(path: Path, manifest: Manifest, names: tuple[str, ...], fmt: str
                       ) -> dict[str, ArraySplit] | None:
    """The splits ``_save_splits`` wrote, if they hold exactly the manifest's files and labels of ``names``.

    None when the file is missing, unreadable, malformed or for another manifest (a warning says which): the
    caller decodes again.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        found = arrays.get("format")
        if found is None or found.dtype.kind != "U" or found.shape != () or str(found) != fmt:
            raise ArtefactError(f"not an {fmt} file")
        splits = {split: split_from_arrays(arrays, prefix=f"{split}_") for split in names}
        if len(arrays) != 1 + 4 * len(names):
            raise ArtefactError("unexpected arrays")
        for split, local in splits.items():
            expected = [(f.path, f.label) for f in manifest.files if f.split == split]
            if list(zip(local.files, local.labels.tolist(), strict=True)) != expected:
                raise ArtefactError(f"its {split} files or labels are not the manifest's")
    except ArtefactError as err:
        log.warning("ignoring the cache %s (%s); decoding the manifest's files again", path, err)
        return None
    return splits


def save_local_data(path: Path, data: LocalData) -> Path:
    """A client's own decoded scans (``_save_splits``)."""
    return _save_splits(path, {split: getattr(data, split) for split in OWN_SPLITS}, _LOCAL_DATA_FORMAT)


def load_local_data_cache(path: Path, manifest: Manifest) -> LocalData | None:
    """The cache ``save_local_data`` wrote, checked against the manifest (``_load_splits_cache``)."""
    splits = _load_splits_cache(path, manifest, OWN_SPLITS, _LOCAL_DATA_FORMAT)
    return None if splits is None else LocalData(**splits)


def save_pool(path: Path, pool: ArraySplit) -> Path:
    """A site pool's decoded scans (``_save_splits``)."""
    return _save_splits(path, {"pool": pool}, _POOL_FORMAT)


def load_pool_cache(path: Path, manifest: Manifest) -> ArraySplit | None:
    """The cache ``save_pool`` wrote, if it holds exactly the pool the manifest lists."""
    splits = _load_splits_cache(path, manifest, ("pool",), _POOL_FORMAT)
    return None if splits is None else splits["pool"]


def manifest_paths(folder: Path) -> list[Path]:
    """The client manifests in a folder, in client order."""
    return sorted(folder.glob("client-*.json"))


def ensure_manifests(folder: Path, dataset: Dataset, data_root: Path, config: Config, *,
                     progress: bool = False) -> list[Path]:
    """The client manifests in ``folder``, written from ``dataset`` (Training's clients' share and the site pools)
    when there are none (a resumed run keeps its own)."""
    return manifest_paths(folder) or write_manifests(partition(
        dataset.train, data_root, config, pools=site_pools(dataset, config, progress=progress), progress=progress),
        folder)
