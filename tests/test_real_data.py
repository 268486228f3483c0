"""Checks on the real Kaggle set (../shared/data/brain-tumor-mri-224); skipped where the folder is absent.

The suite decodes the set once per session into its private cache (about 10 s on 2 busy CPUs), so
every test here shares the ``real_dataset`` fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemri.core.audit import DuplicateAudit, audit_dataset
from edgemri.core.data import Dataset, load_dataset

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

    from edgemri.core.checkpoint import load_checkpoint
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
