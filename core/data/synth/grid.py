"""The sample grid: one Training image per class (rows) and scanner site (columns), as a grey PNG."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from edgemri.core.data.synth.presets import CLASS_NAMES
from edgemri.core.io import write_bytes


def write_sample_grid(out_dir: Path, png_path: Path, thumb: int = 140) -> None:
    """Save a PNG grid of Training images: one row per class, one column per site.

    ``thumb`` is roughly the width in pixels of one cell; the first image of each class
    and site is shown, labelled with its view and sequence (and "subtle" when it is).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    with (out_dir / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "Training"]
    sites = sorted({r["site"] for r in rows})
    picks: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        picks.setdefault((r["label"], r["site"]), r)
    fig = Figure(figsize=(1.25 * len(sites) + 0.6, 1.3 * len(CLASS_NAMES) + 0.3), dpi=thumb / 1.1)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(CLASS_NAMES), len(sites), squeeze=False)
    for i, label in enumerate(CLASS_NAMES):
        for j, site in enumerate(sites):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            row = picks.get((label, site))
            if row is not None:
                with Image.open(out_dir / row["file"]) as im:
                    ax.imshow(np.asarray(im.convert("L")), cmap="gray", vmin=0, vmax=255)
                subtle = ", subtle" if row["subtle"] == "yes" else ""
                ax.set_xlabel(f"{row['view']} {row['sequence']}{subtle}", fontsize=6)
            if i == 0:
                ax.set_title(site, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.94, bottom=0.03, wspace=0.08, hspace=0.28)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    # Everything in the figure is grey: an 8-bit grey PNG is a fraction of the RGBA one.
    buffer.seek(0)
    grey = io.BytesIO()
    Image.open(buffer).convert("L").save(grey, "PNG", optimize=True)
    write_bytes(Path(png_path), grey.getvalue())
