"""Shared fixtures: a tiny Kaggle-layout folder whose classes a small CNN can learn."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgemri.core.data.images import CLASS_NAMES

# The files that take longest, longest first (serial seconds measured beside a benchmark: 656, 553, 189). The
# Makefile's workers take whole files in collection order (`--no-loadscope-reorder`), so these start at once on
# separate workers and the short files fill in around them, instead of one long file starting last.
LONGEST_FILES_FIRST = ("test_federation.py", "test_deploy.py", "test_distill.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the longest files' tests first, keeping every other order."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command writes to stderr: ``edgemri: error: ...``, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("edgemri: error: "), err
    return lines[0]


@pytest.fixture()
def distill_fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Every call distillation makes to the training loop, as (training data, keyword arguments), passed through."""
    from edgemri.core.training import distill

    calls: list[tuple[Any, dict[str, Any]]] = []
    real_fit = distill.fit

    def recording_fit(model: Any, train: Any, **kwargs: Any) -> Any:
        calls.append((train, kwargs))
        return real_fit(model, train, **kwargs)

    monkeypatch.setattr(distill, "fit", recording_fit)
    return calls


@pytest.fixture(autouse=True, scope="session")
def _private_decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded-image caches of the suite go to a temp folder (also for CLI and Flower subprocesses)."""
    os.environ["EDGEMRI_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgemri-cache"))


@pytest.fixture()
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's decoded-image cache folder for one test alone (CI may have no HOME)."""
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("EDGEMRI_CACHE_DIR", str(cache))
    return cache


# Where each class puts its bright blob; "notumor" has none.
_BLOB_CENTRES = {"glioma": (0.3, 0.3), "meningioma": (0.3, 0.7), "notumor": None, "pituitary": (0.72, 0.5)}


def make_kaggle_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Grayscale JPEGs saved as RGB, varying sizes, in the Kaggle layout."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name in CLASS_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(120, 200)), int(rng.integers(120, 200))
                image = rng.normal(50, 18, (h, w))
                centre = _BLOB_CENTRES[name]
                if centre is not None:
                    yy, xx = np.mgrid[0:h, 0:w]
                    cy, cx = centre[0] * h, centre[1] * w
                    image += 140 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.09 * h) ** 2))
                pixels = np.clip(image, 0, 255).astype(np.uint8)
                prefix = "Tr" if split == "Training" else "Te"
                Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{prefix}-{name[:2]}_{i:04d}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training and 10 test images per class."""
    return make_kaggle_folder(tmp_path_factory.mktemp("tiny") / "data", {"Training": 40, "Testing": 10})


def read_metadata(root: Path) -> list[dict[str, str]]:
    """The rows of a data folder's metadata.csv."""
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def add_sites(root: Path, sites: tuple[str, ...]) -> Path:
    """A metadata.csv that puts every file of a Kaggle-layout folder at a site, round robin."""
    lines = ["file,split,label,site"]
    for k, path in enumerate(sorted(root.glob("*/*/*.jpg"))):
        split, label = path.relative_to(root).parts[:2]
        lines.append(f"{path.relative_to(root).as_posix()},{split},{label},{sites[k % len(sites)]}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def sited_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 training images per class over two scanner sites."""
    root = make_kaggle_folder(tmp_path_factory.mktemp("sited") / "data", {"Training": 30, "Testing": 4})
    return add_sites(root, ("site-a", "site-b"))
