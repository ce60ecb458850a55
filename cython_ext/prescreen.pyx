# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Pre-screen kernel: bin a frame into factor x factor blocks of summed trusted counts.

A sum of Poisson counts is Poisson, so the dispersion test still applies to the binned frame, at a
sixteenth of the pixels (factor 4): intxr.reader.prescreen runs it there to decide whether a frame
can hold Bragg spots at all. A block with any untrusted pixel (gap, bad or saturated pixel) is
flagged invalid rather than summed short, so module gaps do not look like structure.
The numpy reference is intxr.reader.prescreen.bin_frame_reference.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t

import numpy as np

ctypedef fused pixel_t:
    uint16_t
    int32_t
    uint32_t
    double


def bin_frame(const pixel_t[:, ::1] image not None, const uint8_t[:, ::1] mask not None, double trusted_min,
              double trusted_max, int factor):
    """(sums float64 (H//f, W//f), valid uint8): block sums of trusted counts; valid where every pixel is."""
    cdef Py_ssize_t h = image.shape[0] // factor, w = image.shape[1] // factor, bj, bi, j, i
    sums_array = np.zeros((h, w), dtype=np.float64)
    valid_array = np.ones((h, w), dtype=np.uint8)
    cdef double[:, ::1] sums = sums_array
    cdef uint8_t[:, ::1] valid = valid_array
    cdef double v
    with nogil:
        for j in range(h * factor):
            bj = j // factor
            for i in range(w * factor):
                bi = i // factor
                v = <double>image[j, i]
                if mask[j, i] and trusted_min <= v and v <= trusted_max:
                    sums[bj, bi] += v
                else:
                    valid[bj, bi] = 0
    return sums_array, valid_array
