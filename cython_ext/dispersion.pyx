# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""DIALS's dispersion spot-finding threshold and strong-pixel labelling, as nogil kernels.

The threshold runs in the C kernels of dispersion_simd.h (vectorised for scalar, SSE2, AVX2 and
AVX-512, chosen at run time from the CPU; sparse where the tests allow): `kernel()`, `set_kernel()`,
`available_kernels()`, and the environment variable INTXR_DISPERSION_KERNEL (scalar, sse2, avx2,
avx512; read at import; a path this CPU lacks falls back to the best it has) choose among them.
The Cython code below is the generic path, for parameters outside the C kernels' domain (windows
above 127 pixels, a negative trusted minimum).

The tests follow dials/algorithms/image/threshold/local.h (DispersionThreshold and
DispersionExtendedThreshold; see intxr/reader/threshold.py for the rules in words). Window sums are
kept as integer column sums over the window's rows, slid down the frame, and a running sum along
each row: no full-frame summed-area table. For integer pixels below 2^24 (all DIALS counts) the
sums are exact, so every test sees the same numbers DIALS's double-precision tables give, and the
test expressions are written in DIALS's order so the doubles round the same way. Frames are
integer counts (uint16, int32, uint32); intxr.reader.threshold routes other input elsewhere.

Python wrappers: intxr.reader.threshold (the numpy reference lives there too) and intxr.reader.spots.
"""
from libc.math cimport fabs, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memset

import os

import numpy as np

cdef extern from "dispersion_simd.h" nogil:
    ctypedef struct disp_indices:
        int64_t *data
        Py_ssize_t size
        Py_ssize_t capacity
    ctypedef struct disp_params:
        int ky, kx
        double sigma_b, sigma_s, threshold, gain
        int64_t min_count
        double lo, hi
        int extended
    int DISP_N_KERNELS, DISP_U16, DISP_I32, DISP_U32
    const char *disp_kernel_names[]
    int disp_kernel_supported(int kernel)
    int disp_best_kernel()
    int disp_strong_pixels(int kernel, int dtype, const void *image, const uint8_t *mask, Py_ssize_t h,
                           Py_ssize_t w, const disp_params *p, disp_indices *strong, disp_indices *overloaded)

cdef int _kernel = disp_best_kernel()


def available_kernels():
    """Names of the threshold kernel paths this CPU runs, slowest first."""
    return [disp_kernel_names[k].decode() for k in range(DISP_N_KERNELS) if disp_kernel_supported(k)]


def kernel():
    """The threshold kernel path in use."""
    return disp_kernel_names[_kernel].decode()


def set_kernel(name):
    """Use the named kernel path (scalar, sse2, avx2, avx512; ValueError when this CPU lacks it), or
    the best this CPU has for None."""
    global _kernel
    if name is None:
        _kernel = disp_best_kernel()
        return
    for k in range(DISP_N_KERNELS):
        if disp_kernel_names[k].decode() == name:
            if not disp_kernel_supported(k):
                raise ValueError(f"dispersion kernel {name!r}: this CPU does not run it ({available_kernels()})")
            _kernel = k
            return
    raise ValueError(f"dispersion kernel {name!r}: expected one of scalar, sse2, avx2, avx512")


def _kernel_from_environment():
    name = os.environ.get("INTXR_DISPERSION_KERNEL")
    if not name:
        return
    names = [disp_kernel_names[k].decode() for k in range(DISP_N_KERNELS)]
    if name not in names:
        raise ValueError(f"INTXR_DISPERSION_KERNEL={name!r}: expected one of {', '.join(names)}")
    wanted = names.index(name)
    set_kernel(next(names[k] for k in range(wanted, -1, -1) if disp_kernel_supported(k)))


_kernel_from_environment()

ctypedef fused pixel_t:
    uint16_t
    int32_t
    uint32_t

ctypedef fused value_t:  # labelling also takes gain-corrected (float64) frames
    uint16_t
    int32_t
    uint32_t
    double

cdef double BIG = 16777216.0  # 1 << 24: pixels at or above it are left out of window sums (DIALS)


ctypedef disp_indices Indices  # the C kernels' growable index list


cdef int _push(Indices *out, int64_t k) noexcept nogil:
    cdef int64_t *grown
    if out.size == out.capacity:
        out.capacity = out.capacity * 2 + 1024
        grown = <int64_t *>realloc(out.data, out.capacity * sizeof(int64_t))
        if grown == NULL:
            return -1
        out.data = grown
    out.data[out.size] = k
    out.size += 1
    return 0


# Per-pixel flag bits, one uint8 frame for every pass.
cdef enum:
    VALID = 1        # unmasked and inside the trusted range
    IN_SUMS = 2      # contributes to the first-pass window sums (VALID and < 2^24)
    CV = 4           # extended first pass: index of dispersion test passed (or masked)
    NEAR_FALSE = 8   # extended erosion scratch: a cv-false pixel within the radius along the row
    BACKGROUND = 16  # extended: usable background after erosion
    IN_SUMS2 = 32    # contributes to the final-pass window sums (BACKGROUND and < 2^24)


cdef inline void _update_columns(const pixel_t[:, ::1] image, const uint8_t[:, ::1] flags, uint8_t bit,
                                 Py_ssize_t row, int sign, int64_t *cm, int64_t *cx, int64_t *cy) noexcept nogil:
    # Column sums over the window's rows: add (sign +1) or remove (-1) one row, branch-free so the
    # compiler vectorises it. `cy` (sums of squares) is skipped when NULL. Integer sums are exact.
    cdef Py_ssize_t i, w = image.shape[1]
    cdef int64_t v, mv
    for i in range(w):
        mv = ((flags[row, i] & bit) != 0) * sign
        v = <int64_t>image[row, i] * mv
        cm[i] += mv
        cx[i] += v
    if cy != NULL:
        for i in range(w):
            mv = (flags[row, i] & bit) != 0
            v = <int64_t>image[row, i] * mv
            cy[i] += sign * v * v


cdef inline void _window_row(Py_ssize_t w, int kx, const int64_t *cm, const int64_t *cx, const int64_t *cy,
                             double *wm, double *wx, double *wy) noexcept nogil:
    # Clipped horizontal window sums: running integer sums along the row (one-cycle adds, so the
    # dependency chain is short). The column arrays are padded with kx + 1 zeros on each side.
    cdef Py_ssize_t i
    cdef int64_t m = 0, x = 0, y = 0
    for i in range(-kx - 1, kx):
        m += cm[i]
        x += cx[i]
    for i in range(w):
        m += cm[i + kx] - cm[i - kx - 1]
        x += cx[i + kx] - cx[i - kx - 1]
        wm[i] = <double>m
        wx[i] = <double>x
    if cy != NULL:
        for i in range(-kx - 1, kx):
            y += cy[i]
        for i in range(w):
            y += cy[i + kx] - cy[i - kx - 1]
            wy[i] = <double>y


cdef double _window_squares(const pixel_t[:, ::1] image, const uint8_t[:, ::1] flags, uint8_t bit,
                            Py_ssize_t j, Py_ssize_t i, int ky, int kx) noexcept nogil:
    # Sum of squares over one clipped window, for the rare candidate pixels (exact for counts).
    cdef Py_ssize_t jj, ii
    cdef double v, total = 0
    for jj in range(max(0, j - ky), min(image.shape[0], j + ky + 1)):
        for ii in range(max(0, i - kx), min(image.shape[1], i + kx + 1)):
            if flags[jj, ii] & bit:
                v = <double>image[jj, ii]
                total += v * v
    return total


cdef int _slide(const pixel_t[:, ::1] image, uint8_t[:, ::1] flags, uint8_t bit, int ky, int kx, int mode,
                double nsig_b, double nsig_s, int64_t min_count, double threshold, double gain,
                Indices *strong) noexcept nogil:
    """Slide a clipped (2ky+1) x (2kx+1) window over the frame, summing the pixels flagged `bit`, and
    apply one test per pixel. mode 0: `dispersion` strong test -> strong indices; mode 1: extended
    first pass -> CV flags; mode 2: extended final test -> strong indices.

    Per row: column sums are updated, window sums formed, and a necessary condition evaluated for
    every pixel in straight-line loops the compiler vectorises; only the rare candidates get the
    exact DIALS test (mode 0: b > 0 and b^2 >= (a little less than) d^2 as one comparison, then the
    sum of squares; mode 2: v > mean). sqrt(2 (m-1)) comes from a table of the same values."""
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1], j, i, n_window = (2 * ky + 1) * (2 * kx + 1)
    cdef Py_ssize_t padded = w + 2 * kx + 2
    cdef bint need_y = mode == 1
    cdef int64_t *cm_buf = <int64_t *>calloc(padded, sizeof(int64_t))
    cdef int64_t *cx_buf = <int64_t *>calloc(padded, sizeof(int64_t))
    cdef int64_t *cy_buf = <int64_t *>calloc(padded, sizeof(int64_t)) if need_y else NULL
    cdef double *wm = <double *>malloc(w * sizeof(double))
    cdef double *wx = <double *>malloc(w * sizeof(double))
    cdef double *wy = <double *>malloc(w * sizeof(double)) if need_y else NULL
    cdef double *vrow = <double *>malloc(w * sizeof(double))
    cdef double *excess = <double *>malloc(w * sizeof(double))
    cdef uint8_t *cand = <uint8_t *>malloc(w + 8)
    cdef double *root = <double *>malloc((n_window + 1) * sizeof(double))  # sqrt(2 (m - 1))
    cdef int64_t *cm = cm_buf + kx + 1
    cdef int64_t *cx = cx_buf + kx + 1
    cdef int64_t *cy = cy_buf + kx + 1 if need_y else NULL
    cdef int64_t m
    cdef double sx, sy, v, a, b, c, d, mean, loose = 0.999999 * nsig_s * nsig_s * (gain if gain > 0 else 1.0)
    cdef uint8_t f
    cdef bint candidate
    cdef int status = 0
    if (cm_buf == NULL or cx_buf == NULL or wm == NULL or wx == NULL or vrow == NULL or cand == NULL or excess == NULL
            or root == NULL or (need_y and (cy_buf == NULL or wy == NULL))):
        status = -1
    else:
        root[0] = 0.0
        for m in range(1, n_window + 1):
            root[m] = sqrt(2.0 * (<double>m - 1))
        for j in range(min(ky, h)):
            _update_columns(image, flags, bit, j, 1, cm, cx, cy)
    for j in range(h if status == 0 else 0):
        if j + ky < h:
            _update_columns(image, flags, bit, j + ky, 1, cm, cx, cy)
        if j - ky - 1 >= 0:
            _update_columns(image, flags, bit, j - ky - 1, -1, cm, cx, cy)
        _window_row(w, kx, cm, cx, cy, wm, wx, wy)
        if mode == 0:
            # Candidates: valid pixels (others get v = -1, so b < 0) with b > 0 and b^2 >= ~d^2.
            for i in range(w):
                vrow[i] = <double>image[j, i] if flags[j, i] & VALID else -1.0
            for i in range(w):  # straight-line doubles: vectorised
                b = wm[i] * vrow[i] - wx[i]
                excess[i] = b * fabs(b) - loose * wx[i] * wm[i]
            for i in range(w):
                if excess[i] < 0:  # almost every pixel: a well-predicted branch
                    continue
                # The exact DIALS test: mask && m >= min_count && x >= 0 && v > threshold, a > c && b > d.
                m = <int64_t>wm[i]
                sx = wx[i]
                v = vrow[i]
                if not (v >= 0 and m >= min_count and sx >= 0 and v > threshold):
                    continue
                b = <double>m * v - sx
                sy = _window_squares(image, flags, bit, j, i, ky, kx)
                if gain > 0:
                    a = <double>m * sy - sx * sx
                    c = gain * sx * ((<double>m - 1) + nsig_b * root[m])
                    d = nsig_s * sqrt(gain * sx * <double>m)
                else:
                    a = <double>m * sy - sx * sx - sx * (<double>m - 1)
                    c = sx * nsig_b * root[m]
                    d = nsig_s * sqrt(sx * <double>m)
                if a > c and b > d:
                    if _push(strong, j * w + i) < 0:
                        status = -1
                        break
        elif mode == 1:
            # First pass of dispersion_extended: the index-of-dispersion test alone, masked pixels
            # count as passing.
            for i in range(w):
                m = <int64_t>wm[i]
                sx = wx[i]
                if gain > 0:
                    a = <double>m * wy[i] - sx * sx
                    c = gain * sx * ((<double>m - 1) + nsig_b * root[m])
                else:
                    a = <double>m * wy[i] - sx * sx - sx * (<double>m - 1)
                    c = sx * nsig_b * root[m]
                cand[i] = (a > c) & (m >= min_count) & (sx >= 0)
            for i in range(w):
                f = flags[j, i]
                if not (f & VALID) or cand[i]:
                    flags[j, i] = f | CV
        else:
            # Final pass: inside the eroded dispersion region (not background), above the global
            # threshold, and v >= mean + nsig_s * sqrt(g mean) over the wider window's background.
            for i in range(w):
                f = flags[j, i]
                vrow[i] = <double>image[j, i] if (f & VALID) and not (f & BACKGROUND) else -1.0
            for i in range(w):
                excess[i] = vrow[i] * wm[i] - wx[i]  # v > mean is necessary when m >= 2
            for i in range(w):
                if excess[i] <= 0 and not (wm[i] < 2 and vrow[i] >= 0):
                    continue
                m = <int64_t>wm[i]
                v = vrow[i]
                sx = wx[i]
                if not (v >= 0 and sx >= 0 and v > threshold):
                    continue
                mean = sx / <double>m if m >= 2 else 0.0
                if gain > 0:
                    candidate = v >= mean + nsig_s * sqrt(gain * mean)
                else:
                    candidate = v >= mean + nsig_s * sqrt(mean)
                if candidate:
                    if _push(strong, j * w + i) < 0:
                        status = -1
                        break
        if status != 0:
            break
    free(cm_buf); free(cx_buf); free(cy_buf); free(wm); free(wx); free(wy); free(vrow); free(cand); free(excess); free(root)
    return status


cdef int _erode(const pixel_t[:, ::1] image, uint8_t[:, ::1] flags, int radius) noexcept nogil:
    """BACKGROUND = VALID && !(CV && every pixel within Chebyshev `radius`, clipped at the edges, is CV).

    DIALS keeps cv pixels whose chessboard distance to the nearest cv-false pixel is at least the
    erosion distance; an exact two-pass chamfer makes that this box test with radius = distance - 1.
    Also sets IN_SUMS2 for the final pass's window sums."""
    cdef Py_ssize_t h = flags.shape[0], w = flags.shape[1], j, i
    cdef int32_t *near = <int32_t *>malloc(w * sizeof(int32_t))
    cdef int32_t run
    cdef uint8_t f
    if near == NULL:
        return -1
    for j in range(h):  # rows: NEAR_FALSE where a cv-false pixel lies within radius along the row
        run = 0
        for i in range(min(radius, w)):
            run += (flags[j, i] & CV) == 0
        for i in range(w):
            if i + radius < w:
                run += (flags[j, i + radius] & CV) == 0
            if i - radius - 1 >= 0:
                run -= (flags[j, i - radius - 1] & CV) == 0
            if run > 0:
                flags[j, i] |= NEAR_FALSE
    memset(near, 0, w * sizeof(int32_t))  # columns: NEAR_FALSE rows within radius
    for j in range(min(radius, h)):
        for i in range(w):
            near[i] += (flags[j, i] & NEAR_FALSE) != 0
    for j in range(h):
        if j + radius < h:
            for i in range(w):
                near[i] += (flags[j + radius, i] & NEAR_FALSE) != 0
        if j - radius - 1 >= 0:
            for i in range(w):
                near[i] -= (flags[j - radius - 1, i] & NEAR_FALSE) != 0
        for i in range(w):
            f = flags[j, i]
            if (f & VALID) and not ((f & CV) and near[i] == 0):
                f |= BACKGROUND
                if <double>image[j, i] < BIG:
                    f |= IN_SUMS2
                flags[j, i] = f
    free(near)
    return 0


cdef int _flag_valid(const pixel_t[:, ::1] image, const uint8_t[:, ::1] mask, bint has_mask, double lo,
                     double hi, uint8_t[:, ::1] flags, Indices *overloaded) noexcept nogil:
    # VALID / IN_SUMS flags; unmasked pixels above the trusted range are collected as overloads.
    cdef Py_ssize_t j, i, w = image.shape[1]
    cdef double v
    cdef bint use
    for j in range(image.shape[0]):
        for i in range(w):
            v = <double>image[j, i]
            use = mask[j, i] != 0 if has_mask else True
            if use and lo <= v and v <= hi:
                flags[j, i] = VALID | IN_SUMS if v < BIG else VALID
            else:
                flags[j, i] = 0
                if use and v > hi:
                    if _push(overloaded, j * w + i) < 0:
                        return -1
    return 0


cdef int _threshold(const pixel_t[:, ::1] image, uint8_t[:, ::1] flags, int kernel_y, int kernel_x,
                    double sigma_background, double sigma_strong, int min_count, double global_threshold,
                    double gain, bint extended, Indices *strong) noexcept nogil:
    cdef int status
    if not extended:
        return _slide(image, flags, IN_SUMS, kernel_y, kernel_x, 0, sigma_background, sigma_strong,
                      min_count, global_threshold, gain, strong)
    status = _slide(image, flags, IN_SUMS, kernel_y, kernel_x, 1, sigma_background, sigma_strong,
                    min_count, global_threshold, gain, strong)
    if status == 0:
        status = _erode(image, flags, min(kernel_x, kernel_y) - 1)
    if status == 0:
        status = _slide(image, flags, IN_SUMS2, kernel_y + 2, kernel_x + 2, 2, sigma_background,
                        sigma_strong, min_count, global_threshold, gain, strong)
    return status


def strong_pixels(const pixel_t[:, ::1] image not None, const uint8_t[:, ::1] mask, double trusted_min,
                  double trusted_max, int kernel_y, int kernel_x, double sigma_background, double sigma_strong,
                  int min_count, double global_threshold, double gain, bint extended):
    """(strong, overloaded): raster indices (int64) of the strong pixels and of the unmasked pixels above
    the trusted range. `mask` None: every pixel may be used. `gain` <= 0 means no gain (DIALS's plain
    expressions). The caller has validated the arguments (intxr.reader.threshold.find_strong_pixels)."""
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1]
    cdef Indices strong, overloaded
    cdef int status = 0
    cdef bint has_mask = mask is not None
    cdef disp_params p
    cdef disp_indices fast_strong, fast_over
    cdef int dtype = DISP_U16 if pixel_t is uint16_t else (DISP_I32 if pixel_t is int32_t else DISP_U32)
    cdef const uint8_t *mask_ptr = &mask[0, 0] if has_mask and h > 0 and w > 0 else NULL
    if h > 0 and w > 0:
        p.ky = kernel_y
        p.kx = kernel_x
        p.sigma_b = sigma_background
        p.sigma_s = sigma_strong
        p.threshold = global_threshold
        p.gain = gain
        p.min_count = min_count
        p.lo = trusted_min
        p.hi = trusted_max
        p.extended = extended
        fast_strong.size = fast_strong.capacity = fast_over.size = fast_over.capacity = 0
        fast_strong.data = fast_over.data = NULL
        with nogil:
            status = disp_strong_pixels(_kernel, dtype, &image[0, 0], mask_ptr, h, w, &p, &fast_strong, &fast_over)
        try:
            if status == -1:
                raise MemoryError("out of memory in the dispersion threshold")
            if status == 0:
                return _to_array(&fast_strong), _to_array(&fast_over)
        finally:
            free(fast_strong.data)
            free(fast_over.data)
    status = 0
    flags_array = np.empty((h, w), dtype=np.uint8)
    cdef uint8_t[:, ::1] flags = flags_array
    strong.size = 0
    strong.capacity = 4096
    strong.data = <int64_t *>malloc(strong.capacity * sizeof(int64_t))
    overloaded.size = 0
    overloaded.capacity = 256
    overloaded.data = <int64_t *>malloc(overloaded.capacity * sizeof(int64_t))
    if strong.data == NULL or overloaded.data == NULL:
        free(strong.data)
        free(overloaded.data)
        raise MemoryError()
    with nogil:
        status = _flag_valid(image, mask, has_mask, trusted_min, trusted_max, flags, &overloaded)
        if status == 0:
            status = _threshold(image, flags, kernel_y, kernel_x, sigma_background, sigma_strong, min_count,
                                global_threshold, gain, extended, &strong)
    try:
        if status != 0:
            raise MemoryError("out of memory in the dispersion threshold")
        return _to_array(&strong), _to_array(&overloaded)
    finally:
        free(strong.data)
        free(overloaded.data)


cdef object _to_array(Indices *indices):
    result = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        result[:] = <int64_t[:indices.size]>indices.data
    return result


def label_spots(const int64_t[::1] strong not None, const value_t[:, ::1] image not None):
    """4-connected components of the strong pixels (raster-ordered indices), numbered in the order of
    each component's first pixel, as DIALS's 2-D pixel-list labeller numbers them. Returns a dict of
    per-spot arrays: npix, intensity (float32 sum of raw values, raster order), x, y (count-weighted
    centroid at pixel centres), bbox (x0, x1, y0, y1; half-open), peak_x, peak_y (first maximum)."""
    cdef Py_ssize_t n = strong.shape[0], w = image.shape[1]
    cdef Py_ssize_t k, r, nruns = 0, p, prev_start = 0, prev_end = 0, cur_start = 0, row, col
    cdef int64_t idx
    run_start_array = np.empty(n + 1, dtype=np.int64)
    run_row_array = np.empty(n + 1, dtype=np.int64)
    run_c0_array = np.empty(n + 1, dtype=np.int64)
    run_c1_array = np.empty(n + 1, dtype=np.int64)
    parent_array = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] run_start = run_start_array, run_row = run_row_array, run_c0 = run_c0_array
    cdef int64_t[::1] run_c1 = run_c1_array, parent = parent_array
    cdef int64_t a, b, t

    with nogil:
        # Runs of consecutive strong pixels within a row.
        for k in range(n):
            idx = strong[k]
            row = idx // w
            col = idx - row * w
            if nruns > 0 and run_row[nruns - 1] == row and run_c1[nruns - 1] == col:
                run_c1[nruns - 1] = col + 1
            else:
                run_start[nruns] = k
                run_row[nruns] = row
                run_c0[nruns] = col
                run_c1[nruns] = col + 1
                parent[nruns] = nruns
                nruns += 1
        run_start[nruns] = n
        # Join runs that share a column with a run in the row above (4-connectivity).
        for r in range(nruns):
            if r == 0 or run_row[r] != run_row[r - 1]:
                if r > 0 and run_row[r - 1] == run_row[r] - 1:
                    prev_start = cur_start
                    prev_end = r
                else:
                    prev_start = r
                    prev_end = r
                cur_start = r
            p = prev_start
            while p < prev_end:
                if run_c0[p] < run_c1[r] and run_c0[r] < run_c1[p]:
                    a = r
                    while parent[a] != a:
                        parent[a] = parent[parent[a]]
                        a = parent[a]
                    b = p
                    while parent[b] != b:
                        parent[b] = parent[parent[b]]
                        b = parent[b]
                    if a != b:
                        if a < b:
                            t = a
                            a = b
                            b = t
                        parent[a] = b  # the earlier run stays the root
                p += 1
        for r in range(nruns):
            a = r
            while parent[a] != a:
                a = parent[a]
            parent[r] = a

    # Number components by their first run (= first pixel in raster order).
    label_of_root = np.full(nruns + 1, -1, dtype=np.int64)
    cdef int64_t[::1] label_of = label_of_root
    cdef int64_t nspots = 0
    for r in range(nruns):
        if label_of[parent[r]] < 0:
            label_of[parent[r]] = nspots
            nspots += 1
    npix_a = np.zeros(nspots, dtype=np.int64)
    sum_a = np.zeros(nspots, dtype=np.float32)
    cx_a = np.zeros(nspots, dtype=np.float64)
    cy_a = np.zeros(nspots, dtype=np.float64)
    bbox_a = np.empty((nspots, 4), dtype=np.int64)
    peak_v_a = np.full(nspots, -np.inf, dtype=np.float32)
    peak_a = np.zeros((nspots, 2), dtype=np.int64)
    cdef int64_t[::1] npix = npix_a
    cdef float[::1] ssum = sum_a
    cdef float[::1] peak_v = peak_v_a
    cdef double[::1] cxs = cx_a, cys = cy_a
    cdef int64_t[:, ::1] bbox = bbox_a, peak = peak_a
    cdef int64_t lab
    cdef float v
    with nogil:
        for lab in range(nspots):
            bbox[lab, 0] = w
            bbox[lab, 1] = -1
            bbox[lab, 2] = image.shape[0]
            bbox[lab, 3] = -1
        for r in range(nruns):
            lab = label_of[parent[r]]
            row = run_row[r]
            for k in range(run_start[r], run_start[r + 1]):
                col = strong[k] - row * w
                v = <float>image[row, col]  # DIALS stores shoebox data as float
                npix[lab] += 1
                ssum[lab] += v
                cxs[lab] += <double>v * (col + 0.5)
                cys[lab] += <double>v * (row + 0.5)
                if v > peak_v[lab]:  # strict: the first maximum in raster order
                    peak_v[lab] = v
                    peak[lab, 0] = col
                    peak[lab, 1] = row
                if col < bbox[lab, 0]:
                    bbox[lab, 0] = col
                if col + 1 > bbox[lab, 1]:
                    bbox[lab, 1] = col + 1
                if row < bbox[lab, 2]:
                    bbox[lab, 2] = row
                if row + 1 > bbox[lab, 3]:
                    bbox[lab, 3] = row + 1
    intensity = sum_a.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(intensity > 0, cx_a / intensity, (bbox_a[:, 0] + bbox_a[:, 1]) / 2.0)
        y = np.where(intensity > 0, cy_a / intensity, (bbox_a[:, 2] + bbox_a[:, 3]) / 2.0)
    return {
        "npix": npix_a, "intensity": intensity, "x": x, "y": y, "bbox": bbox_a,
        "peak_x": peak_a[:, 0] + 0.5, "peak_y": peak_a[:, 1] + 0.5,
    }
