"""benchmarks/scale.py's helpers (issue 25 §2) and the server's PhaseClock, on hand-built inputs: the run's process
tree and its RSS, the clients' compute placed in the server's stages, the bytes of a round, one size's config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.scale import (
    CONFIG,
    RunMemory,
    app_loads,
    client_compute,
    model_sizes,
    round_bytes,
    size_overrides,
    stage_of,
)
from edgemri.core.registries import load_config
from edgemri.server.strategy import PhaseClock
from edgemri.simulation.flower_run import processes_under

SLEEPER = "import sys, time; print('up', flush=True); time.sleep(60)"


def _sleeper(home: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "FLWR_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-c", SLEEPER, *argv], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "up\n"  # started, its RSS is there
    return process


def test_the_sampler_sums_the_runs_processes_and_the_runner_and_names_the_server(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = _sleeper(run_dir / "flwr_home", "flwr-simulation")
    other = _sleeper(tmp_path / "run-other" / "flwr_home")  # a neighbour whose name starts the same: not this run's
    try:
        assert {p.pid for p in processes_under(run_dir)} == {server.pid}
        memory = RunMemory(run_dir)
        total = memory.sample()
        peaks = memory.peaks
        assert peaks.processes_at_tree_peak == 2  # the server and the runner (this process)
        assert total == peaks.tree == pytest.approx(peaks.server + peaks.runner, rel=0.2)
        assert peaks.server > 0 and peaks.superlink == 0 and peaks.first_seen is not None
        assert 0 < peaks.tree_private < peaks.tree  # shared pages (the Python library) are not private
    finally:
        for process in (server, other):
            process.kill()
            process.wait()
    assert memory.sample() < total == memory.peaks.tree  # the run is gone: the runner alone now; the peak stays


STAGES = {"setup": {"started_at": 100.0, "ended_at": 110.0, "discovery_s": 4.0},
          "round-1": {"started_at": 110.0, "ended_at": 130.0, "train_wait_s": 12.0},
          "final": {"started_at": 130.0, "ended_at": 150.0}}


def _timeline(kind: str, pid: int, imported: float, *marks: tuple[str, float]) -> dict:
    return {"message_type": kind, "pid": pid, "app_import_started": imported,
            "marks": [{"step": step, "time": at, "peak_rss_mb": 1.0} for step, at in marks]}


TIMELINES = [
    _timeline("query", 7, 98.0, ("app-called", 101.0), ("manifest", 101.5), ("reply-and-audit", 102.0)),
    _timeline("train", 7, 98.0, ("app-called", 111.0), ("manifest", 111.25), ("train-round", 114.0),
              ("reply-and-audit", 114.5)),
    _timeline("train", 8, 99.0, ("app-called", 112.0), ("manifest", 112.5), ("train-round", 115.0),
              ("reply-and-audit", 115.0)),
    _timeline("evaluate", 8, 99.0, ("app-called", 120.0), ("evaluate", 121.0), ("reply-and-audit", 121.5)),
    _timeline("evaluate", 9, 200.0, ("app-called", 201.0), ("reply-and-audit", 202.0)),  # after the run's stages
]


def test_each_handler_lands_in_the_stage_that_holds_its_start_with_its_steps() -> None:
    assert stage_of(110.0, STAGES) == "setup" and stage_of(111.0, STAGES) == "round-1"
    assert stage_of(99.0, STAGES) is None
    compute = client_compute(TIMELINES, STAGES)
    assert compute["setup"] == {"query_messages": 1, "query_handler_s": 1.0, "query_step_manifest_s": 0.5,
                                "query_step_reply_and_audit_s": 0.5}
    round_one = compute["round-1"]
    assert round_one["train_messages"] == 2 and round_one["train_handler_s"] == pytest.approx(3.5 + 3.0)
    assert round_one["train_step_manifest_s"] == pytest.approx(0.75)
    assert round_one["train_step_train_round_s"] == pytest.approx(2.75 + 2.5)
    assert round_one["evaluate_handler_s"] == pytest.approx(1.5)
    assert compute["unplaced"] == {"evaluate_messages": 1, "evaluate_handler_s": 1.0,
                                   "evaluate_step_reply_and_audit_s": 1.0}


def test_actors_and_app_imports_are_counted_from_the_timelines() -> None:
    loads = app_loads(TIMELINES)
    assert loads["clientapp_processes"] == 3 and loads["clientapp_imports"] == 3
    assert loads["clientapp_import_to_first_handler_s_mean"] == pytest.approx((3.0 + 13.0 + 1.0) / 3)


def test_a_rounds_bytes_are_the_model_times_the_messages_that_carry_it() -> None:
    sizes = model_sizes()
    assert sizes["model_float32_bytes"] >= 4 * sizes["model_parameters"]  # buffers travel too
    assert sizes["model_array_bytes"] >= sizes["model_float32_bytes"]  # Flower adds a header per array
    assert round_bytes(1000, train_messages=7, evaluate_messages=100, trained_replies=5) == {
        "sent_bytes": 107_000, "received_bytes": 5_000}


def test_a_size_is_one_hospital_a_site_and_the_rest_phones_sampled_per_round(tmp_path: Path) -> None:
    config = load_config(CONFIG, size_overrides(tmp_path, 6, 1000, 5, "0.1", False))
    phone, hospital = config.federation.tier("phone"), config.federation.tier("hospital")
    assert 6 * (phone.per_site + hospital.per_site) == 1002
    assert phone.sample_size(996) == 100 and hospital.sample_size(6) is None
    assert config.federation.scenario == "seen-sites" and config.federation.rounds == 5
    assert not config.federation.references  # the central fine-tunes are not the federation's cost
    small = load_config(CONFIG, size_overrides(tmp_path, 4, 10, 2, "50", True))
    assert small.federation.tier("phone").per_site == 2 and small.federation.references


def test_the_phase_clock_books_the_servers_work_and_the_waits_between(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [10.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = PhaseClock()
    with clock.phase("discovery"):
        now[0] += 2.0
    clock.begin("round-1")
    with clock.phase("sampling"):
        now[0] += 0.5
    now[0] += 7.0  # the clients train
    with clock.phase("screening", waited="train_wait"):
        now[0] += 1.0
    with clock.phase("screening", waited="train_wait"):  # a phase met twice adds up
        now[0] += 1.0
    assert clock.stages["setup"]["discovery_s"] == 2.0
    round_one = clock.stages["round-1"]
    assert (round_one["sampling_s"], round_one["train_wait_s"], round_one["screening_s"]) == (0.5, 7.0, 2.0)
    assert round_one["started_at"] <= round_one["ended_at"]
