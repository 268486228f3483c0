"""docs/RESULTS.md and the README's headline table are generated from benchmarks/results/*.json and never drift.

Pure file and JSON work: no model, no training.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not part of the installed package
    sys.path.insert(0, str(ROOT))
report = importlib.import_module("benchmarks.report")


def test_results_doc_and_readme_block_are_current() -> None:
    stale = report.stale_files(ROOT)
    assert stale == [], f"{', '.join(stale)} stale against benchmarks/results/*.json: run python -m benchmarks.report"


def test_the_readme_stays_short_and_usage_first() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; at most 250 (details belong in docs/)"
    own_data = next(i for i, line in enumerate(lines, 1) if line.startswith("## ") and "own data" in line)
    assert own_data <= 80 and lines.index("## Quickstart") < own_data


def test_markdown_table_escapes_pipes_and_line_breaks() -> None:
    table = report.markdown_table(["a|b", "n"], [["x|y", "1\n2"]])
    lines = table.splitlines()
    assert lines[0] == "| a\\|b | n |"
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| x\\|y | 1 2 |"
    # every row keeps exactly its own column separators: the escaped pipe is not one
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)


def test_markdown_table_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        report.markdown_table(["a"], [["x", "y"]])


def test_a_missing_key_leaves_out_its_row_not_the_document() -> None:
    kaggle = json.loads((ROOT / "benchmarks" / "results" / "kaggle.json").read_text())
    assert "KD, the paper's recipe |" in "\n".join(report.kaggle(kaggle))
    del kaggle["paper-kd.dedup_testing_accuracy_pct_values"]  # as an older run without this key
    text = "\n".join(report.kaggle(kaggle))
    assert "KD, the paper's recipe |" not in text.split("**The paper's published")[0]  # its Table 1 row is gone
    assert "KD, the shipped recipe |" in text and "baseline student (CE) |" in text  # the others stay


def test_every_layout_survives_an_empty_or_partial_results_file() -> None:
    results = report.load_results(ROOT)
    partial = {name: dict(list(values.items())[::2]) for name, values in results.items()}  # every other key
    for broken in ({name: {} for name in results}, partial):
        text = report.render_results(broken)
        assert text.startswith("# Results")
        report.render_headline(broken)


def test_check_names_the_stale_file_and_write_makes_it_current(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    (tmp_path / "README.md").write_text(f"# x\n\n{report.README_START}\nstale block\n{report.README_END}\n\nafter\n")
    assert report.main(["--check"], root=tmp_path) == 1
    assert "docs/RESULTS.md, README.md" in capsys.readouterr().out

    assert report.main([], root=tmp_path) == 0
    assert report.main(["--check"], root=tmp_path) == 0
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# x\n\n") and readme.endswith("\n\nafter\n") and "stale block" not in readme

    results = tmp_path / "benchmarks" / "results" / "dp_speed.json"
    values = json.loads(results.read_text())
    values["dp_batch8_img_per_s"] += 100.0  # a re-run benchmark
    results.write_text(json.dumps(values))
    capsys.readouterr()
    assert report.main(["--check"], root=tmp_path) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "docs/RESULTS.md" in out and "README.md" not in out


def test_readme_without_markers_is_stale(tmp_path: Path) -> None:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# no markers\n")
    assert report.stale_files(tmp_path) == ["docs/RESULTS.md", "README.md"]


def test_the_load_test_renders_its_rounds_faults_and_goals_from_a_hand_built_result() -> None:
    """No load.json is committed yet: the renderer is checked on a result shaped as benchmarks/load.py writes it."""
    values = {"nodes": 3, "warm_nodes": 1, "cold_nodes": 2, "rounds_asked": 2, "killed": ["phone-a"], "kill_round": 2,
              "round1_s": 40.0, "round1_trained": 3, "round1_failed": [], "round1_up_not_trained": [],
              "round1_reply_after_round_start_s_p50": 12.0, "round1_superlink_rss_peak_mb": 150.0,
              "round2_s": 300.0, "round2_trained": 1, "round2_failed": ["phone-a"],
              "round2_up_not_trained": ["phone-b"],
              "updates_lost": 1, "epsilon_max": 2.5, "supernode_replies_dropped": 4,
              "goal_every_round_completes_with_the_clients_up": False, "goal_nothing_left_running": True}
    text = "\n".join(report.load(values))
    assert "| 2 | 1 | 1 | phone-b | 300 |" in text  # round 2: one trained, one failed, one up but not trained
    assert "| updates lost, all devices | 1 |" in text and "| largest epsilon spent | 2.50 |" in text
    assert "| replies dropped by their SuperNode (it does not retry a 500) | 4 |" in text
    assert "database is locked" not in text  # a value the result lacks is left out, not invented
    assert "| every round completes with every client that stayed up | no |" in text
    assert "| nothing left running or listening | yes |" in text
    assert "**Latency**" not in text  # no latency keys, no table
