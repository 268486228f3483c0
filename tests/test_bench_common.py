"""benchmarks/common.py: a seed's distilled student is distilled once, and its record resumes a rerun elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import common
from edgemri.core.registries import parse_config


def test_a_student_with_its_record_is_used_and_one_without_is_distilled(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    distilled: list[Path] = []

    def fake_distill(config: object, out: Path, *, resume: bool) -> None:
        assert resume  # a rerun continues what an interrupted one left
        distilled.append(out)
        (out / "student.pt").parent.mkdir(parents=True, exist_ok=True)
        (out / "student.pt").write_bytes(b"student")

    monkeypatch.setattr(common, "distill", fake_distill)
    config, folder = parse_config({}), tmp_path / "seed0" / "distill"
    assert common.distill_seconds(folder) == 0.0
    assert common.distilled_student(config, folder) == folder / "student.pt" and distilled == [folder]
    assert common.distill_seconds(folder) > 0.0  # its record keeps the wall time
    # Copied with its record (another machine's run): no second distillation.
    assert common.distilled_student(config, folder) == folder / "student.pt" and distilled == [folder]
    # A student without its record was left by an interrupted run: distilled (resumed) again.
    (folder / "benchmark-distill.json").unlink()
    common.distilled_student(config, folder)
    assert distilled == [folder, folder]
