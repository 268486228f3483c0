"""What every report shares: the machine and package versions it ran on, Markdown tables, and the JSON/MD/PNG
writer."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from edgemri.core.io import write_json, write_text

PACKAGES = ("edgemri", "torch", "torchvision", "flwr", "opacus", "numpy")
# Up to this many clients a report's Markdown lists every client; above it, per-tier summaries and by name only
# the clients that need a look (the JSON always keeps every client).
FEW_CLIENTS = 20
# The percentiles a report gives of a per-client quantity across a tier.
PERCENTILES = (10, 25, 50, 75, 90)


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


def flat_items(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A nested config as (dotted key, leaf value) pairs."""
    if isinstance(value, Mapping) and value:
        for name, item in value.items():
            yield from flat_items(item, f"{prefix}{name}.")
    else:
        yield prefix.removesuffix("."), value


def _cell(value: Any) -> str:
    """One table cell: a run's names and numbers on one line, a '|' escaped so it cannot open a column."""
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table (no trailing newline). ``align``: one letter per column, l or r (default: l, then r)."""
    headers = [_cell(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} needs one of l/r per column ({len(headers)})")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        cells = [_cell(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"a row has {len(cells)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
