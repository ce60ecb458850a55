"""The one geometry model: pixel -> d against Bragg's law computed here from first principles (a ray from
the sample to the pixel centre, its angle to the beam, d = lambda / (2 sin theta)) for flat, tilted
(2theta 30 deg), cylindrical multi-panel (PILATUS-12M-like) and gapped multi-panel (EIGER-like) detectors;
dxtbx's parallax; the wire dict; NXmx depends_on chains; missing essentials reported, never invented."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from intxr.geometry import (
    Geometry,
    GeometryError,
    attenuation_coefficient,
    d_spacing,
    d_star_sq,
    panel_of,
    resolution_mask,
)

WAVELENGTH = 0.9795
PIXEL = 0.172


def bragg_d(points: np.ndarray, wavelength: float = WAVELENGTH, beam=(0.0, 0.0, -1.0)) -> np.ndarray:
    """d (A) of scattering to lab points (N, 3), mm, sample at the origin, beam travelling along `beam`."""
    points = np.asarray(points, dtype=np.float64)
    cos_2theta = points @ np.asarray(beam) / np.linalg.norm(points, axis=1)
    two_theta = np.arccos(np.clip(cos_2theta, -1, 1))
    return wavelength / (2 * np.sin(two_theta / 2))


def model_d(geometry: Geometry, x, y) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(d_star_sq(geometry, x, y))


def panel_wire(origin, fast, slow, size, offset=(0, 0), name="panel0", thickness=0.0) -> dict:
    return {"name": name, "origin": list(origin), "fast_axis": list(fast), "slow_axis": list(slow),
            "pixel_size": [PIXEL, PIXEL], "image_size": list(size), "frame_offset": list(offset),
            "thickness": thickness, "material": "Si" if thickness else "", "trusted_range": [0, 1e6]}


def wire(panels: list[dict], **extra) -> dict:
    return {"version": 1, "wavelength": WAVELENGTH, "beam_direction": [0, 0, 1], "panels": panels,
            "two_theta": 0.0, "distance": 250.0, "beam_center": None,
            "goniometer": {"axes": [{"name": "omega", "vector": [1, 0, 0], "start": 0.0, "increment": 0.1}],
                           "scan_axis": "omega"},
            "count_time": 0.1, "frame_time": 0.1, "count_cutoff": 1000000, "description": "test",
            "detector_number": "T-1", "detector_kind": "other", "missing": [], "source": "test", **extra}


# ---------------------------------------------------------------------------------------------------------
# Flat, facing the beam


def test_flat_detector_agrees_with_bragg_and_the_numbers_before_the_model():
    g = Geometry.simple(wavelength=0.96859, distance=351.0, beam_center=(1261.61, 1306.96),
                        pixel_size=(PIXEL, PIXEL), image_size=(2463, 2527))
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 2463, 500), rng.uniform(0, 2527, 500)
    # In the plane z = -351 mm, fast along +x, slow along -y, the beam centre on the z axis.
    points = np.stack([(x - 1261.61) * PIXEL, -(y - 1306.96) * PIXEL, np.full_like(x, -351.0)], axis=1)
    np.testing.assert_allclose(model_d(g, x, y), bragg_d(points, 0.96859), rtol=1e-9)
    # With the PILATUS's 450 um silicon (dxtbx's parallax): the values of the flat-detector code this model
    # replaced (intxr/reader/geometry.py at 759c7a8), which matched DIALS on every reference frame.
    thick = replace(g, panels=(replace(g.panels[0], thickness=0.45, material="Si"),))
    x = [0.5, 100.25, 1261.61, 1500.0, 2462.5, 2000.0]
    y = [0.5, 2500.0, 1306.96, 1300.0, 2526.5, 200.0]
    before = [0.5389420814971224, 0.4797715554951304, 0.0, 0.014399877913710567, 0.4981844519710755,
              0.3458789272229968]
    np.testing.assert_allclose(d_star_sq(thick, x, y), before, rtol=1e-12, atol=1e-15)
    assert attenuation_coefficient("Si", 0.96859) == pytest.approx(3.8326187044103306, rel=1e-12)


def test_parallax_moves_each_point_back_along_its_ray_by_the_mean_absorption_depth():
    """dxtbx's correction written here as geometry: a ray hitting the sensor at incidence t is recorded
    o = 1/mu - (t0/cos t + 1/mu) exp(-mu t0 / cos t) deeper along it, i.e. o sin t further out in the plane."""
    t0, distance = 0.45, 200.0
    g = Geometry.simple(wavelength=WAVELENGTH, distance=distance, beam_center=(0.0, 0.0), pixel_size=(PIXEL, PIXEL),
                        image_size=(1000, 1000), thickness=t0, material="Si")
    mu = attenuation_coefficient("Si", WAVELENGTH)
    r_recorded = np.array([10.0, 50.0, 100.0, 150.0])  # mm from the beam centre along fast
    cos_t = distance / np.hypot(r_recorded, distance)
    o = 1 / mu - (t0 / cos_t + 1 / mu) * np.exp(-mu * t0 / cos_t)
    r_true = r_recorded - o * np.sqrt(1 - cos_t**2)
    points = np.stack([r_true, np.zeros(4), np.full(4, -distance)], axis=1)
    np.testing.assert_allclose(model_d(g, r_recorded / PIXEL, 0.0), bragg_d(points), rtol=1e-12)
    assert np.all(o > 0) and np.all(np.diff(o) > 0)  # deeper at more oblique incidence


# ---------------------------------------------------------------------------------------------------------
# Tilted: a detector on a 2theta arm


@pytest.mark.parametrize("two_theta", [30.0, -30.0])
def test_tilted_detector_agrees_with_bragg(two_theta):
    distance, bx, by, nx, ny = 120.0, 400.0, 300.0, 800, 600
    g = Geometry.simple(wavelength=WAVELENGTH, distance=distance, beam_center=(bx, by), pixel_size=(PIXEL, PIXEL),
                        image_size=(nx, ny), two_theta=two_theta)
    # The arm turns about the horizontal x axis: the detector's normal leaves the sample at 2theta to the
    # beam, in the vertical plane; its foot (the point nearest the sample) is pixel (bx, by).
    a = math.radians(two_theta)
    normal = np.array([0.0, math.sin(a), -math.cos(a)])  # towards the detector
    fast = np.array([1.0, 0.0, 0.0])
    slow = np.array([0.0, -math.cos(a), -math.sin(a)])  # "down" on the detector face, tilted with it
    rng = np.random.default_rng(7)
    x, y = rng.uniform(0, nx, 400), rng.uniform(0, ny, 400)
    points = distance * normal + np.outer(x - bx, fast) * PIXEL + np.outer(y - by, slow) * PIXEL
    d = model_d(g, x, y)
    np.testing.assert_allclose(d, bragg_d(points), rtol=1e-9)
    # The foot of the normal scatters at exactly |2theta|.
    assert model_d(g, bx, by) == pytest.approx(WAVELENGTH / (2 * math.sin(abs(a) / 2)), rel=1e-12)
    # Not the flat answer: the same pixels facing the beam would be far lower resolution.
    flat = Geometry.simple(wavelength=WAVELENGTH, distance=distance, beam_center=(bx, by), pixel_size=(PIXEL, PIXEL),
                           image_size=(nx, ny))
    assert np.all(model_d(flat, bx, by) > 1e6) and np.median(np.abs(d / model_d(flat, x, y) - 1)) > 0.2
    # The wire dict carries it; rebuilt from the wire it is the same model, and so are its numbers.
    again = Geometry.from_wire(json.loads(json.dumps(g.to_wire())))
    assert again == g and g.two_theta == two_theta
    # The beam misses the tilted panel's foot; the displayed beam centre is where the beam meets the plane,
    # D tan(2theta) further along slow (down the face) for an arm raised above the beam.
    assert g.beam_centre_px() == (bx, by)  # the header's value, as given
    computed = replace(g, beam_center=None).beam_centre_px()
    assert computed[0] == pytest.approx(bx) and computed[1] == pytest.approx(by + distance * math.tan(a) / PIXEL)


# ---------------------------------------------------------------------------------------------------------
# Multi-panel


def test_cylindrical_multi_panel_detector_agrees_with_bragg():
    """24 flat modules tangent to a vertical cylinder of radius 250 mm around the sample (a PILATUS 12M's
    layout), each 60 x 100 pixels here, side by side in the frame with 7 gap columns between them."""
    radius, width, height, gap, n = 250.0, 60, 100, 7, 24
    step = math.atan2(width * PIXEL, radius)  # modules edge to edge around the cylinder
    panels, centres, tangents = [], [], []
    for k in range(n):
        phi = (k - (n - 1) / 2) * step
        centre = np.array([radius * math.sin(phi), 0.0, -radius * math.cos(phi)])
        tangent = np.array([math.cos(phi), 0.0, math.sin(phi)])
        down = np.array([0.0, -1.0, 0.0])
        origin = centre - tangent * width / 2 * PIXEL - down * height / 2 * PIXEL
        panels.append(panel_wire(origin, tangent, down, (width, height), (k * (width + gap), 0), f"module{k:02d}"))
        centres.append(centre)
        tangents.append(tangent)
    g = Geometry.from_wire(wire(panels))
    assert len(g.panels) == n and g.frame_size == (n * width + (n - 1) * gap, height)

    rng = np.random.default_rng(11)
    k = rng.integers(0, n, 2000)
    u, v = rng.uniform(0, width, 2000), rng.uniform(0, height, 2000)
    x, y = k * (width + gap) + u, v
    points = (np.asarray(centres)[k] + np.asarray(tangents)[k] * ((u - width / 2) * PIXEL)[:, None]
              + np.outer(-(v - height / 2) * PIXEL, [0.0, 1.0, 0.0]))
    np.testing.assert_allclose(model_d(g, x, y), bragg_d(points), rtol=1e-9)
    assert np.array_equal(panel_of(g, x, y), k)

    mask = resolution_mask(g, (height, g.frame_size[0]), 1.5, 30.0)
    cols = np.arange(g.frame_size[0])
    on_panel = (cols % (width + gap)) < width
    assert not mask[:, ~on_panel].any()  # gap columns belong to no panel
    yy, xx = np.mgrid[0:height, 0 : g.frame_size[0]]
    d = d_spacing(g, xx[:, on_panel] + 0.5, yy[:, on_panel] + 0.5)
    assert np.array_equal(mask[:, on_panel], (d > 1.5) & (d < 30.0))


def test_eiger_like_frame_with_module_gaps_as_panels_agrees_with_bragg():
    """2 x 2 modules of 100 x 50 pixels in one plane facing the beam, 10 gap columns and 37 gap rows between
    them (an EIGER's layout, scaled down): each module its own panel, the gaps physical space."""
    mx, my, gx, gy, distance, bx, by = 100, 50, 10, 37, 80.0, 104.3, 67.8
    panels = []
    for row in range(2):
        for col in range(2):
            fx, fy = col * (mx + gx), row * (my + gy)
            origin = (-(bx - fx) * PIXEL, (by - fy) * PIXEL, -distance)
            panels.append(panel_wire(origin, (1, 0, 0), (0, -1, 0), (mx, my), (fx, fy), f"module{row}{col}"))
    g = Geometry.from_wire(wire(panels))
    width, height = g.frame_size
    assert (width, height) == (2 * mx + gx, 2 * my + gy)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    on = ((xx % (mx + gx)) < mx) & ((yy % (my + gy)) < my)
    x, y = xx[on], yy[on]
    points = np.stack([(x - bx) * PIXEL, -(y - by) * PIXEL, np.full_like(x, -distance)], axis=1)
    np.testing.assert_allclose(model_d(g, x, y), bragg_d(points), rtol=1e-9)
    mask = resolution_mask(g, (height, width), 2.0, None)
    assert not mask[~on].any() and np.array_equal(mask[on], model_d(g, x, y) > 2.0)
    # A point in a gap (a centroid between modules) goes to the nearest module's plane: here the same plane.
    gap_point = np.array([[mx + 3 - bx, -(my + 2 - by), 0.0]]) * [PIXEL, PIXEL, 0] + [0, 0, -distance]
    assert model_d(g, mx + 3, my + 2) == pytest.approx(bragg_d(gap_point)[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Missing essentials, the wire


def test_missing_wavelength_is_reported_not_invented():
    from intxr.reader.spotfinder import SpotFinderParams, find_spots

    panels = [panel_wire((-10, 10, -100), (1, 0, 0), (0, -1, 0), (64, 64))]
    g = Geometry.from_wire(wire(panels, wavelength=None, missing=["wavelength"], source="stream v2 start"))
    assert not g.known and g.resolution_missing == ("wavelength",)
    with pytest.raises(GeometryError, match="has no wavelength"):
        d_star_sq(g, 1.0, 1.0)
    with pytest.raises(GeometryError, match="has no wavelength"):
        resolution_mask(g, (64, 64), 2.0, None)
    image = np.random.default_rng(0).poisson(2, (64, 64)).astype(np.int32)
    image[20:23, 30:33] = 500
    result = find_spots(image, g, SpotFinderParams(prescreen=False))
    assert len(result.spots) == 1 and result.stats.n_spots_total == 1
    assert result.stats.n_spots_no_ice == -1 and result.stats.estimated_d_min == -1 and result.score.score == -999
    assert any("stream v2 start" in e and "no wavelength" in e for e in result.errors)
    # Only display values missing (no count time): resolution is known.
    assert Geometry.from_wire(wire(panels, missing=["count_time"])).known


def test_unknown_geometry_and_command_line_values():
    g = Geometry.unknown("frame.npy")
    assert not g.known and "distance" in g.resolution_missing and not g.panels
    partial = g.with_overrides(distance=200.0, image_size=(100, 80))
    assert not partial.panels and "wavelength" in partial.missing
    full = g.with_overrides(wavelength=1.0, distance=200.0, pixel_size=0.075, beam_center=(50.0, 40.0),
                            image_size=(100, 80))
    assert full.known and full.distance == 200.0 and full.beam_centre_px() == (50.0, 40.0)
    assert model_d(full, 50.0, 40.0 + 1000 / 0.075 * 0) > 1e6


def test_wire_is_validated_once_with_a_one_line_error():
    good = wire([panel_wire((0, 0, -100), (1, 0, 0), (0, -1, 0), (10, 10))])
    g = Geometry.from_wire(good)
    assert Geometry.from_wire(g.to_wire()) == g
    assert g.axis("omega").increment == 0.1 and g.scan_axis == "omega"
    for bad, match in [
        ({**good, "version": 2}, "version"),
        ({**good, "wavelength": "1.0"}, "wavelength"),
        ({**good, "wavelength": -1.0}, "wavelength"),
        ({**good, "panels": [{**good["panels"][0], "fast_axis": [0, 0, 0]}]}, "fast_axis"),
        ({**good, "panels": [{**good["panels"][0], "image_size": [0, 10]}]}, "image_size"),
        ({**good, "panels": [{k: v for k, v in good["panels"][0].items() if k != "origin"}]}, "origin"),
        ({**good, "missing": "wavelength"}, "missing"),
        ("not a dict", "object"),
    ]:
        with pytest.raises(GeometryError, match=match) as info:
            Geometry.from_wire(bad)
        assert "\n" not in str(info.value)


def test_series_geometry_for_the_reader():
    from intxr.reader.worker import geometry_from_series

    g = Geometry.simple(wavelength=1.0, distance=237.0, beam_center=(10.0, 12.0), pixel_size=(0.075, 0.075),
                        image_size=(40, 30))
    assert geometry_from_series({"geometry": g.to_wire()}, (30, 40)) == g
    assert not geometry_from_series({"config": {"wavelength": 1.0}}, (30, 40)).known
    with pytest.raises(GeometryError, match="covers 40x30 pixels, the frame is 20x30"):
        geometry_from_series({"geometry": g.to_wire()}, (30, 20))


def test_splitter_normaliser_gives_the_same_model_as_the_python_builder():
    """The Rust header normaliser (one parser) and Geometry.simple agree on a flat and a 2theta detector."""
    splitter = pytest.importorskip("intxr._splitter")
    if not hasattr(splitter, "geometry_from_header"):
        pytest.skip("this build of intxr._splitter has no geometry_from_header")
    config = {"wavelength": 0.9795, "detector_distance": 0.12, "beam_center_x": 400.0, "beam_center_y": 300.0,
              "x_pixel_size": 0.000172, "y_pixel_size": 0.000172, "x_pixels_in_detector": 800,
              "y_pixels_in_detector": 600, "sensor_material": "Si", "sensor_thickness": 0.00045,
              "two_theta_start": 30.0, "description": "Dectris EIGER2 Si 1M", "detector_number": "E-1"}
    served = Geometry.from_wire(json.loads(splitter.geometry_from_header(json.dumps(config), "{}", 600, 800)))
    built = Geometry.simple(wavelength=0.9795, distance=120.0, beam_center=(400.0, 300.0), pixel_size=(PIXEL, PIXEL),
                            image_size=(800, 600), two_theta=30.0, thickness=0.45, material="Si")
    assert served.two_theta == 30.0 and served.known
    [p], [q] = served.panels, built.panels
    for name in ("origin", "fast_axis", "slow_axis", "pixel_size"):
        assert getattr(p, name) == pytest.approx(getattr(q, name), abs=1e-9), name
    assert (p.image_size, p.material, p.thickness) == (q.image_size, q.material, pytest.approx(q.thickness))
    x, y = np.array([0.5, 400.0, 799.5]), np.array([0.5, 300.0, 599.5])
    np.testing.assert_allclose(d_star_sq(served, x, y), d_star_sq(built, x, y), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# NXmx


def _translation(group, name, value_mm, vector, depends_on, offset=(0, 0, 0)):
    ds = group.create_dataset(name, data=value_mm)
    ds.attrs.update({"transformation_type": "translation", "vector": vector, "units": "mm", "offset": offset,
                     "depends_on": depends_on})
    return ds


def test_nxmx_depends_on_chains_give_the_dxtbx_model(tmp_path):
    """An NXmx master written here in NeXus's McStas frame (dxtbx converts with diag(-1, 1, -1)): the module
    hangs on a detector distance translation hung on a two-theta rotation about the sample."""
    h5py = pytest.importorskip("h5py")
    distance, bx, by, nx, ny, tt = 150.0, 500.5, 400.25, 1000, 800, 30.0
    path = tmp_path / "x_master.h5"
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        beam = instrument.create_group("beam")
        beam.create_dataset("incident_wavelength", data=WAVELENGTH).attrs["units"] = "angstrom"
        det = instrument.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det.create_dataset("sensor_material", data=b"Silicon")
        det.create_dataset("sensor_thickness", data=450e-6).attrs["units"] = "m"
        det.create_dataset("saturation_value", data=65534)
        det.create_dataset("description", data=b"Dectris EIGER2 Si 1M")
        tr = det.create_group("transformations")
        tr.attrs["NX_class"] = "NXtransformations"
        rot = tr.create_dataset("two_theta", data=tt)
        # imgCIF +x is McStas -x.
        rot.attrs.update({"transformation_type": "rotation", "vector": (-1.0, 0, 0), "units": "deg", "depends_on": "."})
        _translation(tr, "translation", distance / 1000, (0, 0, 1.0),
                     "/entry/instrument/detector/transformations/two_theta")
        tr["translation"].attrs["units"] = "m"
        module = det.create_group("module")
        module.attrs["NX_class"] = "NXdetector_module"
        module.create_dataset("data_origin", data=[0, 0])
        module.create_dataset("data_size", data=[ny, nx])
        offset = np.array([bx * PIXEL, by * PIXEL, 0.0])  # McStas: imgCIF (-bx, +by) * pixel
        _translation(module, "module_offset", float(np.linalg.norm(offset)), offset / np.linalg.norm(offset),
                     "/entry/instrument/detector/transformations/translation")
        for name, vector in (("fast_pixel_direction", (-1.0, 0, 0)), ("slow_pixel_direction", (0, -1.0, 0))):
            _translation(module, name, PIXEL, vector, "/entry/instrument/detector/module/module_offset")
        sample = entry.create_group("sample")
        omega = sample.create_dataset("omega", data=[10.0, 10.5, 11.0])
        omega.attrs.update({"transformation_type": "rotation", "vector": (-1.0, 0, 0), "units": "deg",
                            "depends_on": "."})
        sample.create_dataset("depends_on", data=b"/entry/sample/omega")
    with h5py.File(path, "r") as f:
        g = Geometry.from_nxmx(f)
    built = Geometry.simple(wavelength=WAVELENGTH, distance=distance, beam_center=(bx, by), pixel_size=(PIXEL, PIXEL),
                            image_size=(nx, ny), two_theta=tt, thickness=0.45, material="Si")
    [p], [q] = g.panels, built.panels
    assert p.origin == pytest.approx(q.origin, abs=1e-9)
    assert p.fast_axis == pytest.approx(q.fast_axis, abs=1e-12) and p.slow_axis == pytest.approx(q.slow_axis, abs=1e-12)
    assert p.image_size == (nx, ny) and p.pixel_size == pytest.approx((PIXEL, PIXEL))
    assert (p.material, p.thickness, p.trusted_range) == ("Si", pytest.approx(0.45), (0.0, 65534.0))
    assert g.distance == pytest.approx(distance) and g.detector_kind == "eiger" and g.known
    omega = g.axis("omega")
    assert omega.vector == pytest.approx((1.0, 0.0, 0.0)) and (omega.start, omega.increment) == (10.0, 0.5)
    x, y = np.array([0.5, 500.0, 999.5]), np.array([0.5, 400.0, 799.5])
    np.testing.assert_allclose(d_star_sq(g, x, y), d_star_sq(built, x, y), rtol=1e-12)


def test_real_master_files(shared_data):
    h5py = pytest.importorskip("h5py")
    with h5py.File(shared_data / "hdf5/known_good_pair/dls_thau_4m_master.h5", "r") as f:
        g = Geometry.from_nxmx(f)  # the legacy DECTRIS layout: flat values, no modules
    assert g.wavelength == pytest.approx(0.9762458) and g.distance == pytest.approx(337.0)
    assert g.panels[0].image_size == (2068, 2162)
    assert g.beam_centre_px() == pytest.approx((1041.247, 1115.747), abs=1e-3)
    with h5py.File(shared_data / "hdf5/ansto_eiger2_1m/example_1_master.h5", "r") as f:
        g = Geometry.from_nxmx(f)  # NXmx with a module; its data_size is written fast first
    assert g.panels[0].image_size == (3108, 3262) and g.wavelength == pytest.approx(0.95372594)


def test_rings_for_display():
    g = Geometry.simple(wavelength=1.0, distance=200.0, beam_center=(1000.0, 1500.0), pixel_size=(PIXEL, PIXEL),
                        image_size=(2000, 3000))
    expected = 200.0 * math.tan(2 * math.asin(1 / 6)) / PIXEL
    assert g.ring_radius_px(3.0) == pytest.approx(expected)
    points = g.ring_points(3.0, 360)
    assert len(points) == 360
    np.testing.assert_allclose(np.hypot(points[:, 0] - 1000.0, points[:, 1] - 1500.0), expected, rtol=1e-9)
    np.testing.assert_allclose(model_d(g, points[:, 0], points[:, 1]), 3.0, rtol=1e-9)
    tilted = Geometry.simple(wavelength=1.0, distance=100.0, beam_center=(1000.0, 1500.0), pixel_size=(PIXEL, PIXEL),
                             image_size=(2000, 3000), two_theta=20.0)
    points = tilted.ring_points(3.0, 360)
    assert len(points) > 100
    np.testing.assert_allclose(model_d(tilted, points[:, 0], points[:, 1]), 3.0, rtol=1e-9)
    assert g.header_values()["beam_center_x"] == 1000.0 and g.header_values()["distance"] == 200.0


# ---------------------------------------------------------------------------------------------------------
# One model, every consumer: the Splitter's served geometry, its master file, the GUI


def _splitter_run(tmp_path, messages, shape):
    """Push a series through a real Splitter; (served series info, master file)."""
    from test_nxmx import _request_one_frame
    from test_serve import Listener
    from test_splitter import Pusher

    from intxr.splitter import Splitter
    from intxr.testing import free_ports

    serve, publish = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30, serve=serve, publish=publish,
                  skip_after=30) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")
        pusher.send(messages)
        _meta, series_info, _blob = _request_one_frame(serve)
        written = listener.wait_for("series_written")
        assert splitter.join(60)
    return json.loads(series_info), written["master_file"]


def _same_numbers(a: Geometry, b: Geometry, shape) -> None:
    ny, nx = shape
    x, y = np.array([0.5, nx / 3, nx - 0.5, nx / 2]), np.array([0.5, ny / 5, ny - 0.5, ny / 2])
    np.testing.assert_allclose(d_star_sq(a, x, y), d_star_sq(b, x, y), rtol=1e-9, atol=1e-15)


def test_v2_16m_start_gives_237_mm_to_the_reader_the_master_and_the_gui(tmp_path, shared_data):
    """The real EIGER2 16M v2 start message carries the distance only in detector_translation."""
    from intxr.gui.frames import read_frame, render
    from intxr.reader.worker import geometry_from_series

    folder = shared_data / "stream_v2/eiger2_16m_final"
    messages = [[(folder / f"{name}.cbor").read_bytes()] for name in ("start", "image", "end")]
    shape = (4362, 4148)
    info, master = _splitter_run(tmp_path, messages, shape)
    reader = geometry_from_series(info, shape)
    with h5py_file(master) as f:
        from_master = Geometry.from_nxmx(f)
    data, gui, _mask = read_frame(master, 0)
    for g in (reader, from_master, gui):
        assert g.distance == pytest.approx(237.15919962215962, abs=1e-6)
        assert g.wavelength == pytest.approx(0.918381073013, rel=1e-7)  # the master stores what it was given
        assert g.known and g.panels[0].image_size == (4148, 4362)
    _same_numbers(reader, from_master, shape)
    _same_numbers(reader, gui, shape)
    view = render(data, gui, None)
    ring = next(r for r in view.rings if r["d"] == 3.0)
    assert ring["radius"] * view.scale == pytest.approx(reader.ring_radius_px(3.0), rel=1e-6)


@pytest.mark.parametrize("two_theta", [0.0, 20.0])
def test_simulated_tilted_pilatus_round_trips_through_the_splitter(tmp_path, two_theta):
    """The simulator writes a model's header (two_theta_start included), the Splitter normalises it and
    writes the master; reader and master give the model back."""
    from test_nxmx import _v1_series

    from intxr import stream_format as fmt
    from intxr.reader.worker import geometry_from_series

    shape = (2527, 2463)
    model = Geometry.simple(wavelength=0.96859, distance=351.0, beam_center=(1261.61, 1306.96),
                            pixel_size=(PIXEL, PIXEL), image_size=shape[::-1], two_theta=two_theta, thickness=0.45,
                            material="Si", count_cutoff=115897, count_time=0.019, frame_time=0.02,
                            description="PILATUS3 6M", detector_number="60-0119")
    config = fmt.detector_config(model, shape, np.uint32, nimages=1)
    assert config["two_theta_start"] == two_theta
    frame = np.zeros(shape, dtype=np.uint32)
    info, master = _splitter_run(tmp_path, _v1_series(config, [frame], np.zeros(shape, "<u4")), shape)
    reader = geometry_from_series(info, shape)
    with h5py_file(master) as f:
        from_master = Geometry.from_nxmx(f)
    for g in (reader, from_master):
        assert g.known and g.panels[0].origin == pytest.approx(model.panels[0].origin, abs=1e-6)
        assert g.panels[0].slow_axis == pytest.approx(model.panels[0].slow_axis, abs=1e-9)
        _same_numbers(model, g, shape)


def h5py_file(path):
    h5py = pytest.importorskip("h5py")
    return h5py.File(path, "r")


def test_a_series_without_geometry_gives_results_that_say_so_once(thaumatin_cbfs):
    """The reader never invents a geometry: a frame whose series info has none is processed (spots found)
    and its result carries the reason once, with no resolution-dependent numbers."""
    import time

    from intxr.config import default_startup_file, load
    from intxr.images import open_source
    from intxr.reader.source import ServedFrame
    from intxr.reader.worker import Reader, ReaderSettings

    configuration = load(default_startup_file(), "demo")
    reader = Reader(ReaderSettings(rank=1, splitter_endpoint="tcp://127.0.0.1:1", collector_endpoint="tcp://127.0.0.1:1",
                                   control_endpoint=None, timeout=1.0), configuration)
    try:
        pixels = open_source(thaumatin_cbfs[1]).read(0).data.astype(np.uint32)
        meta = {"series": 1, "series_name": "s", "frame": 1, "shape": list(pixels.shape), "type": "uint32",
                "encoding": "bs32-lz4"}
        frame = ServedFrame(meta, {}, memoryview(b""), time.time())
        frame.pixels = lambda out=None: pixels
        result = reader.process(frame)
    finally:
        reader.source.close()
        reader.results.close(linger=0)
    assert result.status == "processed"
    assert result.n_spots_total > 100
    said = [e for e in result.errors if "without geometry" in e]
    assert len(said) == 1, result.errors
    assert result.score == -999
