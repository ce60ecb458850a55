/* Inner loops of cython_ext/latticescore.pyx, in C so that GCC/Clang can build them twice on x86-64 (AVX2 and the
 * baseline) and pick one at load time (target_clones, an ifunc): the default wheel stays runnable on any x86-64
 * and still uses AVX2 where the CPU has it. Elsewhere one portable build. */
#ifndef INTXR_LATTICESCORE_INNER_H
#define INTXR_LATTICESCORE_INNER_H

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

#endif
