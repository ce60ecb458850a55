"""Pre-screen: can this frame hold Bragg spots at all? Decided in a few milliseconds so blank frames
of a raster scan cost almost nothing.

The frame is binned 4 x 4 (sums of trusted counts; a sum of Poisson counts is Poisson) and DIALS's
dispersion test runs on the binned frame. A Bragg spot, a few pixels across, lands in one or two
bins and stays an outlier there; Poisson background does not. Blocks touching an untrusted pixel
are left out, so module gaps do not pass as structure. A strong bin is a spot candidate when its
block (with a one-pixel margin) holds at least `min_spot_pixels` pixels clearly above the local
background (the neighbouring bins' mean): a DIALS spot needs 3 strong pixels, so single hot
pixels and cosmic-ray hits are not candidates. The frame passes at `min_candidates` candidates.

Measured on the real frames in ../shared (tests/test_prescreen.py): every frame on which DIALS finds
min_Bragg_peaks spots passes; the blank ones do not.

The binning is Rust (intxr._splitter): it runs inside the bitshuffle-LZ4 decoder's pass
(`decode_and_bin`: each band of rows is binned while the decoder's output is still in cache, so a
blank frame is read from memory once). The dispersion test on the binned frame is the threshold's
own kernel (dispersion.pyx), 0.35 ms on a 6M frame's bins. The Cython `bin_frame` (prescreen.pyx)
and the numpy reference stay as the references the tests compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from intxr import _splitter, codec
from intxr.reader.threshold import ThresholdParams, _checked, find_strong_pixels


@dataclass(frozen=True)
class PrescreenParams:
    factor: int = 4
    sigma_background: float = 6.0  # DIALS's sigmas on the binned frame
    sigma_strong: float = 3.0
    pixel_sigma: float = 2.0  # a candidate's pixels: above local background + 2 sigma (looser than DIALS's 3)
    min_spot_pixels: int = 3  # DIALS's min_spot_size for pixel-array detectors
    min_candidates: int = 5  # half of the default min_Bragg_peaks: one candidate per spot passes a hit


@dataclass(frozen=True)
class PrescreenResult:
    passed: bool
    n_binned_strong: int
    n_candidates: int  # counted until the pass mark is reached


def _bounds(trusted_range: tuple[float, float]) -> tuple[int, int]:
    # Integer bounds: counts are integers, so lo <= v <= hi is v >= ceil(lo) and v <= floor(hi).
    lo, hi = float(trusted_range[0]), min(float(trusted_range[1]), 9.0e18)
    return int(max(math.ceil(lo), -9.0e18)), int(math.floor(hi))


def _rust_pixel(dtype: np.dtype) -> tuple[int, bool] | None:
    """(element size, signed) of the pixel types the Rust kernels bin; None for the others."""
    dtype = np.dtype(dtype)
    if dtype in (np.uint8, np.uint16, np.uint32, np.int32) and dtype.isnative:
        return dtype.itemsize, dtype.kind == "i"
    return None


_mask_cache: list = [None, 0, None]  # (mask object, factor, its blocks' "every pixel unmasked")


def mask_bins(mask: np.ndarray, factor: int) -> np.ndarray:
    """uint8 per block: 1 where every pixel of the block is unmasked. A series' mask is the same
    object frame after frame (SpotFinder.mask_for), so the last one is kept."""
    if _mask_cache[0] is mask and _mask_cache[1] == factor:
        return _mask_cache[2]
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    blocks = (np.asarray(mask)[: h * factor, : w * factor] != 0).reshape(h, factor, w, factor).all(axis=(1, 3))
    _mask_cache[:] = [mask, factor, blocks.astype(np.uint8)]
    return _mask_cache[2]


def _binned_arrays(shape: tuple[int, ...], factor: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape[0] // factor, shape[1] // factor
    return np.empty((h, w), np.uint32), np.empty((h, w), np.uint8)


def bin_frame(image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], factor: int):
    """(sums uint32 (H//f, W//f), valid uint8): block sums of the counts (saturated at 2^32-1); valid
    where every pixel of the block is trusted and unmasked (only valid sums are ever used)."""
    if int(factor) < 1:
        raise ValueError(f"factor {factor}: must be >= 1")
    image, mask = _checked(image, mask)
    pixel = _rust_pixel(image.dtype)
    if pixel is None:  # float64 frames: the Cython kernel takes none either, numpy does
        sums, valid = bin_frame_reference(image, mask, trusted_range, factor)
        return np.minimum(sums, 0xFFFFFFFF).astype(np.uint32), valid
    sums, valid = _binned_arrays(image.shape, factor)
    lo, hi = _bounds(trusted_range)
    _splitter.bin_frame_into(image.reshape(-1).view(np.uint8), *pixel, image.shape[0], image.shape[1], int(factor),
                             lo, hi, sums.reshape(-1).view(np.uint8), valid)
    if mask is not None:
        valid &= mask_bins(mask, int(factor))
    return sums, valid


Binned = tuple[np.ndarray, np.ndarray]  # (sums uint32, valid uint8), (H // factor, W // factor)


def decode_and_bin(blob, encoding: str, out: np.ndarray, trusted_range: tuple[float, float], factor: int,
                   mask: np.ndarray | None = None, bins: Binned | None = None) -> tuple[np.ndarray, Binned]:
    """Decode a stream blob into `out` (as codec.decode_into) and bin it as `bin_frame` does:
    (image, (sums, valid)). Bitshuffle-LZ4 frames are binned inside the decoder's pass. `bins`:
    (uint32, uint8) arrays of the binned shape to fill (a reader reuses one pair frame after frame:
    fresh ones are page faults on every frame)."""
    pixel = _rust_pixel(out.dtype)
    fused = codec.ENCODINGS.get(encoding, ("",))[0] == "bslz4" and out.ndim == 2 and out.flags.c_contiguous
    if mask is not None and np.shape(mask) != out.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match frame shape {out.shape}")
    if pixel is None or not fused:
        image = codec.decode_into(blob, encoding, out)
        return image, bin_frame(image, mask, trusted_range, factor)
    bits = codec.ENCODINGS[encoding][1]
    if bits is not None and bits != out.dtype.itemsize * 8:
        raise codec.DecodeError(f"encoding {encoding} carries {bits}-bit pixels but the header says {out.dtype}")
    h, w = out.shape[0] // factor, out.shape[1] // factor
    reuse = bins is not None and all(a.shape == (h, w) and a.flags.c_contiguous and a.flags.writeable for a in bins)
    reuse = reuse and bins[0].dtype == np.uint32 and bins[1].dtype == np.uint8
    sums, valid = bins if reuse else _binned_arrays(out.shape, factor)
    lo, hi = _bounds(trusted_range)
    _splitter.bslz4_decompress_bin_into(blob, out.reshape(-1).view(np.uint8), *pixel, out.shape[0], out.shape[1],
                                        int(factor), lo, hi, sums.reshape(-1).view(np.uint8), valid)
    if mask is not None:
        valid &= mask_bins(np.asarray(mask), int(factor))
    return out, (sums, valid)


def bin_frame_reference(image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], factor: int):
    """Plain numpy version of `bin_frame`."""
    values = np.asarray(image, dtype=np.float64)
    trusted = (values >= trusted_range[0]) & (values <= trusted_range[1])
    if mask is not None:
        trusted &= mask.astype(bool)
    h, w = values.shape[0] // factor, values.shape[1] // factor
    blocks = np.where(trusted, values, 0.0)[: h * factor, : w * factor].reshape(h, factor, w, factor)
    ok = trusted[: h * factor, : w * factor].reshape(h, factor, w, factor).all(axis=(1, 3))
    return blocks.sum(axis=(1, 3)), ok.astype(np.uint8)


def strong_bins(sums: np.ndarray, valid: np.ndarray, params: PrescreenParams = PrescreenParams()) -> np.ndarray:
    """Raster indices (int64) of the bins DIALS's `dispersion` test (DIALS's default kernel and
    min_local, global threshold 0) finds strong on the binned frame, `valid` as its mask: the one
    threshold kernel, on the bin sums as counts with no upper trusted limit."""
    test = ThresholdParams(
        algorithm="dispersion", sigma_background=params.sigma_background, sigma_strong=params.sigma_strong
    )
    sums = np.ascontiguousarray(sums, dtype=np.uint32)
    valid = np.ascontiguousarray(valid, dtype=np.uint8)
    return find_strong_pixels(sums, valid, (0.0, np.inf), test)[0]


def prescreen(
    image: np.ndarray,
    mask: np.ndarray | None,
    trusted_range: tuple[float, float],
    params: PrescreenParams = PrescreenParams(),
    binned: tuple[np.ndarray, np.ndarray] | None = None,
) -> PrescreenResult:
    """`binned`: the (sums, valid) of `bin_frame` / `decode_and_bin` for this image and mask, when the
    decoder already made them."""
    sums, valid = binned if binned is not None else bin_frame(image, mask, trusted_range, params.factor)
    strong = strong_bins(sums, valid, params)
    candidates = 0
    f = params.factor
    for index in strong:
        bj, bi = divmod(int(index), sums.shape[1])
        rows, cols = slice(max(bj - 1, 0), bj + 2), slice(max(bi - 1, 0), bi + 2)
        ok = valid[rows, cols].astype(bool)
        ok[min(bj, 1), min(bi, 1)] = False  # the bin itself is not background
        if not ok.any():
            continue
        background = float(sums[rows, cols][ok].mean()) / (f * f)
        level = background + params.pixel_sigma * np.sqrt(max(background, 1.0))
        rows, cols = slice(max(bj * f - 1, 0), bj * f + f + 1), slice(max(bi * f - 1, 0), bi * f + f + 1)
        block = image[rows, cols]
        bright = (block > level) & (block >= trusted_range[0]) & (block <= trusted_range[1])
        if mask is not None:
            bright &= mask[rows, cols] > 0
        if np.count_nonzero(bright) >= params.min_spot_pixels:
            candidates += 1
            if candidates >= params.min_candidates:
                break
    return PrescreenResult(candidates >= params.min_candidates, int(len(strong)), candidates)
