//! What the Splitter moves around: a series header and frames with their still-compressed blobs.
//! No PyO3 here.

use serde_json::Value;

/// Detector stream protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// DECTRIS stream v1: multipart JSON + blob (dheader-1.0, dimage-1.0, ...).
    V1,
    /// DECTRIS stream v2: one CBOR message per part (start, image, end).
    V2,
    /// SSRL cbfToEiger-0.1: six parts per frame, header resent with every frame.
    CbfToEiger,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V1 => "v1",
            Protocol::V2 => "v2",
            Protocol::CbfToEiger => "cbftoeiger",
        }
    }
}

/// How a frame's blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Bitshuffle-LZ4 with the 12-byte HDF5-filter header (v1 `bs*-lz4<`, v2 `bslz4`):
    /// an HDF5 filter-32008 chunk as is.
    BsLz4,
    /// One raw LZ4 block without a size prefix (v1 `lz4<`).
    Lz4Raw,
    /// HDF5-LZ4 framing (v2 `lz4`): an HDF5 filter-32004 chunk as is.
    Lz4Hdf5,
    /// Uncompressed pixels.
    None,
}

/// The start of a series: the detector's header and configuration, as JSON values.
#[derive(Debug, Clone)]
pub struct SeriesHeader {
    pub protocol: Protocol,
    pub series: i64,
    /// The dheader / cbfToEiger header part / v2 start message without its large arrays.
    pub header: Value,
    /// The detector configuration (v1 config part; v2 start message; cbfToEiger config part).
    pub config: Value,
    /// Pixel mask (rows x columns, u32, DECTRIS bits) when the detector sent one.
    pub pixel_mask: Option<(usize, usize, Vec<u32>)>,
}

/// One frame's header. Its blob stays in the received message: `stream::ParsedFrame` says which
/// part and byte range hold it, so it is never copied out of the receive buffer.
#[derive(Debug, Clone)]
pub struct FrameHeader {
    pub protocol: Protocol,
    pub series: i64,
    /// As the detector numbers it (v1 and v2 from 0, cbfToEiger from 1).
    pub frame: i64,
    /// (rows, columns)
    pub shape: (usize, usize),
    /// Bytes per pixel: 1, 2 or 4.
    pub elem_size: usize,
    pub compression: Compression,
    /// The stream's own encoding name (`bs16-lz4<`, `bslz4`, ...).
    pub encoding: String,
    /// The v1 `hash` (MD5 hex of the dimage_d part) and whether it matched; None when absent.
    pub md5_ok: Option<bool>,
    /// Header keys resent with the frame (cbfToEiger: mapping, reporting, master_file).
    pub header: Value,
}
