"""`spf_backend = dials`: real DIALS computes the strong pixels when it is importable (a beamline's DIALS
environment); labelling, spot filters, stats and score are ours (tested identical to DIALS's).

DIALS cannot be installed from PyPI, so this module is optional: `require()` raises a clear error
when it is absent, and its tests are skipped with that reason.
"""

from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import dials.algorithms.image.threshold  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ValueError(
            "spf_backend = dials needs DIALS (dials.algorithms.image.threshold), which is not "
            "importable here; use spf_backend = native"
        )


def strong_pixels(image: np.ndarray, mask: np.ndarray | None, trusted: tuple[float, float], params) -> np.ndarray:
    """Raster indices of DIALS's strong pixels (DispersionThreshold / DispersionExtendedThreshold)."""
    from dials.algorithms.image.threshold import DispersionExtendedThreshold, DispersionThreshold
    from scitbx.array_family import flex  # what dials.array_family.flex re-exports for these types

    values = np.ascontiguousarray(image, dtype=np.float64)
    valid = (values >= trusted[0]) & (values <= trusted[1])
    if mask is not None:
        valid &= mask.astype(bool)
    im = flex.double(values)
    mk = flex.bool(np.ascontiguousarray(valid))
    t = params.threshold
    threshold = t.global_threshold
    if threshold == "Auto":
        from intxr.reader.threshold import estimate_global_threshold

        threshold = estimate_global_threshold(image)
    cls = DispersionExtendedThreshold if t.algorithm == "dispersion_extended" else DispersionThreshold
    algorithm = cls(im.all(), t.kernel_size, t.sigma_background, t.sigma_strong, float(threshold), t.min_local)
    out = flex.bool(flex.grid(im.all()), False)
    if t.gain is None:
        algorithm(im, mk, out)
    else:
        algorithm(im, mk, flex.double(flex.grid(im.all()), float(t.gain)), out)
    return np.flatnonzero(out.as_numpy_array().ravel())


def find_spots(image, mask, trusted, geometry, params):
    from intxr.reader.spots import label_strong_pixels

    strong = strong_pixels(image, mask, trusted, params)
    return strong, label_strong_pixels(strong, np.ascontiguousarray(image))
