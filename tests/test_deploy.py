"""A real deployment on 127.0.0.1: TLS, SuperNode authentication, a node killed and restarted, the SuperLink
restarted.

One SuperLink (TLS, SuperNode authentication, a database file) and six registered SuperNodes
(two hospitals, four phones), each with its own manifest, state folder, privacy ledger (every
device trains with DP-SGD), FLWR_HOME and port, plus one SuperNode whose key was never
registered. One hospital runs its ClientApps as Flower starts them (a fresh ``flwr-clientapp``
per message), the other five nodes through the warm launcher (``edgemri client serve`` and its
``flwr-clientapp`` shim), which keeps the suite's time down. Run 1 (2 rounds) loses one phone
(SuperNode and launcher) to SIGKILL after round 1, mid-run. Then the SuperLink restarts on its
database, the phone is restarted, warm again, on the same state folder, and run 2 resumes the
federation through the restarted SuperLink for a third round. ``benchmarks/load.py`` is the same
at 30 nodes and 5 rounds.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from benchmarks.load import flower_errors
from edgemri.clients.runtime import STATE_FILE, Client, resolve_setup
from edgemri.core.config import DPTierConfig
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import partition, read_manifest, write_manifests
from edgemri.core.federation.protocol import FederationResult, RoundRecord
from edgemri.core.io import write_text
from edgemri.core.privacy.dp import PrivacyError, plan_dp
from edgemri.core.privacy.ledger import Ledger
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemri.deploy import certs as certs_module
from edgemri.deploy.certs import MAX_DAYS, make_certs
from edgemri.deploy.devices import (
    compare_rounds,
    ledger_refusals,
    read_ledger,
    read_result,
    read_unfinished_result,
)
from edgemri.deploy.errors import DeployError
from edgemri.deploy.launcher import LocalDeployment
from edgemri.deploy.nodes import make_node_keys
from edgemri.main import main
from edgemri.models import Student
from edgemri.simulation.federate import APP_DIR
from edgemri.simulation.flower_run import VENV_BIN

slow = pytest.mark.slow  # the real deployment below; the certificate and key tests at the end are fast

HOSPITALS = ("hospital-site-a", "hospital-site-b")
PHONE = "phone-site-a-0"  # killed mid-run and restarted
PHONES = (PHONE, "phone-site-a-1", "phone-site-b-0", "phone-site-b-1")
NODES = (*HOSPITALS, *PHONES)  # the six registered SuperNodes
COLD = "hospital-site-a"  # Flower's own flwr-clientapp per message
WARM = tuple(name for name in NODES if name != COLD)  # the warm launcher
INTRUDER = "phone-site-b-2"  # has a manifest, but its key is never registered (phone-site-a-2's is not used)
LEDGER = "privacy-ledger.jsonl"


def _config(rounds: int) -> dict[str, Any]:
    # Every device trains with DP at a fixed sigma and a budget no round reaches: it always trains, and its
    # ledger records it. sited_data has 60 training scans a site; the clients' 90% holds three phones of 8-12
    # scans and a hospital each.
    dp = {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 1000.0}
    return {"seed": 0, "data": {"client_fraction": 0.9}, "federation": {
        "rounds": rounds, "method": "ditto", "min_clients": 2, "round_timeout_s": 60,
        "tiers": {"hospital": {"min_examples": 8, "local_epochs": 1},
                  "phone": {"per_site": 3, "min_examples": 8, "max_examples": 12, "availability": 1.0}}},
        "privacy": {"tiers": {"phone": dict(dp), "hospital": dict(dp)}}}  # copies: YAML aliases are refused


def _audit_records(audit: Path, node_id: int) -> list[dict[str, Any]]:
    """The node's message records, oldest first (files are named node-ID-TIME_NS-PID.json)."""
    paths = sorted(audit.glob(f"node-{node_id}-*.json"), key=lambda p: int(p.name.split("-")[2]))
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):  # written atomically, but may vanish under a rename
            continue
    return records


def _evaluated_round(audit: Path, node_id: int, server_round: int) -> bool:
    for record in _audit_records(audit, node_id):
        message = record["in"]
        if message.get("message_type") == "evaluate":
            values = message["records"]["config"]["values"]
            if values["server-round"] == server_round and not values.get("final", False):
                return True
    return False


def _wait_for(check: Callable[[], object], what: str, timeout_s: float, run: Future | None = None) -> None:
    """Poll ``check`` until it is true; fail early when the run it waits on has ended."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if run is not None and run.done():
            raise AssertionError(f"the run ended before {what}: {run.result()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _launcher_children(log: Path) -> set[int]:
    """The pids of the children a warm launcher forked for ClientApp tasks, from its log."""
    return {int(line.rsplit(" ", 1)[1]) for line in log.read_text(errors="replace").splitlines()
            if ": ClientApp in child " in line}


@pytest.fixture(scope="module")
def scenario(sited_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything the tests look at, gathered from one deployment that is torn down before they run."""
    root = tmp_path_factory.mktemp("deploy")
    run_dir = root / "run"
    parsed = parse_config(_config(2))
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, parsed), root / "manifests")
    manifest = {read_manifest(p).client: p for p in manifests}
    configs = {rounds: write_text(root / f"config-{rounds}.yaml", yaml.safe_dump(_config(rounds))) for rounds in (2, 3)}
    torch.manual_seed(0)
    start = save_checkpoint(root / "student.pt",
                            Checkpoint(model="student", state_dict=Student().state_dict(), role="kd", seed=0))

    def node_files(name: str) -> dict[str, Any]:
        return {"manifest": manifest[name], "data_dir": sited_data, "state_dir": root / "devices" / name,
                "warm": name in WARM}

    def run_config(rounds: int, resume: bool) -> dict[str, Any]:
        # data-root empty: the server holds no data, as in a real deployment (no central test set).
        # state-root keeps pyproject's default, as in docs/DEPLOY.md: each device's node config names its state-dir.
        return {"config": str(configs[rounds]), "run-dir": str(run_dir), "data-root": "",
                "manifests": str(root / "manifests"), "start-checkpoint": str(start),
                "num-clients": len(NODES), "resume": resume, "audit-dir": str(run_dir / "audit")}

    seen: dict[str, Any] = {"root": root, "run_dir": run_dir, "state_dir": node_files(PHONE)["state_dir"]}
    # Leaving the block stops the deployment first, which also ends a run still streaming.
    with ThreadPoolExecutor(1) as pool, LocalDeployment(root / "deployment") as deployment:
        deployment.add_nodes({name: node_files(name) for name in NODES})
        intruder = deployment.add_node(INTRUDER, register=False, **node_files(INTRUDER))
        phone_id = deployment.nodes[PHONE].node_id
        audit = run_dir / "audit"

        # The server waits (up to 120 s) until num-clients SuperNodes are online.
        run1 = pool.submit(deployment.run, APP_DIR, run_config(2, resume=False), root / "logs" / "run-1.log", 600)
        # Kill the phone mid-run, as soon as its round-1 evaluation is done: round 1 is saved and
        # round 2 cannot be (the server still samples it and skips it after round_timeout_s).
        # Waiting for its round-2 ClientApp instead races with a fast round on a loaded machine.
        _wait_for(lambda: _evaluated_round(audit, phone_id, 1), "the phone's round-1 evaluation", 240, run1)
        deployment.stop_node(PHONE, signal.SIGKILL)
        seen["state_at_kill"] = load_checkpoint(seen["state_dir"] / STATE_FILE, kind="client")
        seen["run1"] = run1.result()
        seen["report1"] = json.loads((run_dir / "federation.json").read_text())
        seen["intruder_rc"] = intruder.process.process.poll()
        seen["intruder_log"] = intruder.process.log.read_text(errors="replace")
        seen["registered"] = deployment.node_status()

        # The SuperLink restarts on its database: the five nodes still running reconnect by themselves.
        seen["link_pids"] = [deployment.link.process.pid]
        seen["link_survivors"] = deployment.restart_link()  # none of its processes may outlive it
        seen["link_pids"].append(deployment.link.process.pid)
        seen["registered_after_link_restart"] = deployment.node_status()
        # The SuperExec that starts ServerApps dies (under load it exits on one HTTP 500): run 2 must start anyway.
        seen["superexec_pids"] = [deployment.superexec.process.pid]
        deployment.superexec.process.kill()
        # The SuperLink lets a node back in once its heartbeat has lapsed (offline).
        deployment.wait_status([PHONE], "offline", timeout_s=90)
        deployment.start_node(PHONE, **node_files(PHONE))  # run 2's server waits for it to come online
        seen["state_after_restart"] = Client(resolve_setup(
            {"manifest": str(manifest[PHONE]), "data-dir": str(sited_data), "state-dir": str(seen["state_dir"])},
            {})).load_state()
        seen["run2"] = deployment.run(APP_DIR, run_config(3, resume=True), root / "logs" / "run-2.log", 600)
        seen["superexec_pids"].append(deployment.superexec.process.pid)
        seen["superexec_restarts"] = deployment.superexec_restarts
        seen["report2"] = json.loads((run_dir / "federation.json").read_text())
        seen["phone_messages"] = _audit_records(audit, phone_id)
        seen["audited_pids"] = {node: {int(p.stem.rsplit("-", 1)[1]) for p in audit.glob(f"node-{node_id}-*.json")}
                                for node, node_id in deployment.node_ids.items()}
        seen["launcher_children"] = {name: _launcher_children(deployment.root / "logs" / f"launcher-{name}.log")
                                     for name in WARM}
        seen["ledgers"] = {name: read_ledger(name, node_files(name)["state_dir"]) for name in NODES}
        seen["result"] = read_result(run_dir)
    seen["leftovers"] = deployment.leftovers()
    return seen


@slow
def test_the_run_completes_over_tls_and_writes_its_reports(scenario: dict[str, Any]) -> None:
    assert scenario["run1"].ok, scenario["run1"].details
    assert scenario["run2"].ok, scenario["run2"].details
    report = scenario["report2"]
    assert report["rounds"] == [1, 2, 3]
    assert {r["client"] for r in report["clients"]} == set(NODES)
    for name in NODES:
        assert (scenario["root"] / "devices" / name / "personalized.pt").is_file()
    assert (scenario["run_dir"] / "federation.md").is_file()


@slow
def test_an_unregistered_supernode_is_refused(scenario: dict[str, Any]) -> None:
    assert scenario["intruder_rc"] not in (None, 0)
    assert "Failed to activate SuperNode" in scenario["intruder_log"]
    assert len(scenario["registered"]) == len(NODES)  # the intruder never got a node id
    assert INTRUDER not in {r["client"] for r in scenario["report2"]["clients"]}


@slow
def test_a_killed_supernode_is_skipped_and_the_others_finish_the_round(scenario: dict[str, Any]) -> None:
    round2 = scenario["report1"]["participation"][1]
    assert round2["round"] == 2
    assert PHONE in round2["failed"]
    assert sorted(round2["trained"]) == sorted(set(NODES) - {PHONE})
    assert round2["aggregated"]  # five replies >= federation.min_clients
    assert scenario["report2"]["participation"][1] == round2  # run 2 resumed after round 2


@slow
def test_a_restarted_supernode_continues_from_its_saved_state(scenario: dict[str, Any]) -> None:
    at_kill, restored = scenario["state_at_kill"], scenario["state_after_restart"]
    assert at_kill.extra["counters"] == {"rounds_trained": 1, "last_round": 1}  # killed before saving round 2
    assert restored.rounds_trained == 1 and restored.last_round == 1
    assert all(torch.equal(restored.personal[k], at_kill.state_dict[k]) for k in at_kill.state_dict)
    # The restarted process had nothing in memory: what it told run 2 came from its state folder.
    queries = [m for m in scenario["phone_messages"] if m["in"]["message_type"] == "query"]
    assert [q["out"]["records"]["metrics"]["values"]["rounds-trained"] for q in queries] == [0, 1]
    final = load_checkpoint(scenario["state_dir"] / STATE_FILE, kind="client")
    assert final.extra["counters"] == {"rounds_trained": 2, "last_round": 3}
    assert PHONE in scenario["report2"]["participation"][2]["trained"]


@slow
def test_the_privacy_ledger_continues_after_the_restart(scenario: dict[str, Any]) -> None:
    lines = (scenario["state_dir"] / LEDGER).read_text().splitlines()
    rounds = [json.loads(line) for line in lines if "round" in json.loads(line)]
    assert [r["round"] for r in rounds] == [1, 3]  # round 2 was never trained, nothing was lost
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"]  # cumulative, not restarted at zero


@slow
def test_the_superlink_restarts_on_its_database_and_the_run_resumes_through_it(scenario: dict[str, Any]) -> None:
    old, new = scenario["link_pids"]
    assert old != new and scenario["link_survivors"] == []
    killed, restarted = scenario["superexec_pids"]  # run 2 ran although the SuperExec was killed before it
    assert killed != restarted and scenario["superexec_restarts"] == 1
    assert scenario["registered_after_link_restart"].keys() == scenario["registered"].keys()  # same node ids
    round3 = scenario["report2"]["participation"][2]
    assert round3["round"] == 3 and round3["aggregated"]
    assert sorted(round3["trained"]) == sorted(NODES)  # the five that stayed up reconnected, the phone came back


@slow
def test_every_device_ledger_verifies_and_agrees_with_the_server(scenario: dict[str, Any]) -> None:
    ledgers = scenario["ledgers"]
    assert all(ledger.ok for ledger in ledgers.values()), {n: (d.error, d.over_budget) for n, d in ledgers.items()}
    assert {name: ledger.rounds for name, ledger in ledgers.items()} == {
        name: (1, 3) if name == PHONE else (1, 2, 3) for name in NODES}
    compared = compare_rounds(ledgers, scenario["result"].history)
    assert {name: c.lost for name, c in compared.items()} == dict.fromkeys(NODES, 0)  # no update lost either way
    assert ledger_refusals(scenario["result"]) == []
    # What the load test measures of a run stopped short: the server's state after its last round.
    unfinished = read_unfinished_result(scenario["run_dir"])
    assert unfinished.history == scenario["result"].history and unfinished.retired == scenario["result"].retired
    assert unfinished.final == {} and read_unfinished_result(scenario["root"]).history == []  # no state: no rounds


@slow
def test_warm_nodes_ran_every_clientapp_in_a_child_of_their_launcher(scenario: dict[str, Any]) -> None:
    audited, children = scenario["audited_pids"], scenario["launcher_children"]
    assert len(audited[PHONE]) >= 6  # runs 1 and 2: queries, train and evaluate messages, before and after the kill
    for name in WARM:
        assert audited[name] and audited[name] <= children[name]
    assert audited[COLD] and not audited[COLD] & set().union(*children.values())  # Flower's own processes


@slow
def test_every_process_is_stopped_and_every_port_freed(scenario: dict[str, Any]) -> None:
    assert scenario["leftovers"] == []


# ---------------------------------------------------------------- device ledgers against the server (fast)


def test_device_ledgers_are_verified_and_set_against_the_server_history(tmp_path: Path) -> None:
    def ledger(name: str, rounds: list[int], budget: float = 1000.0) -> None:
        plan = plan_dp(DPTierConfig(enabled=True, noise_multiplier=1.0, budget_epsilon=budget), n=10, batch_size=8,
                       local_epochs=1, rounds=3, accountant="rdp")
        (tmp_path / name).mkdir()
        book = Ledger.open(tmp_path / name / LEDGER, name)
        for server_round in rounds:
            book.append(server_round, plan, plan.steps_per_round)

    ledger("a", [1, 2, 3])
    ledger("b", [1, 3])
    ledger("c", [1])
    with pytest.raises(PrivacyError, match="budget"):  # recorded, then refused: the ledger over-counts
        ledger("d", [1], budget=0.1)
    edited = tmp_path / "c" / LEDGER
    edited.write_text(edited.read_text().replace('"round": 1', '"round": 2'))
    ledgers = {name: read_ledger(name, tmp_path / name) for name in "abcde"}
    assert {name: d.ok for name, d in ledgers.items()} == {"a": True, "b": True, "c": False, "d": False, "e": False}
    assert "fails its hash" in ledgers["c"].error and ledgers["d"].over_budget == (1,)
    assert "does not exist" in ledgers["e"].error and ledgers["b"].rounds == (1, 3)

    history = [RoundRecord(round=1, sampled=["a", "b"], trained=["a", "b"]),
               RoundRecord(round=2, sampled=["a", "b"], trained=["a", "b"]),  # b's round 2 is in no ledger
               RoundRecord(round=3, sampled=["a", "b"], trained=["a"], failed={"b": "no-reply"})]  # b's is lost
    compared = compare_rounds({name: ledgers[name] for name in "ab"}, history)
    assert {name: (c.not_counted, c.not_recorded, c.lost) for name, c in compared.items()} == {
        "a": ((), (), 0), "b": ((3,), (2,), 2)}

    refused = RoundRecord(round=1, sampled=["a", "b"], failed={"a": "no-reply", "b": "ledger-rollback"})
    result = FederationResult(clients={}, history=[refused], final={}, final_failed={"a": "privacy-error"},
                              retired={"b": "round 1: ledger-rollback"}, central_start={}, central_final={},
                              central_dp={})
    assert ledger_refusals(result) == ["round 1: b: ledger-rollback", "final: a: privacy-error",
                                       "retired: b: round 1: ledger-rollback"]


def test_the_load_test_counts_what_flowers_logs_say_was_refused_or_dropped(tmp_path: Path) -> None:
    """The load test's account of Flower's own failures, on hand-written log lines as Flower 1.42 writes them."""
    locked = "ERROR :     [/v1/fleet/push-messages][UnexpectedError:OperationalError] (sqlite3.OperationalError) " \
             "database is locked\n[SQL: UPDATE task SET token=?]\n"
    (tmp_path / "superlink.log").write_text(
        '2026-12-07T15:48:17.770Z INFO [uvicorn.access] 127.0.0.1:1 - "POST /v1/fleet/push-messages HTTP/1.1" 500\n'
        '2026-12-07T15:48:18.082Z INFO [uvicorn.access] 127.0.0.1:2 - "POST /v1/fleet/push-object HTTP/1.1" 200\n'
        + locked * 2 + "ERROR :     Failed to store object 1a: (sqlite3.OperationalError) database is locked\n")
    (tmp_path / "supernode-phone-a.log").write_text("ERROR :     Failed to send message d6: Server error '500'\n" * 2)
    (tmp_path / "supernode-phone-b.log").write_text("INFO :      Sent successfully\n")
    assert flower_errors(tmp_path) == {
        "superlink_http_500_responses": 1, "superlink_requests_failed_database_locked": 2,
        "supernode_replies_dropped": 2, "supernodes_that_dropped_a_reply": ["phone-a"]}
    assert flower_errors(tmp_path / "missing")["supernode_replies_dropped"] == 0


# ---------------------------------------------------------------- certificates and keys (fast)


def test_certificates_name_every_host_and_keep_keys_private(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "certs", ["192.0.2.10", "superlink.example.org"])
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.10", "127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "192.0.2.10"
    for key in ("ca_key", "server_key"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["server_cert"].stat().st_mode) == 0o644
    with pytest.raises(DeployError, match="certs"):
        make_certs(tmp_path / "certs", ["127.0.0.1"])


def _deploy(umask: int, *args: str) -> None:
    """``edgemri deploy ARGS`` as a user would run it, under ``umask``."""
    done = subprocess.run([str(VENV_BIN / "edgemri"), "deploy", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(umask))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_deploy_sets_folder_and_file_modes_whatever_the_umask(umask: int, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o777)  # an existing folder of ours left open (made under umask 000 by an earlier version): tightened
    _deploy(umask, "certs", "--out", str(tmp_path / "new" / "certs"), "--hosts", "127.0.0.1")
    _deploy(umask, "keys", "--out", str(keys), "--nodes", "phone-1")
    made = [tmp_path / "new", *(tmp_path / "new").rglob("*"), keys, *keys.iterdir()]
    modes = {path.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(path.stat().st_mode)) for path in made}
    assert modes == {"new": "0o700", "new/certs": "0o700",  # a parent it made too: else anyone could swap certs/
                     "new/certs/ca.pem": "0o644", "new/certs/server.pem": "0o644",
                     "new/certs/ca.key": "0o600", "new/certs/server.key": "0o600",
                     "keys": "0o700", "keys/phone-1.key": "0o600", "keys/phone-1.pub": "0o644"}


def test_a_key_folder_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: tmp_path.stat().st_uid + 1)  # as if tmp_path belonged to someone else
    with pytest.raises(DeployError, match=r"must be a folder of this user's \(uid \d+\); it is a folder of uid"):
        make_node_keys(tmp_path, ["phone-1"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hosts", [[], [""], ["bad host!"], ["300.1.1.1"], ["a..b"]])
def test_bad_hosts_are_refused_by_name(hosts: list[str], tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="host" if hosts else "no hosts"):
        make_certs(tmp_path / "certs", hosts)
    assert not (tmp_path / "certs").exists()


def test_node_keys_are_p384_openssh_pairs(tmp_path: Path) -> None:
    pairs = make_node_keys(tmp_path, ["hospital-a", "phone_1"])
    private_path, public_path = pairs["phone_1"]
    private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    with pytest.raises(DeployError, match="hospital-a"):
        make_node_keys(tmp_path, ["hospital-a"])


@pytest.mark.parametrize("nodes", [["phone-1\n"], ["bad name"], [".hidden"], ["-x"], ["a/b"], ["x" * 65],
                                   ["ph\u00f6ne"], ["x", "x"], []])
def test_unsafe_node_names_are_refused_before_any_key_is_written(nodes: list[str], tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="node name"):
        make_node_keys(tmp_path / "keys", nodes)
    assert not (tmp_path / "keys").exists()


def test_deploy_commands_refuse_bad_values_in_one_line_and_leave_nothing(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    for days in ("10000000", "0", str(MAX_DAYS + 1)):  # argparse's usage error, before anything is made
        with pytest.raises(SystemExit, match="^2$"):
            main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--hosts", "127.0.0.1", "--days", days])
        assert "argument --days" in capsys.readouterr().err
    with pytest.raises(DeployError, match="1 to 3650 days"):  # the library's own check, for other callers
        make_certs(tmp_path / "certs", ["127.0.0.1"], days=MAX_DAYS + 1)
    assert main(["deploy", "keys", "--out", str(tmp_path / "keys"), "--nodes", "phone-1\n"]) == 2
    assert "node name 'phone-1\\n'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--hosts", "127.0.0.1",
                 "--days", str(MAX_DAYS)]) == 0


def test_a_failed_certificate_write_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def disk_full_on_third_file(path: Path, data: bytes, mode: int = 0o666) -> Path:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        path.write_bytes(data)
        return path

    monkeypatch.setattr(certs_module, "write_bytes", disk_full_on_third_file)
    with pytest.raises(DeployError, match="No space left on device"):
        make_certs(tmp_path / "deploy" / "certs", ["127.0.0.1"])
    assert len(calls) == 3 and list((tmp_path / "deploy").iterdir()) == []  # no certs/, no temp folder
