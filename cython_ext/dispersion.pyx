# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""DIALS's dispersion spot-finding threshold and strong-pixel labelling, as nogil kernels.

The tests follow dials/algorithms/image/threshold/local.h (DispersionThreshold and
DispersionExtendedThreshold; see intxr/reader/threshold.py for the rules in words). Window sums are
kept as integer column sums over the window's rows, slid down the frame, and a running sum along
each row: no full-frame summed-area table. For integer pixels below 2^24 (all DIALS counts) the
sums are exact, so every test sees the same numbers DIALS's double-precision tables give, and the
test expressions are written in DIALS's order so the doubles round the same way. (Non-integer
float64 frames are summed in a different order than DIALS's table, so they agree only to rounding.)

Python wrappers: intxr.reader.threshold (the numpy reference lives there too) and intxr.reader.spots.
"""
from libc.math cimport fabs, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memset

import numpy as np

ctypedef fused pixel_t:
    uint16_t
    int32_t
    uint32_t
    double

cdef double BIG = 16777216.0  # 1 << 24: pixels at or above it are left out of window sums (DIALS)


# Window-sum accumulators: exact int64 for integer frames (1-cycle adds keep the running sums fast),
# double for float64 frames.
ctypedef fused acc_t:
    int64_t
    double


cdef struct Indices:
    int64_t *data
    Py_ssize_t size
    Py_ssize_t capacity


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
                                 Py_ssize_t add, Py_ssize_t sub, acc_t *cm, acc_t *cx, acc_t *cy) noexcept nogil:
    # Column sums over the window's rows: add row `add`, remove row `sub` (-1: none), branch-free.
    # `cy` (sums of squares) is skipped when NULL.
    cdef Py_ssize_t i, w = image.shape[1]
    cdef acc_t v, mv
    if add >= 0:
        for i in range(w):
            mv = (flags[add, i] & bit) != 0
            v = (<acc_t>image[add, i]) * mv
            cm[i] += mv
            cx[i] += v
            if cy != NULL:
                cy[i] += v * v
    if sub >= 0:
        for i in range(w):
            mv = (flags[sub, i] & bit) != 0
            v = (<acc_t>image[sub, i]) * mv
            cm[i] -= mv
            cx[i] -= v
            if cy != NULL:
                cy[i] -= v * v


cdef inline void _window_row(Py_ssize_t w, int kx, const acc_t *cm, const acc_t *cx, const acc_t *cy,
                             acc_t *pm, acc_t *px, acc_t *py, acc_t *wm, acc_t *wx, acc_t *wy) noexcept nogil:
    # Sums over the clipped horizontal window: prefix sums of the column sums (short dependency
    # chains), then differences (independent, vectorisable).
    cdef Py_ssize_t i, lo, hi
    pm[0] = 0
    px[0] = 0
    for i in range(w):
        pm[i + 1] = pm[i] + cm[i]
        px[i + 1] = px[i] + cx[i]
    if cy != NULL:
        py[0] = 0
        for i in range(w):
            py[i + 1] = py[i] + cy[i]
    for i in range(w):
        hi = i + kx + 1 if i + kx + 1 < w else w
        lo = i - kx if i - kx > 0 else 0
        wm[i] = pm[hi] - pm[lo]
        wx[i] = px[hi] - px[lo]
        if cy != NULL:
            wy[i] = py[hi] - py[lo]


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
                Indices *strong, acc_t zero) noexcept nogil:
    """Slide a clipped (2ky+1) x (2kx+1) window over the frame, summing the pixels flagged `bit`, and
    apply one test per pixel. mode 0: `dispersion` strong test -> strong indices; mode 1: extended
    first pass -> CV flags; mode 2: extended final test -> strong indices. `zero` picks the
    accumulator type.

    Work per pixel is kept small: window sums come from column sums and prefix sums along the row;
    modes 0 and 2 first apply a necessary condition on (m, x) alone (b > 0 and b^2 >= (a little less
    than) d^2, as one comparison; or v > mean) and only the rare candidates get the sum of squares
    and the exact DIALS test; sqrt(2 (m-1)) comes from a table (the same correctly rounded values)."""
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1], j, i, n_window = (2 * ky + 1) * (2 * kx + 1)
    cdef bint need_y = mode == 1
    cdef acc_t *buf = <acc_t *>calloc(9 * (w + 1), sizeof(acc_t))
    cdef acc_t *cm = buf
    cdef acc_t *cx = buf + (w + 1)
    cdef acc_t *cy = buf + 2 * (w + 1) if need_y else NULL
    cdef acc_t *pm = buf + 3 * (w + 1)
    cdef acc_t *px = buf + 4 * (w + 1)
    cdef acc_t *py = buf + 5 * (w + 1)
    cdef acc_t *wm = buf + 6 * (w + 1)
    cdef acc_t *wx = buf + 7 * (w + 1)
    cdef acc_t *wy = buf + 8 * (w + 1)
    cdef double *root = <double *>malloc((n_window + 1) * sizeof(double))  # sqrt(2 (m - 1))
    cdef int64_t m
    cdef double sx, sy, v, a, b, c, d, mean, loose = 0.999999 * nsig_s * nsig_s * (gain if gain > 0 else 1.0)
    cdef uint8_t f
    cdef bint candidate
    cdef int status = 0
    if buf == NULL or root == NULL:
        status = -1
    else:
        root[0] = 0.0
        for m in range(1, n_window + 1):
            root[m] = sqrt(2.0 * (<double>m - 1))
        for j in range(min(ky, h)):
            _update_columns(image, flags, bit, j, -1, cm, cx, cy)
    for j in range(h if status == 0 else 0):
        _update_columns(image, flags, bit, j + ky if j + ky < h else -1, j - ky - 1 if j - ky - 1 >= 0 else -1,
                        cm, cx, cy)
        _window_row(w, kx, cm, cx, cy, pm, px, py, wm, wx, wy)
        if mode == 0:
            for i in range(w):
                # DIALS: mask && m >= min_count && x >= 0 && v > threshold, then a > c && b > d.
                m = <int64_t>wm[i]
                sx = <double>wx[i]
                v = <double>image[j, i]
                b = <double>m * v - sx
                candidate = ((flags[j, i] & VALID) != 0) & (m >= min_count) & (sx >= 0) & (v > threshold) & \
                    (b * fabs(b) >= loose * sx * <double>m)
                if not candidate or not b > 0:
                    continue
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
            for i in range(w):
                # First pass of dispersion_extended: masked pixels count as non-background.
                f = flags[j, i]
                m = <int64_t>wm[i]
                sx = <double>wx[i]
                sy = <double>wy[i]
                if not (f & VALID):
                    flags[j, i] = f | CV
                elif m >= min_count and sx >= 0:
                    if gain > 0:
                        a = <double>m * sy - sx * sx
                        c = gain * sx * ((<double>m - 1) + nsig_b * root[m])
                    else:
                        a = <double>m * sy - sx * sx - sx * (<double>m - 1)
                        c = sx * nsig_b * root[m]
                    if a > c:
                        flags[j, i] = f | CV
        else:
            for i in range(w):
                # Final pass: inside the eroded dispersion region (not background), above the global
                # threshold, and v >= mean + nsig_s * sqrt(g mean) over the wider window's background.
                f = flags[j, i]
                m = <int64_t>wm[i]
                sx = <double>wx[i]
                v = <double>image[j, i]
                candidate = ((f & VALID) != 0) & ((f & BACKGROUND) == 0) & (sx >= 0) & (v > threshold)
                if not candidate:
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
    free(buf)
    free(root)
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


cdef int _flag_valid(const pixel_t[:, ::1] image, const uint8_t[:, ::1] mask, double lo, double hi,
                     uint8_t[:, ::1] flags, Indices *overloaded) noexcept nogil:
    # VALID / IN_SUMS flags; unmasked pixels above the trusted range are collected as overloads.
    cdef Py_ssize_t j, i, w = image.shape[1]
    cdef double v
    for j in range(image.shape[0]):
        for i in range(w):
            v = <double>image[j, i]
            if mask[j, i] and lo <= v and v <= hi:
                flags[j, i] = VALID | IN_SUMS if v < BIG else VALID
            else:
                flags[j, i] = 0
                if mask[j, i] and v > hi:
                    if _push(overloaded, j * w + i) < 0:
                        return -1
    return 0


cdef int _threshold(const pixel_t[:, ::1] image, uint8_t[:, ::1] flags, int kernel_y, int kernel_x,
                    double sigma_background, double sigma_strong, int min_count, double global_threshold,
                    double gain, bint extended, Indices *strong, acc_t zero) noexcept nogil:
    cdef int status
    if not extended:
        return _slide(image, flags, IN_SUMS, kernel_y, kernel_x, 0, sigma_background, sigma_strong,
                      min_count, global_threshold, gain, strong, zero)
    status = _slide(image, flags, IN_SUMS, kernel_y, kernel_x, 1, sigma_background, sigma_strong,
                    min_count, global_threshold, gain, strong, zero)
    if status == 0:
        status = _erode(image, flags, min(kernel_x, kernel_y) - 1)
    if status == 0:
        status = _slide(image, flags, IN_SUMS2, kernel_y + 2, kernel_x + 2, 2, sigma_background,
                        sigma_strong, min_count, global_threshold, gain, strong, zero)
    return status


def strong_pixels(const pixel_t[:, ::1] image not None, const uint8_t[:, ::1] mask not None, double trusted_min,
                  double trusted_max, int kernel_y, int kernel_x, double sigma_background, double sigma_strong,
                  int min_count, double global_threshold, double gain, bint extended):
    """(strong, overloaded): raster indices (int64) of the strong pixels and of the unmasked pixels above
    the trusted range. `gain` <= 0 means no gain (DIALS's plain expressions). The caller has
    validated the arguments (intxr.reader.threshold.find_strong_pixels)."""
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1]
    flags_array = np.empty((h, w), dtype=np.uint8)
    cdef uint8_t[:, ::1] flags = flags_array
    cdef Indices strong, overloaded
    cdef int status = 0
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
        status = _flag_valid(image, mask, trusted_min, trusted_max, flags, &overloaded)
        if status == 0:
            if pixel_t is double:
                status = _threshold(image, flags, kernel_y, kernel_x, sigma_background, sigma_strong, min_count,
                                    global_threshold, gain, extended, &strong, <double>0)
            else:
                status = _threshold(image, flags, kernel_y, kernel_x, sigma_background, sigma_strong, min_count,
                                    global_threshold, gain, extended, &strong, <int64_t>0)
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


def label_spots(const int64_t[::1] strong not None, const pixel_t[:, ::1] image not None):
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
