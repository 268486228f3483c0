"""`make bench`: run every benchmark once, each writing benchmarks/results/NAME.json."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("kaggle", "train_speed", "dp_speed", "latency", "device_footprint", "data_calibration",
              "personalization", "distillation", "privacy_attacks", "scale", "load")
# make their own inputs (personalization and privacy_attacks: clinics; distillation: quickstart and kaggle-size;
# scale: kaggle-size, to hold 1,000 clients; load: quickstart without pools, kept in its OUT; kaggle: the real scans
# at ../shared/data, skipped with a message where they are absent)
OWN_DATA = ("kaggle", "latency", "device_footprint", "personalization", "distillation", "privacy_attacks", "scale",
            "load")
# The real-data federation benchmarks (issue 23), in order: the personalization run distills the students the
# others start from. Each says so and skips where ../shared/data is absent.
REAL = (("personalization", "--real"), ("dp_real",), ("privacy_attacks", "--real"))


def main() -> int:
    from edgemri.core.data.synth import generate

    data = Path(tempfile.mkdtemp(prefix="edgemri-bench-")) / "data"
    generate(data, preset="quickstart", seed=0, progress=False)  # one data set for all of them
    failed = []
    for name in BENCHMARKS:
        if not (ROOT / "benchmarks" / f"{name}.py").is_file():
            continue
        print(f"== {name}", flush=True)
        args = [sys.executable, "-m", f"benchmarks.{name}"]
        if name not in OWN_DATA:
            args += ["--data-root", str(data)]
        if subprocess.run(args, cwd=ROOT).returncode:
            failed.append(name)
    for name, *flags in REAL:
        print(f"== {name} {' '.join(flags)} (real data)", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *flags], cwd=ROOT).returncode:
            failed.append(f"{name} {' '.join(flags)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
