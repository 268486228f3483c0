"""The pooled/oracle references' cache key and its reuse (no Flower run)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition
from edgemri.core.registries import parse_config
from edgemri.models import Student
from edgemri.simulation.baselines import references_key
from edgemri.simulation.federate import _cached_references

CONFIG = {"data": {"client_fraction": 0.0}, "federation": {"tiers": {"hospital": {"min_examples": 20},
                                                                    "phone": {"per_site": 1, "min_examples": 8}}}}


def test_references_are_reused_only_for_the_same_inputs(sited_data: Path, tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    manifests = partition(load_dataset(sited_data).train, sited_data, config)
    torch.manual_seed(0)
    start = Student().state_dict()
    key = references_key(manifests, start, config)
    ditto = parse_config({**CONFIG, "federation": {**CONFIG["federation"], "method": "ditto"}}).federation
    assert key == references_key(manifests, start, config.replace(federation=ditto))  # not an input of the references
    assert key != references_key(manifests, start, config.replace(seed=1))
    assert key != references_key(manifests, {**start, "classifier.1.bias": start["classifier.1.bias"] + 1}, config)
    clients = {m.client: {"oracle-accuracy": 0.5} for m in manifests}
    (tmp_path / "references.json").write_text(json.dumps({"key": key, "clients": clients}))
    assert _cached_references(tmp_path, key) == clients
    assert _cached_references(tmp_path, "another-key") is None
    (tmp_path / "references.json").write_text(json.dumps({"key": key, "clients": {"../x": {"a": 2.0}}}))
    assert _cached_references(tmp_path, key) is None  # malformed: computed again, never trusted
    assert _cached_references(None, key) is None
