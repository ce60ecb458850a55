//! `intxr._splitter`: the Rust core behind Interceptor's Splitter. Only this file knows PyO3:
//! it releases the GIL around the work and maps errors to Python exceptions.

pub mod codec;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(_splitter, DecodeError, PyValueError, "A frame blob that cannot be decoded.");

impl From<codec::CodecError> for PyErr {
    fn from(err: codec::CodecError) -> PyErr {
        DecodeError::new_err(err.to_string())
    }
}

/// A read-only byte view of any C-contiguous buffer (bytes, zmq.Frame, numpy array viewed as uint8).
fn read_view(buf: &PyBuffer<u8>, what: &str) -> PyResult<(usize, usize)> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{what} must be C-contiguous")));
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
fn bslz4_compress<'py>(py: Python<'py>, data: PyBuffer<u8>, elem_size: usize, block_elems: usize) -> PyResult<Bound<'py, PyBytes>> {
    let src = read_view(&data, "data")?;
    let blob = py.detach(|| codec::bslz4_compress(unsafe { as_slice(src) }, elem_size, block_elems))?;
    Ok(PyBytes::new(py, &blob))
}

/// Decompress a bitshuffle-LZ4 chunk into `out` (a writable buffer of exactly the frame's bytes).
#[pyfunction]
fn bslz4_decompress_into(py: Python<'_>, blob: PyBuffer<u8>, out: PyBuffer<u8>, elem_size: usize) -> PyResult<()> {
    let src = read_view(&blob, "blob")?;
    let dst = write_view(&out, "out")?;
    py.detach(|| codec::bslz4_decompress_into(unsafe { as_slice(src) }, unsafe { as_slice_mut(dst) }, elem_size))?;
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
    py.detach(|| codec::lz4_decompress_into(unsafe { as_slice(src) }, unsafe { as_slice_mut(dst) }))?;
    Ok(())
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
    Ok(())
}
