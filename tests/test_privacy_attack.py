"""`edgemri privacy attack`: the replay is exact, the analytic attack reads a single scan's feature map, the CLI
writes its report, and a bad run folder is one line and exit 2.

The run folder is made by the real pieces (the clients' own ``train_round`` and ``final_evaluate``, the
server's ``write_reports``), one thread per client as in the simulation, with a plain FedAvg mean standing in
for the server's aggregation: only the files matter here, not Flower's processes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgemri.clients.runtime import Client, ClientSetup, ClientState
from edgemri.core.data.dataset import ArraySplit, load_dataset
from edgemri.core.data.partition import partition, read_manifest, site_pools, write_manifests
from edgemri.core.federation.personalize import create_method, student_from
from edgemri.core.federation.protocol import ClientInfo, FederationResult, RoundInstructions, RoundRecord, Status
from edgemri.core.io import write_text
from edgemri.core.privacy import attacks
from edgemri.core.privacy.membership import learned_attack
from edgemri.core.privacy.reconstruction import analytic_attack, feature_maps, single_image_step
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.main import main
from edgemri.models import Student
from edgemri.server.app import write_reports
from edgemri.simulation.privacy_attack import REPORT_KIND
from edgemri.simulation.replay import one_thread, replay_check, replay_client, round_instructions
from edgemri.simulation.run_folder import read_run

ROUNDS = 2


def _config():
    """Two sites, one hospital (no DP) and one DP-SGD phone each, FedAvg."""
    return parse_config({
        "seed": 0, "data": {"client_fraction": 0.0},
        "federation": {"rounds": ROUNDS, "method": "fedavg", "min_clients": 1,
                       "tiers": {"hospital": {"min_examples": 20, "local_epochs": 1},
                                 "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12,
                                           "availability": 1.0}}},
        "privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}})


@pytest.fixture(scope="module")
def small_run(sited_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished 2-round run folder and the update each client really sent in each round."""
    out = tmp_path_factory.mktemp("attack") / "run"
    config = _config()
    write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    dataset = load_dataset(sited_data)  # its pools: each site's share of Testing (the membership non-members)
    paths = write_manifests(partition(dataset.train, sited_data, config, pools=site_pools(dataset, config)),
                            out / "manifests")
    torch.manual_seed(0)
    start = Student().state_dict()
    start_path = out.parent / "student.pt"
    save_checkpoint(start_path, Checkpoint(model="student", state_dict=start, role="kd", seed=0))
    write_text(out / "logs" / "run_config.toml", f'"data-root" = "{sited_data}"\n"start-checkpoint" = "{start_path}"\n')
    clients = {}
    for path in paths:
        name = read_manifest(path).client
        clients[name] = Client(ClientSetup(path, sited_data, out / "clients" / name))
    method, states, sent, history = create_method(config.federation), {n: ClientState() for n in clients}, {}, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated client trains
    try:
        global_state = start
        for r in range(1, ROUNDS + 1):
            replies = {}
            for name, client in clients.items():
                reply = client.train_round(method, global_state, states[name],
                                           RoundInstructions.for_tier(config, client.kind, r))
                assert reply.status is Status.TRAINED
                states[name], replies[name] = reply.state, reply
                sent[(name, r)] = {k: reply.shared[k] - global_state[k] for k in global_state}
            sizes = {n: clients[n].data().num_examples() for n in clients}
            global_state = {k: sum(sizes[n] * replies[n].shared[k] for n in clients) / sum(sizes.values())
                            for k in global_state}
            save_checkpoint(out / "server" / f"global-round-{r:03d}.pt",
                            Checkpoint(model="student", state_dict=global_state, role=f"global (round {r})"))
            history.append(RoundRecord(r, sampled=list(clients), trained=list(clients), aggregated=True,
                                       train_metrics={n: {**replies[n].metrics, "num-examples": float(sizes[n])}
                                                      for n in clients}))
        final = {n: c.final_evaluate(method, start, global_state, global_state, states[n],
                                     RoundInstructions.for_tier(config, c.kind, ROUNDS, final=True))
                 for n, c in clients.items()}
    finally:
        torch.set_num_threads(threads)
    infos = {n: ClientInfo(n, c.kind, c.manifest.site, c.data().num_examples()) for n, c in clients.items()}
    write_reports(FederationResult(infos, history, final, {}, {}, {}, {}, {"enabled": False}), config, out)
    return out, sent


def _client(run_dir: Path, kind: str) -> str:
    return next(c["client"] for c in json.loads((run_dir / "federation.json").read_text())["clients"]
                if c["kind"] == kind)


@pytest.mark.parametrize("kind", ["hospital", "phone"])
def test_the_replayed_update_is_the_one_the_client_sent(small_run, kind: str) -> None:
    run_dir, sent = small_run
    run = read_run(run_dir)
    name = _client(run_dir, kind)
    with one_thread():
        replay = replay_client(run, name, [ROUNDS])[ROUNDS]
    assert (replay.plan is not None) == (kind == "phone")  # the phone's DP-SGD noise is seeded: exact too
    assert set(replay.update) == set(sent[(name, ROUNDS)])
    assert all(torch.equal(replay.update[k], sent[(name, ROUNDS)][k]) for k in replay.update)
    assert replay_check(replay, run.reported(name, ROUNDS))["matches"]


def test_the_analytic_attack_reads_a_single_scans_feature_map_and_dp_noise_hides_it(small_run) -> None:
    run_dir, _ = small_run
    run = read_run(run_dir)
    phone = run.client(_client(run_dir, "phone"))
    train = phone.data().train
    features = feature_maps(student_from(run.start), train.images)
    target, label = 1, int(train.labels[1])
    plan = phone.dp_plan(round_instructions(run.config, "phone", 1))
    results = {}
    for variant, dp in (("plain", None), ("dp", plan)):
        step = single_image_step(student_from(run.start), train.images[target], label, dp, seed=0)
        grads = {k: -v for k, v in step.items()}
        flat, recovered = attacks.linear_leakage(grads["classifier.1.weight"], grads["classifier.1.bias"])
        results[variant] = (torch.corrcoef(torch.stack([flat, features[target].flatten()]))[0, 1], recovered)
        if dp is None:
            assert torch.allclose(flat, features[target].flatten(), rtol=1e-3, atol=1e-5)
            scored, _ = analytic_attack(grads, features, None, update=False, true_index=target, true_label=label)
            assert scored["matches_true_image"] and scored["label_recovered"] and scored["psnr"] > 60
    assert results["plain"][0] > 0.9999 and results["plain"][1] == label
    assert abs(results["dp"][0]) < 0.5  # sigma x C per coordinate swamps one scan's clipped gradient


def test_the_cli_writes_the_report_with_a_card_per_client(small_run, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run[0], run_dir)
    assert main(["privacy", "attack", str(run_dir), "--clients", "2", "--inversion-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "round 1" in printed and "membership AUC" in printed  # progress lines
    report = json.loads((run_dir / "privacy-attacks.json").read_text())
    assert report["kind"] == REPORT_KIND and report["settings"]["seed"] == 0
    assert {"run", "settings", "clients", "summary", "client_level", "versions", "seconds"} <= set(report)
    assert {c["kind"] for c in report["clients"].values()} == {"hospital", "phone"}  # sampled across tiers
    for card in report["clients"].values():
        assert {"accuracy", "privacy", "updates", "membership", "not_protected", "n_train"} <= set(card)
        assert card["privacy"]["dp"] == (card["kind"] == "phone")
        assert card["accuracy"]["where"] == "site pool" and "personalized - start" in \
            card["accuracy"]["tier_paired"]
        (update,) = card["updates"]
        assert update["round"] == 1 and update["replay"]["matches"]
        step = update["single_image"]
        assert ("without_dp" in step) == card["privacy"]["dp"]
        plain = step.get("without_dp", step["as_configured"])
        assert plain["analytic"]["matches_true_image"] and plain["inversion"]["steps"] == 5
        assert 0 <= card["membership"]["loss_threshold"]["auc"] <= 1
    markdown = (run_dir / "privacy-attacks.md").read_text()
    assert markdown.count("### ") == 2 and "not protected" in markdown and "| phone |" in markdown
    assert (run_dir / "privacy-attacks.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "privacy-attacks-reconstructions.png").exists()  # real-looking data: only on request
    assert main(["privacy", "attack", str(run_dir), "--clients", "1", "--inversion-steps", "5", "--quiet",
                 "--write-reconstructions"]) == 0
    assert (run_dir / "privacy-attacks-reconstructions.png").read_bytes()[:4] == b"\x89PNG"


def _untimed(value: object) -> object:
    """A report without its timings (the one thing two runs of the same attack may differ in)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds"}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_an_interrupted_attack_changes_nothing_and_its_rerun_is_an_uninterrupted_run(
        small_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`privacy attack` has no --resume because it needs none: it only reads the run folder and writes its
    report at the end, atomically. Ctrl-C while it attacks leaves the folder byte for byte as it was, so the
    rerun is an uninterrupted run; the attack is seeded, so it gives the report of one."""
    run_dir, pristine = tmp_path / "run", tmp_path / "pristine"
    shutil.copytree(small_run[0], run_dir)
    shutil.copytree(small_run[0], pristine)
    before = _files(run_dir)
    args = ["privacy", "attack", "--clients", "1", "--inversion-steps", "5"]
    process = subprocess.Popen([sys.executable, "-m", "edgemri", *args[:2], str(run_dir), *args[2:]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while "round 1" not in process.stdout.readline():  # mid-attack: the first update is attacked
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert _files(run_dir) == before
    reports = []
    for folder in (run_dir, pristine):
        assert main([*args[:2], str(folder), *args[2:], "--quiet"]) == 0
        report = json.loads((folder / "privacy-attacks.json").read_text())
        reports.append(_untimed({k: v for k, v in report.items() if k != "run"}))
    assert reports[0] == reports[1]


def _tamper(run_dir: Path, kind: str) -> None:
    if kind == "not a run":
        shutil.rmtree(run_dir / "server")
    elif kind == "result not JSON":
        (run_dir / "server" / "result.json").write_text("{not json")
    elif kind == "trained client unknown":
        result = json.loads((run_dir / "server" / "result.json").read_text())
        result["history"][0]["trained"].append(["not", "a", "name"])
        (run_dir / "server" / "result.json").write_text(json.dumps(result))
    elif kind == "accuracy out of range":
        report = json.loads((run_dir / "federation.json").read_text())
        for row in report["pool"]["clients"]:  # the section the cards read: the site pools
            row["personalized"] = 7.0
        (run_dir / "federation.json").write_text(json.dumps(report))
    elif kind == "manifests outside the run":
        shutil.rmtree(run_dir / "manifests")
        (run_dir / "manifests").symlink_to(run_dir.parent)


@pytest.mark.parametrize(("kind", "expected"), [
    ("missing", "is not a folder"), ("not a run", "it has no server/result.json"),
    ("result not JSON", "result.json is not valid JSON"),
    ("trained client unknown", "that is not one of the run's clients"),
    ("accuracy out of range", "row: key 'personalized' has value '7.0'; allowed: NaN or a finite number in [0, 1]"),
    ("manifests outside the run", "manifests resolves outside the run folder")])
def test_a_bad_run_folder_is_one_line_and_exit_2(small_run, kind: str, expected: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    if kind != "missing":
        shutil.copytree(small_run[0], run_dir)
        _tamper(run_dir, kind)
    assert main(["privacy", "attack", str(run_dir), "--clients", "1", "--inversion-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemri: error: ") and err.count("\n") == 1 and expected in err
    assert not (run_dir / "privacy-attacks.json").exists()


def _split(labels: torch.Tensor) -> ArraySplit:
    return ArraySplit(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), labels,
                      [f"f{k}" for k in range(len(labels))])


def test_the_learned_attack_of_art_separates_memorized_members_and_not_lookalikes() -> None:
    pytest.importorskip("art", reason="the attacks extra (pip install 'edgemri[attacks]')")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (120,), generator=generator)
    noise = torch.randn(120, 4, generator=generator)
    memorized = noise + 6.0 * torch.nn.functional.one_hot(labels, 4)  # confident on the true class: members
    members, nonmembers = _split(labels[:60]), _split(labels[60:])
    result = learned_attack(Student(), memorized[:60], members, noise[60:], nonmembers, seed=0)
    assert result["auc"] > 0.9 and result["members"] == 30 and result["nonmembers"] == 30  # scored on the unseen half
    alike = learned_attack(Student(), noise[:60], members, noise[60:], nonmembers, seed=0)
    assert abs(alike["auc"] - 0.5) < 0.2
    assert learned_attack(Student(), noise[:60], members, noise[60:], nonmembers, seed=0) == alike  # seeded
    few = learned_attack(Student(), noise[:7], members.subset(range(7)), noise[60:], nonmembers, seed=0)
    assert "7 members" in few["skipped"]


def test_importing_art_closes_none_of_the_processs_log_handlers() -> None:
    pytest.importorskip("art", reason="the attacks extra (pip install 'edgemri[attacks]')")
    # A fresh interpreter: ART's package import (its logging.config.dictConfig) closes every open handler,
    # pytest's own among them, unless it goes through art_membership_classes.
    script = ("import logging\n"
              "class Recording(logging.Handler):\n"
              "    closed = False\n"
              "    def emit(self, record): pass\n"
              "    def close(self):\n"
              "        Recording.closed = True\n"
              "        super().close()\n"
              "logging.getLogger().addHandler(Recording())\n"
              "from edgemri.core.privacy.membership import art_membership_classes\n"
              "art_membership_classes()\n"
              "print('closed' if Recording.closed else 'open')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "open"
