"""The Flower federation in simulation: real flwr processes, real files, tiny data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from edgemri.clients.runtime import Client, ClientState, resolve_setup
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, read_manifest, write_manifests
from edgemri.core.federation.personalize import create_method
from edgemri.core.federation.protocol import FailureCode, RoundInstructions
from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemri.models import Student
from edgemri.simulation.federate import federate
from tests.conftest import add_sites, make_kaggle_folder

pytestmark = pytest.mark.slow

STUDENT_SHAPES = {k: list(v.shape) for k, v in Student().state_dict().items()}


def _config(phone: dict | None = None, **federation: object):
    """Two sites: one hospital and (unless ``phone`` says otherwise) one phone each."""
    base = {"seed": 0, "data": {"client_fraction": 0.0}, "federation": {
        "rounds": 2, "method": "ditto", "min_clients": 1, "round_timeout_s": 120,
        "tiers": {"hospital": {"min_examples": 20, "local_epochs": 1},
                  "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12, "availability": 1.0,
                            **(phone or {})}}}}
    base["federation"].update(federation)
    return parse_config(base)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("start") / "student.pt"
    save_checkpoint(path, Checkpoint(model="student", state_dict=Student().state_dict(), role="kd", seed=0))
    return path


def _flower_processes_of(run_dir: Path) -> list[str]:
    """Processes started for this run: Flower's, Ray's and the command's own (others on the machine are not
    this test's). Each has the run folder in its command line or its FLWR_HOME (Ray's workers inherit it)."""
    names = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            home = (p.info["environ"] or {}).get("FLWR_HOME", "")
        except psutil.Error:
            continue
        if str(run_dir) in cmd or home.startswith(str(run_dir)):
            names.append(cmd[:120])
    return names


def _broken_phone_setup(sited_data: Path, tmp_path_factory: pytest.TempPathFactory, **federation: object):
    """Data, run folder and config of a 2-round Ditto run with DP phones, where one phone's data is broken."""
    root = tmp_path_factory.mktemp("fed") / "data"
    shutil.copytree(sited_data, root)
    out = tmp_path_factory.mktemp("fedrun") / "run"
    config = _config(**federation).replace(privacy=parse_config(
        {"privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}).privacy)
    manifests = partition(load_dataset(root).train, root, config)
    write_manifests(manifests, out / "manifests")
    broken = next(m for m in manifests if m.kind == "phone")
    (root / broken.files[0].path).unlink()  # the phone's scans went missing after partitioning
    return root, out, config, broken.client


@pytest.fixture(scope="module")
def broken_phone_run(sited_data: Path, start_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The run in Flower's simulation engine, with the message audit on."""
    root, out, config, broken = _broken_phone_setup(sited_data, tmp_path_factory, compare_methods=["fedavg-cal"])
    run = federate(config, data_root=root, out=out, start_checkpoint=start_checkpoint, audit=True)
    return run, broken


def test_compared_methods_and_the_references_are_reported_per_client(broken_phone_run) -> None:
    run, broken = broken_phone_run
    result = json.loads((run.out / "server" / "result.json").read_text())
    saved = json.loads((run.out / "references.json").read_text())
    healthy = set(result["final"])
    assert broken not in healthy and healthy <= set(saved["clients"])
    for client in healthy:  # scored from the same global model, on the same images
        assert 0.0 <= result["final"][client]["personal-accuracy@fedavg-cal"] <= 1.0
        assert 0.0 <= saved["clients"][client]["oracle-accuracy"] <= 1.0
    rows = {r["client"]: r for r in json.loads((run.out / "federation.json").read_text())["clients"]}
    assert all(rows[c]["oracle"] == pytest.approx(saved["clients"][c]["oracle-accuracy"]) for c in healthy)


def test_run_completes_with_a_failing_client_reported_and_skipped(broken_phone_run) -> None:
    run, broken = broken_phone_run
    report = json.loads((run.out / "federation.json").read_text())
    assert report["method"] == "ditto" and report["rounds"] == [1, 2]
    rows = {r["client"]: r for r in report["clients"]}
    assert set(rows) == {"hospital-site-a", "hospital-site-b", "phone-site-a-0", "phone-site-b-0"}
    assert rows[broken]["failed"]
    for p in report["participation"]:
        assert p["failed"][broken] == FailureCode.DATA.value  # a code: the reason's text stays on the device
        assert set(p["trained"]) == set(rows) - {broken}
        assert p["aggregated"]
    healthy = [r for r in report["clients"] if not r["failed"]]
    for row in healthy:
        for column in ("start", "global", "best-global", "personalized", "local-only", "pooled", "oracle"):
            assert 0.0 <= row[column] <= 1.0
    assert report["best_round"] in (1, 2)  # the hospitals' validation splits chose a round
    best = load_checkpoint(run.out / "server" / "global-best.pt")
    assert best.step == report["best_round"] and "federated validation" in best.role
    assert "worst" in report["summary"]["all"]["personalized"]
    assert 0.0 <= report["central"]["final"]["accuracy"] <= 1.0
    assert (run.out / "federation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| phone" in (run.out / "federation.md").read_text()
    assert not _flower_processes_of(run.out)


def test_each_client_keeps_its_state_and_personalized_checkpoint(broken_phone_run) -> None:
    run, broken = broken_phone_run
    for folder in (run.out / "clients").iterdir():
        if folder.name == broken:
            assert not (folder / "personalized.pt").exists()
            continue
        state = load_checkpoint(folder / "client-state.pt", kind="client")
        assert state.extra["counters"] == {"rounds_trained": 2, "last_round": 2}
        personalized = load_checkpoint(folder / "personalized.pt")
        assert personalized.role == "personalized"
        assert personalized.config["federation"]["method"] == "ditto"
        assert torch.equal(personalized.state_dict["classifier.1.weight"], state.state_dict["classifier.1.weight"])
    for k in (1, 2):
        assert load_checkpoint(run.out / "server" / f"global-round-{k:03d}.pt").model == "student"


def _strings(values: dict) -> list[str]:
    return [v for v in values.values() if isinstance(v, str)]


def test_messages_carry_only_student_arrays_and_scalar_metrics(broken_phone_run) -> None:
    run, _ = broken_phone_run
    records = [json.loads(p.read_text()) for p in (run.out / "audit").glob("*.json")]
    kinds = {r["in"]["message_type"] for r in records}
    assert {"query", "train", "evaluate"} <= kinds
    replies = [r["out"] for r in records if "error" not in r["out"]]
    assert len(replies) >= 10
    for message in [r["in"] for r in records] + replies:
        for record in message["records"].values():
            if record["type"] == "arrays":
                assert record["arrays"] == {k: STUDENT_SHAPES[k] for k in record["arrays"]}
                for shape in record["arrays"].values():
                    assert shape[-2:] != [128, 128] and len(shape) != 3
            else:
                for value in record["values"].values():
                    assert isinstance(value, (int, float, bool, str)), value
                for text in _strings(record["values"]):
                    assert "/" not in text and ".jpg" not in text and ".pt" not in text, text
    for reply in replies:
        if "metrics" in reply["records"]:
            assert "num-examples" in reply["records"]["metrics"]["values"]


def test_fedper_shares_the_body_and_keeps_a_personal_head_in_simulation(sited_data: Path, start_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    # The other methods' personal models are checked in the runs above and below (ditto, fedavg, fedavg-ft).
    config = _config(method="fedper", rounds=1, phone={"per_site": 0})
    run = federate(config, data_root=sited_data, out=tmp_path / "run", start_checkpoint=start_checkpoint)
    assert run.report["method"] == "fedper"
    global_state = load_checkpoint(tmp_path / "run" / "server" / "global-round-001.pt").state_dict
    start = load_checkpoint(start_checkpoint).state_dict
    personal = load_checkpoint(tmp_path / "run" / "clients" / "hospital-site-a" / "personalized.pt").state_dict
    head = "classifier.1.weight"  # the shared body moved; the global head stays the start's head
    assert not torch.equal(global_state["conv_block_1.0.weight"], start["conv_block_1.0.weight"])
    assert torch.equal(global_state[head], start[head])
    assert not torch.equal(personal[head], global_state[head])


def _progress(run_dir: Path) -> str:
    path = run_dir / "server" / "progress.log"
    return path.read_text() if path.is_file() else ""


def _ledgers(run_dir: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(run_dir.glob(f"clients/*/{LEDGER_FILE}"))}


def test_a_stopped_run_leaves_nothing_running_and_resumes_from_its_last_round(
        sited_data: Path, start_checkpoint: Path, tmp_path: Path) -> None:
    """The issue's findings: a SIGTERM mid-round left the SuperLink, the simulation and Ray running (the orphan
    finished its rounds and spent DP budget), and the resume then reported the interrupted run's failure. Here a
    SIGTERM stops round 2 and a SIGKILL (the command's own death: nothing of ours runs to clean up) stops round
    3 of the resume; each time nothing of the run may go on, no ledger may move, and the next resume completes.
    The result need not equal an uninterrupted run's: a DP client that trained in a stopped round has spent that
    budget (its ledger says so); it sends that update again if it saved it, else declines as already trained. A
    round played after the command's death (every client refuses it) is not saved, so the resume plays it."""
    config = _config(rounds=3).replace(privacy=parse_config({"privacy": {"tiers": {"phone": {
        "enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}).privacy)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "run"

    def federate_cli(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "edgemri", "federate", "--config", str(config_file), "--data-root",
             str(sited_data), "--start", str(start_checkpoint), "--out", str(out), "--quiet", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal

    def stop_after_round(process: subprocess.Popen, server_round: int, sig: signal.Signals) -> str:
        deadline = time.monotonic() + 600
        while f"round {server_round}" not in _progress(out):  # that round saved: the signal lands in the next
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(sig)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        # The chain winds down by itself (SuperLink, simulation, Ray's raylet, then its agents, which poll it):
        # under a full suite's load, with the ClientApp actors at niceness 0, that took over 30 s once.
        while _flower_processes_of(out) and time.monotonic() < signalled + 90:
            time.sleep(0.5)
        assert not _flower_processes_of(out), "processes of the run outlived its command"
        spent = _ledgers(out)
        time.sleep(3)
        assert _ledgers(out) == spent, "a ledger moved after the command was stopped"
        assert not (out / "server" / "result.json").exists()
        return stderr

    first = federate_cli()
    stderr = stop_after_round(first, 1, signal.SIGTERM)
    assert first.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("edgemri: terminated")
    again = federate_cli()
    assert again.wait(timeout=120) == 2 and "add --resume to continue it" in again.communicate()[1]
    killed = federate_cli("--resume")
    stop_after_round(killed, 2, signal.SIGKILL)
    resumed = federate_cli("--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr  # not an interrupted run's status, which the log also holds
    report = json.loads((out / "federation.json").read_text())
    assert report["rounds"] == [1, 2, 3]
    state = load_checkpoint(out / "clients" / "hospital-site-a" / "client-state.pt", kind="client")
    assert state.extra["counters"]["rounds_trained"] >= 3
    assert not _flower_processes_of(out)


def test_a_hundred_client_federation_samples_its_phones_and_personalizes_every_client(
        start_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Population scale in miniature: 2 hospitals and 98 phones, 10 phones sampled a round; each round asks only its
    cohort to evaluate, every client is scored at the end and keeps a personal model, the report summarises; the
    references (local-only, pooled, oracle) are switched off, as a population run does."""
    root = add_sites(make_kaggle_folder(tmp_path_factory.mktemp("population") / "data",
                                        {"Training": 85, "Testing": 2}), ("site-a", "site-b"))
    config = _config(phone={"per_site": 49, "min_examples": 3, "max_examples": 3, "sample_per_round": 10},
                     method="fedavg-ft", round_timeout_s=600, references=False)
    out = tmp_path_factory.mktemp("population-run") / "run"
    run = federate(config, data_root=root, out=out, start_checkpoint=start_checkpoint, progress=False)
    clients = run.report["clients"]
    assert len(clients) == 100 and sum(c["kind"] == "phone" for c in clients) == 98
    assert not run.report["final_failed"]
    history = load_checkpoint(out / "server" / "state.pt", kind="server").history
    for record in history:
        phones = [name for name in record["sampled"] if name.startswith("phone")]
        assert len(phones) == 10 and len(record["sampled"]) == 12  # hospitals (no sample) all train
        assert set(record["eval_metrics"]) <= set(record["sampled"])  # the cohort evaluates, not all 100
    assert len({frozenset(r["sampled"]) for r in history}) == len(history)
    assert all((out / "clients" / c["client"] / "personalized.pt").is_file() for c in clients)
    assert all(c["personalized"] is not None for c in clients)
    assert not (out / "references.json").exists() and all(  # switched off: no device trains a local-only model
        c[column] is None or math.isnan(c[column]) for c in clients for column in ("pooled", "local-only"))
    final_global = load_checkpoint(out / "server" / "state.pt", kind="server").state_dict
    # fedavg-ft: a phone's personal model is the global one fine-tuned on the device (a fixed budget; a hospital's
    # selection on validation may keep the global model itself).
    head, phone = "classifier.1.weight", next(c["client"] for c in clients if c["kind"] == "phone")
    assert not torch.equal(load_checkpoint(out / "clients" / phone / "personalized.pt").state_dict[head],
                           final_global[head])
    # The report summarises the phones by tier: no row per phone, only each tier's worst 10 (on the local test
    # splits and on the site pools).
    text = run.paths["md"].read_text()
    named = set(re.findall(r"\bphone-site-[ab]-\d+\b", text))
    assert "| phone | personalized - start | 98 of 98 |" in text and 10 <= len(named) <= 20


def test_client_state_survives_a_restart(sited_data: Path, tmp_path: Path) -> None:
    config = _config()
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, config), tmp_path / "m")
    hospital = next(p for p in manifests if read_manifest(p).kind == "hospital")
    node_config = {"manifest": str(hospital), "data-dir": str(sited_data), "state-dir": str(tmp_path / "state")}
    method = create_method(config.federation)
    start = Student().state_dict()
    before = Client(resolve_setup(node_config, {}))
    reply = before.train_round(method, start, ClientState(), RoundInstructions.for_tier(config, "hospital", 1))
    state = reply.state
    after = Client(resolve_setup(node_config, {}))  # a new process: nothing in memory
    restored = after.load_state()
    assert restored.rounds_trained == 1 and restored.last_round == 1
    assert all(torch.equal(restored.personal[k], state.personal[k]) for k in state.personal)
    with pytest.raises(Exception, match="lacks state-dir"):
        resolve_setup({"manifest": str(hospital), "data-dir": str(sited_data)}, {})


def test_dp_phone_spends_within_budget_and_the_privacy_report_says_so(broken_phone_run) -> None:
    run, broken = broken_phone_run
    report = json.loads((run.out / "privacy.json").read_text())
    phones = {k: v for k, v in report["sample_level"].items() if v["kind"] == "phone" and k != broken}
    assert phones
    for name, entry in phones.items():
        assert entry["dp"] and entry["rounds_trained"] == [1, 2]
        epsilons = [r["epsilon"] for r in entry["epsilon_per_round"]]
        assert 0 < epsilons[0] < epsilons[1] <= entry["budget_epsilon"] == 8.0  # cumulative, never reset
        ledger = Ledger.open(run.out / "clients" / name / LEDGER_FILE, name)
        assert sorted(ledger.rounds) == [1, 2]
        assert ledger.epsilon(entry["delta"], report["accountant"]) == pytest.approx(entry["epsilon"])
    hospitals = [v for v in report["sample_level"].values() if v["kind"] == "hospital"]
    assert all(not h["dp"] for h in hospitals)
    text = (run.out / "privacy.md").read_text()
    assert "one scan of this client" in text and "Not protected" in text
    assert (run.out / "privacy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_federation_with_client_level_dp_reports_epsilon_and_stops_at_max_epsilon(
        sited_data: Path, start_checkpoint: Path, tmp_path: Path) -> None:
    # sigma 1, delta 1e-3: epsilon 3.54 after one round, 5.42 after two, 7.00 after three > 6.
    config = _config(rounds=3, method="fedavg", phone={"per_site": 0}).replace(privacy=parse_config(
        {"privacy": {"central": {"enabled": True, "side": "client", "noise_multiplier": 1.0, "clipping_norm": 0.5,
                                 "delta": 1e-3, "max_epsilon": 6.0}}}).privacy)
    run = federate(config, data_root=sited_data, out=tmp_path / "run", start_checkpoint=start_checkpoint)
    result = json.loads((run.out / "server" / "result.json").read_text())
    central = result["central_dp"]
    trained = [h for h in result["history"] if h["aggregated"]]
    assert [h["round"] for h in trained] == [1, 2] and all(len(h["trained"]) == 2 for h in trained)
    assert all(not h["failed"] for h in trained)  # both clients clipped with Flower's mod; the server agreed
    epsilons = [r["epsilon"] for r in central["epsilon_per_round"] if r["clients"]]
    assert epsilons == [h["central_epsilon"] for h in trained]
    assert 0 < epsilons[0] < epsilons[1] <= 6.0 == central["max_epsilon"]
    assert central["stopped_at_round"] == 2 and "round 3" in central["stop_reason"]
    assert central["side"] == "client" and central["accountant"]["sampling"] == "no-amplification"
    assert central["epsilon_per_round"][0]["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    privacy = json.loads((run.out / "privacy.json").read_text())
    assert privacy["client_level"] == central
    text = (run.out / "privacy.md").read_text()
    assert "one whole client" in text and f"({epsilons[1]:.2f}, 1.0e-03)-DP" in text
    assert "stopped after round 2" in text
    final_global = load_checkpoint(run.out / "server" / "state.pt", kind="server").state_dict
    personal = load_checkpoint(run.out / "clients" / "hospital-site-a" / "personalized.pt").state_dict
    assert all(torch.equal(personal[k], final_global[k]) for k in personal)  # fedavg: the global model itself
