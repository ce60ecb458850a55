"""The per-frame analysis a reader runs: pre-screen, strong pixels, spots, per-image stats, score.

`SpotFinder(params, geometry)` holds what is fixed for a series (parameters, the static and
resolution masks); `SpotFinder.find(image)` returns a `FrameResult` with the spots in DIALS's
conventions, DIALS's per-image statistics, the Interceptor score and where the time went. With
`backend = "dials"` the strong pixels and spots come from real DIALS (intxr.reader.dials_backend)
and the rest is the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from intxr.geometry import Geometry, d_star_sq, resolution_mask
from intxr.reader.prescreen import PrescreenParams, PrescreenResult, prescreen
from intxr.reader.scoring import UNSCORED_HRES, FrameScore, score_frame
from intxr.reader.spots import Spots, filter_spots, label_strong_pixels, spots_touching
from intxr.reader.stats import ImageStats, per_image_stats
from intxr.reader.threshold import ThresholdParams, find_strong_pixels, trusted_range_for


@dataclass(frozen=True)
class SpotFinderParams:
    """Everything that decides the spots (DIALS's names and defaults) and the score (Interceptor's)."""

    threshold: ThresholdParams = ThresholdParams()
    min_spot_size: int = 3  # DIALS: Auto = 3 for pixel-array detectors
    max_spot_size: int = 1000
    max_separation: float = 2.0
    d_min: float | None = None  # resolution mask applied to pixels before thresholding
    d_max: float | None = None
    max_strong_pixel_fraction: float = 0.25
    backend: str = "native"  # native | dials
    prescreen: bool = True
    prescreen_params: PrescreenParams = PrescreenParams()
    # Interceptor scoring (processing config)
    min_bragg_peaks: int = 10
    calculate_score: bool = True
    score_d_min: float | None = None
    score_d_max: float | None = None
    good_spots_only: bool = True
    ice_filter: bool = True

    @classmethod
    def from_processing(cls, section) -> SpotFinderParams:
        """From a validated processing-config section (intxr.config.ProcessingConfig)."""
        return cls(
            threshold=ThresholdParams(
                algorithm=section.spf_algorithm,
                gain=section.spf_gain,
                kernel_size=section.spf_kernel_size,
                sigma_background=section.spf_sigma_background,
                sigma_strong=section.spf_sigma_strong,
                min_local=section.spf_min_local,
                global_threshold=section.spf_global_threshold,
            ),
            min_spot_size=section.spf_min_spot_size,
            max_spot_size=section.spf_max_spot_size,
            max_separation=section.spf_max_separation,
            backend=section.spf_backend,
            prescreen=section.spf_prescreen,
            min_bragg_peaks=section.min_bragg_peaks,
            calculate_score=section.spf_calculate_score,
            score_d_min=section.spf_d_min,
            score_d_max=section.spf_d_max,
            good_spots_only=section.spf_good_spots_only,
            ice_filter=section.spf_ice_filter,
        )


@dataclass
class FrameResult:
    n_strong_pixels: int
    spots: Spots
    stats: ImageStats
    score: FrameScore
    prescreened: bool = False  # True: the pre-screen found the frame blank and spot finding was skipped
    prescreen: PrescreenResult | None = None
    timing: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_json(self, **identity) -> dict:
        """One JSON object per frame, DIALS's names for spots and stats (`intxr find-spots --json`)."""
        return {
            **identity,
            "n_strong_pixels": self.n_strong_pixels,
            **self.stats.as_dict(),
            "n_spots": len(self.spots),
            "prescreened": self.prescreened,
            "score": asdict(self.score),
            "spots": self.spots.as_dicts(),
            "timing": {k: round(v, 6) for k, v in self.timing.items()},
            "errors": list(self.errors),
        }


class SpotFinder:
    """Spot finding for one series: fixed geometry, frame shape and parameters."""

    def __init__(self, params: SpotFinderParams, geometry: Geometry, static_mask: np.ndarray | None = None):
        params.threshold.validate()
        if params.backend not in ("native", "dials"):
            raise ValueError(f"backend {params.backend!r}: expected native or dials")
        if params.min_spot_size < 1 or params.max_spot_size < params.min_spot_size:
            raise ValueError("need 1 <= min_spot_size <= max_spot_size")
        self.params = params
        self.geometry = geometry
        self.static_mask = None if static_mask is None else np.asarray(static_mask, dtype=bool)
        self._masks: dict[tuple[int, int], np.ndarray | None] = {}
        self._bins: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        if params.backend == "dials":
            from intxr.reader import dials_backend

            dials_backend.require()

    def mask_for(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Static mask AND resolution mask (uint8), built once per frame shape; None when nothing is masked."""
        shape = tuple(shape)
        if shape not in self._masks:
            mask = None
            if self.static_mask is not None:
                if self.static_mask.shape != shape:
                    raise ValueError(f"mask shape {self.static_mask.shape} does not match frame shape {shape}")
                mask = self.static_mask.copy()
            if (self.params.d_min is not None or self.params.d_max is not None) and self.geometry.known:
                keep = resolution_mask(self.geometry, shape, self.params.d_min, self.params.d_max)
                mask = keep.copy() if mask is None else mask & keep
            self._masks[shape] = None if mask is None else mask.astype(np.uint8)
        return self._masks[shape]

    def prescreens(self, skip_prescreen: bool = False) -> bool:
        return self.params.prescreen and not skip_prescreen and self.params.backend == "native"

    def binning_for(self, dtype, shape: tuple[int, int], skip_prescreen: bool = False):
        """What `prescreen.decode_and_bin` needs to bin a frame of this type and shape for the
        pre-screen while decoding it, (trusted range, factor, mask, arrays to fill); None when no
        pre-screen runs. The arrays are this finder's, reused: the binned frame of the frame before
        is gone once the next one is decoded."""
        if not self.prescreens(skip_prescreen):
            return None
        trusted = trusted_range_for(np.empty(0, dtype), self.geometry.count_cutoff)
        factor = self.params.prescreen_params.factor
        key = (tuple(shape), factor)
        if key not in self._bins:  # one pair of binned arrays per frame shape, refilled every frame
            self._bins[key] = (np.empty((shape[0] // factor, shape[1] // factor), np.uint32),
                               np.empty((shape[0] // factor, shape[1] // factor), np.uint8))
        return trusted, factor, self.mask_for(tuple(shape)), self._bins[key]

    def find(self, image: np.ndarray, *, skip_prescreen: bool = False, binned=None) -> FrameResult:
        """`binned`: the pre-screen's binned frame of this image, when the decoder made it
        (`decode_and_bin` with `binning_for`)."""
        p = self.params
        timing: dict[str, float] = {}
        errors: list[str] = []
        if image.ndim != 2 or image.size == 0:
            raise ValueError(f"expected a non-empty 2-D frame, got shape {image.shape}")
        mask = self.mask_for(image.shape)
        trusted = trusted_range_for(image, self.geometry.count_cutoff)

        screen = None
        if self.prescreens(skip_prescreen):
            t = time.perf_counter()
            screen = prescreen(image, mask, trusted, p.prescreen_params, binned)
            timing["prescreen"] = time.perf_counter() - t
            if not screen.passed:
                return self._result(image, Spots.empty(), 0, np.zeros(0, np.int64), timing, errors, screen, True)

        t = time.perf_counter()
        if p.backend == "dials":
            from intxr.reader import dials_backend

            strong, spots = dials_backend.find_spots(image, mask, trusted, self.geometry, p)
            overloaded = np.flatnonzero((image > trusted[1]).ravel() & (True if mask is None else mask.ravel() > 0))
            timing["threshold"] = time.perf_counter() - t
            t = time.perf_counter()
        else:
            strong, overloaded = find_strong_pixels(image, mask, trusted, p.threshold)
            timing["threshold"] = time.perf_counter() - t
            limit = math.ceil(p.max_strong_pixel_fraction * image.size)
            t = time.perf_counter()
            if len(strong) > limit:
                # DIALS stops here too (a frame this bright is not a diffraction pattern to score).
                errors.append(
                    f"{len(strong)} strong pixels exceed max_strong_pixel_fraction "
                    f"{p.max_strong_pixel_fraction} of the frame ({limit}); spots not built"
                )
                spots = Spots.empty()
            else:
                spots = label_strong_pixels(strong, image)
        spots = filter_spots(spots, p.min_spot_size, p.max_spot_size, p.max_separation)
        timing["spots"] = time.perf_counter() - t
        return self._result(image, spots, len(strong), overloaded, timing, errors, screen, False)

    def _result(self, image, spots, n_strong, overloaded, timing, errors, screen, prescreened) -> FrameResult:
        p = self.params
        t = time.perf_counter()
        if image.dtype.kind == "u" and len(overloaded):
            # 2^bits-1 and 2^bits-2 mark gaps and dead pixels (dxtbx reads them as -1, -2): not saturated.
            overloaded = overloaded[image.ravel()[overloaded] < np.iinfo(image.dtype).max - 1]
        n_overloads = int(spots_touching(spots, overloaded, image.shape[1]).sum())
        missing = self.geometry.missing_error()
        if missing is not None:
            # No resolution without the header's wavelength and detector position: the counts that need
            # none are reported, the rest is -1 (stats) / not scored, and the result says why.
            errors.append(missing)
            stats = ImageStats(len(spots), -1, -1, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0)
            score = FrameScore(len(spots), n_overloads, -999, UNSCORED_HRES, 0, 0.0, tuple(errors))
            timing["stats"] = time.perf_counter() - t
            return FrameResult(n_strong, spots, stats, score, prescreened, screen, timing, errors)
        dss = d_star_sq(self.geometry, spots.x, spots.y)
        stats = per_image_stats(dss, spots.intensity)
        score = score_frame(
            dss,
            spots.intensity,
            spots.bbox,
            n_overloads=n_overloads,
            min_bragg_peaks=p.min_bragg_peaks,
            calculate_score=p.calculate_score,
            d_min=p.score_d_min,
            d_max=p.score_d_max,
            good_spots_only=p.good_spots_only,
            ice_filter=p.ice_filter,
        )
        if errors:
            score = replace(score, errors=tuple(errors) + tuple(score.errors))
        timing["stats"] = time.perf_counter() - t
        return FrameResult(n_strong, spots, stats, score, prescreened, screen, timing, errors)


def find_spots(
    image: np.ndarray, geometry: Geometry, params: SpotFinderParams = SpotFinderParams(), mask: np.ndarray | None = None
) -> FrameResult:
    """One frame, one call: array + mask + geometry + parameters -> spots, stats, score."""
    return SpotFinder(params, geometry, mask).find(image)
