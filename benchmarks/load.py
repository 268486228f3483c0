"""Many real devices, faults included: a TLS SuperLink with SuperNode authentication and N real SuperNodes.

    python -m benchmarks.load [--nodes 30] [--rounds 5] [--warm-nodes 5] [--round-timeout-s S] [--budget-min M]
                              [--out DIR] [--no-results]

Everything runs on 127.0.0.1 through ``deploy/launcher.LocalDeployment``: the SuperLink (TLS, SuperNode
authentication, an SQLite database) and N SuperNodes, each registered with its own key and started in its own
FLWR_HOME on its own port, with its own manifest, state folder and privacy ledger. The data is the synthetic
``quickstart`` set (generated once into OUT, reused after; no pools, no unlabeled set), one hospital a site and
the rest phones (8-12 scans), the first N clients taken hospitals first, then phones site by site. Every device
trains with DP-SGD at a fixed noise multiplier and a budget no round reaches, so each keeps a ledger.
``--warm-nodes`` of them, spread evenly through that order, run the warm ClientApp launcher, the others Flower's
own ``flwr-clientapp`` (cold). On one machine every device's ClientApp holds its own torch (about 0.4 GB
unshared), and a warm launcher holds one for the whole run, so a few warm nodes keep 30 devices within 24 GB;
and the devices run at niceness 19, below the SuperLink and the ServerApp, which would have machines of their own.

The faults, over ``--rounds`` rounds (at least 3):
- round 2, mid-round: 10% of the SuperNodes (at least one, drawn with ``--seed``) are SIGKILLed, SuperNode and
  launcher, after a seeded 20-80% of round 1's duration; once the SuperLink lists them offline (Flower lets a
  node back in only then) they are restarted on the same key and state folder, warm or cold as before;
- the SuperLink restarts once, between rounds: as soon as the server has saved round max(2, R-2) (round 3 of
  5), it is stopped (SIGTERM; it exits once the running `flwr run --stream` lets go, about a minute) and
  started on the same database and port (``LocalDeployment.restart_link``). In Flower 1.42 that ends the
  running ServerApp (the restarted SuperLink refuses its task token), so the run is continued as an operator
  would, with a resumed `flwr run` (``resume=true``) once the restarted nodes are back. What the server had
  sent of the next round dies with it; a device that trained it keeps it in its ledger and sends the same
  update when the resumed run asks for that round again (``updates lost`` counts what still goes missing).
  A run that ends short for any other reason (a process out of memory, a ServerApp ended with its SuperExec) is
  resumed the same way, at most twice, and counted (``unplanned_resumes``).

Measured (one flat JSON, ``OUT/load.json``, and ``benchmarks/results/load.json`` unless ``--no-results``):
- rounds completed (aggregated), and per round who trained, failed or declined;
- updates lost: per device, rounds its verified ledger holds that the server's history does not count as
  trained, and rounds the server counted that its ledger lacks (``deploy/devices.compare_rounds``), for the
  restarted devices and for all;
- ledger integrity on every device: ``Ledger.open`` verifies it, no record above its budget, no ledger
  refused (rolled back or broken) in the server's result;
- SuperLink RSS, sampled every 0.5 s with psutil: per round its peak, the last round's over the first's, and
  the least-squares slope over rounds (MB a round); the ServerApp's peak RSS, and the whole deployment's
  summed RSS (pages shared between processes, a warm launcher's with its children, counted in each);
- latency: each round's duration (the server's), and each train reply's time: from the round's start to the
  reply built (``reply_after_round_start_s``: a round starts when the server saved the round before, as this
  runner sees ``progress.log`` every 0.2 s, or, a run's first round, when its discovery's last reply was
  built), and from the ClientApp's start to its reply (``clientapp_s``: a cold one from its import, a warm
  one from the launcher's hand-over), from the message audit and timelines (``clients/audit.py``,
  ``clients/timeline.py``); p50, p90 and max, per round and in all, warm and cold apart;
- the round failures by code over all rounds (``failed_no_reply``, ``failed_unavailable``: Flower answered for a
  device it could not reach, ...), and what Flower's own logs say failed (``flower_errors``);
- that everything started is stopped: no process with an FLWR_HOME under OUT, no port still bound.

A federation still going after ``--budget-min`` minutes is stopped (its `flwr run` with `flwr stop`), and the rounds
the server saved are measured (``stopped_at_budget``; ``run_finished`` false: no final evaluation).

Goals, booleans measured and never tuned: every round aggregated with every client that stayed up through it
(``goal_every_round_completes_with_the_clients_up``); no update lost on a restarted device either way and its
ledger verified; every ledger verified, within budget and never refused; the SuperLink's per-round RSS peak at
most 1.2x its first round's (``goal_superlink_rss_flat``); nothing left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml

from benchmarks.common import Sampler, write_result
from edgemri.arguments import BoundedInt
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, write_manifests
from edgemri.core.data.synth import generate
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.io import write_text
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.deploy.devices import (
    RESULT_FILE,
    compare_rounds,
    ledger_refusals,
    read_ledger,
    read_result,
    read_unfinished_result,
)
from edgemri.deploy.errors import DeployError
from edgemri.deploy.launcher import LocalDeployment
from edgemri.models import Student
from edgemri.simulation.federate import APP_DIR
from edgemri.simulation.flower_run import RunOutcome

MB = 1024 * 1024
KILL_SHARE = 0.1
KILL_ROUND = 2
KILL_AFTER_ROUND_1 = (0.2, 0.8)  # the kill comes this share of round 1's duration into round 2
MAX_UNPLANNED_RESUMES = 2  # a run that ends short for a reason of its own is resumed (counted), as an operator would
GOAL_RSS_GROWTH = 1.2  # "flat": no round's SuperLink RSS peak above this times the first round's
SAMPLE_S = 0.5
POLL_S = 0.2
MIN_RUN_S = 60.0  # a `flwr run` started near the time budget's end still gets this long
STATUS_POLL_S = 5.0  # `flwr supernode ls` starts a Python process: asked only this often
SERVERAPP_COMMAND = "flwr-serverapp"
# The devices (SuperNodes, launchers, their ClientApps) run at the lowest priority. 30 of them at niceness 0 on 2
# cores starved the SuperLink: its SQLite database stayed locked past its timeout ("database is locked" on 21
# replies and heartbeats) and the run stalled in round 1, its ServerApp gone. A real SuperLink has its own machine.
DEVICE_NICENESS = 19


def say(started: float, line: str) -> None:
    print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)


# -- inputs ------------------------------------------------------------------------------------------------------


def federation_config(rounds: int, phones_per_site: int, round_timeout_s: int) -> dict[str, Any]:
    """Every device with DP at a fixed sigma and a budget no round reaches (it always trains, its ledger records
    it); hospitals capped at 40 scans so that a round's work stays small at every size."""
    dp = {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 1000.0}
    return {"seed": 0, "federation": {
        "rounds": rounds, "method": "fedavg", "min_clients": 2, "round_timeout_s": round_timeout_s,
        "tiers": {"hospital": {"min_examples": 8, "max_examples": 40, "local_epochs": 1},
                  "phone": {"per_site": phones_per_site, "min_examples": 8, "max_examples": 12, "availability": 1.0}}},
        "privacy": {"tiers": {"phone": dict(dp), "hospital": dict(dp)}}}  # copies: YAML aliases are refused


@dataclass
class Inputs:
    data: Path
    manifests: dict[str, Path]  # the N clients that get a SuperNode, in node order
    manifest_dir: Path
    config: Path
    start: Path


def prepare(out: Path, nodes: int, rounds: int, round_timeout_s: int) -> Inputs:
    """The quickstart set (made once), the manifests, the N clients, the config and a random start student."""
    data = out / "data-quickstart"
    if not (data / "synth.json").is_file():
        generate(data, preset="quickstart", seed=0, progress=False, overwrite=True, pools=False, unlabeled_size=0)
    split = load_dataset(data).train
    sites = len(set(split.sites))
    config = federation_config(rounds, max(1, math.ceil((nodes - sites) / sites)), round_timeout_s)
    shutil.rmtree(out / "manifests", ignore_errors=True)
    manifests = partition(split, data, parse_config(config))
    paths = dict(zip([m.client for m in manifests], write_manifests(manifests, out / "manifests"), strict=True))
    # hospitals first, then phones site by site: phone-A-0, phone-B-0, ..., phone-A-1, ...
    order = sorted(paths, key=lambda c: (c.startswith("phone"), int(c.rsplit("-", 1)[1]) if c.startswith("phone")
                                         else 0, c))
    torch.manual_seed(0)
    start = save_checkpoint(out / "student.pt", Checkpoint(model="student", state_dict=Student().state_dict(),
                                                           role="random (benchmark)"))
    return Inputs(data, {c: paths[c] for c in order[:nodes]}, out / "manifests",
                  write_text(out / "config.yaml", yaml.safe_dump(config)), start)


# -- memory ------------------------------------------------------------------------------------------------------


class LinkMemory(Sampler):
    """Every SAMPLE_S: the RSS of the SuperLink (whichever process it is now), the ServerApp and the deployment."""

    def __init__(self, deployment: LocalDeployment) -> None:
        super().__init__(SAMPLE_S)
        self.deployment = deployment
        self.samples: list[tuple[float, int, int, int]] = []  # (time, superlink, serverapp, whole deployment) bytes

    def sample(self) -> None:
        link = self.deployment.link
        link_pid = link.process.pid if link is not None else None
        superlink = serverapp = total = 0
        for process in self.deployment.processes():
            try:
                rss = process.memory_info().rss
                command = " ".join(process.cmdline())
            except psutil.Error:  # exited since it was listed
                continue
            total += rss
            superlink += rss if process.pid == link_pid else 0
            serverapp += rss if SERVERAPP_COMMAND in command else 0
        self.samples.append((time.time(), superlink, serverapp, total))

    def peak(self, column: int, start: float = 0.0, end: float = math.inf) -> float:
        """The largest sample of ``column`` (1 SuperLink, 2 ServerApp, 3 deployment) in [start, end], in MB."""
        values = [s[column] for s in self.samples if start <= s[0] <= end and s[column]]
        return max(values) / MB if values else 0.0


# -- the faults, as the rounds go -------------------------------------------------------------------------------


@dataclass
class Timeline:
    """What happened when (``time.time()``), as this runner saw it."""

    run_started: list[float] = field(default_factory=list)  # each `flwr run` (the first, the resumed one)
    round_ended: dict[int, float] = field(default_factory=dict)  # the server saved the round (progress.log)
    round_seconds: dict[int, float] = field(default_factory=dict)  # the round's duration, as the server logged it
    killed_at: float | None = None
    restarted_at: float | None = None  # the killed nodes started again
    back_at: float | None = None  # ... and listed online
    link_restarted: tuple[float, float] | None = None  # stop begun, started again and healthy


class Faults:
    """The load test's schedule, one step every POLL_S: kill, restart the killed, restart the SuperLink, resume."""

    def __init__(self, deployment: LocalDeployment, inputs: Inputs, run_dir: Path, rounds: int, victims: list[str],
                 kill_share: float, started: float, warm: set[str]) -> None:
        self.deployment, self.inputs, self.run_dir, self.rounds = deployment, inputs, run_dir, rounds
        self.victims, self.kill_share, self.started, self.warm = victims, kill_share, started, warm
        self.link_restart_after = max(KILL_ROUND, rounds - 2)  # the kill in the first run, a round or more after
        self.seen = Timeline()
        self.outcomes: list[RunOutcome] = []
        self.planned_resumed = False  # the run the SuperLink's restart ended was resumed
        self.unplanned_resumes = 0  # runs that ended short for another reason (e.g. a process out of memory)
        self.link_survivors: list[str] = []  # the old SuperLink's processes that outlived it (restart_link)
        self.serverapp_survived = False  # a ServerApp running before the SuperLink's restart still ran after it
        self.stopped_at_budget = False  # the benchmark's time budget ended the federation before its last round
        self._polls = ThreadPoolExecutor(1)  # `flwr supernode ls`, in the background
        self._poll: Future | None = None
        self._polled = 0.0

    def node_files(self, name: str) -> dict[str, Any]:
        return {"manifest": self.inputs.manifests[name], "data_dir": self.inputs.data,
                "state_dir": self.run_dir.parent / "devices" / name, "warm": name in self.warm}

    def run_config(self, resume: bool) -> dict[str, Any]:
        # data-root empty: the server holds no data, as in a real deployment; audit-dir: the replies' timelines
        return {"config": str(self.inputs.config), "run-dir": str(self.run_dir), "data-root": "",
                "manifests": str(self.inputs.manifest_dir), "start-checkpoint": str(self.inputs.start),
                "num-clients": len(self.inputs.manifests), "resume": resume, "audit-dir": str(self.run_dir / "audit")}

    def start_run(self, pool: ThreadPoolExecutor, timeout_s: float, deadline: float) -> Future:
        """A `flwr run` (resumed after the first), stopped at ``timeout_s`` or at ``deadline`` (monotonic)."""
        resume = bool(self.seen.run_started)
        self.seen.run_started.append(time.time())
        log = self.run_dir.parent / "logs" / f"run-{len(self.seen.run_started)}.log"
        say(self.started, "flwr run" + (" (resumed)" if resume else ""))
        timeout_s = max(MIN_RUN_S, min(timeout_s, deadline - time.monotonic()))
        return pool.submit(self.deployment.run, APP_DIR, self.run_config(resume), log, timeout_s)

    def saved_rounds(self) -> None:
        progress = self.run_dir / "server" / "progress.log"
        lines = progress.read_text().split("\n")[:-1] if progress.is_file() else []  # whole lines only
        for line in lines:  # "round 3/5: 29/30 trained, ..., 41 s" (server/app.py)
            number = int(line.split()[1].split("/")[0])
            if number not in self.seen.round_ended:
                self.seen.round_ended[number] = time.time()
                self.seen.round_seconds[number] = float(line.rsplit(",", 1)[1].split()[0])
                say(self.started, line)

    def kill_due(self) -> bool:
        """Round KILL_ROUND has gone on for ``kill_share`` of the round before's duration."""
        seen, before = self.seen, KILL_ROUND - 1
        return (seen.killed_at is None and before in seen.round_ended and KILL_ROUND not in seen.round_ended
                and time.time() >= seen.round_ended[before] + self.kill_share * seen.round_seconds[before])

    def step(self) -> None:
        """One look at the federation and whatever fault is due; the SuperLink's restart first, so that it comes
        right after the round is saved."""
        seen = self.seen
        self.saved_rounds()
        if seen.link_restarted is None and self.link_restart_after in seen.round_ended:
            stopping = time.time()
            say(self.started, f"restarting the SuperLink after round {self.link_restart_after}")
            serverapps = self.serverapps()
            self.link_survivors = self.deployment.restart_link()  # waits out its grace period
            alive = self.serverapps()
            self.serverapp_survived = any(p in alive for p in serverapps)
            seen.link_restarted = (stopping, time.time())
            say(self.started, f"SuperLink restarted after {seen.link_restarted[1] - stopping:.0f} s "
                              f"(its old processes still running: {len(self.link_survivors)})")
        if self.kill_due():
            for name in self.victims:
                self.deployment.stop_node(name, signal.SIGKILL)  # as if the device died
            seen.killed_at = time.time()
            say(self.started, f"SIGKILLed {', '.join(self.victims)} in round {KILL_ROUND}")
        listed = self.listed() if seen.killed_at is not None and seen.back_at is None else None
        if listed is None:
            return
        statuses = {listed.get(self.deployment.node_ids[n]) for n in self.victims}
        if seen.restarted_at is None and statuses == {"offline"}:  # Flower lets a node back in only then
            self.deployment.start_nodes({name: self.node_files(name) for name in self.victims})
            seen.restarted_at = time.time()
            say(self.started, f"restarted {', '.join(self.victims)} (listed offline)")
        elif seen.restarted_at is not None and statuses == {"online"}:
            seen.back_at = time.time()
            say(self.started, f"{', '.join(self.victims)} online again")

    def serverapps(self) -> set[psutil.Process]:
        """The deployment's running ServerApp processes (children of its SuperExec, not of the SuperLink)."""
        running = set()
        for process in self.deployment.processes():
            with contextlib.suppress(psutil.Error):
                if SERVERAPP_COMMAND in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                    running.add(process)
        return running

    def listed(self) -> dict[int, str] | None:
        """Node id -> status from the last `flwr supernode ls` that finished since the last look, else None. It runs
        in the background, every STATUS_POLL_S at most (a Python process each time), so no step waits for it."""
        listed = None
        if self._poll is not None and self._poll.done():
            try:
                listed = self._poll.result()
            except (DeployError, subprocess.TimeoutExpired):  # the SuperLink was restarting
                listed = None
            self._poll = None
        if self._poll is None and time.monotonic() - self._polled >= STATUS_POLL_S:
            self._polled = time.monotonic()
            self._poll = self._polls.submit(self.deployment.node_status)
        return listed

    def drive(self, pool: ThreadPoolExecutor, timeout_s: float, budget_s: float) -> None:
        """Run the federation to its last round through the faults: the first `flwr run`, and once the SuperLink's
        restart has ended it, a resumed one as soon as the killed nodes are back (its discovery must find them).
        After ``budget_s`` the running `flwr run` is stopped and no other starts (``stopped_at_budget``)."""
        deadline = time.monotonic() + budget_s
        try:
            run: Future | None = self.start_run(pool, timeout_s, deadline)
            while True:
                self.step()
                if run is not None and run.done():
                    self.outcomes.append(run.result())
                    run = None
                    say(self.started, f"flwr run ended: {self.outcomes[-1].status} {self.outcomes[-1].error}")
                    self.saved_rounds()
                    if len(self.seen.round_ended) >= self.rounds:
                        return
                    if time.monotonic() >= deadline:
                        break
                    if self.seen.link_restarted is not None and not self.planned_resumed:
                        self.planned_resumed = True
                    elif self.unplanned_resumes < MAX_UNPLANNED_RESUMES:
                        self.unplanned_resumes += 1
                        say(self.started, "the run ended before its last round: resumed, as an operator would")
                    else:
                        return
                if run is None and time.monotonic() >= deadline:  # e.g. waiting for the killed nodes to return
                    break
                if run is None and (self.seen.killed_at is None or self.seen.back_at is not None):
                    run = self.start_run(pool, timeout_s, deadline)
                time.sleep(POLL_S)
            self.stopped_at_budget = True
            say(self.started, f"the time budget ({budget_s / 60:.0f} min) is spent: the federation is stopped")
        finally:
            self._polls.shutdown(cancel_futures=True)


# -- what the run left ---------------------------------------------------------------------------------------------


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {}
    return {f"{prefix}_p50": float(np.percentile(values, 50)), f"{prefix}_p90": float(np.percentile(values, 90)),
            f"{prefix}_max": float(max(values))}


def _records(folder: Path) -> dict[tuple[int, int], list[tuple[int, dict[str, Any]]]]:
    """The JSON files named node-ID-TIME_NS-PID.json in ``folder``, by (node id, pid): (time_ns, content)."""
    found: dict[tuple[int, int], list[tuple[int, dict[str, Any]]]] = {}
    for path in folder.glob("node-*.json"):
        _, node, written, pid = path.stem.split("-")
        found.setdefault((int(node), int(pid)), []).append((int(written), json.loads(path.read_text())))
    return found


def replies(audit: Path, names: dict[int, str], warm: set[str]) -> list[dict[str, Any]]:
    """Every message a ClientApp answered, with its round (train and evaluate), its time, and its timeline's times."""
    timelines = _records(audit / "timings")
    rows = []
    for (node, pid), records in _records(audit).items():
        for written, record in records:
            message = record["in"]
            if "message_type" not in message:
                continue
            config = message["records"].get("config", {}).get("values", {})
            row = {"client": names.get(node, str(node)), "type": message["message_type"],
                   "round": config.get("server-round"), "final": bool(config.get("final", False)),
                   "written": written / 1e9}
            near = min(timelines.get((node, pid), []), key=lambda t: abs(t[0] - written), default=None)
            if near is not None:
                marks, begun = near[1]["marks"], near[1]["app_import_started"]
                row["replied"] = marks[-1]["time"]
                row["clientapp_s"] = marks[-1]["time"] - (marks[0]["time"] if row["client"] in warm else begun)
            rows.append(row)
    return rows


def round_spans(seen: Timeline, rows: list[dict[str, Any]], rounds: list[int]) -> dict[int, tuple[float, float]]:
    """Each round's [start, end]: it starts when the round before was saved in the same run, else when its run's
    discovery got its last reply; it ends when it was saved."""
    spans = {}
    for r in rounds:
        end = seen.round_ended.get(r, math.inf)
        before = seen.round_ended.get(r - 1)
        run_start = max((t for t in seen.run_started if t < end), default=0.0)
        if before is not None and before >= run_start:
            spans[r] = (before, end)
            continue
        queries = [q["written"] for q in rows if q["type"] == "query" and run_start <= q["written"] <= end]
        spans[r] = (max(queries, default=run_start), end)
    return spans


def _down(seen: Timeline, start: float, end: float) -> bool:
    """Were the killed nodes down at any time in [start, end]?"""
    if seen.killed_at is None:
        return False
    return seen.killed_at <= end and (seen.back_at or math.inf) >= start


def latency(rows: list[dict[str, Any]], spans: dict[int, tuple[float, float]], warm: set[str]) -> dict[str, Any]:
    """Round durations aside, each train reply's times: per round and in all, warm and cold apart."""
    values: dict[str, Any] = {}
    # A train reply outside its round's span was for a run the SuperLink's restart ended, or came after its round
    train = [r for r in rows if r["type"] == "train" and "replied" in r and r["round"] in spans
             and spans[r["round"]][0] <= r["replied"] <= spans[r["round"]][1]]
    values["train_replies_outside_their_round"] = sum(r["type"] == "train" for r in rows) - len(train)
    for r, (start, _) in spans.items():
        values.update(percentiles([t["replied"] - start for t in train if t["round"] == r],
                                  f"round{r}_reply_after_round_start_s"))
    for name, chosen in (("", train), ("_warm", [t for t in train if t["client"] in warm]),
                         ("_cold", [t for t in train if t["client"] not in warm])):
        values.update(percentiles([t["replied"] - spans[t["round"]][0] for t in chosen],
                                  f"reply_after_round_start_s{name}"))
        values.update(percentiles([t["clientapp_s"] for t in chosen], f"clientapp_s{name}"))
    return values


def memory_values(memory: LinkMemory, spans: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """Per round the SuperLink's RSS peak; its growth over the rounds; the ServerApp's and the deployment's peak."""
    peaks = {r: memory.peak(1, start, end) for r, (start, end) in spans.items()}
    values: dict[str, Any] = {f"round{r}_superlink_rss_peak_mb": peak for r, peak in peaks.items()}
    measured = {r: peak for r, peak in peaks.items() if peak}
    if measured:
        first, last = measured[min(measured)], measured[max(measured)]
        values.update({"superlink_rss_first_round_mb": first, "superlink_rss_last_round_mb": last,
                       "superlink_rss_last_over_first": last / first,
                       "superlink_rss_max_over_first": max(measured.values()) / first,
                       "goal_superlink_rss_flat": max(measured.values()) <= GOAL_RSS_GROWTH * first})
    if len(measured) >= 2:
        values["superlink_rss_slope_mb_per_round"] = float(np.polyfit(list(measured), list(measured.values()), 1)[0])
    values.update({"superlink_rss_peak_mb": memory.peak(1), "serverapp_rss_peak_mb": memory.peak(2),
                   "deployment_rss_peak_mb": memory.peak(3), "memory_samples": len(memory.samples)})
    return values


def device_values(faults: Faults, run_dir: Path) -> tuple[dict[str, Any], dict[int, tuple[float, float]]]:
    """Rounds completed, who stayed up and trained, updates lost, and every device's ledger; for a federation
    stopped short (``run_finished`` false), the rounds the server saved."""
    finished = (run_dir / RESULT_FILE).is_file()
    result = read_result(run_dir) if finished else read_unfinished_result(run_dir)
    names = list(faults.inputs.manifests)
    ledgers = {name: read_ledger(name, faults.node_files(name)["state_dir"]) for name in names}
    compared = compare_rounds(ledgers, result.history)
    rows = replies(run_dir / "audit", {i: n for n, i in faults.deployment.node_ids.items()},
                   faults.warm)
    spans = round_spans(faults.seen, rows, [h.round for h in result.history])
    values: dict[str, Any] = {"run_finished": finished, "rounds_completed": sum(h.aggregated for h in result.history),
                              "rounds_recorded": len(result.history)}
    missing = {}  # round -> clients that stayed up through it and did not train
    for h in result.history:
        up = set(names) - (set(faults.victims) if _down(faults.seen, *spans[h.round]) else set())
        missing[h.round] = sorted(up - set(h.trained))
        values.update({f"round{h.round}_s": h.seconds, f"round{h.round}_trained": len(h.trained),
                       f"round{h.round}_failed": sorted(h.failed), f"round{h.round}_declined": h.declined,
                       f"round{h.round}_up_not_trained": missing[h.round]})
    values.update(percentiles([h.seconds for h in result.history], "round_s"))
    codes = Counter(code for h in result.history for code in h.failed.values())
    values.update({f"failed_{code.replace('-', '_')}": codes.get(code.value, 0) for code in p.FailureCode})
    lost = {name: c for name, c in compared.items() if c.lost}
    values.update({
        "updates_lost": sum(c.lost for c in compared.values()),
        "updates_lost_restarted_devices": sum(compared[n].lost for n in faults.victims if n in compared),
        "updates_lost_detail": [f"{n}: ledger not counted {list(c.not_counted)}, counted not in ledger "
                                f"{list(c.not_recorded)}" for n, c in sorted(lost.items())],
        "ledgers_verified": sum(not d.error for d in ledgers.values()),
        "ledger_errors": [f"{n}: {d.error}" for n, d in sorted(ledgers.items()) if d.error],
        "clients_over_budget": sorted(n for n, d in ledgers.items() if d.over_budget),
        "ledger_refusals": ledger_refusals(result),
        "epsilon_max": max((d.epsilon for d in ledgers.values()), default=0.0),
        "goal_every_round_completes_with_the_clients_up": (
            len(result.history) == faults.rounds and all(h.aggregated for h in result.history)
            and not any(missing.values())),
        "goal_nothing_lost_on_restarted_devices": all(
            ledgers[n].ok and not (compared[n].lost if n in compared else 0) for n in faults.victims),
        "goal_every_ledger_verifies_within_budget_never_refused": (
            all(d.ok for d in ledgers.values()) and not ledger_refusals(result)),
    })
    values.update(latency(rows, spans, faults.warm))
    return values, spans


# -- the load test -------------------------------------------------------------------------------------------------


def spread(names: list[str], count: int) -> set[str]:
    """``count`` of ``names`` (at most all), evenly spaced from the first: hospitals and phones both get some."""
    count = min(count, len(names))
    return {names[i * len(names) // count] for i in range(count)}


LOCKED = "[UnexpectedError:OperationalError] (sqlite3.OperationalError) database is locked"  # one line a request


def flower_errors(logs: Path) -> dict[str, Any]:
    """What Flower's own logs say went wrong (each file is appended to across restarts): the SuperLink's HTTP 500
    responses, the requests it failed with ``database is locked``, and the replies a SuperNode dropped ("Failed
    to send message": its push got a 500, which it does not retry)."""
    link = (logs / "superlink.log").read_text(errors="replace") if (logs / "superlink.log").is_file() else ""
    dropped = {path.stem.removeprefix("supernode-"): path.read_text(errors="replace").count("Failed to send message")
               for path in sorted(logs.glob("supernode-*.log"))}
    return {"superlink_http_500_responses": len(re.findall(r'HTTP/1\.1" 500', link)),
            "superlink_requests_failed_database_locked": link.count(LOCKED),
            "supernode_replies_dropped": sum(dropped.values()),
            "supernodes_that_dropped_a_reply": sorted(name for name, count in dropped.items() if count)}


def measure(out: Path, nodes: int, rounds: int, seed: int, round_timeout_s: int, warm_nodes: int,
            budget_s: float) -> dict[str, Any]:
    """One load test in OUT: the deployment, the faults, then what the devices and the server hold."""
    started = time.monotonic()
    say(started, f"preparing {nodes} clients in {out}")
    inputs = prepare(out, nodes, rounds, round_timeout_s)
    if len(inputs.manifests) < nodes:
        raise DeployError(f"the partition made {len(inputs.manifests)} clients, fewer than {nodes} nodes")
    work = out / "deployment-run"
    shutil.rmtree(work, ignore_errors=True)  # a rerun measures afresh
    rng = np.random.default_rng(seed)
    names = list(inputs.manifests)
    victims = sorted(str(n) for n in rng.choice(names, size=max(1, round(KILL_SHARE * nodes)), replace=False))
    values: dict[str, Any] = {"nodes": nodes, "rounds_asked": rounds, "seed": seed, "data_preset": "quickstart",
                              "round_timeout_s": round_timeout_s, "killed": victims, "kill_round": KILL_ROUND,
                              "device_niceness": DEVICE_NICENESS, "budget_s": budget_s}
    wall = time.monotonic()
    with ThreadPoolExecutor(1) as pool, LocalDeployment(work / "deployment", DEVICE_NICENESS) as deployment:
        warm = spread(names, warm_nodes)
        faults = Faults(deployment, inputs, work / "run", rounds, victims, float(rng.uniform(*KILL_AFTER_ROUND_1)),
                        started, warm)
        with LinkMemory(deployment) as memory:
            say(started, f"registering and starting {nodes} SuperNodes ({len(warm)} warm, {nodes - len(warm)} cold)")
            begun = time.monotonic()
            deployment.add_nodes({name: faults.node_files(name) for name in names})
            deployment.wait_status(names, "online", timeout_s=300)
            values["nodes_start_s"] = time.monotonic() - begun
            say(started, f"{nodes} SuperNodes online after {values['nodes_start_s']:.0f} s")
            faults.drive(pool, timeout_s=(rounds + 2) * round_timeout_s + 300, budget_s=budget_s)
    say(started, "deployment stopped")
    values["wall_s"] = time.monotonic() - wall
    seen = faults.seen
    values.update({
        "warm_nodes": len(warm), "cold_nodes": nodes - len(warm), "clients_partitioned": len(list(
            inputs.manifest_dir.glob("client-*.json"))),
        "hospitals": sum(n.startswith("hospital") for n in names), "phones": sum(n.startswith("phone") for n in names),
        "kill_after_round_start_s": faults.kill_share * seen.round_seconds.get(KILL_ROUND - 1, math.nan),
        "killed_down_s": (seen.back_at or math.nan) - (seen.killed_at or math.nan),
        "link_restart_after_round": faults.link_restart_after,
        "link_restart_s": seen.link_restarted[1] - seen.link_restarted[0] if seen.link_restarted else math.nan,
        "link_restart_survivors": faults.link_survivors,
        "serverapp_survived_link_restart": faults.serverapp_survived,
        "flwr_runs": len(faults.outcomes), "flwr_run_statuses": [o.status for o in faults.outcomes],
        "flwr_run_details": [(o.error or o.details)[-300:] for o in faults.outcomes],
        "unplanned_resumes": faults.unplanned_resumes, "stopped_at_budget": faults.stopped_at_budget,
        "superexec_restarts": deployment.superexec_restarts,
    })
    values.update(flower_errors(work / "deployment" / "logs"))
    devices, spans = device_values(faults, work / "run")
    values.update(devices)
    values.update(memory_values(memory, spans))
    values["left_running"] = deployment.leftovers()
    values["goal_nothing_left_running"] = not values["left_running"]
    say(started, "goals: " + ", ".join(f"{k[5:]}={v}" for k, v in values.items() if k.startswith("goal_")))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=BoundedInt(2, 200), default=30, help="SuperNodes (default: 30)")
    parser.add_argument("--rounds", type=BoundedInt(3, 50), default=5, help="rounds (default: 5)")
    parser.add_argument("--seed", type=BoundedInt(0, 2**31 - 1), default=0, help="who is killed, and when")
    parser.add_argument("--warm-nodes", type=BoundedInt(0, 200), default=5,
                        help="nodes with the warm ClientApp launcher, the rest cold (default: 5)")
    parser.add_argument("--round-timeout-s", type=BoundedInt(30, 7200), default=900,
                        help="federation.round_timeout_s (default: 900: 30 devices on 2 cores took up to 10 minutes "
                             "a round, and no node that stays up should be dropped)")
    parser.add_argument("--budget-min", type=BoundedInt(5, 24 * 60), default=100,
                        help="after this many minutes the federation is stopped and what it did is measured "
                             "(default: 100)")
    parser.add_argument("--out", default="runs/bench/load", help="data, deployment, and OUT/load.json")
    parser.add_argument("--no-results", action="store_true", help="write OUT/load.json only")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops everything it started, as Ctrl-C does
    try:
        values = measure(out, args.nodes, args.rounds, args.seed, args.round_timeout_s, args.warm_nodes,
                         60.0 * args.budget_min)
    except KeyboardInterrupt:
        print("benchmarks.load: stopped; every process it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except EdgemriError as err:  # e.g. a run that ended failed before writing its result: the logs say why
        print(f"benchmarks.load: error: {err} (logs: {out / 'deployment-run' / 'logs'})", file=sys.stderr)
        raise SystemExit(2) from None
    write_result("load", values, out)
    if not args.no_results:
        write_result("load", values)


if __name__ == "__main__":
    main()
