"""The federation report's paired section, from a hand-built result (no Flower run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemri.core.federation import protocol as p
from edgemri.core.registries import parse_config
from edgemri.core.stats import bootstrap_ci, bootstrap_percentiles
from edgemri.reports.federation import build_federation_report, paired_summary, write_federation_report

CONFIG = parse_config({"seed": 4})
# client -> (kind, start, global, personalized, local-only, test n); phone-b-0 failed its final evaluation
CLIENTS = {"hospital-a": ("hospital", 0.70, 0.75, 0.80, 0.72, 20),
           "hospital-b": ("hospital", 0.60, 0.62, 0.70, 0.65, 30),
           "phone-a-0": ("phone", 0.50, 0.60, 0.55, 0.40, 5), "phone-a-1": ("phone", 0.80, 0.70, 0.90, 0.80, 10),
           "phone-b-0": ("phone", 0.0, 0.0, 0.0, 0.0, 0)}
ORACLE = {"hospital-a": 0.85, "hospital-b": 0.72, "phone-a-0": 0.60, "phone-a-1": 0.90, "phone-b-0": 0.50}
# The runner's references.json: pooled and site-oracle accuracy per client.
REFERENCES = {name: {"pooled-accuracy": value - 0.01, "oracle-accuracy": value} for name, value in ORACLE.items()}


def _result() -> p.FederationResult:
    final = {name: {p.START_ACCURACY: s, p.GLOBAL_ACCURACY: g, p.PERSONAL_ACCURACY: pe, p.LOCAL_ONLY_ACCURACY: lo,
                    p.NUM_EXAMPLES: n}
             for name, (_, s, g, pe, lo, n) in CLIENTS.items() if name != "phone-b-0"}
    return p.FederationResult(
        clients={name: p.ClientInfo(name, kind, name.split("-")[1], 40) for name, (kind, *_) in CLIENTS.items()},
        history=[p.RoundRecord(1, sampled=list(CLIENTS), trained=list(CLIENTS), aggregated=True,
                               eval_metrics={name: {p.GLOBAL_ACCURACY: 0.6, p.PERSONAL_ACCURACY: 0.7}
                                             for name in CLIENTS})],
        final=final, final_failed={"phone-b-0": p.FailureCode.NO_REPLY.value}, retired={}, central_start={},
        central_final={}, central_dp={"enabled": False})


@pytest.fixture(scope="module")
def report() -> dict:
    return build_federation_report(_result(), CONFIG, REFERENCES)


def test_paired_section_holds_the_hand_computed_differences(report: dict) -> None:
    groups = report["paired"]["groups"]
    assert list(groups) == ["all", "hospital", "phone"] and report["paired"]["seeds"] == [4]
    hospital = groups["hospital"]["personalized - start"]  # +10 points on both hospitals: no spread
    assert hospital["n"] == 2
    assert (hospital["mean"], hospital["low"], hospital["high"]) == pytest.approx((0.10, 0.10, 0.10))
    phone = groups["phone"]["personalized - global"]  # -5 and +20 points; the failed phone has no pair
    assert phone["n"] == 2 and phone["mean"] == pytest.approx(0.075)
    assert phone["low"] == pytest.approx(-0.05) and phone["high"] == pytest.approx(0.20)
    assert groups["phone"]["personalized - local-only"]["mean"] == pytest.approx((0.15 + 0.10) / 2)
    assert groups["phone"]["oracle - personalized"]["mean"] == pytest.approx((0.05 + 0.0) / 2)
    assert groups["hospital"]["oracle - start"]["mean"] == pytest.approx((0.15 + 0.12) / 2)  # the headroom
    assert report["clients"][0]["pooled"] == pytest.approx(0.84)
    everyone = groups["all"]["personalized - start"]
    expected = bootstrap_ci([0.80 - 0.70, 0.70 - 0.60, 0.55 - 0.50, 0.90 - 0.80])  # the rows' order
    assert everyone["n"] == 4 and everyone["mean"] == pytest.approx(0.0875)
    assert (everyone["low"], everyone["high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))


def test_paired_summary_pools_clients_across_seeds(report: dict) -> None:
    rows = report["clients"]
    pooled = paired_summary({0: rows, 1: rows}, ["hospital", "phone"])
    single = report["paired"]["groups"]["all"]["personalized - global"]
    both = pooled["groups"]["all"]["personalized - global"]
    assert both["n"] == 2 * single["n"] and both["mean"] == pytest.approx(single["mean"])
    assert both["high"] - both["low"] < single["high"] - single["low"]  # twice the clients, a narrower interval


def test_markdown_table_json_and_plot_show_the_paired_section(report: dict, tmp_path: Path) -> None:
    paths = write_federation_report(report, tmp_path)
    markdown = paths["md"].read_text()
    assert "| hospital | +10.0 [+10.0, +10.0] (n=2) | +6.5 [+5.0, +8.0] (n=2) |" in markdown
    assert "| phone | +7.5 [+5.0, +10.0] (n=2) | +7.5 [-5.0, +20.0] (n=2) |" in markdown
    assert "(5-30 here) these intervals are wide" in markdown and "one run, one seed" in markdown
    assert json.loads(paths["json"].read_text())["paired"]["groups"]["phone"]["oracle - personalized"]["n"] == 2
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_a_run_whose_clients_had_site_pools_reports_them_as_their_own_section() -> None:
    result = _result()
    assert build_federation_report(result, CONFIG)["pool"] is None  # no pools: no section
    for k, metrics in enumerate(result.final.values()):
        metrics.update({p.POOL_PREFIX + p.START_ACCURACY: 0.5, p.POOL_PREFIX + p.PERSONAL_ACCURACY: 0.6 + k / 100,
                        p.POOL_EXAMPLES: 300.0})
    pool = build_federation_report(result, CONFIG)["pool"]
    rows = {r["client"]: r for r in pool["clients"]}
    assert rows["hospital-b"]["personalized"] == pytest.approx(0.61) and rows["hospital-b"]["num_test"] == 300
    assert pool["paired"]["groups"]["hospital"]["personalized - start"]["mean"] == pytest.approx(0.105)


# 40 clients, gains in points (personalized - start): hospital-00..09 gain +1..+10, phone-00..29 gain -10..+19.
# Every global model scores 62%, 2 points above the start.
POPULATION = {**{f"hospital-{k:02d}": ("hospital", k + 1) for k in range(10)},
              **{f"phone-{k:02d}": ("phone", k - 10) for k in range(30)}}


def _population_result() -> p.FederationResult:
    final = {name: {p.START_ACCURACY: 0.60, p.GLOBAL_ACCURACY: 0.62, p.PERSONAL_ACCURACY: 0.60 + gain / 100,
                    p.LOCAL_ONLY_ACCURACY: 0.60, p.NUM_EXAMPLES: 50} for name, (_, gain) in POPULATION.items()}
    return p.FederationResult(
        clients={name: p.ClientInfo(name, kind, f"site-{k % 3}", 40)
                 for k, (name, (kind, _)) in enumerate(POPULATION.items())},
        history=[p.RoundRecord(1, sampled=list(POPULATION), trained=list(POPULATION), aggregated=True)],
        final=final, final_failed={}, retired={}, central_start={}, central_final={}, central_dp={"enabled": False})


def test_a_tiers_spread_is_summarised_by_percentiles_shares_and_its_worst_clients() -> None:
    spread = build_federation_report(_population_result(), CONFIG)["distribution"]
    assert spread["percentiles"] == [10, 25, 50, 75, 90] and spread["tie_band"] == 0.005
    phone = spread["groups"]["phone"]
    gains = phone["personalized - start"]
    assert phone["clients"] == 30 and gains["n"] == 30
    # numpy's linear percentiles of -10..+19 points: positions 2.9, 7.25, 14.5, 21.75, 26.1 of 0..29
    assert [q["value"] for q in gains["percentiles"]] == pytest.approx([-0.071, -0.0275, 0.045, 0.1175, 0.161])
    expected = bootstrap_percentiles([(k - 10) / 100 for k in range(30)], [10, 25, 50, 75, 90])
    assert [q["low"] for q in gains["percentiles"]] == pytest.approx([e.low for e in expected])
    assert [q["high"] for q in gains["percentiles"]] == pytest.approx([e.high for e in expected])
    assert all(q["low"] <= q["value"] <= q["high"] for q in gains["percentiles"])
    # helped: +1..+19 (19 phones); hurt: -10..-1 (10); the phone at 0 is neither
    assert gains["helped"]["mean"] == pytest.approx(19 / 30) and gains["hurt"]["mean"] == pytest.approx(10 / 30)
    helped = bootstrap_ci([float(k > 10) for k in range(30)])
    assert (gains["helped"]["low"], gains["helped"]["high"]) == pytest.approx((helped.low, helped.high))
    against_global = phone["personalized - global"]  # 2 points lower: -12..+17; the phone at 0 is neither
    assert against_global["helped"]["mean"] == pytest.approx(17 / 30)
    assert against_global["hurt"]["mean"] == pytest.approx(12 / 30)
    assert [w["client"] for w in phone["worst"]] == [f"phone-{k:02d}" for k in range(10)]
    assert phone["worst"][0]["personalized - start"] == pytest.approx(-0.10)
    assert phone["worst"][0]["personalized - global"] == pytest.approx(-0.12)
    hospital = spread["groups"]["hospital"]  # a tier of 10: every client, lowest gain first, none hurt
    assert [w["client"] for w in hospital["worst"]] == [f"hospital-{k:02d}" for k in range(10)]
    assert hospital["personalized - start"]["hurt"]["mean"] == 0.0


def test_many_clients_get_a_summary_page_while_the_json_keeps_every_client(report: dict, tmp_path: Path) -> None:
    paths = write_federation_report(build_federation_report(_population_result(), CONFIG), tmp_path)
    markdown = paths["md"].read_text()
    assert "| phone | personalized - start | 30 of 30 | -7.1 [" in markdown
    assert "| 63.3 [" in markdown and "| 33.3 [" in markdown  # helped and hurt shares
    assert "| phone | phone-00 | site-1 | 60.0 | 50.0 | -10.0 | -12.0 |" in markdown
    assert "phone-10" not in markdown and "phone-29" not in markdown  # not among the worst 10: no row
    assert "Every client:" not in markdown and "Every one of the 40 clients has its row in federation.json" in markdown
    rows = json.loads(paths["json"].read_text())["clients"]
    assert sorted(r["client"] for r in rows) == sorted(POPULATION)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    few = (tmp_path / "few")
    few.mkdir()
    small = write_federation_report(report, few)["md"].read_text()  # 5 clients: every one still listed
    assert "Every client:" in small and "| phone-b-0 (failed) | phone |" in small
