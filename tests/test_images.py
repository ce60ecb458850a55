"""Image sources: the Cython byte-offset kernel against its reference and fabio, HDF5, synthetic frames."""

from __future__ import annotations

from dataclasses import replace

import fabio
import numpy as np
import pytest

from intxr.geometry import d_star_sq
from intxr.images import (
    SourceError,
    SyntheticSource,
    byte_offset_decode,
    byte_offset_decode_reference,
    open_source,
    read_cbf,
)


def byte_offset_encode(values: np.ndarray) -> bytes:
    """A test-side encoder (CBFlib byte-offset rules) to make streams with every escape width."""
    out = bytearray()
    previous = 0
    for v in values.astype(np.int64):
        d = int(v) - previous
        previous = int(v)
        if -127 <= d <= 127:
            out += np.int8(d).tobytes()
        elif -32767 <= d <= 32767:
            out += b"\x80" + np.int16(d).tobytes()
        elif -(2**31) + 1 <= d <= 2**31 - 1:
            out += b"\x80\x00\x80" + np.int32(d).tobytes()
        else:
            out += b"\x80\x00\x80\x00\x00\x00\x80" + np.int64(d).tobytes()
    return bytes(out)


def test_byte_offset_kernel_matches_reference_on_every_escape_width():
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [
            rng.integers(-3, 20, 200),
            [1_000, -2, -1, 70_000, 5, 2_000_000_000, -2_000_000_000, 3],
            rng.integers(0, 1_000_000, 50),
        ]
    ).astype(np.int32)
    payload = byte_offset_encode(values)
    kernel = byte_offset_decode(payload, len(values))
    assert np.array_equal(kernel, values)
    assert np.array_equal(byte_offset_decode_reference(payload, len(values)), values)


def test_byte_offset_truncated_stream_is_an_error():
    payload = byte_offset_encode(np.array([1, 2, 70_000], dtype=np.int32))
    with pytest.raises(ValueError, match="truncated"):
        byte_offset_decode(payload[:-1], 3)
    with pytest.raises(SourceError, match="holds 2 pixels"):
        byte_offset_decode(payload[:2], 3)


def test_real_cbf_matches_fabio_and_header_geometry(thaumatin_cbfs):
    image = read_cbf(thaumatin_cbfs[0])
    reference = fabio.open(thaumatin_cbfs[0]).data
    assert image.data.shape == (2527, 2463)
    assert np.array_equal(image.data, reference)
    g = image.geometry
    assert g.wavelength == pytest.approx(0.96859)
    assert g.distance == pytest.approx(351.0)
    assert g.beam_center == pytest.approx((1261.61, 1306.96))
    [panel] = g.panels
    assert panel.pixel_size == pytest.approx((0.172, 0.172)) and panel.image_size == (2463, 2527)
    assert g.count_cutoff == 115897 and panel.trusted_range == (0, 115897)  # inclusive, as DIALS
    assert (panel.material, panel.thickness) == ("Si", pytest.approx(0.45))  # "# Silicon sensor, thickness ..."
    assert g.description == "PILATUS3 6M" and g.detector_number == "60-0119" and g.detector_kind == "pilatus"
    assert g.axis("omega").start == pytest.approx(89.9997) and g.two_theta == 0.0 and g.known
    # dxtbx's simple detector: origin = -(beam centre) along fast (+x) and slow (-y), distance along -z.
    assert panel.origin == pytest.approx((-1261.61 * 0.172, 1306.96 * 0.172, -351.0))
    assert g.beam_centre_px() == pytest.approx((1261.61, 1306.96))
    assert d_star_sq(g, 1261.61, 1306.96) == pytest.approx(0.0, abs=1e-12)  # the direct beam
    # A pixel 100 mm out along fast: Bragg's law on the header's numbers, before parallax (thickness 0).
    flat = replace(g, panels=(replace(panel, thickness=0.0),))
    x = 1261.61 + 100.0 / 0.172
    d = 0.96859 / (2 * np.sin(np.arctan2(100.0, 351.0) / 2))
    assert 1 / np.sqrt(d_star_sq(flat, x, 1306.96)) == pytest.approx(d, rel=1e-12)
    assert (image.data == -1).sum() > 0  # module gaps


def test_hdf5_master_and_data_files(shared_data):
    master = open_source(str(shared_data / "hdf5/known_good_pair/dls_thau_4m_master.h5"))
    assert len(master) == 1
    image = master.read(0)
    assert image.data.shape == (2162, 2068) and image.data.dtype == np.uint16
    assert image.geometry.wavelength == pytest.approx(0.9762458)
    assert image.geometry.distance == pytest.approx(337.0)
    assert image.geometry.count_cutoff == 18533
    assert image.geometry.beam_centre_px() == pytest.approx((1041.247, 1115.747), abs=1e-3)
    assert image.geometry.source == "NXmx master" and image.geometry.known
    data = open_source(str(shared_data / "hdf5/ansto_eiger2_1m/ANSTOtest_303_data_000001.h5"))
    assert len(data) == 20 and data.read(19).data.shape == (1062, 1028)
    assert not data.read(0).geometry.known  # a lone data file carries no geometry


def test_synthetic_frames_are_seeded_and_shaped_like_a_raster_line():
    source = SyntheticSource("synthetic:1100x600:10:7")
    again = SyntheticSource("synthetic:1100x600:10:7")
    frames = [source.read(i) for i in range(10)]
    assert np.array_equal(frames[4].data, again.read(4).data)
    spots = [f.extra["n_spots_simulated"] for f in frames]
    assert spots[0] == 0 and spots[-1] == 0 and max(spots) == spots[4] or max(spots) == spots[5]
    assert (frames[4].data == 0xFFFFFFFF).any()  # module gap beyond 1030 columns
    assert frames[4].data[:, :1030][:514].max() < 0xFFFFFFFF


def test_npy_source(tmp_path):
    stack = np.arange(2 * 30 * 40, dtype=np.uint16).reshape(2, 30, 40)
    np.save(tmp_path / "stack.npy", stack)
    source = open_source(str(tmp_path / "stack.npy"))
    assert len(source) == 2 and np.array_equal(source.read(1).data, stack[1])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuch.cbf", "no such file"),
        ("synthetic:10", "expected synthetic"),
        ("synthetic:4x4", "8..8192"),
    ],
)
def test_bad_sources_name_the_problem(spec, message):
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_unknown_format_and_broken_cbf(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    with pytest.raises(SourceError, match="unknown image format"):
        open_source(str(tmp_path / "x.tif"))
    (tmp_path / "bad.cbf").write_bytes(b"###CBF: nothing here\n")
    with pytest.raises(SourceError, match="bad.cbf: no CBF binary section"):
        open_source(str(tmp_path / "bad.cbf"))
