"""The pooled upper bound: one model trained centrally on every client's training data.

Only an experimenter holding all the data can compute it, which is the point of the
comparison; it runs here, in the simulation wiring, never inside the Flower apps.
"""

from __future__ import annotations

import dataclasses

import torch

from edgemri.core.config import Config
from edgemri.core.data import Dataset
from edgemri.core.partition import Manifest
from edgemri.core.personalize import LocalTrainer, evaluate_state, local_only


def pooled_accuracy(manifests: list[Manifest], dataset: Dataset, start: dict[str, torch.Tensor],
                    config: Config) -> dict[str, float]:
    """Train on the union of the clients' train splits; accuracy on each client's test split."""
    index = {f: i for i, f in enumerate(dataset.train.files)}

    def rows(split: str, manifest: Manifest) -> list[int]:
        # Files that are no longer readable are left out, as the failing client leaves them out.
        return [index[f.path] for f in manifest.files if f.split == split and f.path in index]

    pooled_train = dataset.train.subset([i for m in manifests for i in rows("train", m)])
    hospital = config.federation.tier("hospital")
    trainer = LocalTrainer(pooled_train, hospital.train_spec(), seed=config.seed,
                           personal=dataclasses.replace(hospital.personal, select="last"))
    state = local_only(start, trainer, config.federation.rounds)
    return {m.client: evaluate_state(state, dataset.train.subset(rows("test", m)))["accuracy"] for m in manifests}

