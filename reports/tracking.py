"""Experiment tracking: a finished run folder's reports logged into MLflow's local file store.

One MLflow run per run folder, in one experiment (``edgemri``) of a file store: a folder, offline, no server;
``mlflow ui --backend-store-uri file:///...`` shows it (``ui_command``). Nothing here runs while a model trains:
the command line and the demo call it once a stage has finished and its reports are written, so a tracking
failure never touches the run's results. MLflow is imported only here, only when tracking is asked for.

Logged, from the stage's JSON reports:
- a distillation: the config as params, each stage's train/val loss and accuracy per epoch (step = epoch) and its
  test metrics, the data fingerprint and the student's sha256 as tags;
- a federation: the config as params, the global model's central metrics per round (step = round; round 0 is
  the start model), each tier's accuracy per round, the per-tier summaries and percentiles of the clients' gains
  (on the local test splits and, where the clients had them, the site pools), epsilon spent per tier per round,
  and the start model's sha256 as a tag; its run is a child (``mlflow.parentRunId``) of the distillation run
  whose student it started from, matched by that sha256;
- artifacts: the stage's own reports and figures, and the exported models the caller names.

Never logged: a scan, a file name of the data, a path (the rule the clients' messages follow). A config value
that is a path (a key ending in root, dir, checkpoint, path or file, or text that is not a plain name) is logged
as ``(path)``. Artifacts come from an allowlist of report files (no picture of scans is on it), and each is left
out, never rewritten, when its text names a folder of the run or of its data, an absolute path or an image file,
or, for report.html, embeds an image that is not one of the logged figures; the ``edgemri.artifacts_left_out``
tag names what was left out and why.

Re-tracking a folder finds its MLflow run by the id the folder keeps in ``tracking-id.json`` (made on its first
tracking; an id, not the folder's path, so a moved folder is still the same run): what is already logged stays,
what is missing is added; a folder whose params, metrics or files changed since gets a fresh run in place of the
old one (MLflow's delete: hidden, removed for good by ``mlflow gc``).
"""

from __future__ import annotations

import base64
import math
import os
import re
import statistics
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_json
from edgemri.core.untrusted import check_record, read_json, text
from edgemri.models import file_sha256
from edgemri.reports.common import flat_items
from edgemri.reports.html import PAGE

EXPERIMENT = "edgemri"
ID_FILE = "tracking-id.json"
FOLDER_TAG = "edgemri.run_folder_id"
STAGE_TAG = "edgemri.stage"
STUDENT_TAG = "edgemri.student_sha256"
START_TAG = "edgemri.start_sha256"
FINGERPRINT_TAG = "edgemri.data_fingerprint"
LEFT_OUT_TAG = "edgemri.artifacts_left_out"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: its UI nests a run under its parent
# MLflow 3.x keeps its file store "in maintenance mode" and refuses to open one unless this opt-out is set (read
# in mlflow/store/tracking/file_store.py); the issue asks for that store: a folder, offline. Telemetry off: MLflow
# otherwise reports usage over the network, which an offline tool must not attempt.
MLFLOW_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
INSTALL_HINT = "pip install 'edgemri[track]'"

PATH_VALUE = "(path)"
PATH_KEY_ENDINGS = ("root", "dir", "checkpoint", "path", "file")
PLAIN_NAME = re.compile(r"[\w.+-]{0,64}")  # a method, a preset, a tier: anything else may be a path
HISTORY = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # core/training/train.EpochRecord
DISTILL_FILES = ("report.json", "report.md", "curves.png", "confusion.png", "reliability.png", "coverage.png", PAGE)
FEDERATION_FILES = ("federation.json", "federation.md", "federation.png", "privacy.json", "privacy.md",
                    "privacy.png", PAGE)
TEXT_SUFFIXES = (".json", ".md", ".html")
EXPORTS_FOLDER = "exports"  # where exported models go among a run's artifacts
# A POSIX absolute path of two or more parts (not a URL's "//", not "a/b"), a home or drive path, a file URI.
ABSOLUTE_PATH = re.compile(r"(?<![\w.+:/\\-])(?:/|~/|[A-Za-z]:[\\/])[\w.-]+[/\\]|file:/")
IMAGE_NAME = re.compile(r"[\w.-]+\.(?:jpe?g|png|bmp|gif|tiff?|webp|dcm|nii)\b", re.IGNORECASE)
EMBEDDED_IMAGE = re.compile(r"data:image/[\w.+-]+;base64,([A-Za-z0-9+/=]*)")
FOLDER_ID = re.compile(r"[0-9a-f]{32}")


class TrackingError(EdgemriError):
    """Tracking was asked for and cannot be done: MLflow missing, a store that cannot be written, a bad report."""


def require_mlflow() -> None:
    """Fail before any work when tracking is asked for and MLflow is not installed (a check, not an import)."""
    if find_spec("mlflow") is None:
        raise TrackingError(f"experiment tracking needs MLflow, which is not installed: {INSTALL_HINT}")


def store_uri(store: Path) -> str:
    """The file store's URI, absolute (MLflow records its artifacts' locations from it)."""
    return Path(store).resolve().as_uri()


def ui_command(store: Path) -> str:
    """The command that shows the store in a browser (http://127.0.0.1:5000), offline."""
    env = " ".join(f"{name}={value}" for name, value in MLFLOW_ENV.items())
    return f"{env} mlflow ui --backend-store-uri {store_uri(store)}"


@dataclass
class Record:
    """What one run folder logs: params, metrics by (key, step), tags, artifacts (file, folder among the run's
    artifacts or None) and the report files left out, with why."""

    stage: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[tuple[str, int], float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def metric(self, value: Any, *parts: str, step: int = 0) -> None:
        """One metric; a missing or non-finite value (NaN: no client had it; an unbounded epsilon) is skipped."""
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            self.metrics[(_key(*parts), int(step))] = float(value)


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    store: Path
    parent_run_id: str | None
    left_out: dict[str, str]

    def lines(self) -> list[str]:
        """What was tracked where, and what was left out, to print."""
        child = f", a child of the distillation run {self.parent_run_id}" if self.parent_run_id else ""
        lines = [f"tracked: MLflow run {self.run_id} (experiment {EXPERIMENT}{child}) in {self.store}"]
        if self.left_out:
            lines.append("  not logged: " + "; ".join(f"{name} ({why})" for name, why in self.left_out.items()))
        return lines


def _key(*parts: str) -> str:
    """A metric or param key MLflow accepts: the parts joined by '/', other characters as '_'."""
    return "/".join(re.sub(r"[^\w.-]", "_", str(part)) for part in parts)


# ---------------------------------------------------------------- params: the config, no path


def _is_path(key: str, value: Any) -> bool:
    """A config value that is, or may be, a path: text (or a list) under a key whose name says so, or text that is
    not a plain name. Numbers, booleans, null and an empty section are not."""
    if not isinstance(value, str | list):
        return False
    items = value if isinstance(value, list) else [value]
    return key.rsplit(".", 1)[-1].endswith(PATH_KEY_ENDINGS) or not all(
        isinstance(item, bool | int | float) or (isinstance(item, str) and PLAIN_NAME.fullmatch(item))
        for item in items)


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The config as MLflow params (dotted keys); a path-valued entry as ``(path)``, never as itself."""
    params = {}
    for key, value in flat_items(config):
        if _is_path(key, value):
            value = PATH_VALUE
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        params[_key(key)] = str(value)
    return params


def _path_values(config: Mapping[str, Any]) -> list[str]:
    """Every path-valued text of the config (what the params leave out), to keep out of the artifacts too."""
    found = []
    for key, value in flat_items(config):
        if _is_path(key, value):
            found += [str(item) for item in (value if isinstance(value, list) else [value])]
    return found


# ---------------------------------------------------------------- reading the reports


def _report(path: Path, kind: str, *, required: bool = True) -> dict[str, Any] | None:
    """A report JSON of the run folder, checked to be the report ``kind`` names."""
    if not path.is_file() and not required:
        return None
    report = read_json(path, TrackingError, nonfinite=True)
    found = report.get("kind") if isinstance(report, dict) else None
    if not isinstance(found, str) or not found.startswith(kind + "/"):
        raise TrackingError(f"{path} has kind {str(found)[:60]!r}; expected {kind}/<version>")
    return report


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A report that lacks a key or holds a value of the wrong type is one TrackingError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise TrackingError(f"{path} is not a report this edgemri can track ({type(err).__name__}: "
                            f"{str(err)[:80]})") from None


def _version_tags(report: Mapping[str, Any]) -> dict[str, str]:
    versions = report.get("versions")
    return {f"edgemri.versions.{_key(name)}": str(v) for name, v in versions.items()} \
        if isinstance(versions, dict) else {}


def distillation_record(run_dir: Path, exports: Sequence[Path] = ()) -> Record:
    """What a distillation run folder logs (report.json, student.pt, the figures) and ``exports``, the models
    exported from its student."""
    path = run_dir / "report.json"
    report = _report(path, "edgemri.distillation-report")
    record = Record("distillation")
    with _reading(path):
        record.params.update(config_params(report["config"]))
        record.params["seeds"] = ",".join(map(str, report["seeds"]))
        first = report["seeds"][0]  # its KD student is the run's student.pt: its curves get the plain keys
        for stage in report["stages"]:
            model = report["models"][stage]
            for run in model["per_seed"]:
                seed = () if run["seed"] == first else (f"seed-{run['seed']}",)
                for epoch in run["history"]:
                    for name in HISTORY:
                        record.metric(epoch.get(name), stage, name, *seed, step=epoch["epoch"])
            for name, stats in model.items():
                if name.startswith("test_") and isinstance(stats, dict):
                    record.metric(stats.get("mean"), "test", stage, name.removeprefix("test_"))
        record.metric(report.get("gap_closed"), "gap_closed")
        record.tags[FINGERPRINT_TAG] = str(report["data"]["fingerprint"])
        record.tags.update(_version_tags(report))
        forbidden = [*_path_values(report["config"]), str(report["data"].get("root") or "")]
    student = run_dir / "student.pt"
    if student.is_file():
        record.tags[STUDENT_TAG] = file_sha256(student)
    _choose_artifacts(record, run_dir, DISTILL_FILES, forbidden, exports)
    return record


def _section_metrics(record: Record, where: str, section: Mapping[str, Any]) -> None:
    """One section of a federation report (local test splits or site pools): each group's mean and worst accuracy
    per model, and per tier the percentiles of the clients' paired gains and the shares helped and hurt."""
    for group, columns in section["summary"].items():
        for column, stats in columns.items():
            for which in ("mean", "worst"):
                record.metric(stats[which], where, group, f"{column}_{which}")
    spread = section.get("distribution") or {"groups": {}}
    for tier, comparisons in spread["groups"].items():
        for comparison, values in comparisons.items():
            if not isinstance(values, dict) or "percentiles" not in values:
                continue  # the tier's client count and its worst clients by name: not metrics
            name = comparison.replace(" - ", "_minus_")
            for point in values["percentiles"]:
                record.metric(point["value"], where, tier, f"{name}_p{point['q']:g}")
            for share in ("helped", "hurt"):
                record.metric(values[share]["mean"], where, tier, f"{name}_{share}")


def _spent_by(client: Mapping[str, Any], round_: int) -> float:
    """A client's cumulative epsilon after ``round_`` (0 before its first trained round)."""
    return max((r["epsilon"] for r in client["epsilon_per_round"] if r["round"] <= round_), default=0.0)


def _privacy_metrics(record: Record, privacy: Mapping[str, Any]) -> None:
    """Epsilon spent per tier (by its DP-SGD clients): the median and the maximum after each round, the clients
    at or above their budget; the client-level epsilon where the server added noise."""
    tiers: dict[str, list[Mapping[str, Any]]] = {}
    for client in privacy["sample_level"].values():
        if client["dp"]:
            tiers.setdefault(client["kind"], []).append(client)
    for tier, clients in tiers.items():
        for round_ in sorted({r["round"] for c in clients for r in c["epsilon_per_round"]}):
            spent = [_spent_by(c, round_) for c in clients]
            record.metric(statistics.median(spent), "privacy", tier, "epsilon_median", step=round_)
            record.metric(max(spent), "privacy", tier, "epsilon_max", step=round_)
        record.metric(sum(c["remaining_epsilon"] <= 0 for c in clients), "privacy", tier, "at_or_above_budget")
    if privacy["client_level"].get("enabled"):
        record.metric(privacy["client_level"].get("epsilon"), "privacy", "client_level_epsilon")


def federation_record(run_dir: Path, start: Path | None = None) -> Record:
    """What a federation run folder logs (federation.json, privacy.json, the figures); ``start``: the model it
    started from, whose sha256 links it to its distillation."""
    path = run_dir / "federation.json"
    report = _report(path, "edgemri.federation-report")
    record = Record("federation")
    with _reading(path):
        record.params.update(config_params(report["config"]))
        rounds, central = report["rounds"], report["central"]
        for step, metrics in ((0, central["start"]), *zip(rounds, central["per_round"], strict=True)):
            for name, value in (metrics or {}).items():
                if name != "n":
                    record.metric(value, "central", name, step=step)
        for name, value in central["final"].items():
            if name != "n":
                record.metric(value, "central_final", name)
        for round_, accuracy, taking_part in zip(rounds, report["federated_val"], report["participation"],
                                                 strict=True):
            record.metric(accuracy, "federated_val_accuracy", step=round_)
            record.metric(len(taking_part["trained"]), "clients_trained", step=round_)
        for group, curves in report["curves"].items():
            for model, values in curves.items():
                for round_, value in zip(rounds, values, strict=True):
                    record.metric(value, group, f"{model}_accuracy", step=round_)
        record.metric(report.get("best_round"), "best_round")
        _section_metrics(record, "local", report)
        if report.get("pool"):
            _section_metrics(record, "pool", report["pool"])
        record.tags.update(_version_tags(report))
        forbidden = [*_path_values(report["config"]), *([str(start)] if start else [])]
    privacy = _report(run_dir / "privacy.json", "edgemri.privacy-report", required=False)
    if privacy is not None:
        with _reading(run_dir / "privacy.json"):
            _privacy_metrics(record, privacy)
    if start is not None and start.is_file():
        record.tags[START_TAG] = file_sha256(start)
    _choose_artifacts(record, run_dir, FEDERATION_FILES, forbidden)
    return record


# ---------------------------------------------------------------- artifacts: nothing that names a path or a scan


def _known(paths: Sequence[str]) -> re.Pattern[str]:
    """One pattern for ``paths`` (folders of the run and of its data), each as written when it has a separator and
    as an absolute path, matched as whole tokens of a file's bytes read one byte a character (latin-1), so a
    binary file and a UTF-8 name are matched alike. A bare relative name ("data") alone is not searched for: it is
    also a word, and says nothing of where the folder is."""
    written = [p for p in paths if p.strip() and ("/" in p or "\\" in p)]
    absolute = [str(Path(p).resolve()) for p in paths if p.strip()]
    needles = sorted({n.encode("utf-8", "surrogateescape").decode("latin-1") for n in written + absolute},
                     key=len, reverse=True)
    return re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])" for n in needles))


def _why_left_out(path: Path, data: bytes, known: re.Pattern[str], figures: Mapping[str, bytes]) -> str | None:
    """Why a report file must not be logged, or None. Text files are searched for absolute paths and image file
    names (but the stage's own figures); a page must embed only those figures."""
    if known.search(data.decode("latin-1")):
        return "names a folder of the run or of its data"
    if path.suffix not in TEXT_SUFFIXES:
        return None
    content = data.decode("utf-8", "replace")
    if path.name == PAGE:
        images = [base64.b64decode(b64) for b64 in EMBEDDED_IMAGE.findall(content)]
        if any(image not in figures.values() for image in images):
            return "embeds an image that is not one of the logged figures"
        content = EMBEDDED_IMAGE.sub("data:", content)
    if ABSOLUTE_PATH.search(content):
        return "names an absolute path"
    if any(name not in figures for name in IMAGE_NAME.findall(content)):
        return "names an image file"
    return None


def _choose_artifacts(record: Record, run_dir: Path, names: Sequence[str], forbidden: Sequence[str],
                      exports: Sequence[Path] = ()) -> None:
    """The report files of ``names`` that the folder holds, and ``exports``, each logged only when it passes
    ``_why_left_out``; figures first, since a page may embed only figures that are logged."""
    root = Path(run_dir)
    known = _known([*forbidden, str(root)])
    present = [root / name for name in names if (root / name).is_file()]
    figures: dict[str, bytes] = {}
    for path in sorted(present, key=lambda p: p.suffix != ".png"):
        data = path.read_bytes()
        why = _why_left_out(path, data, known, figures)
        if why is None:
            record.artifacts.append((path, None))
            if path.suffix == ".png":
                figures[path.name] = data
        else:
            record.left_out[path.name] = why
    for export in exports:
        if export.is_file():
            why = _why_left_out(export, export.read_bytes(), known, figures)
            if why is None:
                record.artifacts.append((export, EXPORTS_FOLDER))
            else:
                record.left_out[f"{EXPORTS_FOLDER}/{export.name}"] = why
    record.tags[LEFT_OUT_TAG] = "; ".join(f"{n} ({why})" for n, why in record.left_out.items()) or "none"


# ---------------------------------------------------------------- logging


def _folder_id(run_dir: Path) -> str:
    """The run folder's own id (``tracking-id.json``, written on its first tracking): what finds its MLflow run
    again, wherever the folder is moved."""
    path = run_dir / ID_FILE
    if path.is_file():
        saved = check_record(read_json(path, TrackingError), {"id": text(32, FOLDER_ID, allowed="32 hex digits")},
                             str(path), TrackingError, extra=True)
        return saved["id"]
    folder_id = uuid.uuid4().hex
    write_json(path, {"kind": "edgemri.tracking-id/1", "id": folder_id})
    return folder_id


@contextmanager
def _mlflow(run_dir: Path, store: Path) -> Iterator[Any]:
    """``mlflow`` (imported with MLFLOW_ENV set, which stays set while the caller works) and a client on the file
    store in ``store``; any MLflow or file-system failure is one TrackingError that says the run itself is saved."""
    saved = {name: os.environ.get(name) for name in MLFLOW_ENV}
    os.environ.update(MLFLOW_ENV)
    try:
        try:
            import mlflow
            import mlflow.entities
            import mlflow.exceptions
        except ImportError as err:
            raise TrackingError(f"MLflow does not import ({err}): {INSTALL_HINT}") from None
        try:
            yield mlflow, mlflow.MlflowClient(tracking_uri=store_uri(store))
        except (mlflow.exceptions.MlflowException, OSError) as err:
            reason = " ".join(str(err).split())[:200]
            raise TrackingError(f"could not track {run_dir} in {store}: {reason}; the run itself is complete "
                                f"and saved in {run_dir}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _experiment(client: Any) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return client.create_experiment(EXPERIMENT)
    if experiment.lifecycle_stage == "deleted":  # deleted in the UI: tracking again brings it back
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _tagged(client: Any, experiment: str, tag: str, value: str, **options: Any) -> list[Any]:
    """The experiment's live runs whose ``tag`` is ``value``."""
    return client.search_runs([experiment], f"tags.`{tag}` = '{value}'", **options)


def _run(client: Any, experiment: str, folder_id: str, record: Record) -> tuple[str, set[str], set[tuple[str, int]]]:
    """The folder's MLflow run, and the params and metric points it already holds: the one tracked before while
    everything it holds agrees with ``record`` (then only what is missing is added), else a new run."""
    found = _tagged(client, experiment, FOLDER_TAG, folder_id, max_results=1)
    if found:
        run = found[0]
        run_id = run.info.run_id
        points = {(key, m.step): m.value for key in run.data.metrics
                  for m in client.get_metric_history(run_id, key)}
        files = {path.name for path, folder in record.artifacts if folder is None} | \
            {folder for _, folder in record.artifacts if folder}
        if all(record.params.get(k) == v for k, v in run.data.params.items()) and \
                all(record.metrics.get(point) == value for point, value in points.items()) and \
                {item.path for item in client.list_artifacts(run_id)} <= files:
            return run_id, set(run.data.params), set(points)
        client.delete_run(run_id)  # the folder changed since: a fresh run, not a mix of the two
    run = client.create_run(experiment, run_name=f"{record.stage}-{folder_id[:8]}",
                            tags={FOLDER_TAG: folder_id, STAGE_TAG: record.stage})
    return run.info.run_id, set(), set()


def _link(client: Any, experiment: str, run_id: str, record: Record) -> str | None:
    """A federation under the distillation whose student it started from; a distillation over the federations
    already tracked from its student (whichever was tracked first). Returns the federation's parent."""
    if STUDENT_TAG in record.tags:
        for child in _tagged(client, experiment, START_TAG, record.tags[STUDENT_TAG]):
            client.set_tag(child.info.run_id, PARENT_TAG, run_id)
        return None
    if START_TAG not in record.tags:
        return None
    parents = _tagged(client, experiment, STUDENT_TAG, record.tags[START_TAG], max_results=1,
                      order_by=["attributes.start_time DESC"])
    if not parents:
        return None
    client.set_tag(run_id, PARENT_TAG, parents[0].info.run_id)
    return parents[0].info.run_id


def _log(run_dir: Path, store: Path, record: Record) -> TrackedRun:
    folder_id = _folder_id(run_dir)
    with _mlflow(run_dir, store) as (mlflow, client):
        experiment = _experiment(client)
        run_id, had_params, had_points = _run(client, experiment, folder_id, record)
        now = int(time.time() * 1000)
        entities = mlflow.entities
        client.log_batch(
            run_id,
            metrics=[entities.Metric(key, value, now, step) for (key, step), value in record.metrics.items()
                     if (key, step) not in had_points],
            params=[entities.Param(key, value) for key, value in record.params.items() if key not in had_params],
            tags=[entities.RunTag(key, value) for key, value in record.tags.items()])
        for path, folder in record.artifacts:
            client.log_artifact(run_id, str(path), folder)
        parent = _link(client, experiment, run_id, record)
        client.set_terminated(run_id)
    return TrackedRun(run_id, Path(store), parent, record.left_out)


def track_distillation(run_dir: Path, store: Path, exports: Sequence[Path] = ()) -> TrackedRun:
    """Log a finished distillation run folder, and ``exports`` (models exported from its student), into the file
    store in ``store``; the same folder tracked again updates its run."""
    require_mlflow()
    return _log(Path(run_dir), Path(store), distillation_record(Path(run_dir), exports))


def track_federation(run_dir: Path, store: Path, start: Path | None = None) -> TrackedRun:
    """Log a finished federation run folder into the file store in ``store``, as a child of the distillation run
    whose student is ``start`` when that is tracked there; the same folder tracked again updates its run."""
    require_mlflow()
    return _log(Path(run_dir), Path(store), federation_record(Path(run_dir), start))
