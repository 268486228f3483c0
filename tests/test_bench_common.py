"""Benchmarks resume from records: a seed's student is distilled once, and a finished run is never run again."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import common, personalization
from edgemri.core.io import write_json
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


def test_a_personalization_run_with_its_record_is_not_run_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The record alone stands for a finished federation (copied from another machine: no run folder beside it)."""
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run with a record was distilled or federated again")

    monkeypatch.setattr(personalization, "federate", never)
    monkeypatch.setattr(common, "distill", never)
    record = {"wall_s": 12.5, "rows": {"phone-a": {"kind": "phone", "start": 0.5}}, "client_train_s": 3.0,
              "rounds_s": 9.0, "hospital_val_pct": 80.0, "pool_label_mix": {"pool_label_mix.site.glioma": 4}}
    write_json(tmp_path / "seed1" / "new-sites-fedavg" / "benchmark-run.json", record)
    assert personalization._run(parse_config({"seed": 1}), "new-sites-fedavg", tmp_path, tmp_path / "data") == record
