"""Shared by the benchmarks: where results go, what machine made them, a quickstart data set."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgemri.core.config import Config
from edgemri.core.io import write_json
from edgemri.reports.common import machine, package_versions
from edgemri.simulation.pipeline import distill

RESULTS = Path(__file__).resolve().parent / "results"


class Sampler(threading.Thread):
    """Calls ``sample()`` every ``interval_s`` in a thread while its ``with`` block runs (the memory samplers)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def sample(self) -> object:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stopped.set()
        self.join()


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


def distilled_student(config: Config, distill_dir: Path) -> Path:
    """``distill_dir/student.pt``, distilled (a rerun resumes) only when it or its record is missing; the record,
    ``benchmark-distill.json``, keeps the distillation's wall time. Benchmarks that federate from one seed's
    student share the folder, and a copied student with its record stands for the whole distillation."""
    record = distill_dir / "benchmark-distill.json"
    if not record.is_file() or not (distill_dir / "student.pt").is_file():
        started = time.perf_counter()
        distill(config, distill_dir, resume=True)
        write_json(record, {"wall_s": time.perf_counter() - started})
    return distill_dir / "student.pt"


def distill_seconds(distill_dir: Path) -> float:
    """The wall time in ``distilled_student``'s record (0 where there is none)."""
    record = distill_dir / "benchmark-distill.json"
    return float(json.loads(record.read_text())["wall_s"]) if record.is_file() else 0.0
