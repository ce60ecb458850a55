"""Splitter throughput on loopback: frames/s and GB/s from the detector socket to files on disk.

(a) the Rust Splitter, (b) a plain pyzmq + h5py `write_direct_chunk` loop doing the same work,
(c) raw sequential writes of the same bytes with no HDF5, (d) the loopback transfer alone (receive
and drop). Realistic compressed frames: the real
thaumatin frame as bs16-lz4, at 6M and as a 16M frame tiled from it."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import threading
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq

from intxr import codec, stream_format
from intxr.geometry import Geometry
from intxr.images import read_cbf
from intxr.simulate import pixels_for
from intxr.splitter import Splitter
from intxr.testing import shared_path

N_FRAMES = 200
# The first round of each is a warm-up (first-touch page faults, the first file in a fresh directory).
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module", params=["6M", "16M"])
def series(request):
    frame = read_cbf(str(shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0005.cbf.bz2"))).data
    if request.param == "16M":
        frame = np.tile(frame, (2, 2))[:4362, :4148]
    pixels = pixels_for(np.ascontiguousarray(frame), "bs16-lz4")
    blob = codec.encode(pixels, "bs16-lz4<")
    config = stream_format.detector_config(sim_geometry(pixels.shape), pixels.shape, pixels.dtype, nimages=N_FRAMES)
    messages = [stream_format.v1_header(1, "basic", config)]
    messages += [
        stream_format.v1_image(1, k, blob, "bs16-lz4<", pixels.shape, pixels.dtype, 0, 1) for k in range(N_FRAMES)
    ]
    messages.append(stream_format.v1_end(1))
    return request.param, pixels.shape, blob, messages


def detector(messages) -> str:
    """A bound PUSH socket (as a detector binds) sending the series from a thread; its endpoint."""
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 10000)
    port = socket.bind_to_random_port("tcp://127.0.0.1")

    def send():
        for parts in messages:
            socket.send_multipart(parts, copy=False)
        socket.close()

    threading.Thread(target=send, daemon=True).start()
    return f"tcp://127.0.0.1:{port}"


def with_cpu(benchmark, fn):
    """`fn`, recording the process's CPU seconds (user + system, every thread: the detector's too)
    of each call in extra_info: what the same work costs the cores, beside the wall time."""
    cpu = benchmark.extra_info.setdefault("cpu_ms", [])

    def run(*args):
        before = resource.getrusage(resource.RUSAGE_SELF)
        fn(*args)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(round(1e3 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime), 1))

    return run


@pytest.fixture
def out_dir(tmp_path):
    """pedantic's `setup`: a fresh output directory for each round, made (and the last round's
    removed) outside the timed run. Deleting files is no part of the work, and it would charge
    whoever started writeback early: a deleted page under writeback is waited for, a dirty one is
    dropped unwritten."""
    made: list[str] = []

    def setup():
        for old in made:
            shutil.rmtree(old, ignore_errors=True)
        made[:] = [tempfile.mkdtemp(dir=tmp_path)]
        return (made[0],), {}

    yield setup
    for old in made:
        shutil.rmtree(old, ignore_errors=True)


def record(benchmark, size, blob, role):
    benchmark.group = f"splitter {size} bs16-lz4"
    benchmark.extra_info["role"] = role
    benchmark.extra_info["bytes_per_frame"] = len(blob)


def splitter(out, messages, frames: int, finish=None) -> None:
    """The Splitter, until the series' files are closed. `finish(dir)` runs on the output directory
    then (the fsync of the to-disk group)."""
    with Splitter(detector(messages), out, max_series=1) as run:
        run.join(120)
    assert run.counters()["frames_written"] == frames
    if finish is not None:
        finish(out)


def test_splitter_rust(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "intxr")
    benchmark.pedantic(with_cpu(benchmark, lambda out: splitter(out, messages, N_FRAMES)), setup=out_dir, **ROUNDS)


def pyzmq_h5py_loop(out, messages, shape, frames: int, finish=None) -> None:
    """The plain loop: receive, extend the dataset, write the blob as a chunk. `finish(dir)` runs
    on the output directory once the file is closed (the fsync of the to-disk group)."""
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.connect(detector(messages))
    with h5py.File(Path(out) / "data.h5", "w") as f:
        ds = f.create_dataset(
            "entry/data/data",
            shape=(0, *shape),
            maxshape=(None, *shape),
            dtype=np.uint16,
            chunks=(1, *shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        n = 0
        while True:
            parts = socket.recv_multipart(copy=False)
            if len(parts) == 4:
                ds.resize(n + 1, axis=0)
                ds.id.write_direct_chunk((n, 0, 0), parts[2].buffer)
                n += 1
            elif b"dseries_end" in parts[0].bytes:
                break
    socket.close(linger=0)
    assert n == frames
    if finish is not None:
        finish(out)


def test_pyzmq_h5py_loop(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:pyzmq+h5py")
    run = with_cpu(benchmark, lambda out: pyzmq_h5py_loop(out, messages, shape, N_FRAMES))
    benchmark.pedantic(run, setup=out_dir, **ROUNDS)


def loopback_only(messages, frames: int) -> None:
    """Receive the series from the same detector thread and drop every message: no parsing, no
    disk. The floor for anything that takes this detector's frames over loopback."""
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.connect(detector(messages))
    n = 0
    while True:
        parts = socket.recv_multipart(copy=False)
        if len(parts) == 4:
            n += 1
        elif b"dseries_end" in parts[0].bytes:
            break
    socket.close(linger=0)
    assert n == frames


def test_loopback_only(benchmark, series):
    """(d) The detector's sending and a receive that drops: what the loopback transfer alone costs
    on this machine, with the detector's thread competing for the same cores as the receiver."""
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:loopback only, no disk")
    benchmark.pedantic(with_cpu(benchmark, loopback_only), args=(messages, N_FRAMES), **ROUNDS)


def raw_write(out, buffers, finish=None) -> None:
    """Raw sequential writes of `buffers` to one file; `finish(dir)` as for the others."""
    with open(Path(out) / "raw.bin", "wb") as f:
        for buffer in buffers:
            f.write(buffer)
    if finish is not None:
        finish(out)


def test_raw_sequential_write(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:raw write")
    benchmark.pedantic(lambda out: raw_write(out, [blob] * N_FRAMES), setup=out_dir, **ROUNDS)


def test_raw_sequential_write_distinct_buffers(benchmark, series, out_dir):
    """(c') as (c), from N_FRAMES separate copies of the blob, as the Splitter has them (each frame
    arrives in its own ZeroMQ buffer): the page-cache copy then reads memory, not one cache-hot
    buffer. Shows how much of the gap to (c) is that alone."""
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:raw write, distinct buffers")
    buffers = [bytearray(blob) for _ in range(N_FRAMES)]
    benchmark.pedantic(lambda out: raw_write(out, buffers), setup=out_dir, **ROUNDS)


# A short series: the per-series fixed costs (start-up, the master written at the start and at the
# end, seeing the end) against the same loop, which has none of them.
SHORT = 10


@pytest.fixture(scope="module")
def short_series(series):
    size, shape, blob, messages = series
    return size, shape, blob, messages[:1] + messages[1 : 1 + SHORT] + messages[-1:]


def test_splitter_rust_short_series(benchmark, short_series, out_dir):
    size, shape, blob, messages = short_series
    benchmark.group = f"splitter {SHORT}-frame series {size}"
    benchmark.extra_info["role"] = "intxr"
    benchmark.pedantic(lambda out: splitter(out, messages, SHORT), setup=out_dir, rounds=5, iterations=1)


def test_pyzmq_h5py_loop_short_series(benchmark, short_series, out_dir):
    size, shape, blob, messages = short_series
    benchmark.group = f"splitter {SHORT}-frame series {size}"
    benchmark.extra_info["role"] = "baseline:pyzmq+h5py"
    run = lambda out: pyzmq_h5py_loop(out, messages, shape, SHORT)  # noqa: E731
    benchmark.pedantic(run, setup=out_dir, rounds=5, iterations=1)


# To disk: each method's files are fsynced inside the timed run, so every figure is "the bytes are
# on the device" and none depends on how much the kernel's page cache happens to absorb (on this
# shared machine buffered writes of the same 1.2 GB ran anywhere from 77 MB/s to 1.1 GB/s).


def fsync_tree(root) -> None:
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def test_splitter_rust_to_disk(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "intxr")
    benchmark.group = f"splitter {size} bs16-lz4, fsynced"
    benchmark.pedantic(lambda out: splitter(out, messages, N_FRAMES, fsync_tree), setup=out_dir, **ROUNDS)


def test_pyzmq_h5py_loop_to_disk(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:pyzmq+h5py")
    benchmark.group = f"splitter {size} bs16-lz4, fsynced"
    run = lambda out: pyzmq_h5py_loop(out, messages, shape, N_FRAMES, fsync_tree)  # noqa: E731
    benchmark.pedantic(run, setup=out_dir, **ROUNDS)


def test_raw_sequential_write_to_disk(benchmark, series, out_dir):
    size, shape, blob, messages = series
    record(benchmark, size, blob, "baseline:raw write")
    benchmark.group = f"splitter {size} bs16-lz4, fsynced"
    benchmark.pedantic(lambda out: raw_write(out, [blob] * N_FRAMES, fsync_tree), setup=out_dir, **ROUNDS)


def test_raw_sequential_write_short_series(benchmark, short_series, out_dir):
    size, shape, blob, messages = short_series
    benchmark.group = f"splitter {SHORT}-frame series {size}"
    benchmark.extra_info["role"] = "baseline:raw write"
    benchmark.pedantic(lambda out: raw_write(out, [blob] * SHORT), setup=out_dir, rounds=5, iterations=1)


def sim_geometry(shape: tuple[int, int]) -> Geometry:
    return Geometry.simple(wavelength=1.0, distance=200.0, beam_center=(shape[1] / 2, shape[0] / 2),
                           pixel_size=(0.075, 0.075), image_size=(shape[1], shape[0]))
