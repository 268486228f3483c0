"""The quickstart federation: wall time, peak memory of the whole process tree, and the
share of wall time spent in client training versus Flower and process overhead.

    python -m benchmarks.federation [--data-root DIR] [--start CHECKPOINT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from benchmarks.common import quickstart_data, write_result
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.models import Student
from edgemri.simulation.federate import federate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class PeakMemory(threading.Thread):
    """Samples the summed RSS of this process and all its descendants (Ray, Flower)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_bytes = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stopped.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--start", default=None, help="start checkpoint (default: a random student)")
    args = parser.parse_args()
    root = quickstart_data(args.data_root)
    work = Path(tempfile.mkdtemp(prefix="edgemri-fedbench-"))
    start = Path(args.start) if args.start else work / "student.pt"
    if not args.start:
        torch.manual_seed(0)
        save_checkpoint(start, Checkpoint(model="student", state_dict=Student().state_dict(), role="random"))
    config = load_config(CONFIG)
    monitor = PeakMemory()
    monitor.start()
    started = time.perf_counter()
    run = federate(config, data_root=root, out=work / "run", start_checkpoint=start)
    wall = time.perf_counter() - started
    monitor.stopped.set()
    monitor.join()
    result = json.loads((run.out / "server" / "result.json").read_text())
    train_seconds = sum(m.get("train-seconds", 0.0) for h in result["history"] for m in h["train_metrics"].values())
    rounds_seconds = sum(h["seconds"] for h in result["history"])
    values = {
        "clients": len(result["clients"]), "rounds": len(result["history"]),
        "wall_seconds": wall, "flower_run_seconds": run.report["flower"]["seconds"],
        "server_round_seconds_total": rounds_seconds,
        "client_train_seconds_total": train_seconds,
        "client_train_share_of_wall": train_seconds / wall,
        "peak_rss_mb": monitor.peak_bytes / 2**20,
    }
    for key, value in values.items():
        print(f"{key:32s} {value:10.2f}")
    write_result("federation", values)


if __name__ == "__main__":
    main()
