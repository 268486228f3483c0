"""What a phone pays to take part: memory, time and bytes per round on a real SuperNode.

A small real deployment on 127.0.0.1 (TLS, SuperNode authentication): one hospital and
one phone SuperNode, each with its own manifest and state folder. While the federation
runs, the phone's process tree (SuperNode, its SuperExec, and the ClientApp process it
starts for every message) is sampled with psutil. The message audit (clients/audit.py)
says which ClientApp process handled which message; the payload of each message is
measured with Flower's public API on an equal message (same arrays, shapes and dtype
float32; the same config and metric values): the arrays as Flower serializes them plus the
scalar values as JSON. Flower's framing, HTTP and TLS are not counted.

    python -m benchmarks.device_footprint [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from flwr.app import ArrayRecord

from benchmarks.common import write_result
from edgemri.core.checkpoint import Checkpoint, save_checkpoint
from edgemri.core.config import parse_config
from edgemri.core.data import load_dataset
from edgemri.core.io import write_text
from edgemri.core.partition import partition, read_manifest, write_manifests
from edgemri.core.synth import generate
from edgemri.deploy.launcher import LocalDeployment
from edgemri.models import Student
from edgemri.simulation.federate import APP_DIR

MB = 1024 * 1024
SITE = "site1"
PHONE, HOSPITAL = f"phone-{SITE}-0", f"hospital-{SITE}"


@dataclass
class ProcessTrace:
    command: str
    started: float
    last_seen: float
    peak_rss: int = 0
    cpu_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.last_seen - self.started


class TreeSampler(threading.Thread):
    """Samples a process and all its descendants: the summed RSS and each process's own trace."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = 0
        self.processes_at_peak = 0
        self.traces: dict[int, ProcessTrace] = {}
        self.stopped = threading.Event()

    def sample(self) -> int:
        total = 0
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        for process in tree:
            try:
                with process.oneshot():
                    rss, cpu = process.memory_info().rss, process.cpu_times()
                    trace = self.traces.get(process.pid)
                    if trace is None:
                        trace = self.traces[process.pid] = ProcessTrace(" ".join(process.cmdline()),
                                                                        process.create_time(), time.time())
            except psutil.Error:
                continue
            total += rss
            trace.last_seen = time.time()
            trace.peak_rss = max(trace.peak_rss, rss)
            trace.cpu_seconds = cpu.user + cpu.system
        if total > self.peak_rss:
            self.peak_rss, self.processes_at_peak = total, len(tree)
        return total

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(self.interval_s)


def message_bytes(description: dict[str, Any]) -> tuple[int, int]:
    """(payload bytes, float32 array bytes) of a message like the audited one, with Flower's public API.

    The payload is each array as Flower serializes it (``Array.data``: the buffer with its dtype and shape
    header) plus the config and metric values as JSON; Flower's own framing (object ids, protobuf and
    HTTP headers, TLS) is not counted: no public API exposes a message's serialized size.
    """
    if "records" not in description:
        raise RuntimeError(f"an audited message carried an error, not a reply: {description}")
    payload = array_bytes = 0
    for record in description["records"].values():
        if record["type"] == "arrays":
            arrays = ArrayRecord({name: torch.zeros(shape) for name, shape in record["arrays"].items()})
            payload += sum(len(array.data) for array in arrays.values())
            array_bytes += sum(4 * int(torch.Size(shape).numel()) for shape in record["arrays"].values())
        elif record["type"] in ("config", "metrics"):
            payload += len(json.dumps(record["values"]).encode())
    return payload, array_bytes


def prepare(work: Path, rounds: int) -> tuple[Path, dict[str, Path], Path, Path]:
    """A tiny synthetic set, the manifests, a config and a random start student."""
    data = work / "data"
    generate(data, preset="quickstart", seed=0, progress=False, limit=100)
    config = {"seed": 0, "federation": {
        "rounds": rounds, "method": "ditto", "min_clients": 2, "round_timeout_s": 120,
        "tiers": {"hospital": {"min_examples": 8, "local_epochs": 1},
                  "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12, "availability": 1.0}}}}
    manifests = write_manifests(partition(load_dataset(data).train, data, parse_config(config)), work / "manifests")
    by_client = {read_manifest(p).client: p for p in manifests}
    config_path = write_text(work / "config.yaml", yaml.safe_dump(config))
    torch.manual_seed(0)
    start = save_checkpoint(work / "student.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                            role="random"))
    return data, by_client, config_path, start


def measure(work: Path, rounds: int) -> dict[str, Any]:
    data, manifests, config_path, start = prepare(work, rounds)
    run_dir, audit = work / "run", work / "run" / "audit"
    with LocalDeployment(work / "deployment") as deployment:
        for name in (HOSPITAL, PHONE):
            deployment.add_node(name, manifest=manifests[name], data_dir=data, state_dir=work / "devices" / name)
        deployment.wait_status([HOSPITAL, PHONE], "online")
        sampler = TreeSampler(deployment.nodes[PHONE].process.process.pid)
        idle_rss = max(sampler.sample() for _ in range(10))  # SuperNode and SuperExec, waiting for work
        sampler.start()
        try:
            outcome = deployment.run(APP_DIR, {
                "config": str(config_path), "run-dir": str(run_dir), "data-root": "",
                "manifests": str(work / "manifests"), "state-root": "", "start-checkpoint": str(start),
                "num-clients": 2, "resume": False, "audit-dir": str(audit)}, work / "logs" / "run.log", 600)
        finally:
            sampler.stopped.set()
            sampler.join()
    if not outcome.ok:
        raise RuntimeError(f"the federation ended {outcome.status}: {outcome.details[-1500:]}; logs in {work}")

    phone_id = deployment.node_ids[PHONE]
    per_round: dict[int, dict[str, float]] = {r: {"seconds": 0.0, "cpu": 0.0, "in": 0, "out": 0, "in_arrays": 0,
                                                  "out_arrays": 0} for r in range(1, rounds + 1)}
    clientapp_peaks = []
    for path in audit.glob(f"node-{phone_id}-*.json"):
        pid = int(path.stem.rsplit("-", 1)[1])  # node-ID-TIME_NS-PID: the ClientApp process that answered
        record = json.loads(path.read_text())
        trace = sampler.traces.get(pid)
        if trace is not None:
            clientapp_peaks.append(trace.peak_rss)
        values = record["in"]["records"].get("config", {}).get("values", {})
        if record["in"]["message_type"] not in ("train", "evaluate") or values.get("final", False):
            continue  # the query and the final evaluation happen once per run, not per round
        row = per_round[int(values["server-round"])]
        if trace is not None:
            row["seconds"] += trace.seconds
            row["cpu"] += trace.cpu_seconds
        for direction in ("in", "out"):
            size, arrays = message_bytes(record[direction])
            row[direction] += size
            row[f"{direction}_arrays"] += arrays

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in per_round.values())

    report = json.loads((run_dir / "federation.json").read_text())
    return {
        "rounds": rounds,
        "transport": "HTTPS (TLS) with SuperNode authentication, one machine (127.0.0.1)",
        "phone_train_examples": read_manifest(manifests[PHONE]).num_examples("train"),
        "phone_idle_rss_mb": round(idle_rss / MB, 1),
        "phone_peak_rss_mb": round(sampler.peak_rss / MB, 1),
        "phone_processes_at_peak": sampler.processes_at_peak,
        "phone_clientapp_peak_rss_mb": round(max(clientapp_peaks) / MB, 1),
        "phone_round_seconds": round(mean("seconds"), 2),
        "phone_round_cpu_seconds": round(mean("cpu"), 2),
        "phone_payload_bytes_received_per_round": round(mean("in")),
        "phone_payload_bytes_sent_per_round": round(mean("out")),
        "phone_array_bytes_received_per_round": round(mean("in_arrays")),
        "phone_array_bytes_sent_per_round": round(mean("out_arrays")),
        "student_float32_state_dict_bytes": sum(v.numel() * 4 for v in Student().state_dict().values()),
        "server_train_step_seconds": round(statistics.fmean(p["seconds"] for p in report["participation"]), 2),
        "federation_seconds": round(outcome.seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="federation rounds (default: 3)")
    parser.add_argument("--keep", default=None, help="work folder to keep (logs, audit); default: a temp folder")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.keep:
        values = measure(Path(args.keep), args.rounds)
    else:
        with tempfile.TemporaryDirectory(prefix="edgemri-footprint-") as work:
            values = measure(Path(work), args.rounds)
    values["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    write_result("device_footprint", values)


if __name__ == "__main__":
    main()
