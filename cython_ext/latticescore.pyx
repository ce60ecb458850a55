# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Direction score of the stills indexer's known-cell search (intxr.reader.indexing).

For each direction u: sum over the reciprocal-lattice points r of cos(2 pi L r . u), the real-space grid
search's score (a lattice vector of length L along u projects every rlp onto a near-integer). numpy has to
write the whole (points x directions) phase matrix and pass over it a dozen times; here each phase lives in a
register. cos(2 pi f) is the same even polynomial in f^2 (f = phase - nearest integer) as the numpy reference
`intxr.reader.indexing._lattice_score_numpy`. The loops are C (below), built for AVX2 and for the baseline
x86-64 and chosen at load time.
"""
import numpy as np


# The loops in C, verbatim (kept in this file, which the sdist ships), so that GCC/Clang can build them twice on
# x86-64 (AVX2 and the baseline) and pick one at load time (target_clones, an ifunc): the default build stays
# runnable on any x86-64 and still uses AVX2 where the CPU has it. Elsewhere one portable build.
cdef extern from *:
    """
    #include <stddef.h>

    #if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
    #define INTXR_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define INTXR_CLONES
    #endif

    /* out[j] += sum over points i of poly(f^2), f = L p_i . d_j - nearest integer (poly: cos(2 pi f), c[0] the
     * highest power). Points outer, a block of directions inner: no reduction across the inner iterations, so
     * they vectorise. The nearest integer by adding and subtracting 1.5 x 2^23 (exact in float32 for |phase| <
     * 2^22) needs no rounding instruction. */
    INTXR_CLONES
    static void intxr_lattice_score(const float *points, ptrdiff_t n, const float *dx, const float *dy, const float *dz,
                                    ptrdiff_t m, float length, const float *c, float *out)
    {
        const ptrdiff_t block = 512; /* directions per block: accumulators and direction components stay in L1 */
        const float magic = 12582912.0f;
        const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4];
        for (ptrdiff_t b0 = 0; b0 < m; b0 += block) {
            const ptrdiff_t count = (m - b0 < block) ? m - b0 : block;
            float *restrict acc = out + b0;
            const float *restrict ux = dx + b0, *restrict uy = dy + b0, *restrict uz = dz + b0;
            for (ptrdiff_t i = 0; i < n; i++) {
                const float px = length * points[3 * i], py = length * points[3 * i + 1], pz = length * points[3 * i + 2];
                for (ptrdiff_t j = 0; j < count; j++) {
                    const float ph = px * ux[j] + py * uy[j] + pz * uz[j];
                    const float f = ph - ((ph + magic) - magic);
                    const float q = f * f;
                    acc[j] += (((c0 * q + c1) * q + c2) * q + c3) * q + c4;
                }
            }
        }
    }
    """
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
