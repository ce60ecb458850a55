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

/* Clipped horizontal window sums of padded column sums: out[i] = sum c[i-k .. i+k]. Unsigned
 * wrapping arithmetic: exact modulo 2^32, and the callers only read sums they know are < 2^32. */
static inline __attribute__((always_inline)) void TFN(hsum_k)(const uint32_t *__restrict c, uint32_t *__restrict out,
                                                               ptrdiff_t w, const int k) {
    for (ptrdiff_t i = 0; i < w; i++) {
        uint32_t s = 0;
        for (int d = -k; d <= k; d++) s += c[i + d];
        out[i] = s;
    }
}

static void TFN(hsum)(const uint32_t *__restrict c, uint32_t *__restrict out, ptrdiff_t w, int k) {
    switch (k) {
    case 1: TFN(hsum_k)(c, out, w, 1); return;
    case 2: TFN(hsum_k)(c, out, w, 2); return;
    case 3: TFN(hsum_k)(c, out, w, 3); return;
    case 4: TFN(hsum_k)(c, out, w, 4); return;
    case 5: TFN(hsum_k)(c, out, w, 5); return;
    default:
        for (ptrdiff_t i = 0; i < w; i++) out[i] = c[i - k];
        for (int d = -k + 1; d <= k; d++)
            for (ptrdiff_t i = 0; i < w; i++) out[i] += c[i + d];
    }
}

/* uint32 -> float with one rounding (AVX2 has only the signed conversion). */
static inline __attribute__((always_inline)) float TFN(u32f)(uint32_t u) {
    return (float)(int32_t)(u >> 16) * 65536.0f + (float)(int32_t)(u & 0xFFFFu);
}

/* Extended first pass, the index-of-dispersion test a > c over every pixel of a row, in float32:
 * code 1 = surely passes, 0 = surely fails, 2 = too close to call (or y not known exactly: y is
 * kept modulo 2^32, and y <= x^2 makes it exact when x < 65536), decided in double by the caller.
 * Rounding: each of a and c carries at most ~10 float32 roundings relative to
 * S = m y + x^2 + x m + c, so a margin of S 2^-18 is safe by a factor of >= 20. */
static void TFN(test_cv)(const uint32_t *__restrict wm, const uint32_t *__restrict wx, const uint32_t *__restrict wy,
                         ptrdiff_t w, const disp_ctx *ctx, uint8_t *__restrict code) {
    const int32_t minc = ctx->min_count_i32;
    const float nsb = (float)ctx->p.sigma_b, g = (float)ctx->p.gain;
    if (ctx->p.gain > 0) {
        for (ptrdiff_t i = 0; i < w; i++) {
            int32_t m = (int32_t)wm[i], x = (int32_t)wx[i];
            float mf = (float)m, xf = (float)x, yf = TFN(u32f)(wy[i]);
            float m1 = mf - 1.0f, my = mf * yf, xx = xf * xf;
            float a = my - xx;
            float c = g * xf * (m1 + nsb * __builtin_sqrtf(2.0f * m1));
            float e = (my + xx + xf * mf + c) * 0x1p-18f, d = a - c;
            int base = (m >= minc) & (x >= 0);
            int sure = (x < 65536) & ((d > e) | (d < -e));
            code[i] = (uint8_t)(base * ((sure & (d > e)) | ((!sure) << 1)));
        }
    } else {
        for (ptrdiff_t i = 0; i < w; i++) {
            int32_t m = (int32_t)wm[i], x = (int32_t)wx[i];
            float mf = (float)m, xf = (float)x, yf = TFN(u32f)(wy[i]);
            float m1 = mf - 1.0f, my = mf * yf, xx = xf * xf, xm = xf * m1;
            float a = my - xx - xm;
            float c = xf * nsb * __builtin_sqrtf(2.0f * m1);
            float e = (my + xx + xf * mf + c) * 0x1p-18f, d = a - c;
            int base = (m >= minc) & (x >= 0);
            int sure = (x < 65536) & ((d > e) | (d < -e));
            code[i] = (uint8_t)(base * ((sure & (d > e)) | ((!sure) << 1)));
        }
    }
}

/* CV for the sure cases (masked and untrusted pixels count as passing, DIALS local.h). */
static void TFN(mark_cv)(uint8_t *__restrict fl, const uint8_t *__restrict code, ptrdiff_t w) {
    for (ptrdiff_t i = 0; i < w; i++) {
        uint8_t f = fl[i];
        fl[i] = f | (uint8_t)((((f & F_VALID) ^ F_VALID) | (code[i] & 1)) << 2); /* code is 0, 1 or 2 */
    }
}

/* Erosion of the CV region by a (2r+1)-square (DIALS: chessboard distance to the nearest cv-false
 * pixel >= the erosion distance; outside the frame never erodes), then BACKGROUND = VALID and not
 * (CV and eroded); IN_SUMS2 = BACKGROUND and IN_SUMS; CAND2 = VALID and not BACKGROUND. Separable:
 * NEAR along rows, then OR over the rows within r. `pad` holds w + 2r bytes. */
static void TFN(erode)(uint8_t *__restrict flags, ptrdiff_t h, ptrdiff_t w, int r, uint8_t *__restrict pad,
                       uint8_t *__restrict acc) {
    memset(pad, 0, (size_t)(w + 2 * r));
    for (ptrdiff_t j = 0; j < h; j++) {
        uint8_t *fl = flags + j * w;
        for (ptrdiff_t i = 0; i < w; i++) pad[r + i] = (uint8_t)((fl[i] & F_CV) == 0);
        for (ptrdiff_t i = 0; i < w; i++) acc[i] = pad[i];
        for (int d = 1; d <= 2 * r; d++)
            for (ptrdiff_t i = 0; i < w; i++) acc[i] |= pad[i + d];
        for (ptrdiff_t i = 0; i < w; i++) fl[i] |= (uint8_t)(acc[i] << 3);
    }
    for (ptrdiff_t j = 0; j < h; j++) {
        ptrdiff_t j0 = j - r < 0 ? 0 : j - r, j1 = j + r >= h ? h - 1 : j + r;
        const uint8_t *f0 = flags + j0 * w;
        for (ptrdiff_t i = 0; i < w; i++) acc[i] = f0[i] & F_NEAR;
        for (ptrdiff_t jj = j0 + 1; jj <= j1; jj++) {
            const uint8_t *fr = flags + jj * w;
            for (ptrdiff_t i = 0; i < w; i++) acc[i] |= fr[i] & F_NEAR;
        }
        uint8_t *fl = flags + j * w;
        for (ptrdiff_t i = 0; i < w; i++) {
            uint8_t f = fl[i];
            uint8_t valid = f & F_VALID, ins = (f >> 1) & 1, cv = (f >> 2) & 1, near = acc[i] != 0;
            uint8_t bg = valid & (uint8_t)(!(cv & !near));
            fl[i] = f | (uint8_t)(bg << 4) | (uint8_t)((bg & ins) << 5) | (uint8_t)((valid & !bg) << 6);
        }
    }
}

#undef TFN

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

#if PIX_IS_U32
#define PIX_F(p) TFN(u32f)(p)
#else
#define PIX_F(p) ((float)(p))
#endif

/* A row enters the window: flag it (VALID, IN_SUMS) and add it to the column sums; count the
 * unmasked pixels above the trusted range (collected by the caller when there are any). */
static uint32_t FN(enter)(const PIX *__restrict v, const uint8_t *__restrict mk, uint8_t *__restrict fl,
                          uint32_t *__restrict cm, uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w,
                          PIX lo, PIX hi) {
    uint32_t over = 0;
    if (cy) {
        for (ptrdiff_t i = 0; i < w; i++) {
            PIX p = v[i];
            uint32_t use = mk[i] != 0, valid = use & (p >= lo) & (p <= hi), ins = valid & (p < DISP_BIG);
            uint32_t e = ins ? (uint32_t)p : 0;
            fl[i] = (uint8_t)(valid | (ins << 1));
            cm[i] += ins;
            cx[i] += e;
            cy[i] += e * e;
            over += use & (p > hi);
        }
    } else {
        for (ptrdiff_t i = 0; i < w; i++) {
            PIX p = v[i];
            uint32_t use = mk[i] != 0, valid = use & (p >= lo) & (p <= hi), ins = valid & (p < DISP_BIG);
            uint32_t e = ins ? (uint32_t)p : 0;
            fl[i] = (uint8_t)(valid | (ins << 1));
            cm[i] += ins;
            cx[i] += e;
            over += use & (p > hi);
        }
    }
    return over;
}

/* A row leaves the window. */
static void FN(leave)(const PIX *__restrict v, const uint8_t *__restrict fl, uint32_t *__restrict cm,
                      uint32_t *__restrict cx, uint32_t *__restrict cy, ptrdiff_t w) {
    if (cy) {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t ins = (fl[i] >> 1) & 1, e = ins ? (uint32_t)v[i] : 0;
            cm[i] -= ins;
            cx[i] -= e;
            cy[i] -= e * e;
        }
    } else {
        for (ptrdiff_t i = 0; i < w; i++) {
            uint32_t ins = (fl[i] >> 1) & 1, e = ins ? (uint32_t)v[i] : 0;
            cm[i] -= ins;
            cx[i] -= e;
        }
    }
}

/* `dispersion` candidates: DIALS's b > d (b = m v - x, d = sigma_s sqrt(g x m) >= 0) needs b > 0 and
 * b^2 > sigma_s^2 g x m. In float32, b is raised by a bound on its rounding (4 roundings of
 * m v + x at most, margin 2^-20: 16x) and the right side lowered by `loose` (1 - 1e-4): a pixel
 * that can pass is never dropped. Validity and min_count are exact. */
static void FN(test_strong)(const PIX *__restrict v, const uint8_t *__restrict fl, const uint32_t *__restrict wm,
                            const uint32_t *__restrict wx, ptrdiff_t w, int32_t minc, float loose,
                            uint8_t *__restrict cand) {
    for (ptrdiff_t i = 0; i < w; i++) {
        int32_t m = (int32_t)wm[i];
        float vf = PIX_F(v[i]), mf = (float)m, xf = (float)(int32_t)wx[i];
        float mv = mf * vf, b = mv - xf, bb = b + (mv + xf) * 0x1p-20f;
        int32_t ok = (bb > 0.0f) & (bb * bb >= loose * xf * mf) & (m >= minc);
        cand[i] = (uint8_t)(fl[i] & F_VALID & ok);
    }
}

/* Exact integer window sums over the pixels flagged `bit` (the rare candidates). */
static void FN(direct)(const PIX *img, const uint8_t *flags, ptrdiff_t h, ptrdiff_t w, ptrdiff_t j, ptrdiff_t i,
                       int ky, int kx, uint8_t bit, int64_t *m_out, uint64_t *x_out, uint64_t *y_out) {
    ptrdiff_t j0 = j - ky < 0 ? 0 : j - ky, j1 = j + ky + 1 > h ? h : j + ky + 1;
    ptrdiff_t i0 = i - kx < 0 ? 0 : i - kx, i1 = i + kx + 1 > w ? w : i + kx + 1;
    int64_t m = 0;
    uint64_t x = 0, y = 0;
    for (ptrdiff_t jj = j0; jj < j1; jj++) {
        const PIX *row = img + jj * w;
        const uint8_t *fr = flags + jj * w;
        for (ptrdiff_t ii = i0; ii < i1; ii++) {
            uint64_t use = (fr[ii] & bit) != 0, e = use ? (uint64_t)row[ii] : 0;
            m += (int64_t)use;
            x += e;
            y += e * e;
        }
    }
    *m_out = m;
    *x_out = x;
    if (y_out) *y_out = y;
}

/* Collect the unmasked pixels above the trusted range in one row (rows come in order). */
static int FN(overloads)(const PIX *v, const uint8_t *mk, ptrdiff_t w, PIX hi, int64_t base, disp_indices *out) {
    for (ptrdiff_t i = 0; i < w; i++)
        if (mk[i] && v[i] > hi && disp_push(out, base + i) < 0) return -1;
    return 0;
}

/* The sliding first pass. mode 0: `dispersion` -> strong; mode 1: extended first pass -> CV flags.
 * Column sums over the window's rows (uint32, exact: at most 127 pixels below 2^24 each) slide
 * down the frame; horizontal sums per row; the float bound per pixel; exact tests for the rest. */
static int FN(slide)(const disp_ctx *ctx, const PIX *img, const uint8_t *mask, uint8_t *flags, int mode,
                     disp_bufs *B, disp_indices *strong, disp_indices *over) {
    const ptrdiff_t h = ctx->h, w = ctx->w;
    const int ky = ctx->p.ky, kx = ctx->p.kx;
    const PIX lo = (PIX)ctx->lo_i, hi = (PIX)ctx->hi_i;
    uint32_t *cm = B->cm + kx, *cx = B->cx + kx, *cy = mode == 1 ? B->cy + kx : NULL;
    const int32_t minc = ctx->min_count_i32;
    const float loose = ctx->loose;
    for (ptrdiff_t r = 0; r < h && r < ky; r++) {
        const uint8_t *mk = mask ? mask + r * w : B->ones;
        if (FN(enter)(img + r * w, mk, flags + r * w, cm, cx, cy, w, lo, hi) &&
            FN(overloads)(img + r * w, mk, w, hi, r * w, over) < 0)
            return -1;
    }
    for (ptrdiff_t j = 0; j < h; j++) {
        ptrdiff_t r = j + ky;
        if (r < h) {
            const uint8_t *mk = mask ? mask + r * w : B->ones;
            if (FN(enter)(img + r * w, mk, flags + r * w, cm, cx, cy, w, lo, hi) &&
                FN(overloads)(img + r * w, mk, w, hi, r * w, over) < 0)
                return -1;
        }
        r = j - ky - 1;
        if (r >= 0) FN(leave)(img + r * w, flags + r * w, cm, cx, cy, w);
        TFN(hsum)(cm, B->wm, w, kx);
        TFN(hsum)(cx, B->wx, w, kx);
        const PIX *vrow = img + j * w;
        uint8_t *fl = flags + j * w;
        if (mode == 0) {
            FN(test_strong)(vrow, fl, B->wm, B->wx, w, minc, loose, B->code);
            for (ptrdiff_t i0 = 0; i0 < w; i0 += 8) {
                uint64_t word;
                memcpy(&word, B->code + i0, 8); /* code has 8 bytes of zero slack */
                if (!word) continue;
                for (ptrdiff_t i = i0; i < i0 + 8 && i < w; i++) {
                    if (!B->code[i]) continue;
                    int64_t m;
                    uint64_t x, y;
                    FN(direct)(img, flags, h, w, j, i, ky, kx, F_INSUMS, &m, &x, &y);
                    if (disp_strong_exact(ctx, m, (double)x, (double)y, (double)vrow[i]) &&
                        disp_push(strong, j * w + i) < 0)
                        return -1;
                }
            }
        } else {
            TFN(hsum)(cy, B->wy, w, kx);
            TFN(test_cv)(B->wm, B->wx, B->wy, w, ctx, B->code);
            TFN(mark_cv)(fl, B->code, w);
            for (ptrdiff_t i0 = 0; i0 < w; i0 += 8) {
                uint64_t word;
                memcpy(&word, B->code + i0, 8);
                if (!(word & 0x0202020202020202ull)) continue;
                for (ptrdiff_t i = i0; i < i0 + 8 && i < w; i++) {
                    if (B->code[i] != 2 || (fl[i] & F_CV)) continue;
                    int64_t m = (int32_t)B->wm[i];
                    uint64_t x = B->wx[i], y = B->wy[i];
                    if (x >= 65536) FN(direct)(img, flags, h, w, j, i, ky, kx, F_INSUMS, &m, &x, &y);
                    if (disp_cv_exact(ctx, m, (double)x, (double)y)) fl[i] |= F_CV;
                }
            }
        }
    }
    return 0;
}

/* Extended final pass, only at the candidates (VALID, not BACKGROUND: inside the eroded CV region)
 * above the global threshold: exact background sums over the window two pixels wider each way. */
static int FN(final)(const disp_ctx *ctx, const PIX *img, const uint8_t *flags, disp_indices *strong) {
    const ptrdiff_t h = ctx->h, w = ctx->w;
    const int ky = ctx->p.ky + 2, kx = ctx->p.kx + 2;
    const double threshold = ctx->p.threshold;
    for (ptrdiff_t j = 0; j < h; j++) {
        const uint8_t *fl = flags + j * w;
        const PIX *vrow = img + j * w;
        ptrdiff_t i0 = 0;
        for (; i0 + 8 <= w; i0 += 8) {
            uint64_t word;
            memcpy(&word, fl + i0, 8);
            if (!(word & 0x4040404040404040ull)) continue;
            for (ptrdiff_t i = i0; i < i0 + 8; i++) {
                if (!(fl[i] & F_CAND2) || !((double)vrow[i] > threshold)) continue;
                int64_t m;
                uint64_t x;
                FN(direct)(img, flags, h, w, j, i, ky, kx, F_INSUMS2, &m, &x, NULL);
                if (disp_final_exact(ctx, m, (double)x, (double)vrow[i]) && disp_push(strong, j * w + i) < 0)
                    return -1;
            }
        }
        for (ptrdiff_t i = i0; i < w; i++) {
            if (!(fl[i] & F_CAND2) || !((double)vrow[i] > threshold)) continue;
            int64_t m;
            uint64_t x;
            FN(direct)(img, flags, h, w, j, i, ky, kx, F_INSUMS2, &m, &x, NULL);
            if (disp_final_exact(ctx, m, (double)x, (double)vrow[i]) && disp_push(strong, j * w + i) < 0)
                return -1;
        }
    }
    return 0;
}

static int FN(run)(const disp_ctx *ctx, const void *image, const uint8_t *mask, uint8_t *flags, disp_bufs *B,
                   disp_indices *strong, disp_indices *over) {
    const PIX *img = (const PIX *)image;
    if (!ctx->p.extended) return FN(slide)(ctx, img, mask, flags, 0, B, strong, over);
    if (FN(slide)(ctx, img, mask, flags, 1, B, strong, over) < 0) return -1;
    TFN(erode)(flags, ctx->h, ctx->w, ctx->radius, B->pad, B->code);
    return FN(final)(ctx, img, flags, strong);
}

#undef PIX_F
#undef FN
#undef TFN
#endif
