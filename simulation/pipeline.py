"""The pipeline's steps as plain functions: the command line and ``edgemri demo`` both call these.

Each step takes a parsed config and folders and returns what it made; none prints except
``demo``, which prints one line per stage because a newcomer watches it for minutes.
Errors a user can cause are ``EdgemriError`` subclasses with a one-line message.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemri.core.config import Config
from edgemri.core.data.dataset import is_synthetic, load_dataset
from edgemri.core.data.partition import Manifest, write_manifests
from edgemri.core.data.partition import partition as split_clients
from edgemri.core.errors import EdgemriError
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import load_checkpoint, save_checkpoint

if TYPE_CHECKING:  # the federation (Flower, Opacus, reports) loads only for the stages that use it
    from edgemri.simulation.federate import FederationRun

log = logging.getLogger(__name__)

DEMO_OUT = Path("runs/demo")
DEMO_PRESET = "quickstart"
# Every 50th Testing image, at most 8: a few of each class, printed in a few lines.
DEMO_PREDICT_STEP, DEMO_PREDICT_COUNT = 50, 8


class UsageError(EdgemriError):
    """A step cannot run as asked (a bad argument, a run folder in the way); the message says how to fix it."""


def load_run_config(config_path: str | Path, overrides: Sequence[str] = (), data_root: str | Path | None = None
                    ) -> Config:
    """The config with ``data_root`` (when given) as its data folder; refuses a config with no data folder."""
    config = load_config(config_path, overrides)
    if data_root:
        config = config.replace(data=dataclasses.replace(config.data, root=str(data_root)))
    if not config.data.root:
        raise UsageError("no data: pass --data-root DIR (a Kaggle-layout folder), "
                         "or make one with `edgemri data synth --out DIR`")
    return config


def start_model(config: Config, start: str | Path | None = None) -> Path:
    """The federation's start model: ``start``, else the config's, else the demo's distilled student.

    ``start`` and the config's ``federation.start_checkpoint`` may name a shipped pretrained model
    (``--start kaggle-student``): its file is resolved and checked here. A file is only named here,
    not checked: the steps refuse bad arguments (e.g. the sweep's epsilons) before they load it.
    """
    from edgemri.edge.pretrained import is_pretrained_name, resolve_model

    chosen = start or config.federation.start_checkpoint or DemoLayout(DEMO_OUT).student
    return resolve_model(chosen) if is_pretrained_name(chosen) else Path(chosen)


# ---------------------------------------------------------------- steps


def synthesize(out: Path, *, preset: str = DEMO_PRESET, seed: int = 0, overwrite: bool = False,
               progress: bool = False) -> dict[str, Any]:
    """The offline synthetic set in the Kaggle layout plus its sample grid; returns the generator's summary."""
    from edgemri.core.data.synth import generate, write_sample_grid

    summary = generate(out, preset=preset, seed=seed, overwrite=overwrite, progress=progress)
    write_sample_grid(out, sample_grid(out))
    return summary


def sample_grid(data: Path) -> Path:
    """Where ``synthesize`` puts the picture of a few images per class."""
    return data / "samples.png"


@dataclass(frozen=True)
class DistillOutcome:
    out: Path
    report: dict[str, Any]
    paths: dict[str, Path]
    student: Path  # the federation's start model: the first seed's KD student

    def lines(self) -> list[str]:
        """Test accuracy per stage (mean ± std over seeds) and where the report and the student are."""
        models = self.report["models"]
        rows = [f"{stage:9s} test accuracy {100 * models[stage]['test_accuracy']['mean']:.2f} ± "
                f"{100 * models[stage]['test_accuracy']['std']:.2f} %" for stage in ("teacher", "baseline", "kd")]
        examples = self.paths.get("examples") or "not drawn on real data (add --show-scans)"
        return [*rows, f"report: {self.paths['md']}", f"example scans: {examples}",
                f"distilled student: {self.student}"]


def distill(config: Config, out: Path, *, seeds: int = 1, resume: bool = False, progress: bool = False,
            show_scans: bool = False) -> DistillOutcome:
    """Teacher, baseline student and KD student for each seed; the report; ``out/student.pt`` to federate.
    The report's example scans are drawn on edgemri's synthetic data, on real data only with ``show_scans``."""
    from edgemri.core.training.distill import run_distillation
    from edgemri.reports.distill import EXAMPLES_STAGE, build_examples, build_report, write_examples, write_report

    if seeds < 1:
        raise UsageError(f"seeds (--seeds) must be >= 1, got {seeds}")
    if any(out.glob("seed-*")) and not resume:
        raise UsageError(f"{out} already holds a distillation run; add --resume to continue it or choose another --out")
    dataset = load_dataset(config.data.root, cache_dir=config.data.cache_dir, progress=progress)
    log.info("data: %s", dataset.summary())
    results, seconds = run_distillation(config, dataset, out, seeds=seeds, resume=resume, progress=progress)
    report = build_report(config, dataset, results, seconds, out)
    paths = write_report(report, out)
    first = results[0]
    paths |= write_examples(*build_examples(
        config, dataset.test.subset(first.test_indices), first.stages[EXAMPLES_STAGE].test_probabilities, first.seed,
        synthetic=is_synthetic(dataset.root), show_scans=show_scans), out)
    student = save_checkpoint(out / "student.pt", load_checkpoint(results[0].stages["kd"].checkpoint))
    return DistillOutcome(out, report, paths, student)


def partition(config: Config, out: Path, *, progress: bool = False) -> list[Manifest]:
    """One manifest per client from the training split's scanner sites, written to ``out``."""
    dataset = load_dataset(config.data.root, cache_dir=config.data.cache_dir, progress=progress)
    manifests = split_clients(dataset.train, Path(config.data.root), config, progress=progress)
    write_manifests(manifests, out)
    return manifests


def federation_lines(run: FederationRun) -> list[str]:
    """Mean accuracy per client group for each model the federation compares, and where the report is."""
    columns = ("start", "global", "best-global", "personalized", "local-only", "pooled", "oracle")
    section = run.report.get("pool") or run.report  # the site pools, where the data has them: the primary metric
    where = "site pools" if run.report.get("pool") else "local test splits"
    rows = [f"{group:9s} " + "  ".join(f"{column} {100 * stats[column]['mean']:.1f}" for column in columns)
            for group, stats in section["summary"].items()]
    return [f"mean accuracy (%) on the clients' {where}:", *rows, f"report: {run.paths['md']}"]


# ---------------------------------------------------------------- experiment tracking
# A finished run folder's reports into MLflow's local file store (reports/tracking.py), after the run: a
# tracking failure leaves the run's results as they are.


def check_tracking(enabled: bool) -> None:
    """Before any work: tracking asked for (tracking.enabled, `--track`) needs MLflow, the `track` extra."""
    if enabled:
        from edgemri.reports.tracking import require_mlflow

        require_mlflow()


def tracking_store(config: Config, run_dir: Path) -> Path:
    """Where a run is tracked: tracking.dir, else mlruns beside the run folder, so that a distillation and the
    federations started from its student share one store (and the federation finds its parent run there)."""
    return Path(config.tracking.dir) if config.tracking.dir else Path(run_dir).resolve().parent / "mlruns"


def track_run(run_dir: Path, store: Path, *, start: Path | None = None, exports: Sequence[Path] = ()) -> list[str]:
    """Log a finished run folder into the file store in ``store``: a federation (``start``: the model it started
    from, which links it to its distillation) or a distillation (``exports``: models exported from its student),
    by the report it holds. Returns the lines to print."""
    from edgemri.reports.tracking import track_distillation, track_federation

    if (run_dir / "federation.json").is_file():
        return track_federation(run_dir, store, start).lines()
    return track_distillation(run_dir, store, exports).lines()


def mlflow_ui_line(store: Path) -> str:
    """The command that shows the tracked runs in a browser."""
    from edgemri.reports.tracking import ui_command

    return f"see the tracked runs (then open http://127.0.0.1:5000): {ui_command(store)}"


# ---------------------------------------------------------------- edge
# The demo's export and predict stages call the edge library the way `edgemri export` and
# `edgemri predict` (cli/edge_commands.py) do; these two functions are the only place here that
# knows edge/'s API.


def export_onnx_model(checkpoint: Path, out: Path, *, int8_data: Path | None = None, progress: bool = False
                      ) -> list[str]:
    """Export ``checkpoint`` to ONNX (fp32, or static int8 calibrated on ``int8_data``); lines to print."""
    from edgemri.edge.contract import load_student
    from edgemri.edge.int8 import export_onnx_int8
    from edgemri.edge.onnx import export_onnx

    student = load_student(checkpoint)
    if int8_data is None:
        export_onnx(student, out, overwrite=True)
        return [f"wrote {out} (fp32, {out.stat().st_size:,} bytes)"]
    dataset = load_dataset(int8_data, progress=progress)
    result = export_onnx_int8(student, out, dataset.train.images, dataset.test.images, dataset.test.labels,
                              overwrite=True)
    return [f"wrote {out} (int8, {out.stat().st_size:,} bytes)",
            f"test accuracy fp32 {100 * result.fp32_accuracy:.2f} % -> int8 {100 * result.int8_accuracy:.2f} % "
            f"({result.change_points:+.2f} points)"]


def predict_lines(model_path: Path, images: Sequence[Path]) -> list[str]:
    """``file<TAB>label<TAB>probability`` per image; an image that cannot be predicted is an error."""
    from edgemri.edge.predict import predict_paths
    from edgemri.edge.runtime import load_model

    results = predict_paths(load_model(model_path), images)
    failed = [r for r in results if not r.ok]
    if failed:
        raise UsageError(f"{len(failed)} of {len(results)} images could not be predicted with {model_path}, "
                         f"e.g. {failed[0].file}: {failed[0].error}")
    return [f"{r.file}\t{r.label}\t{r.probability:.4f}" for r in results]


# ---------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoLayout:
    """Where each demo stage writes under ``out`` (README's table; keep it in step)."""

    out: Path
    data_root: Path | None = None  # a Kaggle-layout folder to run on instead of synthesizing one

    @property
    def data(self) -> Path:
        return self.data_root or self.out / "data"

    @property
    def distill(self) -> Path:
        return self.out / "distill"

    @property
    def student(self) -> Path:
        return self.distill / "student.pt"

    @property
    def federation(self) -> Path:
        return self.out / "federation"

    @property
    def edge(self) -> Path:
        return self.out / "edge"

    @property
    def mlruns(self) -> Path:
        """The demo's MLflow file store (`--track-dir` puts it elsewhere)."""
        return self.out / "mlruns"

    def personalized_models(self) -> list[Path]:
        return sorted((self.federation / "clients").glob("*/personalized.pt"))

    def sample_images(self) -> list[Path]:
        images = sorted((self.data / "Testing").glob("*/*.jpg"))
        return images[::DEMO_PREDICT_STEP][:DEMO_PREDICT_COUNT]

    def run_folders(self) -> list[Path]:
        """The folders of the demo's runs: each gets its report.html."""
        return [self.distill, self.federation]

    def report_lines(self) -> list[str]:
        """The closing "Reports:" block: where each report of the demo is, the one-page reports last."""
        data = (f"  data:         {self.data} (sites {self.out / 'sites' / 'sites.md'})" if self.data_root else
                f"  data:         {self.data} (sample grid {sample_grid(self.data)})")
        return [
            data,
            f"  distillation: {self.distill / 'report.md'} (+ report.json, curves.png, confusion.png, "
            "reliability.png, coverage.png)",
            f"  federation:   {self.federation / 'federation.md'} (+ federation.json, federation.png)",
            f"  privacy:      {self.federation / 'privacy.md'} (+ privacy.json, privacy.png)",
            f"  exports:      {self.edge} (student.onnx, student.int8.onnx, a client's personalized model)",
            "  one page each, figures included (open in a browser): "
            + ", ".join(str(folder / "report.html") for folder in self.run_folders()),
        ]


@dataclass(frozen=True)
class Stage:
    """One demo stage: its title, the command that does the same alone, whether its output exists, the work."""

    title: str
    command: str
    done: bool
    run: Callable[[], list[str]]  # returns the lines to print


@dataclass(frozen=True)
class DemoOutcome:
    layout: DemoLayout
    seconds: dict[str, float]  # the stages that ran (not those already done), by title
    tracking_store: Path | None = None  # where the runs were tracked; None: not tracked


def demo_stages(out: Path, config_path: Path, *, quiet: bool = False, data_root: Path | None = None) -> list[Stage]:
    """The demo's stages in order; a stage is done when its last output exists (an interrupted demo resumes).

    With ``data_root`` (a Kaggle-layout folder, e.g. the real set) the first stage audits and maps that folder
    (duplicates, appearance sites, pools) instead of synthesizing one. The exports and the predictions are cheap
    and always rerun, as is a stage whose output is missing.
    """
    layout = DemoLayout(out, data_root)
    config = load_run_config(config_path, data_root=layout.data)
    progress = not quiet  # edgemri.core.progress: bars at a terminal, log lines elsewhere
    data, student, federation, edge = layout.data, layout.student, layout.federation, layout.edge

    def resume_flag(folder: Path) -> str:
        return " --resume" if folder.exists() else ""

    def run_synth() -> list[str]:
        summary = synthesize(data, preset=config.data.synth_preset, overwrite=True, progress=progress)
        return [f"wrote {summary.get('total', '')} images ({config.data.synth_preset}) to {data}"]

    def run_sites() -> list[str]:
        from edgemri.core.data.audit import audit_dataset
        from edgemri.reports.sites import build_sites_report, write_sites_report

        dataset = load_dataset(data, cache_dir=config.data.cache_dir, progress=progress)
        leaked = len(audit_dataset(dataset, config.data.cache_dir, progress=progress).leaked_test())
        lines = [f"{len(dataset.train)} Training and {len(dataset.test)} Testing scans; {leaked} Testing scans are "
                 f"copies of Training scans (left out of every test metric and pool with data.dedup)"]
        if dataset.train.sites:
            return [*lines, f"sites from metadata.csv: {', '.join(sorted(set(dataset.train.sites)))}"]
        report = build_sites_report(dataset, config, progress=progress)
        paths = write_sites_report(report, dataset, layout.out / "sites")
        return [*lines, f"{report['count']} appearance sites ({report['count_rule']}); server sites under "
                        f"new-sites: {', '.join(report['new_sites_source']) or '-'}; {paths['md']}"]

    def run_distill() -> list[str]:
        return distill(config, layout.distill, resume=layout.distill.exists(), progress=progress).lines()

    def run_federate() -> list[str]:
        from edgemri.simulation.federate import federate

        run = federate(config, data_root=data, out=federation, start_checkpoint=student, resume=federation.exists(),
                       progress=progress)
        return federation_lines(run)

    def run_personal_export() -> list[str]:
        personal = layout.personalized_models()
        if not personal:
            return ["no client kept a personalized model; nothing to export"]
        client = personal[0].parent.name
        return [f"client {client}", *export_onnx_model(personal[0], edge / f"{client}.onnx", progress=progress)]

    def run_predict() -> list[str]:
        models = [edge / "student.onnx", *(edge / f"{p.parent.name}.onnx" for p in layout.personalized_models()[:1])]
        images = layout.sample_images()
        return [line for model in models for line in (f"-- {model.name}", *predict_lines(model, images))]

    distill_cmd = f"edgemri distill --config {config_path} --data-root {data} --out {layout.distill}"
    federate_cmd = (f"edgemri federate --config {config_path} --data-root {data} --start {student} "
                    f"--out {federation}")
    first = (Stage("audit the data and map its sites", f"edgemri data info {data}; edgemri data sites --config "
                   f"{config_path} --data-root {data} --out {layout.out / 'sites'}",
                   (layout.out / "sites" / "sites.json").is_file(), run_sites) if data_root else
             Stage("synthesize data", f"edgemri data synth --out {data} --preset {config.data.synth_preset} "
                   f"--overwrite", (data / "metadata.csv").is_file(), run_synth))
    return [
        first,
        Stage("distill", distill_cmd + resume_flag(layout.distill), student.is_file(), run_distill),
        Stage("federate", federate_cmd + resume_flag(federation), (federation / "privacy.md").is_file(),
              run_federate),
        Stage("export the distilled student", f"edgemri export {student} --out {edge / 'student.onnx'} --overwrite",
              False, lambda: export_onnx_model(student, edge / "student.onnx")),
        Stage("export it as int8",
              f"edgemri export {student} --int8 --data-root {data} --out {edge / 'student.int8.onnx'} --overwrite",
              False, lambda: export_onnx_model(student, edge / "student.int8.onnx", int8_data=data,
                                               progress=progress)),
        Stage("export a client's personalized model",
              f"edgemri export {federation}/clients/CLIENT/personalized.pt --out {edge}/CLIENT.onnx --overwrite",
              False, run_personal_export),
        Stage("predict a few Testing images with the distilled student and the personalized model",
              f"edgemri predict {edge}/student.onnx {data}/Testing/...", False, run_predict),
    ]


def demo(out: Path, config_path: Path, *, quiet: bool = False, data_root: Path | None = None, track: bool = False,
         track_dir: Path | None = None) -> DemoOutcome:
    """The whole pipeline on the offline synthetic data (or on ``data_root``), one progress line per stage with
    its time; with ``track``, its distillation and federation are then tracked in MLflow (``track_dir``, else
    ``out/mlruns``)."""
    if data_root is not None and not (data_root / "Training").is_dir():
        raise UsageError(f"--data-root {data_root} has no Training/ folder; expected a Kaggle-layout folder "
                         f"(Training/<class>/*.jpg and Testing/<class>/*.jpg)")
    check_tracking(track)
    seconds: dict[str, float] = {}
    for stage in demo_stages(out, config_path, quiet=quiet, data_root=data_root):
        if stage.done:
            print(f"== {stage.title}: already done", flush=True)
            continue
        print(f"\n== {stage.title}: {stage.command}", flush=True)
        started = time.perf_counter()
        for line in stage.run():
            print(line, flush=True)
        seconds[stage.title] = time.perf_counter() - started
        print(f"== {stage.title} took {seconds[stage.title]:.0f} s", flush=True)
    layout = DemoLayout(out, data_root)
    _write_html_reports(layout.run_folders())
    store = (track_dir or layout.mlruns) if track else None
    if store is not None:
        _track_runs(layout, store)
    return DemoOutcome(layout, seconds, store)


def _track_runs(layout: DemoLayout, store: Path) -> None:
    """The demo's tracking: its distillation (with the student's exports) and its federation, a child of it, in
    the file store in ``store`` (what `--track` does for `distill` and `federate`), printing each run."""
    print(f"\n== experiment tracking: MLflow's file store in {store}", flush=True)
    if (layout.distill / "report.json").is_file():
        exports = [layout.edge / "student.onnx", layout.edge / "student.int8.onnx"]
        print("\n".join(track_run(layout.distill, store, exports=exports)), flush=True)
    if (layout.federation / "federation.json").is_file():
        print("\n".join(track_run(layout.federation, store, start=layout.student)), flush=True)


def _write_html_reports(folders: Sequence[Path]) -> None:
    """The demo's last step: report.html in each of ``folders`` that holds a report (what `edgemri report RUN`
    writes), printing its path."""
    from edgemri.reports.html import has_report, write_html_report

    with_reports = [folder for folder in folders if has_report(folder)]
    if with_reports:
        print("\n== one page per run folder: " + "; ".join(f"edgemri report {f}" for f in with_reports), flush=True)
    for folder in with_reports:
        print(f"wrote {write_html_report(folder)}", flush=True)
