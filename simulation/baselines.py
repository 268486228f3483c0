"""References no federated client could compute: they need the clients' data in one place.

- *pooled*: the start model fine-tuned centrally on every client's training data;
- *oracle*: per site, the start model fine-tuned centrally on all of that site's client training
  data, the headroom no federated method can beat on that site.

Both fine-tune with the hospitals' personal optimizer and plain cross-entropy (no pull toward the
start: a reference should adapt as far as the data allows), early-stopped on the clients' validation
splits plus 15% carved from the training data (a few dozen hospital scans alone select noisily).
They run here, in the simulation wiring, never inside the Flower apps, and are scored on each
client's own test split and, where the data has them, on its site's evaluation pool (class-mixed
as the client's run under label skew).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from edgemri.core.config import Config
from edgemri.core.data.dataset import ArraySplit, Dataset
from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.data.partition import Manifest, load_pool
from edgemri.core.federation.personalize import (
    LocalTrainer,
    State,
    evaluate_state,
    pool_accuracy,
    predicted_classes,
    state_digest,
    student_from,
)
from edgemri.core.federation.protocol import POOL_PREFIX

POOLED, ORACLE = "pooled-accuracy", "oracle-accuracy"
ORACLE_EPOCHS = 30  # an upper bound on the budget; selection on validation stops it where it peaks
CARVED_VAL_FRACTION = 0.15


def _rows(dataset: Dataset, manifests: list[Manifest], split: str) -> list[int]:
    # Files that are no longer readable are left out, as the failing client leaves them out.
    index = {f: i for i, f in enumerate(dataset.train.files)}
    return [index[f.path] for m in manifests for f in m.files if f.split == split and f.path in index]


def _fine_tune(start: State, train: ArraySplit, val: ArraySplit, config: Config, seed: int) -> State:
    """The start model fine-tuned centrally, early-stopped on ``val`` plus a share carved from ``train``."""
    order = np.random.default_rng(seed).permutation(len(train))
    cut = max(1, round(CARVED_VAL_FRACTION * len(train)))
    carved = train.subset(order[:cut].tolist())
    train = train.subset(order[cut:].tolist())
    val = ArraySplit(torch.cat([val.images, carved.images]), torch.cat([val.labels, carved.labels]),
                     [*val.files, *carved.files])
    hospital = config.federation.tier("hospital")
    recipe = dataclasses.replace(hospital.personal, epochs=ORACLE_EPOCHS, select="val", distill_weight=0.0)
    model = student_from(start)
    LocalTrainer(train, hospital.train_spec(), seed, personal=recipe, val=val).personalize(model)
    return model.state_dict()


def _class_mix(manifest: Manifest) -> torch.Tensor:
    counts = manifest.class_counts()
    totals = torch.tensor([float(sum(split[c] for split in counts.values())) for c in CLASS_NAMES])
    return totals / totals.sum()


REFERENCES_VERSION = 2  # 2: pools from the manifests; bump when _fine_tune or the scoring changes


def references_key(manifests: list[Manifest], start: State, config: Config) -> str:
    """All the references depend on: the clients' files and pools (by hash), the start model, the seed, the
    hospitals' recipe, the label skew (the pool weights). Runs that share it (several methods on one seed) can
    share one computation."""
    digest = hashlib.sha256()
    clients = [(m.client, m.kind, m.site, [dataclasses.asdict(f) for f in m.files]) for m in manifests]
    digest.update(json.dumps(clients, sort_keys=True).encode())
    digest.update(state_digest(start).encode())
    settings = {"seed": config.seed, "hospital": dataclasses.asdict(config.federation.tier("hospital")),
                "label_skew_alpha": config.federation.partition.label_skew_alpha, "epochs": ORACLE_EPOCHS,
                "carved": CARVED_VAL_FRACTION, "version": REFERENCES_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def reference_accuracies(manifests: list[Manifest], dataset: Dataset, start: State, config: Config,
                         data_root: str) -> dict[str, dict[str, float]]:
    """Per client: the pooled and the site-oracle models' accuracy on its test split and its site pool."""
    pools = {site: load_pool(m, Path(data_root)) for site, m in {m.site: m for m in manifests}.items()}  # one per site
    weighted = config.federation.partition.label_skew_alpha is not None

    def subset(members: list[Manifest], split: str) -> ArraySplit:
        return dataset.train.subset(_rows(dataset, members, split))

    pooled = _fine_tune(start, subset(manifests, "train"), subset(manifests, "val"), config, config.seed)
    sites = sorted({m.site for m in manifests})
    # With every client at one site (the real new-sites federation) the site oracle is the pooled model.
    oracles = {site: pooled if len(sites) == 1 else
               _fine_tune(start, subset([m for m in manifests if m.site == site], "train"),
                          subset([m for m in manifests if m.site == site], "val"), config, config.seed)
               for site in sites}
    # Each site's pool is scored once per model; a client's pool score mixes those predictions by its class mix.
    on_pools = {site: {POOLED: predicted_classes(pooled, pool), ORACLE: predicted_classes(oracles[site], pool)}
                for site, pool in pools.items() if len(pool)}
    out: dict[str, dict[str, float]] = {}
    for manifest in manifests:
        test = subset([manifest], "test")
        models = {POOLED: pooled, ORACLE: oracles[manifest.site]}
        scores = {key: evaluate_state(model, test)["accuracy"] for key, model in models.items()}
        if manifest.site in on_pools:
            weights = _class_mix(manifest) if weighted else None
            for key, predictions in on_pools[manifest.site].items():
                scores[POOL_PREFIX + key] = pool_accuracy(predictions, pools[manifest.site].labels, weights)
        out[manifest.client] = {k: float(v) for k, v in scores.items()}
    return out
