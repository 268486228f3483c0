"""Scanner sites: each site's protocol, the tissue signal it produces, and how it acquires a slice.

A site applies its own contrast enhancement, fat suppression and grey/white contrast to the
tissue signals, then its own bias field, resolution, Rician noise, windowing, output size and
(in the writer) JPEG quality; its class mix is drawn in the planner. The sites are the
federation's hospitals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgemri.core.data.synth.fields import N, smooth

SEQUENCES = ("t1c", "t1", "t2", "flair")

# Signal of each tissue per sequence (t1c, t1, t2, flair), on a 0-1 scale before windowing.
TISSUE: dict[str, tuple[float, float, float, float]] = {
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
# Clinics whose protocols mix sequences, as the real set's SARTAJ and Br35H collections do (figshare is
# T1c only): site1's and site2's scanners with T2 and FLAIR slices among the T1c ones. A model distilled
# on T1c-only sites has never seen these contrasts: the new-site shift that personalization must close.
SITE_PROFILES += (
    dataclasses.replace(SITE_PROFILES[0], name="clinic1", sequences=(0.55, 0.10, 0.25, 0.10)),
    dataclasses.replace(SITE_PROFILES[1], name="clinic2", sequences=(0.45, 0.05, 0.20, 0.30)),
)

def tissue_signal(seq: int, site: SiteProfile) -> dict[str, float]:
    """Signal of each tissue for one sequence as the site's protocol renders it."""
    tissue = {name: values[seq] for name, values in TISSUE.items()}
    if SEQUENCES[seq] == "t1c":
        # Enhancement is the step up from the plain T1 signal; contrast dose and timing scale it.
        tissue = {name: t1 + site.enhancement * (t1c - t1) for name, (t1c, t1, _, _) in TISSUE.items()}
    if site.fat_sat:
        tissue["scalp"] *= 0.3
        tissue["marrow"] *= 0.3
    mid = (tissue["gm"] + tissue["wm"]) / 2
    tissue["gm"] = mid + site.grey_white * (tissue["gm"] - mid)
    tissue["wm"] = mid + site.grey_white * (tissue["wm"] - mid)
    return tissue


def choice(rng: np.random.Generator, weights: Iterable[float]) -> int:
    p = np.asarray(list(weights), dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))

@dataclass(frozen=True)
class Acquisition:
    """One acquired slice as uint8 (height x width) and the settings the site drew for it."""

    pixels: np.ndarray
    width: int
    height: int
    gamma: float
    bias: float
    noise: float
    blur: float


def acquire(rng: np.random.Generator, img: np.ndarray, brain: np.ndarray, site: SiteProfile) -> Acquisition:
    """The site's bias field, resolution loss, Rician noise, windowing and output size over a drawn slice."""
    bias = site.bias * float(rng.uniform(0.7, 1.3))
    blur = max(1.0, site.blur * float(rng.uniform(0.9, 1.1)))
    noise = site.noise * float(rng.uniform(0.75, 1.25))
    gamma = site.gamma * float(np.exp(rng.normal(0, 0.1)))
    img *= np.exp(bias * smooth(rng, 3))
    if blur > 1.0:
        low = round(N / blur)
        img = np.asarray(Image.fromarray(img, "F").resize((low, low), Image.Resampling.BOX)
                         .resize((N, N), Image.Resampling.BILINEAR))
    # Magnitude images carry Rician noise: the modulus of signal plus complex Gaussian noise.
    n = rng.standard_normal((2, N, N), dtype=np.float32) * noise
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
    # Window on the brain, as a reader would: its median lands at a set grey level, so an
    # enhancing tumour can saturate instead of darkening the whole slice.
    brain_level = float(np.median(img[::2, ::2][brain[::2, ::2] > 0.5]))
    img = np.clip(img * (float(rng.uniform(0.42, 0.52)) / brain_level), 0, 1) ** gamma

    width, height = site.sizes[choice(rng, (s[2] for s in site.sizes))][:2]
    # Non-square outputs keep the anatomy's aspect: pad the square slice with background first.
    if width != height:
        side = round(N * max(width, height) / min(width, height))
        canvas = np.zeros((side, N) if height > width else (N, side), np.float32)
        off = (side - N) // 2
        if height > width:
            canvas[off:off + N] = img
        else:
            canvas[:, off:off + N] = img
        img = canvas
    out = Image.fromarray(img * np.float32(255 * rng.uniform(0.88, 1.0)), "F").resize(
        (width, height), Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(out) + 0.5, 0, 255).astype(np.uint8)
    return Acquisition(pixels, width, height, gamma, bias, noise, blur)
