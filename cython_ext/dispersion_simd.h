/* DIALS's dispersion thresholds as vectorised, mostly sparse C kernels, one build for every x86-64.
 *
 * The rules are those of dials/algorithms/image/threshold/local.h (DispersionThreshold and
 * DispersionExtendedThreshold; intxr/reader/threshold.py states them in words). How they are met:
 *
 * - Window sums slide down the frame as column sums over the window's rows (uint32: a 7x7 window
 *   of counts below 2^24 fits; the sum of squares is kept modulo 2^32 and used only where x < 65536,
 *   since y <= x^2), plus clipped horizontal sums per row: a few rows of state, no summed-area table.
 * - `dispersion`: the pixel must pass b > d, which needs no sum of squares; a float32 bound with a
 *   margin passes every pixel that can, and the exact DIALS tests in double (with exact integer
 *   sums of squares over the window) run only on those few candidates.
 * - `dispersion_extended`: the first-pass index-of-dispersion test runs in float32 for every pixel,
 *   deciding only where the margin is safe; the rest is decided in double. Erosion is bit-wise,
 *   a few rows behind the first pass.
 *   The final test (over the window 2 pixels wider) runs only inside the eroded region, with exact
 *   integer sums.
 * - The same C is compiled for several instruction sets (GCC target pragmas: scalar, SSE2, AVX2,
 *   AVX-512) and chosen at run time from the CPU (__builtin_cpu_supports), or forced. AVX-512 and
 *   AVX2 also have two loops in intrinsics, where GCC's vectorisation of the portable loop narrows
 *   32-bit lanes to bytes and widens them back: the row update (no mask, packed sums) and the
 *   `dispersion` float bound (packed sums), whose candidates are bits straight from the compare
 *   masks (AVX2: movemask).
 * - The exact tests are compiled once for the baseline ISA (no FMA contraction), in DIALS's order,
 *   from exact integer sums: every path gives DIALS's doubles.
 */
#ifndef INTXR_DISPERSION_SIMD_H
#define INTXR_DISPERSION_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DISP_SCALAR = 0, DISP_SSE2 = 1, DISP_AVX2 = 2, DISP_AVX512 = 3, DISP_N_KERNELS = 4 };
enum { DISP_U16 = 0, DISP_I32 = 1, DISP_U32 = 2 };
#define DISP_BIG 16777216 /* 2^24: pixels at or above it stay out of the window sums (DIALS) */

/* Per-pixel flag bits, one byte per pixel. */
enum {
    F_VALID = 1,    /* unmasked and inside the trusted range */
    F_INSUMS = 2,   /* in the first-pass window sums (VALID and < 2^24) */
    F_CV = 4        /* extended: index-of-dispersion test passed (or masked) */
};

typedef struct {
    int64_t *data;
    ptrdiff_t size, capacity;
} disp_indices;

typedef struct {
    int ky, kx;
    double sigma_b, sigma_s, threshold, gain; /* gain <= 0: none (DIALS's plain expressions) */
    int64_t min_count;
    double lo, hi; /* trusted range, inclusive */
    int extended;
} disp_params;

typedef struct {
    disp_params p;
    ptrdiff_t h, w;
    int64_t lo_i, hi_i; /* the trusted range as integers of the pixel type */
    int32_t min_count_i32;
    float loose;
    int radius;
    int packed;   /* first pass: count and value share one column sum (see DISP_PACK_SHIFT) */
    double *root; /* sqrt(2 (m - 1)) for m = 0 .. window size */
} disp_ctx;

typedef struct {
    uint32_t *cm, *cx, *cy, *wm, *wx, *wy; /* column sums, window sums for wide windows */
    uint32_t *code32;                      /* per-pixel results of a row's float bound */
    uint8_t *code, *ones;                  /* the same as bytes (for the scan); all ones (no mask) */
    uint8_t *row_has_cand;            /* extended: rows holding final-pass candidates */
    /* extended, erosion in bits (bit b of word k: pixel 64 k + b): */
    ptrdiff_t nw;                     /* words per row */
    uint64_t *notcv;                  /* one row's cv-false pixels, a zero word each side */
    uint64_t *near, *cvv;             /* rings of 2 r + 1 rows: cv-false within r along the row; VALID and CV */
    uint64_t *cand;                   /* every row: final-pass candidates (VALID, CV, no cv-false pixel within r) */
    ptrdiff_t *tile_row;              /* extended: the row each tile's final-pass column sums hold */
    ptrdiff_t padded;                 /* length of cm, cx, cy: w and 2 (kx + 2) zeros */
    const uint8_t *row_fl;            /* the flags of the row whose chunks are being tested */
} disp_bufs;

#define DISP_TILE 64 /* columns per tile of the extended final pass's column sums (one word of cand) */
#define DISP_SLACK 64 /* bytes past the row end that scratch loops may touch (one AVX-512 vector) */
/* Packed first-pass sums: (count << 26) + value in one uint32, exact when every window's
 * value sum stays below 2^26 and its count below 64, i.e. a window of at most 63 pixels whose
 * trusted maximum times the window size is below 2^26 (a PILATUS's 1e6-count cutoff and DIALS's
 * 7x7 window qualify). One array of column sums to update and sum instead of two. */
#define DISP_PACK_SHIFT 26
#define DISP_PACK(count, value) ((value) + ((count) << DISP_PACK_SHIFT))
/* The `dispersion` float bound takes bb = m (v DISP_UP) - x for b = m v - x. Each of the float
 * values v, x and the two products rounds once (relative 2^-24 each), so m (v DISP_UP) >= m v (1 +
 * 2^-19); where b > 0, x < m v, and bb >= b + m v (2^-19 - 2^-23) > b even after the subtraction
 * rounds: bb never falls below b. */
#define DISP_UP (1.0f + 0x1p-18f)
static inline uint32_t disp_packed_count(uint32_t s) { return s >> DISP_PACK_SHIFT; }
static inline uint32_t disp_packed_value(uint32_t s) { return s & ((1u << DISP_PACK_SHIFT) - 1u); }
#define DISP_CHUNK 512 /* pixels per chunk of a row's window tests (the next row is prefetched per chunk) */

static int disp_push(disp_indices *out, int64_t k) {
    if (out->size == out->capacity) {
        ptrdiff_t cap = out->capacity * 2 + 1024;
        int64_t *grown = (int64_t *)realloc(out->data, (size_t)cap * sizeof(int64_t));
        if (!grown) return -1;
        out->data = grown;
        out->capacity = cap;
    }
    out->data[out->size++] = k;
    return 0;
}

/* The exact tests, in DIALS's order of operations on exact integer sums (local.h). The module is
 * built with -ffp-contract=off, so no variant fuses a multiply-add: each rounds as DIALS does. */
static inline int disp_strong_exact(const disp_ctx *c, int64_t m, double x, double y, double v) {
    /* DispersionThreshold: mask && m >= min_count && x >= 0 && v > threshold, then a > c && b > d. */
    double a, b, cc, d, g = c->p.gain;
    if (!(m >= c->p.min_count && x >= 0 && v > c->p.threshold)) return 0;
    b = (double)m * v - x;
    if (g > 0) {
        a = (double)m * y - x * x;
        cc = g * x * (((double)m - 1) + c->p.sigma_b * c->root[m]);
        d = c->p.sigma_s * sqrt(g * x * (double)m);
    } else {
        a = (double)m * y - x * x - x * ((double)m - 1);
        cc = x * c->p.sigma_b * c->root[m];
        d = c->p.sigma_s * sqrt(x * (double)m);
    }
    return a > cc && b > d;
}

static inline int disp_cv_exact(const disp_ctx *c, int64_t m, double x, double y) {
    /* DispersionExtendedThreshold, first pass: the index of dispersion alone. */
    double a, cc, g = c->p.gain;
    if (!(m >= c->p.min_count && x >= 0)) return 0;
    if (g > 0) {
        a = (double)m * y - x * x;
        cc = g * x * (((double)m - 1) + c->p.sigma_b * c->root[m]);
    } else {
        a = (double)m * y - x * x - x * ((double)m - 1);
        cc = x * c->p.sigma_b * c->root[m];
    }
    return a > cc;
}

static inline int disp_final_exact(const disp_ctx *c, int64_t m, double x, double v) {
    /* DispersionExtendedThreshold, final test: v >= mean + sigma_s sqrt(g mean) over the background
     * of the wider window (mean 0 below 2 pixels), v above the global threshold. */
    double mean, g = c->p.gain;
    if (!(v >= 0 && x >= 0 && v > c->p.threshold)) return 0;
    mean = m >= 2 ? x / (double)m : 0.0;
    if (g > 0) return v >= mean + c->p.sigma_s * sqrt(g * mean);
    return v >= mean + c->p.sigma_s * sqrt(mean);
}

typedef int (*disp_run_fn)(const disp_ctx *, const void *, const uint8_t *, uint8_t *, disp_bufs *, disp_indices *,
                           disp_indices *);

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DISP_X86 1
#include <immintrin.h> /* (its intrinsics are usable inside the functions given a target below) */
#else
#define DISP_X86 0
#endif

/* Scalar: the same C with the vectoriser off (the path every other one is checked against). */
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
#define TGT scalar
#include "dispersion_simd_impl.h"
#undef TGT
#pragma GCC pop_options

#if DISP_X86
/* SSE2: the x86-64 baseline the module is built for. */
#define TGT sse2
#include "dispersion_simd_impl.h"
#undef TGT

#pragma GCC push_options
#pragma GCC target("avx2")
#define TGT avx2
#define DISP_AVX2_INTRINSICS 1
#define DISP_BITS uint8_t /* the `dispersion` candidates as bits, 8 pixels a store */
#include "dispersion_simd_impl.h"
#undef DISP_BITS
#undef DISP_AVX2_INTRINSICS
#undef TGT
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define TGT avx512
#define DISP_AVX512_INTRINSICS 1
#define DISP_BITS uint16_t /* 16 pixels a store */
#include "dispersion_simd_impl.h"
#undef DISP_BITS
#undef DISP_AVX512_INTRINSICS
#undef TGT
#pragma GCC pop_options
#endif

static const char *disp_kernel_names[DISP_N_KERNELS] = {"scalar", "sse2", "avx2", "avx512"};

static int disp_kernel_supported(int kernel) {
    if (kernel == DISP_SCALAR) return 1;
#if DISP_X86
    __builtin_cpu_init();
    if (kernel == DISP_SSE2) return 1;
    if (kernel == DISP_AVX2) return __builtin_cpu_supports("avx2") != 0;
    if (kernel == DISP_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

static int disp_best_kernel(void) {
    for (int k = DISP_N_KERNELS - 1; k > 0; k--)
        if (disp_kernel_supported(k)) return k;
    return DISP_SCALAR;
}

static disp_run_fn disp_pick(int kernel, int dtype) {
#define DISP_ROW(t) {run_u16_##t, run_i32_##t, run_u32_##t}
#if DISP_X86
    static const disp_run_fn table[DISP_N_KERNELS][3] = {DISP_ROW(scalar), DISP_ROW(sse2), DISP_ROW(avx2),
                                                         DISP_ROW(avx512)};
#else
    static const disp_run_fn table[1][3] = {DISP_ROW(scalar)};
    kernel = DISP_SCALAR;
#endif
#undef DISP_ROW
    if (kernel < 0 || kernel >= DISP_N_KERNELS || dtype < 0 || dtype > 2) return NULL;
    return table[kernel][dtype];
}

/* Strong pixels (and unmasked pixels above the trusted range), raster order. Returns 0, -1 when
 * out of memory, -2 when the parameters lie outside this kernel's domain (window above 127 pixels,
 * a negative or empty trusted range): the caller then uses its generic path. */
static int disp_strong_pixels(int kernel, int dtype, const void *image, const uint8_t *mask, ptrdiff_t h,
                              ptrdiff_t w, const disp_params *p, disp_indices *strong, disp_indices *over) {
    static const double dmax[3] = {65535.0, 2147483647.0, 4294967295.0};
    disp_ctx ctx;
    disp_bufs B;
    disp_run_fn run = disp_pick(kernel, dtype);
    int64_t n_window = (int64_t)(2 * p->ky + 1) * (2 * p->kx + 1);
    double lo, hi;
    int status = -1;
    uint8_t *flags;
    /* uint32 window sums of counts below 2^24 are exact up to 255 pixels: the first pass's window
     * (<= 127, which also bounds the float32 error analysis), and for the extended final pass the
     * window two pixels wider each way. */
    int64_t n_window2 = (int64_t)(2 * p->ky + 5) * (2 * p->kx + 5);
    if (!run || p->ky < 1 || p->kx < 1 || n_window > 127 || (p->extended && n_window2 > 255) || !(p->lo >= 0) ||
        !(p->hi >= p->lo))
        return -2;
    lo = ceil(p->lo);
    hi = p->hi >= dmax[dtype] ? dmax[dtype] : floor(p->hi);
    if (lo > hi) return -2;
    if (h <= 0 || w <= 0) return 0;
    memset(&ctx, 0, sizeof ctx);
    memset(&B, 0, sizeof B);
    ctx.p = *p;
    ctx.h = h;
    ctx.w = w;
    ctx.lo_i = (int64_t)lo;
    ctx.hi_i = (int64_t)hi;
    ctx.min_count_i32 = p->min_count > 128 ? 128 : (p->min_count < -1 ? -1 : (int32_t)p->min_count);
    ctx.loose = (float)(0.9999 * p->sigma_s * p->sigma_s * (p->gain > 0 ? p->gain : 1.0));
    ctx.radius = (p->kx < p->ky ? p->kx : p->ky) - 1;
    /* (the extended final pass keeps its own, unpacked, background sums) */
    ctx.packed = n_window < 64 && (double)ctx.hi_i * (double)n_window < (double)(1u << DISP_PACK_SHIFT);
    ctx.root = (double *)malloc((size_t)(n_window + 1) * sizeof(double));
    flags = (uint8_t *)malloc((size_t)(h * w) + DISP_SLACK); /* slack: erode reads whole vectors */
    ptrdiff_t padded = w + 2 * (p->kx + 2);
    B.padded = padded;
    B.cm = (uint32_t *)calloc((size_t)padded, sizeof(uint32_t));
    B.cx = (uint32_t *)calloc((size_t)padded, sizeof(uint32_t));
    B.cy = (uint32_t *)calloc((size_t)padded, sizeof(uint32_t));
    B.wm = (uint32_t *)malloc((size_t)w * sizeof(uint32_t));
    B.code32 = (uint32_t *)malloc((size_t)w * sizeof(uint32_t));
    B.wx = (uint32_t *)malloc((size_t)w * sizeof(uint32_t));
    B.wy = (uint32_t *)malloc((size_t)w * sizeof(uint32_t));
    B.code = (uint8_t *)calloc((size_t)w + DISP_SLACK, 1);
    B.ones = (uint8_t *)malloc((size_t)w);
    B.row_has_cand = (uint8_t *)malloc((size_t)h);
    B.tile_row = (ptrdiff_t *)malloc((size_t)(w / DISP_TILE + 1) * sizeof(ptrdiff_t));
    B.nw = (w + 63) / 64;
    if (p->extended) {
        size_t ring = (size_t)(2 * ctx.radius + 1) * (size_t)B.nw * sizeof(uint64_t);
        B.notcv = (uint64_t *)calloc((size_t)B.nw + 2, sizeof(uint64_t));
        B.near = (uint64_t *)malloc(ring);
        B.cvv = (uint64_t *)malloc(ring);
        B.cand = (uint64_t *)malloc((size_t)h * (size_t)B.nw * sizeof(uint64_t));
    }
    if (ctx.root && flags && B.cm && B.wm && B.code32 && B.cx && B.cy && B.wx && B.wy && B.code && B.ones &&
        B.row_has_cand && B.tile_row && (!p->extended || (B.notcv && B.near && B.cvv && B.cand))) {
        ctx.root[0] = 0.0;
        for (int64_t m = 1; m <= n_window; m++) ctx.root[m] = sqrt(2.0 * ((double)m - 1));
        memset(B.ones, 1, (size_t)w);
        status = run(&ctx, image, mask, flags, &B, strong, over);
    }
    free(ctx.root);
    free(flags);
    free(B.cm);
    free(B.cx);
    free(B.cy);
    free(B.wm);
    free(B.code32);
    free(B.wx);
    free(B.wy);
    free(B.code);
    free(B.ones);
    free(B.row_has_cand);
    free(B.tile_row);
    free(B.notcv);
    free(B.near);
    free(B.cvv);
    free(B.cand);
    return status;
}

#endif
