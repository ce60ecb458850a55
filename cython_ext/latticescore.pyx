# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Direction score of the stills indexer's known-cell search (intxr.reader.indexing).

For each direction u: sum over the reciprocal-lattice points r of cos(2 pi L r . u), the real-space grid
search's score (a lattice vector of length L along u projects every rlp onto a near-integer). numpy has to
write the whole (points x directions) phase matrix and pass over it a dozen times; here each phase lives in a
register. cos(2 pi f) is the same even polynomial in f^2 (f = phase - nearest integer) as the numpy reference
`intxr.reader.indexing._lattice_score_numpy`.

Loop order: spots outer, a block of directions inner, so the inner loop has no reduction across iterations
and the compiler vectorises it with plain SSE2 (the nearest integer by adding and subtracting 1.5 x 2^23,
exact in float32 for |phase| < 2^22, needs no SSE4.1 rounding instruction).
"""
import numpy as np

cdef enum:
    BLOCK = 512  # directions per block: the accumulators and direction components stay in L1


cdef inline void _accumulate(float* acc, const float* dx, const float* dy, const float* dz, Py_ssize_t count,
                             float px, float py, float pz, float c0, float c1, float c2, float c3,
                             float c4) noexcept nogil:
    cdef Py_ssize_t j
    cdef float ph, f, q
    cdef float magic = 12582912.0  # 1.5 x 2^23
    for j in range(count):
        ph = px * dx[j] + py * dy[j] + pz * dz[j]
        f = ph - ((ph + magic) - magic)
        q = f * f
        acc[j] += (((c0 * q + c1) * q + c2) * q + c3) * q + c4


def lattice_score(const float[:, ::1] points not None, const float[:, ::1] dirs_t not None, float length,
                  coefficients):
    """points (n, 3) rlps, dirs_t (3, m) unit directions (transposed), length L, coefficients c0..c4 of the
    polynomial (highest power of f^2 first) -> scores float32 (m,)."""
    if points.shape[1] != 3 or dirs_t.shape[0] != 3:
        raise ValueError("points must be (n, 3) and dirs_t (3, m)")
    c = [float(v) for v in coefficients]
    if len(c) != 5:
        raise ValueError("five polynomial coefficients expected")
    cdef float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4]
    cdef Py_ssize_t n = points.shape[0], m = dirs_t.shape[1], i, b0, count
    out_array = np.zeros(m, dtype=np.float32)
    cdef float[::1] out = out_array
    if m == 0:
        return out_array
    cdef const float* dx = &dirs_t[0, 0]
    cdef const float* dy = &dirs_t[1, 0]
    cdef const float* dz = &dirs_t[2, 0]
    cdef float* acc = &out[0]
    with nogil:
        b0 = 0
        while b0 < m:
            count = min(BLOCK, m - b0)
            for i in range(n):
                _accumulate(acc + b0, dx + b0, dy + b0, dz + b0, count, length * points[i, 0],
                            length * points[i, 1], length * points[i, 2], c0, c1, c2, c3, c4)
            b0 += BLOCK
    return out_array
