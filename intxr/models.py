"""Data shared by the pipeline stages: detector geometry and images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Flat-detector geometry and acquisition settings, in the units crystallographers read.

    Beam centre in pixels (fast, slow), lengths in mm, wavelength in Angstrom, times in seconds.
    """

    wavelength: float = 1.0
    distance: float = 200.0
    beam_center_x: float = 0.0
    beam_center_y: float = 0.0
    pixel_size_x: float = 0.075
    pixel_size_y: float = 0.075
    count_time: float = 0.01
    frame_time: float = 0.01
    count_cutoff: int | None = None
    description: str = "Simulated detector"
    detector_number: str = "SIM-0000"
    sensor_material: str = "Si"
    sensor_thickness: float = 0.45
    omega_start: float = 0.0
    omega_increment: float = 0.0
    known: bool = True  # False when the source carried no geometry and these are placeholders
    parallax: bool = True  # apply dxtbx's parallax correction (silicon sensors) to pixel -> resolution

    @property
    def energy_ev(self) -> float:
        # E[eV] = h c / lambda = 12398.42 eV A / lambda[A]
        return 12398.419843 / self.wavelength


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
