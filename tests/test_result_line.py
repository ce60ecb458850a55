"""The BluIce result line, as the original Interceptor's own test expects it."""

from __future__ import annotations

import pytest

from intxr.sinks.result_line import format_result_line, parse_item, validate_output_format

ORIGINAL_FORMAT = ("reporting", "series", "frame", "result {}", "mapping {}", "filename")


def test_original_example_line():
    info = {"series": 1, "frame": 1, "mapping": "", "reporting": "", "filename": "hdf5_test_0361-000_master.h5"}
    result = {
        "n_spots": 641,
        "n_overloads": 0,
        "score": 10,
        "hres": 1.64,
        "n_ice_rings": 8,
        "mean_shape_ratio": 1.41,
        "space_group": "P4",
        "unit_cell": (78.82, 78.82, 37.19, 90.0, 90.0, 90.0),
        "errors": [],
    }
    line = format_result_line(info, result, ORIGINAL_FORMAT, None, "reporting", "RESULTS:")
    assert line == (
        "RESULTS: series 1 frame 1 result {641 0 10 1.64 8 1.41 P4 78.82 78.82 37.19 90.00 90.00 90.00 {}} "
        "mapping {} filename hdf5_test_0361-000_master.h5"
    )


def test_prefix_from_header_bare_items_and_delimiter():
    info = {"series": 3, "frame": 7, "reporting": "htos_note image_score", "mapping": "rastering.row1"}
    result = {"n_spots": 12, "score": 4, "hres": 2.5, "errors": ["indexing not available"]}
    line = format_result_line(
        info, result, ("reporting", "[series]", "frame", "result", "mapping {}"), ";", "reporting", "RESULTS:"
    )
    assert line == (
        "htos_note image_score 3;frame 7;result {12 0 4 2.50 0 0.00 NA NA NA NA NA NA NA "
        "{indexing not available}};mapping {rastering.row1}"
    )


def test_items_are_parsed_and_unknown_keys_rejected():
    assert parse_item("mapping {}") == ("mapping", "braced")
    assert parse_item("[frame]") == ("frame", "bare")
    assert parse_item("result ()") == ("result", "result")
    validate_output_format(ORIGINAL_FORMAT)
    validate_output_format(("series", "run_id"), extra_keys=("run_id",))
    with pytest.raises(ValueError, match="unknown output key 'colour'"):
        validate_output_format(("series", "colour"))
    with pytest.raises(ValueError, match="cannot read output item"):
        validate_output_format(("series {",))
