"""report.html: one self-contained page per run folder, from the reports the folder already holds.

Each report that exists (distillation, federation, privacy, privacy attacks, DP audit) gets a section with its key
numbers from its JSON and the figures its report module drew, embedded as data: URIs; the distillation's also its
example scans where the distill step drew them (synthetic data, or the user's --show-scans). The page loads nothing
(a Content-Security-Policy forbids it), runs no script, and escapes every text it takes from a JSON: a run folder
is untrusted, and a config value or a site name could hold markup.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.io import write_text
from edgemri.core.untrusted import BOOL, OBJECT, check_record, list_of, number, one_of, text
from edgemri.reports.common import flat_items, package_versions
from edgemri.reports.distill import EXAMPLES_FILE, EXAMPLES_JSON, EXAMPLES_KIND, label
from edgemri.reports.privacy import ReportError, read_json
from edgemri.reports.privacy_attacks import RECONSTRUCTIONS_FILE
from edgemri.reports.privacy_audit import noise_text

PAGE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_BYTES = 32 * 2**20  # the reports' figures are a few hundred KB; a larger file is not a figure of ours


@dataclass(frozen=True)
class Numbers:
    """A section's key numbers: facts (label, value) above a table."""

    facts: list[tuple[str, Any]]
    headers: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Section:
    """One report a run folder may hold: its JSON, the kind that JSON states, its figures, its key numbers."""

    title: str
    json_file: str
    kind: str  # the JSON's "kind" up to its version, e.g. "edgemri.federation-report"
    figures: tuple[tuple[str, str], ...]  # (file, caption)
    numbers: Callable[[dict[str, Any]], Numbers]
    seed: Callable[[dict[str, Any]], Any]
    more: Callable[[Path], str] | None = None  # HTML from the folder's other files, after the figures


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def _mean_std(stats: dict[str, Any]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _interval(ci: dict[str, Any] | None) -> str:
    """A paired difference in points with its CI: "+1.2 [-0.8, +3.1]"."""
    if not ci or not ci["n"]:
        return "—"
    mean = f"{100 * ci['mean']:+.1f}"
    return mean if ci["n"] < 2 or math.isnan(ci["low"]) else f"{mean} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def _distill_numbers(report: dict[str, Any]) -> Numbers:
    facts = [("seeds", ", ".join(map(str, report["seeds"]))), ("checkpoints selected on", report["selected_on"]),
             ("calibrated on", report["calibrated_on"]), ("Testing images", report["data"]["testing_images"]),
             ("share of the teacher-baseline gap KD closes (%)", _pct(report["gap_closed"])),
             ("data fingerprint", report["data"]["fingerprint"]), ("seconds", f"{report['seconds']:.0f}")]
    rows = []
    for stage in report["stages"]:
        m = report["models"][stage]
        coverage = m.get("test_accuracy_at_90_coverage")
        rows.append([label(stage), _mean_std(m["test_accuracy"]), f"{m['test_macro_f1']['mean']:.3f}",
                     f"{m['test_ece']['mean']:.3f}", _pct(coverage["mean"]) if coverage else "—",
                     f"{m['trainable_params']:,}"])
    return Numbers(facts, ["model", "test accuracy (%, mean ± std)", "macro-F1", "ECE", "accuracy at 90% coverage (%)",
                           "trainable params"], rows)


FEDERATION_COLUMNS = ("start", "global", "personalized", "local-only", "pooled", "oracle")


def _federation_numbers(report: dict[str, Any]) -> Numbers:
    section = report.get("pool") or report  # the site pools, where the clients had them: the primary metric
    where = "site pools" if report.get("pool") else "local test splits"
    central = report["central"]
    facts = [("method", report["method"]), ("rounds", len(report["rounds"])), ("best round", report["best_round"]),
             ("clients", len(report["clients"])), ("failed at the end", len(report["final_failed"])),
             ("scored on", f"each client's {where}")]
    if central["final"]:
        facts.append(("global model on Testing (%)", f"{_pct(central['start'].get('accuracy'))} at the start, "
                                                     f"{_pct(central['final'].get('accuracy'))} at the end"))
    paired = section["paired"]["groups"]
    rows = [[group, sum(group in ("all", r["kind"]) for r in section["clients"]),
             *(_pct(stats[column]["mean"]) for column in FEDERATION_COLUMNS),
             _interval(paired.get(group, {}).get("personalized - start"))]
            for group, stats in section["summary"].items()]
    return Numbers(facts, ["group", "clients", *(f"{c} (mean %)" for c in FEDERATION_COLUMNS),
                           "personalized − start (points, 95% CI)"], rows)


def _privacy_numbers(report: dict[str, Any]) -> Numbers:
    central = report["client_level"]
    facts = [("accountant", report["accountant"]),
             ("client-level (central) DP", f"({_num(central.get('epsilon'), '.2f')}, "
                                           f"{_num(central.get('delta'), '.1e')})-DP for one whole client"
              if central["enabled"] else "off"),
             ("not protected", report["not_protected"])]
    rows = []
    for tier in sorted({c["kind"] for c in report["sample_level"].values()}):
        private = [c for c in report["sample_level"].values() if c["kind"] == tier and c["dp"]]
        spent = [c["epsilon"] for c in private]
        budgets = sorted({c["budget_epsilon"] for c in private})
        rows.append([tier, sum(c["kind"] == tier for c in report["sample_level"].values()), len(private),
                     _num(statistics.median(spent), ".2f") if spent else "—", _num(max(spent), ".2f") if spent else "—",
                     ", ".join(map(str, budgets)) or "—", sum(c["remaining_epsilon"] <= 0 for c in private)])
    return Numbers(facts, ["tier", "clients", "DP-SGD on", "epsilon spent (median)", "epsilon spent (max)",
                           "budget epsilon", "at or above budget"], rows)


def _attack_numbers(report: dict[str, Any]) -> Numbers:
    run, settings = report["run"], report["settings"]
    attacked = f"{len(report['clients'])} of {run['clients']}, sampled with seed {settings['seed']}"
    facts = [("federation", f"{run['method']}, {run['rounds']} rounds, seed {run['seed']}"),
             ("attacked clients", attacked),
             ("gradient-inversion steps", settings["inversion"]["steps"])]
    rows = [[group, s["clients"], s["updates"], _num(s["analytic_sent_margin_db"], "+.1f"),
             _num(s["membership_auc"], ".2f"), _num(s["calibrated_membership_auc"], ".2f"),
             f"{s['replays_matching']}/{s['updates']}"] for group, s in report["summary"].items()]
    return Numbers(facts, ["group", "clients", "updates", "sent update, analytic − random scan (dB)",
                           "membership AUC (loss)", "membership AUC (calibrated)", "replays exact"], rows)


def _audit_numbers(report: dict[str, Any]) -> Numbers:
    facts = [("method", report["method"]), ("canaries", report["canaries"]), ("seed", report["seed"]),
             *((f"reading: {kind}", tier["reading"]) for kind, tier in report["tiers"].items())]
    rows = [[kind, tier["client"], name, noise_text(r),
             ("∞ (no noise)" if r["accounted_epsilon"] is None else f"{r['accounted_epsilon']:.3g}")
             if r["trained"] else "—",
             f"{r['empirical_epsilon']:.2f}" if r["trained"] else f"not trained: {r['why']}"]
            for kind, tier in report["tiers"].items() for name, r in tier["settings"].items()]
    return Numbers(facts, ["tier", "client", "setting", "noise multiplier", "accounted epsilon",
                           "empirical epsilon (95% lower bound)"], rows)


EXAMPLES_SCHEMA = {"kind": one_of((EXAMPLES_KIND,)), "shown": BOOL, "why_not_shown": text(300).nullable(),
                   "examples": list_of(OBJECT, 0, 64)}
EXAMPLE_SCHEMA = {"outcome": one_of(("correct", "wrong")), "true": one_of(CLASS_NAMES),
                  "predicted": one_of(CLASS_NAMES), "confidence": number(0, 1)}


def _examples_html(run_dir: Path) -> str:
    """The distillation's example scans (examples.json, examples.png) with a table of what each shows, or the one
    line that says why there are none; nothing for a run from before examples were drawn."""
    path = run_dir / EXAMPLES_JSON
    if not path.is_file():
        return ""
    record = check_record(read_json(path), EXAMPLES_SCHEMA, str(path), ReportError, extra=True)
    rows = [check_record(row, EXAMPLE_SCHEMA, str(path), ReportError, within=f"examples[{k}]")
            for k, row in enumerate(record["examples"])]
    heading = '<h3 id="examples">Example scans</h3>'
    if not record["shown"]:
        return f'{heading}\n<p class="source">{_e(record["why_not_shown"])}</p>'
    if not (run_dir / EXAMPLES_FILE).is_file():
        raise ReportError(f"{path} says its scans are drawn, but {run_dir / EXAMPLES_FILE} is missing")
    correct = sum(row["outcome"] == "correct" for row in rows)
    caption = (f"{correct} correctly and {len(rows) - correct} wrongly classified Testing scans of the KD student "
               f"(first seed), each with its true class, predicted class and calibrated confidence")
    return "\n".join([heading, _figure(run_dir / EXAMPLES_FILE, caption),
                      _table(["classified", "true class", "predicted class", "confidence (%)"],
                             [[f"{row['outcome']}ly", row["true"], row["predicted"], _pct(row["confidence"])]
                              for row in rows], "numbers")])


SECTIONS = (
    Section("Distillation", "report.json", "edgemri.distillation-report",
            (("curves.png", "Training curves (first seed)"),
             ("confusion.png", "Confusion matrices on Testing (first seed)"),
             ("reliability.png", "Reliability before and after temperature scaling (first seed)"),
             ("coverage.png", "Accuracy against coverage: the rest referred to a doctor")),
            _distill_numbers, lambda r: ", ".join(map(str, r["seeds"])), _examples_html),
    Section("Federation", "federation.json", "edgemri.federation-report",
            (("federation.png", "Accuracy per round, and per tier the distribution of each client's personal gain"),),
            _federation_numbers, lambda r: r["seed"]),
    Section("Privacy", "privacy.json", "edgemri.privacy-report",
            (("privacy.png", "Cumulative epsilon over the rounds, with each budget"),),
            _privacy_numbers, lambda r: r["seed"]),
    Section("Privacy attacks", "privacy-attacks.json", "edgemri.privacy-attacks",
            (("privacy-attacks.png", "Accuracy gain against epsilon, and what the attacks reconstruct"),
             (RECONSTRUCTIONS_FILE, "Attacked scans and their reconstructions (synthetic data or the user's flag)")),
            _attack_numbers, lambda r: r["run"]["seed"]),
    Section("DP audit", "privacy-audit.json", "edgemri.privacy-audit",
            (("privacy-audit.png", "Empirical epsilon lower bound beside the accounted epsilon, per tier"),),
            _audit_numbers, lambda r: r["seed"]),
)


def has_report(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any report that report.html shows."""
    return any((Path(run_dir) / s.json_file).is_file() for s in SECTIONS)


def _e(value: Any) -> str:
    """Any value as HTML text, quotes included: nothing read from a run folder is markup. None is a dash."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>' if headers else \
        f'<table class="{css}"><tbody>{body}</tbody></table>'


def _figure(path: Path, caption: str) -> str:
    """The PNG at ``path`` embedded as a data: URI; ReportError when it is not a PNG of a sane size."""
    size = path.stat().st_size
    if size > MAX_FIGURE_BYTES:
        raise ReportError(f"{path}: {size:,} bytes is over the {MAX_FIGURE_BYTES:,}-byte limit for a figure")
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ReportError(f"{path} is not a PNG image")
    return (f'<figure><img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" '
            f'alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')


def _load(section: Section, run_dir: Path) -> dict[str, Any] | None:
    """The section's JSON when the folder holds it, checked to be the report it names."""
    path = run_dir / section.json_file
    if not path.is_file():
        return None
    report = read_json(path)
    kind = report.get("kind") if isinstance(report, dict) else None
    if not isinstance(kind, str) or not kind.startswith(section.kind + "/"):
        raise ReportError(f"{path} has kind {str(kind)[:60]!r}; expected {section.kind}/<version>")
    return report


def _read(section: Section, run_dir: Path, report: dict[str, Any], what: Callable[[dict[str, Any]], Any]) -> Any:
    """``what`` of a report; a report that lacks a key or holds a value of the wrong type is one ReportError."""
    try:
        return what(report)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ReportError(f"{run_dir / section.json_file} is not a {section.title.lower()} report this edgemri can "
                          f"read ({type(err).__name__}: {str(err)[:80]})") from None


def _section_html(section: Section, report: dict[str, Any], run_dir: Path) -> str:
    numbers = _read(section, run_dir, report, section.numbers)
    figures = [_figure(run_dir / name, caption) for name, caption in section.figures if (run_dir / name).is_file()]
    anchor = section.json_file.removesuffix(".json")
    return "\n".join([f'<section id="{_e(anchor)}"><h2>{_e(section.title)}</h2>',
                      f"<p class=\"source\">From {_e(section.json_file)} ({_e(report['kind'])}).</p>",
                      _table([], numbers.facts, "facts"), _table(numbers.headers, numbers.rows, "numbers"),
                      *figures, section.more(run_dir) if section.more else "", "</section>"])


def _header(run_dir: Path, found: list[tuple[Section, dict[str, Any]]]) -> str:
    """The run's kind (the reports it holds), its seed(s), and its config (from the first report that has one)."""
    seeds = list(dict.fromkeys(str(_read(section, run_dir, report, section.seed)) for section, report in found))
    config = next((report["config"] for _, report in found if isinstance(report.get("config"), dict)), None)
    facts = [("run folder", run_dir), ("kind", ", ".join(section.title.lower() for section, _ in found)),
             ("seed", "; ".join(seeds))]
    if config is not None:
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        facts += [("data", data.get("root", "—")), ("synthetic preset", data.get("synth_preset", "—"))]
    lines = [f"<header><h1>edgemri run: {_e(run_dir.resolve().name)}</h1>", _table([], facts, "facts")]
    if config is not None:
        rows = [(key, json.dumps(value)) for key, value in flat_items(config)]
        lines += ["<details><summary>config</summary>", _table(["key", "value"], rows, "config"), "</details>"]
    return "\n".join([*lines, "</header>"])


def _footer(found: list[tuple[Section, dict[str, Any]]]) -> str:
    """The versions each report was made with, and those that wrote this page; no links."""
    made = [f"{section.title}: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
            for section, report in found if isinstance(report.get("versions"), dict)]
    page = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return "\n".join(["<footer>", *(f"<p>{_e(line)}</p>" for line in made),
                      f"<p>This page: {_e(page)}. Results on synthetic data are not clinical results.</p>",
                      "</footer>"])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } table.facts td:first-child { font-weight: 600; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .source, footer { color: #555; font-size: .85rem; }
footer { margin-top: 3rem; border-top: 1px solid #ccc; }
"""
# No network, no script, no plugin: only the inline style and the embedded images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def write_html_report(run_dir: Path) -> Path:
    """RUN_DIR/report.html from the reports the folder holds, written atomically; ReportError when it holds none
    or one cannot be read."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    found = [(section, report) for section in SECTIONS if (report := _load(section, run_dir)) is not None]
    if not found:
        raise ReportError(f"{run_dir} holds no report (looked for {', '.join(s.json_file for s in SECTIONS)})")
    sections = [_section_html(section, report, run_dir) for section, report in found]
    page = "\n".join(['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
                      f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>edgemri run: {_e(run_dir.resolve().name)}</title>", f"<style>{STYLE}</style>",
                      "</head><body>", _header(run_dir, found), "<main>", *sections, "</main>", _footer(found),
                      "</body></html>", ""])
    return write_text(run_dir / PAGE, page)
