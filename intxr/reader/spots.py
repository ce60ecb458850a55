"""From strong pixels to spots, as dials.find_spots builds them for a still.

- Spots are the 4-connected components of the strong pixels (DIALS's 2-D pixel-list labeller),
  numbered in the order of each spot's first pixel in raster order.
- npix: strong pixels in the spot; intensity: sum of their raw counts (summed in float32, as DIALS
  stores shoebox data); centroid (x, y): count-weighted mean of the pixel centres (pixel i spans
  [i, i+1), so a one-pixel spot at column i has x = i + 0.5); bbox [x0, x1, y0, y1], half-open.
- Filters: min_spot_size <= npix <= max_spot_size, then the peak (first maximum in raster order,
  at its pixel centre) within max_separation of the centroid (<=).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class Spots:
    """Columns of a reflection table for one frame, in spot-finder order."""

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray
    npix: np.ndarray
    bbox: np.ndarray  # (n, 4): x0, x1, y0, y1
    peak_x: np.ndarray
    peak_y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def select(self, keep: np.ndarray) -> Spots:
        return Spots(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    @classmethod
    def empty(cls) -> Spots:
        z = np.zeros(0)
        return cls(z, z, z, np.zeros(0, np.int64), np.zeros((0, 4), np.int64), z, z)

    def as_dicts(self) -> list[dict]:
        """DIALS's names and conventions, for JSON output."""
        return [
            {"x": float(x), "y": float(y), "intensity": float(i), "npix": int(n), "bbox": [int(b) for b in box]}
            for x, y, i, n, box in zip(self.x, self.y, self.intensity, self.npix, self.bbox, strict=True)
        ]


def label_strong_pixels(strong: np.ndarray, image: np.ndarray) -> Spots:
    """Spots from the strong pixels' raster indices (ascending), by the Cython labeller."""
    from intxr._kernels.dispersion import label_spots

    columns = label_spots(np.ascontiguousarray(strong, dtype=np.int64), image)
    return Spots(**columns)


def filter_spots(
    spots: Spots, min_spot_size: int = 3, max_spot_size: int = 1000, max_separation: float | None = 2.0
) -> Spots:
    keep = (spots.npix >= min_spot_size) & (spots.npix <= max_spot_size)
    if max_separation is not None:
        keep &= np.hypot(spots.peak_x - spots.x, spots.peak_y - spots.y) <= max_separation
    return spots.select(keep)


def spots_touching(spots: Spots, pixels: np.ndarray, width: int) -> np.ndarray:
    """Which spots have one of `pixels` (raster indices) inside their bbox grown by one pixel: the spots
    whose peak saturated (a saturated pixel is untrusted, so it is never part of the spot itself)."""
    if len(spots) == 0 or len(pixels) == 0:
        return np.zeros(len(spots), dtype=bool)
    py, px = np.divmod(np.asarray(pixels), width)
    b = spots.bbox
    if len(spots) * len(pixels) > 1_000_000:
        # Many saturated pixels: count them in each grown bbox with a summed-area table instead of
        # comparing every spot with every pixel.
        height = int(max(py.max(), b[:, 3].max())) + 1
        sat = np.zeros((height + 1, width + 1), np.int32)
        np.add.at(sat, (py + 1, px + 1), 1)
        table = sat.cumsum(0).cumsum(1)
        x0, x1 = np.clip(b[:, 0] - 1, 0, width), np.clip(b[:, 1] + 1, 0, width)
        y0, y1 = np.clip(b[:, 2] - 1, 0, height), np.clip(b[:, 3] + 1, 0, height)
        return (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) > 0
    inside = (
        (px[None, :] >= b[:, 0:1] - 1)
        & (px[None, :] <= b[:, 1:2])
        & (py[None, :] >= b[:, 2:3] - 1)
        & (py[None, :] <= b[:, 3:4])
    )
    return inside.any(axis=1)


def label_reference(strong_mask: np.ndarray, image: np.ndarray) -> Spots:
    """Flood-fill labelling in plain Python/numpy: the reference `label_strong_pixels` is tested against."""
    h, w = strong_mask.shape
    label = np.full(strong_mask.shape, -1, dtype=np.int64)
    components: list[list[tuple[int, int]]] = []
    for start in np.flatnonzero(strong_mask):
        j0, i0 = divmod(int(start), w)
        if label[j0, i0] >= 0:
            continue
        label[j0, i0] = len(components)
        stack, pixels = [(j0, i0)], []
        while stack:
            j, i = stack.pop()
            pixels.append((j, i))
            for nj, ni in ((j - 1, i), (j + 1, i), (j, i - 1), (j, i + 1)):
                if 0 <= nj < h and 0 <= ni < w and strong_mask[nj, ni] and label[nj, ni] < 0:
                    label[nj, ni] = len(components)
                    stack.append((nj, ni))
        components.append(sorted(pixels))
    cols = {k: [] for k in ("x", "y", "intensity", "npix", "bbox", "peak_x", "peak_y")}
    for pixels in components:
        jj = np.array([p[0] for p in pixels])
        ii = np.array([p[1] for p in pixels])
        v = image[jj, ii].astype(np.float32)
        total = float(np.add.reduce(v, dtype=np.float32)) if len(v) else 0.0
        peak = int(np.argmax(v))
        cols["x"].append(float(np.sum(v.astype(np.float64) * (ii + 0.5)) / total))
        cols["y"].append(float(np.sum(v.astype(np.float64) * (jj + 0.5)) / total))
        cols["intensity"].append(total)
        cols["npix"].append(len(pixels))
        cols["bbox"].append([ii.min(), ii.max() + 1, jj.min(), jj.max() + 1])
        cols["peak_x"].append(ii[peak] + 0.5)
        cols["peak_y"].append(jj[peak] + 0.5)
    if not components:
        return Spots.empty()
    return Spots(
        np.array(cols["x"]),
        np.array(cols["y"]),
        np.array(cols["intensity"]),
        np.array(cols["npix"]),
        np.array(cols["bbox"], dtype=np.int64),
        np.array(cols["peak_x"]),
        np.array(cols["peak_y"]),
    )
