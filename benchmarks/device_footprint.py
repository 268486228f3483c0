"""What a phone pays to take part: memory, time and bytes per round on a real SuperNode.

A small real deployment on 127.0.0.1 (TLS, SuperNode authentication): one hospital and
one phone SuperNode, each with its own manifest and state folder. While the federation
runs, the phone's process tree (SuperNode, its SuperExec, and the ClientApp process it
starts for every message) is sampled with psutil. The message audit (clients/audit.py)
says which ClientApp process handled which message; the payload of each message is
measured with Flower's public API on an equal message (same arrays, shapes and dtype
float32; the same config and metric values): the arrays as Flower serializes them plus the
scalar values as JSON. Flower's framing, HTTP and TLS are not counted.

Where a phone round goes, per step (``phone_train_step_*_s``, ``phone_evaluate_step_*_s``): each
ClientApp process's start comes from the kernel (/proc), its exit from the sampler (within 50 ms),
and the steps in between from the timeline the ClientApp's outermost mod writes when auditing
(``clients/timeline.py``, ``timeline_mod``); the training inside a round from its reply's
``train-seconds``. What the ClientApp cannot time itself (Python start, Flower's imports) is
measured in fresh interpreters on the same machine (``fresh_*``), as is the import of the app
alone (``python -X importtime``) and the steps a round repeats from disk: manifest, cached
decoded data, DP plan.

Two modes, one after the other in one run (``--modes``): ``cold``, the phone's SuperNode with
Flower's own SuperExec (a fresh ``flwr-clientapp`` process per message), and ``warm``, the
same SuperNode with the warm launcher's ``flwr-clientapp`` shim first on its PATH (``edgemri
client serve``: one process that imports the stack once and forks a child per message; keys
``warm_*``). Summed
RSS counts pages a child shares with the launcher twice; ``*_device_mb`` counts them once (the RSS of
every process started with exec, plus what each forked child holds privately).

    python -m benchmarks.device_footprint [--rounds 3] [--modes cold warm] [--keep DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from flwr.app import ArrayRecord

from benchmarks.common import Sampler, write_result
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, read_manifest, write_manifests
from edgemri.core.data.synth import generate
from edgemri.core.io import write_text
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.deploy.launcher import LocalDeployment
from edgemri.models import Student
from edgemri.simulation.federate import APP_DIR

MB = 1024 * 1024
SITE = "site1"
PHONE, HOSPITAL = f"phone-{SITE}-0", f"hospital-{SITE}"
# A phone as docs/DEPLOY.md runs one: DP-SGD on, so a round pays for Opacus too.
PHONE_DP = {"enabled": True, "target_epsilon": 8.0, "budget_epsilon": 10.0}
# Heavy packages a round should not need (issue 15): plotting, torchvision, DP-SGD when DP is off.
UNNEEDED = ("matplotlib", "torchvision", "opacus", "torch._dynamo", "scipy")


def process_started(pid: int) -> float:
    """When ``pid`` started, on the ``time.time()`` clock, to the kernel's 10 ms tick.

    psutil's create_time adds the boot time in whole seconds, up to a second off the clock the
    ClientApp stamps its steps with; /proc gives the start in ticks since boot (CLOCK_BOOTTIME).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return psutil.Process(pid).create_time()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


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


def private_bytes(pid: int) -> int | None:
    """USS: the pages only this process maps. For a forked child, what it holds beyond the pages it still
    shares copy-on-write with its parent (written ones included: those were copied)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            return sum(int(line.split()[1]) * 1024 for line in rollup
                       if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return None


class TreeSampler(Sampler):
    """Samples processes and all their descendants: the summed RSS and each process's own trace.

    Summed RSS counts a page twice when two processes share it, as a child forked by the warm
    launcher (``forking_pid``) shares the launcher's: the device's memory (``peak_device``) counts
    such a child's private pages only (USS, from /proc, a few milliseconds a read). Separate
    programs share little (the Python library), so summed RSS is near their device memory.
    PSS would split shared pages with every other process on this machine that maps the same
    libraries (other torch processes), so it is not used.
    """

    def __init__(self, pids: list[int], interval_s: float = 0.05, forking_pid: int | None = None) -> None:
        super().__init__(interval_s)
        self.roots = [psutil.Process(pid) for pid in pids]
        self.forking_pid = forking_pid
        self.peak_rss = self.peak_device = 0
        self.processes_at_peak = 0
        self.traces: dict[int, ProcessTrace] = {}

    def sample(self) -> int:
        total = device = alive = 0
        tree = []
        for root in self.roots:
            try:
                tree += [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        for process in tree:
            try:
                with process.oneshot():
                    if process.status() == psutil.STATUS_ZOMBIE:
                        continue  # exited; its parent reaps it only when it starts the next one (SuperExec)
                    rss, cpu, parent = process.memory_info().rss, process.cpu_times(), process.ppid()
                    trace = self.traces.get(process.pid)
                    if trace is None:
                        trace = self.traces[process.pid] = ProcessTrace(" ".join(process.cmdline()),
                                                                        process_started(process.pid), time.time())
            except psutil.Error:
                continue
            total, alive = total + rss, alive + 1
            private = private_bytes(process.pid) if parent == self.forking_pid else None
            device += rss if private is None else private
            trace.last_seen = time.time()
            trace.peak_rss = max(trace.peak_rss, rss)
            trace.cpu_seconds = cpu.user + cpu.system
        if total > self.peak_rss:
            self.peak_rss, self.processes_at_peak = total, alive
        self.peak_device = max(self.peak_device, device)
        return total


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
        # the settings this benchmark was first measured with, pinned against later changes of the code defaults
        "rounds": rounds, "method": "ditto", "ditto_lambda": 0.1, "min_clients": 2, "round_timeout_s": 120,
        "tiers": {"hospital": {"min_examples": 8, "local_epochs": 1, "val_fraction": 0.1,
                               "personal": {"distill_weight": 0.5}},
                  "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12, "availability": 1.0,
                            "personal": {"epochs": 5}}}},
        "privacy": {"tiers": {"phone": PHONE_DP}}}
    manifests = write_manifests(partition(load_dataset(data).train, data, parse_config(config)), work / "manifests")
    by_client = {read_manifest(p).client: p for p in manifests}
    config_path = write_text(work / "config.yaml", yaml.safe_dump(config))
    torch.manual_seed(0)
    start = save_checkpoint(work / "student.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                            role="random"))
    return data, by_client, config_path, start


def clientapp_steps(audit: Path, node_id: int, traces: dict[int, ProcessTrace]) -> dict[str, dict[str, float]]:
    """Mean seconds of each step of the node's ClientApp processes, per message type (train, evaluate).

    Only round messages count (not the query or the final evaluation). A step's time is from the
    previous mark to its own: ``flower_start`` is everything Flower does from the process's start
    (or fork) to handing the message to the app, less the app's import: Python's start and Flower's
    imports (inherited from a warm launcher), the connection to the SuperNode, the task pull, the
    FAB install; ``app_import`` is from the import of the app's stack to the handoff, 0 in a child of
    the warm launcher (imported before it existed); ``reply_push_and_exit`` is pushing the reply and exiting.
    """
    audited = {int(p.stem.rsplit("-", 1)[1]): json.loads(p.read_text()) for p in audit.glob(f"node-{node_id}-*.json")}
    steps: dict[str, dict[str, list[float]]] = {}
    for path in (audit / "timings").glob(f"node-{node_id}-*.json"):
        timeline = json.loads(path.read_text())
        pid, kind = timeline["pid"], timeline["message_type"]
        record, trace = audited.get(pid), traces.get(pid)
        values = record["in"]["records"].get("config", {}).get("values", {}) if record else {}
        if kind not in ("train", "evaluate") or values.get("final", False) or trace is None:
            continue
        handoff = timeline["marks"][0]["time"]  # "app-called": Flower loaded the app and handed it the message
        inherited = timeline["app_import_started"] < trace.started
        app_import = 0.0 if inherited else handoff - timeline["app_import_started"]
        row = {"flower_start": handoff - trace.started - app_import, "app_import": app_import}
        previous = handoff
        for mark in timeline["marks"][1:]:
            row[mark["step"].replace("-", "_")] = mark["time"] - previous
            previous = mark["time"]
        row["reply_push_and_exit"] = trace.last_seen - previous
        row["total"] = trace.last_seen - trace.started
        row["peak_rss_after_app_import_mb"] = timeline["marks"][0]["peak_rss_mb"]
        row["peak_rss_mb"] = timeline["marks"][-1]["peak_rss_mb"]
        if kind == "train":
            metrics = record["out"]["records"].get("metrics", {}).get("values", {})
            row["training"] = metrics.get("train-seconds", 0.0) + metrics.get("personal-train-seconds", 0.0)
            row["train_round_other"] = row["train_round"] - row["training"]  # data, DP plan, model, Opacus, ledger
        for key, value in row.items():
            steps.setdefault(kind, {}).setdefault(key, []).append(value)
    return {kind: {key: statistics.fmean(v) for key, v in rows.items()} for kind, rows in steps.items()}


# Run in a fresh interpreter: what a ClientApp pays before its handler, and what a round repeats from disk.
PROBE = """
import json, resource, sys, time
args = json.loads(sys.argv[1])
marks = [("start", time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]
def mark(step):
    marks.append((step, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
import edgemri.clients.client_app
mark("app_import")
unneeded = [name for name in args["unneeded"] if name in sys.modules]
from edgemri.clients.runtime import Client, resolve_setup
from edgemri.core.federation import protocol as p
from edgemri.core.registries import load_config
instructions = p.RoundInstructions.for_tier(load_config(args["config"]), "phone", 1)
mark("setup")
client = Client(resolve_setup(args["node_config"], {}))
mark("manifest")
client.data()
mark("data_cached")
import opacus
mark("opacus_import")
client.dp_plan(instructions)
mark("dp_plan")
print(json.dumps({"marks": marks, "unneeded": unneeded, "exit_started": time.time()}))
"""


def fresh_interpreter(code: str, *args: str, flags: tuple[str, ...] = ()) -> tuple[float, str, str]:
    """(wall seconds, stdout, stderr) of ``python FLAGS -c CODE ARGS`` with this interpreter."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *flags, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          check=True)
    return time.perf_counter() - started, done.stdout, done.stderr


def import_profile(module: str, top: int = 10) -> dict[str, Any]:
    """``python -X importtime -c "import MODULE"``: its seconds, and the packages that cost most (cumulative ms)."""
    _, _, stderr = fresh_interpreter(f"import {module}", flags=("-X", "importtime"))
    cumulative: dict[str, int] = {}
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            _, total, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
            cumulative.setdefault(name, int(total))
    packages = {name: us for name, us in cumulative.items() if "." not in name or name in UNNEEDED}
    heaviest = sorted(packages.items(), key=lambda item: -item[1])[:top]
    return {"seconds": cumulative[module] / 1e6, "heaviest_ms": {name: round(us / 1e3) for name, us in heaviest}}


def fresh_measures(config_path: Path, node_config: dict[str, str]) -> dict[str, Any]:
    """The steps a ClientApp cannot time itself, each in a fresh interpreter (median of three where cheap)."""
    python_start = statistics.median(fresh_interpreter("pass")[0] for _ in range(3))
    flower = statistics.median(fresh_interpreter("from flwr.supernode.cli import flwr_clientapp")[0] for _ in range(3))
    profile = import_profile("edgemri.clients.client_app")
    _, stdout, _ = fresh_interpreter(PROBE, json.dumps({"config": str(config_path), "node_config": node_config,
                                                        "unneeded": list(UNNEEDED)}))
    exited = time.time()
    probe = json.loads(stdout)
    marks = probe["marks"]
    steps = {step: at - marks[i][1] for i, (step, at, _) in enumerate(marks[1:])}
    return {
        "fresh_python_start_s": round(python_start, 3),
        "fresh_flower_clientapp_import_s": round(flower - python_start, 3),  # what `flwr-clientapp` imports
        "fresh_app_import_s": round(profile["seconds"], 3),  # python -X importtime: edgemri.clients.client_app
        "fresh_app_import_wall_s": round(steps["app_import"], 3),
        "fresh_app_import_rss_mb": round(marks[1][2], 1),
        "fresh_app_import_heaviest_ms": profile["heaviest_ms"],
        "fresh_app_imports_unneeded": probe["unneeded"],
        "fresh_manifest_s": round(steps["manifest"], 4),
        "fresh_data_cached_s": round(steps["data_cached"], 4),
        "fresh_opacus_import_s": round(steps["opacus_import"], 3),
        "fresh_dp_plan_s": round(steps["dp_plan"], 4),
        "fresh_rss_after_dp_plan_mb": round(marks[-1][2], 1),
        # Python's own exit once the round's stack is loaded (module teardown), on top of the reply push.
        "fresh_interpreter_exit_s": round(exited - probe["exit_started"], 3),
    }


def step_values(steps: dict[str, dict[str, float]], fresh: dict[str, Any] | None) -> dict[str, Any]:
    """Flat ``phone_<message type>_step_<step>_s`` keys; a cold start split with the fresh-interpreter measures."""
    values: dict[str, Any] = {}
    for kind, row in sorted(steps.items()):
        for key, value in row.items():
            name = key if key.endswith("_mb") else f"{key}_s"
            values[f"phone_{kind}_step_{name}"] = round(value, 1 if key.endswith("_mb") else 3)
        if fresh is not None:  # derived: the start less Python's start and Flower's imports (fresh interpreters)
            values[f"phone_{kind}_step_connect_pull_fab_install_s_derived"] = round(
                row["flower_start"] - fresh["fresh_python_start_s"] - fresh["fresh_flower_clientapp_import_s"], 3)
        values[f"phone_{kind}_overhead_beyond_training_s"] = round(row["total"] - row.get("training", 0.0), 3)
    return values


def launcher_import_seconds(log: Path) -> float:
    """Seconds the warm launcher took to import its stack, from its log (it has, once its socket exists)."""
    found = re.search(r"imported .* in ([0-9.]+) s", log.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"the warm launcher's log has no import time; see {log}")
    return float(found.group(1))


def measure(work: Path, rounds: int, warm: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One federation with the phone on Flower's own SuperExec (cold) or on the warm launcher.

    Returns the phone's figures and what the fresh-interpreter measures need (its config and node config).
    """
    data, manifests, config_path, start = prepare(work, rounds)
    run_dir, audit = work / "run", work / "run" / "audit"
    launcher_start: dict[str, Any] = {}
    with LocalDeployment(work / "deployment") as deployment:
        for name in (HOSPITAL, PHONE):
            deployment.add_node(name, manifest=manifests[name], data_dir=data, state_dir=work / "devices" / name,
                                warm=warm and name == PHONE)
        deployment.wait_status([HOSPITAL, PHONE], "online")
        phone = deployment.nodes[PHONE]
        if phone.launcher is not None:
            launcher_start["phone_launcher_import_s"] = launcher_import_seconds(phone.launcher.log)
        sampler = TreeSampler([p.process.pid for p in phone.processes],
                              forking_pid=phone.launcher.process.pid if phone.launcher is not None else None)
        idle_rss = max(sampler.sample() for _ in range(10))  # SuperNode and SuperExec (or launcher), waiting
        with sampler:
            outcome = deployment.run(APP_DIR, {
                "config": str(config_path), "run-dir": str(run_dir), "data-root": "",
                "manifests": str(work / "manifests"), "state-root": "", "start-checkpoint": str(start),
                "num-clients": 2, "resume": False, "audit-dir": str(audit)}, work / "logs" / "run.log", 600)
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
    phone_node_config = {"manifest": str(manifests[PHONE]), "data-dir": str(data),
                         "state-dir": str(work / "devices" / PHONE)}
    return {
        "phone_train_examples": read_manifest(manifests[PHONE]).num_examples("train"),
        **launcher_start,
        "phone_idle_rss_mb": round(idle_rss / MB, 1),
        "phone_peak_rss_mb": round(sampler.peak_rss / MB, 1),
        "phone_peak_device_mb": round(sampler.peak_device / MB, 1),
        "phone_processes_at_peak": sampler.processes_at_peak,
        "phone_clientapp_peak_rss_mb": round(max(clientapp_peaks) / MB, 1),
        "phone_round_seconds": round(mean("seconds"), 2),
        "phone_round_cpu_seconds": round(mean("cpu"), 2),
        "phone_payload_bytes_received_per_round": round(mean("in")),
        "phone_payload_bytes_sent_per_round": round(mean("out")),
        "phone_array_bytes_received_per_round": round(mean("in_arrays")),
        "phone_array_bytes_sent_per_round": round(mean("out_arrays")),
        "server_train_step_seconds": round(statistics.fmean(p["seconds"] for p in report["participation"]), 2),
        "federation_seconds": round(outcome.seconds, 1),
        "steps": clientapp_steps(audit, phone_id, sampler.traces),
    }, {"config_path": config_path, "node_config": phone_node_config}


def measure_modes(work: Path, rounds: int, modes: list[str]) -> dict[str, Any]:
    """Each mode's federation in turn (cold: Flower's SuperExec; warm: the launcher, keys ``warm_*``)."""
    values: dict[str, Any] = {"rounds": rounds, "modes": modes, "phone_dp": PHONE_DP,
                              "transport": "HTTPS (TLS) with SuperNode authentication, one machine (127.0.0.1)",
                              "student_float32_state_dict_bytes": sum(v.numel() * 4 for v in
                                                                      Student().state_dict().values())}
    fresh = None
    for mode in modes:
        phone, inputs = measure(work / mode, rounds, warm=mode == "warm")
        if fresh is None:
            fresh = fresh_measures(inputs["config_path"], inputs["node_config"])
        prefix = "warm_" if mode == "warm" else ""
        phone.update(step_values(phone.pop("steps"), fresh if mode == "cold" else None))
        values["phone_train_examples"] = phone.pop("phone_train_examples")
        values.update({f"{prefix}{key}": value for key, value in phone.items()})
    return {**values, **(fresh or {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="federation rounds (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                        help="cold: Flower's SuperExec starts a ClientApp process per message; warm: the warm "
                             "launcher (edgemri client serve) forks one per message (default: both, in one run)")
    parser.add_argument("--keep", default=None, help="work folder to keep (logs, audit); default: a temp folder")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write the result file")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.keep:
        values = measure_modes(Path(args.keep), args.rounds, args.modes)
    else:
        with tempfile.TemporaryDirectory(prefix="edgemri-footprint-") as work:
            values = measure_modes(Path(work), args.rounds, args.modes)
    values["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    if args.no_write:
        print(json.dumps(values, indent=2))
    else:
        write_result("device_footprint", values)


if __name__ == "__main__":
    main()
