"""The result line BluIce reads, built exactly as the original Interceptor built it.

`prefix item item ...`: the prefix is the header's value under `output_prefix_key` (e.g.
`htos_note image_score`), else `default_output_prefix`; items come from `output_format` joined by
`output_delimiter` (one space when None):
- `kw`       -> `kw value`
- `kw {}`    -> `kw {value}` (also `kw ()` / `kw []`: braces are Tcl lists for BluIce)
- `[kw]`     -> `value`
- the item naming `output_prefix_key` is the prefix itself and is not repeated
- any item containing `result` -> `result {n_spots n_overloads score hres n_ice_rings
  mean_shape_ratio sg a b c alpha beta gamma {errors}}`: the indexed lattice's space group and cell with two
  decimals, `NA` where nothing was indexed (the reason is among the errors).
"""

from __future__ import annotations

import re

# Values a result line can name: the frame's identity and the header keys the original passed on.
KNOWN_KEYS = {
    "series",
    "frame",
    "filename",
    "mapping",
    "reporting",
    "master_file",
    "run_mode",
    "n_spots",
    "n_overloads",
    "score",
    "hres",
    "n_ice_rings",
    "mean_shape_ratio",
    "beamline",
}

_ITEM = re.compile(r"^\s*(?P<bare>\[)?\s*(?P<key>[A-Za-z_][\w.-]*)\s*(?(bare)\])\s*(?P<wrap>\{\}|\(\)|\[\])?\s*$")


def parse_item(item: str) -> tuple[str, str]:
    """(key, style) with style 'pair', 'braced', 'bare' or 'result'. ValueError if malformed."""
    if "result" in item:
        return "result", "result"
    m = _ITEM.match(item)
    if m is None:
        raise ValueError(f"cannot read output item {item!r} (expected kw, kw {{}}, [kw] or result)")
    if m.group("bare"):
        return m.group("key"), "bare"
    return m.group("key"), "braced" if m.group("wrap") else "pair"


def validate_output_format(items, extra_keys=()) -> None:
    known = KNOWN_KEYS | set(extra_keys)
    for item in items:
        key, style = parse_item(item)
        if style != "result" and key not in known:
            raise ValueError(f"unknown output key {key!r} in item {item!r} (known: {', '.join(sorted(known))})")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def result_block(result: dict) -> str:
    """`{n_spots n_overloads score hres n_ice_rings mean_shape_ratio sg a b c al be ga {errors}}`."""
    head = [
        str(result.get("n_spots", 0)),
        str(result.get("n_overloads", 0)),
        str(result.get("score", 0)),
        f"{result.get('hres', 99.9):.2f}",
        str(result.get("n_ice_rings", 0)),
        f"{result.get('mean_shape_ratio', 0.0):.2f}",
    ]
    cell = result.get("unit_cell")
    sg = result.get("space_group")
    if sg and isinstance(cell, list | tuple) and len(cell) == 6 and result.get("indexed", True) is not False:
        head += [str(sg)] + [f"{v:.2f}" for v in cell]
    else:
        head += ["NA"] * 7
    errors = "; ".join(result.get("errors", []))
    return "{" + " ".join(head) + " {" + errors + "}}"


def format_result_line(
    info: dict, result: dict, output_format, delimiter: str | None, prefix_key: str | None, default_prefix: str
) -> str:
    prefix = info.get(prefix_key) if prefix_key else None
    prefix = prefix if prefix else default_prefix
    items = []
    for item in output_format:
        key, style = parse_item(item)
        if key == prefix_key:  # the prefix item opens the line; it is not repeated as an item
            continue
        if style == "result":
            items.append("result " + result_block(result))
        elif style == "bare":
            items.append(_fmt(info.get(key)))
        elif style == "braced":
            items.append(f"{key} {{{_fmt(info.get(key))}}}")
        else:
            items.append(f"{key} {_fmt(info.get(key))}")
    return f"{prefix} " + (delimiter if delimiter is not None else " ").join(items)
