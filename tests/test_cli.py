"""The command line without training: every --help, one-line errors (exit 2, no traceback), the demo's plan."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgemri.main as cli
from edgemri.arguments import AtMost
from edgemri.core.errors import EdgemriError
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.main import build_parser, main
from edgemri.models import Student
from edgemri.simulation.pipeline import DEMO_OUT, DemoLayout, demo, demo_stages, load_run_config, start_model
from tests.conftest import one_error_line

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path, e.g. ("data", "synth"), found by walking the parser."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name)) or [(*prefix, name)]
    return found


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: edgemri " + " ".join(command) in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("edgemri ")


def test_missing_config_file_from_a_real_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "edgemri", "distill", "--config", str(tmp_path / "nope.yaml"),
                           "--data-root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"edgemri: error: config file not found: {tmp_path / 'nope.yaml'}"]


@pytest.mark.parametrize(("signum", "code", "after_s"), [
    (signal.SIGINT, 130, None),  # while Python imports the package
    (signal.SIGINT, 130, 4.0),  # while the command works
    (signal.SIGTERM, 143, None),
    (signal.SIGTERM, 143, 4.0),
    (signal.SIGHUP, 129, 4.0),  # its terminal closed
])
def test_a_signal_ends_a_command_with_its_code_and_one_line(tmp_path: Path, signum: int, code: int,
                                                            after_s: float | None) -> None:
    # -X importtime prints each import as it ends: the signal then lands while the package's imports go on (a
    # fixed delay would, on a busy machine, land in the interpreter's own start-up, before any code of ours).
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "edgemri", "data", "synth", "--out",
                                str(tmp_path / "data"), "--preset", "kaggle"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               # as from a terminal: a shell without job control starts children with SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if after_s is None:
        while "| edgemri.entry" not in process.stderr.readline():
            assert process.poll() is None
    else:
        time.sleep(after_s)
    process.send_signal(signum)
    time.sleep(0.05)
    process.send_signal(signum)  # a second one while it stops is not a traceback either
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("edgemri: ")][-1:] == [
        f"edgemri: {({130: 'interrupted', 143: 'terminated', 129: 'hung up'})[code]}; what was saved stays, continue "
        f"with --resume where the command has it"]


def test_config_with_an_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("bogus: 1\n")
    assert main(["distill", "--config", str(config), "--data-root", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "'bogus'" in one_error_line(capsys)


@pytest.mark.parametrize("command", [
    ["export", "{missing}"],
    ["federate", "--config", str(QUICKSTART), "--data-root", "{tmp}", "--start", "{missing}", "--out", "{tmp}/fed"],
])
def test_missing_checkpoint(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    assert main([part.format(missing=missing, tmp=tmp_path) for part in command]) == 2
    assert str(missing) in one_error_line(capsys)
    assert not (tmp_path / "fed").exists()


def test_system_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real OSError from deep inside (here: --out under a file) is the system's reason and the path."""
    (tmp_path / "file").write_text("")
    assert main(["data", "synth", "--out", str(tmp_path / "file" / "data"), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert os.strerror(errno.ENOTDIR) in line and str(tmp_path / "file" / "data") in line


def test_disk_full_names_the_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def disk_full(args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/report.json")

    monkeypatch.setattr(cli, "cmd_models_summary", disk_full)
    assert main(["models", "summary"]) == 2
    assert one_error_line(capsys) == f"edgemri: error: {os.strerror(errno.ENOSPC)}: runs/x/report.json"


@pytest.mark.parametrize(("message", "printed"), [
    ("the run failed\nlogs: /somewhere", "the run failed"),  # a multi-line message: its first line
    # Whatever a message quotes (a file name from a data folder, a foreign error) cannot drive the terminal.
    ("cannot use scan-\x1b[31mred\x1b]0;title\x07.jpg", "cannot use scan-\\x1b[31mred\\x1b]0;title\\x07.jpg"),
])
def test_an_error_is_one_escaped_line(message: str, printed: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise EdgemriError(message)

    monkeypatch.setattr(cli, "cmd_models_summary", fails)
    assert main(["models", "summary"]) == 2
    assert one_error_line(capsys) == f"edgemri: error: {printed}"


def test_existing_synth_folder_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(tmp_path), "--quiet"]) == 2
    assert str(tmp_path) in one_error_line(capsys)
    assert (tmp_path / "kept.txt").read_text() == "mine"


@pytest.mark.parametrize(("epsilons", "expected"), [("a,b", "argument --epsilons"), ("inf", "--epsilons"),
                                                     ("0,3", "--epsilons"), ("", "--epsilons")])
def test_sweep_refuses_bad_epsilons(epsilons: str, expected: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "sweep", "--config", str(QUICKSTART), "--data-root", str(tmp_path), "--epsilons", epsilons,
            "--start", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "sweep")]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own refusal: usage, then one error line
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err.splitlines()[-1]
    assert not (tmp_path / "sweep").exists()


def test_distill_refuses_before_loading_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "distill"
    (out / "seed-0").mkdir(parents=True)
    assert main(["distill", "--config", str(QUICKSTART), "--data-root", str(tmp_path / "no-data"),
                 "--out", str(out)]) == 2
    assert "--resume" in one_error_line(capsys)


def _arguments(parser: argparse.ArgumentParser, command: str = "") -> list[tuple[str, argparse.Action]]:
    """(command, argument) for every argument of every command, found by walking the parser."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _arguments(sub, f"{command} {name}".strip())
        else:
            found.append((command, action))
    return found


# Image files and folders: the system's limit on a command line bounds them, and they are predicted in batches.
UNBOUNDED_LISTS = {("predict", "paths")}


def test_every_number_and_list_a_command_takes_has_a_range() -> None:
    for command, action in _arguments(build_parser()):
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert action.type is not int, f"{name}: give it a range (edgemri.arguments.BoundedInt)"
        if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
            assert isinstance(action, AtMost) or (command, action.dest) in UNBOUNDED_LISTS, \
                f"{name}: bound its length (edgemri.arguments.AtMost)"


def test_the_ranges_restated_for_a_fast_help_are_the_libraries() -> None:
    from edgemri.deploy.certs import MAX_DAYS
    from edgemri.deploy_commands import DAYS
    from edgemri.simulation import privacy_attack, privacy_audit

    assert (cli.ATTACK_CLIENTS.high, cli.INVERSION_STEPS.high) == (privacy_attack.MAX_CLIENTS,
                                                                    privacy_attack.MAX_INVERSION_STEPS)
    assert (cli.CANARIES.low, cli.CANARIES.high) == (privacy_audit.MIN_CANARIES, privacy_audit.MAX_CANARIES)
    assert DAYS.high == MAX_DAYS


ELEVEN_EPSILONS = ",".join(str(e) for e in range(1, 12))
OUT_OF_RANGE = {  # argv -> the usage error's message; each was accepted before and ran (or would have) until killed
    "seeds": (["distill", "--config", str(QUICKSTART), "--seeds", "1000000000"],
              "argument --seeds: 1000000000 is out of range; allowed: 1 to 100"),
    "no-seeds": (["distill", "--config", str(QUICKSTART), "--seeds", "0"],
                 "argument --seeds: 0 is out of range; allowed: 1 to 100"),
    "epsilons": (["privacy", "sweep", "--config", str(QUICKSTART), "--epsilons", ELEVEN_EPSILONS],
                 "argument --epsilons: at most 10 comma-separated values, got 11"),
    "overrides": (["distill", "--config", str(QUICKSTART), *["--set", "seed=1"] * 101],
                  "argument --set: at most 100 values, got 101"),
    "synth-seed": (["data", "synth", "--out", "data", "--seed", "-1"],
                   "argument --seed: -1 is out of range; allowed: 0 to 2147483647"),
    "rounds": (["privacy", "attack", "run", "--rounds", *map(str, range(1, 102))],
               "argument --rounds: at most 100 values, got 101"),
    "round": (["privacy", "attack", "run", "--rounds", "0"],
              "argument --rounds: 0 is out of range; allowed: 1 to 10000"),
    "clients": (["privacy", "attack", "run", "--clients", "1001"],
                "argument --clients: 1001 is out of range; allowed: 1 to 1000"),
    "canaries": (["privacy", "audit", "--canaries", "5"],
                 "argument --canaries: 5 is out of range; allowed: 20 to 2000"),
    "top-k": (["predict", "model.pte", "scan.png", "--top-k", "0"],
              "argument --top-k: 0 is out of range; allowed: 1 to 100"),
    "batch-size": (["predict", "model.pte", "scan.png", "--batch-size", "100000"],
                   "argument --batch-size: 100000 is out of range; allowed: 1 to 1024"),
    "days": (["deploy", "certs", "--out", "certs", "--hosts", "127.0.0.1", "--days", "10000000"],
             "argument --days: 10000000 is out of range; allowed: 1 to 3650"),
    "hosts": (["deploy", "certs", "--out", "certs", "--hosts", ",".join(["127.0.0.1"] * 65)],
              "argument --hosts: at most 64 comma-separated values, got 65"),
    "nodes": (["deploy", "keys", "--out", "keys", "--nodes", *(f"phone-{i}" for i in range(1001))],
              "argument --nodes: at most 1000 values, got 1001"),
    "preload": (["client", "serve", *["--preload", "json"] * 33], "argument --preload: at most 32 values, got 33"),
    "not-a-number": (["predict", "model.pte", "scan.png", "--top-k", "1" * 5000],
                     f"argument --top-k: expected a whole number from 1 to 100, got '{'1' * 60}'"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_a_count_out_of_range_is_a_usage_error(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = OUT_OF_RANGE[case]
    monkeypatch.chdir(tmp_path)  # where the relative outputs would go
    with pytest.raises(SystemExit) as refused:  # argparse's usage error: before anything is loaded or run
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(f": error: {expected}"), err
    assert list(tmp_path.iterdir()) == []


def test_no_data_root_says_how_to_make_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "partition", "--config", str(QUICKSTART), "--out", "unused"]) == 2
    assert "--data-root" in one_error_line(capsys)


def test_demo_plan_resumes_from_what_exists(tmp_path: Path) -> None:
    layout = DemoLayout(tmp_path)
    layout.data.mkdir()
    (layout.data / "metadata.csv").write_text("file,split,label,site\n")
    layout.student.parent.mkdir()
    layout.student.write_bytes(b"")
    stages = demo_stages(tmp_path, QUICKSTART, quiet=True)
    assert [(s.title.split()[0], s.done) for s in stages] == [
        ("synthesize", True), ("distill", True), ("federate", False), ("export", False), ("export", False),
        ("export", False), ("predict", False)]
    federate = stages[2]
    assert "--resume" not in federate.command and f"--start {layout.student}" in federate.command

    (layout.federation / "privacy.md").parent.mkdir()
    (layout.federation / "privacy.md").write_text("")
    replanned = demo_stages(tmp_path, QUICKSTART, quiet=True)
    assert replanned[2].done and replanned[2].command.endswith("--resume")
    assert not any(s.done for s in replanned[3:])  # exports and predictions always rerun


def test_demo_on_a_given_folder_audits_and_maps_it_instead_of_synthesizing(tiny_data: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    stages = demo_stages(tmp_path / "out", QUICKSTART, quiet=True, data_root=tiny_data)
    assert stages[0].title == "audit the data and map its sites" and not stages[0].done
    assert f"--data-root {tiny_data}" in stages[1].command and f"--data-root {tiny_data}" in stages[2].command
    lines = stages[0].run()
    assert "appearance sites" in lines[-1] and (tmp_path / "out" / "sites" / "sites.png").is_file()
    assert demo_stages(tmp_path / "out", QUICKSTART, quiet=True, data_root=tiny_data)[0].done  # resumes
    assert str(tiny_data) in DemoLayout(tmp_path / "out", tiny_data).report_lines()[0]
    assert main(["demo", "--out", str(tmp_path / "x"), "--data-root", str(tmp_path), "--quiet"]) == 2
    assert "has no Training/ folder" in one_error_line(capsys)


def test_demo_layout_and_default_start_model() -> None:
    """runs/demo/... is what README documents and what `federate` starts from by default."""
    layout = DemoLayout(DEMO_OUT)
    assert layout.student == Path("runs/demo/distill/student.pt")
    assert start_model(load_run_config(QUICKSTART, data_root="unused")) == layout.student
    lines = "\n".join(layout.report_lines())
    for path in ("runs/demo/data", "runs/demo/distill/report.md", "runs/demo/federation/federation.md",
                 "runs/demo/federation/privacy.md", "runs/demo/edge"):
        assert path in lines


def test_demo_runs_the_edge_stages_once_the_federation_is_done(tiny_data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Only the cheap stages run (an untrained student stands in for the trained ones): the edge wiring."""
    pytest.importorskip("onnxruntime")
    layout = DemoLayout(tmp_path)
    shutil.copytree(tiny_data, layout.data)
    (layout.data / "metadata.csv").write_text("file,split,label,site\n")
    student = Checkpoint(model="student", state_dict=Student().state_dict(), role="kd")
    save_checkpoint(layout.student, student)
    save_checkpoint(layout.federation / "clients" / "phone-001" / "personalized.pt", student)
    (layout.federation / "privacy.md").write_text("")

    outcome = demo(tmp_path, QUICKSTART, quiet=True)
    assert list(outcome.seconds) == [s.title for s in demo_stages(tmp_path, QUICKSTART)][3:]
    for name in ("student.onnx", "student.int8.onnx", "phone-001.onnx"):
        assert (layout.edge / name).is_file()
    printed = capsys.readouterr().out
    assert "== distill: already done" in printed and "-- phone-001.onnx" in printed
