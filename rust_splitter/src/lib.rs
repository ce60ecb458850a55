//! `intxr._splitter`: the Rust core behind Interceptor's Splitter. Only this file knows PyO3:
//! it releases the GIL around the work and maps errors to Python exceptions.

pub mod codec;
pub mod frame;
pub mod nxmx;
mod py_stream;
pub mod serve;
pub mod splitter;
pub mod stream;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
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

impl From<codec::CodecError> for PyErr {
    fn from(err: codec::CodecError) -> PyErr {
        DecodeError::new_err(err.to_string())
    }
}

/// A read-only byte view of any C-contiguous buffer (bytes, zmq.Frame, numpy array viewed as uint8).
fn read_view(buf: &PyBuffer<u8>, what: &str) -> PyResult<(usize, usize)> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous"
        )));
    }
    Ok((buf.buf_ptr() as usize, buf.len_bytes()))
}

fn write_view(buf: &PyBuffer<u8>, what: &str) -> PyResult<(usize, usize)> {
    if buf.readonly() {
        return Err(PyValueError::new_err(format!("{what} must be writable")));
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
    #[new]
    #[pyo3(signature = (endpoint, output_dir, *, bind=false, protocol="auto", frames_per_file=1000,
                        series_timeout=10.0, max_series=None, filepath_key=None, buffer_bytes=4u64 << 30,
                        disk_reserve=16u64 << 20, check_free_space=true, serve=None, serve_mode="request", skip_after=2.0, heartbeat=1.0, publish=None))]
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
                return Err(PyValueError::new_err(format!(
                    "serve_mode {other:?}: expected request or push"
                )))
            }
        };
        for (name, value) in [("skip_after", skip_after), ("heartbeat", heartbeat)] {
            if value.is_nan() || value <= 0.0 {
                return Err(PyValueError::new_err(format!(
                    "{name} must be positive, not {value}"
                )));
            }
        }
        let protocol = match protocol {
            "auto" => None,
            "v1" => Some(frame::Protocol::V1),
            "v2" => Some(frame::Protocol::V2),
            "cbftoeiger" => Some(frame::Protocol::CbfToEiger),
            other => {
                return Err(PyValueError::new_err(format!(
                    "protocol {other:?}: expected auto, v1, v2 or cbftoeiger"
                )))
            }
        };
        if frames_per_file == 0 || series_timeout.is_nan() || series_timeout <= 0.0 {
            return Err(PyValueError::new_err(
                "frames_per_file and series_timeout must be positive",
            ));
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
            .map_err(|_| PyValueError::new_err("splitter state poisoned"))?;
        if handle.is_some() {
            return Err(PyValueError::new_err("the splitter is already running"));
        }
        let (config, stop, counters) = (
            self.config.clone(),
            self.stop.clone(),
            self.counters.clone(),
        );
        *handle = Some(std::thread::spawn(move || {
            splitter::run(config, stop, counters)
        }));
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
                    .map_err(|_| PyValueError::new_err("splitter state poisoned"))?;
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
                        Ok(Err(message)) => return Err(PyValueError::new_err(message)),
                        Err(_) => {
                            return Err(PyValueError::new_err("the splitter thread panicked"))
                        }
                    }
                }
                return Ok(true);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            py.detach(|| std::thread::sleep(std::time::Duration::from_millis(20)));
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
    m.add_function(wrap_pyfunction!(lz4_compress, m)?)?;
    m.add_function(wrap_pyfunction!(lz4_decompress_into, m)?)?;
    m.add_class::<SplitterCore>()?;
    py_stream::register(m)?;
    Ok(())
}
