from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.splits import server_client_split, stratified_split
from edgemri.core.errors import EdgemriError
from edgemri.core.registries import parse_config
from edgemri.core.training import distill as distill_module
from edgemri.core.training.checkpoint import load_checkpoint
from edgemri.core.training.distill import TeacherUnavailableError, run_distillation
from edgemri.core.training.train import ResumeMismatchError, shuffled_batches

FAST = {
    "seed": 0,
    "data": {"val_fraction": 0.2},
    "distill": {
        "teacher": {"name": "vgg16-slim", "width": 0.0625, "train": {"epochs": 2, "batch_size": 32}},
        "baseline": {"epochs": 2, "batch_size": 16, "weight_decay": 0.01},
        "kd": {"temperature": 2.0, "alpha": 0.5, "train": {"epochs": 2, "batch_size": 16}},
    },
}


def _config(**distill_changes: object):
    data = json.loads(json.dumps(FAST))
    data["distill"].update(distill_changes)
    return parse_config(data)


def test_teacher_runs_once_per_training_image_and_selection_never_sees_testing(
        tiny_data: Path, tmp_path: Path, distill_fits: list) -> None:
    dataset = load_dataset(tiny_data)
    results, _ = run_distillation(_config(), dataset, tmp_path / "run")
    seen_selection_sets = [kwargs["val"] for _, kwargs in distill_fits]
    result = results[0]
    server, clients = server_client_split(dataset.train, 0.5, seed=0)  # the clients' half is never seen
    assert not set(server.tolist()) & set(clients.tolist())
    train_part, val_part = stratified_split(dataset.train.labels[server], 0.2, seed=0)
    train_images = len(train_part)
    assert result.train_images == train_images == len(server) - len(val_part)
    assert result.teacher_forward_images == train_images
    assert len(seen_selection_sets) == 3
    val_idx = server[val_part]
    for selection in seen_selection_sets:
        assert torch.equal(selection.inputs, dataset.train.images[val_idx])
        assert torch.equal(selection.labels, dataset.train.labels[val_idx])


def test_paper_compat_selects_on_testing_and_says_so(tiny_data: Path, tmp_path: Path, distill_fits: list) -> None:
    dataset = load_dataset(tiny_data)
    results, _ = run_distillation(_config(paper_compat=True), dataset, tmp_path / "run")
    selections = [kwargs for _, kwargs in distill_fits]
    assert all(torch.equal(kw["val"].labels, dataset.test.labels) for kw in selections)
    assert all(kw["selected_on"] == "Testing (paper-compat)" for kw in selections)
    metrics = load_checkpoint(results[0].stages["kd"].checkpoint).metrics
    assert metrics["paper_compat"] is True and metrics["selected_on"] == "Testing (paper-compat)"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemri", *args], capture_output=True, text=True, cwd=cwd)


def test_distill_cli_end_to_end_writes_report_and_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    out = tmp_path / "run"
    result = _cli("distill", "--config", str(config), "--data-root", str(tiny_data), "--out", str(out),
                  "--seeds", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    assert report["teacher_forward_images"] == report["data"]["train_images_per_seed"]
    kd = report["models"]["kd"]
    assert kd["trainable_params"] == 12_628 and kd["estimated_size_mb"] == 2.25
    assert len(kd["test_accuracy"]["values"]) == 2
    assert 0.0 <= kd["test_accuracy"]["mean"] <= 1.0
    assert report["config"]["distill"]["kd"]["temperature"] == 2.0
    assert report["versions"]["torch"].startswith("2.14.1")
    markdown = (out / "report.md").read_text()
    assert "| KD student | 92.15 |" in markdown and "gap that KD closes" in markdown
    for png in ("curves.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = load_checkpoint(out / "student.pt")
    assert student.model == "student" and student.role == "kd" and student.seed == 0
    assert student.data_fingerprint == report["data"]["fingerprint"]
    assert student.config["distill"]["kd"]["alpha"] == 0.5
    assert student.metrics["test"]["accuracy"] == report["models"]["kd"]["per_seed"][0]["test"]["accuracy"]
    student.build()(torch.zeros(1, 3, 128, 128))

    again = _cli("distill", "--config", str(config), "--data-root", str(tiny_data), "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr


class _Interrupt(Exception):
    pass


def test_resume_finishes_an_interrupted_distillation(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = load_dataset(tiny_data)
    out = tmp_path / "run"
    reference, _ = run_distillation(_config(), dataset, tmp_path / "reference")
    # An interrupted run: teacher and baseline done, KD stopped at the start of its second epoch.
    real_fit, epochs = distill_module.fit, {"n": 0}

    def interrupted_fit(model, train, **kwargs):
        def batches(n: int, batch_size: int, generator: torch.Generator):
            epochs["n"] += 1
            if epochs["n"] == 2:
                raise _Interrupt
            return shuffled_batches(n, batch_size, generator)

        return real_fit(model, train, **kwargs, **({"batches": batches} if kwargs["desc"] == "kd" else {}))

    monkeypatch.setattr(distill_module, "fit", interrupted_fit)
    with pytest.raises(_Interrupt):
        run_distillation(_config(), dataset, out)
    monkeypatch.undo()
    assert not (out / "seed-0" / "kd.pt").exists()
    assert load_checkpoint(out / "seed-0" / "kd.state.pt", kind="training").step == 1
    resumed, _ = run_distillation(_config(), dataset, out, resume=True)
    assert [h["epoch"] for h in resumed[0].stages["kd"].history] == [1, 2]
    assert resumed[0].stages["teacher"].train_seconds == 0.0  # loaded, not retrained
    curves = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed[0].stages["teacher"].history]
    assert curves == [{k: v for k, v in h.items() if k != "seconds"} for h in reference[0].stages["teacher"].history]
    assert resumed[0].stages["kd"].test["accuracy"] == reference[0].stages["kd"].test["accuracy"]

    # --resume with other settings: one line naming the setting, never a shape-mismatch traceback.
    changed = _config(kd={"temperature": 3.0, "alpha": 0.5, "train": {"epochs": 2, "batch_size": 16}})
    with pytest.raises(ResumeMismatchError, match=r"distill\.kd\.temperature: 2\.0 saved, 3\.0 now") as err:
        run_distillation(changed, dataset, out, resume=True)
    assert "\n" not in str(err.value) and "--resume" in str(err.value)


def test_unavailable_imagenet_weights_are_a_project_error(tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    config = _config(teacher={"name": "vgg16-imagenet", "train": {"epochs": 1}})
    with pytest.raises(EdgemriError, match="VGG16 ImageNet weights .* vgg16-slim") as err:
        run_distillation(config, load_dataset(tiny_data), tmp_path / "run")
    assert isinstance(err.value, TeacherUnavailableError) and "\n" not in str(err.value)


def test_missing_or_corrupt_teacher_checkpoint_is_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    for name, content in (("missing.pt", None), ("corrupt.pt", b"not a checkpoint at all")):
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        data = json.loads(json.dumps(FAST))
        data["distill"]["teacher"]["checkpoint"] = str(path)
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(data))
        result = _cli("distill", "--config", str(config), "--data-root", str(tiny_data),
                      "--out", str(tmp_path / f"out-{name}"))
        assert result.returncode == 2
        assert str(path) in result.stderr and "Traceback" not in result.stderr
        assert ("not found" in result.stderr) if content is None else ("not a readable" in result.stderr)


def test_config_with_unknown_key_fails_before_training(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("distill:\n  kd:\n    temprature: 2\n")
    result = _cli("distill", "--config", str(config), "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "unknown config key 'distill.kd.temprature'" in result.stderr
    assert "temperature, alpha, train" in result.stderr


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_the_students_of_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))

    def distill(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "edgemri", "distill", "--config", str(config), "--data-root", str(tiny_data),
             "--out", str(out), "--quiet", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal

    assert distill(tmp_path / "reference").wait(timeout=600) == 0
    out = tmp_path / "run"
    process = distill(out)
    deadline = time.monotonic() + 600
    while not (out / "seed-0" / "teacher.pt").exists():  # Ctrl-C once the teacher is saved: mid-baseline
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert not (out / "seed-0" / "kd.pt").exists()
    assert distill(out, "--resume").wait(timeout=600) == 0
    for student in ("baseline", "kd"):
        resumed = load_checkpoint(out / "seed-0" / f"{student}.pt").state_dict
        reference = load_checkpoint(tmp_path / "reference" / "seed-0" / f"{student}.pt").state_dict
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), student
