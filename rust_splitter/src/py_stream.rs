//! `intxr._splitter.StreamParser`: the Splitter's own stream parser (`crate::stream`) for Python,
//! so that `intxr monitor`, the tests and the simulator's checks read a detector stream by the same
//! rules as the Splitter. `intxr.stream` wraps the dicts it returns in dataclasses.
//!
//! Blobs are not copied: a frame's `blob` is a memoryview of the part it came in.

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView, PySlice};
use serde_json::Value;

use crate::frame::{Compression, Protocol};
use crate::stream::{self, Parsed};

create_exception!(
    _splitter,
    StreamError,
    PyValueError,
    "A detector stream message that cannot be read; the text names the part and what is wrong \
     (`part`: the index of the part at fault, or None)."
);

fn stream_error(py: Python<'_>, err: &stream::StreamError) -> PyErr {
    let exc = StreamError::new_err(err.to_string());
    if let Err(e) = exc.value(py).setattr("part", err.part()) {
        return e;
    }
    exc
}

/// A JSON value as the Python value `json.loads` would give.
fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// The name `intxr.codec` decodes a compression by.
fn codec_name(c: Compression) -> &'static str {
    match c {
        Compression::BsLz4 => "bslz4",
        Compression::Lz4Raw => "lz4<",
        Compression::Lz4Hdf5 => "lz4",
        Compression::None => "none",
    }
}

/// A part's bytes. zmq.Frame offers only a simple buffer (no strides, which PyBuffer asks for): it
/// is read through a memoryview of it.
fn part_buffer(k: usize, part: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    PyBuffer::<u8>::get(part)
        .or_else(|_| PyBuffer::<u8>::get(PyMemoryView::from(part)?.as_any()))
        .map_err(|e| PyTypeError::new_err(format!("part {k}: not a bytes-like object ({e})")))
}

/// What one message gave, before it becomes Python objects.
enum Outcome {
    /// A v1 detector config sent as a message of its own after its dheader.
    Config(Value),
    Events(Vec<Parsed>),
}

/// Reads one detector stream, message by message, as the Splitter does: with `protocol="auto"` the
/// first message that parses fixes the protocol; a v1 config sent alone after its `dheader` comes
/// out as a `config` event; cbfToEiger's header, resent with every frame, starts a series once.
///
/// `parse(parts)` takes the parts of one ZeroMQ multipart message (bytes, zmq.Frame, memoryview)
/// and returns a list of dicts, each with `kind` `start`, `config`, `frame` or `end`; a message that
/// cannot be read raises `StreamError` and changes nothing.
#[pyclass(module = "intxr._splitter")]
pub struct StreamParser {
    /// None: detect it (then `locked` once known).
    asked: Option<Protocol>,
    locked: Option<Protocol>,
    /// The v1 series whose dheader came without its config: the next message may be the config.
    config_for: Option<i64>,
    /// The cbfToEiger series already started.
    cbf_series: Option<i64>,
}

#[pymethods]
impl StreamParser {
    #[new]
    #[pyo3(signature = (protocol="auto"))]
    fn new(protocol: &str) -> PyResult<Self> {
        let asked = stream::protocol_named(protocol).map_err(PyValueError::new_err)?;
        Ok(StreamParser {
            asked,
            locked: None,
            config_for: None,
            cbf_series: None,
        })
    }

    /// The protocol in use: the one asked for, or the one detected; None before the first message.
    #[getter]
    fn protocol(&self) -> Option<&'static str> {
        self.asked.or(self.locked).map(Protocol::name)
    }

    /// Parse one multipart message into events (dicts; see the class).
    fn parse<'py>(
        &mut self,
        py: Python<'py>,
        parts: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let buffers = parts
            .iter()
            .enumerate()
            .map(|(k, p)| part_buffer(k, p))
            .collect::<PyResult<Vec<_>>>()?;
        let views = buffers
            .iter()
            .map(|b| crate::read_view(b, "a message part"))
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = self.asked.or(self.locked);
        let config_series = self.config_for.take();
        let outcome = py.detach(|| {
            // SAFETY: `buffers` holds every part's buffer until this closure returns.
            let slices: Vec<&[u8]> = views
                .iter()
                .map(|&v| unsafe { crate::as_slice(v) })
                .collect();
            if config_series.is_some() && protocol != Some(Protocol::V2) {
                if let Some(config) = stream::lone_config(&slices) {
                    return Ok(Outcome::Config(config));
                }
            }
            stream::parse_message(&slices, protocol).map(Outcome::Events)
        });
        let events = match outcome {
            Ok(Outcome::Events(events)) => events,
            Ok(Outcome::Config(config)) => {
                let dict = PyDict::new(py);
                dict.set_item("kind", "config")?;
                dict.set_item("protocol", Protocol::V1.name())?;
                dict.set_item("series", config_series)?;
                dict.set_item("config", to_py(py, &config)?)?;
                return PyList::new(py, [dict]);
            }
            Err(err) => return Err(stream_error(py, &err)),
        };
        drop(buffers);
        let out = PyList::empty(py);
        for event in events {
            match event {
                Parsed::Start(start) => {
                    self.locked.get_or_insert(start.protocol);
                    if start.protocol == Protocol::CbfToEiger {
                        if self.cbf_series == Some(start.series) {
                            continue;
                        }
                        self.cbf_series = Some(start.series);
                    }
                    if stream::config_follows(&start) {
                        self.config_for = Some(start.series);
                    }
                    let dict = PyDict::new(py);
                    dict.set_item("kind", "start")?;
                    dict.set_item("protocol", start.protocol.name())?;
                    dict.set_item("series", start.series)?;
                    dict.set_item("header", to_py(py, &start.header)?)?;
                    dict.set_item("config", to_py(py, &start.config)?)?;
                    let mask = match &start.pixel_mask {
                        Some((rows, cols, values)) => {
                            let bytes: Vec<u8> =
                                values.iter().flat_map(|v| v.to_le_bytes()).collect();
                            Some((*rows, *cols, PyBytes::new(py, &bytes)))
                        }
                        None => None,
                    };
                    dict.set_item("pixel_mask", mask)?;
                    out.append(dict)?;
                }
                Parsed::Frame(frame) => {
                    let h = &frame.header;
                    self.locked.get_or_insert(h.protocol);
                    let part = PyMemoryView::from(&parts[frame.part])?;
                    let blob = part.get_item(PySlice::new(
                        py,
                        frame.range.start as isize,
                        frame.range.end as isize,
                        1,
                    ))?;
                    let dict = PyDict::new(py);
                    dict.set_item("kind", "frame")?;
                    dict.set_item("protocol", h.protocol.name())?;
                    dict.set_item("series", h.series)?;
                    dict.set_item("frame", h.frame)?;
                    dict.set_item("shape", h.shape)?;
                    // The Splitter writes and serves every frame as unsigned pixels of this size.
                    dict.set_item("dtype", format!("uint{}", 8 * h.elem_size))?;
                    dict.set_item("encoding", &h.encoding)?;
                    dict.set_item("codec", codec_name(h.compression))?;
                    dict.set_item("md5_ok", h.md5_ok)?;
                    dict.set_item("header", to_py(py, &h.header)?)?;
                    dict.set_item("part", frame.part)?;
                    dict.set_item("blob", blob)?;
                    out.append(dict)?;
                }
                Parsed::End { protocol, series } => {
                    self.locked.get_or_insert(protocol);
                    if self.cbf_series == Some(series) {
                        self.cbf_series = None;
                    }
                    let dict = PyDict::new(py);
                    dict.set_item("kind", "end")?;
                    dict.set_item("protocol", protocol.name())?;
                    dict.set_item("series", series)?;
                    out.append(dict)?;
                }
            }
        }
        Ok(out)
    }
}

/// The protocol of one message by its first part (`v1`, `v2`, `cbftoeiger`), as the Splitter
/// detects it; `StreamError` when it cannot be told.
#[pyfunction]
fn detect_stream_protocol(py: Python<'_>, parts: Vec<Bound<'_, PyAny>>) -> PyResult<&'static str> {
    let buffers = parts
        .iter()
        .take(1)
        .map(|p| part_buffer(0, p))
        .collect::<PyResult<Vec<_>>>()?;
    let views = buffers
        .iter()
        .map(|b| crate::read_view(b, "a message part"))
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: `buffers` holds the part's buffer for the whole call.
    let slices: Vec<&[u8]> = views
        .iter()
        .map(|&v| unsafe { crate::as_slice(v) })
        .collect();
    stream::detect_protocol(&slices)
        .map(Protocol::name)
        .map_err(|e| stream_error(py, &e))
}

/// Add the parser to `intxr._splitter`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("StreamError", m.py().get_type::<StreamError>())?;
    m.add_class::<StreamParser>()?;
    m.add_function(wrap_pyfunction!(detect_stream_protocol, m)?)?;
    Ok(())
}
