"""The ``edgemri`` command line: thin subcommands over the library's functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from edgemri import __version__
from edgemri.core.errors import EdgemriError

log = logging.getLogger("edgemri")


class UsageError(EdgemriError):
    """A command was called in a way that cannot work; the message says how to fix it."""


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# ---------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from edgemri.core.synth import generate, write_sample_grid

    summary = generate(Path(args.out), preset=args.preset, seed=args.seed, overwrite=args.overwrite,
                       progress=_progress(args))
    grid = Path(args.out) / "samples.png"
    write_sample_grid(Path(args.out), grid)
    print(f"wrote {summary.get('total', '')} images ({args.preset}, seed {args.seed}) to {args.out}; "
          f"sample grid: {grid}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from edgemri.core.data import describe_folder

    info = describe_folder(args.root, args.cache_dir, progress=_progress(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['root']}: {info['total']} usable images, fingerprint {info['fingerprint']}")
    for split, counts in info["images"].items():
        print(f"  {split:9s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"  width {info['width_range'][0]}-{info['width_range'][1]} px, "
          f"height {info['height_range'][0]}-{info['height_range'][1]} px")
    if info["sites"]:
        print(f"  sites: {', '.join(info['sites'])}")
    print(f"  decoded cache was current: {info['cache_was_current']}")
    print(f"  skipped: {len(info['skipped'])}")
    for item in info["skipped"]:
        print(f"    {item['path']}: {item['reason']}")
    return 0


# ---------------------------------------------------------------- models


def cmd_models_summary(args: argparse.Namespace) -> int:
    from edgemri.models import MODEL_NAMES, build_model, summarize

    # vgg16-imagenet needs only its shapes here, not the ImageNet download.
    options = {"vgg16-imagenet": {"pretrained": False}}
    rows = [summarize(name, build_model(name, **options.get(name, {}))).as_dict() for name in MODEL_NAMES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':16s} {'total':>12s} {'trainable':>10s} {'MFLOPs':>9s} {'state dict':>12s} {'est. size':>10s}")
    for r in rows:
        print(f"{r['name']:16s} {r['total_params']:12,d} {r['trainable_params']:10,d} {r['mflops']:9.1f} "
              f"{r['state_dict_bytes']:12,d} {r['estimated_size_mb']:8.2f}MB")
    print("MFLOPs: 2 x multiply-accumulates for one 128 px image; est. size: torchsummary's estimate "
          "(paper: teacher 128.14 MB, student 2.25 MB)")
    return 0


# ---------------------------------------------------------------- distill


def _load_config_with_root(args: argparse.Namespace):
    import dataclasses

    from edgemri.core.config import load_config

    config = load_config(args.config, args.overrides)
    if args.data_root:
        config = config.replace(data=dataclasses.replace(config.data, root=args.data_root))
    if not config.data.root:
        raise UsageError("no data: pass --data-root DIR (a Kaggle-layout folder), "
                         "or make one with `edgemri data synth --out DIR`")
    return config


def cmd_distill(args: argparse.Namespace) -> int:
    from edgemri.core.data import load_dataset
    from edgemri.core.distill import run_distillation
    from edgemri.reports.distill import build_report, write_report

    config = _load_config_with_root(args)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out)
    if out.exists() and any(out.glob("seed-*")) and not args.resume:
        raise UsageError(f"{out} already holds a distillation run; add --resume to continue it "
                         f"or choose another --out")
    progress = _progress(args)
    dataset = load_dataset(config.data.root, cache_dir=config.data.cache_dir, progress=progress)
    log.info("data: %s", dataset.summary())
    results, seconds = run_distillation(config, dataset, out, seeds=args.seeds, resume=args.resume,
                                        progress=progress)
    report = build_report(config, dataset, results, seconds, out)
    paths = write_report(report, out)
    from edgemri.core.checkpoint import load_checkpoint, save_checkpoint

    # The federation's starting model: the first seed's KD student.
    student = out / "student.pt"
    save_checkpoint(student, load_checkpoint(results[0].stages["kd"].checkpoint))
    models = report["models"]
    for stage in ("teacher", "baseline", "kd"):
        acc = models[stage]["test_accuracy"]
        print(f"{stage:9s} test accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %")
    print(f"report: {paths['md']}\ndistilled student: {student}")
    return 0


# ---------------------------------------------------------------- federation


def cmd_data_partition(args: argparse.Namespace) -> int:
    from edgemri.core.data import load_dataset
    from edgemri.core.partition import partition, write_manifests

    config = _load_config_with_root(args)
    dataset = load_dataset(config.data.root, cache_dir=config.data.cache_dir, progress=_progress(args))
    manifests = partition(dataset.train, Path(config.data.root), config)
    write_manifests(manifests, Path(args.out))
    for m in manifests:
        counts = m.class_counts()
        print(f"{m.client:24s} {m.kind:8s} site={m.site:10s} n={len(m.files):4d} "
              f"train={sum(counts['train'].values())} val={sum(counts['val'].values())} "
              f"test={sum(counts['test'].values())}")
    print(f"wrote {len(manifests)} manifests to {args.out}")
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from edgemri.simulation.federate import federate

    config = _load_config_with_root(args)
    start = Path(args.start or config.federation.start_checkpoint or "runs/demo/distill/student.pt")
    run = federate(config, data_root=Path(config.data.root), out=Path(args.out), start_checkpoint=start,
                   resume=args.resume)
    summary = run.report["summary"]
    for group, stats in summary.items():
        print(f"{group:9s} " + "  ".join(f"{column} {100 * stats[column]['mean']:.1f}"
                                         for column in ("start", "global", "personalized", "local-only", "pooled")))
    print(f"report: {run.paths['md']}")
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from edgemri.reports.privacy import privacy_report_for_run

    paths = privacy_report_for_run(Path(args.run_dir))
    print(f"privacy report: {paths['md']} (+ {paths['json'].name}, {paths['png'].name})")
    return 0


def cmd_privacy_sweep(args: argparse.Namespace) -> int:
    from edgemri.simulation.sweep import sweep

    config = _load_config_with_root(args)
    start = Path(args.start or config.federation.start_checkpoint or "runs/demo/distill/student.pt")
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    if not epsilons or any(e <= 0 for e in epsilons):
        raise UsageError(f"--epsilons must be positive numbers, got {args.epsilons!r}")
    paths = sweep(config, epsilons=epsilons, data_root=Path(config.data.root), out=Path(args.out),
                  start_checkpoint=start, resume=args.resume)
    print(Path(paths["md"]).read_text())
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the offline default; an interrupted demo resumes where it stopped."""
    import time

    out = Path(args.out)
    quiet = ["--quiet"] if args.quiet else []
    data, distill, federation, edge = out / "data", out / "distill", out / "federation", out / "edge"
    student = distill / "student.pt"
    stages: list[tuple[str, list[str], bool]] = [
        ("synthesize data", ["data", "synth", "--out", str(data), "--preset", "quickstart", "--overwrite", *quiet],
         (data / "metadata.csv").is_file()),
        ("distill", ["distill", "--config", args.config, "--data-root", str(data), "--out", str(distill),
                     *(["--resume"] if distill.exists() else []), *quiet], student.is_file()),
        ("federate", ["federate", "--config", args.config, "--data-root", str(data), "--start", str(student),
                      "--out", str(federation), *(["--resume"] if federation.exists() else []), *quiet],
         (federation / "privacy.md").is_file()),
        ("export the distilled student", ["export", str(student), "--out", str(edge / "student.onnx"),
                                          "--overwrite", *quiet], False),
        ("export it as int8", ["export", str(student), "--int8", "--data-root", str(data),
                               "--out", str(edge / "student.int8.onnx"), "--overwrite", *quiet], False),
    ]
    for title, argv, done in stages:
        if done:
            print(f"== {title}: already done", flush=True)
            continue
        started = time.perf_counter()
        print(f"\n== {title}: edgemri {' '.join(argv)}", flush=True)
        code = main(argv)
        if code:
            return code
        print(f"== {title} took {time.perf_counter() - started:.0f} s", flush=True)
    personal = sorted((federation / "clients").glob("*/personalized.pt"))
    samples = sorted((data / "Testing").glob("*/*.jpg"))[::50][:8]
    if personal:
        print(f"\n== export a client's personalized model: {personal[0].parent.name}", flush=True)
        phone_model = edge / f"{personal[0].parent.name}.onnx"
        if main(["export", str(personal[0]), "--out", str(phone_model), "--overwrite", *quiet]):
            return 1
        print("\n== predict a few Testing images with the distilled student and the personalized model")
        for model in (edge / "student.onnx", phone_model):
            print(f"-- {model.name}", flush=True)
            if main(["predict", str(model), *map(str, samples)]):
                return 1
    print("\nReports:")
    print(f"  data:         {data} (sample grid {data / 'samples.png'})")
    print(f"  distillation: {distill / 'report.md'} (+ report.json, curves.png, confusion.png)")
    print(f"  federation:   {federation / 'federation.md'} (+ federation.json, federation.png)")
    print(f"  privacy:      {federation / 'privacy.md'} (+ privacy.json, privacy.png)")
    print(f"  exports:      {edge} (student.onnx, student.int8.onnx, a client's personalized model)")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemri", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgemri {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
            help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        return sub

    def add_config(sub: argparse.ArgumentParser, text: str = "YAML config, e.g. configs/quickstart.yaml") -> None:
        sub.add_argument("--config", required=True, help=text)
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config key (value in YAML), e.g. --set federation.method=fedper; "
                              "repeatable")

    data = commands.add_parser("data", help="make, inspect and partition data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = add(data, "synth", cmd_data_synth, "generate the offline synthetic brain-MRI set (Kaggle layout)")
    synth.add_argument("--out", required=True, help="folder to create")
    synth.add_argument("--preset", default="quickstart", choices=["quickstart", "kaggle"])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    info = add(data, "info", cmd_data_info, "what the loader sees in a Kaggle-layout folder")
    info.add_argument("root", help="data folder (Training/ and Testing/ inside)")
    info.add_argument("--cache-dir", default=None, help="decoded-image cache (default: ROOT/.edgemri-cache)")
    info.add_argument("--json", action="store_true")

    part = add(data, "partition", cmd_data_partition,
               "write one manifest per client (hospital / phone) from the data's scanner sites")
    part.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    add_config(part, "YAML config (its federation section)")
    part.add_argument("--out", required=True, help="folder for client-NNN.json manifests")

    models = commands.add_parser("models", help="the registered models").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    summary = add(models, "summary", cmd_models_summary,
                  "parameters, MFLOPs, state-dict bytes and the paper's estimated size per model")
    summary.add_argument("--json", action="store_true")

    distill = add(commands, "distill", cmd_distill,
                  "train the teacher, the baseline student and the KD student; write the report")
    add_config(distill)
    distill.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    distill.add_argument("--out", default="runs/distill", help="run folder (default: runs/distill)")
    distill.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1")
    distill.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    fed = add(commands, "federate", cmd_federate,
              "personalize the distilled student with a Flower federation (simulation)")
    add_config(fed)
    fed.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    fed.add_argument("--start", default=None,
                     help="start model (default: federation.start_checkpoint or runs/demo/distill/student.pt)")
    fed.add_argument("--out", default="runs/federation", help="run folder (default: runs/federation)")
    fed.add_argument("--resume", action="store_true", help="continue a stopped run in --out")

    privacy = commands.add_parser("privacy", help="privacy-budget reports and the privacy/accuracy sweep"
                                  ).add_subparsers(dest="privacy_command", required=True, metavar="SUBCOMMAND")
    report = add(privacy, "report", cmd_privacy_report, "write privacy.json/.md/.png for a federation run")
    report.add_argument("run_dir", help="a federation run folder")
    sweep = add(privacy, "sweep", cmd_privacy_sweep,
                "run the federation at several target epsilons and without DP; tabulate accuracy")
    add_config(sweep)
    sweep.add_argument("--data-root", default=None)
    sweep.add_argument("--start", default=None, help="start model (default: runs/demo/distill/student.pt)")
    sweep.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons (default 1,3,8)")
    sweep.add_argument("--out", default="runs/privacy-sweep")
    sweep.add_argument("--resume", action="store_true", help="reuse finished runs in --out")

    from edgemri.deploy_commands import register as register_deploy_commands
    from edgemri.edge_commands import register as register_edge_commands

    register_deploy_commands(commands, add)
    register_edge_commands(commands, add)

    demo = add(commands, "demo", cmd_demo, "run the whole pipeline on the offline synthetic data")
    demo.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    demo.add_argument("--config", default="configs/quickstart.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    from edgemri.core.checkpoint import CheckpointError
    from edgemri.core.config import ConfigError
    from edgemri.core.data import DataError
    from edgemri.core.partition import ManifestError
    from edgemri.core.privacy import LedgerError, PrivacyError
    from edgemri.core.train import ResumeMismatchError
    from edgemri.deploy.local import DeployError
    from edgemri.edge.export import EdgeError
    from edgemri.models import WeightsUnavailableError
    from edgemri.simulation.flower_run import FlowerRunError

    logging.basicConfig(level=logging.INFO, format="edgemri: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError, CheckpointError, WeightsUnavailableError,
            ResumeMismatchError, FileExistsError, ManifestError, FlowerRunError, EdgeError,
            PrivacyError, LedgerError, FileNotFoundError, DeployError) as err:
        print(f"edgemri: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgemri: interrupted; completed epochs are saved, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
