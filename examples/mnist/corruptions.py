"""MNIST-C-style corruptions (Mu & Gilmer, 2019) with numpy and scipy.ndimage only.

No package ships MNIST-C, so the case study makes its drifted streams here. Every corruption is
``f(images, severity, rng) -> images``: uint8 (n, 28, 28) in and out, severity 1 (mild) to 5
(strong), all randomness drawn from ``rng`` so a seed reproduces a stream exactly. Per-image
randomness (a rotation's sign, a line's position) is drawn per image, like MNIST-C; the work is
vectorised over the whole stack (10,000 images take well under a second for most corruptions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from scipy import ndimage

T = TypeVar("T")
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

_CHUNK = 2_000  # images per map_coordinates call: bounds the coordinate arrays to ~100 MB


def _pick(values: Sequence[T], severity: int) -> T:
    """The parameter for a severity; refuse anything outside 1..5."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    if not 1 <= severity <= len(values):
        raise ValueError(f"severity must be 1..{len(values)}, got {severity}")
    return values[int(severity) - 1]


def _level(values: Sequence[float], severity: int) -> float:
    return float(_pick(values, severity))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every image with one 2-D kernel (never across the image axis)."""
    return ndimage.correlate(x, kernel[None, :, :], mode="constant", cval=0.0)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma), mode="constant", cval=0.0)


def _random_signs(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def _warp(images: np.ndarray, matrices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-image affine warp about the centre: output pixel p samples input at A_i p' + t_i.

    ``matrices`` (n, 2, 2) and ``offsets`` (n, 2) are in (row, col) order and map output to
    input coordinates (like ``ndimage.affine_transform``), so rotating by +θ means passing the
    matrix of -θ. One ``map_coordinates`` call per chunk keeps it vectorised.
    """
    n, h, w = images.shape
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                             indexing="ij")
    grid = np.stack([rows - centre[0], cols - centre[1]])  # (2, h, w)
    out = np.empty((n, h, w), dtype=np.float64)
    src = images.astype(np.float64)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        a, t = matrices[start:stop], offsets[start:stop]
        coords = np.einsum("nij,jhw->inhw", a, grid) + (centre + t).T[:, :, None, None]
        index = np.broadcast_to(np.arange(stop - start, dtype=np.float64)[:, None, None],
                                coords.shape[1:])
        full = np.concatenate([index[None], coords])
        out[start:stop] = ndimage.map_coordinates(src[start:stop], full, order=1,
                                                  mode="constant", cval=0.0)
    return _to_uint8(out)


def rotate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate by 10..50 degrees (by severity), clockwise or anticlockwise per image."""
    degrees = _level([10, 20, 30, 40, 50], severity)
    theta = np.deg2rad(degrees) * _random_signs(len(images), rng)
    c, s = np.cos(theta), np.sin(theta)
    matrices = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1)
    return _warp(images, matrices, np.zeros((len(images), 2)))


def shear(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Horizontal shear by a factor of 0.15..0.75, left or right per image."""
    k = _level([0.15, 0.3, 0.45, 0.6, 0.75], severity) * _random_signs(len(images), rng)
    matrices = np.zeros((len(images), 2, 2))
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1.0
    matrices[:, 1, 0] = k
    return _warp(images, matrices, np.zeros((len(images), 2)))


def translate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shift by 1..5 pixels in a random direction per image."""
    dist = _level([1, 2, 3, 4, 5], severity)
    angle = rng.uniform(0.0, 2 * np.pi, size=len(images))
    offsets = -dist * np.stack([np.sin(angle), np.cos(angle)], -1)
    matrices = np.broadcast_to(np.eye(2), (len(images), 2, 2))
    return _warp(images, matrices, offsets)


def scale(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shrink about the centre to 90..50 % (jittered ±3 % per image)."""
    factor = _level([0.9, 0.8, 0.7, 0.6, 0.5], severity)
    f = factor * (1.0 + rng.uniform(-0.03, 0.03, size=len(images)))
    matrices = np.eye(2)[None, :, :] / f[:, None, None]
    return _warp(images, matrices, np.zeros((len(images), 2)))


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Lift every pixel by 10..50 % of full scale (the background turns grey)."""
    lift = _level([0.1, 0.2, 0.3, 0.4, 0.5], severity)
    return _to_uint8(images.astype(np.float64) + 255.0 * lift)


def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add a smooth random cloud (two blurred noise octaves), then renormalise like MNIST-C."""
    amount = _level([0.2, 0.35, 0.5, 0.65, 0.8], severity)
    n, h, w = images.shape
    cloud = _blur(rng.standard_normal((n, h, w)), 5.0) + 0.5 * _blur(
        rng.standard_normal((n, h, w)), 2.0
    )
    lo = cloud.min(axis=(1, 2), keepdims=True)
    hi = cloud.max(axis=(1, 2), keepdims=True)
    cloud = (cloud - lo) / np.maximum(hi - lo, 1e-12)
    x = images.astype(np.float64) / 255.0 + amount * cloud
    return _to_uint8(255.0 * x / (1.0 + amount))


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A normalised anti-aliased line of ``length`` pixels through the kernel's centre."""
    size = length if length % 2 else length + 1
    centre = (size - 1) / 2.0
    kernel = np.zeros((size, size))
    half = (length - 1) / 2.0
    for t in np.linspace(-half, half, 4 * length):
        r, c = centre - t * np.sin(angle), centre + t * np.cos(angle)
        r0, c0 = int(np.floor(r)), int(np.floor(c))
        fr, fc = r - r0, c - c0
        for dr, dc, wgt in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)),
                            (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
            if 0 <= r0 + dr < size and 0 <= c0 + dc < size:
                kernel[r0 + dr, c0 + dc] += wgt
    return kernel / kernel.sum()


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur along a line of 3..11 pixels at a random angle per image (12 angle bins)."""
    length = int(_level([3, 5, 7, 9, 11], severity))
    bins = 12
    which = rng.integers(0, bins, size=len(images))
    x = images.astype(np.float64)
    out = np.empty_like(x)
    for b in range(bins):
        sel = which == b
        if sel.any():
            out[sel] = _filter2d(x[sel], _line_kernel(length, np.pi * b / bins))
    return _to_uint8(out)


def glass_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, jitter every pixel to a random neighbour, blur again (ImageNet-C's glass)."""
    sigma, delta, iterations = _pick(
        [(0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.8, 2, 2), (1.0, 3, 2)], severity
    )
    n, h, w = images.shape
    x = _blur(images.astype(np.float64), sigma)
    idx = np.arange(n)[:, None, None]
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    for _ in range(iterations):
        dr = rng.integers(-delta, delta + 1, size=(n, h, w))
        dc = rng.integers(-delta, delta + 1, size=(n, h, w))
        x = x[idx, np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)]
    return _to_uint8(_blur(x, sigma))


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: 3..27 % of pixels set to black or white."""
    amount = _level([0.03, 0.06, 0.09, 0.17, 0.27], severity)
    hit = rng.random(images.shape) < amount
    salt = rng.random(images.shape) < 0.5
    out = images.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise; fewer photons (60..3 at full intensity) is noisier."""
    photons = _level([60, 25, 12, 5, 3], severity)
    counts = rng.poisson(images.astype(np.float64) / 255.0 * photons)
    return _to_uint8(counts / photons * 255.0)


def stripe(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Invert a vertical band 2..8 pixels wide at a random column of each image."""
    width = int(_level([2, 3, 4, 6, 8], severity))
    n, h, w = images.shape
    left = rng.integers(4, w - 4 - width + 1, size=n)
    cols = np.arange(w)[None, :]
    band = (cols >= left[:, None]) & (cols < left[:, None] + width)  # (n, w)
    mask = np.broadcast_to(band[:, None, :], images.shape)
    return np.where(mask, 255 - images, images).astype(np.uint8)


def _draw_polylines(images: np.ndarray, points: np.ndarray, keep: np.ndarray | None
                    ) -> np.ndarray:
    """Draw white polylines through ``points`` (n, k, 2) in (row, col); ``keep`` dashes them."""
    n, h, w = images.shape
    steps = 4 * max(h, w)
    t = np.linspace(0.0, 1.0, steps)[None, None, :, None]
    seg = points[:, :-1, None, :] * (1 - t) + points[:, 1:, None, :] * t  # (n, k-1, steps, 2)
    seg = seg.reshape(n, -1, 2)
    if keep is not None:
        seg = seg[:, keep[: seg.shape[1]], :]
    r = np.clip(np.rint(seg[..., 0]).astype(np.intp), 0, h - 1)
    c = np.clip(np.rint(seg[..., 1]).astype(np.intp), 0, w - 1)
    out = images.copy()
    out[np.broadcast_to(np.arange(n)[:, None], r.shape), r, c] = 255
    return out


def zigzag(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a zigzag of 2..6 straight strokes between random points of each image."""
    strokes = int(_level([2, 3, 4, 5, 6], severity))
    n, h, w = images.shape
    points = rng.uniform([2, 2], [h - 3, w - 3], size=(n, strokes + 1, 2))
    return _draw_polylines(images, points, None)


def dotted_line(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Draw 1..5 dotted lines from one border to another (a dot every 3 pixels)."""
    lines = int(_level([1, 2, 3, 4, 5], severity))
    n, h, w = images.shape
    out = images
    steps = 4 * max(h, w)
    # A point every 1/4 pixel of a ~28 px line; keep 4 of every 12 to leave 2 px gaps.
    keep = (np.arange(steps) % 12) < 4
    for _ in range(lines):
        start = rng.uniform([0, 0], [h - 1, 3], size=(n, 2))
        end = rng.uniform([0, w - 4], [h - 1, w - 1], size=(n, 2))
        vertical = rng.random(n) < 0.5
        start[vertical] = start[vertical][:, ::-1]
        end[vertical] = end[vertical][:, ::-1]
        out = _draw_polylines(out, np.stack([start, end], 1), keep)
    return out


def canny_edges(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Replace the digit by its edge map (Sobel gradient magnitude), blended 20..100 %."""
    blend = _level([0.2, 0.4, 0.6, 0.8, 1.0], severity)
    x = _blur(images.astype(np.float64), 0.7)
    sobel = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    magnitude = np.hypot(_filter2d(x, sobel), _filter2d(x, sobel.T))
    peak = magnitude.max(axis=(1, 2), keepdims=True)
    edges = np.where(magnitude > 0.3 * peak, 255.0, 0.0)
    return _to_uint8((1.0 - blend) * images.astype(np.float64) + blend * edges)


CORRUPTIONS: dict[str, Corruption] = {
    "rotate": rotate,
    "shear": shear,
    "translate": translate,
    "scale": scale,
    "brightness": brightness,
    "fog": fog,
    "motion_blur": motion_blur,
    "glass_blur": glass_blur,
    "impulse_noise": impulse_noise,
    "shot_noise": shot_noise,
    "stripe": stripe,
    "zigzag": zigzag,
    "dotted_line": dotted_line,
    "canny_edges": canny_edges,
}


def corrupt(images: np.ndarray, name: str, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Apply the corruption ``name`` to uint8 images (n, 28, 28); the same seed, the same output."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[1] < 12 or arr.shape[2] < 12:
        raise ValueError(f"images must have shape (n, 28, 28), got {arr.shape}")
    _pick([1, 2, 3, 4, 5], severity)
    if arr.shape[0] == 0:
        return arr.copy()
    return CORRUPTIONS[name](arr, int(severity), np.random.default_rng(seed))
