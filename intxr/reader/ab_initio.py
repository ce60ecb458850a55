"""Ab initio cell search for one still (no target cell): a 1-D FFT over directions, as DIALS's `fft1d` does it
(Steller, Bolotovsky & Rossmann 1997, J. Appl. Cryst. 30, 1036): for each direction u on a hemisphere the
low-resolution rlps are projected onto u and histogrammed; a real-lattice vector along u of length L makes the
projections periodic with period 1/L, a peak of the histogram's Fourier transform at L. The strongest directions
(with their lengths, refined on local grids) give candidate vectors; the non-coplanar triple that indexes most
low-resolution rlps is the basis; gemmi's Niggli reduction gives the reduced cell, and gemmi's lattice symmetry
search (Le Page 1982: two-fold axes within `max_obliquity` degrees) its metric symmetry.

The Bravais lattice and conventional cell follow from that symmetry (`conventional_setting`): the holohedry's
order gives the crystal family, its rotation axes the conventional axes, and the volume ratio with the reduced
vectors' conventional coordinates the centring, so centred lattices (mC, oC, oI, oF, tI, hR, cI, cF) are found as
primitive ones are. The cell found is then handed to the known-cell indexer as its target, with all its checks.
"""

from __future__ import annotations

import math

import numpy as np

from intxr.reader.indexing import LOWEST_SPACE_GROUP, _lattice_score, cell_from_direct, hemisphere

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
    # Bin of each projection, per direction, in int32 and in place: the (N, D) arrays are several MB, and
    # their page faults cost more than the arithmetic. proj + x_max >= 0, so truncation is floor.
    proj = use.astype(np.float32) @ dirs.T.astype(np.float32)  # (N, D)
    proj += np.float32(x_max)
    proj *= np.float32(1.0 / delta)
    idx = proj.astype(np.int32)
    del proj
    np.minimum(idx, nb - 1, out=idx)
    idx += (np.arange(len(dirs), dtype=np.int32) * nb)[None, :]
    hist = np.bincount(idx.ravel(), minlength=len(dirs) * nb).reshape(len(dirs), nb).astype(np.float32)
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


def _refine_vector(rlps: np.ndarray, u: np.ndarray, length: float, step: float,
                   max_spots: int = 200) -> np.ndarray:
    """Direction (local grids) and length (a 1-D scan) of one vector, by sum cos(2 pi r . t) over the
    `max_spots` lowest-resolution rlps (enough for a starting basis: the indexer refines it against every spot)."""
    norms = np.linalg.norm(rlps, axis=1)
    if len(rlps) > max_spots:
        order = np.argsort(norms)[:max_spots]
        rlps, norms = rlps[order], norms[order]
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
        # The known-cell search's direction score (sum cos(2 pi r . t), float32 kernel) with the lengths in the
        # vectors themselves.
        score = _lattice_score(use, vecs, 1.0)
        best = vecs[int(np.argmax(score))]
        length = float(np.linalg.norm(best))
        u = best / length
        step /= 3.0
    return u * length


def find_basis(rlps: np.ndarray, tol: float = 0.12, n_vectors: int = 20) -> np.ndarray | None:
    """A direct basis (rows) from the `n_vectors` strongest FFT vectors: the non-coplanar triple that indexes the
    most low-resolution rlps, the smaller volume breaking ties. An rlp is indexed by a triple when its projection
    on each of the three is within `tol` of an integer, so the counts of all triples come from one boolean matrix
    (rlps x vectors) and two products, not a loop over triples. `tol` is tight (0.12, not index assignment's 0.3):
    with two crystals in the beam a triple mixing their vectors indexes many spots of both loosely."""
    if len(rlps) < 10:
        return None
    vectors = [_refine_vector(rlps, u, length, 0.03) for u, length, _ in fft_vectors(rlps)[:n_vectors]]
    vectors = np.array([v for v in vectors if np.linalg.norm(v) >= 0.9 * L_MIN])
    if len(vectors) < 3:
        return None
    norms = np.linalg.norm(rlps, axis=1)
    low = rlps[norms <= np.quantile(norms, 0.5)]
    proj = low @ vectors.T
    near = (np.abs(proj - np.round(proj)) < tol).astype(np.float32)  # (rlps, vectors)
    n = len(vectors)
    i, j, k = (t.ravel() for t in np.meshgrid(*(np.arange(n),) * 3, indexing="ij"))
    triples = (i < j) & (j < k)
    i, j, k = i[triples], j[triples], k[triples]
    counts = np.einsum("ri,rj,rk->ijk", near, near, near, optimize=True)[i, j, k]
    bases = np.stack([vectors[i], vectors[j], vectors[k]], axis=1)  # (triples, 3, 3)
    volumes = np.abs(np.linalg.det(bases))
    flat = volumes >= 0.3 * np.prod(np.linalg.norm(bases, axis=2), axis=1)  # coplanar triples give no cell
    if not flat.any():
        return None
    candidates = np.flatnonzero(flat)
    best = candidates[np.lexsort((volumes[candidates], -np.rint(counts[candidates])))[0]]
    basis = _smallest_cell(bases[best], low, tol)
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
    family = lattice[0]
    if family == "m":
        return [a, b, c, 90.0, be, 90.0]
    if family == "o":
        return [a, b, c, 90.0, 90.0, 90.0]
    if family == "t":
        return [(a + b) / 2, (a + b) / 2, c, 90.0, 90.0, 90.0]
    if family == "h":
        return [(a + b) / 2, (a + b) / 2, c, 90.0, 90.0, 120.0]
    if family == "c":
        m = (a + b + c) / 3
        return [m, m, m, 90.0, 90.0, 90.0]
    return list(cell)


# Lattice vectors of a Niggli-reduced basis, as integer coordinates: the conventional axes of every Bravais
# lattice are short combinations of the reduced vectors (F: a + b - c and the like; hR: a - b, a + b + c).
_VECTORS = np.array([n for n in np.ndindex(7, 7, 7) if any(v != 3 for v in n)], dtype=np.int64) - 3
_VECTORS = _VECTORS[np.gcd.reduce(np.abs(_VECTORS), axis=1) == 1]

# The proper rotations of each holohedry: 1 (aP), 2 (2/m), 4 (mmm), 8 (4/mmm), 6 (-3m), 12 (6/mmm), 24 (m-3m).
_FAMILY_BY_ORDER = {1: "a", 2: "m", 4: "o", 8: "t", 6: "hR", 12: "hP", 24: "c"}
# A rotation's order from its trace (proper rotations: 1 + 2 cos(2 pi / n)).
_ORDER_BY_TRACE = {3: 1, -1: 2, 0: 3, 1: 4, 2: 6}
# The Bravais lattices, with the centring each conventional cell may have.
_ALLOWED = {"m": "PC", "o": "PCIF", "t": "PI", "c": "PIF"}


def _centring(m: np.ndarray) -> str | None:
    """Centring of the conventional basis M (rows: conventional vectors in reduced-basis coordinates) from the
    fractional conventional coordinates of the reduced vectors (rows of M^-1): P, C, A, B, I, F, R (obverse),
    or None when it is none of these."""
    det = round(abs(float(np.linalg.det(m))))
    if det == 1:
        return "P"
    frac = np.linalg.inv(m.astype(np.float64))
    frac = np.round((frac - np.floor(frac + 1e-9)) * 6) / 6 % 1.0  # translations modulo the lattice
    points = {tuple(np.round(row, 4)) for row in frac if np.abs(row).max() > 1e-6}
    half = {(0.5, 0.5, 0.0): "C", (0.0, 0.5, 0.5): "A", (0.5, 0.0, 0.5): "B", (0.5, 0.5, 0.5): "I"}
    if det == 2 and len(points) == 1:
        return half.get(points.pop())
    if det == 4 and points <= {(0.5, 0.5, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5)}:
        return "F"
    if det == 3:
        third = {tuple(np.round(p, 4)) for p in [(2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)]}
        if points <= third:
            return "R"
        return "reverse"
    return None


def conventional_setting(rcell: list[float], rots: list[np.ndarray]) -> tuple[list[float], str] | None:
    """The conventional cell and Bravais lattice of a Niggli-reduced cell from its lattice symmetry (the proper
    rotations, integer matrices acting on reduced fractional coordinates): the holohedry's order gives the crystal
    family; its rotation axes give the conventional axes (International Tables A, ch. 3.1: b along the monoclinic
    two-fold, c along the four-, three- or six-fold, a, b, c along the orthorhombic two-folds and the cubic
    four-folds), each the shortest lattice vector along its axis; the volume ratio and the reduced vectors'
    conventional coordinates give the centring (C, I, F, R obverse). None when the symmetry fits no lattice."""
    from intxr.reader.indexing import orth_matrix

    family = _FAMILY_BY_ORDER.get(len(rots))
    if family is None:
        return None
    if family == "a":
        return list(rcell), "aP"
    d = orth_matrix(rcell)
    g = d @ d.T
    lengths = np.sqrt(np.einsum("ij,jk,ik->i", _VECTORS, g, _VECTORS))
    by_order: dict[int, list[np.ndarray]] = {}
    for r in rots:
        by_order.setdefault(_ORDER_BY_TRACE.get(int(round(np.trace(r))), 0), []).append(r)

    def fixed(r: np.ndarray) -> np.ndarray:
        return (_VECTORS @ r.T == _VECTORS).all(axis=1)

    def shortest(mask: np.ndarray) -> np.ndarray | None:
        if not mask.any():
            return None
        return _VECTORS[np.flatnonzero(mask)[np.argmin(lengths[mask])]]

    def perpendicular(r: np.ndarray, n: int) -> np.ndarray:
        total, power = np.zeros_like(_VECTORS), _VECTORS.copy()
        for _ in range(n):
            total += power
            power = power @ r.T
        return (total == 0).all(axis=1)

    def axes(order: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for r in by_order.get(order, []):
            v = shortest(fixed(r))
            if v is not None and not any(abs(int(v @ w)) and (np.cross(v, w) == 0).all() for w in out):
                out.append(v)
        return out

    if family == "m":
        [r2] = by_order[2]
        b = shortest(fixed(r2))
        plane = perpendicular(r2, 2)
        a = shortest(plane)
        if b is None or a is None:
            return None
        c = shortest(plane & (np.cross(_VECTORS, a) != 0).any(axis=1))
        m = np.array([a, b, c])
    elif family == "o":
        found = axes(2)
        if len(found) != 3:
            return None
        m = np.array(found)
    elif family == "c":
        found = axes(4)
        if len(found) != 3:
            return None
        m = np.array(found)
    else:
        order = {"t": 4, "hP": 6, "hR": 3}[family]
        r = by_order.get(order, [None])[0]
        if r is None:
            return None
        c = shortest(fixed(r))
        plane = perpendicular(r, order)
        if family == "t":  # a along a two-fold: the shortest such gives tP or tI (never the larger tC)
            plane &= np.any([fixed(r2) for r2 in by_order.get(2, [])], axis=0)
        a = shortest(plane)
        if c is None or a is None:
            return None
        b = r @ a if family == "t" else r @ r @ a if family == "hP" else r @ a
        m = np.array([a, b, c])
    if round(np.linalg.det(m)) < 0:
        m[2] = -m[2] if family != "m" else m[2]
        m[1] = -m[1] if family == "m" else m[1]
    centring = _centring(m)
    if family == "hR" and centring == "reverse":
        m[0], m[1] = -m[0], -m[1]  # a half turn about c: reverse -> obverse
        centring = _centring(m)
    if family == "m" and centring in ("A", "I"):
        # A: swap a and c (b reversed keeps the hand); I: a + c with c gives C.
        m = np.array([m[2], -m[1], m[0]]) if centring == "A" else np.array([m[0] + m[2], m[1], m[2]])
        centring = _centring(m)
    if family == "o" and centring in ("A", "B"):
        m = np.roll(m, 2 if centring == "A" else 1, axis=0)  # the centred face to ab; cyclic keeps the hand
        centring = _centring(m)
    if family == "o" and centring == "C" and m[0] @ g @ m[0] > m[1] @ g @ m[1]:
        m = np.array([m[1], m[0], -m[2]])  # a < b
    if family == "m" and centring in ("P", "C"):
        # Of the settings with the same b and centring (a, c any basis of the plane lattice), the one with beta
        # nearest 90 degrees, then the shortest a + c.
        settings = []
        for i, j, k, ell in np.ndindex(5, 5, 5, 5):
            t = np.array([[i - 2, j - 2], [k - 2, ell - 2]])
            if round(abs(np.linalg.det(t))) != 1:
                continue
            mm = np.array([t[0, 0] * m[0] + t[0, 1] * m[2], m[1], t[1, 0] * m[0] + t[1, 1] * m[2]])
            if round(np.linalg.det(mm)) < 0 or _centring(mm) != centring:
                continue
            cell = cell_from_direct(mm @ d)
            settings.append((round(abs(cell[4] - 90.0), 1), cell[0] + cell[2], mm.tolist()))
        m = np.array(min(settings)[2]) if settings else m
        if cell_from_direct(m @ d)[4] < 90.0:
            m = np.array([m[0], -m[1], -m[2]])  # beta obtuse, as conventional (same hand, same centring)
    if family == "o" and centring in ("P", "I", "F"):
        order_abc = np.argsort([float(np.sqrt(v @ g @ v)) for v in m])
        m = m[order_abc]
        if round(np.linalg.det(m)) < 0:
            m[2] = -m[2]
    if family in ("hP", "hR"):
        lattice = family if centring == ("P" if family == "hP" else "R") else None
    else:
        lattice = family + centring if centring and centring in _ALLOWED[family] else None
    if lattice is None:
        return None
    return cell_from_direct(m @ d), lattice


def reduce_and_classify(basis: np.ndarray, max_obliquity: float = 3.0, length_tolerance: float = 0.03,
                        classify: bool = True) -> tuple[list[float], str, str, str | None]:
    """(conventional cell, lattice, space group, note) from a direct basis: gemmi's Niggli reduction, its lattice
    symmetry (Le Page's two-fold axes within `max_obliquity` degrees), then the conventional setting. Obliquity alone
    lets a metric through whose lengths are several % off the lattice's (a tI cell with c/a 1.5 is 3 degrees from
    cF): the highest symmetry whose conventional cell is within `length_tolerance` of its symmetric self (and its
    angles within max_obliquity) is taken, tightening the obliquity until one is. A symmetry that fits no Bravais
    lattice is reported as aP, with a note saying so. classify=False: the Niggli cell alone, as aP."""
    import gemmi

    cell = cell_from_direct(basis)
    gv = gemmi.GruberVector(gemmi.UnitCell(*cell), "P", True)
    gv.niggli_reduce(100)
    reduced = gv.get_cell()
    rcell = [reduced.a, reduced.b, reduced.c, reduced.alpha, reduced.beta, reduced.gamma]
    obliquity, note = max_obliquity, None
    while classify and obliquity > 0.1:
        ops = gemmi.find_lattice_symmetry(reduced, "P", obliquity)
        rots = [np.array(op.rot, dtype=np.int64) // op.DEN for op in ops.sym_ops]
        rots = [r for r in rots if round(np.linalg.det(r)) == 1]
        got = conventional_setting(rcell, rots)
        if got is None:
            note = (f"ab initio: the reduced cell's {len(rots)} lattice symmetry operations fit no Bravais lattice: "
                    "reported as aP")
        else:
            raw, lattice = got
            conventional = symmetric_cell(raw, lattice)
            if all(abs(r - c) <= length_tolerance * c for r, c in zip(raw[:3], conventional[:3], strict=True)) and \
                    all(abs(r - c) <= max_obliquity for r, c in zip(raw[3:], conventional[3:], strict=True)):
                return conventional, lattice, LOWEST_SPACE_GROUP[lattice], None
        if len(rots) == 1:
            break
        obliquity /= 2
    return rcell, "aP", "P1", note
