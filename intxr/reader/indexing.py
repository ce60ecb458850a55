"""Native stills indexing: spots of one frame + the series' geometry -> lattice, space group, unit cell.

Reciprocal-lattice points (rlps) are mapped as DIALS maps centroids for stills: frame pixel -> lab point
(`intxr.geometry.lab_coordinates`, parallax included) -> s1 = unit * 1/lambda -> r = s1 - s0 (1/A, dxtbx's
lab frame).

Known-cell search, the idea of DIALS's `real_space_grid_search`: a direct-lattice vector t of the target
length L, pointing along a true lattice direction, has near-integer projections r . t on every rlp. Directions
are sampled on a hemisphere (a Fibonacci grid of about 2 pi / delta^2 points for an angular step delta) and
scored with sum_i cos(2 pi r_i . t) over the low-resolution rlps (|r| small enough that an angular error of
delta moves a projection by less than ~0.3). Two found directions whose angle matches the target's give two
basis vectors; the third follows from the target's angles (its components along a, b and a x b), which also
fixes the handedness. Each candidate basis indexes the rlps shell by shell (low resolution first, so a cell a
few % off still indexes), the reciprocal matrix A = UB is refitted by linear least squares after each shell
(r = A h), and the best candidate by number indexed is kept. Positional RMSD: each indexed spot's predicted
ray s0 + A h meets the spot's panel; the distance to the observed centroid in pixels (stills: no rotation).

Success needs a clear margin: enough indexed spots, an indexed fraction, an RMSD in pixels, and the refined
cell within a tolerance of the target; anything else is reported not indexed, with the reason.

Lattice and space group come from the target space group (gemmi): its crystal system and centring give the
Bravais lattice (aP ... cI), reported with the lattice's lowest-symmetry space group as the original Interceptor
reports it (P1, P2, C2, P222, ..., P4, I4, P3, R3, P23, F23, I23); the refined cell is symmetrised by averaging
the metric tensor over the group's rotations (G' = mean R^T G R), after checking that the unconstrained cell is
within the tolerance of the symmetric one (a metric that does not fit the lattice is not indexed).

Without a target cell, `intxr.reader.ab_initio` finds one (an fft1d-style search, Niggli reduction, metric
symmetry; primitive lattices only so far) and hands it to the same search and checks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from intxr.geometry import Geometry, GeometryError, lab_coordinates, panel_of

try:
    from intxr._kernels.latticescore import lattice_score as _lattice_score_kernel
except ImportError:  # an install without the kernels: the numpy reference (same score, 3-5x slower)
    _lattice_score_kernel = None

# The lowest-symmetry space group of each Bravais lattice, as the original Interceptor (DIALS's
# refine_bravais_settings) reports the chosen lattice.
LOWEST_SPACE_GROUP = {
    "aP": "P1", "mP": "P2", "mC": "C2", "oP": "P222", "oC": "C222", "oF": "F222", "oI": "I222",
    "tP": "P4", "tI": "I4", "hP": "P3", "hR": "R3", "cP": "P23", "cF": "F23", "cI": "I23",
}
_SYSTEM_LETTER = {"triclinic": "a", "monoclinic": "m", "orthorhombic": "o", "tetragonal": "t",
                  "trigonal": "h", "hexagonal": "h", "cubic": "c"}


@dataclass(frozen=True)
class IndexingParams:
    target_unit_cell: tuple[float, ...] | None = None  # a, b, c, alpha, beta, gamma (A, degrees)
    target_space_group: str | None = None
    # auto: real_space_grid_search with a target cell, else fft1d; fft1d: ab initio even with a target (which the
    # cell found must then match); real_space_grid_search: the known-cell search only (needs a target).
    method: str = "auto"
    min_spots: int = 10  # fewer spots than this: not tried
    max_spots: int = 2500  # more: the lowest-resolution ones are used (latency)
    min_indexed: int = 10  # fewer indexed spots: not indexed
    min_indexed_fraction: float = 0.25  # of the spots given
    max_rmsd_px: float = 4.0  # as DIALS stills indexing was run for the reference (indexing.stills.rmsd_min_px=4)
    hkl_tolerance: float = 0.3  # DIALS's indexing.index_assignment.simple.hkl_tolerance
    cell_length_tolerance: float = 0.10  # relative, refined vs target
    cell_angle_tolerance: float = 5.0  # degrees, refined vs target
    symmetry_length_tolerance: float = 0.03  # unconstrained cell vs its symmetrised self
    symmetry_angle_tolerance: float = 3.0
    outlier_min_px: float = 2.0  # positional outliers: beyond max(this, outlier_medians x the median distance)
    outlier_medians: float = 2.5
    angular_step: float = 0.03  # rad (DIALS real_space_grid_search's grid is 0.02); peaks refined locally
    n_peaks: int = 20  # candidate directions kept per length
    n_shortlisted: int = 12  # candidate bases (by a quick low-resolution score) indexed shell by shell
    n_refined: int = 10  # candidate bases refined against the positions
    max_search_spots: int = 200  # rlps scored on the coarse direction grid
    chance_trials: int = 8  # random orientations for the chance level of the indexed fraction
    min_over_chance: float = 2.0  # indexed fraction / chance fraction needed
    refine_fraction: float = 0.6  # candidates indexing fewer than this x the best (before refinement) are dropped
    # Crystals in the beam (DIALS's multiple_lattice_search.max_lattices): after a lattice is found, the spots it
    # left unindexed are indexed again, with every check, while at least min_spots_more_lattice remain.
    max_lattices: int = 1
    min_spots_more_lattice: int = 30


@dataclass
class IndexingResult:
    indexed: bool = False
    n_indexed: int = 0
    n_spots: int = 0
    lattice: str | None = None
    space_group: str | None = None
    unit_cell: list[float] | None = None
    p1_unit_cell: list[float] | None = None
    rmsd_px: float | None = None
    orientation_matrix: list[list[float]] | None = None  # A = UB: columns a*, b*, c* in the lab frame (1/A)
    method: str = "real_space_grid_search"  # fft1d when the cell was found ab initio
    errors: list[str] = field(default_factory=list)
    timing: float = 0.0
    # Further lattices found in the spots earlier ones left (max_lattices > 1): each lattice's as_lattice().
    more_lattices: list[dict] = field(default_factory=list)
    miller: np.ndarray | None = field(default=None, repr=False)  # per spot (h, k, l); 0,0,0 where not indexed
    indexed_mask: np.ndarray | None = field(default=None, repr=False)
    predicted_xy: np.ndarray | None = field(default=None, repr=False)
    chance_fraction: float | None = None  # what the same cell indexes in random orientations

    def as_lattice(self) -> dict:
        """One crystal: what a result's `lattices` lists for it."""
        return {"lattice": self.lattice, "space_group": self.space_group,
                "unit_cell": [round(v, 3) for v in self.unit_cell], "n_indexed": self.n_indexed,
                "rmsd_px": round(self.rmsd_px, 4), "orientation_matrix": self.orientation_matrix}

    def lattices(self) -> list[dict] | None:
        """Every lattice found, this one first; None when not indexed."""
        return [self.as_lattice(), *self.more_lattices] if self.indexed else None

    def as_dict(self) -> dict:
        return {
            "indexed": self.indexed,
            "n_indexed": self.n_indexed,
            "lattice": self.lattice,
            "space_group": self.space_group,
            "unit_cell": self.unit_cell,
            "p1_unit_cell": self.p1_unit_cell,
            "rmsd_px": None if self.rmsd_px is None or not math.isfinite(self.rmsd_px) else round(self.rmsd_px, 4),
            "chance_fraction": None if self.chance_fraction is None else round(self.chance_fraction, 4),
            "orientation_matrix": self.orientation_matrix,
            "method": self.method,
            "lattices": self.lattices(),
            "errors": list(self.errors),
            "timing": {"indexing": round(self.timing, 6)},
        }


# ---------------------------------------------------------------------------------------------
# Cells and symmetry (gemmi)


def parse_unit_cell(value) -> tuple[float, ...]:
    """'a,b,c,al,be,ga' (or 6 numbers) -> a validated 6-tuple; ValueError with the reason otherwise."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", ",").split(",") if p]
    else:
        parts = list(value)
    try:
        cell = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"unit cell {value!r}: expected six numbers a,b,c,alpha,beta,gamma") from None
    if len(cell) != 6 or not all(math.isfinite(v) for v in cell):
        raise ValueError(f"unit cell {value!r}: expected six numbers a,b,c,alpha,beta,gamma")
    if min(cell[:3]) <= 0 or not all(0 < v < 180 for v in cell[3:]):
        raise ValueError(f"unit cell {value!r}: lengths must be > 0 and angles within (0, 180) degrees")
    import gemmi

    if gemmi.UnitCell(*cell).volume <= 0 or not math.isfinite(gemmi.UnitCell(*cell).volume):
        raise ValueError(f"unit cell {value!r}: these angles make no cell")
    return cell


def parse_space_group(value: str):
    """A space-group symbol or number -> gemmi.SpaceGroup; ValueError with the reason otherwise."""
    import gemmi

    text = str(value).strip()
    try:
        sg = gemmi.SpaceGroup(int(text)) if text.isdigit() else gemmi.SpaceGroup(text)
    except (ValueError, RuntimeError):
        raise ValueError(f"space group {value!r}: not a space group gemmi knows") from None
    return sg


def lattice_of(space_group) -> str:
    """Bravais lattice symbol (aP ... cI) of a gemmi.SpaceGroup: crystal system + centring."""
    system = _SYSTEM_LETTER[space_group.crystal_system_str()]
    centring = space_group.centring_type()
    if system == "h":
        return "hR" if centring == "R" else "hP"
    if centring in ("A", "B"):
        centring = "C"
    return system + centring


def cell_from_direct(direct: np.ndarray) -> list[float]:
    """Rows a, b, c of a direct basis (A) -> [a, b, c, alpha, beta, gamma]."""
    a, b, c = direct
    la, lb, lc = (float(np.linalg.norm(v)) for v in (a, b, c))

    def angle(u, v, lu, lv):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v) / (lu * lv)))))

    return [la, lb, lc, angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb)]


def cell_from_metric(g: np.ndarray) -> list[float]:
    la, lb, lc = (math.sqrt(g[i, i]) for i in range(3))
    return [la, lb, lc, math.degrees(math.acos(g[1, 2] / (lb * lc))), math.degrees(math.acos(g[0, 2] / (la * lc))),
            math.degrees(math.acos(g[0, 1] / (la * lb)))]


def symmetrised_metric(g: np.ndarray, space_group) -> np.ndarray:
    """Average of R^T G R over the group's rotations (fractional, integer matrices): the nearest metric the
    lattice's point group keeps."""
    rots = [np.array(op.rot, dtype=np.float64) / op.DEN for op in space_group.operations().sym_ops]
    return sum(r.T @ g @ r for r in rots) / len(rots)


def orth_matrix(cell) -> np.ndarray:
    """Rows a, b, c in gemmi's Cartesian frame (a along x, b in the xy plane)."""
    import gemmi

    m = np.array(gemmi.UnitCell(*cell).orth.mat, dtype=np.float64)
    return m.T


# ---------------------------------------------------------------------------------------------
# Geometry: rlps and predictions


def reciprocal_points(geometry: Geometry, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Per spot: r = s1 - s0 (1/A, lab) and the lab point (mm) the centroid maps to."""
    vx, vy, vz = lab_coordinates(geometry, x, y)
    lab = np.stack([vx, vy, vz], axis=1)
    s1 = lab / (np.linalg.norm(lab, axis=1)[:, None] * geometry.wavelength)
    return s1 - geometry.s0[None, :], lab


def predict_xy(geometry: Geometry, r_calc: np.ndarray, panels: np.ndarray) -> np.ndarray:
    """Frame pixel (x, y) where each predicted diffracted ray meets its spot's panel (no parallax); NaN where
    the ray misses the panel's plane. Stills: the rlp r = A h is rotated in the plane of s0 and r onto the
    Ewald sphere, keeping |r| (its resolution), as DIALS's stills predictor places a reflection: r' with
    |r'| = |r| and r' . s0 = -|r|^2 / 2 (so |s0 + r'| = |s0|), then s1 = s0 + r'."""
    k, cols, frames = _predict_constants(geometry)
    r_calc = np.asarray(r_calc, dtype=np.float64)
    q2 = np.einsum("ij,ij->i", r_calc, r_calc)
    par = -q2 / (2 * k)
    # Only s1 . (u0, n, f, s) of each panel are needed, and s1 = s0 + scale r + shift u0 is linear in r: one
    # (n, 3) x (3, 1 + 3 panels) product instead of building s1 (this runs on every refinement step).
    dots = r_calc @ cols
    along = dots[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(np.maximum(q2 - par * par, 0.0) / np.maximum(q2 - along * along, 0.0))
    shift = par - along * scale
    out = np.full((len(r_calc), 2), np.nan)
    one = len(frames) == 1  # the common case: no per-panel selection
    for i, (o_n, o_f, o_s, pix_f, pix_s, off_f, off_s, s0_n, s0_f, s0_s, u_n, u_f, u_s) in enumerate(frames):
        sel = slice(None) if one else panels == i
        if not one and not sel.any():
            continue
        sc, sh = scale[sel], shift[sel]
        d = dots[sel]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = o_n / (s0_n + sc * d[:, 1 + 3 * i] + sh * u_n)
            # (s1 t - o) . f / pixel: the point on the panel in pixels along fast and slow.
            px = (t * (s0_f + sc * d[:, 2 + 3 * i] + sh * u_f) - o_f) / pix_f + off_f
            py = (t * (s0_s + sc * d[:, 3 + 3 * i] + sh * u_s) - o_s) / pix_s + off_s
        bad = ~(t > 0)
        px[bad] = np.nan
        py[bad] = np.nan
        out[sel, 0] = px
        out[sel, 1] = py
    return out


_PREDICT_CACHE: dict[int, tuple] = {}


def _predict_constants(geometry: Geometry) -> tuple:
    """|s0|, the columns (u0, then each panel's normal, fast, slow) and per panel the origin's, s0's and u0's
    components along them, pixel sizes and offset: fixed for a (frozen) geometry, computed once for it rather than
    on each of a refinement's predictions."""
    hit = _PREDICT_CACHE.get(id(geometry))
    if hit is not None and hit[0] is geometry:
        return hit[1]
    s0 = np.asarray(geometry.s0, dtype=np.float64)
    k = float(np.linalg.norm(s0))
    u0 = s0 / k
    cols, frames = [u0[:, None]], []
    for p in geometry.panels:
        f = np.asarray(p.fast_axis, dtype=np.float64)
        s = np.asarray(p.slow_axis, dtype=np.float64)
        n = np.array([f[1] * s[2] - f[2] * s[1], f[2] * s[0] - f[0] * s[2], f[0] * s[1] - f[1] * s[0]])
        o = np.asarray(p.origin, dtype=np.float64)
        axes = np.stack([n, f, s], axis=1)
        cols.append(axes)
        frames.append((float(o @ n), float(o @ f), float(o @ s), p.pixel_size[0], p.pixel_size[1],
                       p.frame_offset[0], p.frame_offset[1], *(float(v) for v in s0 @ axes),
                       *(float(v) for v in u0 @ axes)))
    constants = (k, np.concatenate(cols, axis=1), frames)
    if len(_PREDICT_CACHE) >= 8:
        _PREDICT_CACHE.clear()
    _PREDICT_CACHE[id(geometry)] = (geometry, constants)
    return constants


# ---------------------------------------------------------------------------------------------
# Search


def hemisphere(n: int) -> np.ndarray:
    """n unit vectors spread evenly over the hemisphere z >= 0 (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    rho = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


# cos(2 pi f) for f in [-1/2, 1/2] as an even polynomial in f^2 (least squares on Chebyshev nodes, max error 4e-5):
# the same score as numpy's cos at a quarter of its cost on these phases (the direction search's hot loop).
_COS_POLY = tuple(np.float32(c) for c in np.polynomial.polynomial.polyfit(
    (0.5 * np.cos(np.linspace(0.0, math.pi, 2001))) ** 2, np.cos(math.pi * np.cos(np.linspace(0.0, math.pi, 2001))),
    4)[::-1])


def _lattice_score(points: np.ndarray, dirs: np.ndarray, length: float) -> np.ndarray:
    """Per direction u (rows of dirs): sum over the points r of cos(2 pi length r . u), float32. The Cython
    kernel (cython_ext/latticescore.pyx) when built, else the numpy reference."""
    if _lattice_score_kernel is None:
        return _lattice_score_numpy(points, dirs, length)
    return _lattice_score_kernel(np.ascontiguousarray(points, dtype=np.float32),
                                 np.ascontiguousarray(dirs.T, dtype=np.float32), float(length), _COS_POLY)


def _lattice_score_numpy(points: np.ndarray, dirs: np.ndarray, length: float) -> np.ndarray:
    """The numpy reference of the kernel: in blocks of directions small enough that the temporaries stay in
    cache."""
    pts = (np.float32(length) * points.astype(np.float32))
    dirs_t = np.ascontiguousarray(dirs.T, dtype=np.float32)
    out = np.empty(dirs_t.shape[1], dtype=np.float32)
    block = max(64, 65536 // max(1, len(pts)))
    for start in range(0, dirs_t.shape[1], block):
        phase = pts @ dirs_t[:, start:start + block]
        frac = np.rint(phase)
        np.subtract(phase, frac, out=phase)
        np.multiply(phase, phase, out=phase)  # f^2
        acc = phase * _COS_POLY[0]
        acc += _COS_POLY[1]
        for c in _COS_POLY[2:]:  # Horner
            acc *= phase
            acc += c
        out[start:start + block] = acc.sum(axis=0)
    return out


@lru_cache(maxsize=8)
def _hemisphere_cached(n: int) -> np.ndarray:
    dirs = hemisphere(n)
    dirs.flags.writeable = False
    return dirs


def _search_length(rlps: np.ndarray, length: float, params: IndexingParams) -> np.ndarray:
    """Directions (unit, up to n_peaks, best first) along which vectors of `length` project the rlps onto
    near-integers, scored as sum cos(2 pi r . t) over the rlps an angular step cannot blur."""
    step = params.angular_step
    norms = np.linalg.norm(rlps, axis=1)
    r_max = 0.3 / (length * step)
    use = rlps[norms <= r_max]
    if len(use) < 12:  # too few low-resolution spots for this length: use the lowest ones and a finer grid
        order = np.argsort(norms)[: max(12, min(len(norms), 40))]
        use = rlps[order]
        step = min(step, 0.3 / (length * float(norms[order].max())))
    if len(use) > params.max_search_spots:  # the lowest-resolution ones: the coarse grid blurs the rest most
        use = use[np.argsort(np.linalg.norm(use, axis=1))[: params.max_search_spots]]
    n = int(min(20000, max(2000, 2 * math.pi / (step * step))))  # peaks are refined locally below
    dirs = _hemisphere_cached(n)
    scores = _lattice_score(use, dirs, length)
    n_top = min(len(scores), 50 * params.n_peaks)
    best = np.argpartition(scores, len(scores) - n_top)[len(scores) - n_top:]  # the top ones, then sorted
    order = best[np.argsort(scores[best])[::-1]]
    picked: list[np.ndarray] = []
    cos_sep = math.cos(3 * step)
    top = dirs[order]
    free = np.ones(len(top), dtype=bool)
    for idx in range(len(top)):
        if not free[idx]:
            continue
        picked.append(top[idx])
        if len(picked) >= params.n_peaks:
            break
        free &= np.abs(top @ top[idx]) < cos_sep  # non-maximum suppression around the pick
    # Each peak refined on finer local grids with rlps to higher resolution (finer in angle as they go), all
    # peaks in one product.
    if not picked:
        return np.zeros((0, 3))
    offsets = np.array([(i, j) for i in range(-3, 4) for j in range(-3, 4)], dtype=np.float64) / 3.0
    u = np.array(picked)
    local_step, local_rmax = step, r_max
    for _ in range(2):
        local_rmax *= 3.0
        use_local = rlps[norms <= local_rmax]
        helper = np.where(np.abs(u[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        e1 = _cross(u, helper)
        e1 /= np.linalg.norm(e1, axis=1)[:, None]
        e2 = _cross(u, e1)
        cand = (u[:, None, :] + local_step * (offsets[None, :, :1] * e1[:, None, :]
                                              + offsets[None, :, 1:] * e2[:, None, :]))  # (peaks, 49, 3)
        cand /= np.linalg.norm(cand, axis=2)[:, :, None]
        local = _lattice_score(use_local, cand.reshape(-1, 3), length).reshape(len(u), -1)
        u = cand[np.arange(len(u)), np.argmax(local, axis=1)]
        local_step /= 3.0
    return u


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross products of (..., 3) arrays (np.cross's axis handling costs more than the arithmetic here)."""
    a, b = np.broadcast_arrays(a, b)
    out = np.empty(a.shape)
    out[..., 0] = a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1]
    out[..., 1] = a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2]
    out[..., 2] = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
    return out


def _full_rank(h: np.ndarray) -> bool:
    """Integer Miller indices (n, 3) span 3-D: H^T H is exact, singular only when its determinant is, relative
    to Hadamard's bound, at rounding level (an SVD per call costs more)."""
    hth = h.T @ h
    return len(h) >= 3 and np.linalg.det(hth) > 1e-10 * float(np.prod(np.diag(hth)))


def _near_direct(direct: np.ndarray, target, params: IndexingParams) -> bool:
    """_near for a direct basis (rows a, b, c), from its metric in plain floats (called once per refit)."""
    (g00, g01, g02), (_, g11, g12), (_, _, g22) = (direct @ direct.T).tolist()
    la, lb, lc = math.sqrt(g00), math.sqrt(g11), math.sqrt(g22)
    cell = (la, lb, lc, *(math.degrees(math.acos(max(-1.0, min(1.0, g / (u * v)))))
                          for g, u, v in ((g12, lb, lc), (g02, la, lc), (g01, la, lb))))
    return _near(cell, target, params)


def _near(cell, target, params: IndexingParams) -> bool:
    return all(abs(g - w) <= params.cell_length_tolerance * w for g, w in zip(cell[:3], target[:3], strict=True)) and \
        all(abs(g - w) <= params.cell_angle_tolerance for g, w in zip(cell[3:], target[3:], strict=True))


def _near_integer(frac: np.ndarray, hkl: np.ndarray, tol: float) -> np.ndarray:
    """Fractional indices (..., 3) and their rounding -> all three within tol of the integers, and not 000. By
    components: numpy's reductions over a trailing axis of 3 are slow."""
    d = np.abs(frac - hkl)
    return (d[..., 0] < tol) & (d[..., 1] < tol) & (d[..., 2] < tol) & \
        ((hkl[..., 0] != 0) | (hkl[..., 1] != 0) | (hkl[..., 2] != 0))


def _shells(rlps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|r| of each rlp and the resolution shells (quantiles of |r|) candidates are indexed in: the same for every
    candidate of a frame."""
    norms = np.linalg.norm(rlps, axis=1)
    return norms, np.unique(np.quantile(norms, [0.25, 0.4, 0.55, 0.7, 0.85, 1.0]))


def _index_and_refine(rlps: np.ndarray, direct: np.ndarray, tol: float, target, params: IndexingParams,
                      shells: tuple[np.ndarray, np.ndarray] | None = None):
    """Index shell by shell from low resolution, refitting A = UB (r = A h) by least squares after each; a
    refit that takes the cell away from the target (a larger cell indexes anything) ends the candidate.
    Returns (A, hkl, indexed mask), or None for a candidate that drifted."""
    norms, shells = _shells(rlps) if shells is None else shells
    a_mat = np.linalg.inv(direct)  # columns a*, b*, c*
    mask = np.zeros(len(rlps), dtype=bool)
    hkl = np.zeros((len(rlps), 3))
    for r_max in list(shells) + [shells[-1]]:
        frac = rlps @ np.linalg.inv(a_mat).T  # h = A^-1 r
        hkl = np.rint(frac)
        ok = _near_integer(frac, hkl, tol) & (norms <= r_max + 1e-12)
        h_ok = hkl[ok]
        # Least squares r = h A^T by the normal equations (3 unknowns a column, integer h).
        if len(h_ok) < 6 or not _full_rank(h_ok):
            mask = ok
            break
        sol = np.linalg.solve(h_ok.T @ h_ok, h_ok.T @ rlps[ok])  # A^T
        if not _near_direct(np.linalg.inv(sol.T), target, params):
            return None
        a_mat = sol.T
        mask = ok
    frac = rlps @ np.linalg.inv(a_mat).T
    hkl = np.rint(frac)
    mask = _near_integer(frac, hkl, tol)
    return a_mat, hkl, mask


def _symmetriser(rotations: np.ndarray) -> np.ndarray:
    """The linear map G -> mean R^T G R over the rotations, as a 9 x 9 matrix on row-major G."""
    return np.einsum("rji,rkl->iljk", rotations, rotations).reshape(9, 9) / len(rotations)


_UPPER = np.triu_indices(3)
_UPPER_FLAT = 3 * _UPPER[0] + _UPPER[1]


def _restraints(a_mats: np.ndarray, target_metric: np.ndarray, symmetriser: np.ndarray) -> np.ndarray:
    """Soft restraints of refined cells (a stack of A matrices -> one row each): the metric G = D D^T
    (D = A^-1, rows a, b, c) toward the one the lattice's point group keeps (mean R^T G R, `_symmetriser`) and
    toward the target's, each element relative to |a_i||a_j|. One still constrains the cell along the beam
    poorly (DIALS's per-frame thaumatin cells scatter by a few %); restraints to a target cell are DIALS's way
    too (refinement.parameterisation.crystal.unit_cell.restraints)."""
    d = np.linalg.inv(a_mats)
    g = (d @ np.swapaxes(d, 1, 2)).reshape(len(a_mats), 9)
    diag = np.diag(target_metric)
    scale = np.sqrt(np.outer(diag, diag)).ravel()[_UPPER_FLAT]
    sym = g @ symmetriser.T
    return np.concatenate([(g - sym)[:, _UPPER_FLAT] / (scale * RESTRAINT_SYMMETRY),
                           (g - target_metric.ravel())[:, _UPPER_FLAT] / (scale * RESTRAINT_TARGET)], axis=1)


RESTRAINT_SYMMETRY = 0.001  # sigma of (G - G_sym) / (|a_i| |a_j|): a soft symmetry constraint
RESTRAINT_TARGET = 0.05  # sigma of (G - G_target) / (|a_i| |a_j|): about 2.5% in length


def _refine_positions(geometry, a_mat, hkl, xy, panels, n_iter: int = 3, target_metric=None,
                      rotations=None) -> np.ndarray:
    """Gauss-Newton on the nine elements of A against the spots' pixel positions, with the cell restrained to its
    lattice's symmetry and the target when those are given. A spot's prediction depends on A only through
    r = A h, so its Jacobian is D = d(x, y)/dr (numeric, three shifted predictions) times h (chain rule). D is
    taken once per call (a chord method: the steps here move each r by far less than D varies over), so J^T J of
    the positions is fixed too and each step costs one prediction; the acceptance test below still compares true
    residuals."""
    x = a_mat.ravel().copy()
    eps = 1e-7  # 1/A: ~1e-4 px of prediction shift, far above rounding and well inside the linear range
    n = len(hkl)
    symmetriser = None if target_metric is None else _symmetriser(rotations)

    def restraints(vs: np.ndarray) -> np.ndarray:
        if target_metric is None:
            return np.zeros((len(vs), 0))
        return _restraints(vs.reshape(-1, 3, 3), target_metric, symmetriser)

    r_now = hkl @ x.reshape(3, 3).T
    pred = predict_xy(geometry, r_now, panels)
    shifted = predict_xy(geometry, np.concatenate([r_now + eps * np.eye(3)[i] for i in range(3)]),
                         np.tile(panels, 3)).reshape(3, n, 2)
    d_pred = np.ascontiguousarray(((shifted - pred[None]) / eps).transpose(1, 2, 0))  # (spots, 2: x y, 3: r_i)
    if not np.all(np.isfinite(d_pred)):
        return a_mat
    # J^T J of the positions without forming J (2n x 9, J[(n, c), 3 i + j] = D[n, c, i] h[n, j]):
    # sum_n (D_n^T D_n)[i, k] h_j h_l, one (9 x n) x (n x 9) product, rearranged to (3 i + j, 3 k + l).
    dtd = np.einsum("nci,nck->nik", d_pred, d_pred).reshape(n, 9)
    hh = (hkl[:, :, None] * hkl[:, None, :]).reshape(n, 9)
    jtj_pos = (dtd.T @ hh).reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    def restraints_and_shifted(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hs = 1e-7 * np.maximum(1e-3, np.abs(x))
        return hs, restraints(np.vstack([x, x[None, :] + np.diag(hs)]))  # base and the 9 shifted, at once

    hs, restrained = restraints_and_shifted(x)
    for _ in range(n_iter):
        resid = pred - xy
        r0 = np.concatenate([resid.ravel(), restrained[0]])
        if not np.all(np.isfinite(r0)):
            break
        # J^T r of the positions: sum_n (D_n^T r_n)_i h_j.
        jtr = (np.einsum("nci,nc->ni", d_pred, resid).T @ hkl).ravel()
        jtj = jtj_pos
        if target_metric is not None:
            jac_r = ((restrained[1:] - restrained[0][None, :]) / hs[:, None]).T  # (restraints, 9)
            jtj = jtj_pos + jac_r.T @ jac_r
            jtr = jtr + jac_r.T @ restrained[0]
        try:
            step = np.linalg.solve(jtj, -jtr)  # normal equations: 9 parameters of one scale (1/A)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)):
            break
        x_new = x + step
        r_new_pos = hkl @ x_new.reshape(3, 3).T
        pred_new = predict_xy(geometry, r_new_pos, panels)
        hs_new, restrained_new = restraints_and_shifted(x_new)  # the next step's too, when this one is taken
        r_new = np.concatenate([(pred_new - xy).ravel(), restrained_new[0]])
        if not np.all(np.isfinite(r_new)) or (r_new @ r_new) > (r0 @ r0):
            break
        x, r_now, pred, hs, restrained = x_new, r_new_pos, pred_new, hs_new, restrained_new
    return x.reshape(3, 3)


def _candidate_bases(rlps: np.ndarray, target_direct: np.ndarray, params: IndexingParams) -> list[np.ndarray]:
    """Direct bases (rows a, b, c in the lab frame) built from two searched directions and the target."""
    lengths = np.linalg.norm(target_direct, axis=1)
    i, j = (int(v) for v in np.argsort(lengths)[:2])
    k = 3 - i - j
    ti, tj, tk = target_direct[i], target_direct[j], target_direct[k]
    # tk in the frame (ti, tj, ti x tj)
    frame = np.stack([ti, tj, np.cross(ti, tj)], axis=1)
    coef = np.linalg.solve(frame, tk)
    cos_ij = float(ti @ tj) / (lengths[i] * lengths[j])
    peaks_i = _search_length(rlps, float(lengths[i]), params)
    same = abs(lengths[i] - lengths[j]) < 0.02 * lengths[i]
    peaks_j = peaks_i if same else _search_length(rlps, float(lengths[j]), params)
    same_k = [m for m in (i, j) if abs(lengths[m] - lengths[k]) < 0.02 * lengths[k]]
    peaks_k = (peaks_i if same_k and same_k[0] == i else peaks_j) if same_k else \
        _search_length(rlps, float(lengths[k]), params)
    cos_k = math.cos(math.radians(6.0))
    cos_tol = math.radians(6.0)
    # Directions come from a hemisphere: both signs of each, since (-a, -b) implies the mirror image of c
    # (a lattice of another hand) unless a two-fold axis relates them. Every pair and sign at once, in the
    # order pair by pair, signs (+ +), (+ -), (- +), (- -).
    dots = np.clip(peaks_i @ peaks_j.T, -1.0, 1.0)
    want = math.acos(cos_ij)
    pa, pb = np.nonzero(np.abs(np.arccos(np.abs(dots)) - min(want, math.pi - want)) <= cos_tol)
    if not len(pa):
        return []
    sign_i = np.array([1.0, 1.0, -1.0, -1.0])
    sign_j = np.array([1.0, -1.0, 1.0, -1.0])
    cos_pair = np.clip((sign_i * sign_j)[None, :] * dots[pa, pb][:, None], -1.0, 1.0)  # (pairs, 4)
    use = (np.abs(np.arccos(cos_pair) - want) <= cos_tol).ravel()
    vi = (sign_i[None, :, None] * peaks_i[pa][:, None, :] * lengths[i]).reshape(-1, 3)[use]
    vj = (sign_j[None, :, None] * peaks_j[pb][:, None, :] * lengths[j]).reshape(-1, 3)[use]
    vk = coef[0] * vi + coef[1] * vj + coef[2] * _cross(vi, vj)
    # The third vector: the searched direction nearest the one the target's angles imply, when one is within
    # 6 degrees (one still fixes it better than the angles of a cell a few % off).
    if len(peaks_k):
        along = (vk / np.linalg.norm(vk, axis=1)[:, None]) @ peaks_k.T
        best_k = np.argmax(np.abs(along), axis=1)
        best = along[np.arange(len(vk)), best_k]
        snap = np.abs(best) >= cos_k
        vk[snap] = (np.sign(best[snap])[:, None] * peaks_k[best_k[snap]]) * lengths[k]
    bases = np.empty((len(vi), 3, 3))
    bases[:, i], bases[:, j], bases[:, k] = vi, vj, vk
    return list(bases)


# ---------------------------------------------------------------------------------------------
# The indexer


def _same_lattice(d1: np.ndarray, d2: np.ndarray, tol: float = 0.15, d2_inv: np.ndarray | None = None) -> bool:
    """The same lattice in another basis: D1 D2^-1 is a unimodular integer matrix (within tol)."""
    m = d1 @ (np.linalg.inv(d2) if d2_inv is None else d2_inv)
    r = np.rint(m)
    if np.abs(m - r).max() >= tol:
        return False
    (a, b, c), (d, e, f), (g, h, i) = r.tolist()
    return abs(a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)) == 1


def _chance_fraction(geometry, rlps, xy, panels, a_mat, cutoff_px: float, params) -> float:
    """The fraction of these spots the same cell indexes by chance: with the solution's tolerances (hkl and the
    largest positional residual it accepted) in a few random orientations (fixed seed), no refinement. All
    orientations at once, and positions predicted only for the spots within the hkl tolerance."""
    rng = np.random.default_rng(12345)
    rots = []
    for _ in range(params.chance_trials):
        q, _r = np.linalg.qr(rng.normal(size=(3, 3)))
        rots.append(q * np.sign(np.linalg.det(q)))
    if not rots:
        return 0.0
    a_rot = np.array(rots) @ a_mat  # (trials, 3, 3)
    frac = rlps[None] @ np.swapaxes(np.linalg.inv(a_rot), 1, 2)  # (trials, spots, 3): h = A^-1 r
    hkl = np.rint(frac)
    ok = _near_integer(frac, hkl, params.hkl_tolerance)
    r_all = hkl @ np.swapaxes(a_rot, 1, 2)  # r = A h, every trial and spot
    trial, spot = np.nonzero(ok)
    r_calc = r_all[trial, spot]
    dist = np.hypot(*(predict_xy(geometry, r_calc, panels[spot]) - xy[spot]).T)
    hits = np.bincount(trial[dist <= cutoff_px], minlength=len(rots))
    return float(np.mean(hits / len(rlps)))


def _refine_candidate(geometry, rlps, xy, panels, a_mat, hkl, mask, cell, target_metric, rotations, params):
    """Refine against the spot positions, rejecting positional outliers (a spot whose predicted position is far
    from its centroid is not indexed by this lattice, however close its h is to integers)."""
    for n_iter in (3, 2, 2):
        if mask.sum() < 6 or not _full_rank(hkl[mask]):
            break
        refined = _refine_positions(geometry, a_mat, hkl[mask], xy[mask], panels[mask], n_iter=n_iter,
                                    target_metric=target_metric, rotations=rotations)
        if not _near_direct(np.linalg.inv(refined), cell, params):
            break
        a_mat = refined
        frac = rlps @ np.linalg.inv(a_mat).T
        hkl = np.rint(frac)
        mask = _near_integer(frac, hkl, params.hkl_tolerance)
        dist = np.hypot(*(predict_xy(geometry, hkl @ a_mat.T, panels) - xy).T)
        good = mask & np.isfinite(dist)
        if not good.any():
            break
        cutoff = max(params.outlier_min_px, params.outlier_medians * float(np.median(dist[good])))
        mask = good & (dist <= cutoff)
    return a_mat, hkl, mask


def _ab_initio_mismatch(found, found_lattice: str, p1_cell, params: IndexingParams) -> str | None:
    """Why a cell found ab initio is not the target (None when it is): the target space group's lattice, and the
    lengths within cell_length_tolerance (sorted: settings may order the axes differently); a target without a
    space group is compared as Niggli-reduced cells."""
    from intxr.reader import ab_initio

    target = parse_unit_cell(params.target_unit_cell)
    if params.target_space_group:
        want_lattice = lattice_of(parse_space_group(params.target_space_group))
        got, want = found, target
    else:
        want_lattice = None
        got = ab_initio.reduce_and_classify(orth_matrix(p1_cell), classify=False)[0]
        want = ab_initio.reduce_and_classify(orth_matrix(target), classify=False)[0]
    shown = " ".join(f"{v:.2f}" for v in got)
    if want_lattice is not None and found_lattice != want_lattice:
        return f"ab initio found {found_lattice} {shown}, not the target's lattice {want_lattice}"
    if any(abs(g - w) > params.cell_length_tolerance * w
           for g, w in zip(sorted(got[:3]), sorted(want[:3]), strict=True)):
        return f"ab initio found {shown}, not the target cell"
    return None


def index_spots(geometry: Geometry, x, y, params: IndexingParams) -> IndexingResult:
    """Index one still's spots (frame pixel centroids, DIALS convention). Never raises for bad input: the
    reason is in the result's errors."""
    t0 = time.perf_counter()
    result = IndexingResult()
    try:
        _index(geometry, np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel(),
               params, result)
    except (GeometryError, ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
        result.indexed = False
        result.errors.append(f"not indexed: {exc}")
    except Exception as exc:  # noqa: BLE001 - bad input never raises out of a reader
        result.indexed = False
        result.errors.append(f"not indexed: indexer error {type(exc).__name__}: {exc}")
    if result.indexed and params.max_lattices > 1:
        _more_lattices(geometry, np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel(),
                       params, result)
    result.timing = time.perf_counter() - t0
    return result


def _more_lattices(geometry: Geometry, x: np.ndarray, y: np.ndarray, params: IndexingParams,
                   result: IndexingResult) -> None:
    """Further crystals: index the spots no lattice found so far indexed, with the same target and every check
    (the chance margin now measured on those spots), until max_lattices, too few spots, or a failure."""
    from dataclasses import replace

    left = ~result.indexed_mask
    one = replace(params, max_lattices=1)
    found = [np.linalg.inv(np.array(result.orientation_matrix))]
    for _ in range(params.max_lattices - 1):  # searches, not lattices: a search may find the same crystal again
        n_left = int(left.sum())
        if n_left < max(params.min_spots_more_lattice, params.min_spots):
            return
        where = np.flatnonzero(left)
        more = index_spots(geometry, x[where], y[where], one)
        if not more.indexed:
            return
        left[where[more.indexed_mask]] = False
        direct = np.linalg.inv(np.array(more.orientation_matrix))
        # The same crystal again (its direct basis an integer change of an earlier one within a few degrees: spots
        # the earlier refinement left at the edge of its tolerance, a mosaic block) is no second crystal.
        if any(_same_lattice(direct, earlier) for earlier in found):
            continue
        found.append(direct)
        result.more_lattices.append(more.as_lattice())


def _fail(result: IndexingResult, reason: str) -> None:
    result.indexed = False
    result.errors.append(f"not indexed: {reason}")


def _index(geometry: Geometry, x: np.ndarray, y: np.ndarray, params: IndexingParams, result: IndexingResult) -> None:
    n = len(x)
    result.n_spots = n
    if not geometry.known:
        return _fail(result, geometry.missing_error() or "the geometry lacks what indexing needs")
    if len(y) != n:
        return _fail(result, f"{n} x but {len(y)} y centroids")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if len(x) < params.min_spots:
        return _fail(result, f"{len(x)} spots, fewer than the {params.min_spots} indexing needs")
    centred = np.stack([x - x.mean(), y - y.mean()], axis=1)
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[1] / math.sqrt(len(x)) < 2.0:
        return _fail(result, "the spots lie on one line (no 3-D lattice can be determined from them)")
    note = None
    if params.method == "real_space_grid_search" and params.target_unit_cell is None:
        return _fail(result, "method real_space_grid_search needs target_unit_cell (fft1d or auto search ab initio)")
    if params.target_unit_cell is None or params.method == "fft1d":
        # Ab initio (intxr.reader.ab_initio: fft1d-style search, Niggli reduction, metric symmetry); the cell it
        # finds becomes the known-cell search's target, with every check below. With a target cell too (method
        # fft1d), the cell found must be the target's, as DIALS's known_symmetry check on an fft1d solution.
        from dataclasses import replace

        from intxr.reader import ab_initio

        result.method = "fft1d"
        rl, _lab = reciprocal_points(geometry, x, y)
        rl = rl[np.isfinite(rl).all(axis=1)]
        basis = ab_initio.find_basis(rl)
        if basis is None:
            return _fail(result, "ab initio: no three independent lattice vectors found")
        # As DIALS does: index and refine in P1 first (a basis from the search is a few tenths of a % off, enough
        # to fake or hide metric symmetry), then the Bravais lattice from the refined P1 cell.
        reduced = ab_initio.reduce_and_classify(basis, classify=False)[0]
        try:
            parse_unit_cell(reduced)
        except ValueError:
            return _fail(result, "ab initio: the vectors found make no cell")
        first = IndexingResult()
        _index(geometry, x, y, replace(params, target_unit_cell=tuple(reduced), target_space_group="P1",
                                       method="real_space_grid_search"), first)
        if not first.indexed:
            result.errors.extend(e.replace("not indexed: ", "not indexed: ab initio, in P1: ", 1)
                                 for e in first.errors if e.startswith("not indexed: "))
            result.n_indexed, result.rmsd_px = first.n_indexed, first.rmsd_px
            return None
        found, found_lattice, group, note = ab_initio.reduce_and_classify(orth_matrix(first.p1_unit_cell))
        if params.target_unit_cell is None:
            params = replace(params, target_unit_cell=tuple(found), target_space_group=group)
        else:
            mismatch = _ab_initio_mismatch(found, found_lattice, first.p1_unit_cell, params)
            if mismatch:
                return _fail(result, mismatch)
    cell = parse_unit_cell(params.target_unit_cell)
    sg = parse_space_group(params.target_space_group or "P1")
    import gemmi

    if not gemmi.UnitCell(*cell).is_compatible_with_spacegroup(sg, 1e-3):
        return _fail(result, f"target_unit_cell {' '.join(f'{v:g}' for v in cell)} does not have the metric "
                             f"symmetry of target_space_group {sg.short_name()}")
    lattice = lattice_of(sg)
    target_direct = orth_matrix(cell)
    target_metric = target_direct @ target_direct.T
    rotations = np.array([np.array(op.rot, dtype=np.float64) / op.DEN for op in sg.operations().sym_ops])

    rlps, _lab = reciprocal_points(geometry, x, y)
    keep = np.isfinite(rlps).all(axis=1) & (np.linalg.norm(rlps, axis=1) > 1e-6)
    if keep.sum() > params.max_spots:
        # Within the latency budget: the lowest-resolution spots (those a cell a few % off still indexes).
        kept = np.flatnonzero(keep)
        norms = np.linalg.norm(rlps[kept], axis=1)
        keep = np.zeros_like(keep)
        keep[kept[np.argsort(norms)[: params.max_spots]]] = True
        result.errors.append(f"indexing used the {params.max_spots} lowest-resolution of {n} spots")
    rlps, x, y = rlps[keep], x[keep], y[keep]
    n_used = len(rlps)
    xy = np.stack([x, y], axis=1)
    panels = panel_of(geometry, x, y).ravel()

    # A quick score first (low-resolution rlps within tolerance of integers, as the basis stands), the same
    # lattice in another basis merged, then the best few indexed shell by shell.
    bases = _candidate_bases(rlps, target_direct, params)
    low = rlps[np.linalg.norm(rlps, axis=1) <= np.quantile(np.linalg.norm(rlps, axis=1), 0.4)]
    quick: list[int] = []
    if bases:
        # h = D r (rows a, b, c) for every basis in one product: (bases, 3, low spots), then in place (a few MB:
        # fresh temporaries of that size cost more in page faults than in arithmetic).
        frac = (np.array(bases).reshape(-1, 3) @ low.T).reshape(len(bases), 3, len(low))
        np.subtract(frac, np.rint(frac), out=frac)
        off = np.abs(frac, out=frac) < params.hkl_tolerance
        quick = (off[:, 0] & off[:, 1] & off[:, 2]).sum(axis=1).tolist()
    shortlisted: list = []
    inverses: list = []
    best_quick = max(quick, default=0)
    for n_quick in np.argsort(quick)[::-1]:
        if quick[int(n_quick)] < 0.5 * best_quick:
            break
        basis = bases[int(n_quick)]
        if not any(_same_lattice(basis, other, d2_inv=inv) for other, inv in zip(shortlisted, inverses, strict=True)):
            shortlisted.append(basis)
            inverses.append(np.linalg.inv(basis))
        if len(shortlisted) >= params.n_shortlisted:
            break
    candidates = []
    shells = _shells(rlps)
    for basis in shortlisted:
        got = _index_and_refine(rlps, basis, params.hkl_tolerance, cell, params, shells)
        if got is not None and got[2].sum() >= 3:
            candidates.append(got)
    if not candidates:
        return _fail(result, "no lattice direction of the target cell found in the spots")
    # The few best by count are each refined against the positions (a near-miss basis can index many spots at
    # the loose tolerance and still be the wrong orientation); the best then is the one indexing most spots
    # within the RMSD limit, the lower RMSD breaking ties.
    candidates.sort(key=lambda c: -int(c[2].sum()))
    distinct: list = []
    top = int(candidates[0][2].sum())
    for cand in candidates:
        if cand[2].sum() < params.refine_fraction * top:
            break
        # The same lattice in another basis (a and b swapped, signs, ...): D1 D2^-1 is a unimodular integer matrix.
        d1 = np.linalg.inv(cand[0])
        if not any(_same_lattice(d1, None, d2_inv=other[0]) for other in distinct):  # inv(inv(A)) = A
            distinct.append(cand)
        if len(distinct) >= params.n_refined:
            break
    best = None
    for a_mat, hkl, mask in distinct:
        a_mat, hkl, mask = _refine_candidate(geometry, rlps, xy, panels, a_mat, hkl, mask, cell, target_metric,
                                             rotations, params)
        dist = np.hypot(*(predict_xy(geometry, hkl @ a_mat.T, panels) - xy).T)
        mask &= np.isfinite(dist)
        n_ok = int(mask.sum())
        rmsd = float(np.sqrt(np.mean(dist[mask] ** 2))) if n_ok else float("inf")
        key = (rmsd <= params.max_rmsd_px, n_ok, -rmsd)
        if best is None or key > best[0]:
            best = (key, a_mat, hkl, mask, dist)
    _, a_mat, hkl, mask, dist = best
    pred = predict_xy(geometry, hkl @ a_mat.T, panels)
    n_indexed = int(mask.sum())
    chance = _chance_fraction(geometry, rlps, xy, panels, a_mat, float(dist[mask].max()) if n_indexed else 0.0,
                              params)
    result.chance_fraction = chance
    result.n_indexed = n_indexed
    direct = np.linalg.inv(a_mat)  # rows a, b, c (D A = I)
    p1 = cell_from_direct(direct)
    result.p1_unit_cell = [round(v, 4) for v in p1]
    rmsd = float(np.sqrt(np.mean(dist[mask] ** 2))) if n_indexed else float("inf")
    result.rmsd_px = rmsd
    full_hkl = np.zeros((n, 3), dtype=np.int64)
    full_mask = np.zeros(n, dtype=bool)
    full_pred = np.full((n, 2), np.nan)
    where = np.flatnonzero(finite)[keep]
    full_hkl[where] = hkl.astype(np.int64)
    full_mask[where] = mask
    full_pred[where] = pred
    result.miller, result.indexed_mask, result.predicted_xy = full_hkl, full_mask, full_pred

    if n_indexed < params.min_indexed:
        return _fail(result, f"{n_indexed} spots indexed, fewer than {params.min_indexed}")
    if n_indexed < params.min_indexed_fraction * n_used:
        return _fail(result, f"{n_indexed} of {n_used} spots indexed, less than {params.min_indexed_fraction:.0%}")
    if n_indexed < params.min_over_chance * chance * n_used:
        return _fail(result, f"{n_indexed} of {n_used} spots indexed ({n_indexed / n_used:.0%}), not clearly above "
                             "chance: "
                             f"this cell indexes {chance:.0%} of them in random orientations")
    if not rmsd <= params.max_rmsd_px:
        return _fail(result, f"positional RMSD {rmsd:.2f} px exceeds {params.max_rmsd_px} px")
    metric = direct @ direct.T
    sym = cell_from_metric(symmetrised_metric(metric, sg))
    for got, want, what in ((p1, sym, "its lattice's symmetry"), (sym, cell, "the target cell")):
        tol_l = params.symmetry_length_tolerance if what != "the target cell" else params.cell_length_tolerance
        tol_a = params.symmetry_angle_tolerance if what != "the target cell" else params.cell_angle_tolerance
        if any(abs(g - w) > tol_l * w for g, w in zip(got[:3], want[:3], strict=True)) or \
                any(abs(g - w) > tol_a for g, w in zip(got[3:], want[3:], strict=True)):
            shown = " ".join(f"{v:.2f}" for v in got)
            wanted = " ".join(f"{v:.2f}" for v in want)
            return _fail(result, f"refined cell {shown} does not match {what} ({wanted})")
    result.indexed = True
    if note:
        result.errors.append(note)
    result.lattice = lattice
    result.space_group = LOWEST_SPACE_GROUP[lattice]
    result.unit_cell = [round(v, 4) for v in sym]
    result.orientation_matrix = [[round(float(v), 8) for v in row] for row in a_mat]


# ---------------------------------------------------------------------------------------------
# What a reader (and `intxr index`) does with a frame of a run mode


def params_from_processing(section) -> IndexingParams:
    """From a validated processing-config section (intxr.config.ProcessingConfig)."""
    return IndexingParams(target_unit_cell=section.target_unit_cell, target_space_group=section.target_space_group,
                          method=section.indexing_method, max_lattices=section.indexing_max_lattices)


def index_if_asked(section, geometry: Geometry, x, y, n_spots: int) -> tuple[str, IndexingResult | None]:
    """The frame's `indexing` word and, when tried, the result: only with processing_mode = indexing, on a hit
    (n_spots >= min_Bragg_peaks) exposed at least exposure_time_cutoff (the header's count_time; a frame whose
    exposure is unknown is indexed)."""
    if not getattr(section, "does_indexing", False):
        return "not asked (processing_mode = spotfinding)", None
    if n_spots < section.min_bragg_peaks:
        return f"not a hit ({n_spots} spots < min_Bragg_peaks {section.min_bragg_peaks})", None
    cutoff, exposure = section.exposure_time_cutoff, geometry.count_time
    if cutoff is not None and exposure is not None and exposure < cutoff:
        return f"not indexed: exposure {exposure:g} s < exposure_time_cutoff {cutoff:g} s", None
    result = index_spots(geometry, x, y, params_from_processing(section))
    return ("indexed" if result.indexed else "not indexed"), result


def result_fields(word: str, result: IndexingResult | None) -> dict:
    """The FrameResult fields of an indexing outcome (intxr.messages.FrameResult)."""
    out: dict = {"indexing": word}
    if result is None:
        return out
    out.update(indexed=result.indexed, n_indexed=result.n_indexed,
               rmsd_px=None if result.rmsd_px is None or not math.isfinite(result.rmsd_px)
               else round(result.rmsd_px, 4))
    if result.indexed:
        out.update(lattice=result.lattice, space_group=result.space_group,
                   unit_cell=[round(v, 3) for v in result.unit_cell], orientation_matrix=result.orientation_matrix,
                   lattices=result.lattices())
    return out
