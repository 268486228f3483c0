"""The ServerApp prepares what it can and refuses, in one line, what it cannot (also under a plain `flwr run`)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from edgemri.core.data.partition import manifest_paths
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.io import owner_lock
from edgemri.core.registries import parse_config
from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
from edgemri.models import Student
from edgemri.server.app import SERVERAPP_LOCK, prepare
from edgemri.simulation.federate import APP_DIR
from edgemri.simulation.flower_run import VENV_BIN, flwr_run, simulation_superlink, staged_app


def _settings(tmp_path: Path, data_root: Path | None, start: Path) -> p.RunSettings:
    return p.RunSettings.from_run_config({
        "config": "configs/quickstart.yaml", "run-dir": str(tmp_path / "run"),
        "data-root": str(data_root) if data_root else "", "manifests": str(tmp_path / "run" / "manifests"),
        "state-root": str(tmp_path / "run" / "clients"), "start-checkpoint": str(start), "num-clients": 2})


@pytest.fixture()
def start(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "student.pt", Checkpoint(model="student", state_dict=Student().state_dict()))


def test_missing_manifests_are_written_from_the_data_folder(sited_data: Path, start: Path, tmp_path: Path) -> None:
    config = parse_config({"data": {"client_fraction": 0.0},
                           "federation": {"tiers": {"hospital": {"min_examples": 20},
                                                    "phone": {"per_site": 1, "max_examples": 12}}}})
    settings = _settings(tmp_path, sited_data, start)
    start_model, dataset = prepare(settings, config)
    assert start_model.model == "student" and len(dataset.test) > 0
    assert len(manifest_paths(settings.manifests)) >= 2


def test_what_cannot_be_prepared_is_refused_naming_the_command(start: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgemriError, match="make demo"):
        prepare(_settings(tmp_path, tmp_path / "nothing", start), parse_config({}))
    with pytest.raises(EdgemriError, match="make demo"):
        prepare(_settings(tmp_path, None, tmp_path / "no-student.pt"), parse_config({}))


def test_bad_run_settings_name_the_key() -> None:
    with pytest.raises(p.ProtocolError, match="num-clients"):
        p.RunSettings.from_run_config({"config": "c", "run-dir": "r", "manifests": "m", "state-root": "s",
                                       "start-checkpoint": "x", "num-clients": -1})
    with pytest.raises(p.ProtocolError, match="unknown run config key 'oops'"):
        p.RunSettings.from_run_config({"oops": 1})


@pytest.mark.slow
def test_a_second_serverapp_on_a_run_folder_in_use_waits_for_the_first(tmp_path: Path) -> None:
    """A resumed run whose first run still works in the folder (its ServerApp holds the lock) waits for it to end,
    saying so, and reads nothing before; once the lock is free it goes on, and a plain `flwr run` without a start
    model then stops at once with one line that names the command to run."""
    run_dir = tmp_path / "flwr"
    log_file = run_dir / "flwr-run.log"
    waiting = "another ServerApp holds"

    def hold_until_waited_for() -> None:
        with owner_lock(run_dir / "server" / SERVERAPP_LOCK, EdgemriError, holder="ServerApp"):
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and waiting not in (log_file.read_text() if log_file.is_file() else ""):
                time.sleep(0.2)

    holder = threading.Thread(target=hold_until_waited_for)
    holder.start()
    with simulation_superlink(run_dir) as (env, connection, _):
        outcome = flwr_run(APP_DIR, connection, env, log_file, timeout_s=300,
                           run_config={"start-checkpoint": str(tmp_path / "missing.pt"), "run-dir": str(run_dir)},
                           federation_config="num-supernodes=2")
    holder.join()
    log = log_file.read_text()
    assert waiting in log and "edgemri: error: no start model at" in log and "make demo" in log
    assert log.index(waiting) < log.index("no start model")  # nothing read before the first ServerApp let go
    assert not (run_dir / "server" / "result.json").exists()
    assert outcome.error.startswith("no start model at") and outcome.seconds < 180


def test_the_staged_app_packs_into_the_same_fab_without_the_ignored_folders(tmp_path: Path) -> None:
    """`flwr run` packs a copy of the app (Flower's builder walks every file first, .venv/ and runs/ included):
    the copy leaves out hidden entries and the folders .gitignore names, and Flower builds the same FAB from it."""
    app = tmp_path / "app"
    files = {"pyproject.toml": (APP_DIR / "pyproject.toml").read_text(), ".gitignore": ".venv/\nruns/\n*.egg-info/\n",
             "README.md": "# app\n", "configs/quickstart.yaml": "seed: 0\n", "core/a.py": "A = 1\n",
             "core/sub/b.json": "{}\n", ".venv/lib/site.py": "", "runs/r/report.json": "{}\n",
             "x.egg-info/PKG-INFO.md": "", ".git/HEAD": "ref: refs/heads/main\n", "core/__pycache__/a.py": ""}
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    staged = staged_app(app, tmp_path / "staging" / "app")
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert copied == {"pyproject.toml", ".gitignore", "README.md", "configs/quickstart.yaml", "core/a.py",
                      "core/sub/b.json"}

    def fab(folder: Path) -> list[str]:
        out = tmp_path / f"fab-{folder.parent.name}"
        out.mkdir()
        subprocess.run([str(VENV_BIN / "flwr"), "build", "--app", str(folder)], cwd=out, check=True,
                       capture_output=True)
        return [p.name for p in out.glob("*.fab")]

    built = fab(app)
    assert len(built) == 1 and fab(staged) == built  # a FAB's file name carries its content hash
