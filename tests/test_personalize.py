from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgemri.core.config import TrainSpec, parse_config
from edgemri.core.data import load_dataset, server_client_split
from edgemri.core.partition import ManifestError, load_local_data, partition, read_manifest, write_manifests
from edgemri.core.personalize import METHODS, LocalTrainer, create_method, local_only, merge_shared
from edgemri.models import Student


def _config(**federation: object):
    base = {"data": {"client_fraction": 0.0}, "federation": {"tiers": {"hospital": {"min_examples": 20},
                           "phone": {"per_site": 2, "min_examples": 8, "max_examples": 12}}}}
    base["federation"].update(federation)
    return parse_config(base)


def test_partition_is_deterministic_disjoint_and_sited(sited_data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(sited_data)
    first = partition(dataset.train, sited_data, _config())
    again = partition(dataset.train, sited_data, _config())
    assert [m.to_dict() for m in first] == [m.to_dict() for m in again]
    assert sorted(m.client for m in first) == ["hospital-site-a", "hospital-site-b", "phone-site-a-0",
                                               "phone-site-a-1", "phone-site-b-0", "phone-site-b-1"]
    all_files = [f.path for m in first for f in m.files]
    assert len(all_files) == len(set(all_files)) == len(dataset.train)
    site_of = dict(zip(dataset.train.files, dataset.train.sites, strict=True))
    for m in first:
        assert {site_of[f.path] for f in m.files} == {m.site}
        if m.kind == "phone":
            assert 8 <= len(m.files) <= 12
        splits = {f.split for f in m.files}
        assert {"train", "test"} <= splits
    other_seed = partition(dataset.train, sited_data, _config().replace(seed=7))
    assert [m.to_dict()["files"] for m in other_seed] != [m.to_dict()["files"] for m in first]
    paths = write_manifests(first, tmp_path / "manifests")
    assert read_manifest(paths[0]).files == first[0].files
    assert json.loads((tmp_path / "manifests" / "index.json").read_text())["clients"][0]["client"] == first[0].client


def test_no_run_seed_gives_clients_the_distillation_share(sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    base = parse_config({"data": {"client_fraction": 0.5}, "federation": {
        "tiers": {"hospital": {"min_examples": 8}, "phone": {"per_site": 1, "min_examples": 4, "max_examples": 6}}}})
    server, _ = server_client_split(dataset.train, 0.5, base.data.split_seed)
    distilled = {dataset.train.files[i] for i in server.tolist()}
    draws = []
    for seed in (0, 1, 2):
        manifests = partition(dataset.train, sited_data, base.replace(seed=seed))
        files = {f.path for m in manifests for f in m.files}
        assert files and not files & distilled
        draws.append([[(f.path, f.split) for f in m.files] for m in manifests])
    assert draws[0] != draws[1] != draws[2]  # the seeds really drew different partitions of that share


def test_label_skew_makes_phone_class_mixes_uneven(sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    skewed = partition(dataset.train, sited_data, _config(partition={"label_skew_alpha": 0.1}))
    phone_max_share = [max(m.class_counts()["train"].values()) / sum(m.class_counts()["train"].values())
                       for m in skewed if m.kind == "phone"]
    assert max(phone_max_share) >= 0.6


def test_a_client_reads_only_its_manifest_files_and_checks_hashes(sited_data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(sited_data)
    manifest = partition(dataset.train, sited_data, _config())[0]
    local = load_local_data(manifest, sited_data)
    loaded = set(local.train.files) | set(local.val.files) | set(local.test.files)
    assert loaded == {f.path for f in manifest.files}
    # A changed file is refused rather than silently used.
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(sited_data, copy)
    (copy / manifest.files[0].path).write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="changed since partitioning"):
        load_local_data(manifest, copy)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_a_round_and_personalizes(name: str, sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    # A hospital: several batches, so Ditto's pull toward the global model acts.
    manifest = next(m for m in partition(dataset.train, sited_data, _config()) if m.kind == "hospital")
    local = load_local_data(manifest, sited_data)
    config = _config(method=name, ditto_lambda=0.5, finetune_epochs=1)
    method = create_method(config.federation)
    torch.manual_seed(0)
    start = Student().state_dict()
    trainer = LocalTrainer(local.train, TrainSpec(epochs=1, batch_size=8), seed=0)
    out = method.train_round(start, None, trainer)
    shared_keys = set(out.shared)
    if name == "fedper":
        assert shared_keys == {k for k in start if not k.startswith("classifier.")}
        assert set(out.personal) == {"classifier.1.weight", "classifier.1.bias"}
    else:
        assert shared_keys == set(start)
    assert any(not torch.equal(out.shared[k], start[k]) for k in out.shared)
    global_state = merge_shared(start, out.shared)
    personal = method.personalize(global_state, out.personal, trainer)
    assert set(personal) == set(start)
    if name in ("ditto", "fedavg-ft", "fedper"):
        assert any(not torch.equal(personal[k], global_state[k]) for k in personal)
    else:
        assert all(torch.equal(personal[k], global_state[k]) for k in personal)


def test_local_only_uses_the_whole_budget(sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    local = load_local_data(partition(dataset.train, sited_data, _config())[0], sited_data)
    torch.manual_seed(0)
    start = Student().state_dict()
    trainer = LocalTrainer(local.train, TrainSpec(epochs=1, batch_size=8), seed=0)
    one, three = local_only(start, trainer, rounds=1), local_only(start, trainer, rounds=3)
    assert not torch.equal(one["classifier.1.weight"], three["classifier.1.weight"])


def test_unknown_method_is_a_clear_error() -> None:
    config = _config().federation
    object.__setattr__(config, "method", "scaffold")
    with pytest.raises(ValueError, match="allowed: fedavg, fedavg-ft, fedper, ditto"):
        create_method(config)
