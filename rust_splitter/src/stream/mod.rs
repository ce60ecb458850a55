//! Stream parsers: one ZeroMQ multipart message (a slice of parts) in, series starts, frames and
//! series ends out. The one parser: the Splitter uses it, and Python through `crate::py_stream`
//! (`intxr.stream`).
//!
//! - DECTRIS stream v1 (`v1.rs`): JSON parts plus binary blobs, read by `htype`.
//! - DECTRIS stream v2 (`v2.rs`): one CBOR message per part (start, image, end).
//! - SSRL cbfToEiger-0.1 (`cbftoeiger.rs`): six parts per frame, the header resent every time.
//!
//! Frames are never copied: a [`ParsedFrame`] says which part holds the blob and where in it
//! (`&parts[frame.part][frame.range.clone()]`); for v1 and cbfToEiger the range is the whole part,
//! for v2 it is the byte string inside the CBOR message.

pub mod cbftoeiger;
pub mod v1;
pub mod v2;

use std::fmt;
use std::ops::Range;

use serde_json::{Map, Value};

use crate::frame::{Compression, FrameHeader, Protocol, SeriesHeader};

/// Where in a message a fault is: the part index and, where known, the part's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub part: usize,
    /// `config`, `dimage_d`, `blob`, ...; empty when the role is not known.
    pub role: &'static str,
}

impl At {
    pub fn new(part: usize, role: &'static str) -> Self {
        At { part, role }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.role.is_empty() {
            write!(f, "part {}", self.part)
        } else {
            write!(f, "part {} ({})", self.part, self.role)
        }
    }
}

/// A message that cannot be read; the text names the part and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("empty message")]
    Empty,
    #[error("part 0: cannot tell the protocol (htype {htype:?}, first byte {first})")]
    UnknownProtocol { htype: String, first: String },
    #[error("{at}: not JSON ({reason}): {head}")]
    NotJson {
        at: At,
        reason: String,
        head: String,
    },
    #[error("{at}: JSON part is not an object")]
    NotObject { at: At },
    #[error("{at}: unexpected htype {htype:?}")]
    UnexpectedHtype { at: At, htype: String },
    #[error("{at}: {what} message truncated ({have} parts, need {need})")]
    Truncated {
        at: At,
        what: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{what} message has {have} parts, expected {expected}")]
    PartCount {
        what: &'static str,
        have: usize,
        expected: usize,
    },
    #[error("{at}: bad {key} ({reason})")]
    BadField {
        at: At,
        key: &'static str,
        reason: String,
    },
    #[error("{at}: unsupported pixel type {dtype:?} or shape {shape}")]
    Unsupported {
        at: At,
        dtype: String,
        shape: String,
    },
    #[error("part {part} (blob): {have} bytes, dimage_d says {declared}")]
    BlobSize {
        part: usize,
        have: usize,
        declared: i64,
    },
    #[error("{at}: {have} bytes, but {rows}x{cols} pixels of {elem_size} bytes uncompressed need {need}")]
    RawSize {
        at: At,
        have: usize,
        rows: usize,
        cols: usize,
        elem_size: usize,
        need: usize,
    },
    #[error("{at}: unknown encoding {encoding:?}")]
    UnknownEncoding { at: At, encoding: String },
    #[error("{at}: encoding {encoding:?} does not match pixel type {dtype:?}")]
    EncodingMismatch {
        at: At,
        encoding: String,
        dtype: String,
    },
    #[error("{at}: blob does not match {header} ({reason})")]
    ArrayMismatch {
        at: At,
        header: String,
        reason: String,
    },
    #[error("part {part}: not CBOR ({reason})")]
    Cbor { part: usize, reason: String },
    #[error("part {part}: CBOR message without a type")]
    NoType { part: usize },
    #[error("part {part}: unknown v2 message type {kind:?}")]
    UnknownV2Type { part: usize, kind: String },
    #[error("part {part}: {reason}")]
    V2 { part: usize, reason: String },
}

impl StreamError {
    /// The index of the part at fault, where one part is.
    pub fn part(&self) -> Option<usize> {
        use StreamError::*;
        match self {
            Empty | PartCount { .. } => None,
            UnknownProtocol { .. } => Some(0),
            NotJson { at, .. }
            | NotObject { at }
            | UnexpectedHtype { at, .. }
            | Truncated { at, .. }
            | BadField { at, .. }
            | Unsupported { at, .. }
            | RawSize { at, .. }
            | UnknownEncoding { at, .. }
            | EncodingMismatch { at, .. }
            | ArrayMismatch { at, .. } => Some(at.part),
            BlobSize { part, .. }
            | Cbor { part, .. }
            | NoType { part }
            | UnknownV2Type { part, .. }
            | V2 { part, .. } => Some(*part),
        }
    }
}

/// A frame and where its still-compressed blob lies: `&parts[part][range]`.
#[derive(Debug, Clone)]
pub struct ParsedFrame {
    pub header: FrameHeader,
    /// Index of the message part holding the blob.
    pub part: usize,
    /// Byte range of the blob inside that part (the whole part for v1 and cbfToEiger).
    pub range: Range<usize>,
}

impl ParsedFrame {
    /// The blob, borrowed from the message parts.
    pub fn blob<'a>(&self, parts: &[&'a [u8]]) -> &'a [u8] {
        &parts[self.part][self.range.clone()]
    }
}

/// What one ZeroMQ message turned into (in message order).
#[derive(Debug, Clone)]
pub enum Parsed {
    Start(SeriesHeader),
    Frame(ParsedFrame),
    End { protocol: Protocol, series: i64 },
}

/// v2 messages are CBOR (self-describe tag `d9 d9 f7`, or a bare map head 0xa0-0xbf); v1 and
/// cbfToEiger are JSON and told apart by the first part's `htype`.
pub fn detect_protocol(parts: &[&[u8]]) -> Result<Protocol, StreamError> {
    let first = *parts.first().ok_or(StreamError::Empty)?;
    if first.starts_with(&[0xd9, 0xd9, 0xf7]) {
        return Ok(Protocol::V2);
    }
    if let Some(&b) = first.first() {
        if (0xa0..=0xbf).contains(&b) {
            return Ok(Protocol::V2);
        }
    }
    let htype = htype(first).unwrap_or_default();
    if htype.starts_with("cbfToEiger") {
        return Ok(Protocol::CbfToEiger);
    }
    if ["dheader", "dimage", "dseries_end", "dconfig"]
        .iter()
        .any(|p| htype.starts_with(p))
    {
        return Ok(Protocol::V1);
    }
    Err(StreamError::UnknownProtocol {
        htype,
        first: first
            .first()
            .map_or_else(|| "none".to_string(), |b| format!("{b:02x}")),
    })
}

/// A protocol by the name the configs and the CLI use: `auto` (None: detect it), `v1`, `v2`, `cbftoeiger`.
pub fn protocol_named(name: &str) -> Result<Option<Protocol>, String> {
    match name {
        "auto" => Ok(None),
        "v1" => Ok(Some(Protocol::V1)),
        "v2" => Ok(Some(Protocol::V2)),
        "cbftoeiger" => Ok(Some(Protocol::CbfToEiger)),
        other => Err(format!(
            "protocol {other:?}: expected auto, v1, v2 or cbftoeiger"
        )),
    }
}

/// A v1 detector config sent as a message of its own after a `dheader` that came without it: one
/// JSON object without an `htype` (a trailing NUL or newline allowed). None for anything else.
pub fn lone_config(parts: &[&[u8]]) -> Option<Value> {
    let [part] = parts else { return None };
    let text = part.strip_suffix(b"\0").unwrap_or(part);
    match serde_json::from_slice::<Value>(text.trim_ascii_end()) {
        Ok(value) if value.is_object() && value.get("htype").is_none() => Some(value),
        _ => None,
    }
}

/// Whether a start leaves the detector config to a message of its own ([`lone_config`]): a v1
/// `dheader` with `header_detail` basic or all that came without its config part.
pub fn config_follows(start: &SeriesHeader) -> bool {
    let detail = start
        .header
        .get("header_detail")
        .and_then(|d| d.as_str())
        .unwrap_or("none");
    let no_config = start.config.as_object().is_none_or(|c| c.is_empty());
    start.protocol == Protocol::V1 && detail != "none" && no_config
}

/// Parse one multipart message. `protocol` None: detect it from the first part.
pub fn parse_message(
    parts: &[&[u8]],
    protocol: Option<Protocol>,
) -> Result<Vec<Parsed>, StreamError> {
    if parts.is_empty() {
        return Err(StreamError::Empty);
    }
    let protocol = match protocol {
        Some(p) => p,
        None => detect_protocol(parts)?,
    };
    match protocol {
        Protocol::V1 => v1::parse(parts),
        Protocol::V2 => v2::parse(parts),
        Protocol::CbfToEiger => cbftoeiger::parse(parts),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the JSON protocols (v1 and cbfToEiger).

/// Largest part that is tried as JSON when looking for an `htype` (a blob is not).
const HTYPE_PROBE_LIMIT: usize = 1 << 20;

/// A JSON part as an object. Real parts end in nothing, `\n` (DLS) or a NUL byte (cbfToEiger).
pub(crate) fn json_part(part: &[u8], at: At) -> Result<Map<String, Value>, StreamError> {
    let mut end = part.len();
    while end > 0 && matches!(part[end - 1], 0 | b'\n' | b'\r' | b' ') {
        end -= 1;
    }
    match serde_json::from_slice::<Value>(&part[..end]) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(StreamError::NotObject { at }),
        Err(err) => Err(StreamError::NotJson {
            at,
            reason: err.to_string(),
            head: part[..part.len().min(60)].escape_ascii().to_string(),
        }),
    }
}

/// The `htype` of a part that is a JSON object with one; None for blobs, appendices, config parts.
pub(crate) fn htype(part: &[u8]) -> Option<String> {
    if part.first() != Some(&b'{') || part.len() > HTYPE_PROBE_LIMIT {
        return None;
    }
    let map = json_part(part, At::new(0, "")).ok()?;
    map.get("htype").map(value_text)
}

/// A JSON value as text: strings as they are, anything else as JSON.
pub(crate) fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `htype` of an already parsed part ("" when absent).
pub(crate) fn htype_of(map: &Map<String, Value>) -> String {
    map.get("htype").map(value_text).unwrap_or_default()
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f <= i64::MAX as f64)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

/// An integer field, `default` when absent.
pub(crate) fn int_field(
    map: &Map<String, Value>,
    key: &'static str,
    default: i64,
    at: At,
) -> Result<i64, StreamError> {
    match map.get(key) {
        None => Ok(default),
        Some(v) => as_i64(v).ok_or_else(|| StreamError::BadField {
            at,
            key,
            reason: format!("not an integer: {v}"),
        }),
    }
}

/// Bytes per element of a numeric `type` name (v1 headers), None when unknown.
pub(crate) fn type_size(name: &str) -> Option<usize> {
    Some(match name {
        "uint8" | "int8" => 1,
        "uint16" | "int16" | "float16" => 2,
        "uint32" | "int32" | "float32" => 4,
        "uint64" | "int64" | "float64" => 8,
        _ => return None,
    })
}

/// What a `dimage_d-1.0` part says about its blob, checked against the blob.
pub(crate) struct ImageDesc {
    pub shape: (usize, usize),
    pub elem_size: usize,
    pub compression: Compression,
    pub encoding: String,
}

/// Read a `dimage_d-1.0` part (`at`) and check the blob (part `blob_part`) against it.
/// Format: `{"encoding":"lz4<","htype":"dimage_d-1.0","shape":[1028,1062],"size":17445,"type":"uint32"}`:
/// shape is [width, height] (fastest first), `size` the blob's byte length.
pub(crate) fn image_desc(
    d: &Map<String, Value>,
    blob: &[u8],
    at: At,
    blob_part: usize,
) -> Result<ImageDesc, StreamError> {
    let dims: Vec<i64> = match d.get("shape") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                as_i64(v).ok_or_else(|| {
                    bad(
                        at,
                        "shape/type",
                        format!("shape item {v} is not an integer"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(
                at,
                "shape/type",
                format!("shape {other} is not a list"),
            ))
        }
        None => return Err(bad(at, "shape/type", "no shape".into())),
    };
    let dtype = match d.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(bad(
                at,
                "shape/type",
                format!("type {other} is not a string"),
            ))
        }
        None => return Err(bad(at, "shape/type", "no type".into())),
    };
    if dims.len() != 2 {
        return Err(bad(
            at,
            "shape/type",
            format!("shape has {} dimensions, expected 2", dims.len()),
        ));
    }
    let elem_size = match dtype.as_str() {
        "uint8" | "int8" => 1,
        "uint16" | "int16" => 2,
        "uint32" | "int32" => 4,
        _ => 0,
    };
    let (width, height) = (dims[0], dims[1]);
    let too_big = (height as u64)
        .checked_mul(width as u64)
        .and_then(|n| n.checked_mul(elem_size as u64))
        .is_none_or(|n| n > usize::MAX as u64);
    if elem_size == 0 || width <= 0 || height <= 0 || too_big {
        return Err(StreamError::Unsupported {
            at,
            dtype,
            shape: format!("{dims:?}"),
        });
    }
    let shape = (height as usize, width as usize); // v1 shape is [width, height]
    if d.contains_key("size") {
        let size = int_field(d, "size", 0, at)?;
        if size < 0 || size as u64 != blob.len() as u64 {
            return Err(StreamError::BlobSize {
                part: blob_part,
                have: blob.len(),
                declared: size,
            });
        }
    }
    let encoding = d.get("encoding").map(value_text).unwrap_or_default();
    let compression = match encoding.as_str() {
        "bs32-lz4<" | "bs16-lz4<" | "bs8-lz4<" => {
            let bits: usize = encoding[2..encoding.find('-').unwrap_or(2)]
                .parse()
                .unwrap_or(0);
            if bits != elem_size * 8 {
                return Err(StreamError::EncodingMismatch {
                    at,
                    encoding,
                    dtype,
                });
            }
            Compression::BsLz4
        }
        "lz4<" => Compression::Lz4Raw,
        "<" | "none" => Compression::None,
        _ => return Err(StreamError::UnknownEncoding { at, encoding }),
    };
    if compression == Compression::None {
        check_raw_size(blob.len(), shape, elem_size, At::new(blob_part, "blob"))?;
    }
    Ok(ImageDesc {
        shape,
        elem_size,
        compression,
        encoding,
    })
}

/// An uncompressed blob must hold rows x cols x elem_size bytes exactly.
pub(crate) fn check_raw_size(
    have: usize,
    shape: (usize, usize),
    elem_size: usize,
    at: At,
) -> Result<(), StreamError> {
    let need = shape
        .0
        .checked_mul(shape.1)
        .and_then(|n| n.checked_mul(elem_size));
    if need != Some(have) {
        return Err(StreamError::RawSize {
            at,
            have,
            rows: shape.0,
            cols: shape.1,
            elem_size,
            need: need.unwrap_or(usize::MAX),
        });
    }
    Ok(())
}

pub(crate) fn bad(at: At, key: &'static str, reason: String) -> StreamError {
    StreamError::BadField { at, key, reason }
}

/// The v1 `hash`: when it is 32 hex digits, compare it with the MD5 of the raw `dimage_d` part
/// (what the firmware hashes, including a trailing newline; not the blob). Otherwise None
/// (absent, or a placeholder such as cbfToEiger's `TODO-MD5-HASH`).
pub(crate) fn check_md5(image: &Map<String, Value>, dimage_d_raw: &[u8]) -> Option<bool> {
    use md5::{Digest, Md5};
    let hash = image.get("hash")?.as_str()?;
    if hash.len() != 32 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digest = Md5::digest(dimage_d_raw);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(hex.eq_ignore_ascii_case(hash))
}

// ---------------------------------------------------------------------------------------------
// Test helpers shared by the parsers' tests.

#[cfg(test)]
pub(crate) mod testdata {
    use std::path::PathBuf;

    /// `/work/shared/data` beside the checkout; None (with a note) when it is missing, except on CI.
    pub fn dir() -> Option<PathBuf> {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"));
        if dir.is_dir() {
            return Some(dir);
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("test data folder {} is missing", dir.display());
        }
        eprintln!("skipping: test data folder {} is missing", dir.display());
        None
    }

    pub fn read(rel: &str) -> Option<Vec<u8>> {
        let path = dir()?.join(rel);
        Some(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    /// The EIGER2 1M v1 capture (one file per part), grouped into messages by htype:
    /// a message starts at each dheader, dimage (not dimage_d) and dseries_end part.
    pub fn v1_1m_messages() -> Option<Vec<Vec<Vec<u8>>>> {
        let folder = dir()?.join("stream_v1/eiger2_1m_lz4");
        let mut names: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("streamData."))
            .collect();
        names.sort();
        let mut messages: Vec<Vec<Vec<u8>>> = Vec::new();
        for name in names {
            let bytes = std::fs::read(folder.join(&name)).unwrap();
            let h = super::htype(&bytes).unwrap_or_default();
            let starts = h.starts_with("dheader")
                || (h.starts_with("dimage") && !h.starts_with("dimage_d"))
                || h.starts_with("dseries_end");
            if starts || messages.is_empty() {
                messages.push(Vec::new());
            }
            messages.last_mut().unwrap().push(bytes);
        }
        Some(messages)
    }

    /// The five cbfToEiger messages, the missing blob part (05) replaced by zeros of the declared size;
    /// `small`: a blob of about 1000 bytes instead, with the dimage_d `size` rewritten to match.
    pub fn cbf_messages(small: bool) -> Option<Vec<Vec<Vec<u8>>>> {
        let base = dir()?.join("cbftoeiger");
        let mut out = Vec::new();
        for n in 1..=5 {
            let mut parts = Vec::new();
            for p in [1, 2, 3, 4, 6] {
                parts.push(std::fs::read(base.join(format!("zmq_{n:06}_{p:02}.zmq"))).unwrap());
            }
            let d = super::json_part(&parts[3], super::At::new(3, "")).unwrap();
            let mut size = d["size"].as_u64().unwrap() as usize;
            if small {
                size = 1000 + n;
                let text = String::from_utf8(parts[3].clone()).unwrap();
                let old = format!("\"size\":{}", d["size"]);
                parts[3] = text.replace(&old, &format!("\"size\":{size}")).into_bytes();
            }
            parts.insert(4, vec![0u8; size]);
            out.push(parts);
        }
        Some(out)
    }

    pub fn slices(parts: &[Vec<u8>]) -> Vec<&[u8]> {
        parts.iter().map(|p| p.as_slice()).collect()
    }

    /// xorshift64*: a small seeded generator for the mutation test.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::{self, slices, Rng};
    use super::*;

    #[test]
    fn detects_each_protocol() {
        assert_eq!(
            detect_protocol(&[b"\xd9\xd9\xf7\xa1"]).unwrap(),
            Protocol::V2
        );
        assert_eq!(detect_protocol(&[b"\xb8\x1f"]).unwrap(), Protocol::V2);
        assert_eq!(
            detect_protocol(&[b"{\"htype\":\"dheader-1.0\",\"series\":1}"]).unwrap(),
            Protocol::V1
        );
        assert_eq!(
            detect_protocol(&[b"{\"htype\":\"dimage-1.0\"}\n"]).unwrap(),
            Protocol::V1
        );
        assert_eq!(
            detect_protocol(&[b"{\"htype\":\"dseries_end-1.0\"}\0"]).unwrap(),
            Protocol::V1
        );
        assert_eq!(
            detect_protocol(&[b"{\"htype\":\"cbfToEiger-0.1\"}\0"]).unwrap(),
            Protocol::CbfToEiger
        );
        let err = detect_protocol(&[b"hello"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "part 0: cannot tell the protocol (htype \"\", first byte 68)"
        );
        let err = detect_protocol(&[b""]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "part 0: cannot tell the protocol (htype \"\", first byte none)"
        );
        assert!(matches!(detect_protocol(&[]), Err(StreamError::Empty)));
        assert!(matches!(parse_message(&[], None), Err(StreamError::Empty)));
        assert!(parse_message(&[b"{\"htype\":\"dfoo-1.0\"}"], None).is_err());
    }

    #[test]
    fn protocol_names_and_a_config_sent_alone() {
        assert_eq!(protocol_named("auto"), Ok(None));
        assert_eq!(protocol_named("cbftoeiger"), Ok(Some(Protocol::CbfToEiger)));
        assert_eq!(
            protocol_named("v3").unwrap_err(),
            "protocol \"v3\": expected auto, v1, v2 or cbftoeiger"
        );
        let config = lone_config(&[b"{\"nimages\": 2}\n\0"]).unwrap();
        assert_eq!(config["nimages"], 2);
        for parts in [
            &[&b"{\"htype\":\"dconfig-1.0\"}"[..]][..],
            &[b"[1]"],
            &[b"{}", b"{}"],
            &[],
        ] {
            assert!(lone_config(parts).is_none());
        }
        let alone = |detail: &str| {
            let text = format!("{{\"htype\":\"dheader-1.0\",\"header_detail\":\"{detail}\"}}");
            match parse_message(&[text.as_bytes()], None).unwrap().remove(0) {
                Parsed::Start(start) => config_follows(&start),
                other => panic!("{other:?}"),
            }
        };
        assert!(alone("basic") && alone("all") && !alone("none"));
    }

    #[test]
    fn detects_real_captures() {
        let Some(dir) = testdata::dir() else { return };
        let v2 =
            |name: &str| std::fs::read(dir.join("stream_v2/eiger2_16m_final").join(name)).unwrap();
        for name in ["start.cbor", "image.cbor", "end.cbor"] {
            assert_eq!(
                detect_protocol(&[&v2(name)]).unwrap(),
                Protocol::V2,
                "{name}"
            );
        }
        for msg in testdata::v1_1m_messages().unwrap() {
            assert_eq!(detect_protocol(&slices(&msg)).unwrap(), Protocol::V1);
        }
        for msg in testdata::cbf_messages(true).unwrap() {
            assert_eq!(
                detect_protocol(&slices(&msg)).unwrap(),
                Protocol::CbfToEiger
            );
        }
    }

    #[test]
    fn wrong_protocol_is_an_error() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        let image = slices(&msgs[1]);
        assert!(parse_message(&image, Some(Protocol::V2)).is_err());
        assert!(parse_message(&image, Some(Protocol::CbfToEiger)).is_err());
        let cbf = testdata::cbf_messages(true).unwrap();
        assert!(parse_message(&slices(&cbf[0]), Some(Protocol::V1)).is_err());
        let start = testdata::read("stream_v2/eiger2_16m_final/start.cbor").unwrap();
        assert!(parse_message(&[&start], Some(Protocol::V1)).is_err());
        assert!(parse_message(&[&start], Some(Protocol::CbfToEiger)).is_err());
    }

    /// Real messages of all three protocols, mutated 5,000 times (bytes flipped, parts truncated,
    /// dropped, duplicated or swapped, garbage inserted): the parsers must never panic.
    #[test]
    fn mutated_messages_never_panic() {
        let Some(dir) = testdata::dir() else { return };
        let mut corpus: Vec<Vec<Vec<u8>>> = testdata::v1_1m_messages().unwrap();
        corpus.extend(testdata::cbf_messages(true).unwrap());
        for name in ["start.cbor", "image.cbor", "end.cbor"] {
            corpus.push(vec![std::fs::read(
                dir.join("stream_v2/eiger2_16m_final").join(name),
            )
            .unwrap()]);
        }
        // A merged v1 message: header then frame 0.
        let merged: Vec<Vec<u8>> = corpus[0].iter().chain(corpus[1].iter()).cloned().collect();
        corpus.push(merged);

        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let (mut ok, mut err) = (0usize, 0usize);
        for round in 0..5000 {
            let mut parts = corpus[rng.below(corpus.len())].clone();
            for _ in 0..1 + rng.below(3) {
                if parts.is_empty() {
                    break;
                }
                let p = rng.below(parts.len());
                match rng.below(7) {
                    0 | 1 => {
                        // flip 1-4 bytes, biased to the head of the part where the structure is
                        for _ in 0..1 + rng.below(4) {
                            let len = parts[p].len();
                            if len > 0 {
                                let at = if rng.below(2) == 0 {
                                    rng.below(len.min(256))
                                } else {
                                    rng.below(len)
                                };
                                parts[p][at] ^= 1 + rng.below(255) as u8;
                            }
                        }
                    }
                    2 => {
                        let len = parts[p].len();
                        let cut = rng.below(len + 1);
                        parts[p].truncate(cut);
                    }
                    3 => {
                        parts.remove(p);
                    }
                    4 => {
                        let copy = parts[p].clone();
                        parts.insert(rng.below(parts.len() + 1), copy);
                    }
                    5 => {
                        let q = rng.below(parts.len());
                        parts.swap(p, q);
                    }
                    _ => {
                        let at = rng.below(parts[p].len() + 1);
                        let junk: Vec<u8> =
                            (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                        parts[p].splice(at..at, junk);
                    }
                }
            }
            let view = slices(&parts);
            let protocol = match round % 4 {
                0 => Some(Protocol::V1),
                1 => Some(Protocol::V2),
                2 => Some(Protocol::CbfToEiger),
                _ => None,
            };
            for result in [parse_message(&view, protocol), parse_message(&view, None)] {
                match result {
                    Ok(events) => {
                        ok += 1;
                        for e in events {
                            if let Parsed::Frame(f) = e {
                                // The range must lie inside its part.
                                assert!(f.part < view.len() && f.range.end <= view[f.part].len());
                            }
                        }
                    }
                    Err(e) => {
                        err += 1;
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
        }
        eprintln!("mutations: {ok} parsed, {err} rejected");
        assert!(
            err > 2000,
            "most mutations must be rejected ({err} of {})",
            ok + err
        );
    }
}
