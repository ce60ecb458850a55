"""The Splitter: the detector stream in, every frame to NXmx HDF5 (still compressed, byte for byte).

The work happens in Rust threads that never take the GIL (`intxr._splitter.SplitterCore`); this
is its Python face: a context manager, counters, and construction from the startup config.
"""

from __future__ import annotations

import json
import re

from intxr import _splitter
from intxr.config import BeamlineConfig

# Every option's default is the startup config's declaration (intxr.config.SplitterKeys): declared
# once there; the Rust core is always given every option explicitly.
_DEFAULT = BeamlineConfig()
HEARTBEAT = 1.0  # seconds between the Splitter's heartbeats to readers (not a config key)

# A bind endpoint naming this host by a name ZeroMQ would not bind as meant: localhost is loopback,
# never every interface.
_LOOPBACK_NAMES = re.compile(r"^tcp://(localhost)(?=:\d+$)")


def bind_endpoint(endpoint: str | None) -> str | None:
    """Where to bind for `endpoint`: `tcp://localhost:P` binds 127.0.0.1 only."""
    if endpoint is None:
        return None
    return _LOOPBACK_NAMES.sub("tcp://127.0.0.1", endpoint)


def _loopback_host(host: str | None) -> bool:
    return host in ("localhost", "::1") or (host or "").startswith("127.")


class Splitter:
    """Receive a detector stream and write every frame to `<output_dir>/<name>_master.h5` +
    `<name>_data_NNNNNN.h5`; with `serve`, hand frames to readers that ask for them
    (`intxr.reader.source.FrameSource`), and with `publish`, publish counters and per-series
    accounting (`counters`, `series_start`, `series_end`, `series_written` topics).

    `<name>` (`series_name`) is the series' prefix, made unique in `output_dir` (`_r2`, `_r3`, ...):
    files are never replaced. Below `disk_reserve_mb` (plus the queued frames) of free space the
    open files are closed and frames are counted as not written until space returns
    (`check_free_space=False`: only when a write fails, for file systems whose statvfs misleads).

    with Splitter("tcp://127.0.0.1:9999", "/data/run") as splitter:
        splitter.join()          # until stopped, or `max_series` series end (end message or timeout)
    splitter.counters()          # frames received / written, malformed, md5 mismatches, ...
    """

    def __init__(
        self,
        endpoint: str,
        output_dir: str,
        *,
        bind: bool = _DEFAULT.detector_socket == "bind",
        protocol: str = _DEFAULT.protocol,
        frames_per_file: int = _DEFAULT.frames_per_file,
        series_timeout: float = _DEFAULT.splitter_series_timeout,
        max_series: int | None = None,
        filepath_key: str | None = _DEFAULT.filepath_key,
        buffer_mb: int = _DEFAULT.splitter_buffer_mb,
        disk_reserve_mb: float = _DEFAULT.disk_reserve_mb,
        check_free_space: bool = _DEFAULT.check_free_space,
        serve: str | None = None,
        serve_mode: str = "push" if _DEFAULT.stype == "pull" else "request",
        skip_after: float = _DEFAULT.skip_after,
        heartbeat: float = HEARTBEAT,
        publish: str | None = None,
    ):
        self._core = _splitter.SplitterCore(
            endpoint,
            str(output_dir),
            bind=bind,
            protocol=protocol,
            frames_per_file=frames_per_file,
            series_timeout=series_timeout,
            max_series=max_series,
            filepath_key=filepath_key,
            buffer_bytes=int(buffer_mb) << 20,
            disk_reserve=int(disk_reserve_mb * (1 << 20)),
            check_free_space=check_free_space,
            serve=bind_endpoint(serve),
            serve_mode=serve_mode,
            skip_after=skip_after,
            heartbeat=heartbeat,
            publish=bind_endpoint(publish),
        )

    @classmethod
    def from_config(cls, beamline: BeamlineConfig, **overrides) -> Splitter:
        """From a validated startup-config section; `overrides` (None: not given) win."""
        serve, publish = beamline.serve_bind_endpoint, beamline.splitter_publish_bind_endpoint
        if _loopback_host(beamline.host):
            # host = localhost means this machine only: never every interface.
            serve, publish = (re.sub(r"^tcp://\*(?=:)", "tcp://127.0.0.1", e) for e in (serve, publish))
        settings = dict(
            endpoint=beamline.detector_endpoint,
            output_dir=beamline.output_dir,
            bind=beamline.detector_socket == "bind",
            protocol=beamline.protocol,
            frames_per_file=beamline.frames_per_file,
            series_timeout=beamline.splitter_series_timeout,
            filepath_key=beamline.filepath_key,
            buffer_mb=beamline.splitter_buffer_mb,
            disk_reserve_mb=beamline.disk_reserve_mb,
            check_free_space=beamline.check_free_space,
            serve=serve,
            serve_mode="push" if beamline.stype == "pull" else "request",
            skip_after=beamline.skip_after,
            publish=publish,
            heartbeat=HEARTBEAT,
        )
        settings.update({k: v for k, v in overrides.items() if v is not None})
        endpoint, output_dir = settings.pop("endpoint"), settings.pop("output_dir")
        return cls(endpoint, output_dir, **settings)

    def start(self) -> Splitter:
        self._core.start()
        return self

    def stop(self) -> None:
        """Stop receiving; frames already received are written and the files closed."""
        self._core.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end (stop() or max_series); True when it has."""
        return self._core.join(timeout)

    @property
    def running(self) -> bool:
        return self._core.is_running()

    def counters(self) -> dict:
        """Run counters (`bad_requests`: messages on the readers' port that were not a reader's
        request, given no frame), `last_error`, `files` (master files of the latest 1000 series closed;
        `master_files` counts them all; `series_ended` counts every series closed, a stop's too,
        so it ends equal to `series_started`) and `series`: per series
        opened (`series`, `series_name`), received / forwarded / skipped (with
        `forwarded_ranges` / `skipped_ranges`) / bytes / md5_mismatches / malformed, and
        frames_written / not_written / write_error / master_file once its files are closed (the
        latest 100 series)."""
        counters = self._core.counters()
        counters["series"] = [json.loads(text) for text in counters["series"]]
        return counters

    def __enter__(self) -> Splitter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.join()
