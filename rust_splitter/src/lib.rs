//! `intxr._splitter`: the Rust core behind Interceptor's Splitter. Only this file and
//! `py_stream.rs` (the stream parser's Python face, which maps its own StreamError) know PyO3:
//! they release the GIL around the work; the core's errors become Python exceptions once, here
//! (`From<SplitterError> for PyErr`).

pub mod codec;
pub mod error;
pub mod frame;
pub mod geometry;
pub mod nxmx;
pub mod prescreen;
mod py_stream;
pub mod serve;
pub mod splitter;
pub mod stream;
pub mod writeback;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

create_exception!(
    _splitter,
    DecodeError,
    PyValueError,
    "A frame blob that cannot be decoded."
);

use error::SplitterError;

/// The one mapping of the core's errors to Python exceptions.
impl From<SplitterError> for PyErr {
    fn from(err: SplitterError) -> PyErr {
        let text = err.to_string();
        match err {
            SplitterError::Decode(_) => DecodeError::new_err(text),
            SplitterError::Nxmx(nxmx::NxmxError::Hdf5 { .. } | nxmx::NxmxError::Io { .. }) => {
                PyOSError::new_err(text)
            }
            SplitterError::Nxmx(_) | SplitterError::Invalid(_) | SplitterError::Run(_) => {
                PyValueError::new_err(text)
            }
            SplitterError::Internal(_) => PyRuntimeError::new_err(text),
        }
    }
}

impl From<codec::CodecError> for PyErr {
    fn from(err: codec::CodecError) -> PyErr {
        SplitterError::from(err).into()
    }
}

/// A read-only byte view of any C-contiguous buffer (bytes, zmq.Frame, numpy array viewed as uint8).
fn read_view(buf: &PyBuffer<u8>, what: &str) -> Result<(usize, usize), SplitterError> {
    if !buf.is_c_contiguous() {
        return Err(SplitterError::invalid(format!(
            "{what} must be C-contiguous"
        )));
    }
    Ok((buf.buf_ptr() as usize, buf.len_bytes()))
}

fn write_view(buf: &PyBuffer<u8>, what: &str) -> Result<(usize, usize), SplitterError> {
    if buf.readonly() {
        return Err(SplitterError::invalid(format!("{what} must be writable")));
    }
    read_view(buf, what)
}

// SAFETY (both helpers): the PyBuffer is held by the caller for the whole call, so the memory
// stays valid and pinned while the GIL is released.
unsafe fn as_slice<'a>(view: (usize, usize)) -> &'a [u8] {
    std::slice::from_raw_parts(view.0 as *const u8, view.1)
}
unsafe fn as_slice_mut<'a>(view: (usize, usize)) -> &'a mut [u8] {
    std::slice::from_raw_parts_mut(view.0 as *mut u8, view.1)
}

/// Compress raw frame bytes to a bitshuffle-LZ4 chunk (with its 12-byte header).
#[pyfunction]
#[pyo3(signature = (data, elem_size, block_elems=0))]
fn bslz4_compress<'py>(
    py: Python<'py>,
    data: PyBuffer<u8>,
    elem_size: usize,
    block_elems: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let src = read_view(&data, "data")?;
    let blob =
        py.detach(|| codec::bslz4_compress(unsafe { as_slice(src) }, elem_size, block_elems))?;
    Ok(PyBytes::new(py, &blob))
}

/// Decompress a bitshuffle-LZ4 chunk into `out` (a writable buffer of exactly the frame's bytes).
#[pyfunction]
fn bslz4_decompress_into(
    py: Python<'_>,
    blob: PyBuffer<u8>,
    out: PyBuffer<u8>,
    elem_size: usize,
) -> PyResult<()> {
    let src = read_view(&blob, "blob")?;
    let dst = write_view(&out, "out")?;
    py.detach(|| {
        codec::bslz4_decompress_into(
            unsafe { as_slice(src) },
            unsafe { as_slice_mut(dst) },
            elem_size,
        )
    })?;
    Ok(())
}

/// A writable buffer viewed as u32 (numpy uint32 arrays are 4-byte aligned).
fn u32_view(buf: &PyBuffer<u8>, what: &str, n: usize) -> Result<(usize, usize), SplitterError> {
    let view = write_view(buf, what)?;
    if view.1 != n * 4 || view.0 % 4 != 0 {
        return Err(SplitterError::invalid(format!(
            "{what} must be an aligned buffer of {n} uint32"
        )));
    }
    Ok(view)
}

/// The binned outputs, checked against the binned shape: `sums` aligned uint32 and `valid` bytes,
/// one of each per bin.
struct BinnedViews {
    sums: (usize, usize),
    valid: (usize, usize),
    bins: usize,
}

impl BinnedViews {
    fn new(
        sums: &PyBuffer<u8>,
        valid: &PyBuffer<u8>,
        spec: prescreen::BinSpec,
    ) -> Result<Self, SplitterError> {
        let (h, w) = spec.shape();
        let bins = h * w;
        let sums = u32_view(sums, "sums", bins)?;
        let valid = write_view(valid, "valid")?;
        if valid.1 != bins {
            return Err(SplitterError::invalid(format!(
                "valid must hold {bins} bytes"
            )));
        }
        Ok(Self { sums, valid, bins })
    }

    /// # Safety
    /// as `as_slice_mut`'s (the buffers outlive the slices and nothing else touches them).
    unsafe fn slices<'a>(&self) -> (&'a mut [u32], &'a mut [u8]) {
        (
            std::slice::from_raw_parts_mut(self.sums.0 as *mut u32, self.bins),
            as_slice_mut(self.valid),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn bin_spec(
    elem_size: usize,
    signed: bool,
    rows: usize,
    cols: usize,
    factor: usize,
    lo: i64,
    hi: i64,
) -> Result<prescreen::BinSpec, SplitterError> {
    let pixel = prescreen::Pixel::from_dtype(elem_size, signed).ok_or_else(|| {
        SplitterError::invalid(format!(
            "no binning for {elem_size}-byte {} pixels",
            if signed { "signed" } else { "unsigned" }
        ))
    })?;
    if factor == 0 {
        return Err(SplitterError::invalid("factor must be >= 1".to_string()));
    }
    Ok(prescreen::BinSpec {
        rows,
        cols,
        factor,
        pixel,
        lo,
        hi,
    })
}

/// The bitshuffle unshuffle path this process uses (`scalar`, `sse2`, `avx2`, `gfni` or `avx512`): the
/// best the CPU runs, or the one `INTXR_BSLZ4_KERNEL` forced (where the CPU runs it).
#[pyfunction]
fn bslz4_kernel() -> &'static str {
    match codec::Kernel::current() {
        codec::Kernel::Scalar => "scalar",
        codec::Kernel::Sse2 => "sse2",
        codec::Kernel::Avx2 => "avx2",
        codec::Kernel::Gfni => "gfni",
        codec::Kernel::Avx512 => "avx512",
    }
}

/// Decode a bitshuffle-LZ4 chunk into `out` (a rows x cols frame of `elem_size`-byte pixels) and
/// bin it into `sums` (uint32, (rows // factor) x (cols // factor)) and `valid` (uint8) on the way:
/// the pre-screen's `bin_frame` without reading the frame back from memory.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn bslz4_decompress_bin_into(
    py: Python<'_>,
    blob: PyBuffer<u8>,
    out: PyBuffer<u8>,
    elem_size: usize,
    signed: bool,
    rows: usize,
    cols: usize,
    factor: usize,
    lo: i64,
    hi: i64,
    sums: PyBuffer<u8>,
    valid: PyBuffer<u8>,
) -> PyResult<()> {
    let spec = bin_spec(elem_size, signed, rows, cols, factor, lo, hi)?;
    let src = read_view(&blob, "blob")?;
    let dst = write_view(&out, "out")?;
    let binned = BinnedViews::new(&sums, &valid, spec)?;
    py.detach(|| {
        // SAFETY: as_slice's contract.
        let (sums, valid) = unsafe { binned.slices() };
        prescreen::bslz4_decompress_bin_into(
            unsafe { as_slice(src) },
            unsafe { as_slice_mut(dst) },
            spec,
            sums,
            valid,
        )
    })?;
    Ok(())
}

/// Bin a decoded frame (`bslz4_decompress_bin_into` without the decoding).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn bin_frame_into(
    py: Python<'_>,
    frame: PyBuffer<u8>,
    elem_size: usize,
    signed: bool,
    rows: usize,
    cols: usize,
    factor: usize,
    lo: i64,
    hi: i64,
    sums: PyBuffer<u8>,
    valid: PyBuffer<u8>,
) -> PyResult<()> {
    let spec = bin_spec(elem_size, signed, rows, cols, factor, lo, hi)?;
    let src = read_view(&frame, "frame")?;
    let binned = BinnedViews::new(&sums, &valid, spec)?;
    py.detach(|| {
        // SAFETY: as_slice's contract.
        let (sums, valid) = unsafe { binned.slices() };
        prescreen::bin_frame(unsafe { as_slice(src) }, spec, sums, valid)
    })
    .map_err(SplitterError::invalid)?;
    Ok(())
}

/// The (uncompressed bytes, block bytes) of a bitshuffle-LZ4 chunk's header.
#[pyfunction]
fn bslz4_header(blob: PyBuffer<u8>) -> PyResult<(u64, u32)> {
    let src = read_view(&blob, "blob")?;
    Ok(codec::bslz4_header(unsafe { as_slice(src) })?)
}

/// Compress raw bytes to one LZ4 block without a size prefix (a v1 `lz4<` blob).
#[pyfunction]
fn lz4_compress<'py>(py: Python<'py>, data: PyBuffer<u8>) -> PyResult<Bound<'py, PyBytes>> {
    let src = read_view(&data, "data")?;
    let blob = py.detach(|| codec::lz4_compress(unsafe { as_slice(src) }));
    Ok(PyBytes::new(py, &blob))
}

/// Decompress one raw LZ4 block into `out`, which must be filled exactly.
#[pyfunction]
fn lz4_decompress_into(py: Python<'_>, blob: PyBuffer<u8>, out: PyBuffer<u8>) -> PyResult<()> {
    let src = read_view(&blob, "blob")?;
    let dst = write_view(&out, "out")?;
    py.detach(|| {
        codec::lz4_decompress_into(unsafe { as_slice(src) }, unsafe { as_slice_mut(dst) })
    })?;
    Ok(())
}

fn parse_json(text: &str, what: &str) -> Result<serde_json::Value, SplitterError> {
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(text)
        .map_err(|e| SplitterError::invalid(format!("{what} is not JSON: {e}")))
}

/// The geometry (wire JSON, `intxr.geometry`) of a detector stream's header: `config_json` the
/// v1 config part, the v2 start message or the cbfToEiger config part, `header_json` the header
/// part ("" or "null" when none); `rows` x `cols` the frame shape (0: the header's size keys).
/// The same function the Splitter uses for the series info it serves.
#[pyfunction]
#[pyo3(signature = (config_json, header_json, rows=0, cols=0))]
fn geometry_from_header(
    config_json: &str,
    header_json: &str,
    rows: usize,
    cols: usize,
) -> PyResult<String> {
    let config = parse_json(config_json, "config_json")?;
    let header = parse_json(header_json, "header_json")?;
    let source = geometry::source_from_keys(&config, &header);
    Ok(
        geometry::Geometry::from_stream(&config, &header, rows, cols, source)
            .to_json()
            .to_string(),
    )
}

/// The geometry (wire JSON) of a miniCBF PILATUS_1.2 header text.
#[pyfunction]
#[pyo3(signature = (header_text, rows=0, cols=0))]
fn geometry_from_cbf_header(header_text: &str, rows: usize, cols: usize) -> String {
    geometry::Geometry::from_cbf_header(header_text, rows, cols)
        .to_json()
        .to_string()
}

/// The version of the HDF5 library the Splitter's NXmx writer links ("1.14.5").
#[pyfunction]
fn hdf5_version() -> String {
    nxmx::hdf5_version()
}

/// The Splitter: receives a detector stream and writes every frame to NXmx HDF5, in threads that
/// never take the GIL. `intxr.splitter.Splitter` is the Python face of this class.
#[pyclass(name = "SplitterCore")]
struct SplitterCore {
    config: splitter::SplitterConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<splitter::Counters>,
    // A Mutex, not &mut self: a signal handler may call stop() while join() waits.
    handle: std::sync::Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
}

#[pymethods]
impl SplitterCore {
    /// Every option is required: `intxr.splitter.Splitter` passes them from the config's one
    /// declaration of each (intxr.config.SplitterKeys), so no second copy of the defaults lives here.
    #[new]
    #[pyo3(signature = (endpoint, output_dir, *, bind, protocol, frames_per_file, series_timeout,
                        max_series, filepath_key, buffer_bytes, disk_reserve, check_free_space,
                        serve, serve_mode, skip_after, heartbeat, publish))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        endpoint: String,
        output_dir: String,
        bind: bool,
        protocol: &str,
        frames_per_file: usize,
        series_timeout: f64,
        max_series: Option<u64>,
        filepath_key: Option<String>,
        buffer_bytes: u64,
        disk_reserve: u64,
        check_free_space: bool,
        serve: Option<String>,
        serve_mode: &str,
        skip_after: f64,
        heartbeat: f64,
        publish: Option<String>,
    ) -> PyResult<Self> {
        let mode = match serve_mode {
            "request" => serve::ServeMode::Request,
            "push" => serve::ServeMode::Push,
            other => {
                return Err(SplitterError::invalid(format!(
                    "serve_mode {other:?}: expected request or push"
                ))
                .into())
            }
        };
        for (name, value) in [("skip_after", skip_after), ("heartbeat", heartbeat)] {
            if value.is_nan() || value <= 0.0 {
                return Err(SplitterError::invalid(format!(
                    "{name} must be positive, not {value}"
                ))
                .into());
            }
        }
        let protocol = stream::protocol_named(protocol).map_err(SplitterError::Invalid)?;
        if frames_per_file == 0 || series_timeout.is_nan() || series_timeout <= 0.0 {
            return Err(SplitterError::invalid(
                "frames_per_file and series_timeout must be positive",
            )
            .into());
        }
        Ok(SplitterCore {
            config: splitter::SplitterConfig {
                endpoint,
                bind,
                protocol,
                output_dir: output_dir.into(),
                frames_per_file,
                series_timeout: std::time::Duration::from_secs_f64(series_timeout),
                max_series,
                filepath_key,
                buffer_bytes,
                disk_reserve,
                check_free_space,
                serve: serve::ServeConfig {
                    endpoint: serve,
                    mode,
                    skip_after: std::time::Duration::from_secs_f64(skip_after),
                    heartbeat: std::time::Duration::from_secs_f64(heartbeat),
                    publish,
                },
            },
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(splitter::Counters::default()),
            handle: std::sync::Mutex::new(None),
        })
    }

    /// Start receiving in a background thread.
    fn start(&self) -> PyResult<()> {
        let mut handle = self
            .handle
            .lock()
            .map_err(|_| SplitterError::Internal("splitter state poisoned"))?;
        if handle.is_some() {
            return Err(SplitterError::invalid("the splitter is already running").into());
        }
        let (config, stop, counters) = (
            self.config.clone(),
            self.stop.clone(),
            self.counters.clone(),
        );
        // Named like its writer and server threads, so a profile tells them apart.
        let spawned = std::thread::Builder::new()
            .name("splitter-receiver".into())
            .spawn(move || splitter::run(config, stop, counters))
            .map_err(|e| SplitterError::Run(format!("cannot start the receiver thread: {e}")))?;
        *handle = Some(spawned);
        Ok(())
    }

    /// Ask the threads to stop: frames already received are still written and files closed.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Wait (without the GIL) until the run ends or `timeout` seconds pass; True when it ended.
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline =
            timeout.map(|t| std::time::Instant::now() + std::time::Duration::from_secs_f64(t));
        loop {
            let finished_handle = {
                let mut guard = self
                    .handle
                    .lock()
                    .map_err(|_| SplitterError::Internal("splitter state poisoned"))?;
                if guard.as_ref().is_none_or(|h| h.is_finished()) {
                    Some(guard.take())
                } else {
                    None
                }
            };
            if let Some(finished) = finished_handle {
                if let Some(handle) = finished {
                    let result = py.detach(|| handle.join());
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(message)) => return Err(SplitterError::Run(message).into()),
                        Err(_) => {
                            return Err(
                                SplitterError::Internal("the splitter thread panicked").into()
                            )
                        }
                    }
                }
                return Ok(true);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            // Short naps: a run that ends is seen within 2 ms (was 20), and Ctrl-C still works.
            py.detach(|| std::thread::sleep(std::time::Duration::from_millis(2)));
            py.check_signals()?;
        }
    }

    fn is_running(&self) -> bool {
        self.handle
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Counters of this run, plus `last_error` and `files` (master files of the latest series closed).
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in self.counters.snapshot() {
            dict.set_item(name, value)?;
        }
        dict.set_item(
            "last_error",
            self.counters
                .last_error
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
        )?;
        dict.set_item(
            "files",
            self.counters
                .files
                .lock()
                .map(|f| f.iter().cloned().collect::<Vec<_>>())
                .unwrap_or_default(),
        )?;
        // Per-series accounting as JSON text; intxr.splitter.Splitter.counters() parses it.
        let series: Vec<String> = self
            .counters
            .series
            .lock()
            .map(|s| s.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default();
        dict.set_item("series", series)?;
        Ok(dict)
    }
}

#[pymodule]
fn _splitter(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DecodeError", m.py().get_type::<DecodeError>())?;
    m.add_function(wrap_pyfunction!(bslz4_compress, m)?)?;
    m.add_function(wrap_pyfunction!(bslz4_decompress_into, m)?)?;
    m.add_function(wrap_pyfunction!(bslz4_header, m)?)?;
    m.add_function(wrap_pyfunction!(bslz4_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(bslz4_decompress_bin_into, m)?)?;
    m.add_function(wrap_pyfunction!(bin_frame_into, m)?)?;
    m.add_function(wrap_pyfunction!(lz4_compress, m)?)?;
    m.add_function(wrap_pyfunction!(lz4_decompress_into, m)?)?;
    m.add_function(wrap_pyfunction!(geometry_from_header, m)?)?;
    m.add_function(wrap_pyfunction!(geometry_from_cbf_header, m)?)?;
    m.add_function(wrap_pyfunction!(hdf5_version, m)?)?;
    m.add_class::<SplitterCore>()?;
    py_stream::register(m)?;
    Ok(())
}
