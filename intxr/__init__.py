"""Interceptor: real-time analysis of X-ray diffraction frames streamed from a pixel-array detector."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("intxr")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
