# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Pre-screen kernel: bin a frame into factor x factor blocks of summed trusted counts.

A sum of Poisson counts is Poisson, so the dispersion test still applies to the binned frame, at a
sixteenth of the pixels (factor 4): intxr.reader.prescreen runs it there to decide whether a frame
can hold Bragg spots at all. A block with any untrusted pixel (gap, bad or saturated pixel) is
flagged invalid (its sum is then meaningless and never used), so module gaps do not look like
structure.
The numpy reference is intxr.reader.prescreen.bin_frame_reference.
"""
from libc.math cimport ceil, floor
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t

import numpy as np

ctypedef fused pixel_t:
    uint16_t
    int32_t
    uint32_t


def bin_frame(const pixel_t[:, ::1] image not None, const uint8_t[:, ::1] mask, double trusted_min,
              double trusted_max, int factor):
    """(sums uint32 (H//f, W//f), valid uint8): block sums of trusted counts; valid where every pixel is
    (a block's sum saturates at 2^32-1, far above any trusted count times 16)."""
    cdef Py_ssize_t h = image.shape[0] // factor, w = image.shape[1] // factor, bj, bi, j, k
    sums_array = np.zeros((h, w), dtype=np.int64)
    valid_array = np.ones((h, w), dtype=np.uint8)
    cdef int64_t[:, ::1] sums = sums_array
    cdef uint8_t[:, ::1] valid = valid_array
    # Integer bounds: counts are integers, so lo <= v <= hi is v >= ceil(lo) and v <= floor(hi).
    cdef int64_t lo = <int64_t>ceil(trusted_min), hi = <int64_t>floor(min(trusted_max, 9.0e18)), v, total
    cdef bint ok
    cdef bint has_mask = mask is not None
    with nogil:
        for j in range(h * factor):
            bj = j // factor
            for bi in range(w):
                total = 0
                ok = 1
                for k in range(bi * factor, bi * factor + factor):
                    v = <int64_t>image[j, k]
                    ok &= (v >= lo) & (v <= hi)
                    if has_mask:
                        ok &= mask[j, k] != 0
                    total += v
                sums[bj, bi] += total
                valid[bj, bi] &= ok
    return np.minimum(sums_array, 0xFFFFFFFF).astype(np.uint32), valid_array
