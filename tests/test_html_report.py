"""report.html: one self-contained page per run folder, checked as text and, where a browser is installed, in one."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from edgemri.core.data.dataset import SYNTH_GENERATOR, ArraySplit
from edgemri.core.federation import protocol as p
from edgemri.core.registries import parse_config
from edgemri.main import main
from edgemri.reports.distill import EXAMPLES_FILE, EXAMPLES_JSON, NOT_SHOWN, build_examples, write_examples
from edgemri.reports.federation import build_federation_report, write_federation_report
from edgemri.reports.html import PNG_SIGNATURE, ReportError, write_html_report
from edgemri.reports.privacy import build_privacy_report, write_privacy_report
from edgemri.simulation.pipeline import DemoLayout
from tests.conftest import one_error_line
from tests.test_distill import FAST

PLANTED = '<script>alert("planted")</script>'  # a config value a run folder's author controls
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "test-report-screenshot.png"  # runs/ is git-ignored
PHONES_WITH_DP = {"phone": {"enabled": True, "target_epsilon": 6.0, "budget_epsilon": 12.0}}
CONFIG = parse_config({"seed": 7, "data": {"root": PLANTED}, "privacy": {"tiers": PHONES_WITH_DP}})


def _result() -> p.FederationResult:
    """Two rounds of a hospital without DP and two phones with DP-SGD, as the server would have recorded them."""
    clients = {"hospital-a": ("hospital", 0.6, 0.7), "phone-a": ("phone", 0.5, 0.6), "phone-b": ("phone", 0.4, 0.55)}
    history = [p.RoundRecord(
        round=r, sampled=list(clients), trained=list(clients), aggregated=True,
        train_metrics={name: {p.EPSILON: 2.0 * r, "delta": 1e-3, "noise-multiplier": 0.9, "sample-rate": 0.2,
                              "max-grad-norm": 1.0} for name in clients if name.startswith("phone")},
        eval_metrics={name: {p.GLOBAL_ACCURACY: 0.5 + 0.05 * r, p.PERSONAL_ACCURACY: 0.55 + 0.05 * r}
                      for name in clients}) for r in (1, 2)]
    final = {name: {p.START_ACCURACY: start, p.GLOBAL_ACCURACY: 0.6, p.PERSONAL_ACCURACY: personal,
                    p.LOCAL_ONLY_ACCURACY: 0.5, p.NUM_EXAMPLES: 20, **({p.EPSILON: 4.0} if kind == "phone" else {})}
             for name, (kind, start, personal) in clients.items()}
    return p.FederationResult(
        clients={name: p.ClientInfo(name, kind, "site-a", 40) for name, (kind, *_) in clients.items()},
        history=history, final=final, final_failed={}, retired={}, central_start={"accuracy": 0.5},
        central_final={"accuracy": 0.6}, central_dp={"enabled": False})


@pytest.fixture(scope="module")
def federation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation run folder as the server leaves it: federation and privacy reports, without Flower."""
    out = tmp_path_factory.mktemp("federation-run")
    result = _result()
    write_federation_report(build_federation_report(result, CONFIG), out)
    write_privacy_report(build_privacy_report(result, CONFIG), out)
    return out


class _Page(HTMLParser):
    """Every tag's attributes, and the text, of one page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _images(page: _Page) -> list[bytes]:
    """Each <img>'s data: URI, decoded; anything else fails the test."""
    decoded = []
    for tag, attrs in page.tags:
        if tag == "img":
            prefix, _, data = (attrs["src"] or "").partition(",")
            assert prefix == "data:image/png;base64", prefix[:40]
            decoded.append(base64.b64decode(data, validate=True))
    return decoded


def test_the_page_is_self_contained_and_shows_every_report_and_figure(federation_run: Path) -> None:
    path = write_html_report(federation_run)
    assert path == federation_run / "report.html"
    text = path.read_text(encoding="utf-8")
    page = _Page(text)
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object", "embed", "base")]
    for tag, attrs in page.tags:  # nothing to fetch: no URL but the embedded images
        for name in ("src", "href", "action", "srcset"):
            assert not (attrs.get(name) or "").startswith(("http:", "https:", "//", "file:")), (tag, name)
    images = _images(page)
    assert images == [(federation_run / name).read_bytes() for name in ("federation.png", "privacy.png")]
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    words = " ".join(page.text)
    for expected in ("Federation", "Privacy", "fedavg-ft", "federation, privacy", "personalized − start", "phone"):
        assert expected in words, expected
    assert "<td>seed</td><td>7</td>" in text
    assert "edgemri" in text.rsplit("<footer>", 1)[1]  # the versions


def test_every_text_from_a_json_is_escaped(federation_run: Path) -> None:
    text = write_html_report(federation_run).read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&quot;planted&quot;)&lt;/script&gt;" in text  # in the header and the config
    assert PLANTED in " ".join(_Page(text).text)  # shown as text, exactly


def _distill_folder(out: Path) -> Path:
    """A distillation run folder: its report.json (the keys the page reads), its four figures and its example scans
    (synthetic: drawn)."""
    import matplotlib.pyplot as plt

    stats = {"test_accuracy": {"mean": 0.9, "std": 0.01}, "test_macro_f1": {"mean": 0.89},
             "test_ece": {"mean": 0.03}, "test_accuracy_at_90_coverage": {"mean": 0.95}, "trainable_params": 12_628}
    report = {"kind": "edgemri.distillation-report/2", "seeds": [0, 1], "selected_on": "validation split of Training",
              "calibrated_on": "validation split of Training", "gap_closed": 0.4, "seconds": 12.0,
              "data": {"testing_images": 400, "fingerprint": "abc"}, "stages": ["teacher", "baseline", "kd"],
              "models": dict.fromkeys(("teacher", "baseline", "kd"), stats), "config": CONFIG.to_dict(),
              "versions": {"edgemri": "test"}}
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report))
    for name in ("curves", "confusion", "reliability", "coverage"):
        plt.imsave(out / f"{name}.png", [[0.0, 1.0], [1.0, 0.0]])
    labels = torch.arange(16) % 4
    scans = ArraySplit(torch.full((16, 3, 32, 32), 90, dtype=torch.uint8), labels, [f"Te-x_{i}.jpg" for i in range(16)])
    predicted = torch.where(torch.arange(16) < 8, labels, (labels + 1) % 4)  # the first half right, the rest wrong
    write_examples(*build_examples(CONFIG, scans, torch.eye(4)[predicted] * 0.6 + 0.1, 0, synthetic=True,
                                   show_scans=False), out)
    return out


def test_a_distillation_folder_shows_its_curves_confusion_reliability_and_coverage(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]
                                                                                  ) -> None:
    folder = _distill_folder(tmp_path / "distill")
    assert main(["report", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {folder / 'report.html'}"
    page = _Page((folder / "report.html").read_text(encoding="utf-8"))
    assert _images(page)[4] == (folder / EXAMPLES_FILE).read_bytes()
    words = " ".join(page.text)
    assert "KD student" in words and "90.00 ± 1.00" in words and "0, 1" in words
    assert "4 correctly and 4 wrongly classified Testing scans" in words


def _distill(data: Path, out: Path, *flags: str) -> dict[str, Any]:
    """`edgemri distill` on ``data`` (FAST), then report.html; examples.json's record."""
    config = out.parent / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    assert main(["distill", "--config", str(config), "--data-root", str(data), "--out", str(out), "--quiet",
                 *flags]) == 0
    write_html_report(out)
    return json.loads((out / EXAMPLES_JSON).read_text())


def _no_file_name(run: Path) -> None:
    """Neither examples.json nor the page names a scan's file (the tiny data's are Te-gl_0001.jpg and the like)."""
    for name in (EXAMPLES_JSON, "report.html"):
        text = (run / name).read_text(encoding="utf-8")
        assert "Te-" not in text and ".jpg" not in text, name


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A distillation of a copy of the tiny data marked as edgemri's synthetic set (its generator's synth.json)."""
    data = shutil.copytree(tiny_data, tmp_path_factory.mktemp("synthetic") / "data")
    (data / "synth.json").write_text(json.dumps({"generator": SYNTH_GENERATOR}))
    out = data.parent / "run"
    _distill(data, out)
    return out


def test_a_synthetic_run_draws_correct_and_wrong_scans_and_the_page_embeds_them(synthetic_run: Path) -> None:
    record = json.loads((synthetic_run / EXAMPLES_JSON).read_text())
    assert record["shown"] and record["synthetic_data"] and not record["show_scans"]
    assert record["config"]["seed"] == record["seed"] == 0 and record["model"] == "kd"
    assert 1 <= len(record["examples"]) <= 8
    for row in record["examples"]:
        assert set(row) == {"outcome", "true", "predicted", "confidence"}  # no file name, no path, no index
        assert (row["true"] == row["predicted"]) == (row["outcome"] == "correct") and 0 <= row["confidence"] <= 1
    page = _Page((synthetic_run / "report.html").read_text(encoding="utf-8"))
    assert (synthetic_run / EXAMPLES_FILE).read_bytes() in _images(page)
    words = " ".join(page.text)
    assert "Example scans" in words and "correctly and" in words and "wrongly classified Testing scans" in words
    _no_file_name(synthetic_run)


def test_a_real_data_run_draws_no_scan_unless_asked(synthetic_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """The same run resumed on the tiny data without synth.json (real data): no scan drawn, an earlier drawing
    removed, the page says why in one line; with --show-scans they are drawn and embedded."""
    run = shutil.copytree(synthetic_run, tmp_path / "run")
    record = _distill(tiny_data, run, "--resume")
    assert not record["shown"] and not record["synthetic_data"] and record["examples"] == []
    assert not (run / EXAMPLES_FILE).exists()
    page = _Page((run / "report.html").read_text(encoding="utf-8"))
    assert len(_images(page)) == 4  # the distillation's figures, no scan
    assert NOT_SHOWN in " ".join(page.text) and "--show-scans" in NOT_SHOWN
    _no_file_name(run)

    record = _distill(tiny_data, run, "--resume", "--show-scans")
    assert record["shown"] and record["show_scans"] and not record["synthetic_data"] and record["examples"]
    page = _Page((run / "report.html").read_text(encoding="utf-8"))
    assert (run / EXAMPLES_FILE).read_bytes() in _images(page)
    _no_file_name(run)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: None, "holds no report"),
    (lambda d: (d / "privacy.json").write_text('{"kind": "edgemri.federation-report/1"}'), "has kind"),
    (lambda d: (d / "privacy.json").write_text('{"kind": "edgemri.privacy-report/2"}'), "is not a privacy report"),
    (lambda d: (d / "privacy.json").write_text("[1,"), "is not valid JSON"),
    (lambda d: ((d / "privacy.json").write_text(json.dumps(build_privacy_report(_result(), CONFIG))),
                (d / "privacy.png").write_text("<svg onload=alert(1)>")), "is not a PNG"),
])
def test_a_folder_without_a_readable_report_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          damage: Any, message: str) -> None:
    damage(tmp_path)
    with pytest.raises(ReportError, match=message):
        write_html_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "report.html").exists()


def test_the_demo_names_its_pages_last() -> None:
    layout = DemoLayout(Path("runs/demo"))
    assert layout.report_lines()[-1].endswith("runs/demo/distill/report.html, runs/demo/federation/report.html")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium driven by Playwright: the system's Chromium where there is one (Playwright's own downloads need the
    internet), else Playwright's; the test skips where neither starts."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (.ci/run installs it and the system's Chromium where it can)")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium") or
                                              shutil.which("chromium-browser"))
    except Error as err:
        playwright.stop()
        pytest.skip(f"no Chromium starts: {str(err).strip().splitlines()[0]}")
    yield chromium
    chromium.close()
    playwright.stop()


def _open(browser: Any, path: Path, screenshot: Path | None = None) -> None:
    """Load ``path``: no console error, no request but the file itself, every image decoded; then the screenshot."""
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(width > 0 for width in widths), widths
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    if screenshot is not None:
        screenshot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()


def test_the_page_renders_in_a_headless_browser(browser: Any, federation_run: Path, tmp_path: Path) -> None:
    """The federation page (screenshot in runs/) and the distillation page."""
    _open(browser, write_html_report(federation_run), SCREENSHOT)
    _open(browser, write_html_report(_distill_folder(tmp_path / "distill")))
    assert SCREENSHOT.stat().st_size > 0
