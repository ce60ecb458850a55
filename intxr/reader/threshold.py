"""DIALS's dispersion threshold: which pixels are strong.

The rules, from dials/algorithms/image/threshold/local.h (DIALS 3.x), in words:

- A pixel is *valid* when unmasked and inside the detector's trusted range (inclusive, on raw counts).
  Window sums count valid pixels below 2^24: m (pixels), x (sum), y (sum of squares), over a
  (2ky+1) x (2kx+1) box centred on the pixel, clipped at the frame edges, the pixel included.
- `dispersion`: strong when valid, m >= min_local, x >= 0, v > global_threshold, and with
  a = m y - x^2 - x (m-1), b = m v - x, c = x sigma_b sqrt(2 (m-1)), d = sigma_s sqrt(x m):
  a > c (index of dispersion above 1 + sigma_b sqrt(2/(m-1))) and b > d (v above mean + sigma_s sqrt(mean)).
  With a gain g: a = m y - x^2, c = g x ((m-1) + sigma_b sqrt(2 (m-1))), d = sigma_s sqrt(g x m).
- `dispersion_extended` (DIALS's default): a first pass keeps a > c only (masked pixels count as
  passing); that region is eroded by a (2e-1)-square, e = min(kernel_size); everything else valid is
  background. Strong pixels lie inside the eroded region, above global_threshold, and at or above
  mean + sigma_s sqrt(g mean), the mean taken over the background pixels of a window 2 pixels wider
  each way (0 when fewer than 2).

`find_strong_pixels` runs the C kernels of cython_ext/dispersion_simd.h through the Cython module
(no full-frame summed-area table; exact DIALS tests only where a float32 bound cannot decide; the
scalar, SSE2, AVX2 or AVX-512 path chosen at run time, `INTXR_DISPERSION_KERNEL` forces one);
`strong_mask_reference` is the plain numpy version every path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

BIG = float(1 << 24)  # DIALS leaves pixels at or above 2^24 out of the window sums


@dataclass(frozen=True)
class ThresholdParams:
    """DIALS's spotfinder.threshold.dispersion parameters, with its defaults."""

    algorithm: str = "dispersion_extended"
    gain: float | None = None
    kernel_size: tuple[int, int] = (3, 3)  # half-widths (y, x): a 7x7 window
    sigma_background: float = 6.0
    sigma_strong: float = 3.0
    min_local: int = 2
    global_threshold: float | str = 0.0  # a number or "Auto"

    def validate(self) -> None:
        if self.algorithm not in ("dispersion", "dispersion_extended"):
            raise ValueError(f"algorithm {self.algorithm!r}: expected dispersion or dispersion_extended")
        ky, kx = self.kernel_size
        if ky < 1 or kx < 1:
            raise ValueError(f"kernel_size {self.kernel_size}: half-widths must be >= 1")
        if self.sigma_background < 0 or self.sigma_strong < 0:
            raise ValueError("sigma_background and sigma_strong must be >= 0")
        if self.gain is not None and not self.gain > 0:
            raise ValueError(f"gain {self.gain}: must be > 0")
        n_kernel = (2 * ky + 1) * (2 * kx + 1)
        if self.min_local > n_kernel:
            raise ValueError(f"min_local {self.min_local}: at most {n_kernel} pixels fit the kernel")
        if self.min_local == 1:
            raise ValueError("min_local 1: DIALS needs 2 or more (or <= 0 for a full kernel)")
        if self.global_threshold != "Auto" and not float(self.global_threshold) >= 0:
            raise ValueError(f"global_threshold {self.global_threshold}: must be >= 0 or Auto")

    @property
    def min_count(self) -> int:
        """DIALS: min_local <= 0 means the whole kernel must be valid."""
        ky, kx = self.kernel_size
        return self.min_local if self.min_local > 0 else (2 * ky + 1) * (2 * kx + 1)


def estimate_global_threshold(image: np.ndarray) -> float:
    """DIALS's `global_threshold = Auto` (dispersion_spotfinder_threshold_ext.estimate_global_threshold):
    the elbow of the count of pixels above int(1.5^i), i = 1..19, over the whole frame (mask ignored)."""
    levels = np.array([int(1.5**i) for i in range(1, 20)], dtype=np.float64)
    counts = np.array([np.count_nonzero(image > g) for g in levels], dtype=np.float64)
    slopes = (counts[-1] - counts[:-1]) / (levels[-1] - levels[:-1])
    p_m = int(np.argmin(slopes))
    x1, y1 = levels[p_m], counts[p_m]
    x2, y2 = levels[-1], counts[-1]
    v = np.array([y2 - y1, -(x2 - x1)])
    v /= np.linalg.norm(v)
    gaps = np.abs((x1 - levels[p_m:]) * v[0] + (y1 - counts[p_m:]) * v[1])
    p_g = int(np.argmax(gaps))
    return float(levels[p_g + p_m - 2])  # a negative index wraps, as flex indexing does in DIALS


def trusted_range_for(image: np.ndarray, count_cutoff: int | None) -> tuple[float, float]:
    """dxtbx's trusted range on raw counts: 0 .. the detector's count cutoff, inclusive. Unsigned frames
    also mark gaps and dead pixels as 2^bits-1 and 2^bits-2 (dxtbx reads them as -1, -2), so those are
    never trusted."""
    high = float(count_cutoff) if count_cutoff is not None else np.inf
    if image.dtype.kind == "u":
        high = min(high, float(np.iinfo(image.dtype).max - 2))
    return 0.0, high


def _checked(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A C-contiguous frame of a type the kernels take (uint16, int32, uint32; float64 stays float64
    and is routed to the numpy path) and a uint8 mask of the same shape."""
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if image.dtype in (np.int8, np.uint8, np.int16):
        image = image.astype(np.int32)
    elif image.dtype == np.float32:
        image = image.astype(np.float64)
    elif image.dtype not in (np.uint16, np.int32, np.uint32, np.float64):
        raise ValueError(f"image dtype {image.dtype} not supported (8/16/32-bit integers, float32, float64)")
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise ValueError("image holds NaN or infinite values")
        if np.array_equal(image, np.round(image)) and np.abs(image).max(initial=0) < 2**31:
            image = image.astype(np.int32)  # integer counts held as floats: the exact kernel applies
    if mask is None:  # every pixel may be used: the kernels take None without a frame of ones
        return np.ascontiguousarray(image), None
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    return np.ascontiguousarray(image), np.ascontiguousarray(mask, dtype=np.uint8)


def find_strong_pixels(
    image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], params: ThresholdParams
) -> tuple[np.ndarray, np.ndarray]:
    """(strong, overloaded): raster indices (int64, ascending) of the strong pixels, and of the unmasked
    pixels above the trusted range (saturated). The Cython kernel for counts; frames of non-integer
    values (gain-corrected data) take the numpy path, which agrees with DIALS to rounding."""
    from intxr._kernels.dispersion import strong_pixels

    params.validate()
    image, mask = _checked(image, mask)
    threshold = params.global_threshold
    if threshold == "Auto":
        threshold = estimate_global_threshold(image)
    if image.dtype.kind == "f":
        fixed = replace(params, global_threshold=float(threshold))
        strong = np.flatnonzero(strong_mask_reference(image, mask, trusted_range, fixed))
        usable = True if mask is None else mask > 0
        return strong, np.flatnonzero((image > trusted_range[1]) & usable)
    ky, kx = params.kernel_size
    return strong_pixels(
        image,
        mask,
        float(trusted_range[0]),
        float(trusted_range[1]),
        ky,
        kx,
        float(params.sigma_background),
        float(params.sigma_strong),
        params.min_count,
        float(threshold),
        float(params.gain or 0.0),
        params.algorithm == "dispersion_extended",
    )


# ---------------------------------------------------------------------------------------------
# Plain numpy reference (float64 summed-area tables, as DIALS computes them): slow and obvious.


def _window_sums(values: np.ndarray, use: np.ndarray, ky: int, kx: int) -> tuple[np.ndarray, ...]:
    """Clipped-box sums of (count, value, value^2) over pixels where `use`, via summed-area tables."""
    h, w = values.shape
    v = np.where(use, values, 0.0)

    def box(a: np.ndarray) -> np.ndarray:
        sat = np.zeros((h + 1, w + 1))
        sat[1:, 1:] = a.cumsum(0).cumsum(1)
        j0 = np.clip(np.arange(h) - ky, 0, h)
        j1 = np.clip(np.arange(h) + ky + 1, 0, h)
        i0 = np.clip(np.arange(w) - kx, 0, w)
        i1 = np.clip(np.arange(w) + kx + 1, 0, w)
        return sat[j1][:, i1] - sat[j0][:, i1] - sat[j1][:, i0] + sat[j0][:, i0]

    return box(use.astype(np.float64)), box(v), box(v * v)


def strong_mask_reference(
    image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], params: ThresholdParams
) -> np.ndarray:
    """Boolean strong-pixel mask computed the obvious way; the reference for `find_strong_pixels`."""
    params.validate()
    values = np.asarray(image, dtype=np.float64)
    valid = np.ones(values.shape, bool) if mask is None else mask.astype(bool)
    valid &= (values >= trusted_range[0]) & (values <= trusted_range[1])
    threshold = params.global_threshold
    if threshold == "Auto":
        threshold = estimate_global_threshold(np.asarray(image))
    ky, kx = params.kernel_size
    g = params.gain
    ns_b, ns_s = params.sigma_background, params.sigma_strong
    m, x, y = _window_sums(values, valid & (values < BIG), ky, kx)
    with np.errstate(invalid="ignore", divide="ignore"):
        if g is None:
            a = m * y - x * x - x * (m - 1)
            c = x * ns_b * np.sqrt(2 * (m - 1))
        else:
            a = m * y - x * x
            c = g * x * ((m - 1) + ns_b * np.sqrt(2 * (m - 1)))
        cv = valid & (m >= params.min_count) & (x >= 0) & (a > c)
        if params.algorithm == "dispersion":
            b = m * values - x
            d = ns_s * np.sqrt(x * m) if g is None else ns_s * np.sqrt(g * x * m)
            return cv & (values > threshold) & (b > d)
        # Extended: masked pixels count as cv; erode by a square of radius min(kernel) - 1.
        cv |= ~valid
        radius = min(ky, kx) - 1
        h, w = values.shape
        padded = np.pad(cv, radius, constant_values=True)  # outside the frame never erodes
        eroded = np.ones_like(cv)
        for dj in range(2 * radius + 1):
            for di in range(2 * radius + 1):
                eroded &= padded[dj : dj + h, di : di + w]
        background = valid & ~(cv & eroded)
        m2, x2, _ = _window_sums(values, background & (values < BIG), ky + 2, kx + 2)
        mean = np.where(m2 >= 2, x2 / np.maximum(m2, 1), 0.0)
        local = values >= mean + ns_s * np.sqrt((g or 1.0) * mean)
        return valid & ~background & (x2 >= 0) & (values > threshold) & local
