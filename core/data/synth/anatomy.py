"""The head phantom's layout: which structures one slice through the head shows, and where.

``lay_out`` places scalp, skull, brain lobes, ventricles, cerebellum, brainstem, orbits,
sinuses and the sella for an axial, coronal or sagittal slice at a given level; the
phantom paints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemri.core.data.synth.fields import Ellipse

VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class Anatomy:
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


def lay_out(view: str, level: float, rng: np.random.Generator) -> Anatomy:
    """Layout of a slice: ``level`` (0-1) is the axial height, coronal depth or sagittal offset."""
    atrophy = float(rng.uniform(0.7, 1.35))  # ventricle size varies between people
    if view == "axial":
        if level >= 0.35:
            # Supratentorial: the head narrows towards the vertex.
            f = 1.0 if level < 0.7 else math.sqrt(max(0.3, 1 - ((level - 0.7) / 0.45) ** 2))
            vent = math.sin(math.pi * min(1.0, (level - 0.35) / 0.37)) * atrophy if level < 0.72 else 0.0
            anat = Anatomy(head=(0, 0, 0.80 * f, 0.95 * f, 0), brain=[(0, 0.01, 0.70 * f, 0.835 * f, 0)], soft=[],
                            fissure=(-0.9, 0.9) if vent < 0.05 else (-0.9, -0.3))
            if vent >= 0.05:
                anat.ventricles = ((-0.09, -0.03, 0.025 + 0.04 * vent, 0.26 * vent + 0.03, -0.18),
                                   (0.09, -0.03, 0.025 + 0.04 * vent, 0.26 * vent + 0.03, 0.18))
                anat.deep_gm = ((-0.19, 0.12, 0.09, 0.13, 0.2), (0.19, 0.12, 0.09, 0.13, -0.2))
            return anat
        # Skull base: frontal and temporal lobes, pons, cerebellum, the sella between them.
        low = level < 0.2
        frontal = (0, -0.34, 0.36, 0.26, 0) if low else (0, -0.40, 0.60, 0.42, 0)
        anat = Anatomy(head=(0, 0, 0.80, 0.95, 0),
                        brain=[frontal, (-0.5, 0.05, 0.2, 0.34, 0.15), (0.5, 0.05, 0.2, 0.34, -0.15)],
                        soft=[], cerebellum=(0, 0.56, 0.55, 0.27, 0), brainstem=(0, 0.24, 0.17, 0.14, 0),
                        ventricles=((0, 0.37, 0.05, 0.03, 0),), fissure=(-0.8, -0.2), sella=(0, -0.08),
                        gland=(0.05, 0.04))
        if low:
            anat.eyes = ((-0.3, -0.7, 0.12, 0.12, 0), (0.3, -0.7, 0.12, 0.12, 0))
        return anat
    if view == "coronal":
        anat = Anatomy(head=(0, -0.02, 0.82, 0.92, 0),
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
    anat = Anatomy(head=(0.02, 0, 0.92, 0.85, 0), brain=[(0.02, -0.10, 0.81, 0.62, 0)],
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
