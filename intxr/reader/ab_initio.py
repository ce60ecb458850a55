"""Ab initio cell search for one still (no target cell): a 1-D FFT over directions, as DIALS's `fft1d` does it
(Steller, Bolotovsky & Rossmann 1997, J. Appl. Cryst. 30, 1036): for each direction u on a hemisphere the
low-resolution rlps are projected onto u and histogrammed; a real-lattice vector along u of length L makes the
projections periodic with period 1/L, a peak of the histogram's Fourier transform at L. The strongest directions
(with their lengths, refined on local grids) give candidate vectors; the non-coplanar triple that indexes most
low-resolution rlps is the basis; gemmi's Niggli reduction gives the reduced cell, and gemmi's lattice symmetry
search (Le Page's idea: two-fold axes within `max_obliquity` degrees) its metric symmetry.

The lattice is reported only where the reduced cell itself shows it (a primitive lattice whose symmetry
operations permute its axes: aP, mP, oP, tP, cP, and hP with gamma 120): centred lattices (mC, oC, oI, oF, tI,
hR, cI, cF) are not resolved ab initio yet, so such a frame gets the triclinic cell and aP (true, not the
highest symmetry) and says so. The cell found is then handed to the known-cell indexer as its target.
"""

from __future__ import annotations

import math

import numpy as np

from intxr.reader.indexing import LOWEST_SPACE_GROUP, cell_from_direct, hemisphere

L_MIN = 25.0  # A: shorter periodicities are not searched (macromolecular cells; ice and harmonics are shorter)


def fft_vectors(rlps: np.ndarray, *, l_min: float = L_MIN, l_max: float = 250.0, n_top: int = 30,
                step: float = 0.03, max_spots: int = 300) -> list[tuple[np.ndarray, float, float]]:
    """(unit direction, length A, peak magnitude) of the strongest periodicities, best first."""
    norms = np.linalg.norm(rlps, axis=1)
    use = rlps[np.argsort(norms)[:max_spots]]
    x_max = float(np.linalg.norm(use, axis=1).max())
    delta = 1.0 / (2.2 * l_max)  # bins fine enough for l_max (Nyquist)
    nb = 1 << int(math.ceil(math.log2(2 * x_max / delta + 1)))
    dirs = hemisphere(int(2 * math.pi / step**2))
    idx = np.clip(np.floor((use @ dirs.T + x_max) / delta).astype(np.int64), 0, nb - 1)  # (N, D)
    flat = (np.arange(len(dirs))[None, :] * nb + idx).ravel()
    hist = np.bincount(flat, minlength=len(dirs) * nb).reshape(len(dirs), nb).astype(np.float32)
    spec = np.abs(np.fft.rfft(hist, axis=1))
    lengths = np.arange(spec.shape[1]) / (nb * delta)
    ks = np.flatnonzero((lengths >= l_min) & (lengths <= l_max))
    sub = spec[:, ks]
    best = np.argmax(sub, axis=1)
    rows = np.arange(len(dirs))
    mag = sub[rows, best]
    # The strongest peak can be a harmonic (2L, 3L, ...): the fundamental L/d when it is nearly as strong.
    k_best = ks[best]
    for d in (2, 3, 4, 5):
        k_sub = np.rint(k_best / d).astype(np.int64)
        take = (k_sub >= ks[0]) & (spec[rows, np.clip(k_sub, 0, spec.shape[1] - 1)] >= 0.5 * mag)
        k_best = np.where(take, k_sub, k_best)
    found = lengths[k_best]
    order = np.argsort(mag)[::-1][: 100 * n_top]
    top = dirs[order]
    free = np.ones(len(top), dtype=bool)
    cos_sep = math.cos(3 * step)
    out = []
    for i in range(len(top)):
        if not free[i]:
            continue
        out.append((top[i], float(found[order[i]]), float(mag[order[i]])))
        if len(out) >= n_top:
            break
        free &= np.abs(top @ top[i]) < cos_sep
    return out


def _refine_vector(rlps: np.ndarray, u: np.ndarray, length: float, step: float) -> np.ndarray:
    """Direction (local grids) and length (a 1-D scan) of one vector, by sum cos(2 pi r . t)."""
    norms = np.linalg.norm(rlps, axis=1)
    offsets = np.array([(i, j) for i in range(-3, 4) for j in range(-3, 4)], dtype=np.float64) / 3.0
    for _ in range(3):
        use = rlps[norms <= 0.3 / (length * step / 3)]
        if len(use) < 6:
            use = rlps[np.argsort(norms)[:40]]
        e1 = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(u, e1)
        scales = length * (1.0 + np.linspace(-0.04, 0.04, 17))
        cand = u[None, :] + step * (offsets[:, :1] * e1[None, :] + offsets[:, 1:] * e2[None, :])
        cand /= np.linalg.norm(cand, axis=1)[:, None]
        vecs = (scales[:, None, None] * cand[None, :, :]).reshape(-1, 3)
        score = np.cos(2 * math.pi * (use @ vecs.T)).sum(axis=0)
        best = vecs[int(np.argmax(score))]
        length = float(np.linalg.norm(best))
        u = best / length
        step /= 3.0
    return u * length


def find_basis(rlps: np.ndarray, tol: float = 0.2) -> np.ndarray | None:
    """A direct basis (rows) from the strongest FFT vectors: the non-coplanar triple that indexes the most
    low-resolution rlps, the smaller volume breaking ties."""
    if len(rlps) < 10:
        return None
    vectors = [_refine_vector(rlps, u, length, 0.03) for u, length, _ in fft_vectors(rlps)[:15]]
    vectors = [v for v in vectors if np.linalg.norm(v) >= 0.9 * L_MIN]
    if len(vectors) < 3:
        return None
    norms = np.linalg.norm(rlps, axis=1)
    low = rlps[norms <= np.quantile(norms, 0.5)]
    best = None
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            for k in range(j + 1, len(vectors)):
                basis = np.array([vectors[i], vectors[j], vectors[k]])
                lens = np.linalg.norm(basis, axis=1)
                volume = abs(float(np.linalg.det(basis)))
                if volume < 0.3 * float(np.prod(lens)):
                    continue
                frac = low @ basis.T
                count = int((np.abs(frac - np.round(frac)).max(axis=1) < tol).sum())
                key = (count, -volume)
                if best is None or key > best[0]:
                    best = (key, basis)
    if best is None:
        return None
    basis = _smallest_cell(best[1], low, tol)
    if np.linalg.det(basis) < 0:
        basis = -basis
    return basis


def _fractions() -> np.ndarray:
    out = []
    for n in (2, 3, 4, 5, 6):
        for f in np.ndindex(n, n, n):
            f = np.array(f, dtype=np.float64) / n
            if f.any() and (np.isclose(f, 1.0 / n)).any():
                out.append(f)
    return np.array(out)


_FRACTIONS = _fractions()


def _smallest_cell(basis: np.ndarray, low: np.ndarray, tol: float) -> np.ndarray:
    """A basis found from strong vectors can span a superlattice (a larger cell indexes every spot of the true
    one): while a fraction of the cell (b_i / n, (b_i + b_j) / 2, ...) is also a lattice vector of the spots
    (near-integer projections on as many rlps as the basis vectors), it replaces the basis vector it divides."""
    for _ in range(6):
        frac = low @ basis.T
        ok = (np.abs(frac - np.round(frac)) < tol).all(axis=1)
        if ok.sum() < 6:
            return basis
        proj = low[ok] @ (_FRACTIONS @ basis).T
        good = (np.abs(proj - np.round(proj)) < tol).mean(axis=0)
        candidates = np.flatnonzero(good >= 0.9)
        if not len(candidates):
            return basis
        # The one dividing the volume most (the largest n), then the best agreement.
        pick = max(candidates, key=lambda c: (1.0 / _FRACTIONS[c][_FRACTIONS[c] > 0].min(), good[c]))
        f = _FRACTIONS[pick]
        i = int(np.flatnonzero(np.isclose(f, f[f > 0].min()))[0])
        basis = basis.copy()
        basis[i] = f @ basis
    return basis


def symmetric_cell(cell: list[float], lattice: str) -> list[float]:
    """The cell with its lattice's metric constraints imposed (equal lengths averaged, fixed angles set)."""
    a, b, c, al, be, ga = cell
    if lattice == "mP":
        return [a, b, c, 90.0, be, 90.0]
    if lattice == "oP":
        return [a, b, c, 90.0, 90.0, 90.0]
    if lattice == "tP":
        return [(a + b) / 2, (a + b) / 2, c, 90.0, 90.0, 90.0]
    if lattice == "hP":
        return [(a + b) / 2, (a + b) / 2, c, 90.0, 90.0, 120.0]
    if lattice == "cP":
        m = (a + b + c) / 3
        return [m, m, m, 90.0, 90.0, 90.0]
    return list(cell)


def reduce_and_classify(basis: np.ndarray, max_obliquity: float = 3.0) -> tuple[list[float], str, str, str | None]:
    """(conventional cell, lattice, space group, note) from a direct basis: gemmi's Niggli reduction, then its
    lattice symmetry; see the module's note on centred lattices (the note says when one was not resolved)."""
    import gemmi

    cell = cell_from_direct(basis)
    gv = gemmi.GruberVector(gemmi.UnitCell(*cell), "P", True)
    gv.niggli_reduce(100)
    reduced = gv.get_cell()
    rcell = [reduced.a, reduced.b, reduced.c, reduced.alpha, reduced.beta, reduced.gamma]
    ops = gemmi.find_lattice_symmetry(reduced, "P", max_obliquity)
    rots = [np.array(op.rot) // op.DEN for op in ops.sym_ops]
    order = len(rots)
    signed_perm = all(((np.abs(r) == 1).sum(axis=0) == 1).all() and ((np.abs(r) == 1).sum() == 3) for r in rots)
    if order == 1:
        return rcell, "aP", "P1", None
    if order == 12:
        lens, angles = rcell[:3], rcell[3:]
        for u in range(3):  # the six-fold axis: the angle of 120 degrees is between the two other axes
            others = [i for i in range(3) if i != u]
            same = abs(lens[others[0]] - lens[others[1]]) < 0.03 * lens[others[0]]
            if abs(angles[u] - 120) < max_obliquity + 1 and same:
                a = (lens[others[0]] + lens[others[1]]) / 2
                return [a, a, lens[u], 90.0, 90.0, 120.0], "hP", LOWEST_SPACE_GROUP["hP"], None
    if signed_perm and order in (2, 4, 8, 24):
        lattice = {2: "mP", 4: "oP", 8: "tP", 24: "cP"}[order]
        if lattice == "tP":
            # The four-fold axis: the reduced cell's odd length out goes to c.
            a, b, c = rcell[:3]
            if abs(a - b) > abs(b - c):
                rcell = [b, c, a, 90.0, 90.0, 90.0]
            elif abs(a - b) > abs(a - c):
                rcell = [a, c, b, 90.0, 90.0, 90.0]
        if lattice == "mP":
            # The two-fold axis is b: the axis whose two angles are 90.
            angles = rcell[3:]
            unique = [i for i in range(3) if all(abs(angles[j] - 90) < max_obliquity for j in range(3) if j != i)]
            if unique and unique[0] != 1:
                u = unique[0]
                lens = rcell[:3]
                others = [i for i in range(3) if i != u]
                rcell = [lens[others[0]], lens[u], lens[others[1]], 90.0, angles[u], 90.0]
        return rcell, lattice, LOWEST_SPACE_GROUP[lattice], None
    return rcell, "aP", "P1", (f"ab initio: the reduced cell has {order} lattice symmetry operations (a centred or "
                               f"non-standard setting, not resolved yet): reported as aP")
