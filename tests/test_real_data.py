"""Checks on the real Kaggle set (../shared/data/brain-tumor-mri-224); skipped where the folder is absent.

The suite decodes the set once per session into its private cache (about 10 s on 2 busy CPUs), so
every test here shares the ``real_dataset`` fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemri.core.data.audit import DuplicateAudit, audit_dataset
from edgemri.core.data.dataset import Dataset, load_dataset

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/brain-tumor-mri-224"

pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"the real data set is not at {REAL_DATA}")


@pytest.fixture(scope="session")
def real_dataset() -> Dataset:
    return load_dataset(REAL_DATA)


@pytest.fixture(scope="session")
def real_audit(real_dataset: Dataset) -> DuplicateAudit:
    return audit_dataset(real_dataset)


def test_the_real_set_has_the_documented_exact_duplicates(real_dataset: Dataset, real_audit: DuplicateAudit) -> None:
    assert (len(real_dataset.train), len(real_dataset.test)) == (5708, 1311)
    counts = real_audit.counts()
    # data/README.md's "189 Testing files are byte-identical to a Training file" counts distinct contents:
    # 189 of Testing's contents are in Training, and 216 Testing files carry one of them (some are twice in Testing).
    cross = counts["Testing-Training"]
    assert (cross["exact_contents"], cross["exact"]) == (189, 216)
    assert counts["Training-Training"]["exact"]["groups"] == 155
    # Near copies include every exact one, and groups are transitive on top of that.
    assert cross["exact"] <= cross["near"] <= cross["grouped"] == len(real_audit.leaked_test())
    for pair in ("Training-Training", "Testing-Testing"):
        exact, near = counts[pair]["exact"], counts[pair]["near"]
        assert exact["images"] <= near["images"] and exact["redundant"] <= near["redundant"]
    assert len(real_audit.train_groups()) == len(real_dataset.train)
    per_class = real_audit.per_class()
    for pair in ("Training-Training", "Testing-Testing"):  # each image is counted once, under its own class
        assert sum(c[pair]["near"] for c in per_class.values()) == counts[pair]["near"]["images"]
    assert sum(c["Testing-Training"]["near"] for c in per_class.values()) == cross["near"]


SHIPPED_SAMPLE = 300  # Testing scans the shipped student is checked on: a 95% interval of about +-3 points
SHIPPED_TOLERANCE_PTS = 6.0  # about 4 standard errors at n = 300: a broken model fails, sampling does not


def test_the_shipped_student_scores_on_real_scans_what_its_card_says(real_dataset: Dataset) -> None:
    import torch

    from edgemri.core.training.checkpoint import load_checkpoint
    from edgemri.edge.pretrained import resolve_model
    from edgemri.edge.runtime import load_model

    path = resolve_model("kaggle-student")
    recorded = load_checkpoint(path).metrics["test"]["full_testing_accuracy"]
    assert f"{100 * recorded:.1f}" in (path.parent / "kaggle-student.md").read_text()
    pick = torch.randperm(len(real_dataset.test), generator=torch.Generator().manual_seed(0))[:SHIPPED_SAMPLE]
    model = load_model(path)
    images, labels = real_dataset.test.images[pick], real_dataset.test.labels[pick]
    accuracy = float((model.logits(model.normalize(images)).argmax(1) == labels).float().mean())
    assert abs(100 * accuracy - 100 * recorded) <= SHIPPED_TOLERANCE_PTS


REAL_FEDERATION_SCANS = {"Training": 50, "Testing": 25}  # per class: 300 real scans in all


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred real scans in the Kaggle layout (copies: a client refuses files outside its data root)."""
    import shutil

    root = tmp_path_factory.mktemp("real-subset") / "data"
    for split, count in REAL_FEDERATION_SCANS.items():
        for folder in sorted(p for p in (REAL_DATA / split).iterdir() if p.is_dir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.jpg"))[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def test_a_real_data_federation_from_the_shipped_student(real_subset: Path, tmp_path: Path) -> None:
    """3 clients, 2 rounds, DP-SGD on the phones: reports, ledgers, pools free of Training copies, no scan sent."""
    import json

    from edgemri.core.data.partition import manifest_paths, read_manifest
    from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger
    from edgemri.core.registries import parse_config
    from edgemri.edge.pretrained import resolve_model
    from edgemri.simulation.federate import federate

    config = parse_config({"seed": 0, "data": {"dedup": True, "client_fraction": 0.0}, "federation": {
        "method": "fedavg-ft", "rounds": 2, "scenario": "seen-sites", "partition": {"pseudo_sites": 1},
        "tiers": {"hospital": {"min_examples": 50, "local_epochs": 1},
                  "phone": {"per_site": 2, "min_examples": 30, "max_examples": 40, "availability": 1.0}}},
        "privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 8.0, "budget_epsilon": 10.0}}}})
    run = federate(config, data_root=real_subset, out=tmp_path / "run",
                   start_checkpoint=resolve_model("kaggle-student"), audit=True)
    manifests = [read_manifest(m) for m in manifest_paths(tmp_path / "run" / "manifests")]
    assert sorted(m.kind for m in manifests) == ["hospital", "phone", "phone"]
    # Every client's evaluation pool is real Testing at its site, with no copy of any Training scan in it.
    dataset = load_dataset(real_subset)
    audit = audit_dataset(dataset)
    leaked = {dataset.test.files[k] for k in audit.leaked_test()}
    for manifest in manifests:
        pool = [f.path for f in manifest.files if f.split == "pool"]
        assert pool and all(f.startswith("Testing/") for f in pool) and not leaked & set(pool)
    report = run.report
    assert set(report["pool"]) and all(c["kind"] in ("hospital", "phone") for c in report["clients"])
    # The phones trained under DP-SGD, each round in its ledger; the hospital has none.
    for manifest in manifests:
        ledger_path = tmp_path / "run" / "clients" / manifest.client / LEDGER_FILE
        if manifest.kind == "phone":
            ledger = Ledger.open(ledger_path, manifest.client)
            assert ledger.rounds == [1, 2] and 0 < ledger.records[-1]["epsilon"] <= 10.0
        else:
            assert not ledger_path.exists()
    # Only student arrays and scalar metrics travelled: no scan, no path.
    for record_file in (tmp_path / "run" / "audit").glob("*.json"):
        message = json.loads(record_file.read_text())
        for side in ("in", "out"):
            for record in message[side].get("records", {}).values():
                if record["type"] == "arrays":
                    assert all(len(shape) != 3 and shape[-2:] != [128, 128] for shape in record["arrays"].values())
                else:
                    text = json.dumps(record["values"])
                    assert ".jpg" not in text and "Testing" not in text and "Training" not in text


def test_the_real_sites_keep_every_class_and_no_client_site_is_distilled(real_dataset: Dataset) -> None:
    from edgemri.core.data.splits import scenario_split, sited_training
    from edgemri.core.registries import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "kaggle-federation.yaml",
                         [f"data.root={REAL_DATA}"])
    sites = sited_training(real_dataset.train, config).sites
    labels = real_dataset.train.labels.tolist()
    assert len(set(sites)) == 2  # the silhouette's choice, documented in docs/DATA.md
    for site in set(sites):
        assert {label for label, s in zip(labels, sites, strict=True) if s == site} == {0, 1, 2, 3}
    server, clients = scenario_split(real_dataset.train, config)
    assert not {sites[i] for i in server.tolist()} & {sites[i] for i in clients.tolist()}
    assert len(server) + len(clients) == len(real_dataset.train)
