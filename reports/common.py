"""What every report shares: the machine and package versions it ran on, and the JSON/MD/PNG writer."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from edgemri.core.io import write_json, write_text

PACKAGES = ("edgemri", "torch", "torchvision", "flwr", "opacus", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_report_files(out: Path, stem: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str],
                       plot: Callable[[dict[str, Any], Path], None]) -> dict[str, Path]:
    """STEM.json, STEM.md and STEM.png for one report, each written atomically."""
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], render(report))
    plot(report, paths["png"])
    return paths
