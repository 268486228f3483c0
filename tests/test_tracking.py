"""Experiment tracking (reports/tracking.py): a real tiny distillation (through `edgemri distill --track-dir`) and a
federation run folder logged into MLflow's file store, linked, tracked again without duplicates, and nothing in
the store names a scan, a data folder, a run folder or a client's folder."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgemri.core.config import ConfigError
from edgemri.core.federation import protocol as p
from edgemri.core.registries import parse_config
from edgemri.main import main
from edgemri.models import file_sha256
from edgemri.reports import tracking
from edgemri.reports.federation import build_federation_report, write_federation_report
from edgemri.reports.html import write_html_report
from edgemri.reports.privacy import build_privacy_report, write_privacy_report
from tests.conftest import one_error_line

# Checked, not imported: MLflow is imported by reports/tracking.py alone, with its telemetry off.
if find_spec("mlflow") is None:
    pytest.skip("MLflow is not installed (pip install 'edgemri[track]')", allow_module_level=True)

FAST = {"seed": 0, "data": {"val_fraction": 0.2},
        "distill": {"teacher": {"width": 0.0625, "train": {"epochs": 2, "batch_size": 32}},
                    "baseline": {"epochs": 2, "batch_size": 16},
                    "kd": {"temperature": 2.0, "train": {"epochs": 2, "batch_size": 16}}}}
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
CLIENTS = {"hospital-a": ("hospital", 0.6, 0.7), "phone-a": ("phone", 0.5, 0.6), "phone-b": ("phone", 0.4, 0.55)}


def _federation_result() -> p.FederationResult:
    """Two rounds of a hospital without DP and two phones with DP-SGD, as the server records them."""
    history = [p.RoundRecord(
        round=r, sampled=list(CLIENTS), trained=list(CLIENTS), aggregated=True, central={"accuracy": 0.5 + 0.1 * r},
        train_metrics={c: {p.EPSILON: 1.5 * r + (c == "phone-b"), "delta": 1e-3} for c in CLIENTS if c != "hospital-a"},
        eval_metrics={c: {p.GLOBAL_ACCURACY: 0.5 + 0.05 * r, p.PERSONAL_ACCURACY: 0.55 + 0.05 * r} for c in CLIENTS})
        for r in (1, 2)]
    final = {c: {p.START_ACCURACY: start, p.GLOBAL_ACCURACY: 0.6, p.PERSONAL_ACCURACY: personal,
                 p.LOCAL_ONLY_ACCURACY: 0.5, p.NUM_EXAMPLES: 20} for c, (_, start, personal) in CLIENTS.items()}
    return p.FederationResult(
        clients={c: p.ClientInfo(c, kind, "site-a", 40) for c, (kind, *_) in CLIENTS.items()}, history=history,
        final=final, final_failed={}, retired={}, central_start={"accuracy": 0.5}, central_final={"accuracy": 0.7},
        central_dp={"enabled": False})


def _federation_folder(out: Path, data: Path, start: Path) -> Path:
    """A federation run folder as the server leaves it (reports, report.html, client state folders), without
    Flower; its config names the data folder and the start model, as a real run's does."""
    config = parse_config({"seed": 3, "data": {"root": str(data)}, "federation": {"start_checkpoint": str(start)},
                           "privacy": {"tiers": {"phone": {"enabled": True, "target_epsilon": 6.0,
                                                           "budget_epsilon": 12.0}}}})
    result = _federation_result()
    write_federation_report(build_federation_report(result, config), out)
    write_privacy_report(build_privacy_report(result, config), out)
    for client in CLIENTS:
        (out / "clients" / client).mkdir(parents=True)
        (out / "clients" / client / "privacy-ledger.jsonl").write_text("{}\n")
    write_html_report(out)
    return out


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real distillation tracked by the command line, then a federation from its student tracked beside it."""
    root = tmp_path_factory.mktemp("tracked")
    config = root / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    distill, store = root / "distill", root / "mlruns"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["distill", "--config", str(config), "--data-root", str(tiny_data), "--out", str(distill),
                     "--quiet", "--track-dir", str(store)])
    assert code == 0
    write_html_report(distill)
    federation = _federation_folder(root / "federation", tiny_data, distill / "student.pt")
    tracked = tracking.track_federation(federation, store, distill / "student.pt")
    return {"root": root, "distill": distill, "federation": federation, "store": store, "printed": printed.getvalue(),
            "federation_run": tracked}


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A reader of the file stores (MLflow opens one only with this opt-out, tracking.MLFLOW_ENV)."""
    for name, value in tracking.MLFLOW_ENV.items():
        monkeypatch.setenv(name, value)
    from mlflow import MlflowClient

    return lambda store: MlflowClient(tracking_uri=tracking.store_uri(store))


def _runs(reader: Any, store: Path) -> dict[str, Any]:
    """The live runs of the store's edgemri experiment, by stage."""
    mlflow = reader(store)
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    found = mlflow.search_runs([experiment])
    assert len(found) == len({r.data.tags[tracking.STAGE_TAG] for r in found})  # one run per folder
    return {r.data.tags[tracking.STAGE_TAG]: r for r in found}


def _steps(reader: Any, store: Path, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in reader(store).get_metric_history(run.info.run_id, key))


def test_distill_track_logs_the_config_curves_test_metrics_and_tags(runs: dict[str, Any], client: Any) -> None:
    run = _runs(client, runs["store"])["distillation"]
    report = json.loads((runs["distill"] / "report.json").read_text())
    params, tags = run.data.params, run.data.tags
    assert params["seed"] == "0" and params["seeds"] == "0" and params["distill.kd.temperature"] == "2.0"
    assert params["distill.teacher.train.epochs"] == "2" and params["federation.method"] == "fedavg-ft"
    assert params["data.root"] == tracking.PATH_VALUE and params["tracking.dir"] == tracking.PATH_VALUE
    for stage in ("teacher", "baseline", "kd"):
        history = report["models"][stage]["per_seed"][0]["history"]
        for name in tracking.HISTORY:
            assert _steps(client, runs["store"], run, f"{stage}/{name}") == [(e["epoch"], e[name]) for e in history]
    assert run.data.metrics["test/kd/accuracy"] == report["models"]["kd"]["test_accuracy"]["mean"]
    assert tags[tracking.FINGERPRINT_TAG] == report["data"]["fingerprint"]
    assert tags[tracking.STUDENT_TAG] == file_sha256(runs["distill"] / "student.pt")
    logged = {item.path for item in client(runs["store"]).list_artifacts(run.info.run_id)}
    assert {"curves.png", "confusion.png", "reliability.png", "coverage.png"} <= logged
    assert not logged & {"report.json", "report.md", "report.html"}  # they name the data folder: left out
    assert "report.json (names a folder of the run or of its data)" in tags[tracking.LEFT_OUT_TAG]
    printed = runs["printed"]
    assert f"tracked: MLflow run {run.info.run_id}" in printed
    assert f"mlflow ui --backend-store-uri {runs['store'].resolve().as_uri()}" in printed.splitlines()[-1]


def test_a_federation_logs_rounds_tiers_and_epsilon_as_a_child_of_its_distillation(runs: dict[str, Any],
                                                                                    client: Any) -> None:
    found = _runs(client, runs["store"])
    run, parent = found["federation"], found["distillation"]
    assert runs["federation_run"].run_id == run.info.run_id
    assert run.data.tags[tracking.PARENT_TAG] == parent.info.run_id == runs["federation_run"].parent_run_id
    assert run.data.tags[tracking.START_TAG] == parent.data.tags[tracking.STUDENT_TAG]
    assert run.data.params["seed"] == "3" and run.data.params["federation.start_checkpoint"] == tracking.PATH_VALUE
    store = runs["store"]
    assert _steps(client, store, run, "central/accuracy") == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert [step for step, _ in _steps(client, store, run, "phone/personalized_accuracy")] == [1, 2]
    assert _steps(client, store, run, "privacy/phone/epsilon_max") == [(1, 2.5), (2, 4.0)]
    assert _steps(client, store, run, "privacy/phone/epsilon_median") == [(1, 2.0), (2, 3.5)]
    metrics = run.data.metrics
    assert metrics["local/phone/personalized_mean"] == pytest.approx(0.575)
    assert "local/phone/personalized_minus_start_p50" in metrics and "local/hospital/personalized_minus_start_helped" \
        in metrics
    logged = {item.path for item in client(store).list_artifacts(run.info.run_id)}
    assert {"federation.png", "privacy.png", "privacy.json", "federation.md", "privacy.md"} <= logged
    assert not logged & {"federation.json", "report.html"}  # the config and the page name the data and run folders


def _store_files(store: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(store.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


def _leaks(store: Path, data: Path, run_folders: list[Path]) -> list[str]:
    """Every file of the store (params, tags, metrics, meta.yaml, artifacts) that holds a data folder's path, one
    of its image files' names or paths, a run folder's absolute path or a client's folder."""
    secrets = {str(data), str(data.resolve())}
    for image in data.rglob("*.jpg"):
        secrets |= {image.name, image.relative_to(data).as_posix()}
    for folder in run_folders:
        secrets |= {str(folder.resolve()), *(str(c.resolve()) for c in (folder / "clients").glob("*"))}
    return [f"{path.relative_to(store)}: {secret}" for path, content in _store_files(store)
            for secret in sorted(secrets) if secret.encode() in content]


def test_no_scan_data_folder_run_folder_or_client_path_is_ever_logged(runs: dict[str, Any], tiny_data: Path) -> None:
    files = [path for path, _ in _store_files(runs["store"])]
    assert any(path.parent.name == "params" for path in files) and any(path.name == "meta.yaml" for path in files)
    assert any(path.parent.name == "artifacts" for path in files)
    assert _leaks(runs["store"], tiny_data, [runs["distill"], runs["federation"]]) == []


def test_the_privacy_check_finds_a_leak(runs: dict[str, Any], tiny_data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a path-valued config entry logged as itself, the walk above would fail."""
    monkeypatch.setattr(tracking, "_is_path", lambda key, value: False)
    tracking.track_distillation(runs["distill"], tmp_path / "mlruns")
    assert any(f"data.root: {tiny_data}" in leak for leak in _leaks(tmp_path / "mlruns", tiny_data, []))


def test_tracking_again_updates_the_same_runs_and_a_changed_folder_replaces_its_run(runs: dict[str, Any],
                                                                                    tmp_path: Path,
                                                                                    client: Any) -> None:
    distill, federation = (shutil.copytree(runs[name], tmp_path / name) for name in ("distill", "federation"))
    store, start = tmp_path / "mlruns", distill / "student.pt"
    first = tracking.track_federation(federation, store, start), tracking.track_distillation(distill, store)
    assert first[0].parent_run_id is None  # tracked before its distillation: the distillation adopts it
    again = tracking.track_federation(federation, store, start), tracking.track_distillation(distill, store)
    assert [t.run_id for t in again] == [t.run_id for t in first]
    found = _runs(client, store)
    assert found["federation"].data.tags[tracking.PARENT_TAG] == found["distillation"].info.run_id
    assert len(_steps(client, store, found["distillation"], "kd/val_loss")) == 2  # each epoch once

    report = json.loads((federation / "federation.json").read_text())
    report["config"]["federation"]["rounds"] = 9
    (federation / "federation.json").write_text(json.dumps(report))
    changed = tracking.track_federation(federation, store, start)
    found = _runs(client, store)
    assert changed.run_id != first[0].run_id
    assert client(store).get_run(first[0].run_id).info.lifecycle_stage == "deleted"  # MLflow's delete: hidden
    assert found["federation"].info.run_id == changed.run_id
    assert found["federation"].data.params["federation.rounds"] == "9"
    assert changed.parent_run_id == found["distillation"].info.run_id


def test_a_tracking_failure_is_one_error_that_keeps_the_run(runs: dict[str, Any], tmp_path: Path) -> None:
    not_a_folder = tmp_path / "mlruns"
    not_a_folder.write_text("")
    before = {p.name: p.read_bytes() for p in runs["distill"].glob("*.json")}
    with pytest.raises(tracking.TrackingError, match="the run itself is complete and saved in") as failed:
        tracking.track_distillation(runs["distill"], not_a_folder)
    assert "\n" not in str(failed.value)
    assert {p.name: p.read_bytes() for p in runs["distill"].glob("*.json")} == before


def test_track_without_mlflow_is_one_error_line_before_any_work(tiny_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tracking, "find_spec", lambda name: None)
    out = tmp_path / "run"
    assert main(["distill", "--config", str(QUICKSTART), "--data-root", str(tiny_data), "--out", str(out),
                 "--track"]) == 2
    assert "pip install 'edgemri[track]'" in one_error_line(capsys)
    assert not out.exists()


def test_config_params_never_hold_a_path() -> None:
    params = tracking.config_params({"data": {"root": "/hospital/scans", "cache_dir": None, "synth_preset": "clinics"},
                                     "distill": {"kd": {"transfer_root": "Unlabeled", "views": 8}},
                                     "federation": {"compare_methods": ["fedper", "ditto"], "source_sites": ["a/b"]},
                                     "privacy": {"budget_overrides": {}}})
    assert params == {"data.root": "(path)", "data.cache_dir": "None", "data.synth_preset": "clinics",
                      "distill.kd.transfer_root": "(path)", "distill.kd.views": "8",
                      "federation.compare_methods": "fedper,ditto", "federation.source_sites": "(path)",
                      "privacy.budget_overrides": "{}"}


def test_tracking_dir_must_be_a_local_folder() -> None:
    with pytest.raises(ConfigError, match=r"'tracking.dir' has value 'http://host:5000'; allowed: null or a local"):
        parse_config({"tracking": {"dir": "http://host:5000"}})


def test_the_command_line_and_the_pipeline_do_not_import_mlflow() -> None:
    code = ("import sys; from edgemri.main import build_parser; build_parser(); import edgemri.simulation.pipeline, "
            "edgemri.reports.tracking; print('mlflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
