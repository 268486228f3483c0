"""Tumours: size and contrast per class, where each one sits, its mass effect, and how it is painted.

A glioma is intra-axial and infiltrative with edema, a meningioma extra-axial on the dura,
a pituitary adenoma in the sella; about ``subtle_share`` of them are small, faint or both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemri.core.data.synth.anatomy import Anatomy
from edgemri.core.data.synth.fields import Frame, inside, paint, smooth

# Tumour radius ranges in head units (head half-width ~0.8): (typical, subtle).
SIZES = {
    "glioma": ((0.18, 0.36), (0.09, 0.14)),
    "meningioma": ((0.15, 0.30), (0.08, 0.12)),
    "pituitary": ((0.12, 0.20), (0.07, 0.09)),
}


@dataclass
class Tumour:
    label: str
    size: float
    contrast: float
    subtle: bool
    u: float = 0.0
    v: float = 0.0
    kind: str = ""  # meningioma attachment: convexity, falx or skull base
    normal: float = 0.0  # meningioma: direction (radians) from the dura into the brain


def draw_tumour(rng: np.random.Generator, label: str, subtle_share: float) -> Tumour | None:
    """Size (head units) and contrast; a subtle tumour is small, faint, or both."""
    if label == "notumor":
        return None
    big, small = SIZES[label]
    subtle = bool(rng.random() < subtle_share)
    if not subtle:
        return Tumour(label, float(rng.uniform(*big)), float(rng.uniform(0.85, 1.0)), False)
    kind = rng.integers(3)  # 0 small, 1 faint, 2 small and somewhat faint
    size = float(rng.uniform(*small)) if kind != 1 else float(rng.uniform(*big))
    contrast = {0: rng.uniform(0.8, 1.0), 1: rng.uniform(0.35, 0.55), 2: rng.uniform(0.55, 0.75)}[int(kind)]
    return Tumour(label, size, float(contrast), True)


def place(rng: np.random.Generator, tumour: Tumour, anat: Anatomy, view: str) -> None:
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


def mass_effect(frame: Frame, tumour: Tumour, head_r2: np.ndarray) -> None:
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



def draw_lesion(rng: np.random.Generator, img: np.ndarray, frame: Frame, t: Tumour, tissue: dict[str, float],
                 brain: np.ndarray, grey: np.ndarray) -> None:
    """Paint the tumour (and its edema) over the slice, in place."""
    reach = t.size * (2.6 if t.label == "glioma" else 2.0)
    box = frame.box(t.u, t.v, reach)
    rows, cols = img[box].shape
    if rows == 0 or cols == 0:
        return
    jitter = smooth(rng, 10, rows, cols)
    if t.label == "glioma":
        # Irregular, infiltrative, heterogeneous; necrotic core and enhancing rim when large.
        crisp = rng.random() < 0.1  # some gliomas look well circumscribed, like a meningioma
        rot = float(rng.uniform(0, math.pi))
        ax, ay = t.size * float(rng.uniform(0.8, 1.25)), t.size * float(rng.uniform(0.75, 1.15))
        d2 = frame.d2((t.u, t.v, ax, ay, rot), box) * (1 + (0.12 if crisp else 0.4) * jitter)
        spread = float(rng.uniform(1.6, 3.0)) if not crisp else 1.4
        edema_d2 = d2 / spread**2 * (1 + 0.4 * smooth(rng, 14, rows, cols))
        # Edema spreads along white matter, sparing the cortex.
        edema = np.clip((1 - edema_d2) / 0.35, 0, 1) * (1 - 0.7 * grey[box]) * float(rng.uniform(0.5, 1.0))
        paint(img, edema * brain[box] * t.contrast, tissue["edema"], box)
        core = np.clip((1 - d2) / (0.06 if crisp else 0.2), 0, 1)
        value = tissue["glioma"] + 0.12 * smooth(rng, 16, rows, cols)
        if t.size > 0.1 and rng.random() < 0.8:
            value += np.clip(1 - np.abs(d2 - 0.6) / 0.25, 0, 1) * (tissue["rim"] - value)
            value += np.clip((0.4 - d2) / 0.1, 0, 1) * (tissue["necrosis"] - value)
        paint(img, core * brain[box] * t.contrast, value, box)
    elif t.label == "meningioma":
        # Round, extra-axial, sharply bounded with a CSF cleft, a dural tail along the skull.
        a, b = t.size * float(rng.uniform(1.0, 1.3)), t.size * float(rng.uniform(0.75, 1.0))
        rot = t.normal
        d2 = frame.d2((t.u, t.v, b, a, rot), box) * (1 + 0.06 * jitter)
        cranial = np.clip(brain[box] * 4, 0, 1)  # the intracranial space, not the scalp
        if rng.random() < 0.15:
            edema = np.clip((1 - d2 / 2.4) / 0.4, 0, 1) * (1 - 0.7 * grey[box]) * 0.6
            paint(img, edema * brain[box] * t.contrast, tissue["edema"], box)
        paint(img, np.clip(1 - np.abs(d2 - 1.12) / 0.1, 0, 1) * cranial * t.contrast * 0.7, tissue["csf"], box)
        value = tissue["meningioma"] + 0.05 * smooth(rng, 20, rows, cols)
        if rng.random() < 0.15:  # calcification
            value = np.where(smooth(rng, 30, rows, cols) > 1.6, tissue["bone"], value)
        paint(img, inside(d2, t.size) * t.contrast, value, box)
        tail = frame.d2((t.u - math.cos(rot) * b * 0.9, t.v - math.sin(rot) * b * 0.9, 0.016, a * 1.4, rot), box)
        paint(img, inside(tail, 0.016) * cranial * t.contrast * 0.8, tissue["vessel"], box)
    else:
        # Pituitary macroadenoma: a rounded sellar mass, sometimes with a cystic part.
        a, b = t.size * float(rng.uniform(0.85, 1.15)), t.size * float(rng.uniform(0.8, 1.1))
        d2 = frame.d2((t.u, t.v, a, b, 0), box) * (1 + 0.05 * jitter)
        value = tissue["pituitary"] + 0.06 * smooth(rng, 12, rows, cols)
        if t.size > 0.15 and rng.random() < 0.1:
            value = np.where(d2 < 0.16, tissue["csf"], value)
        paint(img, inside(d2, t.size, 0.015) * t.contrast, value, box)
