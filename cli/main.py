"""The ``edgemri`` command line: thin subcommands over the library's functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemri import __version__
from edgemri.arguments import SEEDS, AtMost, BoundedInt, CommaList
from edgemri.core.config import MAX_ROUNDS, MAX_SEED
from edgemri.core.errors import EdgemriError, printable

if TYPE_CHECKING:
    from edgemri.core.config import Config

log = logging.getLogger("edgemri")

# The range of every count the commands take (edgemri.arguments). Those restated from a module that imports
# torch (too slow for --help) are checked against it in tests/test_cli.py.
SEED = BoundedInt(0, MAX_SEED)
ROUND = BoundedInt(1, MAX_ROUNDS)
ATTACK_CLIENTS = BoundedInt(1, 1000)  # simulation.privacy_attack.MAX_CLIENTS
INVERSION_STEPS = BoundedInt(1, 5000)  # simulation.privacy_attack.MAX_INVERSION_STEPS
CANARIES = BoundedInt(20, 2000)  # simulation.privacy_audit.MIN_CANARIES, MAX_CANARIES
MAX_REPLAYED_ROUNDS = 100  # each round replayed is an inversion (about 4 s) per attacked client
MAX_EPSILONS = 10  # each target epsilon is a whole federation
MAX_OVERRIDES = 100  # --set options; the config has fewer keys


def _progress(args: argparse.Namespace) -> bool:
    """Progress unless --quiet: edgemri.core.progress draws bars at a terminal and writes log lines elsewhere."""
    return not getattr(args, "quiet", False)


def _config(args: argparse.Namespace) -> Config:
    from edgemri.simulation.pipeline import load_run_config

    return load_run_config(args.config, [*args.overrides, *_tracking_overrides(args)], args.data_root)


def _tracking_overrides(args: argparse.Namespace) -> list[str]:
    """--track / --no-track and --track-dir, where a command has them, as config overrides (checked like any
    other); naming a store turns tracking on unless --no-track says otherwise."""
    track, folder = getattr(args, "track", None), getattr(args, "track_dir", None)
    overrides = [] if folder is None else [f"tracking.dir={json.dumps(folder)}"]  # a JSON string is YAML
    if track is not None or folder is not None:
        overrides.append(f"tracking.enabled={'false' if track is False else 'true'}")
    return overrides


def _track(config: Config, run_dir: Path, **what: Any) -> None:
    """After a finished run, with tracking on: the run folder into MLflow, and how to look at it."""
    from edgemri.simulation.pipeline import mlflow_ui_line, track_run, tracking_store

    if config.tracking.enabled:
        store = tracking_store(config, run_dir)
        print("\n".join([*track_run(run_dir, store, **what), mlflow_ui_line(store)]))


# ---------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from edgemri.simulation.pipeline import sample_grid, synthesize

    out = Path(args.out)
    summary = synthesize(out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, progress=_progress(args))
    print(f"wrote {summary.get('total', '')} images ({args.preset}, seed {args.seed}) to {out}; "
          f"sample grid: {sample_grid(out)}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from edgemri.core.data.audit import audit_folder
    from edgemri.core.data.dataset import describe_folder

    info = describe_folder(args.root, args.cache_dir, progress=_progress(args))
    # The decoded cache is current now, so the audit's load costs a read; its hashes are cached beside it.
    dup = audit_folder(args.root, args.cache_dir, progress=_progress(args)).to_dict()
    if args.json:
        print(json.dumps({**info, "duplicates": dup}, indent=2))
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
    rule, counts, cross = dup["rule"], dup["counts"], dup["counts"]["Testing-Training"]
    print(f"  duplicates (exact: {rule['exact']}; near: pHash within {rule['max_distance']} bits and r >= "
          f"{rule['min_correlation']} of the 128 px grey images; groups are transitive; {dup['seconds']:.1f} s):")
    for pair in ("Training-Training", "Testing-Testing"):
        print(f"    {pair:17s} " + "   ".join(
            f"{kind} {c['images']} images in {c['groups']} groups ({c['redundant']} redundant)"
            for kind, c in counts[pair].items()))
    print(f"    Testing-Training  Testing images with a copy in Training: exact {cross['exact']} "
          f"({cross['exact_contents']} distinct contents), near {cross['near']} (exact included), "
          f"grouped {cross['grouped']}")
    print("    per class, images with a copy: Training-Training exact/near, Testing-Testing exact/near, "
          "Testing in Training exact/near/grouped")
    for name, c in dup["per_class"].items():
        tt, ss, st = c["Training-Training"], c["Testing-Testing"], c["Testing-Training"]
        print(f"      {name:11s} {tt['exact']:5d}/{tt['near']:<5d} {ss['exact']:5d}/{ss['near']:<5d} "
              f"{st['exact']:5d}/{st['near']}/{st['grouped']}")
    print(f"    label conflicts: {len(dup['label_conflicts']) or 'none'}")
    for conflict in dup["label_conflicts"]:
        members = ", ".join(f"{printable(m['file'])} ({m['class']})" for m in conflict["members"])
        print(f"      group {conflict['group']} ({'byte-identical' if conflict['exact'] else 'near'}): {members}")
    n_test = dup["images"]["Testing"]
    if dup["leaked_test"] or dup["label_conflicts"]:
        print(f"  hint: {dup['leaked_test']} of {n_test} Testing images are copies of Training images; a score that "
              f"counts them measures memory: set data.dedup: true (configs/kaggle.yaml) to leave them out of the test "
              f"metrics and keep copies on one side of train/validation; --json lists every group"
              f"{'; check the label conflicts' if dup['label_conflicts'] else ''}")
    else:
        print("  hint: no Testing image is a copy of a Training image; --json lists every group")
    return 0


def cmd_data_sites(args: argparse.Namespace) -> int:
    from edgemri.core.data.dataset import load_dataset
    from edgemri.reports.sites import build_sites_report, render_sites, write_sites_report

    config = _config(args)
    dataset = load_dataset(config.data.root, cache_dir=config.data.cache_dir, progress=_progress(args))
    report = build_sites_report(dataset, config, progress=_progress(args))
    paths = write_sites_report(report, dataset, Path(args.out))
    print(render_sites(report), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_data_partition(args: argparse.Namespace) -> int:
    from edgemri.simulation.pipeline import partition

    manifests = partition(_config(args), Path(args.out), progress=_progress(args))
    for m in manifests:
        counts = m.class_counts()
        print(f"{m.client:24s} {m.kind:8s} site={m.site:10s} n={len(m.files):4d} "
              f"train={sum(counts['train'].values())} val={sum(counts['val'].values())} "
              f"test={sum(counts['test'].values())}")
    print(f"wrote {len(manifests)} manifests to {args.out}")
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


# ---------------------------------------------------------------- distill and federation


def cmd_distill(args: argparse.Namespace) -> int:
    from edgemri.simulation.pipeline import check_tracking, distill

    config = _config(args)
    check_tracking(config.tracking.enabled)
    outcome = distill(config, Path(args.out), seeds=args.seeds, resume=args.resume, progress=_progress(args),
                      show_scans=args.show_scans)
    print("\n".join(outcome.lines()))
    _track(config, outcome.out)
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from edgemri.simulation.federate import federate
    from edgemri.simulation.pipeline import check_tracking, federation_lines, start_model

    config = _config(args)
    check_tracking(config.tracking.enabled)
    start = start_model(config, args.start)
    run = federate(config, data_root=Path(config.data.root), out=Path(args.out), start_checkpoint=start,
                   resume=args.resume, progress=_progress(args))
    print("\n".join(federation_lines(run)))
    _track(config, run.out, start=start)
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from edgemri.reports.privacy import privacy_report_for_run

    paths = privacy_report_for_run(Path(args.run_dir))
    print(f"privacy report: {paths['md']} (+ {paths['json'].name}, {paths['png'].name})")
    return 0


def cmd_privacy_attack(args: argparse.Namespace) -> int:
    import time

    from edgemri.reports.privacy_attacks import write_privacy_attack_report
    from edgemri.simulation.privacy_attack import AttackSettings, attack_run

    started = time.perf_counter()
    settings = AttackSettings(clients=args.clients, rounds=tuple(args.rounds) if args.rounds else None,
                              seed=args.seed, inversion_steps=args.inversion_steps,
                              write_reconstructions=args.write_reconstructions,
                              data_root=Path(args.data_root) if args.data_root else None,
                              start=Path(args.start) if args.start else None)
    outcome = attack_run(Path(args.run_dir), settings, (lambda _line: None) if args.quiet else
                         (lambda line: print(line, flush=True)))
    paths = write_privacy_attack_report(outcome.report, Path(outcome.report["run"]["dir"]), outcome.examples)
    others = ", ".join(p.name for key, p in paths.items() if key != "md")
    print(f"privacy attacks: {paths['md']} (+ {others}) in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    import time

    from edgemri.reports.privacy_audit import write_audit_report
    from edgemri.simulation.privacy_audit import AuditSettings, audit

    started = time.perf_counter()
    settings = AuditSettings(tiers=(args.tier,) if args.tier else None, canaries=args.canaries, seed=args.seed,
                             start=Path(args.start) if args.start else None)
    report = audit(_config(args), settings, (lambda _line: None) if args.quiet else
                   (lambda line: print(line, flush=True)))
    for kind, tier in report["tiers"].items():
        print(f"{kind}: {tier['reading']}")
    paths = write_audit_report(report, Path(args.out))
    print(f"privacy audit: {paths['md']} (+ {paths['json'].name}, {paths['png'].name}) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


def cmd_privacy_sweep(args: argparse.Namespace) -> int:
    from edgemri.simulation.pipeline import start_model
    from edgemri.simulation.sweep import sweep

    config = _config(args)
    paths = sweep(config, epsilons=args.epsilons, data_root=Path(config.data.root), out=Path(args.out),
                  start_checkpoint=start_model(config, args.start), resume=args.resume)
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    return 0


def _check_epsilons(epsilons: list[float]) -> None:
    """The sweep's own range check, at parse time (imported then: building the parser imports no torch)."""
    from edgemri.simulation.sweep import check_epsilons

    check_epsilons(epsilons)


def cmd_report(args: argparse.Namespace) -> int:
    from edgemri.reports.html import write_html_report

    print(f"report: {write_html_report(Path(args.run_dir))}")
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the offline default; an interrupted demo resumes where it stopped."""
    from edgemri.simulation.pipeline import demo, mlflow_ui_line

    data_root = Path(args.data_root) if args.data_root else None
    outcome = demo(Path(args.out), Path(args.config), quiet=args.quiet, data_root=data_root, track=args.track,
                   track_dir=Path(args.track_dir) if args.track_dir else None)
    print("\nReports:")
    print("\n".join(outcome.layout.report_lines()))
    if outcome.tracking_store is not None:
        print(f"  {mlflow_ui_line(outcome.tracking_store)}")
    return 0


# ---------------------------------------------------------------- parser


def add_command(group: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
    """A subcommand that runs ``func``, with the --quiet every command takes."""
    sub = group.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(func=func)
    sub.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    return sub


def add_config(sub: argparse.ArgumentParser, text: str = "YAML config, e.g. configs/quickstart.yaml") -> None:
    sub.add_argument("--config", required=True, help=text)
    add_overrides(sub)


def add_overrides(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--set", dest="overrides", action=AtMost, most=MAX_OVERRIDES, default=[], metavar="KEY=VALUE",
                     help=f"override one config key (value in YAML), e.g. --set federation.method=fedper; "
                          f"repeatable, at most {MAX_OVERRIDES} times")


def add_tracking(sub: argparse.ArgumentParser, *, on: bool | None, store: str) -> None:
    """--track / --no-track and --track-dir: the finished run into MLflow's local file store (reports/tracking.py).
    ``on``: the default (None: the config's tracking.enabled); ``store``: where it goes by default."""
    default = "; default: on" if on else "; default: the config's tracking.enabled, off unless set"
    sub.add_argument("--track", action=argparse.BooleanOptionalAction, default=on,
                     help=f"log the finished run into MLflow's local file store, offline, for `mlflow ui` (needs "
                          f"pip install 'edgemri[track]'{default})")
    sub.add_argument("--track-dir", default=None, metavar="DIR",
                     help=f"the MLflow file store (implies --track; default: {store})")


def _data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="make, inspect and partition data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = add_command(data, "synth", cmd_data_synth, "generate the offline synthetic brain-MRI set (Kaggle layout)")
    synth.add_argument("--out", required=True, help="folder to create")
    synth.add_argument("--preset", default="quickstart",
                       help="quickstart (2,000 images, 4 sites), clinics (the same size; two sites mix T2/FLAIR "
                            "into T1c: the new-sites benchmark) or kaggle (the real set's 7,023); default quickstart")
    synth.add_argument("--seed", type=SEED, default=0, help=f"seed of the generator ({SEED}, default 0)")
    synth.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    info = add_command(data, "info", cmd_data_info,
                       "what the loader sees in a Kaggle-layout folder, and its duplicates")
    info.add_argument("root", help="data folder (Training/ and Testing/ inside)")
    info.add_argument("--cache-dir", default=None,
                      help="decoded-image cache (default: $EDGEMRI_CACHE_DIR or ~/.cache/edgemri)")
    info.add_argument("--json", action="store_true", help="everything as JSON; 'duplicates' lists every group")

    sites = add_command(data, "sites", cmd_data_sites, "the appearance sites of data without site labels: label mix, "
                                                "evaluation pools, example grids (sites.md/json/png)")
    sites.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    add_config(sites, "YAML config (federation.partition.pseudo_sites, data.split_seed), e.g. "
                      "configs/kaggle-federation.yaml")
    sites.add_argument("--out", required=True, help="folder for sites.md, sites.json and sites.png")

    part = add_command(data, "partition", cmd_data_partition,
               "write one manifest per client (hospital / phone) from the data's scanner sites")
    part.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    add_config(part, "YAML config (its federation section)")
    part.add_argument("--out", required=True, help="folder for client-NNN.json manifests")


def _model_commands(commands: argparse._SubParsersAction) -> None:
    """models summary, distill and federate."""
    models = commands.add_parser("models", help="the registered models").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    summary = add_command(models, "summary", cmd_models_summary,
                  "parameters, MFLOPs, state-dict bytes and the paper's estimated size per model")
    summary.add_argument("--json", action="store_true")

    distill = add_command(commands, "distill", cmd_distill,
                  "train the teacher, the baseline student and the KD student; write the report")
    add_config(distill)
    distill.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    distill.add_argument("--out", default="runs/distill", help="run folder (default: runs/distill)")
    distill.add_argument("--seeds", type=SEEDS, default=1, metavar="N",
                         help=f"repeat with seeds seed..seed+N-1 (N: {SEEDS}, default 1)")
    distill.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    distill.add_argument("--show-scans", action="store_true",
                         help="draw a few correctly and wrongly classified Testing scans (examples.png, shown in "
                              "report.html) for real data too (always on edgemri's synthetic data)")
    add_tracking(distill, on=None, store="the config's tracking.dir, else mlruns beside --out")
    fed = add_command(commands, "federate", cmd_federate,
              "personalize the distilled student with a Flower federation (simulation)")
    add_config(fed)
    fed.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    fed.add_argument("--start", default=None,
                     help="start model: a checkpoint or a pretrained name such as kaggle-student (default: "
                          "federation.start_checkpoint or runs/demo/distill/student.pt)")
    fed.add_argument("--out", default="runs/federation", help="run folder (default: runs/federation)")
    fed.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    add_tracking(fed, on=None, store="the config's tracking.dir, else mlruns beside --out (where `distill` puts "
                                     "its runs, so the federation becomes a child of its distillation)")


def _privacy_commands(commands: argparse._SubParsersAction) -> None:
    privacy = commands.add_parser("privacy", help="privacy-budget reports and the privacy/accuracy sweep"
                                  ).add_subparsers(dest="privacy_command", required=True, metavar="SUBCOMMAND")
    report = add_command(privacy, "report", cmd_privacy_report, "write privacy.json/.md/.png for a federation run")
    report.add_argument("run_dir", help="a federation run folder")
    attack = add_command(privacy, "attack", cmd_privacy_attack,
                 "replay sampled clients' updates of a finished federation run and attack them (reconstruction, "
                 "membership); write privacy-attacks.json/.md/.png with a model card per client")
    attack.add_argument("run_dir", help="a finished federation run folder (untrusted: every file is checked)")
    attack.add_argument("--clients", type=ATTACK_CLIENTS, default=4,
                        help=f"clients to attack, sampled by tier ({ATTACK_CLIENTS}, default 4)")
    attack.add_argument("--rounds", type=ROUND, nargs="+", action=AtMost, most=MAX_REPLAYED_ROUNDS, default=None,
                        metavar="R", help=f"rounds to replay, at most {MAX_REPLAYED_ROUNDS} (default: each client's "
                                          f"first trained round)")
    attack.add_argument("--seed", type=SEED, default=0,
                        help=f"seed of the sampling and the attacks ({SEED}, default 0)")
    attack.add_argument("--inversion-steps", type=INVERSION_STEPS, default=300,
                        help=f"gradient-inversion steps per attack ({INVERSION_STEPS}, default 300, about 4 s each)")
    attack.add_argument("--data-root", default=None, help="the run's data folder (default: the one it recorded)")
    attack.add_argument("--start", default=None, help="the run's start model (default: the one it recorded)")
    attack.add_argument("--write-reconstructions", action="store_true",
                        help="write the grid of reconstructed scans for real data too (always on synthetic data)")
    audit = add_command(privacy, "audit", cmd_privacy_audit,
                "the one-run DP audit (Steinke, Nasr, Jagielski 2023): train each tier's largest client with DP-SGD as "
                "configured, at a weak setting and without DP, on its scans plus coin-included canaries; write "
                "privacy-audit.json/.md/.png with the empirical epsilon lower bound beside the accounted epsilon")
    audit.add_argument("--config", default="configs/quickstart.yaml",
                       help="YAML config (default: configs/quickstart.yaml)")
    add_overrides(audit)
    audit.add_argument("--data-root", default=None, help="Kaggle-layout folder (overrides data.root)")
    audit.add_argument("--tier", default=None, help="the tier to audit, e.g. phone or hospital (default: every tier)")
    audit.add_argument("--canaries", type=CANARIES, default=500, help=f"canaries m ({CANARIES}, default 500)")
    audit.add_argument("--seed", type=SEED, default=0,
                       help=f"seed of the canaries, the coins and the noise ({SEED}, default 0)")
    audit.add_argument("--start", default=None,
                       help="the model the clients start from (default: federation.start_checkpoint, else a fresh "
                            "seeded student)")
    audit.add_argument("--out", default="runs/privacy-audit",
                       help="folder for the report (default: runs/privacy-audit)")
    sweep = add_command(privacy, "sweep", cmd_privacy_sweep,
                "run the federation at several target epsilons and without DP; tabulate accuracy")
    add_config(sweep)
    sweep.add_argument("--data-root", default=None)
    sweep.add_argument("--start", default=None, help="start model (default: runs/demo/distill/student.pt)")
    sweep.add_argument("--epsilons", type=CommaList(float, MAX_EPSILONS, "1,3,8", _check_epsilons),
                       default=[1.0, 3.0, 8.0],
                       help=f"comma-separated target epsilons, finite and positive, at most {MAX_EPSILONS} "
                            f"(default 1,3,8)")
    sweep.add_argument("--out", default="runs/privacy-sweep")
    sweep.add_argument("--resume", action="store_true", help="reuse finished runs in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemri", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgemri {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(commands)
    _model_commands(commands)
    _privacy_commands(commands)
    from edgemri.deploy_commands import register as register_deploy_commands
    from edgemri.edge_commands import register as register_edge_commands

    register_deploy_commands(commands, add_command)
    register_edge_commands(commands, add_command)

    report = add_command(commands, "report", cmd_report, "write report.html in a run folder: one self-contained "
                         "page with the key numbers and figures of every report the folder holds")
    report.add_argument("run_dir", help="a run folder of distill, federate, privacy attack or privacy audit")

    demo = add_command(commands, "demo", cmd_demo, "run the whole pipeline on the offline synthetic data (or on a "
                                           "Kaggle-layout folder: --data-root)")
    demo.add_argument("--data-root", default=None,
                      help="run on this Kaggle-layout folder (e.g. the real set, with --config "
                           "configs/kaggle-federation.yaml) instead of synthesizing data")
    demo.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    demo.add_argument("--config", default="configs/quickstart.yaml",
                      help="YAML config (default: configs/quickstart.yaml)")
    add_tracking(demo, on=True, store="OUT/mlruns")
    return parser


def _fail(message: str) -> int:
    """One line on stderr, exit 2: a message with more lines keeps its first; the rest goes to the debug log.
    Escaped (``printable``): a message may quote a file name or a foreign error, and neither drives the terminal."""
    first, *rest = message.strip().splitlines() or [""]
    print(f"edgemri: error: {printable(first)}", file=sys.stderr)
    for line in rest:
        log.debug("%s", line)
    return 2


def system_error_message(err: OSError) -> str:
    """The system's reason and the file(s), e.g. ``No space left on device: runs/demo/report.json``."""
    if not err.strerror:
        return str(err) or type(err).__name__
    files = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return f"{err.strerror}: {files}" if files else err.strerror


def main(argv: list[str] | None = None) -> int:
    """Bad input of any kind is an ``EdgemriError`` (exit 2, one line); anything else is a bug with a traceback."""
    logging.basicConfig(level=logging.INFO, format="edgemri: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgemriError as err:
        return _fail(str(err) or type(err).__name__)
    except OSError as err:  # disk full, permission denied: the system's doing, not a bug
        return _fail(system_error_message(err))


