"""Where a still's indexed lattice puts its spots: the predicted reflections of an orientation matrix.

The still-shot model (Ewald proximity, as DIALS's stills prediction and Sauter et al. 2014, Acta Cryst. D70,
3299, place reflections of a still): a reflection h, with rlp r = A h (A = UB, columns a*, b*, c* in dxtbx's
lab frame, 1/A), is in reflecting condition when r lies within a band of the Ewald sphere, its excitation error
e = |s0 + r| - 1/lambda small:

    |e| <= width + |r| * half_mosaicity

`width` (1/A) stands for what blurs the sphere for every reflection alike (bandpass, beam divergence, the
crystal's finite domains); `half_mosaicity` (radians) for the mosaic spread, which moves an rlp by |r| times an
angle. Defaults from the real thaumatin hits in ../shared (0.97 A, PILATUS 6M): 90% of the spots the indexer
indexed lie within |e| <= 0.0022 1/A at low and 0.0035 1/A at high resolution.

A predicted reflection is placed as the indexer places it (`intxr.reader.indexing.predict_xy`): r rotated onto
the sphere in the plane of s0 and r, keeping its resolution, then the ray s1 = s0 + r' meets a panel.

h is enumerated without a 3-D box: over the two shorter of the axes' index ranges (|h_i| <= d*_max |a_i|, with
d*_max at the detector's highest-resolution edge point), the third index is solved for: |s0 + r0 + l c*|^2 is
quadratic in l, so the l within the band are those between the roots for 1/lambda + e_max and outside those for
1/lambda - e_max, and within the resolution limit; a few per pair, all pairs at once (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intxr.geometry import Geometry, GeometryError
from intxr.reader.indexing import predict_xy

# The band, from the thaumatin hits (see the module's docstring).
WIDTH = 0.0020  # 1/A
HALF_MOSAICITY = 0.003  # radians (0.17 degrees)
MAX_PAIRS = 4_000_000  # index pairs enumerated: a cell of some 1000 A at 1.5 A; beyond it, nothing predicted
MAX_REFLECTIONS = 200_000
_CHUNK = 250_000  # index pairs per step (memory stays a few tens of MB)


@dataclass
class Predicted:
    """Reflections of one still: Miller indices, frame pixel (x, y), panel index, excitation error (1/A)."""

    miller: np.ndarray  # (n, 3) int
    xy: np.ndarray  # (n, 2) frame pixels (fast, slow)
    panel: np.ndarray  # (n,) int
    excitation_error: np.ndarray  # (n,) 1/A
    reason: str | None = None  # why nothing was predicted, when that is why

    @classmethod
    def none(cls, reason: str) -> Predicted:
        return cls(np.zeros((0, 3), np.int64), np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0), reason)


def detector_d_star_max(geometry: Geometry) -> float:
    """The largest 1/d (1/A) on the detector: over every panel's edge (a panel's highest resolution is on its
    edge; corners for a detector facing the beam, sampled edges in case of a tilted one)."""
    s0 = geometry.s0
    t = np.linspace(0.0, 1.0, 17)
    best = 0.0
    for p in geometry.panels:
        nx, ny = p.image_size
        x = np.concatenate([t * nx, t * nx, np.zeros_like(t), np.full_like(t, nx)])
        y = np.concatenate([np.zeros_like(t), np.full_like(t, ny), t * ny, t * ny])
        vx, vy, vz = p.lab(x, y, None)
        lab = np.stack([vx, vy, vz], axis=1)
        s1 = lab / (np.linalg.norm(lab, axis=1)[:, None] * geometry.wavelength)
        best = max(best, float(np.linalg.norm(s1 - s0[None, :], axis=1).max()))
    return best


def _between(lo_a, hi_a, lo_b, hi_b):
    """Integers in [max(lo), min(hi)] of two intervals: first integer and count."""
    first = np.ceil(np.maximum(lo_a, lo_b) - 1e-9)
    last = np.floor(np.minimum(hi_a, hi_b) + 1e-9)
    count = np.where(np.isfinite(first) & np.isfinite(last), np.maximum(last - first + 1, 0), 0)
    return np.nan_to_num(first), count.astype(np.int64)


def _roots(b, c, qc):
    """Roots of qc l^2 + 2 b l + c = 0 (NaN where none)."""
    disc = b * b - qc * c
    with np.errstate(invalid="ignore"):
        s = np.sqrt(disc)
    return (-b - s) / qc, (-b + s) / qc


def _candidates(a_mat: np.ndarray, s0: np.ndarray, d_star_max: float, e_max: float) -> np.ndarray:
    """Every h (n, 3) with |A h| <= d_star_max and | |s0 + A h| - |s0| | <= e_max (and a few more at the edges)."""
    direct = np.linalg.inv(a_mat)  # rows a, b, c: h_i = a_i . r
    n = np.floor(d_star_max * np.linalg.norm(direct, axis=1) + 1e-9).astype(np.int64)
    j = int(np.argmax(n))  # solved for: the longest axis has the most indices
    i1, i2 = (i for i in range(3) if i != j)
    if (2 * n[i1] + 1) * (2 * n[i2] + 1) > MAX_PAIRS:
        raise ValueError(f"cell too large to predict ({2 * n[i1] + 1} x {2 * n[i2] + 1} index pairs, more than "
                         f"{MAX_PAIRS})")
    k = float(np.linalg.norm(s0))
    c = a_mat[:, j]
    qc = float(c @ c)
    us = np.arange(-n[i1], n[i1] + 1)
    vs = np.arange(-n[i2], n[i2] + 1)
    rows_per_chunk = max(1, _CHUNK // len(vs))
    out = []
    for start in range(0, len(us), rows_per_chunk):
        u, v = (g.ravel() for g in np.meshgrid(us[start:start + rows_per_chunk], vs, indexing="ij"))
        r0 = np.outer(u, a_mat[:, i1]) + np.outer(v, a_mat[:, i2])
        p = r0 + s0[None, :]
        b, pp = p @ c, np.einsum("ij,ij->i", p, p)
        outer_lo, outer_hi = _roots(b, pp - (k + e_max) ** 2, qc)  # |s0 + r| <= k + e_max
        inner_lo, inner_hi = _roots(b, pp - max(k - e_max, 0.0) ** 2, qc)  # |s0 + r| >= k - e_max: outside
        res_lo, res_hi = _roots(r0 @ c, np.einsum("ij,ij->i", r0, r0) - d_star_max**2, qc)
        lo = np.maximum(outer_lo, res_lo)
        hi = np.minimum(outer_hi, res_hi)
        no_inner = ~np.isfinite(inner_lo)  # the pair's line misses the inner sphere: one segment
        inner_lo = np.where(no_inner, hi, inner_lo)
        inner_hi = np.where(no_inner, np.inf, inner_hi)
        for seg_lo, seg_hi in ((lo, inner_lo), (inner_hi, hi)):
            first, count = _between(seg_lo, seg_hi, -n[j], n[j])
            if not count.any():
                continue
            which = np.repeat(np.arange(len(u)), count)
            offset = np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count)
            hkl = np.empty((len(which), 3), np.int64)
            hkl[:, i1], hkl[:, i2] = u[which], v[which]
            hkl[:, j] = first[which].astype(np.int64) + offset
            out.append(hkl)
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def predict_spots(geometry: Geometry, orientation_matrix, *, d_min: float | None = None, width: float = WIDTH,
                  half_mosaicity: float = HALF_MOSAICITY) -> Predicted:
    """The reflections of a still whose lattice has orientation matrix A (3x3, rows as a result carries them:
    `orientation_matrix`), within the detector's resolution (or `d_min`, A, where that comes first) and the band of the
    Ewald sphere, placed on the panels. Nothing (with the reason) for a missing or unusable matrix or a geometry
    without what prediction needs; never raises for those."""
    if orientation_matrix is None:
        return Predicted.none("no orientation matrix (the frame is not indexed)")
    if not geometry.known:
        return Predicted.none(geometry.missing_error() or "the geometry lacks what prediction needs")
    try:
        a_mat = np.asarray(orientation_matrix, dtype=np.float64)
    except (TypeError, ValueError):
        return Predicted.none("the orientation matrix is not 3x3 numbers")
    if a_mat.shape != (3, 3) or not np.isfinite(a_mat).all():
        return Predicted.none("the orientation matrix is not 3x3 finite numbers")
    if not abs(np.linalg.det(a_mat)) > 1e-15:  # a cell of more than 10^15 A^3, or none
        return Predicted.none("the orientation matrix is singular")
    try:
        return _predict(geometry, a_mat, d_min, width, half_mosaicity)
    except (GeometryError, ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
        return Predicted.none(str(exc))


def _predict(geometry: Geometry, a_mat: np.ndarray, d_min: float | None, width: float,
             half_mosaicity: float) -> Predicted:
    s0 = geometry.s0
    d_star_max = detector_d_star_max(geometry)
    if d_min is not None and d_min > 0:
        d_star_max = min(d_star_max, 1.0 / d_min)
    e_max = width + d_star_max * half_mosaicity
    hkl = _candidates(a_mat, s0, d_star_max, e_max)
    hkl = hkl[np.abs(hkl).sum(axis=1) > 0]
    r = hkl @ a_mat.T
    q = np.linalg.norm(r, axis=1)
    e = np.linalg.norm(s0[None, :] + r, axis=1) - float(np.linalg.norm(s0))
    keep = (q <= d_star_max) & (np.abs(e) <= width + q * half_mosaicity)
    hkl, r, e = hkl[keep], r[keep], e[keep]
    if len(hkl) > MAX_REFLECTIONS:
        return Predicted.none(f"{len(hkl)} reflections in the band, more than {MAX_REFLECTIONS} (a cell too large)")
    xy = np.full((len(hkl), 2), np.nan)
    panel = np.full(len(hkl), -1, np.int64)
    for i, p in enumerate(geometry.panels):
        todo = np.flatnonzero(panel < 0)
        if not len(todo):
            break
        at = predict_xy(geometry, r[todo], np.full(len(todo), i))
        on = np.isfinite(at).all(axis=1)
        on[on] = p.contains(at[on, 0], at[on, 1])
        xy[todo[on]] = at[on]
        panel[todo[on]] = i
    hit = panel >= 0
    return Predicted(hkl[hit], xy[hit], panel[hit], e[hit])


__all__ = ["HALF_MOSAICITY", "WIDTH", "Predicted", "detector_d_star_max", "predict_spots"]
