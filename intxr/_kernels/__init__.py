"""Compiled Cython kernels, built from ../../cython_ext/ at install time (see build_backend/)."""
