"""Drawing primitives on the 256 x 256 working grid: smooth random fields, head coordinates, soft masks.

Smooth random fields are small random grids upsampled by two matrix products, so a slice
needs no FFT and no per-pixel loop.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

N = 256  # working resolution of every slice before the site's resize
EDGE = 0.012  # soft-edge width in head units (about 1.5 working pixels)

Ellipse = tuple[float, float, float, float, float]  # centre u, centre v, semi-axis a, semi-axis b, rotation


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


def smooth(rng: np.random.Generator, n: int, rows: int = N, cols: int = N, *, n_cols: int | None = None,
           periodic_cols: bool = False) -> np.ndarray:
    """A zero-mean, unit-variance random field of shape (rows, cols) with n (and n_cols) features across."""
    n_cols = n_cols or n
    knots = rng.standard_normal((n, n_cols), dtype=np.float32)
    # einsum, not matmul: BLAS threads crawl on these small products when cores are busy, and
    # BLAS may sum in a thread-dependent order; einsum's own loop is fast and deterministic.
    half = np.einsum("ij,jk->ik", _basis(n, rows), knots)
    field = np.einsum("ik,lk->il", half, _basis(n_cols, cols, periodic_cols))
    return field / (field.std() + 1e-6)


def polar_texture(rng: np.random.Generator, radius: np.ndarray, theta: np.ndarray, around: int) -> np.ndarray:
    """A random field that varies slowly along ``radius`` (0-1) and fast around it: radial folds."""
    field = smooth(rng, 4, 32, 512, n_cols=around, periodic_cols=True)
    ir = np.clip(radius * 24, 0, 31).astype(np.intp)
    it = ((theta + math.pi) * (512 / (2 * math.pi))).astype(np.intp) % 512
    return field[ir, it]


class Frame:
    """The pixel grid of one slice and its head coordinates (u to the right, v down, head ~ unit size)."""

    def __init__(self, scale: float, rotation: float, shift: tuple[float, float], flip: bool) -> None:
        self.scale, self.cos, self.sin = scale, math.cos(rotation), math.sin(rotation)
        self.shift, self.flip = shift, flip
        axis = (np.arange(N, dtype=np.float32) + 0.5) / N * 2 - 1
        x = -axis if flip else axis
        dx, dy = x[None, :] - shift[0], axis[:, None] - shift[1]
        self.u = (self.cos * dx + self.sin * dy) / scale
        self.v = (-self.sin * dx + self.cos * dy) / scale

    def box(self, cu: float, cv: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows and columns that hold the disc of ``radius`` around (cu, cv), with a margin."""
        x = self.scale * (self.cos * cu - self.sin * cv) + self.shift[0]
        y = self.scale * (self.sin * cu + self.cos * cv) + self.shift[1]
        x = -x if self.flip else x
        col, row = (x + 1) / 2 * N, (y + 1) / 2 * N
        half = radius * self.scale * N / 2 + 4
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


def inside(d2: np.ndarray, size: float, edge: float = EDGE) -> np.ndarray:
    """Soft mask (0-1) of d2 < 1 with an edge about ``edge`` head units wide for a shape of ``size``."""
    return np.clip((1.0 - d2) * (size / (2 * edge)) + 0.5, 0.0, 1.0)


def paint(img: np.ndarray, mask: np.ndarray, value: float | np.ndarray,
          box: tuple[slice, slice] | None = None) -> None:
    """Composite ``value`` over ``img`` with coverage ``mask`` (in place)."""
    target = img if box is None else img[box]
    target += mask * (value - target)
