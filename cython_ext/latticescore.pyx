# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Direction score of the stills indexer's known-cell search (intxr.reader.indexing).

For each direction u: sum over the reciprocal-lattice points r of cos(2 pi L r . u), the real-space grid
search's score (a lattice vector of length L along u projects every rlp onto a near-integer). numpy has to
write the whole (points x directions) phase matrix and pass over it a dozen times; here each phase lives in a
register. cos(2 pi f) is the same even polynomial in f^2 (f = phase - nearest integer) as the numpy reference
`intxr.reader.indexing._lattice_score_numpy`. The loops are C (latticescore_inner.h), built for AVX2 and for
the baseline x86-64 and chosen at load time.
"""
import numpy as np


cdef extern from "latticescore_inner.h":
    void intxr_lattice_score(const float *points, Py_ssize_t n, const float *dx, const float *dy, const float *dz,
                             Py_ssize_t m, float length, const float *c, float *out) nogil


def lattice_score(const float[:, ::1] points not None, const float[:, ::1] dirs_t not None, float length,
                  coefficients):
    """points (n, 3) rlps, dirs_t (3, m) unit directions (transposed), length L, coefficients c0..c4 of the
    polynomial (highest power of f^2 first) -> scores float32 (m,)."""
    if points.shape[1] != 3 or dirs_t.shape[0] != 3:
        raise ValueError("points must be (n, 3) and dirs_t (3, m)")
    cdef float[::1] c = np.asarray(coefficients, dtype=np.float32).ravel().copy()
    if c.shape[0] != 5:
        raise ValueError("five polynomial coefficients expected")
    cdef Py_ssize_t n = points.shape[0], m = dirs_t.shape[1]
    out_array = np.zeros(m, dtype=np.float32)
    cdef float[::1] out = out_array
    if m == 0 or n == 0:
        return out_array
    with nogil:
        intxr_lattice_score(&points[0, 0], n, &dirs_t[0, 0], &dirs_t[1, 0], &dirs_t[2, 0], m, length, &c[0],
                            &out[0])
    return out_array
