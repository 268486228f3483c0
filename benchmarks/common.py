"""Shared by the benchmarks: where results go, what machine made them, a quickstart data set."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgemri.core.io import write_json
from edgemri.reports.common import machine, package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, values: dict[str, Any], folder: Path = RESULTS) -> Path:
    """One flat JSON per benchmark, with the machine and versions recorded (``folder``: a smoke run's elsewhere)."""
    flat = {**values, **{f"machine_{k}": v for k, v in machine().items()},
            **{f"version_{k}": v for k, v in package_versions().items()}}
    path = write_json(Path(folder) / f"{name}.json", flat)
    print(f"wrote {path}")
    return path


def quickstart_data(data_root: str | None, preset: str = "quickstart") -> Path:
    """The given Kaggle-layout folder, or a fresh synthetic set of ``preset``."""
    if data_root:
        return Path(data_root)
    from edgemri.core.data.synth import generate

    root = Path(tempfile.mkdtemp(prefix="edgemri-bench-")) / "data"
    generate(root, preset=preset, seed=0, progress=False)
    return root


def real_data_missing(name: str, root: Path) -> bool:
    """True (and says so) where the real Kaggle folder is absent: a real-data benchmark then measures nothing."""
    if (Path(root) / "Training").is_dir():
        return False
    print(f"{name}: no real data at {root}; nothing to measure (the benchmark needs the Kaggle folder)")
    return True
