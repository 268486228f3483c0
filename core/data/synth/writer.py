"""Writing the set: draw every planned image (in worker processes), encode it as JPEG, and write
the Kaggle-layout folder with ``metadata.csv`` (one row per file) and ``synth.json`` (the recipe),
plus each site's evaluation pool under ``Pools/`` (split ``Pool`` in ``metadata.csv``) and each site's
unlabeled transfer images under ``Unlabeled/<site>/`` (in no metadata: their labels are recorded nowhere).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemri.core.data.synth.phantom import make_image
from edgemri.core.data.synth.planning import (
    POOL_DIR,
    POOL_SPLIT,
    SPLITS,
    UNLABELED_DIR,
    UNLABELED_SPLIT,
    Job,
    class_mix,
    plan_jobs,
    plan_pool_jobs,
    plan_unlabeled_jobs,
)
from edgemri.core.data.synth.presets import CLASS_NAMES, SynthError, check_pool_size, check_unlabeled_size, get_preset
from edgemri.core.data.synth.scanner import SEQUENCES, TISSUE
from edgemri.core.io import write_bytes
from edgemri.core.progress import ProgressBar
from edgemri.core.workers import worker_pool

# 1.2: per-site evaluation pools; Training/Testing as in 1.1. Unlabeled/ came later with the same Training, Testing,
# Pools and metadata.csv bytes (from seed streams of its own), so the version stayed.
GENERATOR_VERSION = "1.2"
METADATA_COLUMNS = (
    "file", "split", "label", "site", "view", "sequence", "slice_level", "width", "height", "jpeg_quality",
    "fov", "rotation_deg", "flipped", "gamma", "bias", "noise", "blur", "tumour_size", "tumour_contrast",
    "tumour_u", "tumour_v", "subtle",
)
_CHUNK = 16  # images per worker task: large enough to amortise the process round trip


def _run_job(job: Job, subtle_share: float) -> dict[str, Any]:
    """Draw, encode and write one image; return its metadata row."""
    pixels, params = make_image(job.seed_key, job.label, job.site, subtle_share)
    buffer = io.BytesIO()
    # R = G = B: the grey slice saved as RGB, as in the real set.
    Image.fromarray(pixels, "L").convert("RGB").save(buffer, "JPEG", quality=job.site.jpeg_quality)
    write_bytes(job.path, buffer.getvalue())
    row: dict[str, Any] = {"file": job.rel, "split": job.split, "label": job.label, "site": job.site.name}
    row.update(params)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _run_chunk(jobs: list[Job], subtle_share: float) -> list[dict[str, Any]]:
    return [_run_job(job, subtle_share) for job in jobs]


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start:start + size]


def _draw_all(jobs: list[Job], subtle_share: float, workers: int, bar: ProgressBar) -> list[dict[str, Any]]:
    """Metadata rows in plan order; the bytes do not depend on ``workers``."""
    run = partial(_run_chunk, subtle_share=subtle_share)
    rows: list[dict[str, Any]] = []
    if workers == 1 or len(jobs) <= _CHUNK:
        parts: Iterator[list[dict[str, Any]]] = map(run, _chunks(jobs, _CHUNK))
        for part in parts:
            rows += part
            bar.update(len(part))
        return rows
    with worker_pool(workers) as pool:
        for part in pool.map(run, _chunks(jobs, _CHUNK)):
            rows += part
            bar.update(len(part))
    return rows


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise SynthError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace "
                             f"its generated data")
        # Remove only what a previous generation wrote, so no stale image survives.
        for split in (*SPLITS, POOL_DIR, UNLABELED_DIR):
            shutil.rmtree(out_dir / split, ignore_errors=True)
        for name in ("metadata.csv", "synth.json"):
            (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for label in CLASS_NAMES:
            (out_dir / split / label).mkdir(parents=True, exist_ok=True)


def generate(out_dir: Path, preset: str = "quickstart", seed: int = 0, workers: int | None = None,
             progress: bool = True, *, overwrite: bool = False, limit: int | None = None, pools: bool = True,
             pool_size: int | None = None, unlabeled_size: int | None = None) -> dict[str, Any]:
    """Write the synthetic set to ``out_dir`` in the Kaggle layout and return a summary.

    ``limit`` caps the images per class and split (smoke tests and quick looks);
    ``workers`` defaults to the CPU count and never changes the output bytes.
    ``pools`` adds each site's evaluation pool, ``Pools/<site>/<class>/``: ``pool_size`` images per
    site (default: the preset's ``pool_per_site``, or none under ``limit``, so a smoke test stays
    small), drawn after everything else from seed keys of their own, so Training and Testing are
    byte-identical with or without them.
    ``unlabeled_size`` images per site (default: the preset's ``unlabeled_per_site``, or none under
    ``limit``; 0: none) go to ``Unlabeled/<site>/Un_0000.jpg``, the distillation's transfer set: drawn
    like the pools from seed keys of their own, and listed in no metadata, so their labels exist nowhere.
    """
    spec = get_preset(preset)
    if limit is not None and limit < 1:
        raise SynthError(f"limit must be a positive number of images per class and split, got {limit}")
    if pool_size is not None:
        check_pool_size(pool_size, "pool_size")
    else:
        pool_size = 0 if limit else spec.pool_per_site
    pool_per_site = pool_size if pools else 0
    if unlabeled_size is not None:
        check_unlabeled_size(unlabeled_size, "unlabeled_size")
    else:
        unlabeled_size = 0 if limit else spec.unlabeled_per_site
    out_dir = Path(out_dir)
    started = time.perf_counter()
    try:
        _prepare_out_dir(out_dir, overwrite)
    except OSError as err:
        raise SynthError(f"cannot prepare the output folder {out_dir}: {err.strerror or err}") from None
    jobs = plan_jobs(spec, seed, out_dir, limit)
    if pool_per_site:
        jobs += plan_pool_jobs(spec, seed, out_dir, pool_per_site)
    jobs += plan_unlabeled_jobs(spec, seed, out_dir, unlabeled_size)
    workers = max(1, workers if workers is not None else os.cpu_count() or 1)
    with ProgressBar(f"synth {preset}", len(jobs), enabled=progress, unit="images") as bar:
        drawn = _draw_all(jobs, spec.subtle_share, workers, bar)
    rows = [row for row in drawn if row["split"] != UNLABELED_SPLIT]
    unlabeled = {s.name: 0 for s in spec.sites} if unlabeled_size else {}
    for row in drawn:
        if row["split"] == UNLABELED_SPLIT:
            unlabeled[row["site"]] += 1

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(out_dir / "metadata.csv", buffer.getvalue().encode("utf-8"))

    counts = {split: {label: 0 for label in CLASS_NAMES} for split in SPLITS}
    per_site = {s.name: {split: {label: 0 for label in CLASS_NAMES} for split in SPLITS} for s in spec.sites}
    pool_counts = {s.name: {label: 0 for label in CLASS_NAMES} for s in spec.sites} if pool_per_site else {}
    for row in rows:
        if row["split"] == POOL_SPLIT:
            pool_counts[row["site"]][row["label"]] += 1
            continue
        counts[row["split"]][row["label"]] += 1
        per_site[row["site"]][row["split"]][row["label"]] += 1
    mix = class_mix(spec, seed)
    info = {
        "generator": "edgemri.core.synth", "version": GENERATOR_VERSION, "preset": preset, "seed": seed,
        "limit": limit, "subtle_share": spec.subtle_share, "class_mix_concentration": spec.class_mix_concentration,
        "counts": counts, "pool_per_site": pool_per_site, "pools": pool_counts,
        "unlabeled_per_site": unlabeled_size, "unlabeled": unlabeled,
        "sites": [dict(asdict(site), class_mix=dict(zip(CLASS_NAMES, np.round(mix[i], 4).tolist(), strict=True)),
                       images=per_site[site.name]) for i, site in enumerate(spec.sites)],
        "tissue_signal": {name: dict(zip(SEQUENCES, values, strict=True)) for name, values in TISSUE.items()},
        "metadata_columns": list(METADATA_COLUMNS),
    }
    write_bytes(out_dir / "synth.json", (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return {
        "out_dir": str(out_dir), "preset": preset, "seed": seed, "version": GENERATOR_VERSION,
        "total": len(drawn), "counts": counts, "sites": per_site, "pools": pool_counts, "unlabeled": unlabeled,
        "seconds": round(time.perf_counter() - started, 2),
    }
