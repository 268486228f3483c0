"""Offline synthetic brain-MRI slices in the Kaggle "Brain Tumor MRI Dataset" layout.

The real set cannot be redistributed, so the demo, the tests and the benchmarks run on
this generator. Each image is one 2-D slice (axial, coronal or sagittal) of a drawn head:
scalp, skull, CSF, grey and white matter with sulci, ventricles, cerebellum, brainstem
and the pituitary gland, plus one of three tumour types or none. A scanner *site* then
applies its own intensity curve, bias field, noise, resolution, field of view, image
sizes and JPEG quality, and has its own class mix: the sites are the federation's
hospitals. Everything is vectorised numpy on a 256 x 256 working grid; smooth random
fields are small random grids upsampled by two matrix products.

Every image is seeded from (seed, split, class, index), so a seed gives byte-identical
files whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
ABBREVIATIONS = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
SPLITS = ("Training", "Testing")
PREFIXES = {"Training": "Tr", "Testing": "Te"}
VIEWS = ("axial", "coronal", "sagittal")
SEQUENCES = ("t1c", "t1", "t2", "flair")
GENERATOR_VERSION = "1.1"
METADATA_COLUMNS = (
    "file", "split", "label", "site", "view", "sequence", "slice_level", "width", "height", "jpeg_quality",
    "fov", "rotation_deg", "flipped", "gamma", "bias", "noise", "blur", "tumour_size", "tumour_contrast",
    "tumour_u", "tumour_v", "subtle",
)

_N = 256  # working resolution of every slice before the site's resize
_EDGE = 0.012  # soft-edge width in head units (about 1.5 working pixels)

# Signal of each tissue per sequence (t1c, t1, t2, flair), on a 0-1 scale before windowing.
_TISSUE: dict[str, tuple[float, float, float, float]] = {
    "scalp": (0.62, 0.70, 0.55, 0.62),
    "soft": (0.32, 0.34, 0.30, 0.30),
    "bone": (0.05, 0.05, 0.04, 0.04),
    "marrow": (0.48, 0.52, 0.34, 0.36),
    "csf": (0.10, 0.09, 0.95, 0.07),
    "gm": (0.50, 0.46, 0.58, 0.53),
    "wm": (0.60, 0.60, 0.42, 0.42),
    "air": (0.02, 0.02, 0.02, 0.02),
    "eye": (0.12, 0.10, 0.90, 0.10),
    "vessel": (0.80, 0.30, 0.15, 0.20),
    "gland": (0.70, 0.48, 0.50, 0.50),
    "glioma": (0.36, 0.30, 0.80, 0.78),
    "rim": (1.00, 0.42, 0.72, 0.74),
    "necrosis": (0.14, 0.18, 0.95, 0.45),
    "edema": (0.32, 0.33, 0.86, 0.90),
    "meningioma": (1.00, 0.52, 0.76, 0.74),
    "pituitary": (0.92, 0.52, 0.72, 0.68),
}


# ---------------------------------------------------------------- sites and presets


@dataclass(frozen=True)
class SiteProfile:
    """One scanner site: the acquisition settings every one of its images is jittered around."""

    name: str
    gamma: float  # exponent of the intensity curve applied after windowing
    bias: float  # strength (log units) of the multiplicative low-frequency bias field
    noise: float  # Rician noise sigma, as a fraction of the brightest tissue
    blur: float  # resolution loss: the slice is resampled through 256 / blur pixels
    fov: float  # head half-extent as a fraction of the half-frame (brain scale in frame)
    sizes: tuple[tuple[int, int, float], ...]  # (width, height, weight) of output images
    jpeg_quality: int
    views: tuple[float, float, float]  # axial, coronal, sagittal weights
    sequences: tuple[float, float, float, float]  # t1c, t1, t2, flair weights
    volume: float  # relative number of scans the site contributes
    enhancement: float = 1.0  # contrast uptake on T1c (dose and timing), relative to the reference
    grey_white: float = 1.0  # grey/white-matter contrast relative to the reference protocol
    fat_sat: bool = False  # fat suppression: dark scalp and marrow


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("site1", gamma=1.00, bias=0.08, noise=0.015, blur=1.00, fov=0.88,
                sizes=((512, 512, 0.85), (480, 480, 0.15)), jpeg_quality=92,
                views=(0.50, 0.25, 0.25), sequences=(1.00, 0.00, 0.00, 0.00), volume=1.2,
                enhancement=1.15),
    SiteProfile("site2", gamma=0.85, bias=0.15, noise=0.035, blur=1.50, fov=0.85,
                sizes=((256, 256, 0.60), (236, 236, 0.25), (225, 225, 0.15)), jpeg_quality=85,
                views=(0.35, 0.35, 0.30), sequences=(1.00, 0.00, 0.00, 0.00), volume=1.0,
                fat_sat=True, enhancement=0.9, grey_white=1.3),
    SiteProfile("site3", gamma=1.20, bias=0.12, noise=0.025, blur=1.25, fov=0.90,
                sizes=((350, 350, 0.40), (442, 442, 0.35), (420, 440, 0.25)), jpeg_quality=90,
                views=(0.40, 0.20, 0.40), sequences=(1.00, 0.00, 0.00, 0.00), volume=0.9,
                grey_white=0.6),
    SiteProfile("site4", gamma=0.90, bias=0.20, noise=0.045, blur=1.80, fov=0.84,
                sizes=((512, 480, 0.50), (440, 480, 0.30), (320, 350, 0.20)), jpeg_quality=80,
                views=(0.30, 0.40, 0.30), sequences=(1.00, 0.00, 0.00, 0.00), volume=0.8,
                enhancement=0.8),
    SiteProfile("site5", gamma=1.25, bias=0.10, noise=0.030, blur=1.40, fov=0.87,
                sizes=((225, 225, 0.50), (216, 240, 0.30), (240, 224, 0.20)), jpeg_quality=88,
                views=(0.45, 0.30, 0.25), sequences=(0.90, 0.02, 0.08, 0.00), volume=0.7,
                fat_sat=True, grey_white=0.8),
    SiteProfile("site6", gamma=0.80, bias=0.14, noise=0.020, blur=1.15, fov=0.89,
                sizes=((496, 496, 0.50), (400, 420, 0.25), (512, 512, 0.25)), jpeg_quality=94,
                views=(0.35, 0.30, 0.35), sequences=(0.95, 0.00, 0.03, 0.02), volume=1.0,
                enhancement=0.95, grey_white=1.2),
)


@dataclass(frozen=True)
class SynthPreset:
    """How many images of each class per split, from how many sites, and how hard."""

    name: str
    train_counts: dict[str, int]
    test_counts: dict[str, int]
    num_sites: int
    class_mix_concentration: float = 40.0  # Dirichlet concentration of each site's class mix; lower: more skew
    subtle_share: float = 0.16  # share of tumours that are small and/or low-contrast
    description: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.num_sites <= len(SITE_PROFILES):
            raise ValueError(f"num_sites must be in 1..{len(SITE_PROFILES)}, got {self.num_sites}")
        for counts in (self.train_counts, self.test_counts):
            if set(counts) != set(CLASS_NAMES) or min(counts.values()) < 0:
                raise ValueError(f"counts must give a non-negative number for each of {CLASS_NAMES}, got {counts}")

    @property
    def sites(self) -> tuple[SiteProfile, ...]:
        return SITE_PROFILES[: self.num_sites]

    def counts(self, split: str) -> dict[str, int]:
        return self.train_counts if split == "Training" else self.test_counts


PRESETS: dict[str, SynthPreset] = {
    "quickstart": SynthPreset(
        "quickstart",
        train_counts={"glioma": 370, "meningioma": 375, "notumor": 447, "pituitary": 408},
        test_counts={"glioma": 92, "meningioma": 93, "notumor": 124, "pituitary": 91},
        num_sites=4,
        description="the Kaggle class proportions at 2,000 images from 4 sites: a CPU demo in minutes",
    ),
    "kaggle": SynthPreset(
        "kaggle",
        train_counts={"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457},
        test_counts={"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
        num_sites=6,
        description="the real set's class counts (7,023 images) from 6 sites",
    ),
}


def get_preset(name: str) -> SynthPreset:
    """The named preset, or ValueError listing the allowed names."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ---------------------------------------------------------------- smooth random fields


@cache
def _basis(n: int, size: int, periodic: bool = False) -> np.ndarray:
    """Matrix (size x n) that spreads n random knots smoothly over size pixels (Gaussian kernel)."""
    x = (np.arange(size) + 0.5) / size
    knots = (np.arange(n) + 0.5) / n
    dist = np.abs(x[:, None] - knots[None, :])
    if periodic:
        dist = np.minimum(dist, 1.0 - dist)
    weights = np.exp(-0.5 * (dist * n / 0.75) ** 2)
    weights[weights < 1e-4] = 0.0  # the far tail adds nothing visible, only slow denormal arithmetic
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _smooth(rng: np.random.Generator, n: int, rows: int = _N, cols: int = _N, *, n_cols: int | None = None,
            periodic_cols: bool = False) -> np.ndarray:
    """A zero-mean, unit-variance random field of shape (rows, cols) with n (and n_cols) features across."""
    n_cols = n_cols or n
    knots = rng.standard_normal((n, n_cols), dtype=np.float32)
    # einsum, not matmul: BLAS threads crawl on these small products when cores are busy, and
    # BLAS may sum in a thread-dependent order; einsum's own loop is fast and deterministic.
    half = np.einsum("ij,jk->ik", _basis(n, rows), knots)
    field = np.einsum("ik,lk->il", half, _basis(n_cols, cols, periodic_cols))
    return field / (field.std() + 1e-6)


# ---------------------------------------------------------------- geometry

Ellipse = tuple[float, float, float, float, float]  # centre u, centre v, semi-axis a, semi-axis b, rotation


class _Frame:
    """The pixel grid of one slice and its head coordinates (u to the right, v down, head ~ unit size)."""

    def __init__(self, scale: float, rotation: float, shift: tuple[float, float], flip: bool) -> None:
        self.scale, self.cos, self.sin = scale, math.cos(rotation), math.sin(rotation)
        self.shift, self.flip = shift, flip
        axis = (np.arange(_N, dtype=np.float32) + 0.5) / _N * 2 - 1
        x = -axis if flip else axis
        dx, dy = x[None, :] - shift[0], axis[:, None] - shift[1]
        self.u = (self.cos * dx + self.sin * dy) / scale
        self.v = (-self.sin * dx + self.cos * dy) / scale

    def box(self, cu: float, cv: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows and columns that hold the disc of ``radius`` around (cu, cv), with a margin."""
        x = self.scale * (self.cos * cu - self.sin * cv) + self.shift[0]
        y = self.scale * (self.sin * cu + self.cos * cv) + self.shift[1]
        x = -x if self.flip else x
        col, row = (x + 1) / 2 * _N, (y + 1) / 2 * _N
        half = radius * self.scale * _N / 2 + 4
        return (slice(max(0, int(row - half)), max(0, int(row + half + 1))),
                slice(max(0, int(col - half)), max(0, int(col + half + 1))))

    def d2(self, e: Ellipse, box: tuple[slice, slice] | None = None) -> np.ndarray:
        """Squared normalised elliptic radius (< 1 inside) over the frame or a box of it."""
        cu, cv, a, b, rot = e
        u, v = (self.u, self.v) if box is None else (self.u[box], self.v[box])
        du, dv = u - cu, v - cv
        if rot:
            c, s = math.cos(rot), math.sin(rot)
            du, dv = c * du + s * dv, c * dv - s * du
        return (du / a) ** 2 + (dv / b) ** 2


def _inside(d2: np.ndarray, size: float, edge: float = _EDGE) -> np.ndarray:
    """Soft mask (0-1) of d2 < 1 with an edge about ``edge`` head units wide for a shape of ``size``."""
    return np.clip((1.0 - d2) * (size / (2 * edge)) + 0.5, 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, value: float | np.ndarray,
           box: tuple[slice, slice] | None = None) -> None:
    """Composite ``value`` over ``img`` with coverage ``mask`` (in place)."""
    target = img if box is None else img[box]
    target += mask * (value - target)


@dataclass
class _Anatomy:
    """Where the structures of one slice are, in head coordinates."""

    head: Ellipse
    brain: list[Ellipse]  # union; the first is the cerebrum, centre of the cortical texture
    soft: list[Ellipse]  # extra soft tissue outside the skull (face, neck)
    cerebellum: Ellipse | None = None
    brainstem: Ellipse | None = None
    ventricles: tuple[Ellipse, ...] = ()
    deep_gm: tuple[Ellipse, ...] = ()
    white: tuple[Ellipse, ...] = ()  # compact white-matter tracts (optic chiasm)
    air: tuple[Ellipse, ...] = ()  # sinuses
    eyes: tuple[Ellipse, ...] = ()
    fissure: tuple[float, float] | None = None  # midline fissure from v0 to v1 at u = 0
    callosum: Ellipse | None = None  # ring drawn on the upper half (midline sagittal)
    sella: tuple[float, float] | None = None
    gland: tuple[float, float] = (0.06, 0.035)  # semi-axes of the normal pituitary gland


def _anatomy(view: str, level: float, rng: np.random.Generator) -> _Anatomy:
    """Layout of a slice: ``level`` (0-1) is the axial height, coronal depth or sagittal offset."""
    atrophy = float(rng.uniform(0.7, 1.35))  # ventricle size varies between people
    if view == "axial":
        if level >= 0.35:
            # Supratentorial: the head narrows towards the vertex.
            f = 1.0 if level < 0.7 else math.sqrt(max(0.3, 1 - ((level - 0.7) / 0.45) ** 2))
            vent = math.sin(math.pi * min(1.0, (level - 0.35) / 0.37)) * atrophy if level < 0.72 else 0.0
            anat = _Anatomy(head=(0, 0, 0.80 * f, 0.95 * f, 0), brain=[(0, 0.01, 0.70 * f, 0.835 * f, 0)], soft=[],
                            fissure=(-0.9, 0.9) if vent < 0.05 else (-0.9, -0.3))
            if vent >= 0.05:
                anat.ventricles = ((-0.09, -0.03, 0.025 + 0.04 * vent, 0.26 * vent + 0.03, -0.18),
                                   (0.09, -0.03, 0.025 + 0.04 * vent, 0.26 * vent + 0.03, 0.18))
                anat.deep_gm = ((-0.19, 0.12, 0.09, 0.13, 0.2), (0.19, 0.12, 0.09, 0.13, -0.2))
            return anat
        # Skull base: frontal and temporal lobes, pons, cerebellum, the sella between them.
        low = level < 0.2
        frontal = (0, -0.34, 0.36, 0.26, 0) if low else (0, -0.40, 0.60, 0.42, 0)
        anat = _Anatomy(head=(0, 0, 0.80, 0.95, 0),
                        brain=[frontal, (-0.5, 0.05, 0.2, 0.34, 0.15), (0.5, 0.05, 0.2, 0.34, -0.15)],
                        soft=[], cerebellum=(0, 0.56, 0.55, 0.27, 0), brainstem=(0, 0.24, 0.17, 0.14, 0),
                        ventricles=((0, 0.37, 0.05, 0.03, 0),), fissure=(-0.8, -0.2), sella=(0, -0.08),
                        gland=(0.05, 0.04))
        if low:
            anat.eyes = ((-0.3, -0.7, 0.12, 0.12, 0), (0.3, -0.7, 0.12, 0.12, 0))
        return anat
    if view == "coronal":
        anat = _Anatomy(head=(0, -0.02, 0.82, 0.92, 0),
                        brain=[(0, -0.16, 0.72, 0.66, 0), (-0.47, 0.30, 0.2, 0.26, 0.1),
                               (0.47, 0.30, 0.2, 0.26, -0.1)],
                        soft=[(0, 0.9, 0.5, 0.35, 0)], fissure=(-0.85, -0.25),
                        ventricles=((-0.1, -0.12, 0.05 * atrophy + 0.01, 0.12, -0.35),
                                    (0.1, -0.12, 0.05 * atrophy + 0.01, 0.12, 0.35),
                                    (-0.45, 0.1, 0.2, 0.022, 0.3), (0.45, 0.1, 0.2, 0.022, -0.3)))
        if level < 0.5:  # through the sella
            anat.sella = (0, 0.40)
            anat.gland = (0.075, 0.035)
            anat.white = ((0, 0.30, 0.09, 0.02, 0),)
            anat.air = ((0, 0.58, 0.18, 0.10, 0),)
            anat.ventricles += ((0, 0.1, 0.02, 0.08, 0),)
        else:  # further back: brainstem and cerebellum
            anat.brainstem = (0, 0.45, 0.13, 0.30, 0)
            anat.cerebellum = (0, 0.60, 0.55, 0.17, 0)
        return anat
    anat = _Anatomy(head=(0.02, 0, 0.92, 0.85, 0), brain=[(0.02, -0.10, 0.81, 0.62, 0)],
                    soft=[(-0.55, 0.50, 0.42, 0.40, 0), (0.25, 0.92, 0.36, 0.3, 0)],
                    cerebellum=(0.45, 0.42, 0.30, 0.20, 0.2), brainstem=(0.12, 0.52, 0.10, 0.32, 0.25),
                    air=((-0.24, 0.50, 0.16, 0.10, 0),))
    if level < 0.65:  # midline: corpus callosum, lateral ventricle, the sella
        anat.callosum = (0.03, 0.0, 0.44, 0.22, 0)
        anat.ventricles = ((0.03, -0.03, 0.30 * min(1.2, atrophy), 0.07 * atrophy, 0),)
        anat.sella = (-0.10, 0.36)
    else:  # parasagittal: a temporal lobe below, more cortex
        anat.brain.append((-0.05, 0.33, 0.36, 0.18, 0.1))
        anat.brainstem = None
    return anat


# ---------------------------------------------------------------- one slice


# Tumour radius ranges in head units (head half-width ~0.8): (typical, subtle).
_SIZES = {
    "glioma": ((0.18, 0.36), (0.09, 0.14)),
    "meningioma": ((0.15, 0.30), (0.08, 0.12)),
    "pituitary": ((0.12, 0.20), (0.07, 0.09)),
}


@dataclass
class _Tumour:
    label: str
    size: float
    contrast: float
    subtle: bool
    u: float = 0.0
    v: float = 0.0
    kind: str = ""  # meningioma attachment: convexity, falx or skull base
    normal: float = 0.0  # meningioma: direction (radians) from the dura into the brain


def _draw_tumour(rng: np.random.Generator, label: str, subtle_share: float) -> _Tumour | None:
    """Size (head units) and contrast; a subtle tumour is small, faint, or both."""
    if label == "notumor":
        return None
    big, small = _SIZES[label]
    subtle = bool(rng.random() < subtle_share)
    if not subtle:
        return _Tumour(label, float(rng.uniform(*big)), float(rng.uniform(0.85, 1.0)), False)
    kind = rng.integers(3)  # 0 small, 1 faint, 2 small and somewhat faint
    size = float(rng.uniform(*small)) if kind != 1 else float(rng.uniform(*big))
    contrast = {0: rng.uniform(0.8, 1.0), 1: rng.uniform(0.35, 0.55), 2: rng.uniform(0.55, 0.75)}[int(kind)]
    return _Tumour(label, size, float(contrast), True)


def _place(rng: np.random.Generator, tumour: _Tumour, anat: _Anatomy, view: str) -> None:
    """Set the tumour centre (and a meningioma's attachment) from the slice's anatomy."""
    cu, cv, a, b, _ = anat.brain[0]
    if tumour.label == "glioma":
        rho, phi = rng.uniform(0.2, 0.6), rng.uniform(0, 2 * math.pi)  # intra-axial: hemispheric white matter
        tumour.u, tumour.v = cu + rho * a * math.cos(phi), cv + rho * b * math.sin(phi)
        return
    if tumour.label == "pituitary":
        su, sv = anat.sella or (0.0, 0.0)
        tumour.u = su + float(rng.normal(0, 0.01))
        # The adenoma sits in the sella and grows upward out of it.
        tumour.v = sv + anat.gland[1] - 0.8 * tumour.size
        return
    where = rng.random()
    if where < 0.12 and view in ("axial", "coronal") and anat.fissure is not None:
        side = 1 if rng.random() < 0.5 else -1
        v0, v1 = anat.fissure
        tumour.u = side * tumour.size * 0.8
        tumour.v = float(rng.uniform(v0 + 0.15, min(v1, v0 + 0.7)))
        tumour.kind, tumour.normal = "falx", (0.0 if side > 0 else math.pi)
        return
    # Convexity: the upper and lateral dura (angles run clockwise from the right, v pointing down).
    phi = float(rng.uniform(0.9, 2.1) * math.pi)
    tumour.kind = "convexity"
    if view == "sagittal" and where < 0.25:
        phi, tumour.kind = float(rng.uniform(0.55, 0.85) * math.pi), "skull base"  # olfactory groove
    elif view == "coronal" and where < 0.25:
        phi, tumour.kind = float(rng.choice([0.08, 0.92]) * math.pi), "skull base"  # sphenoid wing
    depth = tumour.size * float(rng.uniform(0.7, 1.1))
    tumour.u = cu + (a - depth) * math.cos(phi)
    tumour.v = cv + (b - depth) * math.sin(phi)
    tumour.normal = phi + math.pi


def _mass_effect(frame: _Frame, tumour: _Tumour, head_r2: np.ndarray) -> None:
    """Push the anatomy away from the tumour centre (in place), fading out towards the skull."""
    reach = 2.2 * tumour.size
    box = frame.box(tumour.u, tumour.v, reach)
    u, v = frame.u[box], frame.v[box]
    du, dv = u - tumour.u, v - tumour.v
    fall = np.exp(-(du * du + dv * dv) / (reach * reach / 2))
    fall *= np.clip((0.85 - head_r2[box]) / 0.2, 0.0, 1.0)
    squeeze = 1.0 - 0.45 * tumour.contrast * fall
    u[...] = tumour.u + du * squeeze
    v[...] = tumour.v + dv * squeeze


def _polar_texture(rng: np.random.Generator, radius: np.ndarray, theta: np.ndarray, around: int) -> np.ndarray:
    """A random field that varies slowly along ``radius`` (0-1) and fast around it: radial folds."""
    field = _smooth(rng, 4, 32, 512, n_cols=around, periodic_cols=True)
    ir = np.clip(radius * 24, 0, 31).astype(np.intp)
    it = ((theta + math.pi) * (512 / (2 * math.pi))).astype(np.intp) % 512
    return field[ir, it]


def _render(rng: np.random.Generator, view: str, level: float, tissue: dict[str, float], frame: _Frame,
            tumour: _Tumour | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise-free normal slice on the working grid in tissue signal units, its brain mask and grey-matter map."""
    anat = _anatomy(view, level, rng)
    if tumour is not None:
        _place(rng, tumour, anat, view)

    head_r2 = frame.d2(anat.head) * (1 + 0.02 * _smooth(rng, 5))
    if tumour is not None:
        _mass_effect(frame, tumour, head_r2)
    img = np.zeros((_N, _N), np.float32)
    # Scalp, skull with its marrow, then the intracranial space.
    for extra in anat.soft:
        _paint(img, _inside(frame.d2(extra), extra[2]), tissue["soft"])
    size = anat.head[2]
    _paint(img, _inside(head_r2, size), tissue["scalp"])
    _paint(img, _inside(head_r2 / 0.955**2, size), tissue["bone"])
    diploe = np.clip(1 - np.abs(head_r2 - 0.93**2) / 0.02, 0, 1) * np.clip(_smooth(rng, 9) + 0.5, 0, 1)
    _paint(img, diploe, tissue["marrow"])
    _paint(img, _inside(head_r2 / 0.905**2, size), tissue["soft"])
    for e in anat.air:
        _paint(img, _inside(frame.d2(e), e[2]), tissue["air"])
    for e in anat.eyes:
        box = frame.box(e[0], e[1], e[2])
        d2 = frame.d2(e, box)
        _paint(img, _inside(d2 / 1.3, e[2]), tissue["scalp"], box)  # orbital fat
        _paint(img, _inside(d2, e[2]), tissue["eye"], box)

    # Brain: union of lobes, a CSF margin, white matter inside a grey ribbon cut by sulci.
    outline = 1 + 0.04 * _smooth(rng, 7)
    lobes = [frame.d2(e) * outline for e in anat.brain]
    brain_d2 = np.min(lobes, axis=0)
    # Depth below the brain surface in head units: the cortex is equally thick on every lobe.
    depth = np.max([(1 - np.sqrt(d)) * min(e[2], e[3]) for d, e in zip(lobes, anat.brain, strict=True)], axis=0)
    cb_d2 = None
    if anat.cerebellum is not None:
        cb_d2 = frame.d2(anat.cerebellum) * outline
        brain_d2 = np.minimum(brain_d2, cb_d2)
    size = anat.brain[0][2]
    _paint(img, _inside(brain_d2 / 1.12, size), tissue["csf"])
    brain = _inside(brain_d2, size)
    cu, cv = anat.brain[0][:2]
    folds = _polar_texture(rng, 1 - depth / 0.6, np.arctan2(frame.v - cv, frame.u - cu), 60)
    folds += 0.4 * _smooth(rng, 28)
    gyri = 0.17 + 0.03 * _smooth(rng, 6)  # how deep the sulci reach
    cortex = np.clip((gyri - depth) / 0.04, 0, 1)
    grey = np.maximum(np.clip((0.6 - np.abs(folds)) / 0.12, 0, 1) * cortex, np.clip((0.035 - depth) / 0.015, 0, 1))
    parenchyma = tissue["wm"] + grey * (tissue["gm"] - tissue["wm"])
    sulci = np.clip(1 - np.abs(folds) / 0.12, 0, 1) * np.clip((gyri - 0.04 - depth) / 0.04, 0, 1)
    parenchyma += sulci * (tissue["csf"] - parenchyma)
    if anat.cerebellum is not None and cb_d2 is not None:
        # Cerebellar folia: wavy stripes parallel to the surface around a white core, split by the vermis.
        e = anat.cerebellum
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        r = np.sqrt(cb_d2[box])
        rows, cols = r.shape
        folia = np.sin(r * 34 + 2.5 * _smooth(rng, 9, rows, cols))
        cb_tissue = np.where(folia > 0.6, tissue["csf"], tissue["gm"])
        cb_tissue = np.where(r < 0.4 + 0.12 * folia, tissue["wm"], cb_tissue)
        if view != "sagittal":
            vermis = np.clip(1 - np.abs(frame.u[box] - e[0]) / 0.02, 0, 1) * (frame.v[box] > e[1])
            cb_tissue = cb_tissue + vermis * (tissue["csf"] - cb_tissue)
        cb = _inside(cb_d2[box], e[2], 0.02)
        parenchyma[box] += cb * (cb_tissue - parenchyma[box])
        grey[box] = np.maximum(grey[box], cb * (r >= 0.4))
    _paint(img, brain, parenchyma)
    for e in anat.deep_gm:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        _paint(img, _inside(frame.d2(e, box), e[2], 0.03), tissue["gm"], box)
    if anat.callosum is not None:
        box = frame.box(anat.callosum[0], anat.callosum[1], anat.callosum[2])
        d2 = frame.d2(anat.callosum, box)
        ring = np.clip(1 - np.abs(d2 - 0.85) / 0.13, 0, 1) * (frame.v[box] < anat.callosum[1])
        _paint(img, ring, tissue["wm"], box)
    if anat.brainstem is not None:
        e = anat.brainstem
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        _paint(img, _inside(frame.d2(e, box), e[2]), 0.6 * tissue["wm"] + 0.4 * tissue["gm"], box)
    for e in anat.white:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        _paint(img, _inside(frame.d2(e, box), e[3]), tissue["wm"], box)
    if anat.fissure is not None:
        v0, v1 = anat.fissure
        line = np.clip(1 - np.abs(frame.u) / 0.014, 0, 1) * ((frame.v > v0) & (frame.v < v1)) * brain
        _paint(img, line, tissue["csf"])
        # Superior sagittal sinus: bright on contrast scans where the falx meets the skull.
        ends = (cv - anat.brain[0][3], cv + anat.brain[0][3]) if v1 > 0.5 else (cv - anat.brain[0][3],)
        for end in ends:
            sinus = (0.0, end + (0.03 if end < cv else -0.03), 0.03, 0.03, 0)
            box = frame.box(sinus[0], sinus[1], 0.06)
            _paint(img, _inside(frame.d2(sinus, box), 0.03), tissue["vessel"], box)
    for e in anat.ventricles:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        _paint(img, _inside(frame.d2(e, box), min(e[2], e[3])), tissue["csf"], box)
    if anat.sella is not None:
        su, sv = anat.sella
        ga, gb = anat.gland
        gland = (su, sv, ga * float(rng.uniform(0.85, 1.2)), gb * float(rng.uniform(0.8, 1.25)), 0)
        box = frame.box(su, sv, 0.14)
        _paint(img, _inside(frame.d2((su, sv - 0.02, ga * 1.8, gb * 2.2, 0), box), gb), tissue["csf"], box)
        _paint(img, _inside(frame.d2(gland, box), gb), tissue["gland"], box)
    intracranial = _inside(head_r2 / 0.905**2, anat.head[2])
    return img, brain * intracranial, grey


def _draw_lesion(rng: np.random.Generator, img: np.ndarray, frame: _Frame, t: _Tumour, tissue: dict[str, float],
                 brain: np.ndarray, grey: np.ndarray) -> None:
    """Paint the tumour (and its edema) over the slice, in place."""
    reach = t.size * (2.6 if t.label == "glioma" else 2.0)
    box = frame.box(t.u, t.v, reach)
    rows, cols = img[box].shape
    if rows == 0 or cols == 0:
        return
    jitter = _smooth(rng, 10, rows, cols)
    if t.label == "glioma":
        # Irregular, infiltrative, heterogeneous; necrotic core and enhancing rim when large.
        crisp = rng.random() < 0.1  # some gliomas look well circumscribed, like a meningioma
        rot = float(rng.uniform(0, math.pi))
        ax, ay = t.size * float(rng.uniform(0.8, 1.25)), t.size * float(rng.uniform(0.75, 1.15))
        d2 = frame.d2((t.u, t.v, ax, ay, rot), box) * (1 + (0.12 if crisp else 0.4) * jitter)
        spread = float(rng.uniform(1.6, 3.0)) if not crisp else 1.4
        edema_d2 = d2 / spread**2 * (1 + 0.4 * _smooth(rng, 14, rows, cols))
        # Edema spreads along white matter, sparing the cortex.
        edema = np.clip((1 - edema_d2) / 0.35, 0, 1) * (1 - 0.7 * grey[box]) * float(rng.uniform(0.5, 1.0))
        _paint(img, edema * brain[box] * t.contrast, tissue["edema"], box)
        core = np.clip((1 - d2) / (0.06 if crisp else 0.2), 0, 1)
        value = tissue["glioma"] + 0.12 * _smooth(rng, 16, rows, cols)
        if t.size > 0.1 and rng.random() < 0.8:
            value += np.clip(1 - np.abs(d2 - 0.6) / 0.25, 0, 1) * (tissue["rim"] - value)
            value += np.clip((0.4 - d2) / 0.1, 0, 1) * (tissue["necrosis"] - value)
        _paint(img, core * brain[box] * t.contrast, value, box)
    elif t.label == "meningioma":
        # Round, extra-axial, sharply bounded with a CSF cleft, a dural tail along the skull.
        a, b = t.size * float(rng.uniform(1.0, 1.3)), t.size * float(rng.uniform(0.75, 1.0))
        rot = t.normal
        d2 = frame.d2((t.u, t.v, b, a, rot), box) * (1 + 0.06 * jitter)
        inside = np.clip(brain[box] * 4, 0, 1)  # the intracranial space, not the scalp
        if rng.random() < 0.15:
            edema = np.clip((1 - d2 / 2.4) / 0.4, 0, 1) * (1 - 0.7 * grey[box]) * 0.6
            _paint(img, edema * brain[box] * t.contrast, tissue["edema"], box)
        _paint(img, np.clip(1 - np.abs(d2 - 1.12) / 0.1, 0, 1) * inside * t.contrast * 0.7, tissue["csf"], box)
        value = tissue["meningioma"] + 0.05 * _smooth(rng, 20, rows, cols)
        if rng.random() < 0.15:  # calcification
            value = np.where(_smooth(rng, 30, rows, cols) > 1.6, tissue["bone"], value)
        _paint(img, _inside(d2, t.size) * t.contrast, value, box)
        tail = frame.d2((t.u - math.cos(rot) * b * 0.9, t.v - math.sin(rot) * b * 0.9, 0.016, a * 1.4, rot), box)
        _paint(img, _inside(tail, 0.016) * inside * t.contrast * 0.8, tissue["vessel"], box)
    else:
        # Pituitary macroadenoma: a rounded sellar mass, sometimes with a cystic part.
        a, b = t.size * float(rng.uniform(0.85, 1.15)), t.size * float(rng.uniform(0.8, 1.1))
        d2 = frame.d2((t.u, t.v, a, b, 0), box) * (1 + 0.05 * jitter)
        value = tissue["pituitary"] + 0.06 * _smooth(rng, 12, rows, cols)
        if t.size > 0.15 and rng.random() < 0.1:
            value = np.where(d2 < 0.16, tissue["csf"], value)
        _paint(img, _inside(d2, t.size, 0.015) * t.contrast, value, box)


# ---------------------------------------------------------------- scanner and file


def _tissue_signal(seq: int, site: SiteProfile) -> dict[str, float]:
    """Signal of each tissue for one sequence as the site's protocol renders it."""
    tissue = {name: values[seq] for name, values in _TISSUE.items()}
    if SEQUENCES[seq] == "t1c":
        # Enhancement is the step up from the plain T1 signal; contrast dose and timing scale it.
        tissue = {name: t1 + site.enhancement * (t1c - t1) for name, (t1c, t1, _, _) in _TISSUE.items()}
    if site.fat_sat:
        tissue["scalp"] *= 0.3
        tissue["marrow"] *= 0.3
    mid = (tissue["gm"] + tissue["wm"]) / 2
    tissue["gm"] = mid + site.grey_white * (tissue["gm"] - mid)
    tissue["wm"] = mid + site.grey_white * (tissue["wm"] - mid)
    return tissue


def _choice(rng: np.random.Generator, weights: Iterable[float]) -> int:
    p = np.asarray(list(weights), dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def _make_image(seed_key: tuple[int, ...], label: str, site: SiteProfile, subtle_share: float
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice as uint8 (height x width) and the parameters that drew it."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_key)))
    view = VIEWS[_choice(rng, site.views)]
    seq = _choice(rng, site.sequences)
    tumour = _draw_tumour(rng, label, subtle_share)
    # Slice level: the pituitary is only visible at the sella.
    # Tumour datasets hold slices through the lesion: mostly mid-brain levels, some at the skull base.
    slice_level = float(rng.uniform(0.2, 0.85) if view == "axial" else rng.random())
    if label == "pituitary":
        slice_level = float(rng.uniform(0.05, 0.3) if view == "axial" else rng.uniform(0.0, 0.45))
    fov = site.fov * float(rng.uniform(0.96, 1.04))
    rotation = float(rng.normal(0, 3))
    flip = bool(rng.random() < 0.5)
    frame = _Frame(fov, math.radians(rotation), (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03))), flip)
    tissue = _tissue_signal(seq, site)
    img, brain, grey = _render(rng, view, slice_level, tissue, frame, tumour)
    if tumour is not None:
        _draw_lesion(rng, img, frame, tumour, tissue, brain, grey)
    img *= 1 + 0.05 * _smooth(rng, 48)  # tissue microstructure

    bias = site.bias * float(rng.uniform(0.7, 1.3))
    blur = max(1.0, site.blur * float(rng.uniform(0.9, 1.1)))
    noise = site.noise * float(rng.uniform(0.75, 1.25))
    gamma = site.gamma * float(np.exp(rng.normal(0, 0.1)))
    img *= np.exp(bias * _smooth(rng, 3))
    if blur > 1.0:
        low = round(_N / blur)
        img = np.asarray(Image.fromarray(img, "F").resize((low, low), Image.Resampling.BOX)
                         .resize((_N, _N), Image.Resampling.BILINEAR))
    # Magnitude images carry Rician noise: the modulus of signal plus complex Gaussian noise.
    n = rng.standard_normal((2, _N, _N), dtype=np.float32) * noise
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
    # Window on the brain, as a reader would: its median lands at a set grey level, so an
    # enhancing tumour can saturate instead of darkening the whole slice.
    brain_level = float(np.median(img[::2, ::2][brain[::2, ::2] > 0.5]))
    img = np.clip(img * (float(rng.uniform(0.42, 0.52)) / brain_level), 0, 1) ** gamma

    width, height = site.sizes[_choice(rng, (s[2] for s in site.sizes))][:2]
    # Non-square outputs keep the anatomy's aspect: pad the square slice with background first.
    if width != height:
        side = round(_N * max(width, height) / min(width, height))
        canvas = np.zeros((side, _N) if height > width else (_N, side), np.float32)
        off = (side - _N) // 2
        if height > width:
            canvas[off:off + _N] = img
        else:
            canvas[:, off:off + _N] = img
        img = canvas
    out = Image.fromarray(img * np.float32(255 * rng.uniform(0.88, 1.0)), "F").resize(
        (width, height), Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(out) + 0.5, 0, 255).astype(np.uint8)
    params = {
        "view": view, "sequence": SEQUENCES[seq], "slice_level": slice_level, "width": width, "height": height,
        "jpeg_quality": site.jpeg_quality, "fov": fov, "rotation_deg": rotation, "flipped": int(flip),
        "gamma": gamma, "bias": bias, "noise": noise, "blur": blur,
        "tumour_size": tumour.size if tumour else 0.0, "tumour_contrast": tumour.contrast if tumour else 0.0,
        "tumour_u": tumour.u if tumour else 0.0, "tumour_v": tumour.v if tumour else 0.0,
        "subtle": "yes" if tumour and tumour.subtle else "no",
    }
    return pixels, params


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temp name in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Job:
    seed_key: tuple[int, ...]
    split: str
    label: str
    site: SiteProfile
    path: Path
    rel: str


def _run_job(job: _Job, subtle_share: float) -> dict[str, Any]:
    """Draw, encode and write one image; return its metadata row."""
    pixels, params = _make_image(job.seed_key, job.label, job.site, subtle_share)
    buffer = io.BytesIO()
    # R = G = B: the grey slice saved as RGB, as in the real set.
    Image.fromarray(pixels, "L").convert("RGB").save(buffer, "JPEG", quality=job.site.jpeg_quality)
    _write_atomic(job.path, buffer.getvalue())
    row: dict[str, Any] = {"file": job.rel, "split": job.split, "label": job.label, "site": job.site.name}
    row.update(params)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _run_chunk(jobs: list[_Job], subtle_share: float) -> list[dict[str, Any]]:
    return [_run_job(job, subtle_share) for job in jobs]


# ---------------------------------------------------------------- planning


def _class_mix(preset: SynthPreset, seed: int) -> np.ndarray:
    """Each site's class mix (sites x classes): a Dirichlet draw around the preset's class shares."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7001]))
    total = np.array([preset.train_counts[c] + preset.test_counts[c] for c in CLASS_NAMES], np.float64)
    prior = total / total.sum() if total.sum() else np.full(len(CLASS_NAMES), 1 / len(CLASS_NAMES))
    return rng.dirichlet(prior * preset.class_mix_concentration, size=preset.num_sites)


def _assign_sites(n: int, weights: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Site index of each of n images: one per site first (every site has every class), then by weight."""
    sites = len(weights)
    base = list(range(sites)) if n >= sites else []
    extra = rng.choice(sites, size=n - len(base), p=weights / weights.sum()).tolist()
    assigned = base + extra
    rng.shuffle(assigned)
    return assigned


def _plan(preset: SynthPreset, seed: int, out_dir: Path, limit: int | None) -> list[_Job]:
    mix = _class_mix(preset, seed)
    volume = np.array([s.volume for s in preset.sites])
    jobs = []
    for split_id, split in enumerate(SPLITS):
        for class_id, label in enumerate(CLASS_NAMES):
            n = preset.counts(split)[label]
            n = min(n, limit) if limit is not None else n
            # P(site | class) is proportional to the site's volume times its share of this class.
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7002, split_id, class_id]))
            sites = _assign_sites(n, volume * mix[:, class_id], rng)
            for index, site_id in enumerate(sites):
                name = f"{PREFIXES[split]}-{ABBREVIATIONS[label]}_{index:04d}.jpg"
                rel = f"{split}/{label}/{name}"
                jobs.append(_Job((seed, split_id, class_id, index), split, label, preset.sites[site_id],
                                 out_dir / rel, rel))
    return jobs


def _chunks(jobs: list[_Job], size: int) -> Iterator[list[_Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start:start + size]


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace its data")
        # Remove only what a previous generation wrote, so no stale image survives.
        for split in SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
        for name in ("metadata.csv", "synth.json"):
            (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for label in CLASS_NAMES:
            (out_dir / split / label).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- public API


def generate(out_dir: Path, preset: str = "quickstart", seed: int = 0, workers: int | None = None,
             progress: bool = True, *, overwrite: bool = False, limit: int | None = None) -> dict[str, Any]:
    """Write the synthetic set to ``out_dir`` in the Kaggle layout and return a summary.

    ``limit`` caps the images per class and split (smoke tests and quick looks);
    ``workers`` defaults to the CPU count and never changes the output bytes.
    """
    spec = get_preset(preset)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images per class and split, got {limit}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    _prepare_out_dir(out_dir, overwrite)
    jobs = _plan(spec, seed, out_dir, limit)
    workers = max(1, workers if workers is not None else os.cpu_count() or 1)

    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=len(jobs), desc=f"synth {preset}", unit="img")
    rows: list[dict[str, Any]] = []
    chunk = 16
    try:
        if workers == 1 or len(jobs) <= chunk:
            results: Iterable[list[dict[str, Any]]] = (_run_chunk(c, spec.subtle_share) for c in _chunks(jobs, chunk))
            for part in results:
                rows += part
                if bar is not None:
                    bar.update(len(part))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part in pool.map(partial(_run_chunk, subtle_share=spec.subtle_share), _chunks(jobs, chunk)):
                    rows += part
                    if bar is not None:
                        bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out_dir / "metadata.csv", buffer.getvalue().encode("utf-8"))

    counts = {split: {label: 0 for label in CLASS_NAMES} for split in SPLITS}
    per_site = {s.name: {split: {label: 0 for label in CLASS_NAMES} for split in SPLITS} for s in spec.sites}
    for row in rows:
        counts[row["split"]][row["label"]] += 1
        per_site[row["site"]][row["split"]][row["label"]] += 1
    mix = _class_mix(spec, seed)
    info = {
        "generator": "edgemri.core.synth", "version": GENERATOR_VERSION, "preset": preset, "seed": seed,
        "limit": limit, "subtle_share": spec.subtle_share, "class_mix_concentration": spec.class_mix_concentration,
        "counts": counts,
        "sites": [dict(asdict(site), class_mix=dict(zip(CLASS_NAMES, np.round(mix[i], 4).tolist(), strict=True)),
                       images=per_site[site.name]) for i, site in enumerate(spec.sites)],
        "tissue_signal": {name: dict(zip(SEQUENCES, values, strict=True)) for name, values in _TISSUE.items()},
        "metadata_columns": list(METADATA_COLUMNS),
    }
    _write_atomic(out_dir / "synth.json", (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return {
        "out_dir": str(out_dir), "preset": preset, "seed": seed, "version": GENERATOR_VERSION,
        "total": len(rows), "counts": counts, "sites": per_site,
        "seconds": round(time.perf_counter() - started, 2),
    }


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
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(png_path, grey.getvalue())
