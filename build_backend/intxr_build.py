"""PEP 517 backend: compile the Cython kernels in place, then let maturin build the wheel.

maturin builds the PyO3 crate `rust_splitter/` as `intxr._splitter` and packs the `intxr/` tree,
which by then holds the compiled `intxr/_kernels/*.so` kernels from `cython_ext/`. Everything else
(metadata, sdist, editable installs) is maturin's own.
"""

import glob
import os

import maturin
from maturin import (  # noqa: F401  (re-exported hooks)
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

try:
    from maturin import get_requires_for_build_editable, prepare_metadata_for_build_editable  # noqa: F401
except ImportError:  # older maturin
    pass


def _build_cython_kernels() -> None:
    import numpy
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    sources = sorted(glob.glob(os.path.join("cython_ext", "*.pyx")))
    # One build for every x86-64: the kernels that gain from AVX2 / AVX-512 carry variants for them
    # and pick one at run time (latticescore: target_clones; dispersion: dispersion_simd.h).
    flags = ["-O3"]
    extensions = []
    for src in sources:
        name = os.path.splitext(os.path.basename(src))[0]
        extra = []
        depends = sorted(glob.glob(os.path.join("cython_ext", name + "_*.h")))
        if name == "dispersion":
            # The exact tests must round as DIALS's doubles do: no fused multiply-adds.
            extra = ["-ffp-contract=off", "-fno-math-errno"]
        extensions.append(
            Extension(
                "intxr._kernels." + name,
                [src],
                include_dirs=[numpy.get_include(), "cython_ext"],
                extra_compile_args=flags + extra,
                depends=depends,
            )
        )
    dist = Distribution({"ext_modules": cythonize(extensions, quiet=True), "script_name": "setup.py"})
    build_ext = dist.get_command_obj("build_ext")
    build_ext.inplace = True
    build_ext.build_temp = os.path.join("target", "cython")
    build_ext.ensure_finalized()
    build_ext.run()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _build_cython_kernels()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _build_cython_kernels()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
