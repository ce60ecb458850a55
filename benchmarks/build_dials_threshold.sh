#!/usr/bin/env bash
# Build DIALS's own threshold extension (dials_algorithms_image_threshold_ext: DispersionThreshold,
# DispersionExtendedThreshold) from source, so that the benchmarks and tests time and compare real
# DIALS in the same run where the whole of DIALS cannot be installed (it is not on PyPI).
#
# It compiles the three files DIALS's own CMakeLists.txt lists for that module, with its default
# build type's optimisation (RelWithDebInfo: -O2 -DNDEBUG), against PyPI's cctbx-base (scitbx flex
# and its Boost.Python), and makes `dials.algorithms.image.threshold` importable from the venv.
#
# usage: benchmarks/build_dials_threshold.sh DIALS_SRC CCTBX_PROJECT_SRC [VENV]
#   DIALS_SRC          a checkout of github.com/dials/dials (the directory holding src/dials)
#   CCTBX_PROJECT_SRC  a checkout of github.com/cctbx/cctbx_project (scitbx's headers; the wheel
#                      lacks the generated ones)
#   VENV               the virtual environment to use (default .venv); cctbx-base and
#                      boost-headers are installed into it
set -euo pipefail
dials_src=$(realpath "$1")
cctbx_src=$(realpath "$2")
venv=$(realpath "${3:-.venv}")
py="$venv/bin/python"
"$venv/bin/pip" install -q cctbx-base boost-headers
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pyinc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
out="$venv/dials-threshold"
mkdir -p "$out/include"

# scitbx's array_family headers, with the ones its build generates (small_reductions.h, ...)
cp -r "$cctbx_src/scitbx" "$out/include/"
(cd "$out/include" && PYTHONPATH=. "$py" -c \
    'from scitbx.source_generators.array_family import generate_all; generate_all.refresh("scitbx/array_family")')

boost_python=$(ls "$site"/cctbx_base.libs/libboost_python3*.so.*)
src="$dials_src/src/dials/algorithms/image/threshold"
g++ -std=c++14 -O2 -DNDEBUG -fPIC -shared -w \
    -I"$dials_src/src" -I"$out/include" -I"$site/boost_headers/include" -I"$pyinc" \
    "$src/boost_python/unimodal.cc" "$src/boost_python/local.cc" "$src/boost_python/threshold_ext.cc" \
    -o "$out/dials_algorithms_image_threshold_ext.so" "$boost_python" -Wl,-rpath,"$(dirname "$boost_python")"

# DIALS's own package files down to the module (dials/__init__.py needs libtbx: cctbx-base has it)
for d in dials dials/algorithms dials/algorithms/image dials/algorithms/image/threshold; do
    mkdir -p "$out/$d"
    cp "$dials_src/src/$d/__init__.py" "$out/$d/"
done
echo "$out" > "$site/dials-threshold.pth"
"$py" -c 'import dials.algorithms.image.threshold as t; print("built", t.DispersionThreshold, "from", t.__file__)'
echo "DIALS commit: $(git -C "$dials_src" rev-parse HEAD 2>/dev/null || echo unknown)"
