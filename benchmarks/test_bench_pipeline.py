"""End to end on this machine: simulated detector -> Splitter -> MPI readers -> Collector.

Frames/s (first frame received by the Splitter to last result at the Collector) and per-frame
latency (Splitter receipt -> result at the Collector, p50/p99) for real PILATUS 6M frames, all
hits and a raster-like mix (90% blank), with the pre-screen on (intxr) and off (baseline, the
same pipeline running the full spot finder on every frame). Every frame is written and
accounted: skip_after is long, so none is skipped."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from intxr.testing import shared_path

EXE = Path(sys.executable).parent
N_FRAMES = 60
N_FRAMES_SMOKE = 12  # the default test run (benchmarks disabled): that it runs and accounts, not how fast
N_RANKS = 3  # the collector (mostly idle) and two readers on this 2-core machine


def _sources(mix: str, n_frames: int = N_FRAMES) -> list[str]:
    frames = sorted(str(p) for p in shared_path("data", "cbf", "thaumatin_grid").glob("thau_3_2_*.cbf.bz2"))
    hits, blanks = frames[:10], frames[10:]
    if mix == "hits":
        return [hits[k % len(hits)] for k in range(n_frames)]
    # A raster row: one frame in ten crosses the crystal.
    return [hits[k // 10 % len(hits)] if k % 10 == 5 else blanks[k % len(blanks)] for k in range(n_frames)]


def run_pipeline(sources: list[str], prescreen: bool, rate: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from test_pipeline import write_config

    with tempfile.TemporaryDirectory() as tmp:
        config, _ = write_config(Path(tmp), simulate_rate=rate, send_to_ui="False", skip_after="600",
                                 timeout="30")
        record = Path(tmp) / "results.jsonl"
        args = [str(EXE / "intxrd"), "-c", str(config), "-b", "t", "-n", str(N_RANKS), "--max_series", "1",
                "--record", str(record), "--simulate", *sources]
        if not prescreen:
            args.append("--no_prescreen")
        done = subprocess.run(args, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in record.read_text().splitlines()]
    results = [r for r in rows if "frame" in r]
    [summary] = [r["summary"] for r in rows if "summary" in r]
    assert summary["received"] == summary["written"] == len(sources) == len(results)
    first = min(r["received"] for r in results)
    last = max(r["received"] + r["latency"] for r in results)
    latencies = sorted(r["latency"] for r in results)
    return {
        "frames_per_s": len(results) / (last - first),
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "blank": summary["blank"],
        "hits": summary["hits"],
    }


@pytest.mark.parametrize("rate", ["0", "15"], ids=["burst", "15Hz"])
@pytest.mark.parametrize("mix", ["hits", "raster90blank"])
@pytest.mark.parametrize("prescreen", [True, False], ids=["prescreen", "no-prescreen"])
def test_pipeline_end_to_end(benchmark, mix, prescreen, rate):
    """burst: every frame sent at once (throughput; latency then includes the queue);
    15Hz: paced below capacity (latency of a frame that does not wait for others)."""
    n_frames = N_FRAMES_SMOKE if benchmark.disabled else N_FRAMES
    sources = _sources(mix, n_frames)
    benchmark.group = f"pipeline {mix} {N_FRAMES} frames (6M) {'burst' if rate == '0' else rate + ' Hz'}"
    benchmark.extra_info["role"] = "intxr" if prescreen else "baseline:no-prescreen"
    figures = benchmark.pedantic(run_pipeline, args=(sources, prescreen, rate), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 4) for k, v in figures.items()})
    print(f"\n{mix} prescreen={prescreen} rate={rate}: {figures}")
    assert figures["hits"] >= (n_frames // 10 if mix != "hits" else n_frames) - 1
