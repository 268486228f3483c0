"""The cost curve: the quickstart federation with 10, 100 and 1,000 clients (mostly phones), run as
`edgemri federate` runs it (``simulation/federate.federate``: Flower's simulation engine, one virtual
SuperNode per client, Ray actors sized by Flower's backend config ``client-resources-num-cpus``).

    python -m benchmarks.scale [--clients 10,100,1000] [--rounds 5] [--phone-sample 0.1] [--data-root DIR]
                               [--out DIR] [--no-results]
    python -m benchmarks.scale --quick   # 10 clients, 2 rounds, a quickstart-size set: OUT/scale.json only

Data: the synthetic ``kaggle`` preset (5,712 training scans from 6 sites; ``--quick``: ``quickstart``, 4 sites),
without its unlabeled transfer set (only distillation reads it). The federation is configs/quickstart.yaml
(fedavg-ft, DP-SGD on phones, availability 0.7, site pools) from a random student, with what a population
needs: one hospital a site (50-100 scans; hospitals all train every round) and the rest phones of 3-4 scans,
a seeded share of them sampled per round (``--phone-sample``: ``federation.tiers.phone.sample_per_round``);
``seen-sites`` with 90% of Training for the clients, so 1,000 phones fit; a round's timeout of an hour, so no
client is dropped for being slow; without the references (``federation.references``: each client's local-only
model, the pooled and site-oracle fine-tunes) unless ``--references``, as a population run would be. A size the
data cannot hold is skipped and says so.

Per size (keys ``size<N>.*``), from one run:
- wall time: the whole ``federate`` call, each round (``server/result.json``), and where the server's time
  went (``server/timings.json``: prepare, discovery, sampling, messages, the waits for the clients, screening,
  aggregation, evaluation, saving, reports), per round as the mean over rounds (``round_mean_*``);
- the clients' own compute: each ClientApp message's handler, from its timeline (``clients/timeline.py``,
  switched on by ``audit-dir``), summed per stage, with each step (manifest, message and state, the train
  round, the evaluation), and the training loop alone (the train replies' ``train-seconds``). Goal: every
  round's wall time at most 1.5x the sampled clients' own compute, the sum of their train handlers'
  seconds (Ray runs one client per core at once, so the sum may exceed the wall time);
- peak RSS, sampled every 0.5 s: the ServerApp's process (``flwr-simulation``: the ServerApp and the
  simulation engine's driver), the SuperLink, the runner (this process: partition, references) and the
  whole tree (every process whose FLWR_HOME lies under the run folder, Ray's workers included, plus the
  runner). Summed RSS counts the pages processes share (Python's and torch's libraries, Ray's object
  store) once per process; summed USS (each process's private pages) never counts them; summed PSS
  (each shared page split among the processes that map it) is the tree's memory (``peak_pss_tree_mb``),
  the one the 4 GB goal is checked on;
- bytes per round, computed, not measured: the model's arrays as Flower serializes them (``Array.data``)
  times the messages that carry them (sent: every train and evaluate message; received: every trained
  reply). Scalar configs and metrics and Flower's framing are left out: no public Flower API gives a
  message's serialized size.
Goals at 1,000 clients: the tree's peak PSS under 4 GB (4e9 bytes) and the whole ``federate`` call, 5 rounds,
under 15 minutes. The goals are reported as measured, never tuned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord

from benchmarks.common import Sampler, write_result
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.images import DataError
from edgemri.core.data.synth import generate
from edgemri.core.io import save_figure
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.models import Student
from edgemri.simulation.federate import federate
from edgemri.simulation.flower_run import processes_under

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
MB = 1024 * 1024
# 1,000 phones and 6 hospitals fit the clients' 90% of the kaggle preset's Training at 3-4 scans a phone: its
# smallest site (763 scans, 687 for clients) holds 166 phones of 3.5 and a hospital of 50; at 3-6 it does not.
PHONE_EXAMPLES = (3, 4)
HOSPITAL_EXAMPLES = (50, 100)  # bounded: a hospital's work stays the same at every size
CLIENT_FRACTION = 0.9
ROUND_TIMEOUT_S = 3600
SERVER_COMMAND = "flwr-simulation"  # the process that runs the ServerApp (and drives Ray) in simulation
SUPERLINK_COMMAND = "flower-superlink"
GOAL_ROUND_OVER_COMPUTE = 1.5
GOAL_SIZE = 1000
GOAL_TREE_RSS_BYTES = 4e9
GOAL_WALL_S = 15 * 60
GOAL_ROUNDS = 5


# -- memory: the run's process tree, sampled ----------------------------------------------------------------


@dataclass
class MemoryPeaks:
    tree: int = 0  # bytes, the run's processes and the runner summed
    tree_private: int = 0  # their USS summed
    tree_proportional: int = 0  # their PSS summed: what the tree occupies
    server: int = 0
    superlink: int = 0
    runner: int = 0
    processes_at_tree_peak: int = 0
    first_seen: float | None = None  # time.time() of the first and last sample that found a Flower process
    last_seen: float | None = None


class RunMemory(Sampler):
    """Every ``interval_s``, the RSS of the run's processes and of the runner (this process), and their peaks."""

    def __init__(self, run_dir: Path, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.run_dir = run_dir
        self.peaks = MemoryPeaks()
        self.runner = psutil.Process()

    def sample(self) -> int:
        """One sample; returns the tree's summed RSS in bytes."""
        peaks, total, private, proportional, alive = self.peaks, 0, 0, 0, 0
        for process in [*processes_under(self.run_dir), self.runner]:
            try:
                rss, command, full = process.memory_info().rss, " ".join(process.cmdline()), process.memory_full_info()
            except psutil.Error:  # exited (or a zombie) since it was listed
                continue
            if process is self.runner:
                peaks.runner = max(peaks.runner, rss)
            else:
                alive += 1
            total, private, proportional = total + rss, private + full.uss, proportional + full.pss
            if SERVER_COMMAND in command:
                peaks.server = max(peaks.server, rss)
            elif SUPERLINK_COMMAND in command:
                peaks.superlink = max(peaks.superlink, rss)
        if alive:
            now = time.time()
            peaks.first_seen, peaks.last_seen = peaks.first_seen or now, now
        peaks.tree_private = max(peaks.tree_private, private)
        peaks.tree_proportional = max(peaks.tree_proportional, proportional)
        if total > peaks.tree:
            peaks.tree, peaks.processes_at_tree_peak = total, alive + 1
        return total


# -- the clients' compute, from their timelines -------------------------------------------------------------


def stage_of(at: float, stages: dict[str, dict[str, float]]) -> str | None:
    """The server's stage ("setup", "round-K", "final") whose time span holds ``at``, if any."""
    return next((name for name, span in stages.items()
                 if span["started_at"] <= at <= span.get("ended_at", span["started_at"])), None)


def client_compute(timelines: list[dict[str, Any]], stages: dict[str, dict[str, float]]
                   ) -> dict[str, dict[str, float]]:
    """Per server stage: the ClientApp handlers' seconds and messages per message type, and each step's seconds.

    A handler runs from its timeline's first mark (Flower handed the app the message) to its last (the
    reply is built); a step from the previous mark to its own. Timelines no stage holds count as "unplaced"."""
    out: dict[str, dict[str, float]] = {}
    for timeline in timelines:
        marks, kind = timeline["marks"], timeline["message_type"]
        row = out.setdefault(stage_of(marks[0]["time"], stages) or "unplaced", defaultdict(float))
        row[f"{kind}_messages"] += 1
        row[f"{kind}_handler_s"] += marks[-1]["time"] - marks[0]["time"]
        for before, mark in zip(marks, marks[1:], strict=False):
            row[f"{kind}_step_{mark['step'].replace('-', '_')}_s"] += mark["time"] - before["time"]
    return {stage: dict(row) for stage, row in out.items()}


def app_loads(timelines: list[dict[str, Any]]) -> dict[str, float]:
    """Ray's actors (processes that ran a ClientApp), how often the app was imported, and the mean seconds from an
    import's start to its first handler (the import and Flower's loading of the app)."""
    first: dict[tuple[int, float], float] = {}
    for timeline in timelines:
        key = (timeline["pid"], timeline["app_import_started"])
        first[key] = min(first.get(key, float("inf")), timeline["marks"][0]["time"])
    loads = [at - imported for (_, imported), at in first.items()]
    return {"clientapp_processes": len({pid for pid, _ in first}), "clientapp_imports": len(first),
            "clientapp_import_to_first_handler_s_mean": statistics.fmean(loads) if loads else 0.0}


# -- bytes -------------------------------------------------------------------------------------------------


def model_sizes() -> dict[str, int]:
    """The student's parameters, and its state dict (every message's arrays) as float32 and as Flower sends it."""
    model = Student()
    state = model.state_dict()
    return {"model_parameters": sum(p.numel() for p in model.parameters()),
            "model_float32_bytes": sum(4 * v.numel() for v in state.values()),
            "model_array_bytes": sum(len(array.data) for array in ArrayRecord(state).values())}


def round_bytes(model_bytes: int, *, train_messages: int, evaluate_messages: int, trained_replies: int
                ) -> dict[str, int]:
    """Array bytes the server sends and receives in one round: the global model in every train and evaluate
    message, a model back in every trained reply (evaluate replies carry scalars only)."""
    return {"sent_bytes": model_bytes * (train_messages + evaluate_messages),
            "received_bytes": model_bytes * trained_replies}


# -- one size --------------------------------------------------------------------------------------------------


def size_overrides(root: Path, sites: int, clients: int, rounds: int, phone_sample: str, references: bool
                   ) -> list[str]:
    """The quickstart config at ``clients`` clients: one hospital a site, the rest phones, as evenly as fits."""
    phones = max(1, round((clients - sites) / sites))
    tiers = "federation.tiers"
    return [f"data.root={root}", f"data.client_fraction={CLIENT_FRACTION}", "federation.scenario=seen-sites",
            f"federation.rounds={rounds}", f"federation.round_timeout_s={ROUND_TIMEOUT_S}",
            f"federation.references={'true' if references else 'false'}",
            f"{tiers}.hospital.per_site=1", f"{tiers}.hospital.min_examples={HOSPITAL_EXAMPLES[0]}",
            f"{tiers}.hospital.max_examples={HOSPITAL_EXAMPLES[1]}", f"{tiers}.phone.per_site={phones}",
            f"{tiers}.phone.min_examples={PHONE_EXAMPLES[0]}", f"{tiers}.phone.max_examples={PHONE_EXAMPLES[1]}",
            f"{tiers}.phone.sample_per_round={phone_sample}"]


def _seconds(span: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in span.items() if key.endswith("_s")}


def _ratio(wall: float, compute: float) -> float:
    return wall / compute if compute else float("inf")  # no client compute: the goal cannot hold


def round_rows(result: dict[str, Any], stages: dict[str, dict[str, float]], compute: dict[str, dict[str, float]],
               model_bytes: int) -> list[dict[str, float]]:
    """Per round: its wall time, the server's phases, the clients' compute, the bytes and the goal's ratio."""
    rows = []
    for record in result["history"]:
        stage = f"round-{record['round']}"
        row = {**_seconds(stages.get(stage, {})), **compute.get(stage, {}), "round_s": record["seconds"],
               "sampled": len(record["sampled"]), "trained": len(record["trained"]),
               "training_s": sum(m.get("train-seconds", 0.0) for m in record["train_metrics"].values()),
               **round_bytes(model_bytes, train_messages=len(record["sampled"]),
                             evaluate_messages=int(compute.get(stage, {}).get("evaluate_messages", 0)),
                             trained_replies=len(record["trained"]))}
        train = row.get("train_handler_s", 0.0)
        row["round_over_sampled_compute"] = _ratio(record["seconds"], train)
        row["round_over_all_client_compute"] = _ratio(record["seconds"], train + row.get("evaluate_handler_s", 0.0))
        rows.append(row)
    return rows


def summarize(run_dir: Path, started: float, ended: float, peaks: MemoryPeaks, model_bytes: int
              ) -> dict[str, Any]:
    """One size's flat figures from its run folder, the memory peaks and the ``federate`` call's span."""
    result = json.loads((run_dir / "server" / "result.json").read_text())
    stages = json.loads((run_dir / "server" / "timings.json").read_text())
    timelines = [json.loads(p.read_text()) for p in sorted((run_dir / "audit" / "timings").glob("*.json"))]
    compute = client_compute(timelines, stages)
    rows = round_rows(result, stages, compute, model_bytes)
    kinds = [c["kind"] for c in result["clients"].values()]
    values: dict[str, Any] = {
        "clients": len(kinds), "hospitals": kinds.count("hospital"), "phones": kinds.count("phone"),
        "rounds": len(rows), "wall_s": ended - started, "rounds_s": sum(r["round_s"] for r in rows),
        "round_s_max": max(r["round_s"] for r in rows),
        "round_over_sampled_compute_max": max(r["round_over_sampled_compute"] for r in rows),
        "goal_round_within_1_5x_sampled_compute": all(r["round_over_sampled_compute"] <= GOAL_ROUND_OVER_COMPUTE
                                                      for r in rows),
        **{f"round_mean_{key}": statistics.fmean(r.get(key, 0.0) for r in rows)
           for key in sorted({k for r in rows for k in r})},
        "final_sent_bytes": 3 * model_bytes * len(kinds),  # the final, start and best global models to everyone
        "peak_rss_tree_mb": peaks.tree / MB, "peak_uss_tree_mb": peaks.tree_private / MB,
        "peak_pss_tree_mb": peaks.tree_proportional / MB,
        "peak_rss_server_mb": peaks.server / MB,
        "peak_rss_superlink_mb": peaks.superlink / MB, "peak_rss_runner_mb": peaks.runner / MB,
        "processes_at_tree_peak": peaks.processes_at_tree_peak, "client_messages_outside_stages": sum(
            v for k, v in compute.get("unplaced", {}).items() if k.endswith("_messages")),
        **app_loads(timelines),
    }
    for stage in ("setup", "final"):
        values.update({f"{stage}_{key}": value for key, value in
                       {**_seconds(stages.get(stage, {})), **compute.get(stage, {})}.items()})
    if peaks.first_seen is not None and peaks.last_seen is not None:
        # partition, privacy plans, pooled and oracle references; then the Flower processes' start
        values["runner_before_flower_s"] = peaks.first_seen - started
        values["flower_start_to_serverapp_s"] = stages["setup"]["started_at"] - peaks.first_seen
        values["runner_after_flower_s"] = ended - peaks.last_seen
    return values


def measure(config_path: Path, root: Path, sites: int, clients: int, rounds: int, phone_sample: str,
            start: Path, out: Path, timeout_s: float, references: bool = False) -> dict[str, Any]:
    """One federation of about ``clients`` clients, its process tree sampled while it runs."""
    config = load_config(config_path, size_overrides(root, sites, clients, rounds, phone_sample, references))
    run_dir = out / f"clients-{clients}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun measures afresh
    started = time.time()
    with RunMemory(run_dir) as memory:
        try:
            federate(config, data_root=root, out=run_dir, start_checkpoint=start, audit=True, timeout_s=timeout_s)
        finally:
            ended = time.time()
    return summarize(run_dir, started, ended, memory.peaks, model_sizes()["model_array_bytes"])


# -- the curve ---------------------------------------------------------------------------------------------------


def curve(values: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """The goals at 1,000 clients, and how the server's memory grows with clients that merely exist."""
    out: dict[str, Any] = {}
    ran = [n for n in sizes if f"size{n}.clients" in values]
    if GOAL_SIZE in ran:
        prefix = f"size{GOAL_SIZE}"
        out["goal_tree_rss_under_4gb_at_1000"] = values[f"{prefix}.peak_rss_tree_mb"] * MB < GOAL_TREE_RSS_BYTES
        out["goal_tree_pss_under_4gb_at_1000"] = values[f"{prefix}.peak_pss_tree_mb"] * MB < GOAL_TREE_RSS_BYTES
        out["goal_5_rounds_under_15_min_at_1000"] = (values[f"{prefix}.rounds"] == GOAL_ROUNDS
                                                     and values[f"{prefix}.wall_s"] < GOAL_WALL_S)
    if ran:
        out["goal_round_within_1_5x_sampled_compute_every_size"] = all(
            values[f"size{n}.goal_round_within_1_5x_sampled_compute"] for n in ran)
    if len(ran) >= 2:
        low, high = min(ran), max(ran)
        extra = values[f"size{high}.clients"] - values[f"size{low}.clients"]
        out["server_rss_mb_per_added_client"] = (values[f"size{high}.peak_rss_server_mb"]
                                                 - values[f"size{low}.peak_rss_server_mb"]) / extra
    return out


def prepare_inputs(out: Path, preset: str, data_root: str | None) -> tuple[Path, int, Path]:
    """The data (generated once into OUT, reused after), its number of sites, and a random start student."""
    root = Path(data_root) if data_root else out / f"data-{preset}"
    if not data_root and not (root / "synth.json").is_file():
        generate(root, preset=preset, seed=0, progress=False, overwrite=True, unlabeled_size=0)
    sites = len(set(load_dataset(root).train.sites))
    if not sites:
        raise DataError(f"{root} has no site metadata (metadata.csv): give a synthetic set")
    torch.manual_seed(0)
    start = save_checkpoint(out / "student.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                           role="random (benchmark)"))
    return root, sites, start


FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "scale.png"


def plot_curve(values: dict[str, Any], sizes: list[int], path: Path = FIGURE) -> Path | None:
    """The cost curve as the README shows it: a round's wall time beside its sampled clients' compute, and peak
    memory, against the number of clients (log scale); None when fewer than two sizes ran."""
    ran = [n for n in sizes if f"size{n}.clients" in values]
    if len(ran) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [values[f"size{n}.clients"] for n in ran]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [values[f"size{n}.{key}"] * scale for n in ran]

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    time_axis.plot(clients, series("round_mean_round_s"), "o-", label="a round, wall time")
    time_axis.plot(clients, series("round_mean_train_handler_s"), "s--", label="its sampled clients' compute")
    time_axis.set(xscale="log", xlabel="clients", ylabel="seconds (mean of the rounds)", title="Time")
    memory_axis.plot(clients, series("peak_rss_tree_mb", MB / 1e9), "o-", label="process tree, RSS")
    memory_axis.plot(clients, series("peak_uss_tree_mb", MB / 1e9), "s--", label="process tree, USS")
    if all(f"size{n}.peak_pss_tree_mb" in values for n in ran):
        memory_axis.plot(clients, series("peak_pss_tree_mb", MB / 1e9), "d-", label="process tree, PSS")
    memory_axis.plot(clients, series("peak_rss_server_mb", MB / 1e9), "^-", label="ServerApp process, RSS")
    memory_axis.axhline(GOAL_TREE_RSS_BYTES / 1e9, color="grey", linestyle=":", label="goal: 4 GB")
    memory_axis.set(xscale="log", xlabel="clients", ylabel="GB (peak)", title="Memory")
    for axis in (time_axis, memory_axis):
        axis.set_xticks(clients, [f"{c:,}" for c in clients])
        axis.minorticks_off()
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"edgemri federate on 2 CPU cores, synthetic data, {values.get('rounds_asked')} rounds",
                    fontsize=10)
    saved = save_figure(path, figure)
    plt.close(figure)
    return saved


def print_table(values: dict[str, Any], sizes: list[int]) -> None:
    columns = (("clients", "{:.0f}"), ("wall_s", "{:.0f}"), ("round_mean_round_s", "{:.1f}"),
               ("round_mean_train_handler_s", "{:.1f}"), ("round_over_sampled_compute_max", "{:.2f}"),
               ("peak_rss_tree_mb", "{:.0f}"), ("peak_rss_server_mb", "{:.0f}"), ("round_mean_sent_bytes", "{:.3g}"))
    print("size  " + "  ".join(name for name, _ in columns))
    for n in sizes:
        if f"size{n}.clients" in values:
            print(f"{n:<6d}" + "  ".join(form.format(values[f"size{n}.{name}"]).rjust(len(name))
                                         for name, form in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000", help="sizes, comma-separated (default: 10,100,1000)")
    parser.add_argument("--rounds", type=int, default=GOAL_ROUNDS, help=f"rounds (default: {GOAL_ROUNDS})")
    parser.add_argument("--phone-sample", default="0.1",
                        help="federation.tiers.phone.sample_per_round: a count or a fraction (default: 0.1)")
    parser.add_argument("--data-root", default=None, help="a synthetic set (default: generate the preset into OUT)")
    parser.add_argument("--out", default="runs/bench/scale", help="run folders, data, and OUT/scale.json")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600, help="per size (default: 4 hours)")
    parser.add_argument("--no-results", action="store_true", help="write OUT/scale.json only")
    parser.add_argument("--references", action="store_true",
                        help="also compute the references (federation.references; default off): each client's "
                             "local-only model, and the pooled and oracle fine-tunes on all the clients' data, "
                             "which no deployment has")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 10 clients, 2 rounds, the quickstart preset; OUT/scale.json only")
    args = parser.parse_args()
    sizes = [10] if args.quick else sorted({int(n) for n in args.clients.split(",")})
    if not all(2 <= n <= 100_000 for n in sizes) or not 1 <= args.rounds <= 100:
        parser.error("--clients takes sizes from 2 to 100000, --rounds 1 to 100")
    rounds, preset = (2, "quickstart") if args.quick else (args.rounds, "kaggle")
    out = Path(args.out).resolve()
    root, sites, start = prepare_inputs(out, preset, args.data_root)
    values: dict[str, Any] = {"quick": args.quick, "sizes": sizes, "rounds_asked": rounds,
                              "data_preset": "given" if args.data_root else preset, "data_root": str(root),
                              "sites": sites, "config": str(CONFIG), "phone_sample_per_round": args.phone_sample,
                              "phone_examples": list(PHONE_EXAMPLES), "hospital_examples": list(HOSPITAL_EXAMPLES),
                              "references": args.references,
                              "bytes_method": "computed", **model_sizes()}
    for n in sizes:
        print(f"== {n} clients", flush=True)
        try:
            measured = measure(CONFIG, root, sites, n, rounds, args.phone_sample, start, out, args.timeout_s,
                               args.references)
        except DataError as err:  # the data cannot hold this many clients
            values[f"size{n}.skipped"] = str(err).splitlines()[0]
            print(f"size {n} skipped: {values[f'size{n}.skipped']}")
            continue
        values.update({f"size{n}.{key}": value for key, value in measured.items()})
        values.update(curve(values, sizes))
        write_result("scale", values, out)  # after every size: a long run keeps what it measured
    print_table(values, sizes)
    if not (args.quick or args.no_results):
        write_result("scale", values)
        if figure := plot_curve(values, sizes):
            print(f"wrote {figure}")


if __name__ == "__main__":
    main()
