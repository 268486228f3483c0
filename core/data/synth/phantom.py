"""One synthetic slice: the normal head painted from its layout, the tumour over it, the site's scanner applied.

Every image is seeded from its own key (seed, split, class, index), so it is the same bytes
whichever worker draws it and in whatever order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgemri.core.data.synth.anatomy import VIEWS, lay_out
from edgemri.core.data.synth.fields import Frame, N, inside, paint, polar_texture, smooth
from edgemri.core.data.synth.scanner import SEQUENCES, SiteProfile, acquire, choice, tissue_signal
from edgemri.core.data.synth.tumours import Tumour, draw_lesion, draw_tumour, mass_effect, place


def _cerebellum(rng: np.random.Generator, frame: Frame, e: Any, view: str, tissue: dict[str, float],
                cb_d2: np.ndarray, parenchyma: np.ndarray, grey: np.ndarray) -> None:
    """Cerebellar folia painted into ``parenchyma`` and ``grey``: wavy stripes parallel to the surface around a
    white core, split by the vermis (``e``: the cerebellum's ellipse)."""
    box = frame.box(e[0], e[1], max(e[2], e[3]))
    r = np.sqrt(cb_d2[box])
    rows, cols = r.shape
    folia = np.sin(r * 34 + 2.5 * smooth(rng, 9, rows, cols))
    cb_tissue = np.where(folia > 0.6, tissue["csf"], tissue["gm"])
    cb_tissue = np.where(r < 0.4 + 0.12 * folia, tissue["wm"], cb_tissue)
    if view != "sagittal":
        vermis = np.clip(1 - np.abs(frame.u[box] - e[0]) / 0.02, 0, 1) * (frame.v[box] > e[1])
        cb_tissue = cb_tissue + vermis * (tissue["csf"] - cb_tissue)
    cb = inside(cb_d2[box], e[2], 0.02)
    parenchyma[box] += cb * (cb_tissue - parenchyma[box])
    grey[box] = np.maximum(grey[box], cb * (r >= 0.4))


def render(rng: np.random.Generator, view: str, level: float, tissue: dict[str, float], frame: Frame,
            tumour: Tumour | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise-free normal slice on the working grid in tissue signal units, its brain mask and grey-matter map."""
    anat = lay_out(view, level, rng)
    if tumour is not None:
        place(rng, tumour, anat, view)

    head_r2 = frame.d2(anat.head) * (1 + 0.02 * smooth(rng, 5))
    if tumour is not None:
        mass_effect(frame, tumour, head_r2)
    img = np.zeros((N, N), np.float32)
    # Scalp, skull with its marrow, then the intracranial space.
    for extra in anat.soft:
        paint(img, inside(frame.d2(extra), extra[2]), tissue["soft"])
    size = anat.head[2]
    paint(img, inside(head_r2, size), tissue["scalp"])
    paint(img, inside(head_r2 / 0.955**2, size), tissue["bone"])
    diploe = np.clip(1 - np.abs(head_r2 - 0.93**2) / 0.02, 0, 1) * np.clip(smooth(rng, 9) + 0.5, 0, 1)
    paint(img, diploe, tissue["marrow"])
    paint(img, inside(head_r2 / 0.905**2, size), tissue["soft"])
    for e in anat.air:
        paint(img, inside(frame.d2(e), e[2]), tissue["air"])
    for e in anat.eyes:
        box = frame.box(e[0], e[1], e[2])
        d2 = frame.d2(e, box)
        paint(img, inside(d2 / 1.3, e[2]), tissue["scalp"], box)  # orbital fat
        paint(img, inside(d2, e[2]), tissue["eye"], box)

    # Brain: union of lobes, a CSF margin, white matter inside a grey ribbon cut by sulci.
    outline = 1 + 0.04 * smooth(rng, 7)
    lobes = [frame.d2(e) * outline for e in anat.brain]
    brain_d2 = np.min(lobes, axis=0)
    # Depth below the brain surface in head units: the cortex is equally thick on every lobe.
    depth = np.max([(1 - np.sqrt(d)) * min(e[2], e[3]) for d, e in zip(lobes, anat.brain, strict=True)], axis=0)
    cb_d2 = None
    if anat.cerebellum is not None:
        cb_d2 = frame.d2(anat.cerebellum) * outline
        brain_d2 = np.minimum(brain_d2, cb_d2)
    size = anat.brain[0][2]
    paint(img, inside(brain_d2 / 1.12, size), tissue["csf"])
    brain = inside(brain_d2, size)
    cu, cv = anat.brain[0][:2]
    folds = polar_texture(rng, 1 - depth / 0.6, np.arctan2(frame.v - cv, frame.u - cu), 60)
    folds += 0.4 * smooth(rng, 28)
    gyri = 0.17 + 0.03 * smooth(rng, 6)  # how deep the sulci reach
    cortex = np.clip((gyri - depth) / 0.04, 0, 1)
    grey = np.maximum(np.clip((0.6 - np.abs(folds)) / 0.12, 0, 1) * cortex, np.clip((0.035 - depth) / 0.015, 0, 1))
    parenchyma = tissue["wm"] + grey * (tissue["gm"] - tissue["wm"])
    sulci = np.clip(1 - np.abs(folds) / 0.12, 0, 1) * np.clip((gyri - 0.04 - depth) / 0.04, 0, 1)
    parenchyma += sulci * (tissue["csf"] - parenchyma)
    if anat.cerebellum is not None and cb_d2 is not None:
        _cerebellum(rng, frame, anat.cerebellum, view, tissue, cb_d2, parenchyma, grey)
    paint(img, brain, parenchyma)
    for e in anat.deep_gm:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        paint(img, inside(frame.d2(e, box), e[2], 0.03), tissue["gm"], box)
    if anat.callosum is not None:
        box = frame.box(anat.callosum[0], anat.callosum[1], anat.callosum[2])
        d2 = frame.d2(anat.callosum, box)
        ring = np.clip(1 - np.abs(d2 - 0.85) / 0.13, 0, 1) * (frame.v[box] < anat.callosum[1])
        paint(img, ring, tissue["wm"], box)
    if anat.brainstem is not None:
        e = anat.brainstem
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        paint(img, inside(frame.d2(e, box), e[2]), 0.6 * tissue["wm"] + 0.4 * tissue["gm"], box)
    for e in anat.white:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        paint(img, inside(frame.d2(e, box), e[3]), tissue["wm"], box)
    if anat.fissure is not None:
        v0, v1 = anat.fissure
        line = np.clip(1 - np.abs(frame.u) / 0.014, 0, 1) * ((frame.v > v0) & (frame.v < v1)) * brain
        paint(img, line, tissue["csf"])
        # Superior sagittal sinus: bright on contrast scans where the falx meets the skull.
        ends = (cv - anat.brain[0][3], cv + anat.brain[0][3]) if v1 > 0.5 else (cv - anat.brain[0][3],)
        for end in ends:
            sinus = (0.0, end + (0.03 if end < cv else -0.03), 0.03, 0.03, 0)
            box = frame.box(sinus[0], sinus[1], 0.06)
            paint(img, inside(frame.d2(sinus, box), 0.03), tissue["vessel"], box)
    for e in anat.ventricles:
        box = frame.box(e[0], e[1], max(e[2], e[3]))
        paint(img, inside(frame.d2(e, box), min(e[2], e[3])), tissue["csf"], box)
    if anat.sella is not None:
        su, sv = anat.sella
        ga, gb = anat.gland
        gland = (su, sv, ga * float(rng.uniform(0.85, 1.2)), gb * float(rng.uniform(0.8, 1.25)), 0)
        box = frame.box(su, sv, 0.14)
        paint(img, inside(frame.d2((su, sv - 0.02, ga * 1.8, gb * 2.2, 0), box), gb), tissue["csf"], box)
        paint(img, inside(frame.d2(gland, box), gb), tissue["gland"], box)
    intracranial = inside(head_r2 / 0.905**2, anat.head[2])
    return img, brain * intracranial, grey

def make_image(seed_key: tuple[int, ...], label: str, site: SiteProfile, subtle_share: float
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice as uint8 (height x width) and the parameters that drew it."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_key)))
    view = VIEWS[choice(rng, site.views)]
    seq = choice(rng, site.sequences)
    tumour = draw_tumour(rng, label, subtle_share)
    # Slice level: the pituitary is only visible at the sella.
    # Tumour datasets hold slices through the lesion: mostly mid-brain levels, some at the skull base.
    slice_level = float(rng.uniform(0.2, 0.85) if view == "axial" else rng.random())
    if label == "pituitary":
        slice_level = float(rng.uniform(0.05, 0.3) if view == "axial" else rng.uniform(0.0, 0.45))
    fov = site.fov * float(rng.uniform(0.96, 1.04))
    rotation = float(rng.normal(0, 3))
    flip = bool(rng.random() < 0.5)
    frame = Frame(fov, math.radians(rotation), (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03))), flip)
    tissue = tissue_signal(seq, site)
    img, brain, grey = render(rng, view, slice_level, tissue, frame, tumour)
    if tumour is not None:
        draw_lesion(rng, img, frame, tumour, tissue, brain, grey)
    img *= 1 + 0.05 * smooth(rng, 48)  # tissue microstructure
    scan = acquire(rng, img, brain, site)
    params = {
        "view": view, "sequence": SEQUENCES[seq], "slice_level": slice_level, "width": scan.width,
        "height": scan.height, "jpeg_quality": site.jpeg_quality, "fov": fov, "rotation_deg": rotation,
        "flipped": int(flip), "gamma": scan.gamma, "bias": scan.bias, "noise": scan.noise, "blur": scan.blur,
        "tumour_size": tumour.size if tumour else 0.0, "tumour_contrast": tumour.contrast if tumour else 0.0,
        "tumour_u": tumour.u if tumour else 0.0, "tumour_v": tumour.v if tumour else 0.0,
        "subtle": "yes" if tumour and tumour.subtle else "no",
    }
    return scan.pixels, params
