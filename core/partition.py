"""Split a data folder into per-client manifests: one hospital and a few phones per site.

A manifest lists exactly the files a client may read (by path and SHA-256), its kind
and site, its class counts and its own train/val/test split. Partitioning is
deterministic for a seed. Sites come from the data's metadata.csv (the synthetic set);
data without it (the real Kaggle set) is cut into seeded pseudo-sites.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemri.core.config import Config, TierConfig
from edgemri.core.data import CLASS_NAMES, ArraySplit, DataError, load_image_uint8, server_client_split
from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_json

MANIFEST_FORMAT = "edgemri.manifest/1"
LOCAL_SPLITS = ("train", "val", "test")


class ManifestError(EdgemriError):
    """A manifest is missing, malformed, or its files changed since partitioning."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative to the data root
    sha256: str
    label: int
    split: str  # train / val / test (the client's own split)


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
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sites(split: ArraySplit, pseudo_sites: int, rng: np.random.Generator) -> list[str]:
    if split.sites:
        return split.sites
    buckets = rng.integers(0, pseudo_sites, len(split))
    return [f"pseudo-site-{b}" for b in buckets]


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


def _local_split(indices: list[int], tier: TierConfig, rng: np.random.Generator) -> dict[int, str]:
    """The client's own train/val/test split; at least one train and one test scan."""
    order = [indices[i] for i in rng.permutation(len(indices))]
    n_test = max(1, round(len(order) * tier.test_fraction))
    n_val = round(len(order) * tier.val_fraction)
    n_test = min(n_test, len(order) - 1)
    n_val = min(n_val, len(order) - 1 - n_test)
    return {i: ("test" if k < n_test else "val" if k < n_test + n_val else "train") for k, i in enumerate(order)}


def partition(split: ArraySplit, root: Path, config: Config) -> list[Manifest]:
    """Manifests for every client, from the clients' share of Training (files and sites)."""
    fed = config.federation
    _, client_idx = server_client_split(split, config.data.client_fraction, config.data.split_seed)
    split = split.subset(client_idx)
    rng = np.random.default_rng(config.seed)
    labels = split.labels.numpy()
    sites = _sites(split, fed.partition.pseudo_sites, rng)
    config_dict = config.to_dict()
    manifests: list[Manifest] = []
    for site in sorted(set(sites)):
        pool = [i for i, s in enumerate(sites) if s == site]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        clients: list[tuple[str, list[int]]] = []
        for p in range(fed.phone.per_site):
            tier = fed.phone
            n = (int(rng.integers(tier.min_examples, tier.max_examples + 1)) if fed.partition.quantity_skew
                 else (tier.min_examples + tier.max_examples) // 2)
            if n > len(pool) - fed.hospital.min_examples * fed.hospital.per_site:
                raise DataError(f"site {site!r} has {len(pool)} training scans: too few for "
                                f"{fed.phone.per_site} phones and {fed.hospital.per_site} hospital(s)")
            chosen = _draw_phone(pool, labels, n, fed.partition.label_skew_alpha, rng)
            pool = [i for i in pool if i not in set(chosen)]
            clients.append((f"phone-{site}-{p}", chosen))
        for h in range(fed.hospital.per_site):
            share = pool[h::fed.hospital.per_site][: fed.hospital.max_examples]
            if len(share) < fed.hospital.min_examples:
                raise DataError(f"site {site!r} leaves {len(share)} scans for hospital {h}; "
                                f"federation.hospital.min_examples is {fed.hospital.min_examples}")
            clients.append((f"hospital-{site}" + (f"-{h}" if fed.hospital.per_site > 1 else ""), share))
        for name, indices in clients:
            kind = name.split("-", 1)[0]
            local = _local_split(indices, fed.tier(kind), rng)
            files = tuple(
                ManifestFile(path=split.files[i], sha256=_sha256(root / split.files[i]), label=int(labels[i]),
                             split=local[i])
                for i in sorted(indices)
            )
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


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path} is not an {MANIFEST_FORMAT} manifest")
        files = tuple(ManifestFile(**f) for f in obj["files"])
        return Manifest(client=obj["client"], kind=obj["kind"], site=obj["site"], files=files,
                        seed=obj["seed"], config=obj["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ManifestError(f"{path} is not a valid manifest: {err}") from None


@dataclass
class LocalData:
    """A client's own decoded scans, split as its manifest says."""

    train: ArraySplit
    val: ArraySplit
    test: ArraySplit

    def num_examples(self) -> int:
        return len(self.train)


def load_local_data(manifest: Manifest, data_root: Path) -> LocalData:
    """Decode exactly the manifest's files, checking each one's hash."""
    rows: dict[str, list[tuple[np.ndarray, int, str]]] = {s: [] for s in LOCAL_SPLITS}
    for f in manifest.files:
        path = data_root / f.path
        if not path.is_file():
            raise ManifestError(f"{manifest.client}: file {path} listed in its manifest is missing")
        if _sha256(path) != f.sha256:
            raise ManifestError(f"{manifest.client}: file {path} changed since partitioning (hash mismatch)")
        rows[f.split].append((load_image_uint8(path), f.label, f.path))

    def to_split(items: list[tuple[np.ndarray, int, str]]) -> ArraySplit:
        if not items:
            return ArraySplit(torch.empty(0, 3, 128, 128, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [])
        return ArraySplit(torch.from_numpy(np.stack([i[0] for i in items])),
                          torch.tensor([i[1] for i in items]), [i[2] for i in items])

    return LocalData(**{s: to_split(rows[s]) for s in LOCAL_SPLITS})
