"""The one geometry model: detector panels, beam, goniometer, as DIALS's dxtbx has them.

Every consumer (reader, find-spots, the GUI, the simulator) uses `Geometry`. The Splitter normalises a
header into it (Rust, `intxr._splitter.geometry_from_header` / `geometry_from_cbf_header`) and serves it as
the series info's `"geometry"` (the wire dict, `Geometry.from_wire`); an NXmx master is read with
`Geometry.from_nxmx`.

Conventions are dxtbx's laboratory frame: lengths in mm, angles in degrees, wavelength in Angstrom. A panel
is a plane: lab position of its pixel (0, 0) outer corner (`origin`), unit `fast_axis` and `slow_axis`,
pixel size and size in pixels; `frame_offset` says where its pixel (0, 0) sits in the frame array. The beam
direction points from the sample to the source, so s0 = -beam_direction / wavelength (dxtbx Beam).

Pixel -> 1/d^2 as DIALS's per-image analysis does it (centroid_px_to_mm, map_centroids_to_reciprocal_space,
|rlp|^2): pixel -> mm (with parallax) -> lab point origin + x fast + y slow -> s1 = unit * 1/lambda -> s1 - s0.

Parallax: a photon is absorbed at some depth in the sensor, so it is recorded displaced along its ray.
dxtbx's ParallaxCorrectedPxMmStrategy.to_millimeter (dxtbx/model/parallax_correction.h,
parallax_correction_inv; Hülsen, Brönnimann & Eikenberry 2005, J. Appl. Cryst. 38, 488) takes u, the unit
ray to the uncorrected mm point, the panel normal fast x slow (flipped to point away from the sample),
cos t = u . normal, o = 1/mu - (t0/cos t + 1/mu) exp(-mu t0 / cos t), and moves the point by -o (u.fast,
u.slow). dxtbx builds that strategy only for a panel with a sensor material (a miniCBF without a `Silicon`
line, or a detector given without sensor, gets none); here: a panel with a material and thickness > 0
whose attenuation we know (silicon).

Missing essentials (no wavelength, no distance, ...) stay missing: `Geometry.missing` names them,
`resolution_known` is False, and the spot finder reports that instead of numbers from invented values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

WIRE_VERSION = 1
HC_EV_A = 12398.419843  # h c in eV Angstrom (CODATA): E = hc / lambda
# Without these a pixel has no resolution (the other entries of `missing` only lack a display value).
RESOLUTION_ESSENTIALS = frozenset(
    {"wavelength", "distance", "beam_center", "pixel_size", "panels", "detector_translation", "orientation"}
)
# dxtbx converts NeXus's McStas frame to its imgCIF one with diag(-1, 1, -1) (dxtbx/nexus/__init__.py,
# MCSTAS_TO_IMGCIF): x and z flip, y stays.
MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])


class GeometryError(ValueError):
    """A geometry that cannot be read (malformed wire dict, unreadable NXmx): one line, what and where."""


# ---------------------------------------------------------------------------------------------
# Sensor attenuation

# Mass attenuation coefficients of silicon, mu/rho in cm^2/g against photon energy in MeV (NIST,
# Hubbell & Seltzer, X-ray mass attenuation coefficients, Table 3, Z = 14), log-log interpolated.
_SI_ENERGY_MEV = np.array([0.001, 0.0015, 0.0018389, 0.0018389, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008,
                           0.010, 0.015, 0.020, 0.030, 0.040, 0.050, 0.060, 0.080, 0.100])  # fmt: skip
_SI_MU_RHO = np.array([1570.0, 535.5, 309.2, 3192.0, 2777.0, 978.4, 452.9, 245.0, 147.0, 64.68,
                       33.89, 10.34, 4.464, 1.436, 0.7012, 0.4385, 0.3207, 0.2228, 0.1835])  # fmt: skip
_SI_DENSITY = 2.33  # g/cm^3


def attenuation_coefficient(material: str, wavelength: float | None) -> float | None:
    """Linear attenuation coefficient (1/mm) of a sensor material at a wavelength; None when unknown."""
    if wavelength is None or wavelength <= 0 or str(material).lower() not in ("si", "silicon"):
        return None
    energy = HC_EV_A / wavelength / 1e6
    if not _SI_ENERGY_MEV[0] <= energy <= _SI_ENERGY_MEV[-1]:
        return None
    i = min(int(np.searchsorted(_SI_ENERGY_MEV, energy, side="right")) - 1, len(_SI_ENERGY_MEV) - 2)
    x0, x1 = np.log(_SI_ENERGY_MEV[i]), np.log(_SI_ENERGY_MEV[i + 1])
    y0, y1 = np.log(_SI_MU_RHO[i]), np.log(_SI_MU_RHO[i + 1])
    mu_rho = np.exp(y0 + (y1 - y0) * (np.log(energy) - x0) / (x1 - x0))
    return float(mu_rho * _SI_DENSITY / 10.0)


# ---------------------------------------------------------------------------------------------
# The model


def _vec(value, n: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise GeometryError(f"geometry: {what} must be {n} numbers, got {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise GeometryError(f"geometry: {what} must be {n} finite numbers, got {value!r}")
    return out


def _unit(v, what: str) -> tuple[float, float, float]:
    v = _vec(v, 3, what)
    norm = math.sqrt(sum(c * c for c in v))
    if norm == 0:
        raise GeometryError(f"geometry: {what} is the zero vector")
    return tuple(c / norm for c in v)  # type: ignore[return-value]


def rotate(v, axis, angle_deg: float) -> tuple[float, float, float]:
    """v rotated by angle_deg about the unit vector `axis`, right-handed (Rodrigues)."""
    k = np.asarray(_unit(axis, "rotation axis"))
    v = np.asarray(v, dtype=np.float64)
    a = math.radians(angle_deg)
    out = v * math.cos(a) + np.cross(k, v) * math.sin(a) + k * float(k @ v) * (1 - math.cos(a))
    return tuple(float(c) for c in out)  # type: ignore[return-value]


@dataclass(frozen=True)
class Panel:
    name: str
    origin: tuple[float, float, float]  # mm, lab position of the outer corner of pixel (0, 0)
    fast_axis: tuple[float, float, float]
    slow_axis: tuple[float, float, float]
    pixel_size: tuple[float, float]  # fast, slow (mm)
    image_size: tuple[int, int]  # fast, slow (pixels)
    frame_offset: tuple[int, int] = (0, 0)  # where pixel (0, 0) sits in the frame array (fast, slow)
    thickness: float = 0.0  # mm
    material: str = ""
    trusted_range: tuple[float, float] | None = None

    @property
    def normal(self) -> np.ndarray:
        """fast x slow, pointing away from the sample (as dxtbx's attenuation_length orients it)."""
        n = np.cross(self.fast_axis, self.slow_axis)
        return -n if float(np.dot(self.origin, n)) < 0 else n

    @property
    def distance(self) -> float:
        """dxtbx Panel.get_distance: the origin's component along the normal (mm)."""
        return float(np.dot(self.origin, self.normal))

    def contains(self, x, y) -> np.ndarray:
        fx, fy = self.frame_offset
        nx, ny = self.image_size
        return (x >= fx) & (x < fx + nx) & (y >= fy) & (y < fy + ny)

    def lab(self, x, y, mu: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lab coordinates (mm) of panel pixel coordinates x (fast), y (slow): mm with dxtbx's parallax
        correction when mu is given, then origin + x fast + y slow."""
        o, f, s = (np.asarray(a, dtype=np.float64) for a in (self.origin, self.fast_axis, self.slow_axis))
        mx = np.asarray(x, dtype=np.float64) * self.pixel_size[0]
        my = np.asarray(y, dtype=np.float64) * self.pixel_size[1]
        vx, vy, vz = (o[i] + mx * f[i] + my * s[i] for i in range(3))
        if mu is not None and self.thickness > 0:
            t0 = self.thickness
            length = np.sqrt(vx * vx + vy * vy + vz * vz)
            n = self.normal
            cos_t = (vx * n[0] + vy * n[1] + vz * n[2]) / length
            offset = 1.0 / mu - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
            mx = mx - (vx * f[0] + vy * f[1] + vz * f[2]) / length * offset
            my = my - (vx * s[0] + vy * s[1] + vz * s[2]) / length * offset
            vx, vy, vz = (o[i] + mx * f[i] + my * s[i] for i in range(3))
        return vx, vy, vz

    def to_wire(self) -> dict:
        return {
            "name": self.name,
            "origin": list(self.origin),
            "fast_axis": list(self.fast_axis),
            "slow_axis": list(self.slow_axis),
            "pixel_size": list(self.pixel_size),
            "image_size": list(self.image_size),
            "frame_offset": list(self.frame_offset),
            "thickness": self.thickness,
            "material": self.material,
            "trusted_range": None if self.trusted_range is None else list(self.trusted_range),
        }

    @classmethod
    def from_wire(cls, d: dict, index: int = 0) -> Panel:
        if not isinstance(d, dict):
            raise GeometryError(f"geometry: panel {index} is not an object")
        where = f"panel {index}"
        try:
            size = tuple(int(v) for v in d["image_size"])
            offset = tuple(int(v) for v in d.get("frame_offset") or (0, 0))
        except (KeyError, TypeError, ValueError):
            raise GeometryError(f"geometry: {where} needs image_size (and frame_offset) as 2 integers") from None
        if len(size) != 2 or min(size) < 1 or len(offset) != 2 or min(offset) < 0:
            raise GeometryError(f"geometry: {where} image_size {size} / frame_offset {offset} invalid")
        for key in ("origin", "fast_axis", "slow_axis", "pixel_size"):
            if key not in d:
                raise GeometryError(f"geometry: {where} has no {key}")
        pixel = _vec(d["pixel_size"], 2, f"{where} pixel_size")
        if min(pixel) <= 0:
            raise GeometryError(f"geometry: {where} pixel_size must be > 0, got {pixel}")
        trusted = d.get("trusted_range")
        return cls(
            name=str(d.get("name") or f"panel{index}"),
            origin=_vec(d["origin"], 3, f"{where} origin"),  # type: ignore[arg-type]
            fast_axis=_unit(d["fast_axis"], f"{where} fast_axis"),
            slow_axis=_unit(d["slow_axis"], f"{where} slow_axis"),
            pixel_size=pixel,  # type: ignore[arg-type]
            image_size=size,  # type: ignore[arg-type]
            frame_offset=offset,  # type: ignore[arg-type]
            thickness=float(d.get("thickness") or 0.0),
            material=str(d.get("material") or ""),
            trusted_range=None if trusted is None else _vec(trusted, 2, f"{where} trusted_range"),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Axis:
    name: str
    vector: tuple[float, float, float] | None  # None: the header named the axis but not its direction
    start: float = 0.0
    increment: float = 0.0


@dataclass(frozen=True)
class Geometry:
    wavelength: float | None = None  # Angstrom
    panels: tuple[Panel, ...] = ()
    beam_direction: tuple[float, float, float] = (0.0, 0.0, 1.0)  # sample -> source (dxtbx)
    two_theta: float = 0.0  # detector 2theta (deg), already in the panels; for display
    distance: float | None = None  # mm along the detector normal; for display and result lines
    beam_center: tuple[float, float] | None = None  # where the beam meets panel 0 (fast, slow px)
    axes: tuple[Axis, ...] = ()
    scan_axis: str | None = None
    count_time: float | None = None
    frame_time: float | None = None
    count_cutoff: int | None = None
    description: str = ""
    detector_number: str = ""
    detector_kind: str = "other"
    missing: tuple[str, ...] = ()
    source: str = ""

    # -- what is known -------------------------------------------------------------------------

    @property
    def resolution_missing(self) -> tuple[str, ...]:
        """The essentials a pixel's resolution needs that this geometry lacks (empty: all there)."""
        out = [m for m in self.missing if m in RESOLUTION_ESSENTIALS]
        if self.wavelength is None and "wavelength" not in out:
            out.append("wavelength")
        if not self.panels and "panels" not in out:
            out.append("panels")
        return tuple(out)

    @property
    def known(self) -> bool:
        """True when every pixel's resolution can be computed from the header's own values."""
        return not self.resolution_missing

    def missing_error(self) -> str | None:
        """The line a result carries when resolution-dependent numbers could not be computed."""
        lacking = self.resolution_missing
        if not lacking:
            return None
        where = f" ({self.source})" if self.source else ""
        return (f"geometry{where} has no {', '.join(lacking)}: resolution-dependent numbers "
                f"(ice rings, d_min, n_spots_4A, hres, score) not computed")

    @property
    def energy_ev(self) -> float | None:
        return None if self.wavelength is None else HC_EV_A / self.wavelength

    @property
    def s0(self) -> np.ndarray:
        """dxtbx's s0: -unit(beam_direction) / wavelength (1/A)."""
        if self.wavelength is None:
            raise GeometryError(self.missing_error() or "geometry has no wavelength")
        b = np.asarray(_unit(self.beam_direction, "beam_direction"))
        return -b / self.wavelength

    @property
    def frame_size(self) -> tuple[int, int]:
        """(fast, slow) extent of the frame the panels tile."""
        if not self.panels:
            return (0, 0)
        return (max(p.frame_offset[0] + p.image_size[0] for p in self.panels),
                max(p.frame_offset[1] + p.image_size[1] for p in self.panels))

    # -- builders ------------------------------------------------------------------------------

    @classmethod
    def simple(
        cls,
        *,
        wavelength: float | None,
        distance: float,
        beam_center: tuple[float, float],
        pixel_size: tuple[float, float],
        image_size: tuple[int, int],
        two_theta: float = 0.0,
        two_theta_axis: tuple[float, float, float] = (1.0, 0.0, 0.0),
        thickness: float = 0.0,
        material: str = "",
        trusted_range: tuple[float, float] | None = None,
        **fields,
    ) -> Geometry:
        """One flat panel facing the beam, as dxtbx's detector factory `simple` builds it (fast +x, slow -y,
        origin = -bx fast - by slow + distance (0, 0, -1), beam centre in pixels here), then, for a 2theta
        stage, origin and axes rotated by `two_theta` about `two_theta_axis`."""
        fast, slow = (1.0, 0.0, 0.0), (0.0, -1.0, 0.0)
        bx, by = beam_center[0] * pixel_size[0], beam_center[1] * pixel_size[1]
        origin = (-bx * fast[0] - by * slow[0], -bx * fast[1] - by * slow[1], -distance)
        if two_theta:
            origin, fast, slow = (rotate(v, two_theta_axis, two_theta) for v in (origin, fast, slow))
        panel = Panel("panel0", origin, fast, slow, tuple(pixel_size), tuple(int(v) for v in image_size),
                      (0, 0), float(thickness), material, trusted_range)  # type: ignore[arg-type]
        fields.setdefault("distance", float(distance))
        fields.setdefault("beam_center", (float(beam_center[0]), float(beam_center[1])))
        fields.setdefault("missing", () if wavelength is not None else ("wavelength",))
        return cls(wavelength=wavelength, panels=(panel,), two_theta=float(two_theta), **fields)

    @classmethod
    def unknown(cls, source: str, **fields) -> Geometry:
        """A frame that came without geometry (a .npy array): everything essential missing."""
        return cls(missing=("wavelength", "distance", "beam_center", "pixel_size"), source=source, **fields)

    # -- the wire ------------------------------------------------------------------------------

    def to_wire(self) -> dict:
        return {
            "version": WIRE_VERSION,
            "wavelength": self.wavelength,
            "beam_direction": list(self.beam_direction),
            "panels": [p.to_wire() for p in self.panels],
            "two_theta": self.two_theta,
            "distance": self.distance,
            "beam_center": None if self.beam_center is None else list(self.beam_center),
            "goniometer": {
                "axes": [{"name": a.name, "vector": None if a.vector is None else list(a.vector),
                          "start": a.start, "increment": a.increment} for a in self.axes],
                "scan_axis": self.scan_axis,
            },
            "count_time": self.count_time,
            "frame_time": self.frame_time,
            "count_cutoff": self.count_cutoff,
            "description": self.description,
            "detector_number": self.detector_number,
            "detector_kind": self.detector_kind,
            "missing": list(self.missing),
            "source": self.source,
        }

    @classmethod
    def from_wire(cls, d: dict) -> Geometry:
        """The Splitter's geometry dict (series info `"geometry"`), validated once."""
        if not isinstance(d, dict):
            raise GeometryError(f"geometry: expected an object, got {type(d).__name__}")
        version = d.get("version", WIRE_VERSION)
        if version != WIRE_VERSION:
            raise GeometryError(f"geometry: wire version {version!r} not understood (this reader takes {WIRE_VERSION})")

        def number(key: str, kind=float):
            value = d.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GeometryError(f"geometry: {key} must be a number or null, got {value!r}")
            return kind(value)

        wavelength = number("wavelength")
        if wavelength is not None and wavelength <= 0:
            raise GeometryError(f"geometry: wavelength must be > 0, got {wavelength}")
        panels = d.get("panels") or []
        if not isinstance(panels, list):
            raise GeometryError("geometry: panels must be a list")
        gonio = d.get("goniometer") or {}
        if not isinstance(gonio, dict):
            raise GeometryError("geometry: goniometer must be an object")
        axes = []
        for i, a in enumerate(gonio.get("axes") or []):
            if not isinstance(a, dict):
                raise GeometryError(f"geometry: goniometer axis {i} is not an object")
            vector = a.get("vector")
            axes.append(Axis(str(a.get("name", f"axis{i}")),
                             None if vector is None else _unit(vector, f"axis {i} vector"),
                             float(a.get("start") or 0.0), float(a.get("increment") or 0.0)))
        beam_center = d.get("beam_center")
        missing = d.get("missing") or []
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise GeometryError("geometry: missing must be a list of names")
        cutoff = number("count_cutoff")
        return cls(
            wavelength=wavelength,
            panels=tuple(Panel.from_wire(p, i) for i, p in enumerate(panels)),
            beam_direction=_unit(d.get("beam_direction") or (0, 0, 1), "beam_direction"),
            two_theta=number("two_theta") or 0.0,
            distance=number("distance"),
            beam_center=None if beam_center is None else _vec(beam_center, 2, "beam_center"),  # type: ignore[arg-type]
            axes=tuple(axes),
            scan_axis=gonio.get("scan_axis"),
            count_time=number("count_time"),
            frame_time=number("frame_time"),
            count_cutoff=None if cutoff is None else int(cutoff),
            description=str(d.get("description") or ""),
            detector_number=str(d.get("detector_number") or ""),
            detector_kind=str(d.get("detector_kind") or "other"),
            missing=tuple(missing),
            source=str(d.get("source") or ""),
        )

    @classmethod
    def from_nxmx(cls, f) -> Geometry:
        """From an open NXmx / DECTRIS master (h5py.File): see `_nxmx_geometry`."""
        return _nxmx_geometry(f)

    # -- display -------------------------------------------------------------------------------

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def beam_centre_px(self) -> tuple[float, float] | None:
        """Where the direct beam meets panel 0, in frame pixels (fast, slow): the header's value, else the
        beam ray intersected with the panel plane (no parallax: a display position)."""
        if self.beam_center is not None:
            return self.beam_center
        if not self.panels:
            return None
        p = self.panels[0]
        ray = -np.asarray(_unit(self.beam_direction, "beam_direction"))
        n = np.cross(p.fast_axis, p.slow_axis)
        denom = float(ray @ n)
        if abs(denom) < 1e-12:
            return None
        point = ray * float(np.dot(p.origin, n)) / denom - np.asarray(p.origin)
        return (float(point @ p.fast_axis) / p.pixel_size[0] + p.frame_offset[0],
                float(point @ p.slow_axis) / p.pixel_size[1] + p.frame_offset[1])

    def header_values(self) -> dict:
        """The flat values a detector header carries (the simulator writes its headers from these): beam
        centre in pixels, pixel size, distance and sensor thickness in mm, as panel 0 has them. A value
        the geometry lacks is None (the header then omits it, as a detector that did not send it)."""
        p = self.panels[0] if self.panels else None
        centre = self.beam_centre_px()
        omega = self.axis("omega")
        return {
            "wavelength": self.wavelength,
            "energy_ev": self.energy_ev,
            "distance": self.distance if self.distance is not None else (p.distance if p else None),
            "beam_center_x": None if centre is None else centre[0],
            "beam_center_y": None if centre is None else centre[1],
            "pixel_size_x": p.pixel_size[0] if p else None,
            "pixel_size_y": p.pixel_size[1] if p else None,
            "sensor_material": p.material if p else "",
            "sensor_thickness": p.thickness if p else 0.0,
            "two_theta": self.two_theta,
            "omega_start": omega.start if omega else 0.0,
            "omega_increment": omega.increment if omega else 0.0,
            "count_time": self.count_time,
            "frame_time": self.frame_time,
            "count_cutoff": self.count_cutoff,
            "description": self.description,
            "detector_number": self.detector_number,
        }

    def ring_points(self, d: float, n: int = 180) -> np.ndarray:
        """Frame pixel coordinates (fast, slow), shape (k, 2), of the resolution ring at d (A) on the
        panels: the Bragg cone 2theta = 2 asin(lambda / 2d) about the beam intersected with each panel's
        plane, points off every panel left out (no parallax: a display line)."""
        if not self.known or d <= 0 or self.wavelength / (2 * d) >= 1:
            return np.zeros((0, 2))
        two_theta = 2 * math.asin(self.wavelength / (2 * d))
        beam = -np.asarray(_unit(self.beam_direction, "beam_direction"))  # travel direction
        e1 = np.cross(beam, (0.0, 1.0, 0.0) if abs(beam[1]) < 0.9 else (1.0, 0.0, 0.0))
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(beam, e1)
        phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rays = (math.cos(two_theta) * beam[None, :]
                + math.sin(two_theta) * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2))
        points = []
        for p in self.panels:
            normal = np.cross(p.fast_axis, p.slow_axis)
            denom = rays @ normal
            with np.errstate(divide="ignore", invalid="ignore"):
                t = float(np.dot(p.origin, normal)) / denom
            hit = t > 0
            rel = rays[hit] * t[hit, None] - np.asarray(p.origin)
            fx = rel @ np.asarray(p.fast_axis) / p.pixel_size[0]
            fy = rel @ np.asarray(p.slow_axis) / p.pixel_size[1]
            on = (fx >= 0) & (fx <= p.image_size[0]) & (fy >= 0) & (fy <= p.image_size[1])
            points.append(np.stack([fx[on] + p.frame_offset[0], fy[on] + p.frame_offset[1]], axis=1))
        return np.concatenate(points) if points else np.zeros((0, 2))

    def ring_radius_px(self, d: float) -> float | None:
        """Radius in pixels of the ring at d around the beam centre, for a detector facing the beam (the
        flat case: distance tan 2theta / pixel size); the mean distance of `ring_points` otherwise."""
        if not self.known or self.wavelength / (2 * d) >= 1:
            return None
        p = self.panels[0]
        facing = abs(abs(float(np.dot(np.cross(p.fast_axis, p.slow_axis), self.beam_direction))) - 1) < 1e-9
        if facing and len(self.panels) == 1:
            return p.distance * math.tan(2 * math.asin(self.wavelength / (2 * d))) / p.pixel_size[0]
        points, centre = self.ring_points(d), self.beam_centre_px()
        if len(points) == 0 or centre is None:
            return None
        return float(np.mean(np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1])))

    def with_overrides(self, *, wavelength=None, distance=None, pixel_size=None, beam_center=None,
                       count_cutoff=None, image_size=None) -> Geometry:
        """A geometry with the values a user gave on the command line in place of the header's (or of
        nothing, for a .npy frame): a simple flat panel facing the beam, as dxtbx builds one."""
        given = {"wavelength": wavelength, "distance": distance, "pixel_size": pixel_size,
                 "beam_center": beam_center}
        if all(v is None for v in given.values()):
            return self if count_cutoff is None else replace(self, count_cutoff=count_cutoff)
        h = self.header_values()
        p = self.panels[0] if self.panels else None
        values = {
            "wavelength": wavelength if wavelength is not None else self.wavelength,
            "distance": distance if distance is not None else h["distance"],
            "pixel_size": (pixel_size, pixel_size) if isinstance(pixel_size, int | float) else (
                pixel_size if pixel_size is not None else (p.pixel_size if p else None)),
            "beam_center": beam_center if beam_center is not None else self.beam_centre_px(),
        }
        lacking = [k for k, v in values.items() if v is None]
        size = image_size or (p.image_size if p else None)
        if size is None:
            lacking.append("image_size")
        if lacking:
            return replace(self, missing=tuple(dict.fromkeys([*self.missing, *lacking])))
        return Geometry.simple(
            wavelength=values["wavelength"], distance=values["distance"], beam_center=tuple(values["beam_center"]),
            pixel_size=tuple(values["pixel_size"]), image_size=size,
            two_theta=self.two_theta if p is not None and distance is None and beam_center is None else 0.0,
            thickness=p.thickness if p else 0.0, material=p.material if p else "",
            trusted_range=p.trusted_range if p else None, axes=self.axes, scan_axis=self.scan_axis,
            count_time=self.count_time, frame_time=self.frame_time,
            count_cutoff=count_cutoff if count_cutoff is not None else self.count_cutoff,
            description=self.description, detector_number=self.detector_number, detector_kind=self.detector_kind,
            missing=tuple(m for m in self.missing if m not in RESOLUTION_ESSENTIALS and m not in given),
            source=f"{self.source} + command line" if self.source else "command line",
        )


# ---------------------------------------------------------------------------------------------
# Pixel -> resolution


def _as_points(x, y) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return x.ravel(), y.ravel(), x.shape


def panel_of(geometry: Geometry, x, y) -> np.ndarray:
    """Index of the panel each frame pixel coordinate lies on; a point off every panel (a gap between
    panels, or a centroid on a panel's far edge) goes to the nearest panel."""
    x, y, shape = _as_points(x, y)
    which = np.full(x.shape, -1, dtype=np.int64)
    best = np.full(x.shape, np.inf)
    for i, p in enumerate(geometry.panels):
        fx, fy = p.frame_offset
        nx, ny = p.image_size
        dx = np.maximum(np.maximum(fx - x, x - (fx + nx)), 0)
        dy = np.maximum(np.maximum(fy - y, y - (fy + ny)), 0)
        dist = np.hypot(dx, dy)
        inside = p.contains(x, y)
        dist = np.where(inside, -1.0, dist)
        closer = dist < best
        which[closer] = i
        best[closer] = dist[closer]
    return which.reshape(shape)


def lab_coordinates(geometry: Geometry, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lab coordinates (mm) of frame pixel coordinates (DIALS's convention: pixel i spans [i, i+1)), each
    through its panel, parallax-corrected where the panel has a sensor model."""
    if not geometry.panels:
        raise GeometryError(geometry.missing_error() or "geometry has no panels")
    x, y, shape = _as_points(x, y)
    out = [np.empty(x.shape) for _ in range(3)]
    which = panel_of(geometry, x, y).ravel()
    for i, p in enumerate(geometry.panels):
        sel = which == i
        if not sel.any():
            continue
        mu = attenuation_coefficient(p.material, geometry.wavelength) if p.material else None
        v = p.lab(x[sel] - p.frame_offset[0], y[sel] - p.frame_offset[1], mu)
        for k in range(3):
            out[k][sel] = v[k]
    return tuple(c.reshape(shape) for c in out)  # type: ignore[return-value]


def _d_star_sq_of(geometry: Geometry, vx, vy, vz) -> np.ndarray:
    s0 = geometry.s0
    inv = 1.0 / (geometry.wavelength * np.sqrt(vx * vx + vy * vy + vz * vz))
    rx, ry, rz = vx * inv - s0[0], vy * inv - s0[1], vz * inv - s0[2]
    return rx * rx + ry * ry + rz * rz


def d_star_sq(geometry: Geometry, x, y) -> np.ndarray:
    """1/d^2 (1/A^2) at frame pixel coordinates x (fast), y (slow), as DIALS maps a centroid: s1 - s0."""
    if not geometry.known:
        raise GeometryError(geometry.missing_error())
    return _d_star_sq_of(geometry, *lab_coordinates(geometry, x, y))


def d_spacing(geometry: Geometry, x, y) -> np.ndarray:
    """d in Angstrom at frame pixel coordinates (inf on the direct beam)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(d_star_sq(geometry, x, y))


@lru_cache(maxsize=8)
def _resolution_mask(geometry: Geometry, shape: tuple[int, int], d_min: float | None,
                     d_max: float | None) -> np.ndarray:
    ny, nx = shape
    keep = np.zeros(shape, dtype=bool)  # pixels on no panel are no detector pixels
    # dials.find_spots evaluates its resolution filter at pixel centres and masks d <= d_min and
    # d >= d_max (dials/util/masking.h): the kept range is open at both ends. In 1/d^2: d > d_min is
    # dss < 1/d_min^2.
    for p in geometry.panels:
        mu = attenuation_coefficient(p.material, geometry.wavelength) if p.material else None
        x0, y0 = p.frame_offset
        x1, y1 = min(x0 + p.image_size[0], nx), min(y0 + p.image_size[1], ny)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = np.arange(x1 - x0, dtype=np.float64)[None, :] + 0.5
        for r0 in range(y0, y1, 256):  # row blocks: a 16M frame in a few tens of MB at a time
            r1 = min(r0 + 256, y1)
            ys = np.arange(r0 - y0, r1 - y0, dtype=np.float64)[:, None] + 0.5
            dss = _d_star_sq_of(geometry, *p.lab(xs, ys, mu))
            block = np.ones(dss.shape, dtype=bool)
            if d_min is not None:
                block &= dss < 1.0 / (d_min * d_min)
            if d_max is not None:
                block &= dss > 1.0 / (d_max * d_max)
            keep[r0:r1, x0:x1] = block
    keep.setflags(write=False)
    return keep


def resolution_mask(geometry: Geometry, shape: tuple[int, int], d_min: float | None,
                    d_max: float | None) -> np.ndarray:
    """True where d_min < d < d_max at the pixel centre (cached per geometry and range)."""
    if not geometry.known:
        raise GeometryError(geometry.missing_error())
    return _resolution_mask(geometry, tuple(int(v) for v in shape), d_min, d_max)


# ---------------------------------------------------------------------------------------------
# NXmx


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return _text(value.reshape(-1)[0]) if value.size else ""
    return str(value)


_LENGTH_MM = {"m": 1000.0, "meter": 1000.0, "metre": 1000.0, "mm": 1.0, "millimeter": 1.0, "cm": 10.0,
              "um": 1e-3, "micron": 1e-3, "microns": 1e-3, "nm": 1e-6}
_ANGLE_DEG = {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / math.pi, "radian": 180.0 / math.pi,
              "radians": 180.0 / math.pi}
_WAVELENGTH_A = {"angstrom": 1.0, "a": 1.0, "nm": 10.0, "m": 1e10}


def _scaled(ds, table: dict, default_unit: str) -> np.ndarray:
    unit = _text(ds.attrs.get("units", default_unit)).strip().lower() or default_unit
    if unit not in table:
        raise GeometryError(f"NXmx: {ds.name}: unit {unit!r} not understood")
    return np.asarray(ds[()], dtype=np.float64).reshape(-1) * table[unit]


def _first(ds, table: dict, default_unit: str) -> float:
    values = _scaled(ds, table, default_unit)
    if values.size == 0:
        raise GeometryError(f"NXmx: {ds.name} is empty")
    return float(values[0])


def _resolve(f, base: str, path: str):
    path = _text(path)
    if path in (".", ""):
        return None
    if not path.startswith("/"):
        path = base.rsplit("/", 1)[0] + "/" + path
    if path not in f:
        raise GeometryError(f"NXmx: depends_on {path} does not exist")
    return f[path]


def _transform(f, ds, point: np.ndarray, direction_only: bool = False) -> np.ndarray:
    """Apply a NeXus transformation and its depends_on chain (McStas frame, mm): translations add
    offset + value * vector, rotations turn about vector then add offset (NeXus design, coordinate
    systems); a direction takes the rotations only."""
    seen = 0
    while ds is not None:
        seen += 1
        if seen > 64:
            raise GeometryError(f"NXmx: depends_on chain through {ds.name} does not end")
        kind = _text(ds.attrs.get("transformation_type", "")).lower()
        vector = np.asarray(ds.attrs.get("vector", (0, 0, 1)), dtype=np.float64).reshape(3)
        norm = float(np.linalg.norm(vector))
        vector = vector / norm if norm > 0 else vector  # a zero vector: no motion (seen in module_offset)
        offset = np.asarray(ds.attrs.get("offset", (0, 0, 0)), dtype=np.float64).reshape(3)
        offset_unit = _text(ds.attrs.get("offset_units", ds.attrs.get("units", "mm"))).strip().lower()
        offset = offset * _LENGTH_MM.get(offset_unit, 1.0)
        if kind == "rotation":
            point = np.asarray(rotate(point, vector, _first(ds, _ANGLE_DEG, "deg")))
            if not direction_only:
                point = point + offset
        elif kind == "translation":
            if not direction_only:
                point = point + offset + vector * _first(ds, _LENGTH_MM, "m")
        else:
            raise GeometryError(f"NXmx: {ds.name}: transformation_type {kind!r} not understood")
        ds = _resolve(f, ds.name, ds.attrs.get("depends_on", "."))
    return point


def _groups(group, nx_class: str) -> list:
    out = []
    for key in group:
        item = group.get(key)
        if item is not None and hasattr(item, "keys") and _text(item.attrs.get("NX_class", "")) == nx_class:
            out.append(item)
    return out


def _value(group, name: str, table=None, default_unit: str = "", default=None):
    if group is None or name not in group:
        return default
    ds = group[name]
    if table is None:
        value = ds[()]
        if isinstance(value, bytes | np.ndarray) and getattr(value, "dtype", np.dtype("O")).kind in "SOU":
            return _text(value)
        if isinstance(value, bytes):
            return _text(value)
        return float(np.asarray(value).reshape(-1)[0])
    return _first(ds, table, default_unit)


def _nxmx_geometry(f) -> Geometry:
    entry = f.get("entry")
    instrument = entry.get("instrument") if entry is not None else None
    if instrument is None:
        raise GeometryError(f"NXmx: {f.filename}: no /entry/instrument")
    detectors = _groups(instrument, "NXdetector") or ([instrument["detector"]] if "detector" in instrument else [])
    if not detectors:
        raise GeometryError(f"NXmx: {f.filename}: no NXdetector in /entry/instrument")
    det = detectors[0]
    missing: list[str] = []

    wavelength = None
    for path in ("beam/incident_wavelength", "monochromator/wavelength"):
        if path in instrument:
            wavelength = _first(instrument[path], _WAVELENGTH_A, "angstrom")
            break
    if wavelength is None:
        missing.append("wavelength")

    material = _value(det, "sensor_material", default="") or ""
    material = {"silicon": "Si"}.get(str(material).lower(), material)
    thickness = _value(det, "sensor_thickness", _LENGTH_MM, "m", 0.0)
    cutoff = _value(det, "saturation_value")
    if cutoff is None:
        cutoff = _value(det.get("detectorSpecific"), "countrate_correction_count_cutoff")
    # dxtbx's NXmx reader: trusted range (underload_value, saturation_value), inclusive; the EIGER
    # file-writer reader takes underload 0.
    underload = _value(det, "underload_value", default=0.0)
    trusted = (float(underload), float(cutoff)) if cutoff is not None else None
    common = {
        "count_time": _value(det, "count_time"),
        "frame_time": _value(det, "frame_time"),
        "count_cutoff": None if cutoff is None else int(cutoff),
        "description": str(_value(det, "description", default="") or ""),
        "detector_number": str(_value(det, "detector_number", default="") or ""),
        "source": "NXmx master",
    }
    common["detector_kind"] = "eiger" if "eiger" in common["description"].lower() else (
        "pilatus" if "pilatus" in common["description"].lower() else "other")

    spec = det.get("detectorSpecific")
    whole = None  # (fast, slow) of the whole frame, as DECTRIS's detectorSpecific says it
    if spec is not None and "x_pixels_in_detector" in spec and "y_pixels_in_detector" in spec:
        whole = (int(_value(spec, "x_pixels_in_detector")), int(_value(spec, "y_pixels_in_detector")))
    panels = []
    for k, module in enumerate(sorted(_groups(det, "NXdetector_module"), key=lambda g: g.name)):
        try:
            size = np.asarray(module["data_size"][()]).reshape(-1)[-2:].astype(int)  # NXmx: [slow, fast]
            if whole is not None and tuple(size) == whole and whole[0] != whole[1]:
                size = size[::-1]  # DECTRIS writers give it fast first ([3108, 3262] for a 3108-wide 9M)
            start = (np.asarray(module["data_origin"][()]).reshape(-1)[-2:].astype(int)
                     if "data_origin" in module else np.zeros(2, int))
            fast_ds, slow_ds = module["fast_pixel_direction"], module["slow_pixel_direction"]
        except KeyError as exc:
            raise GeometryError(f"NXmx: {module.name}: no {exc.args[0]}") from None
        origin = _transform(f, module["module_offset"], np.zeros(3)) if "module_offset" in module else np.zeros(3)
        axes_lab = []
        for ds in (fast_ds, slow_ds):
            vector = np.asarray(ds.attrs.get("vector"), dtype=np.float64).reshape(3)
            parent = _resolve(f, ds.name, ds.attrs.get("depends_on", "."))
            axes_lab.append(_transform(f, parent, vector / np.linalg.norm(vector), direction_only=True))
            offset = np.asarray(ds.attrs.get("offset", (0, 0, 0)), dtype=np.float64).reshape(3)
            unit = _text(ds.attrs.get("offset_units", ds.attrs.get("units", "m"))).strip().lower()
            origin = origin + offset * _LENGTH_MM.get(unit, 1.0)
        fast = MCSTAS_TO_IMGCIF @ axes_lab[0]
        slow = MCSTAS_TO_IMGCIF @ axes_lab[1]
        panels.append(Panel(
            name=module.name.rsplit("/", 1)[-1] or f"panel{k}",
            origin=tuple(float(v) for v in MCSTAS_TO_IMGCIF @ origin),  # type: ignore[arg-type]
            fast_axis=tuple(float(v) for v in fast),  # type: ignore[arg-type]
            slow_axis=tuple(float(v) for v in slow),  # type: ignore[arg-type]
            pixel_size=(_first(fast_ds, _LENGTH_MM, "m"), _first(slow_ds, _LENGTH_MM, "m")),
            image_size=(int(size[1]), int(size[0])),
            frame_offset=(int(start[1]), int(start[0])),
            thickness=float(thickness), material=str(material), trusted_range=trusted,
        ))

    beam_center = None
    if "beam_center_x" in det and "beam_center_y" in det:
        beam_center = (float(_value(det, "beam_center_x")), float(_value(det, "beam_center_y")))
    distance = None
    for name in ("distance", "detector_distance"):
        if name in det:
            distance = _first(det[name], _LENGTH_MM, "m")
            break

    if not panels:
        # The legacy DECTRIS layout without modules: a flat detector facing the beam from its flat values.
        pixel = [_value(det, n, _LENGTH_MM, "m") for n in ("x_pixel_size", "y_pixel_size")]
        shape = None
        data = entry.get("data")
        if data is not None:
            for key in sorted(data):
                try:
                    ds = data[key]
                except KeyError:
                    continue
                if getattr(ds, "ndim", 0) == 3:
                    shape = ds.shape[1:]
                    break
        if shape is None and spec is not None and "x_pixels_in_detector" in spec:
            shape = (int(_value(spec, "y_pixels_in_detector")), int(_value(spec, "x_pixels_in_detector")))
        lacking = [name for name, v in (("distance", distance), ("beam_center", beam_center),
                                        ("pixel_size", pixel[0])) if v is None]
        if shape is None:
            lacking.append("panels")
        if lacking:
            return Geometry(wavelength=wavelength, distance=distance, beam_center=beam_center,
                            missing=tuple(missing + lacking), **common)
        return Geometry.simple(
            wavelength=wavelength, distance=distance, beam_center=beam_center,
            pixel_size=(pixel[0], pixel[1] if pixel[1] is not None else pixel[0]),
            image_size=(int(shape[1]), int(shape[0])), thickness=float(thickness), material=str(material),
            trusted_range=trusted, missing=tuple(missing), axes=_nxmx_axes(f), **common)

    if distance is None:
        distance = abs(panels[0].distance)  # dxtbx Panel.get_distance, from the module's own position
    geometry = Geometry(wavelength=wavelength, panels=tuple(panels), distance=distance, beam_center=beam_center,
                        missing=tuple(missing), axes=_nxmx_axes(f), **common)
    if geometry.beam_center is None:
        geometry = replace(geometry, beam_center=geometry.beam_centre_px())
    return geometry


def _nxmx_axes(f) -> tuple[Axis, ...]:
    """The sample's rotation axes through its depends_on chain (imgCIF frame): start and increment of
    the scan values (first two), else zero."""
    sample = f.get("entry/sample")
    if sample is None or "depends_on" not in sample:
        return ()
    axes = []
    try:
        ds = _resolve(f, sample.name + "/depends_on", sample["depends_on"][()])
        while ds is not None and len(axes) < 16:
            if _text(ds.attrs.get("transformation_type", "")).lower() == "rotation":
                values = _scaled(ds, _ANGLE_DEG, "deg")
                vector = np.asarray(ds.attrs.get("vector", (1, 0, 0)), dtype=np.float64).reshape(3)
                axes.append(Axis(ds.name.rsplit("/", 1)[-1], tuple(float(v) for v in MCSTAS_TO_IMGCIF @ vector),
                                 float(values[0]) if values.size else 0.0,
                                 float(values[1] - values[0]) if values.size > 1 else 0.0))
            ds = _resolve(f, ds.name, ds.attrs.get("depends_on", "."))
    except (GeometryError, KeyError, ValueError):
        return tuple(axes)
    return tuple(axes)


__all__ = [
    "Axis", "Geometry", "GeometryError", "Panel", "attenuation_coefficient", "d_spacing", "d_star_sq",
    "lab_coordinates", "panel_of", "resolution_mask", "rotate",
]
