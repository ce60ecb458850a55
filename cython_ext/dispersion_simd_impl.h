/* One instruction-set variant of the dispersion kernels (see dispersion_simd.h).
 *
 * Included by dispersion_simd.h once per target (scalar, SSE2, AVX2, AVX-512) between
 * `#pragma GCC push_options / target(...)`, with TGT naming the variant. Inside, PIX/PIXN name each
 * pixel type in turn (DISP_PIXEL_PART). The loops are plain C over row arrays, written so that GCC
 * vectorises them for the target in force (straight-line, branch-free bodies, no aliasing).
 * Everything decided here in float32 is only a bound: a pixel is rejected or accepted only when
 * the bound holds with a margin well above float32's rounding; every other pixel goes to the exact
 * double tests (disp_*_exact, compiled for the baseline ISA, written as DIALS writes them). */

#define DISP_CAT3_(a, b, c) a##_##b##_##c
#define DISP_CAT3(a, b, c) DISP_CAT3_(a, b, c)
#define DISP_CAT2_(a, b) a##_##b
#define DISP_CAT2(a, b) DISP_CAT2_(a, b)

#ifndef DISP_PIXEL_PART
/* ---------------------------------------------------------------- pixel-type independent part */
#define TFN(name) DISP_CAT2(name, TGT)

#define DISP_INLINE static inline __attribute__((always_inline))

/* Clipped horizontal window sums of padded column sums, for half-widths the fused row tests do not
 * unroll (above 5): out[i] = sum c[i-k .. i+k]. Unsigned wrapping arithmetic: exact modulo 2^32,
 * and the callers only read sums they know are below 2^32. */
static void TFN(hsum)(const uint32_t *__restrict c, uint32_t *__restrict out, ptrdiff_t w, int k) {
    for (ptrdiff_t i = 0; i < w; i++) out[i] = c[i - k];
    for (int d = -k + 1; d <= k; d++)
        for (ptrdiff_t i = 0; i < w; i++) out[i] += c[i + d];
}

/* uint32 -> float with one rounding (AVX2 has only the signed conversion). */
DISP_INLINE float TFN(u32f)(uint32_t u) {
    return (float)(int32_t)(u >> 16) * 65536.0f + (float)(int32_t)(u & 0xFFFFu);
}

/* Extended first pass, the index-of-dispersion test a > c over every pixel of a row, in float32,
 * fused with the horizontal window sums (half-width K unrolled; K = 0 takes sums made by hsum):
 * code 1 = surely passes, 0 = surely fails, 2 = too close to call (or y not known exactly: y is
 * kept modulo 2^32, and y <= x^2 makes it exact when x < 65536; or y >= 2^31: y is converted as
 * int32, one instruction, where uint32 takes six), decided in double by the caller.
 * Without gain, a > c (c >= 0) is a > 0 and a^2 > c^2 = x^2 sigma_b^2 2 (m-1): no square root. a
 * carries at most 9 float32 roundings of S = m y + x^2 + x m, so the interval a +- S 2^-19 holds
 * it (and DIALS's double) by a factor >= 50; the squares then differ by a relative 2^-16 at least
 * (>= 10 times their rounding). With a gain: a - c within S' 2^-18, S' = S + c (>= 16 times). */
DISP_INLINE void TFN(cv_row_k)(const uint32_t *__restrict cm, const uint32_t *__restrict cx,
                               const uint32_t *__restrict cy, ptrdiff_t w, const int K, const disp_ctx *ctx,
                               uint32_t *__restrict code, const int packed) {
    const int32_t minc = ctx->min_count_i32;
    const float nsb = (float)ctx->p.sigma_b, g = (float)ctx->p.gain;
    const float c2k = (float)(2.0 * ctx->p.sigma_b * ctx->p.sigma_b);
    if (ctx->p.gain > 0) {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t mu = 0, xu = 0, yu = 0;
            for (int d = -K; d <= K; d++) {
                if (!packed) mu += cm[i + d];
                xu += cx[i + d];
                yu += cy[i + d];
            }
            if (packed) {
                mu = disp_packed_count(xu);
                xu = disp_packed_value(xu);
            }
            int32_t m = (int32_t)mu, x = (int32_t)xu;
            float mf = (float)m, xf = (float)x, yf = (float)(int32_t)yu;
            float m1 = mf - 1.0f, my = mf * yf, xx = xf * xf;
            float a = my - xx;
            float c = g * xf * (m1 + nsb * __builtin_sqrtf(2.0f * m1));
            float e = (my + xx + xf * mf + c) * 0x1p-18f, d = a - c;
            int32_t ok = (m >= minc) & (x >= 0), exact_y = (x < 65536) & ((int32_t)yu >= 0);
            int32_t t = exact_y & (d > e), f = exact_y & (d < -e);
            code[i] = (uint32_t)(ok * (t | ((1 - (t | f)) << 1)));
        }
    } else {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t mu = 0, xu = 0, yu = 0;
            for (int d = -K; d <= K; d++) {
                if (!packed) mu += cm[i + d];
                xu += cx[i + d];
                yu += cy[i + d];
            }
            if (packed) {
                mu = disp_packed_count(xu);
                xu = disp_packed_value(xu);
            }
            int32_t m = (int32_t)mu, x = (int32_t)xu;
            float mf = (float)m, xf = (float)x, yf = (float)(int32_t)yu;
            float m1 = mf - 1.0f, my = mf * yf, xx = xf * xf;
            float a = my - xx - xf * m1, e = (my + xx + xf * mf) * 0x1p-19f;
            float c2 = xx * (c2k * m1), lo = a - e, hi = a + e;
            int32_t ok = (m >= minc) & (x >= 0), exact_y = (x < 65536) & ((int32_t)yu >= 0);
            int32_t t = exact_y & (lo > 0.0f) & (lo * lo > c2 * (1.0f + 0x1p-16f));
            int32_t f = exact_y & ((hi <= 0.0f) | (hi * hi < c2 * (1.0f - 0x1p-16f)));
            code[i] = (uint32_t)(ok * (t | ((1 - (t | f)) << 1)));
        }
    }
}

/* CV for the sure cases (masked and untrusted pixels count as passing, DIALS local.h); the codes as
 * bytes for the scan; nonzero when some pixel (code 2) is left for the exact test. */
static uint8_t TFN(apply_cv)(uint8_t *__restrict fl, const uint32_t *__restrict code, uint8_t *__restrict code8,
                             ptrdiff_t w) {
    uint8_t any = 0;
    for (ptrdiff_t i = 0; i < w; i++) code8[i] = (uint8_t)code[i]; /* (two loops: both vectorise) */
    for (ptrdiff_t i = 0; i < w; i++) {
        uint8_t cd = code8[i];
        any |= cd;
        fl[i] = fl[i] | (uint8_t)((((fl[i] & F_VALID) ^ F_VALID) | (cd & 1)) << 2);
    }
    return any & 2;
}

#ifdef DISP_AVX2_INTRINSICS
/* The low bytes of 8 lanes as one little-endian word (lane i in byte i). */
DISP_INLINE uint64_t TFN(low_bytes8)(__m256i f) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                                          -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    f = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(f, pick), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    return (uint64_t)_mm_cvtsi128_si64(_mm256_castsi256_si128(f));
}

/* cv_row_k without a gain, for packed sums, fused with apply_cv, in AVX2, 8 pixels a step: the same
 * float32 operations in the same order (no FMA). Most pixels surely fail (background): where all 8
 * do, the sure-pass test and the codes are skipped. The last w % 8 pixels through the portable loops. */
DISP_INLINE uint8_t TFN(cv_row_packed_avx2)(const uint32_t *cx, const uint32_t *cy, ptrdiff_t w, const int K,
                                            const disp_ctx *ctx, uint8_t *fl, uint8_t *code8, uint32_t *code32) {
    const __m256i minc = _mm256_set1_epi32(ctx->min_count_i32), lim = _mm256_set1_epi32(65536);
    const __m256i low = _mm256_set1_epi32((1 << DISP_PACK_SHIFT) - 1), minus1 = _mm256_set1_epi32(-1);
    const __m256i c1 = _mm256_set1_epi32(1), c2i = _mm256_set1_epi32(2);
    const __m256 c2k = _mm256_set1_ps((float)(2.0 * ctx->p.sigma_b * ctx->p.sigma_b)), one = _mm256_set1_ps(1.0f);
    const __m256 e19 = _mm256_set1_ps(0x1p-19f), up = _mm256_set1_ps(1.0f + 0x1p-16f);
    const __m256 dn = _mm256_set1_ps(1.0f - 0x1p-16f), zero = _mm256_setzero_ps();
    const uint64_t ones = 0x0101010101010101ull;
    uint64_t any = 0;
    ptrdiff_t i = 0;
    for (; i + 8 <= w; i += 8) {
        __m256i s = _mm256_loadu_si256((const __m256i *)(cx + i - K));
        __m256i yu = _mm256_loadu_si256((const __m256i *)(cy + i - K));
        for (int d = -K + 1; d <= K; d++) {
            s = _mm256_add_epi32(s, _mm256_loadu_si256((const __m256i *)(cx + i + d)));
            yu = _mm256_add_epi32(yu, _mm256_loadu_si256((const __m256i *)(cy + i + d)));
        }
        __m256i m = _mm256_srli_epi32(s, DISP_PACK_SHIFT), x = _mm256_and_si256(s, low);
        /* (packed x is below 2^26: x >= 0 holds) */
        __m256i exact = _mm256_and_si256(_mm256_cmpgt_epi32(lim, x), _mm256_cmpgt_epi32(yu, minus1));
        __m256 mf = _mm256_cvtepi32_ps(m), xf = _mm256_cvtepi32_ps(x), yf = _mm256_cvtepi32_ps(yu);
        __m256 m1 = _mm256_sub_ps(mf, one), my = _mm256_mul_ps(mf, yf), xx = _mm256_mul_ps(xf, xf);
        __m256 a = _mm256_sub_ps(_mm256_sub_ps(my, xx), _mm256_mul_ps(xf, m1));
        __m256 e = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(my, xx), _mm256_mul_ps(xf, mf)), e19);
        __m256 c2 = _mm256_mul_ps(xx, _mm256_mul_ps(c2k, m1)), hi = _mm256_add_ps(a, e);
        __m256 f = _mm256_or_ps(_mm256_cmp_ps(hi, zero, _CMP_LE_OQ),
                                _mm256_cmp_ps(_mm256_mul_ps(hi, hi), _mm256_mul_ps(c2, dn), _CMP_LT_OQ));
        __m256i fe = _mm256_and_si256(exact, _mm256_castps_si256(f));
        uint64_t c8 = 0, f8;
        if (_mm256_movemask_ps(_mm256_castsi256_ps(fe)) != 0xFF) {
            __m256 lo = _mm256_sub_ps(a, e);
            __m256 t = _mm256_and_ps(_mm256_cmp_ps(lo, zero, _CMP_GT_OQ),
                                     _mm256_cmp_ps(_mm256_mul_ps(lo, lo), _mm256_mul_ps(c2, up), _CMP_GT_OQ));
            __m256i te = _mm256_and_si256(exact, _mm256_castps_si256(t));
            /* 1 sure pass, 0 sure fail, 2 undecided; 0 below min_count */
            __m256i code = _mm256_or_si256(_mm256_and_si256(te, c1), _mm256_andnot_si256(_mm256_or_si256(te, fe), c2i));
            c8 = TFN(low_bytes8)(_mm256_andnot_si256(_mm256_cmpgt_epi32(minc, m), code));
            any |= c8;
        }
        memcpy(code8 + i, &c8, 8);
        memcpy(&f8, fl + i, 8);
        f8 |= (((f8 & ones) ^ ones) | (c8 & ones)) << 2; /* masked and untrusted pixels count as CV */
        memcpy(fl + i, &f8, 8);
    }
    if (i < w) {
        TFN(cv_row_k)(NULL, cx + i, cy + i, w - i, K, ctx, code32 + i, 1);
        any |= TFN(apply_cv)(fl + i, code32 + i, code8 + i, w - i);
    }
    return (any & 0x0202020202020202ull) != 0;
}
#endif

/* cv_row_k for the window half-width k (the ones above 5 from hsum's sums); `packed` as in ctx. */
DISP_INLINE void TFN(cv_row_any)(const uint32_t *cm, const uint32_t *cx, const uint32_t *cy, ptrdiff_t w, int k,
                                 const disp_ctx *ctx, disp_bufs *B, ptrdiff_t o, uint32_t *code32, const int packed) {
    switch (k) {
    case 1: TFN(cv_row_k)(cm, cx, cy, w, 1, ctx, code32, packed); break;
    case 2: TFN(cv_row_k)(cm, cx, cy, w, 2, ctx, code32, packed); break;
    case 3: TFN(cv_row_k)(cm, cx, cy, w, 3, ctx, code32, packed); break;
    case 4: TFN(cv_row_k)(cm, cx, cy, w, 4, ctx, code32, packed); break;
    case 5: TFN(cv_row_k)(cm, cx, cy, w, 5, ctx, code32, packed); break;
    default:
        if (!packed) TFN(hsum)(cm, B->wm + o, w, k);
        TFN(hsum)(cx, B->wx + o, w, k);
        TFN(hsum)(cy, B->wy + o, w, k);
        TFN(cv_row_k)(B->wm + o, B->wx + o, B->wy + o, w, 0, ctx, code32, packed);
    }
}

/* One row of the extended first pass: CV flags for the sure cases; returns nonzero when some pixel
 * (code 2) is left for the exact test. */
static uint8_t TFN(cv_row)(const uint32_t *cm, const uint32_t *cx, const uint32_t *cy, ptrdiff_t w, int k,
                           const disp_ctx *ctx, uint8_t *fl, disp_bufs *B) {
    const ptrdiff_t o = fl - B->row_fl; /* the chunk's place in the row's buffers */
    uint32_t *code32 = B->code32 + o;
#ifdef DISP_AVX2_INTRINSICS
    if (ctx->packed && !(ctx->p.gain > 0) && k <= 5) {
        uint8_t *code8 = B->code + o;
        switch (k) {
        case 1: return TFN(cv_row_packed_avx2)(cx, cy, w, 1, ctx, fl, code8, code32);
        case 2: return TFN(cv_row_packed_avx2)(cx, cy, w, 2, ctx, fl, code8, code32);
        case 3: return TFN(cv_row_packed_avx2)(cx, cy, w, 3, ctx, fl, code8, code32);
        case 4: return TFN(cv_row_packed_avx2)(cx, cy, w, 4, ctx, fl, code8, code32);
        default: return TFN(cv_row_packed_avx2)(cx, cy, w, 5, ctx, fl, code8, code32);
        }
    }
#endif
    if (ctx->packed)
        TFN(cv_row_any)(cm, cx, cy, w, k, ctx, B, o, code32, 1);
    else
        TFN(cv_row_any)(cm, cx, cy, w, k, ctx, B, o, code32, 0);
    return TFN(apply_cv)(fl, code32, B->code + o, w);
}

/* The window sums of x and y at one pixel from the column sums (half-widths up to 5 unrolled). */
DISP_INLINE void TFN(window_xy_k)(const uint32_t *cx, const uint32_t *cy, const int k, uint32_t *x, uint32_t *y) {
    uint32_t sx = 0, sy = 0;
    for (int d = -k; d <= k; d++) {
        sx += cx[d];
        sy += cy[d];
    }
    *x = sx;
    *y = sy;
}

static inline void TFN(window_xy)(const uint32_t *cx, const uint32_t *cy, int k, uint32_t *x, uint32_t *y) {
    switch (k) {
    case 1: TFN(window_xy_k)(cx, cy, 1, x, y); break;
    case 2: TFN(window_xy_k)(cx, cy, 2, x, y); break;
    case 3: TFN(window_xy_k)(cx, cy, 3, x, y); break;
    case 4: TFN(window_xy_k)(cx, cy, 4, x, y); break;
    case 5: TFN(window_xy_k)(cx, cy, 5, x, y); break;
    default: TFN(window_xy_k)(cx, cy, k, x, y);
    }
}

/* Ask for the row that enters next (into L1: 5% faster at 16M than into L2) while this row's
 * window tests compute, so that the memory stream and the arithmetic overlap instead of taking
 * turns (without it 40% slower): one prefetch per cache line, spread over the row in chunks of
 * DISP_CHUNK pixels. */
DISP_INLINE void TFN(prefetch)(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* Erosion of the CV region by a (2r+1)-square (DIALS: chessboard distance to the nearest cv-false
 * pixel >= the erosion distance; outside the frame never erodes): the final-pass candidates are the
 * VALID pixels with CV and no cv-false pixel within r; the rest of VALID is background. Separable,
 * in bits (64 pixels a word): cv-false within r along the row (shifts), then OR over the rows
 * within r. The slide runs it a few rows behind its CV flags, while those rows are in cache. */

/* One row's cv-false pixels (notcv, bits past w clear) and its VALID and CV pixels. Reads whole
 * words of flags: the flags have DISP_SLACK bytes of slack. */
static void TFN(cv_bits_row)(const uint8_t *fl, ptrdiff_t w, ptrdiff_t nw, uint64_t *notcv, uint64_t *cvv) {
    for (ptrdiff_t k = 0; k < nw; k++) {
        const uint8_t *f = fl + 64 * k;
        uint64_t cv = 0, valid = 0;
#if defined(DISP_AVX512_INTRINSICS)
        __m512i b = _mm512_loadu_si512((const void *)f);
        cv = _mm512_test_epi8_mask(b, _mm512_set1_epi8(F_CV));
        valid = _mm512_test_epi8_mask(b, _mm512_set1_epi8(F_VALID));
#elif defined(DISP_AVX2_INTRINSICS)
        for (int half = 0; half < 2; half++) { /* each byte's bit 2 (CV) or bit 0 (VALID) to its bit 7 */
            __m256i b = _mm256_loadu_si256((const __m256i *)(f + 32 * half));
            cv |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(b, 5)) << (32 * half);
            valid |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(b, 7)) << (32 * half);
        }
#else
        for (int g = 0; g < 8; g++) { /* the low bits of 8 bytes into one byte (bit i from byte i) */
            const uint64_t ones = 0x0101010101010101ull, gather = 0x0102040810204080ull;
            uint64_t word;
            memcpy(&word, f + 8 * g, 8);
            cv |= ((((word >> 2) & ones) * gather) >> 56) << (8 * g);
            valid |= (((word & ones) * gather) >> 56) << (8 * g);
        }
#endif
        uint64_t live = k == nw - 1 && w % 64 ? (1ull << (w % 64)) - 1 : ~0ull;
        notcv[k] = ~cv & live;
        cvv[k] = cv & valid & live;
    }
}

/* Cv-false within r along the row. n[-1] and n[nw] are 0 (outside the frame); r <= 62. */
static void TFN(near_row)(const uint64_t *__restrict n, ptrdiff_t nw, int r, uint64_t *__restrict out) {
    for (ptrdiff_t k = 0; k < nw; k++) out[k] = n[k];
    for (int s = 1; s <= r; s++)
        for (ptrdiff_t k = 0; k < nw; k++)
            out[k] |= (n[k] >> s) | (n[k + 1] << (64 - s)) | (n[k] << s) | (n[k - 1] >> (64 - s));
}

/* Both steps once row `done` has its final CV flags (rows come in order; done = h - 1 finishes):
 * the rows whose r rows below are now known get their candidates. */
static void TFN(erode_upto)(const uint8_t *flags, ptrdiff_t h, ptrdiff_t w, int r, ptrdiff_t done, disp_bufs *B) {
    const ptrdiff_t nw = B->nw, ring = 2 * r + 1;
    TFN(cv_bits_row)(flags + done * w, w, nw, B->notcv + 1, B->cvv + done % ring * nw);
    TFN(near_row)(B->notcv + 1, nw, r, B->near + done % ring * nw);
    for (ptrdiff_t j = done - r < 0 ? 0 : done - r; j <= (done == h - 1 ? h - 1 : done - r); j++) {
        ptrdiff_t j0 = j - r < 0 ? 0 : j - r, j1 = j + r >= h ? h - 1 : j + r;
        uint64_t *__restrict c = B->cand + j * nw, any = 0;
        const uint64_t *cvv = B->cvv + j % ring * nw;
        for (ptrdiff_t k = 0; k < nw; k++) c[k] = 0;
        for (ptrdiff_t jj = j0; jj <= j1; jj++) {
            const uint64_t *__restrict nr = B->near + jj % ring * nw;
            for (ptrdiff_t k = 0; k < nw; k++) c[k] |= nr[k];
        }
        for (ptrdiff_t k = 0; k < nw; k++) {
            c[k] = cvv[k] & ~c[k];
            any |= c[k];
        }
        B->row_has_cand[j] = any != 0;
    }
}

#undef TFN
#undef DISP_INLINE

/* The pixel-type parts: uint16, int32, uint32 frames. */
#define DISP_PIXEL_PART
#define PIX uint16_t
#define PIXN u16
#define PIX_IS_U32 0
#include "dispersion_simd_impl.h"
#undef PIX
#undef PIXN
#define PIX int32_t
#define PIXN i32
#include "dispersion_simd_impl.h"
#undef PIX
#undef PIXN
#undef PIX_IS_U32
#define PIX uint32_t
#define PIXN u32
#define PIX_IS_U32 1
#include "dispersion_simd_impl.h"
#undef PIX
#undef PIXN
#undef PIX_IS_U32
#undef DISP_PIXEL_PART

#else
/* ---------------------------------------------------------------- one pixel type (PIX, PIXN) */
#define FN(name) DISP_CAT3(name, PIXN, TGT)
#define TFN(name) DISP_CAT2(name, TGT)
#define DISP_INLINE static inline __attribute__((always_inline))

/* Rows enter and leave the window's column sums (m: uint8, x and y: uint32). Entering rows are
 * flagged (VALID, IN_SUMS); the count of unmasked pixels above the trusted range is returned (the
 * caller collects them when there are any). */
/* (The top and bottom rows of the frame: not hot.) `packed`: cx holds (count << 26) + value. */
static uint32_t FN(enter)(const PIX *__restrict v, const uint8_t *__restrict mk, uint8_t *__restrict fl,
                          uint32_t *__restrict cm, uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w,
                          PIX lo, PIX hi, int packed) {
    uint32_t over = 0;
    for (ptrdiff_t i = 0; i < w; i++) {
        PIX p = v[i];
        uint32_t use = mk[i] != 0, valid = use & (p >= lo) & (p <= hi), ins = valid & (p < DISP_BIG);
        uint32_t e = (uint32_t)p & (0u - ins);
        fl[i] = (uint8_t)(valid | (ins << 1));
        if (packed) {
            cx[i] += DISP_PACK(ins, e);
        } else {
            cm[i] += ins;
            cx[i] += e;
        }
        if (cy) cy[i] += e * e;
        over += use & (p > hi);
    }
    return over;
}

static void FN(leave)(const PIX *__restrict v, const uint8_t *__restrict fl, uint32_t *__restrict cm,
                      uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w, int packed) {
    for (ptrdiff_t i = 0; i < w; i++) {
        uint32_t ins = (fl[i] >> 1) & 1, e = (uint32_t)v[i] & (0u - ins);
        if (packed) {
            cx[i] -= DISP_PACK(ins, e);
        } else {
            cm[i] -= ins;
            cx[i] -= e;
        }
        if (cy) cy[i] -= e * e;
    }
}

/* One row enters while another leaves: one pass over the column sums. */
DISP_INLINE uint32_t FN(enter_leave_y)(const PIX *__restrict v, const uint8_t *__restrict mk,
                                        uint8_t *__restrict fl, const PIX *__restrict vo,
                                        const uint8_t *__restrict flo, uint32_t *__restrict cm,
                                        uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w, PIX lo,
                                        PIX hi, const int with_y, const int has_mask, const int packed) {
    uint32_t over = 0;
    for (ptrdiff_t i = 0; i < w; i++) {
        PIX p = v[i];
        uint32_t use = has_mask ? mk[i] != 0 : 1u;
        uint32_t valid = use & (p >= lo) & (p <= hi), ins = valid & (p < DISP_BIG);
        uint32_t e = (uint32_t)p & (0u - ins);
        uint32_t inso = (flo[i] >> 1) & 1, eo = (uint32_t)vo[i] & (0u - inso);
        fl[i] = (uint8_t)(valid | (ins << 1));
        if (packed) {
            cx[i] += DISP_PACK(ins, e) - DISP_PACK(inso, eo);
        } else {
            cm[i] += ins - inso;
            cx[i] += e - eo;
        }
        if (with_y) cy[i] += (e - eo) * (e + eo); /* e^2 - eo^2 with one multiply (exact modulo 2^32) */
        over += use & (p > hi);
    }
    return over;
}

#ifdef DISP_AVX512_INTRINSICS
/* enter_leave_y for its most common case (packed sums, no mask) in AVX-512 intrinsics, 16 pixels a
 * step: the compares give masks, the flag bytes are made from the masks and the leaving row's
 * in-sums pixels are masked loads, where GCC's vectorisation of the portable loop narrows 32-bit
 * lanes to bytes and widens them back (measured: the update ~1.3x faster, the threshold 5-7%). The
 * same arithmetic; the last w % 16 pixels go through the portable loop. */
/* 16 pixels as 32-bit lanes (maskz_: only the lanes of k, the rest 0). */
DISP_INLINE __m512i FN(load16)(const PIX *p) {
    if (sizeof(PIX) == 2) return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_loadu_si512((const void *)p);
}

DISP_INLINE __m512i FN(maskz_load16)(__mmask16 k, const PIX *p) {
    if (sizeof(PIX) == 2) return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const void *)p));
    return _mm512_maskz_loadu_epi32(k, (const void *)p);
}

#if PIX_IS_U32
#define DISP_CMP(a, b, op) _mm512_cmp_epu32_mask(a, b, op)
#else
#define DISP_CMP(a, b, op) _mm512_cmp_epi32_mask(a, b, op)
#endif

static uint32_t FN(enter_leave_packed_avx512)(const PIX *__restrict v, uint8_t *__restrict fl,
                                              const PIX *__restrict vo, const uint8_t *__restrict flo,
                                              uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w, PIX lo,
                                              PIX hi) {
    const __m512i vlo = _mm512_set1_epi32((int32_t)lo), vhi = _mm512_set1_epi32((int32_t)hi);
    const __m512i big = _mm512_set1_epi32(DISP_BIG), count1 = _mm512_set1_epi32(DISP_PACK(1, 0));
    const __m128i one8 = _mm_set1_epi8(F_VALID), two8 = _mm_set1_epi8(F_INSUMS);
    uint32_t over = 0;
    ptrdiff_t i = 0;
    for (; i + 16 <= w; i += 16) {
        __m512i p = FN(load16)(v + i);
        __mmask16 valid = DISP_CMP(p, vlo, _MM_CMPINT_NLT) & DISP_CMP(p, vhi, _MM_CMPINT_LE);
        __mmask16 ins = valid & DISP_CMP(p, big, _MM_CMPINT_LT);
        __mmask16 inso = _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)(flo + i)), two8);
        over += (uint32_t)__builtin_popcount(DISP_CMP(p, vhi, _MM_CMPINT_NLE));
        __m512i e = _mm512_maskz_mov_epi32(ins, p), eo = FN(maskz_load16)(inso, vo + i);
        __m512i d = _mm512_sub_epi32(e, eo);
        __m512i x = _mm512_add_epi32(_mm512_loadu_si512((const void *)(cx + i)), d);
        x = _mm512_mask_add_epi32(x, ins, x, count1);
        x = _mm512_mask_sub_epi32(x, inso, x, count1);
        _mm512_storeu_si512((void *)(cx + i), x);
        __m512i y = _mm512_loadu_si512((const void *)(cy + i));
        _mm512_storeu_si512((void *)(cy + i), _mm512_add_epi32(y, _mm512_mullo_epi32(d, _mm512_add_epi32(e, eo))));
        _mm_storeu_si128((__m128i *)(fl + i), _mm_or_si128(_mm_maskz_mov_epi8(valid, one8), _mm_maskz_mov_epi8(ins, two8)));
    }
    if (i < w)
        over += FN(enter_leave_y)(v + i, NULL, fl + i, vo + i, flo + i, NULL, cx + i, cy + i, w - i, lo, hi, 1, 0, 1);
    return over;
}
#undef DISP_CMP
#endif

#ifdef DISP_AVX2_INTRINSICS
/* The same update in AVX2, 8 pixels a step. AVX2 has no mask registers: compares give all-ones
 * lanes, unsigned compares are signed ones after flipping the sign bit (PIX_IS_U32), and the flag
 * bytes are the lanes' low bytes (low_bytes8: one shuffle and one permute). */
DISP_INLINE __m256i FN(load8)(const PIX *p) {
    if (sizeof(PIX) == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_si256((const __m256i *)p);
}

/* x as a lane for signed compares: uint32 pixels (and bounds) with the sign bit flipped. */
DISP_INLINE __m256i FN(ord8)(__m256i x) {
    return PIX_IS_U32 ? _mm256_xor_si256(x, _mm256_set1_epi32(INT32_MIN)) : x;
}

static uint32_t FN(enter_leave_packed_avx2)(const PIX *__restrict v, uint8_t *__restrict fl,
                                            const PIX *__restrict vo, const uint8_t *__restrict flo,
                                            uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w, PIX lo,
                                            PIX hi) {
    const __m256i vlo = FN(ord8)(_mm256_set1_epi32((int32_t)lo)), vhi = FN(ord8)(_mm256_set1_epi32((int32_t)hi));
    const __m256i big = FN(ord8)(_mm256_set1_epi32(DISP_BIG));
    const __m256i one = _mm256_set1_epi32(F_VALID), two = _mm256_set1_epi32(F_INSUMS);
    __m256i over8 = _mm256_setzero_si256(); /* minus the pixels above hi, per lane */
    uint32_t over = 0;
    ptrdiff_t i = 0;
    for (; i + 8 <= w; i += 8) {
        __m256i p = FN(load8)(v + i), q = FN(ord8)(p);
        __m256i above = _mm256_cmpgt_epi32(q, vhi);
        __m256i valid = _mm256_andnot_si256(_mm256_or_si256(_mm256_cmpgt_epi32(vlo, q), above), _mm256_set1_epi32(-1));
        __m256i ins = _mm256_and_si256(valid, _mm256_cmpgt_epi32(big, q));
        __m256i fo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(flo + i)));
        __m256i inso = _mm256_cmpeq_epi32(_mm256_and_si256(fo, two), two);
        over8 = _mm256_add_epi32(over8, above);
        __m256i e = _mm256_and_si256(p, ins), eo = _mm256_and_si256(FN(load8)(vo + i), inso);
        __m256i d = _mm256_sub_epi32(e, eo);
        /* ins - inso lanes are -1, 0 or 1 counts with the opposite sign */
        __m256i x = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(cx + i)), d);
        x = _mm256_sub_epi32(x, _mm256_slli_epi32(_mm256_sub_epi32(ins, inso), DISP_PACK_SHIFT));
        _mm256_storeu_si256((__m256i *)(cx + i), x);
        __m256i y = _mm256_loadu_si256((const __m256i *)(cy + i));
        _mm256_storeu_si256((__m256i *)(cy + i), _mm256_add_epi32(y, _mm256_mullo_epi32(d, _mm256_add_epi32(e, eo))));
        uint64_t f8 = TFN(low_bytes8)(_mm256_or_si256(_mm256_and_si256(valid, one), _mm256_and_si256(ins, two)));
        memcpy(fl + i, &f8, 8);
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, over8);
    for (int t = 0; t < 8; t++) over -= lanes[t];
    if (i < w)
        over += FN(enter_leave_y)(v + i, NULL, fl + i, vo + i, flo + i, NULL, cx + i, cy + i, w - i, lo, hi, 1, 0, 1);
    return over;
}
#endif

static uint32_t FN(enter_leave)(const PIX *v, const uint8_t *mk, uint8_t *fl, const PIX *vo, const uint8_t *flo,
                                uint32_t *cm, uint32_t *cx, uint32_t *cy, ptrdiff_t w, PIX lo, PIX hi, int packed) {
    /* mk NULL: no mask. cy is always kept (see slide). */
#ifdef DISP_AVX512_INTRINSICS
    if (packed && !mk) return FN(enter_leave_packed_avx512)(v, fl, vo, flo, cx, cy, w, lo, hi);
#endif
#ifdef DISP_AVX2_INTRINSICS
    if (packed && !mk) return FN(enter_leave_packed_avx2)(v, fl, vo, flo, cx, cy, w, lo, hi);
#endif
    if (packed) {
        if (mk) return FN(enter_leave_y)(v, mk, fl, vo, flo, cm, cx, cy, w, lo, hi, 1, 1, 1);
        return FN(enter_leave_y)(v, mk, fl, vo, flo, cm, cx, cy, w, lo, hi, 1, 0, 1);
    }
    if (mk) return FN(enter_leave_y)(v, mk, fl, vo, flo, cm, cx, cy, w, lo, hi, 1, 1, 0);
    return FN(enter_leave_y)(v, mk, fl, vo, flo, cm, cx, cy, w, lo, hi, 1, 0, 0);
}

#if PIX_IS_U32
#define PIX_F(p) TFN(u32f)(p)
#else
#define PIX_F(p) ((float)(p))
#endif

/* `dispersion` candidates, fused with the horizontal window sums (K as in cv_row_k): DIALS's b > d
 * (b = m v - x, d = sigma_s sqrt(g x m) >= 0) needs b > 0 and b^2 > sigma_s^2 g x m. In float32, b
 * is raised (bb = m (v DISP_UP) - x, see DISP_UP) and the right side lowered by `loose` (1 - 1e-4):
 * a pixel that can pass is never dropped. Validity and min_count are exact. */
DISP_INLINE void FN(strong_row_k)(const PIX *__restrict v, const uint32_t *__restrict cm,
                                  const uint32_t *__restrict cx, ptrdiff_t w, const int K, int32_t minc, float loose,
                                  uint32_t *__restrict cand, const int packed) {
    for (ptrdiff_t i = 0; i < w; i++) {
        uint32_t mu = 0, xu = 0;
        for (int d = -K; d <= K; d++) {
            if (!packed) mu += cm[i + d];
            xu += cx[i + d];
        }
        if (packed) {
            mu = disp_packed_count(xu);
            xu = disp_packed_value(xu);
        }
        int32_t m = (int32_t)mu;
        float vf = PIX_F(v[i]), mf = (float)m, xf = (float)(int32_t)xu;
        float bb = mf * (vf * DISP_UP) - xf;
        int32_t ok = (bb > 0.0f) & (bb * bb >= loose * xf * mf) & (m >= minc);
        cand[i] = (uint32_t)ok;
    }
}

/* strong_row_k for the window half-width k (the ones above 5 from hsum's sums); `packed` as in ctx. */
DISP_INLINE void FN(strong_row_any)(const PIX *v, const uint32_t *cm, const uint32_t *cx, ptrdiff_t w, int k,
                                    int32_t minc, float loose, disp_bufs *B, ptrdiff_t o, uint32_t *code32,
                                    const int packed) {
    switch (k) {
    case 1: FN(strong_row_k)(v, cm, cx, w, 1, minc, loose, code32, packed); break;
    case 2: FN(strong_row_k)(v, cm, cx, w, 2, minc, loose, code32, packed); break;
    case 3: FN(strong_row_k)(v, cm, cx, w, 3, minc, loose, code32, packed); break;
    case 4: FN(strong_row_k)(v, cm, cx, w, 4, minc, loose, code32, packed); break;
    case 5: FN(strong_row_k)(v, cm, cx, w, 5, minc, loose, code32, packed); break;
    default:
        if (!packed) TFN(hsum)(cm, B->wm + o, w, k);
        TFN(hsum)(cx, B->wx + o, w, k);
        FN(strong_row_k)(v, B->wm + o, B->wx + o, w, 0, minc, loose, code32, packed);
    }
}

#ifdef DISP_AVX512_INTRINSICS
/* Pixel values as float32, 16 at a time (`live` lanes loaded, the rest 0), as PIX_F converts them. */
DISP_INLINE __m512 FN(pixf16)(__mmask16 live, const PIX *p) {
    __m512i u = FN(maskz_load16)(live, p);
    if (!PIX_IS_U32) return _mm512_cvtepi32_ps(u);
    return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 16)), _mm512_set1_ps(65536.0f)),
                         _mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(0xFFFF))));
}

/* strong_row_k for packed sums in AVX-512 intrinsics, 16 pixels (`live` lanes) at a time: the same
 * float32 operations in the same order (no FMA), the result one bit per pixel straight from the
 * compare masks. */
DISP_INLINE __mmask16 FN(strong_bits16)(const PIX *v, const uint32_t *cx, const int K, __m512i minc, __m512 loose,
                                        __mmask16 live) {
    __m512i s = _mm512_maskz_loadu_epi32(live, cx - K);
    for (int d = -K + 1; d <= K; d++) s = _mm512_add_epi32(s, _mm512_maskz_loadu_epi32(live, cx + d));
    __m512i m = _mm512_srli_epi32(s, DISP_PACK_SHIFT);
    __m512 mf = _mm512_cvtepi32_ps(m), vf = FN(pixf16)(live, v);
    __m512 xf = _mm512_cvtepi32_ps(_mm512_and_si512(s, _mm512_set1_epi32((1 << DISP_PACK_SHIFT) - 1)));
    __m512 bb = _mm512_sub_ps(_mm512_mul_ps(mf, _mm512_mul_ps(vf, _mm512_set1_ps(DISP_UP))), xf);
    __m512 rhs = _mm512_mul_ps(_mm512_mul_ps(loose, xf), mf);
    return live & _mm512_cmp_ps_mask(bb, _mm512_setzero_ps(), _CMP_GT_OQ) &
           _mm512_cmp_ps_mask(_mm512_mul_ps(bb, bb), rhs, _CMP_GE_OQ) & _mm512_cmpge_epi32_mask(m, minc);
}

/* The candidates of a chunk as bits (bits[i / 16], bit i % 16), where the portable path stores a
 * 32-bit result per pixel, narrows it to a byte and scans bytes. */
DISP_INLINE void FN(strong_bits)(const PIX *v, const uint32_t *cx, ptrdiff_t w, const int K, int32_t minc,
                                 float loose, uint16_t *bits) {
    const __m512i vminc = _mm512_set1_epi32(minc);
    const __m512 vloose = _mm512_set1_ps(loose);
    ptrdiff_t i = 0;
    for (; i + 16 <= w; i += 16) bits[i / 16] = FN(strong_bits16)(v + i, cx + i, K, vminc, vloose, 0xFFFF);
    if (i < w) bits[i / 16] = FN(strong_bits16)(v + i, cx + i, K, vminc, vloose, (__mmask16)((1u << (w - i)) - 1));
}
#endif

#ifdef DISP_AVX2_INTRINSICS
/* The same bound in AVX2, 8 pixels a step, one bit per pixel from movemask. */
DISP_INLINE __m256 FN(pixf8)(const PIX *p) {
    __m256i u = FN(load8)(p);
    if (!PIX_IS_U32) return _mm256_cvtepi32_ps(u);
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(u, 16)), _mm256_set1_ps(65536.0f)),
                         _mm256_cvtepi32_ps(_mm256_and_si256(u, _mm256_set1_epi32(0xFFFF))));
}

DISP_INLINE uint8_t FN(strong_bits8)(const PIX *v, const uint32_t *cx, const int K, __m256i minc, __m256 loose) {
    __m256i s = _mm256_loadu_si256((const __m256i *)(cx - K));
    for (int d = -K + 1; d <= K; d++) s = _mm256_add_epi32(s, _mm256_loadu_si256((const __m256i *)(cx + d)));
    __m256i m = _mm256_srli_epi32(s, DISP_PACK_SHIFT);
    __m256 mf = _mm256_cvtepi32_ps(m), vf = FN(pixf8)(v);
    __m256 xf = _mm256_cvtepi32_ps(_mm256_and_si256(s, _mm256_set1_epi32((1 << DISP_PACK_SHIFT) - 1)));
    __m256 bb = _mm256_sub_ps(_mm256_mul_ps(mf, _mm256_mul_ps(vf, _mm256_set1_ps(DISP_UP))), xf);
    __m256 rhs = _mm256_mul_ps(_mm256_mul_ps(loose, xf), mf);
    __m256 ok = _mm256_and_ps(_mm256_cmp_ps(bb, _mm256_setzero_ps(), _CMP_GT_OQ),
                              _mm256_cmp_ps(_mm256_mul_ps(bb, bb), rhs, _CMP_GE_OQ));
    ok = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(minc, m)), ok);
    return (uint8_t)_mm256_movemask_ps(ok);
}

/* The candidates of a chunk as bits (bits[i / 8], bit i % 8); the last w % 8 pixels through the
 * portable loop. */
DISP_INLINE void FN(strong_bits)(const PIX *v, const uint32_t *cx, ptrdiff_t w, const int K, int32_t minc,
                                 float loose, uint8_t *bits) {
    const __m256i vminc = _mm256_set1_epi32(minc);
    const __m256 vloose = _mm256_set1_ps(loose);
    ptrdiff_t i = 0;
    for (; i + 8 <= w; i += 8) bits[i / 8] = FN(strong_bits8)(v + i, cx + i, K, vminc, vloose);
    if (i < w) {
        uint32_t cand[8];
        uint8_t b = 0;
        FN(strong_row_k)(v + i, NULL, cx + i, w - i, K, minc, loose, cand, 1);
        for (ptrdiff_t t = 0; t < w - i; t++) b |= (uint8_t)(cand[t] << t);
        bits[i / 8] = b;
    }
}
#endif

/* Whether this kernel's `dispersion` candidates are bits (AVX-512 or AVX2, packed sums, half-widths <= 5), not
 * bytes. */
DISP_INLINE int FN(candidate_bits)(const disp_ctx *ctx) {
#ifdef DISP_BITS
    return ctx->packed && ctx->p.kx <= 5;
#else
    (void)ctx;
    return 0;
#endif
}

static void FN(strong_row)(const PIX *v, const uint8_t *fl, const uint32_t *cm, const uint32_t *cx, ptrdiff_t w,
                           int k, const disp_ctx *ctx, disp_bufs *B) {
    const int32_t minc = ctx->min_count_i32;
    const float loose = ctx->loose;
    const ptrdiff_t o = fl - B->row_fl; /* the chunk's place in the row's buffers (a multiple of 16) */
    uint32_t *code32 = B->code32 + o;
#ifdef DISP_BITS
    if (FN(candidate_bits)(ctx)) {
        DISP_BITS *bits = (DISP_BITS *)B->code + o / (8 * sizeof(DISP_BITS));
        switch (k) {
        case 1: FN(strong_bits)(v, cx, w, 1, minc, loose, bits); break;
        case 2: FN(strong_bits)(v, cx, w, 2, minc, loose, bits); break;
        case 3: FN(strong_bits)(v, cx, w, 3, minc, loose, bits); break;
        case 4: FN(strong_bits)(v, cx, w, 4, minc, loose, bits); break;
        default: FN(strong_bits)(v, cx, w, 5, minc, loose, bits); break;
        }
        return;
    }
#endif
    if (ctx->packed)
        FN(strong_row_any)(v, cm, cx, w, k, minc, loose, B, o, code32, 1);
    else
        FN(strong_row_any)(v, cm, cx, w, k, minc, loose, B, o, code32, 0);
    uint8_t *__restrict code = B->code + o;
    for (ptrdiff_t i = 0; i < w; i++) code[i] = (uint8_t)code32[i]; /* validity: in the scan */
}

/* Exact integer window sums over the pixels flagged `bit` (the rare candidates). */
static void FN(direct)(const PIX *img, const uint8_t *flags, ptrdiff_t h, ptrdiff_t w, ptrdiff_t j, ptrdiff_t i,
                       int ky, int kx, uint8_t bit, uint64_t *y_out) {
    ptrdiff_t j0 = j - ky < 0 ? 0 : j - ky, j1 = j + ky + 1 > h ? h : j + ky + 1;
    ptrdiff_t i0 = i - kx < 0 ? 0 : i - kx, i1 = i + kx + 1 > w ? w : i + kx + 1;
    uint64_t y = 0;
    for (ptrdiff_t jj = j0; jj < j1; jj++) {
        const PIX *row = img + jj * w;
        const uint8_t *fr = flags + jj * w;
        for (ptrdiff_t ii = i0; ii < i1; ii++) {
            uint64_t e = (fr[ii] & bit) ? (uint64_t)row[ii] : 0;
            y += e * e;
        }
    }
    *y_out = y;
}

/* Collect the unmasked pixels above the trusted range in one row (rows come in order). */
static int FN(overloads)(const PIX *v, const uint8_t *mk, ptrdiff_t w, PIX hi, int64_t base, disp_indices *out) {
    for (ptrdiff_t i = 0; i < w; i++)
        if (mk[i] && v[i] > hi && disp_push(out, base + i) < 0) return -1;
    return 0;
}

/* The sliding first pass. mode 0: `dispersion` -> strong; mode 1: extended first pass -> CV flags.
 * Column sums over the window's rows (exact: at most 127 pixels below 2^24) slide down the frame;
 * per row one fused pass forms the horizontal sums and the float bound per pixel; the exact tests
 * take the rest (window sums again from the column sums, sums of squares directly). */
static int FN(slide)(const disp_ctx *ctx, const PIX *img, const uint8_t *mask, uint8_t *flags, int mode,
                     disp_bufs *B, disp_indices *strong, disp_indices *over) {
    const ptrdiff_t h = ctx->h, w = ctx->w;
    const int ky = ctx->p.ky, kx = ctx->p.kx;
    const PIX lo = (PIX)ctx->lo_i, hi = (PIX)ctx->hi_i;
    /* Sums of squares are kept modulo 2^32 in both modes: exact where x < 65536 (y <= x^2), which
     * saves the `dispersion` candidates a pass over their windows. */
    uint32_t *cm = B->cm + kx, *cx = B->cx + kx, *cy = B->cy + kx;
    /* The exact test's marks in B->code (see the scan below): bits, 64 pixels a word, or bytes. */
    const int as_bits = mode == 0 && FN(candidate_bits)(ctx);
    const uint64_t marks = mode == 1 ? 0x0202020202020202ull : 0x0101010101010101ull;
    for (ptrdiff_t r = 0; r < h && r < ky; r++) {
        const uint8_t *mk = mask ? mask + r * w : B->ones;
        if (FN(enter)(img + r * w, mk, flags + r * w, cm, cx, cy, w, lo, hi, ctx->packed) &&
            FN(overloads)(img + r * w, mk, w, hi, r * w, over) < 0)
            return -1;
    }
    for (ptrdiff_t j = 0; j < h; j++) {
        ptrdiff_t rin = j + ky, rout = j - ky - 1;
        if (mode == 1 && j > 0) TFN(erode_upto)(flags, h, w, ctx->radius, j - 1, B); /* B->code is free here */
        const PIX *vin = rin < h ? img + rin * w : NULL, *vout = rout >= 0 ? img + rout * w : NULL;
        uint8_t *flin = rin < h ? flags + rin * w : NULL;
        const uint8_t *flout = rout >= 0 ? flags + rout * w : NULL;
        const uint8_t *mkin = mask && rin < h ? mask + rin * w : NULL;
        const PIX *vrow = img + j * w;
        uint8_t *fl = flags + j * w;
        const PIX *next = rin + 1 < h ? img + (rin + 1) * w : NULL;
        const uint8_t *next_mk = mask && rin + 1 < h ? mask + (rin + 1) * w : NULL;
        uint32_t n_over = 0;
        uint8_t undecided = 0;
        B->row_fl = fl;
        /* Chunk by chunk, so that the column sums a chunk's tests read are still in L1: the rows
         * entering and leaving update chunk c, then chunk c - 1 is tested (its window reaches at
         * most kx < DISP_CHUNK columns into chunk c); the next entering row is prefetched meanwhile. */
        for (ptrdiff_t c0 = 0, p0 = -1, pn = 0;; c0 += DISP_CHUNK) {
            ptrdiff_t n = w - c0 < DISP_CHUNK ? w - c0 : DISP_CHUNK;
            if (c0 < w) {
                if (vin && vout)
                    n_over += FN(enter_leave)(vin + c0, mkin ? mkin + c0 : NULL, flin + c0, vout + c0, flout + c0,
                                              cm + c0, cx + c0, cy + c0, n, lo, hi, ctx->packed);
                else if (vin)
                    n_over += FN(enter)(vin + c0, mkin ? mkin + c0 : B->ones + c0, flin + c0, cm + c0, cx + c0,
                                        cy + c0, n, lo, hi, ctx->packed);
                else if (vout)
                    FN(leave)(vout + c0, flout + c0, cm + c0, cx + c0, cy + c0, n, ctx->packed);
                if (next) TFN(prefetch)(next + c0, (size_t)n * sizeof(PIX));
                if (next_mk) TFN(prefetch)(next_mk + c0, (size_t)n);
            }
            if (p0 >= 0) {
                if (mode == 1)
                    undecided |= TFN(cv_row)(cm + p0, cx + p0, cy + p0, pn, kx, ctx, fl + p0, B);
                else
                    FN(strong_row)(vrow + p0, fl + p0, cm + p0, cx + p0, pn, kx, ctx, B);
            }
            if (c0 >= w) break;
            p0 = c0;
            pn = n;
        }
        if (n_over && FN(overloads)(vin, mkin ? mkin : B->ones, w, hi, rin * w, over) < 0) return -1;
        if (mode == 1 && !undecided) continue; /* no pixel left to decide */
        /* Codes are 0/1 (`dispersion`) or 0/1/2 (extended: 2 is undecided): one bit per byte marks a
         * pixel for the exact test (as_bits: one bit per pixel, from strong_bits), and only those bits
         * are visited (x86-64 loads little-endian: the lowest set bit is the leftmost pixel). */
        for (ptrdiff_t i0 = 0; i0 < w; i0 += as_bits ? 64 : 8) {
            uint64_t word;
            memcpy(&word, B->code + (as_bits ? i0 / 8 : i0), 8); /* code has DISP_SLACK zero bytes */
            for (uint64_t bits = as_bits ? word : word & marks; bits; bits &= bits - 1) {
                ptrdiff_t i = i0 + (as_bits ? __builtin_ctzll(bits) : __builtin_ctzll(bits) >> 3);
                if (mode == 1 ? (fl[i] & F_CV) != 0 : !(fl[i] & F_VALID)) continue;
                uint32_t m = 0, x, y;
                TFN(window_xy)(cx + i, cy + i, kx, &x, &y);
                if (ctx->packed) { /* cm is not kept: the count is in x's top bits */
                    m = disp_packed_count(x);
                    x = disp_packed_value(x);
                } else {
                    for (int d = -kx; d <= kx; d++) m += cm[i + d];
                }
                uint64_t y64 = y;
                if (x >= 65536) FN(direct)(img, flags, h, w, j, i, ky, kx, F_INSUMS, &y64);
                if (mode == 1) {
                    if (disp_cv_exact(ctx, (int64_t)m, (double)x, (double)y64)) fl[i] |= F_CV;
                } else if (disp_strong_exact(ctx, (int64_t)m, (double)x, (double)y64, (double)vrow[i]) &&
                           disp_push(strong, j * w + i) < 0) {
                    return -1;
                }
            }
        }
    }
    if (mode == 1) TFN(erode_upto)(flags, h, w, ctx->radius, h - 1, B);
    return 0;
}

/* Final-pass column sums over the background (IN_SUMS and not a candidate): add (sign 1) or remove
 * (sign ~0: -1 modulo 2^32) one row's tile. `cand`: the tile's candidates (bit i: column i), few. */
static void FN(bg_row)(const PIX *__restrict v, const uint8_t *__restrict fl, uint64_t cand, uint32_t *__restrict cm,
                       uint32_t *__restrict cx, ptrdiff_t w, uint32_t sign) {
    if (sign == 1u) {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t ins = (fl[i] >> 1) & 1;
            cm[i] += ins;
            cx[i] += (uint32_t)v[i] & (0u - ins);
        }
    } else {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t ins = (fl[i] >> 1) & 1;
            cm[i] -= ins;
            cx[i] -= (uint32_t)v[i] & (0u - ins);
        }
    }
    for (; cand; cand &= cand - 1) { /* candidates are not background: take them out again */
        ptrdiff_t i = __builtin_ctzll(cand);
        if (!(fl[i] & F_INSUMS)) continue;
        cm[i] -= sign;
        cx[i] -= (uint32_t)v[i] * sign;
    }
}

static int FN(final_pixel)(const disp_ctx *ctx, const uint32_t *cm, const uint32_t *cx, int kx, ptrdiff_t i,
                           double v) {
    uint32_t m = 0, x = 0;
    for (int d = -kx; d <= kx; d++) {
        m += cm[i + d];
        x += cx[i + d];
    }
    /* v < mean (exact: v m < x) fails v >= mean + sigma_s sqrt(g mean) at once; the rest in double. */
    if (m >= 2 && v * (double)m < (double)x) return 0;
    return disp_final_exact(ctx, (int64_t)m, (double)x, v);
}

/* Bring one column tile's background column sums to row j: slide from the row they hold when
 * that is near, else rebuild them from the window's rows. */
static void FN(tile_to)(const PIX *img, const uint8_t *flags, const disp_bufs *B, ptrdiff_t h, ptrdiff_t w, int ky,
                        uint32_t *cm, uint32_t *cx, ptrdiff_t t, ptrdiff_t j) {
    ptrdiff_t c0 = t * DISP_TILE, n = w - c0 < DISP_TILE ? w - c0 : DISP_TILE, cur = B->tile_row[t];
    const uint64_t *cand = B->cand + t;
    if (cur == j) return;
    if (cur >= 0 && 2 * (j - cur) <= 2 * ky + 1) {
        for (ptrdiff_t r = cur + 1; r <= j; r++) {
            ptrdiff_t ri = r + ky, ro = r - ky - 1;
            if (ri < h) FN(bg_row)(img + ri * w + c0, flags + ri * w + c0, cand[ri * B->nw], cm + c0, cx + c0, n, 1u);
            if (ro >= 0) FN(bg_row)(img + ro * w + c0, flags + ro * w + c0, cand[ro * B->nw], cm + c0, cx + c0, n, ~0u);
        }
    } else {
        memset(cm + c0, 0, (size_t)n * sizeof(uint32_t));
        memset(cx + c0, 0, (size_t)n * sizeof(uint32_t));
        for (ptrdiff_t r = j - ky < 0 ? 0 : j - ky; r <= j + ky && r < h; r++)
            FN(bg_row)(img + r * w + c0, flags + r * w + c0, cand[r * B->nw], cm + c0, cx + c0, n, 1u);
    }
    B->tile_row[t] = j;
}

/* Extended final pass, only at the candidates (B->cand: inside the eroded CV region) above the
 * global threshold. Background column sums over the window two pixels wider each way are kept per
 * tile of DISP_TILE columns, brought to a candidate's row only for the tiles its window touches;
 * window sums (uint32, exact: at most 255 pixels below 2^24, checked by the caller) only at
 * candidates. */
static int FN(final)(const disp_ctx *ctx, const PIX *img, const uint8_t *flags, disp_bufs *B, disp_indices *strong) {
    const ptrdiff_t h = ctx->h, w = ctx->w;
    const int ky = ctx->p.ky + 2, kx = ctx->p.kx + 2;
    const double threshold = ctx->p.threshold;
    uint32_t *cm = B->cm + kx, *cx = B->cx + kx;
    memset(B->cm, 0, (size_t)B->padded * sizeof(uint32_t)); /* the padding too: pass 1 used other offsets */
    memset(B->cx, 0, (size_t)B->padded * sizeof(uint32_t));
    for (ptrdiff_t t = 0; t * DISP_TILE < w; t++) B->tile_row[t] = -1;
    for (ptrdiff_t j = 0; j < h; j++) {
        if (!B->row_has_cand[j]) continue;
        const PIX *vrow = img + j * w;
        const uint64_t *cand = B->cand + j * B->nw;
        for (ptrdiff_t k = 0; k < B->nw; k++) {
            for (uint64_t bits = cand[k]; bits; bits &= bits - 1) {
                ptrdiff_t i = 64 * k + __builtin_ctzll(bits);
                double v = (double)vrow[i];
                if (!(v > threshold)) continue;
                ptrdiff_t t0 = (i - kx < 0 ? 0 : i - kx) / DISP_TILE, t1 = (i + kx >= w ? w - 1 : i + kx) / DISP_TILE;
                for (ptrdiff_t t = t0; t <= t1; t++) FN(tile_to)(img, flags, B, h, w, ky, cm, cx, t, j);
                if (FN(final_pixel)(ctx, cm, cx, kx, i, v) && disp_push(strong, j * w + i) < 0) return -1;
            }
        }
    }
    return 0;
}

static int FN(run)(const disp_ctx *ctx, const void *image, const uint8_t *mask, uint8_t *flags, disp_bufs *B,
                   disp_indices *strong, disp_indices *over) {
    const PIX *img = (const PIX *)image;
    if (!ctx->p.extended) return FN(slide)(ctx, img, mask, flags, 0, B, strong, over);
    if (FN(slide)(ctx, img, mask, flags, 1, B, strong, over) < 0) return -1;
    return FN(final)(ctx, img, flags, B, strong);
}

#undef PIX_F
#undef DISP_INLINE
#undef FN
#undef TFN
#endif
