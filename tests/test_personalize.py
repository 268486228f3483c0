from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from edgemri.core.config import PersonalConfig, TrainSpec
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.images import normalize
from edgemri.core.data.partition import ManifestError, load_local_data, partition, read_manifest, write_manifests
from edgemri.core.data.splits import server_client_split
from edgemri.core.federation.personalize import (
    INPUT_SCALE,
    INPUT_SHIFT,
    METHODS,
    LocalTrainer,
    class_weighted_accuracy,
    create_method,
    evaluate_state,
    exportable,
    information_maximization,
    local_only,
    merge_shared,
    personal_model,
    start_preserving_norms,
    student_from,
)
from edgemri.core.registries import parse_config
from edgemri.core.training.evaluate import predict_logits
from edgemri.models import NormStudent, Student


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


def test_label_skew_cuts_each_class_unevenly_among_a_sites_hospitals(sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    tiers = {"hospital": {"per_site": 2, "min_examples": 4}, "phone": {"per_site": 1, "min_examples": 4,
                                                                      "max_examples": 6}}

    def hospitals(alpha: float | None) -> dict[str, list]:
        manifests = partition(dataset.train, sited_data, _config(tiers=tiers, partition={"label_skew_alpha": alpha}))
        return {m.client: [sum(split[c] for split in (m.class_counts()[s] for s in ("train", "val", "test")))
                           for c in m.class_counts()["train"]] for m in manifests if m.kind == "hospital"}

    even, skewed = hospitals(None), hospitals(0.1)
    assert set(even) == set(skewed) and len(skewed) == 4  # two hospitals at each of the two sites
    # Dealt in turn, a site's two hospitals share every class; cut by Dirichlet(0.1) shares, one of them holds
    # (nearly) all of some class.
    def largest_share(mixes: dict[str, list]) -> float:
        return max(max(a, b) / (a + b) for h in {c.rsplit("-", 1)[0] for c in mixes}
                   for a, b in zip(mixes[f"{h}-0"], mixes[f"{h}-1"], strict=True) if a + b)

    assert largest_share(even) < 0.75 and largest_share(skewed) > 0.9
    assert hospitals(0.1) == skewed  # seeded


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


@pytest.fixture(scope="module")
def hospital_data(sited_data: Path):
    dataset = load_dataset(sited_data)
    # A hospital: several batches, so Ditto's pull toward the global model acts.
    manifest = next(m for m in partition(dataset.train, sited_data, _config()) if m.kind == "hospital")
    return load_local_data(manifest, sited_data)


def _trainer(local, **personal: object) -> LocalTrainer:
    recipe = PersonalConfig(**{"epochs": 1, "select": "last", **personal})
    return LocalTrainer(local.train, TrainSpec(epochs=1, batch_size=8), seed=0, personal=recipe, val=local.val)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_a_round_and_personalizes(name: str, hospital_data) -> None:
    config = _config(method=name, ditto_lambda=0.5)
    method = create_method(config.federation)
    torch.manual_seed(0)
    start = Student().state_dict()
    trainer = _trainer(hospital_data)
    out = method.train_round(start, None, trainer)
    head = {"classifier.1.weight", "classifier.1.bias"}
    expected_shared = {"fedper": set(start) - head, "lg-fedavg": head}.get(name, set(start))
    assert set(out.shared) == expected_shared
    if name == "fedbn":  # the four norms stay on the client
        assert {k.split(".")[1] for k in out.personal} == {"0", "1", "2", "3"}
        assert all(k.startswith(NormStudent.NORM_PREFIX) for k in out.personal)
    elif method.keeps_personal_state:
        assert set(out.personal) == (set(start) - expected_shared if name != "ditto" else set(start))
    assert any(not torch.equal(out.shared[k], start[k]) for k in out.shared)
    global_state = merge_shared(start, out.shared)
    personal = method.personalize(global_state, out.personal, trainer)
    plain = {k: v for k, v in personal.items() if k not in (INPUT_SCALE, INPUT_SHIFT)}
    assert set(plain) == set(start)
    changed = {k for k in plain if not torch.equal(plain[k], global_state[k])}
    if name == "fedavg":
        assert not changed
    elif name in ("fedavg-cal", "label-free"):
        # Only the calibration and the biases may move: a few dozen parameters.
        assert {INPUT_SCALE, INPUT_SHIFT} <= set(personal)
        assert changed and all(k.endswith(".bias") for k in changed)
    else:
        assert changed


def test_calibration_folds_into_the_preprocessing_exactly(hospital_data) -> None:
    torch.manual_seed(1)
    student = Student()
    state = {**student.state_dict(), INPUT_SCALE: torch.tensor([1.3, 0.8, 1.1]).view(1, 3, 1, 1),
             INPUT_SHIFT: torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)}
    exported, preprocessing = exportable(state)
    assert set(exported) == set(student.state_dict())
    images = hospital_data.test.images[:16]
    calibrated = predict_logits(personal_model(state), images, normalize)
    folded = predict_logits(student_from(exported), images,
                            lambda x: normalize(x, mean=preprocessing["mean"], std=preprocessing["std"]))
    assert torch.allclose(calibrated, folded, atol=1e-4)
    assert not torch.allclose(calibrated, predict_logits(student, images, normalize), atol=1e-3)


def test_learning_without_forgetting_at_full_weight_keeps_the_start_model(hospital_data) -> None:
    torch.manual_seed(0)
    start = Student().state_dict()
    kept, free = student_from(start), student_from(start)
    # KL toward itself: a zero gradient (SGD: Adam would blow rounding noise up to full-size steps).
    _trainer(hospital_data, distill_weight=1.0, optimizer="sgd", lr=0.05).personalize(kept)
    _trainer(hospital_data, distill_weight=0.0, optimizer="sgd", lr=0.05).personalize(free)
    weight = "conv_block_1.0.weight"
    assert torch.allclose(kept.state_dict()[weight], start[weight], atol=1e-6)
    assert not torch.allclose(free.state_dict()[weight], start[weight], atol=1e-4)


def test_selection_on_validation_keeps_the_start_when_training_only_hurts(hospital_data) -> None:
    torch.manual_seed(0)
    start = Student().state_dict()
    model = student_from(start)
    # Train on permuted labels at a high learning rate: validation accuracy can only fall or stay.
    wrong = dataclasses.replace(hospital_data.train, labels=(hospital_data.train.labels + 1) % 4)
    trainer = LocalTrainer(wrong, TrainSpec(epochs=1, batch_size=8), seed=0, val=hospital_data.train,
                           personal=PersonalConfig(epochs=2, lr=0.01, distill_weight=0.0, select="val"))
    metrics = trainer.personalize(model)
    if metrics["personal-epochs"] == 0:
        assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    else:  # an epoch beat the start on validation: then it must really score higher there
        assert evaluate_state(model.state_dict(), hospital_data.train)["accuracy"] > \
            evaluate_state(start, hospital_data.train)["accuracy"]


def test_information_maximization_on_hand_built_logits() -> None:
    batch = None
    uniform = torch.zeros(4, 4)
    confident_diverse = torch.eye(4) * 50
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 50
    assert information_maximization(uniform, batch).item() == pytest.approx(0.0, abs=1e-6)
    assert information_maximization(confident_diverse, batch).item() == pytest.approx(-math.log(4), abs=1e-4)
    assert information_maximization(collapsed, batch).item() == pytest.approx(0.0, abs=1e-4)


def test_class_weighted_accuracy_on_a_hand_built_example() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 0, 0, 0, 2, 1])  # class 0: 1.0, class 1: 0.0, class 2: 0.5
    assert class_weighted_accuracy(predictions, labels, torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    assert class_weighted_accuracy(predictions, labels, torch.tensor([0.5, 0.5, 0, 0])) == pytest.approx(0.5)
    # Class 3 is absent from the pool: its weight is spread over the classes present.
    assert class_weighted_accuracy(predictions, labels, torch.tensor([0.25, 0.25, 0.25, 0.25])) == \
        pytest.approx(0.5)


def test_local_only_uses_the_whole_budget(sited_data: Path) -> None:
    dataset = load_dataset(sited_data)
    local = load_local_data(partition(dataset.train, sited_data, _config())[0], sited_data)
    torch.manual_seed(0)
    start = Student().state_dict()
    trainer = LocalTrainer(local.train, TrainSpec(epochs=1, batch_size=8), seed=0,
                           personal=PersonalConfig(epochs=1, select="last"))
    one, three = local_only(start, trainer, rounds=1), local_only(start, trainer, rounds=3)
    assert not torch.equal(one["classifier.1.weight"], three["classifier.1.weight"])


def test_unknown_method_is_a_clear_error() -> None:
    config = _config().federation
    object.__setattr__(config, "method", "scaffold")
    with pytest.raises(ValueError, match="allowed: fedavg, fedavg-ft, fedavg-cal, label-free, fedper, lg-fedavg"):
        create_method(config)


def test_fedbn_norms_start_as_the_identity_and_fold_into_the_student(hospital_data) -> None:
    torch.manual_seed(0)
    start = Student().state_dict()
    images = hospital_data.train.images
    model = start_preserving_norms(start, images)
    plain = predict_logits(student_from(start), images[:32], normalize)
    assert torch.allclose(predict_logits(model, images[:32], normalize), plain, atol=1e-4)  # eval mode
    model.train()
    with torch.no_grad():  # training mode, on the whole set the statistics came from: the same function
        assert torch.allclose(model(normalize(images)), predict_logits(student_from(start), images, normalize),
                              atol=1e-3)
    method = create_method(_config(method="fedbn").federation)
    out = method.train_round(start, None, _trainer(hospital_data))
    personal = method.personalize(merge_shared(start, out.shared), out.personal, _trainer(hospital_data))
    assert set(personal) == set(start)  # the 12,628-parameter student, norms folded in
    trained = NormStudent.from_student_state(merge_shared(start, out.shared))
    trained.load_state_dict({**trained.state_dict(), **out.personal})
    assert torch.allclose(predict_logits(trained, images[:32], normalize),
                          predict_logits(student_from(personal), images[:32], normalize), atol=1e-4)


def test_a_personal_state_cannot_replace_shared_weights() -> None:
    torch.manual_seed(0)
    global_state = Student().state_dict()
    tampered = {k: torch.zeros_like(v) for k, v in global_state.items()}  # a state file holding every key
    for name in ("fedper", "lg-fedavg"):
        method = create_method(_config(method=name).federation)
        merged = method.local_start(global_state, tampered)
        for key, value in merged.items():
            assert torch.equal(value, tampered[key] if method.is_personal(key) else global_state[key])
