"""Data shared by the pipeline stages: images (with their `intxr.geometry.Geometry`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from intxr.geometry import Geometry  # noqa: F401  (the one model; re-exported for old imports)


@dataclass
class Image:
    """One detector frame with where it came from."""

    data: np.ndarray  # (slow, fast) = (rows, columns)
    geometry: Geometry
    source: str
    index: int = 0  # frame number within the source, 0-based
    extra: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.data.shape[0])

    @property
    def width(self) -> int:
        return int(self.data.shape[1])
