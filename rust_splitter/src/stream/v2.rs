//! DECTRIS stream v2: one CBOR message (RFC 8949) per part, normally wrapped in the self-describe
//! tag 55799 (`d9 d9 f7`); a map whose `type` is `start`, `image` or `end`.
//!
//! An image's pixels are the first channel of its `data` map, a row-major multi-dimensional array
//! (tag 40, RFC 8746): `40([[rows, cols], 64|69|70(payload)])` where the typed-array tag gives the
//! element (uint8 / uint16 LE / uint32 LE) and the payload is either the raw bytes or DECTRIS'
//! compression tag `56500(["bslz4" | "lz4", elem_size, bytes])`.
//!
//! The blob must stay in the receive buffer, so images are read by a small CBOR walker of our own
//! that reports the byte range of the payload; start messages (small, and wanted as JSON) are
//! decoded with ciborium.

use std::ops::Range;

use ciborium::value::Value as Cbor;
use serde_json::{Map, Number, Value};

use super::{check_raw_size, At, Parsed, ParsedFrame, StreamError};
use crate::frame::{Compression, FrameHeader, Protocol, SeriesHeader};

/// Nesting deeper than this is refused (ciborium's own limit is 256 as well).
const MAX_DEPTH: usize = 256;

/// Keys of a start message that hold large arrays, left out of its header and config.
const START_ARRAYS: [&str; 3] = [
    "pixel_mask",
    "flatfield",
    "countrate_correction_lookup_table",
];

/// One CBOR data item head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Uint(u64),
    /// The value is -1 - n.
    Neg(u64),
    /// Length in bytes; None: indefinite (chunked).
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    /// false, true, null, undefined, other simple values, floats.
    Simple,
    Break,
}

/// A forward-only reader of CBOR heads over a byte slice that knows where it is.
struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
}

type WalkResult<T> = Result<T, String>;

impl<'a> Walker<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Walker { buf, pos }
    }

    fn take(&mut self, len: u64) -> WalkResult<Range<usize>> {
        let left = self.buf.len() - self.pos;
        match usize::try_from(len) {
            Ok(n) if n <= left => {
                let r = self.pos..self.pos + n;
                self.pos += n;
                Ok(r)
            }
            _ => Err(format!(
                "item of {len} bytes at byte {} runs past the end ({left} bytes left)",
                self.pos
            )),
        }
    }

    fn be(&mut self, n: u64) -> WalkResult<u64> {
        let r = self.take(n)?;
        Ok(self.buf[r]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn head(&mut self) -> WalkResult<Head> {
        let at = self.pos;
        let ib = *self
            .buf
            .get(at)
            .ok_or_else(|| format!("truncated at byte {at}"))?;
        self.pos += 1;
        let major = ib >> 5;
        let ai = ib & 0x1f;
        let arg = match ai {
            0..=23 => Some(u64::from(ai)),
            24 => Some(self.be(1)?),
            25 => Some(self.be(2)?),
            26 => Some(self.be(4)?),
            27 => Some(self.be(8)?),
            31 => None,
            _ => return Err(format!("reserved additional information {ai} at byte {at}")),
        };
        Ok(match (major, arg) {
            (0, Some(v)) => Head::Uint(v),
            (1, Some(v)) => Head::Neg(v),
            (2, len) => Head::Bytes(len),
            (3, len) => Head::Text(len),
            (4, len) => Head::Array(len),
            (5, len) => Head::Map(len),
            (6, Some(v)) => Head::Tag(v),
            (7, None) => Head::Break,
            (7, Some(v)) => {
                if ai == 24 && v < 32 {
                    return Err(format!("badly encoded simple value at byte {at}"));
                }
                Head::Simple
            }
            _ => {
                return Err(format!(
                    "indefinite length for major type {major} at byte {at}"
                ))
            }
        })
    }

    fn at_break(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xff)
    }

    /// The chunks of an indefinite-length byte or text string (major type `major`).
    fn chunks(&mut self, text: bool) -> WalkResult<Vec<Range<usize>>> {
        let mut out = Vec::new();
        loop {
            let at = self.pos;
            match self.head()? {
                Head::Break => return Ok(out),
                Head::Bytes(Some(n)) if !text => out.push(self.take(n)?),
                Head::Text(Some(n)) if text => out.push(self.take(n)?),
                _ => {
                    return Err(format!(
                        "bad chunk in an indefinite-length string at byte {at}"
                    ))
                }
            }
        }
    }

    /// Skip one whole data item (checking that it is well formed).
    fn skip(&mut self, depth: usize) -> WalkResult<()> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "nested deeper than {MAX_DEPTH} at byte {}",
                self.pos
            ));
        }
        let at = self.pos;
        match self.head()? {
            Head::Uint(_) | Head::Neg(_) | Head::Simple => {}
            Head::Bytes(Some(n)) | Head::Text(Some(n)) => {
                self.take(n)?;
            }
            Head::Bytes(None) => {
                self.chunks(false)?;
            }
            Head::Text(None) => {
                self.chunks(true)?;
            }
            Head::Array(Some(n)) => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
            }
            Head::Map(Some(n)) => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
            }
            Head::Array(None) | Head::Map(None) => {
                while !self.at_break() {
                    self.skip(depth + 1)?;
                }
                self.pos += 1;
            }
            Head::Tag(_) => self.skip(depth + 1)?,
            Head::Break => return Err(format!("unexpected break at byte {at}")),
        }
        Ok(())
    }

    /// A text string, or None (the item skipped) when the next item is something else.
    fn text_or_skip(&mut self, depth: usize) -> WalkResult<Option<String>> {
        let start = self.pos;
        let bytes = match self.head()? {
            Head::Text(Some(n)) => {
                let r = self.take(n)?;
                self.buf[r].to_vec()
            }
            Head::Text(None) => self
                .chunks(true)?
                .into_iter()
                .flat_map(|r| self.buf[r].iter().copied())
                .collect(),
            _ => {
                self.pos = start;
                self.skip(depth)?;
                return Ok(None);
            }
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("invalid UTF-8 in the text at byte {start}"))
    }

    /// An integer that fits i64, or None (the item skipped) when the next item is something else.
    fn int_or_skip(&mut self, depth: usize) -> WalkResult<Option<i64>> {
        let start = self.pos;
        let value = match self.head()? {
            Head::Uint(v) => i64::try_from(v).ok(),
            Head::Neg(v) => i64::try_from(v).ok().map(|v| -1 - v),
            _ => None,
        };
        if value.is_none() {
            self.pos = start;
            self.skip(depth)?;
        }
        Ok(value)
    }

    /// The entry count of a map or array head already read: Some(n), or None for indefinite.
    /// Iterate with `more(count, i)`.
    fn more(&self, count: Option<u64>, i: u64) -> bool {
        match count {
            Some(n) => i < n,
            None => !self.at_break(),
        }
    }

    /// After iterating an indefinite container, consume its break.
    fn end(&mut self, count: Option<u64>) {
        if count.is_none() && self.at_break() {
            self.pos += 1;
        }
    }
}

/// What the top-level scan of a message found.
#[derive(Default)]
struct Top {
    /// Some(None): a `type` that is not text.
    kind: Option<Option<String>>,
    series_id: Option<i64>,
    series_number: Option<i64>,
    image_id: Option<i64>,
    /// Byte offset of the `data` value.
    data: Option<usize>,
}

fn cbor_err(part: usize) -> impl Fn(String) -> StreamError {
    move |reason| StreamError::Cbor { part, reason }
}

fn v2_err(part: usize, reason: impl Into<String>) -> StreamError {
    StreamError::V2 {
        part,
        reason: reason.into(),
    }
}

/// Walk a whole message (checking it is well formed, with nothing after it) and pick the keys the
/// parser needs. Ok(None): well formed, but not a map.
fn scan_top(buf: &[u8], part: usize) -> Result<Option<Top>, StreamError> {
    let err = cbor_err(part);
    let mut w = Walker::new(buf, 0);
    let head = loop {
        match w.head().map_err(&err)? {
            Head::Tag(_) => continue, // 55799, self-described CBOR
            h => break h,
        }
    };
    let mut top = None;
    if let Head::Map(count) = head {
        let mut t = Top::default();
        let mut i = 0;
        while w.more(count, i) {
            i += 1;
            let key = w.text_or_skip(1).map_err(&err)?;
            let int = |w: &mut Walker, key: &str| -> Result<Option<i64>, StreamError> {
                match w.int_or_skip(1).map_err(&err)? {
                    Some(v) => Ok(Some(v)),
                    None => Err(v2_err(part, format!("{key} is not an integer"))),
                }
            };
            match key.as_deref() {
                Some("type") => t.kind = Some(w.text_or_skip(1).map_err(&err)?),
                Some("series_id") => t.series_id = int(&mut w, "series_id")?,
                Some("series_number") => t.series_number = int(&mut w, "series_number")?,
                Some("image_id") => t.image_id = int(&mut w, "image_id")?,
                Some("data") => {
                    t.data = Some(w.pos);
                    w.skip(1).map_err(&err)?;
                }
                _ => w.skip(1).map_err(&err)?,
            }
        }
        w.end(count);
        top = Some(t);
    } else {
        w = Walker::new(buf, 0);
        w.skip(0).map_err(&err)?;
    }
    if w.pos != buf.len() {
        return Err(err(format!(
            "{} bytes after the message",
            buf.len() - w.pos
        )));
    }
    Ok(top)
}

/// Parse v2 messages, one per part.
pub fn parse(parts: &[&[u8]]) -> Result<Vec<Parsed>, StreamError> {
    let mut events = Vec::with_capacity(parts.len());
    for (k, part) in parts.iter().enumerate() {
        let top = scan_top(part, k)?.ok_or(StreamError::NoType { part: k })?;
        let kind = match &top.kind {
            None => return Err(StreamError::NoType { part: k }),
            Some(None) => {
                return Err(StreamError::UnknownV2Type {
                    part: k,
                    kind: "(not text)".into(),
                })
            }
            Some(Some(kind)) => kind.as_str(),
        };
        let series = top.series_id.or(top.series_number).unwrap_or(-1);
        match kind {
            "start" => events.push(Parsed::Start(parse_start(part, k, series)?)),
            "image" => events.push(Parsed::Frame(parse_image(part, k, series, &top)?)),
            "end" => events.push(Parsed::End {
                protocol: Protocol::V2,
                series,
            }),
            other => {
                return Err(StreamError::UnknownV2Type {
                    part: k,
                    kind: other.to_string(),
                })
            }
        }
    }
    Ok(events)
}

/// The start message: header and config are the message without its large arrays; the pixel mask
/// comes from the first channel of `pixel_mask` when that is a raw tag-40 array.
fn parse_start(buf: &[u8], part: usize, series: i64) -> Result<SeriesHeader, StreamError> {
    let value: Cbor = ciborium::de::from_reader(buf).map_err(|e| StreamError::Cbor {
        part,
        reason: e.to_string(),
    })?;
    let Cbor::Map(entries) = untag(&value) else {
        return Err(StreamError::NoType { part });
    };
    let mut header = Map::new();
    let mut pixel_mask = None;
    for (key, value) in entries {
        let key = key_text(key);
        if key == "pixel_mask" {
            if let Cbor::Map(channels) = untag(value) {
                if let Some((_, first)) = channels.first() {
                    pixel_mask = mask_of(first, part)?;
                }
            }
        }
        if !START_ARRAYS.contains(&key.as_str()) {
            header.insert(key, to_json(value));
        }
    }
    let header = Value::Object(header);
    Ok(SeriesHeader {
        protocol: Protocol::V2,
        series,
        config: header.clone(),
        header,
        pixel_mask,
    })
}

fn untag(mut v: &Cbor) -> &Cbor {
    while let Cbor::Tag(_, inner) = v {
        v = inner;
    }
    v
}

/// A raw (uncompressed) tag-40 pixel mask as (rows, cols, values). None when the channel holds
/// something else (blanked bytes, or a compressed array, which is not decoded here).
fn mask_of(v: &Cbor, part: usize) -> Result<Option<(usize, usize, Vec<u32>)>, StreamError> {
    let mut v = v;
    let array = loop {
        match v {
            Cbor::Tag(40, inner) => break inner.as_ref(),
            Cbor::Tag(_, inner) => v = inner,
            _ => return Ok(None),
        }
    };
    let bad = |reason: String| v2_err(part, format!("pixel_mask: {reason}"));
    let Cbor::Array(items) = array else {
        return Err(bad("tag 40 without [dims, array]".into()));
    };
    let [dims, typed] = items.as_slice() else {
        return Err(bad("tag 40 without [dims, array]".into()));
    };
    let dims: Vec<usize> = match dims {
        Cbor::Array(d) => d
            .iter()
            .map(|x| x.as_integer().and_then(|i| usize::try_from(i).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("dimensions are not sizes".into()))?,
        _ => return Err(bad("dimensions are not an array".into())),
    };
    let Cbor::Tag(tag, payload) = typed else {
        return Err(bad("tag 40 array without a typed-array tag".into()));
    };
    let elem = typed_array_elem(*tag)
        .ok_or_else(|| bad(format!("tag 40 array with unsupported element type {tag}")))?;
    let bytes = match payload.as_ref() {
        Cbor::Bytes(b) => b,
        _ => return Ok(None), // compressed (56500): left to the caller's configuration
    };
    let [rows, cols] = dims[..] else {
        return Err(bad(format!("{} dimensions, expected 2", dims.len())));
    };
    let need = rows.checked_mul(cols).and_then(|n| n.checked_mul(elem));
    if need != Some(bytes.len()) {
        return Err(bad(format!(
            "{} bytes for {rows}x{cols} elements of {elem} bytes",
            bytes.len()
        )));
    }
    if rows * cols == 0 {
        return Ok(None);
    }
    let values = match elem {
        1 => bytes.iter().map(|&b| u32::from(b)).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    Ok(Some((rows, cols, values)))
}

/// RFC 8746 typed arrays this parser takes: uint8, uint16 LE, uint32 LE.
fn typed_array_elem(tag: u64) -> Option<usize> {
    match tag {
        64 => Some(1),
        69 => Some(2),
        70 => Some(4),
        _ => None,
    }
}

fn key_text(key: &Cbor) -> String {
    match untag(key) {
        Cbor::Text(s) => s.clone(),
        other => to_json(other).to_string(),
    }
}

/// CBOR to JSON for headers: tags dropped (a tag-0 date becomes its text), byte strings as
/// lowercase hex text, non-finite floats as null, integers beyond 64 bits as floats.
pub fn to_json(v: &Cbor) -> Value {
    match v {
        Cbor::Integer(i) => {
            let i = i128::from(*i);
            if let Ok(x) = i64::try_from(i) {
                Value::from(x)
            } else if let Ok(x) = u64::try_from(i) {
                Value::from(x)
            } else {
                Number::from_f64(i as f64).map_or(Value::Null, Value::Number)
            }
        }
        Cbor::Bytes(b) => Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        Cbor::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Cbor::Text(s) => Value::String(s.clone()),
        Cbor::Bool(b) => Value::Bool(*b),
        Cbor::Tag(_, inner) => to_json(inner),
        Cbor::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Cbor::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (key_text(k), to_json(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// An image message: the first channel of `data` gives the frame; the blob stays in the part.
fn parse_image(
    buf: &[u8],
    part: usize,
    series: i64,
    top: &Top,
) -> Result<ParsedFrame, StreamError> {
    let err = cbor_err(part);
    let no_data = || v2_err(part, "image message without data channels");
    let mut w = Walker::new(buf, top.data.ok_or_else(no_data)?);
    let count = loop {
        match w.head().map_err(&err)? {
            Head::Tag(_) => continue,
            Head::Map(count) => break count,
            _ => return Err(no_data()),
        }
    };
    if !w.more(count, 0) {
        return Err(no_data());
    }
    let channel = w
        .text_or_skip(1)
        .map_err(&err)?
        .ok_or_else(|| v2_err(part, "channel name is not text"))?;
    let array = channel_array(&mut w, part, &channel)?;
    let mut channels = vec![Value::from(channel.clone())];
    let mut i = 1;
    while w.more(count, i) {
        i += 1;
        channels.push(
            w.text_or_skip(1)
                .map_err(&err)?
                .map_or(Value::Null, Value::from),
        );
        w.skip(1).map_err(&err)?;
    }
    let mut info = Map::new();
    info.insert("channel".into(), Value::from(channel));
    info.insert("channels".into(), Value::Array(channels));
    let header = FrameHeader {
        protocol: Protocol::V2,
        series,
        frame: top.image_id.unwrap_or(-1),
        shape: array.shape,
        elem_size: array.elem_size,
        compression: array.compression,
        encoding: array.encoding,
        md5_ok: None,
        header: Value::Object(info),
    };
    Ok(ParsedFrame {
        header,
        part,
        range: array.range,
    })
}

struct ChannelArray {
    shape: (usize, usize),
    elem_size: usize,
    compression: Compression,
    encoding: String,
    range: Range<usize>,
}

/// `40([[rows, cols], 64|69|70(bytes | 56500([algorithm, elem_size, bytes]))])`, with the byte
/// range of the payload (which must be one definite-length byte string).
fn channel_array(w: &mut Walker, part: usize, channel: &str) -> Result<ChannelArray, StreamError> {
    let err = cbor_err(part);
    let bad = |reason: String| v2_err(part, format!("channel {channel:?}: {reason}"));
    loop {
        match w.head().map_err(&err)? {
            Head::Tag(40) => break,
            Head::Tag(_) => continue,
            _ => return Err(bad("not a tag-40 array".into())),
        }
    }
    let Head::Array(outer) = w.head().map_err(&err)? else {
        return Err(bad("tag 40 without [dims, array]".into()));
    };
    if !matches!(outer, Some(2) | None) {
        return Err(bad("tag 40 without [dims, array]".into()));
    }
    // dims: [rows, cols]
    let Head::Array(ndims) = w.head().map_err(&err)? else {
        return Err(bad("dimensions are not an array".into()));
    };
    let mut dims = Vec::new();
    let mut i = 0;
    while w.more(ndims, i) {
        i += 1;
        match w.head().map_err(&err)? {
            Head::Uint(d) if dims.len() < 8 => dims.push(usize::try_from(d).unwrap_or(usize::MAX)),
            _ => return Err(bad("dimensions are not sizes".into())),
        }
    }
    w.end(ndims);
    let [rows, cols] = dims[..] else {
        return Err(bad(format!("{} dimensions, expected 2", dims.len())));
    };
    let elem_size = match w.head().map_err(&err)? {
        Head::Tag(t) => typed_array_elem(t)
            .ok_or_else(|| bad(format!("tag 40 array with unsupported element type {t}")))?,
        _ => return Err(bad("tag 40 array without a typed-array tag".into())),
    };
    if rows == 0
        || cols == 0
        || rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(elem_size))
            .is_none()
    {
        return Err(bad(format!("unsupported shape [{rows}, {cols}]")));
    }
    let (compression, encoding, range) = match w.head().map_err(&err)? {
        Head::Bytes(Some(n)) => {
            let range = w.take(n).map_err(&err)?;
            check_raw_size(range.len(), (rows, cols), elem_size, At::new(part, "blob"))?;
            (Compression::None, "none".to_string(), range)
        }
        Head::Tag(56500) => {
            let Head::Array(n) = w.head().map_err(&err)? else {
                return Err(bad("tag 56500 without [algorithm, size, bytes]".into()));
            };
            if !matches!(n, Some(3) | None) {
                return Err(bad("tag 56500 without [algorithm, size, bytes]".into()));
            }
            let algorithm = w
                .text_or_skip(1)
                .map_err(&err)?
                .ok_or_else(|| bad("compression algorithm is not text".into()))?;
            let modifier = w
                .int_or_skip(1)
                .map_err(&err)?
                .ok_or_else(|| bad("compression element size is not an integer".into()))?;
            let range = match w.head().map_err(&err)? {
                Head::Bytes(Some(n)) => w.take(n).map_err(&err)?,
                _ => {
                    return Err(bad(
                        "compressed payload is not one definite-length byte string".into(),
                    ))
                }
            };
            let compression = match algorithm.as_str() {
                "bslz4" => {
                    if modifier != elem_size as i64 {
                        return Err(bad(format!(
                            "bslz4 element size {modifier} does not match the typed array ({elem_size})"
                        )));
                    }
                    Compression::BsLz4
                }
                "lz4" => Compression::Lz4Hdf5,
                _ => {
                    return Err(StreamError::UnknownEncoding {
                        at: At::new(part, ""),
                        encoding: algorithm,
                    })
                }
            };
            (compression, algorithm, range)
        }
        _ => return Err(bad("payload is not one definite-length byte string".into())),
    };
    Ok(ChannelArray {
        shape: (rows, cols),
        elem_size,
        compression,
        encoding,
        range,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testdata;
    use super::super::{detect_protocol, parse_message};
    use super::*;

    fn cbor(v: &Cbor) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    fn text(s: &str) -> Cbor {
        Cbor::Text(s.into())
    }

    fn map(entries: Vec<(&str, Cbor)>) -> Cbor {
        Cbor::Map(entries.into_iter().map(|(k, v)| (text(k), v)).collect())
    }

    fn tag40(rows: u64, cols: u64, typed: u64, payload: Cbor) -> Cbor {
        Cbor::Tag(
            40,
            Box::new(Cbor::Array(vec![
                Cbor::Array(vec![rows.into(), cols.into()]),
                Cbor::Tag(typed, Box::new(payload)),
            ])),
        )
    }

    fn compressed(algorithm: &str, elem: u64, bytes: Vec<u8>) -> Cbor {
        Cbor::Tag(
            56500,
            Box::new(Cbor::Array(vec![
                text(algorithm),
                elem.into(),
                Cbor::Bytes(bytes),
            ])),
        )
    }

    fn image(channels: Vec<(&str, Cbor)>) -> Vec<u8> {
        let msg = map(vec![
            ("type", text("image")),
            ("series_id", 9.into()),
            ("series_unique_id", text("X")),
            ("image_id", 4.into()),
            ("real_time", Cbor::Array(vec![1.into(), 2.into()])),
            (
                "series_date",
                Cbor::Tag(0, Box::new(text("2023-10-03T17:47:49.434+02:00"))),
            ),
            ("data", map(channels)),
        ]);
        cbor(&Cbor::Tag(55799, Box::new(msg)))
    }

    fn frame(buf: &[u8]) -> Result<ParsedFrame, StreamError> {
        match parse_message(&[buf], None)?.remove(0) {
            Parsed::Frame(f) => Ok(f),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn eiger2_16m_final_messages() {
        let Some(dir) = testdata::dir() else { return };
        let read =
            |name: &str| std::fs::read(dir.join("stream_v2/eiger2_16m_final").join(name)).unwrap();
        let (start, image, end) = (read("start.cbor"), read("image.cbor"), read("end.cbor"));
        let view: Vec<&[u8]> = vec![&start, &image, &end];
        let events = parse_message(&view, None).unwrap();
        assert_eq!(events.len(), 3);

        let Parsed::Start(s) = &events[0] else {
            panic!()
        };
        assert_eq!((s.protocol, s.series), (Protocol::V2, 15614));
        let h = s.header.as_object().unwrap();
        assert_eq!(h.keys().next().unwrap(), "type", "wire order kept");
        assert_eq!(h.len(), 31 - 3);
        for key in START_ARRAYS {
            assert!(!h.contains_key(key), "{key}");
        }
        assert_eq!(
            h["arm_date"], "2023-10-03T17:47:48.329000+02:00",
            "tag 0 dropped"
        );
        assert_eq!(h["image_size_x"], 4148);
        assert_eq!(h["goniometer"]["chi"]["start"].as_f64(), Some(30.0));
        assert_eq!(h["channels"][0], "threshold_1");
        assert_eq!(s.config, s.header);
        assert!(
            s.pixel_mask.is_none(),
            "the capture's pixel mask was blanked to 4 bytes"
        );

        let Parsed::Frame(f) = &events[1] else {
            panic!()
        };
        let fh = &f.header;
        assert_eq!((fh.series, fh.frame), (15614, 0));
        assert_eq!(fh.shape, (4362, 4148));
        assert_eq!(fh.elem_size, 2);
        assert_eq!(fh.compression, Compression::BsLz4);
        assert_eq!(fh.encoding, "bslz4");
        assert_eq!(fh.md5_ok, None);
        assert_eq!(fh.header["channel"], "threshold_1");
        assert_eq!(fh.header["channels"], serde_json::json!(["threshold_1"]));
        assert_eq!(f.part, 1);
        let blob = f.blob(&view);
        assert_eq!(blob.len(), 513082);
        assert_eq!(
            &blob[..12],
            &[0, 0, 0, 0, 0x02, 0x28, 0x2c, 0x10, 0, 0, 0x20, 0]
        );
        // the same bytes ciborium finds
        let decoded: Cbor = ciborium::de::from_reader(image.as_slice()).unwrap();
        let Cbor::Map(m) = untag(&decoded) else {
            panic!()
        };
        let data = &m
            .iter()
            .find(|(k, _)| k.as_text() == Some("data"))
            .unwrap()
            .1;
        let Cbor::Map(ch) = data else { panic!() };
        let Cbor::Tag(40, arr) = &ch[0].1 else {
            panic!()
        };
        let Cbor::Array(arr) = arr.as_ref() else {
            panic!()
        };
        let Cbor::Tag(69, c) = &arr[1] else { panic!() };
        let Cbor::Tag(56500, c) = c.as_ref() else {
            panic!()
        };
        let Cbor::Array(c) = c.as_ref() else { panic!() };
        assert_eq!(c[2].as_bytes().unwrap().as_slice(), blob);
        assert_eq!(f.range.end, image.len(), "the blob is the last item");

        assert!(matches!(
            events[2],
            Parsed::End {
                protocol: Protocol::V2,
                series: 15614
            }
        ));
        assert_eq!(detect_protocol(&view).unwrap(), Protocol::V2);
    }

    #[test]
    fn every_prefix_of_real_messages_is_rejected() {
        let Some(dir) = testdata::dir() else { return };
        for name in ["start.cbor", "image.cbor", "end.cbor"] {
            let buf = std::fs::read(dir.join("stream_v2/eiger2_16m_final").join(name)).unwrap();
            assert!(parse_message(&[&buf], Some(Protocol::V2)).is_ok());
            for cut in 0..buf.len() {
                assert!(
                    parse_message(&[&buf[..cut]], Some(Protocol::V2)).is_err(),
                    "{name} cut at {cut}"
                );
            }
            let mut longer = buf.clone();
            longer.push(0);
            let e = parse_message(&[&longer], Some(Protocol::V2)).unwrap_err();
            assert_eq!(
                e.to_string(),
                "part 0: not CBOR (1 bytes after the message)"
            );
        }
    }

    #[test]
    fn alpha_format() {
        let Some(dir) = testdata::dir() else { return };
        let read =
            |name: &str| std::fs::read(dir.join("stream_v2/eiger2_1m_alpha").join(name)).unwrap();
        // The 2020 alpha image keeps its pixels under `channels`, not `data`: not read.
        let e = parse_message(&[&read("stream2.000002")], None).unwrap_err();
        assert_eq!(e.to_string(), "part 0: image message without data channels");
        let events = parse_message(&[&read("stream2.000012")], None).unwrap();
        assert!(matches!(
            events[..],
            [Parsed::End {
                protocol: Protocol::V2,
                series: 71
            }]
        ));
    }

    #[test]
    fn synthetic_images() {
        // uncompressed uint16, two channels
        let raw: Vec<u8> = (0..12).collect();
        let buf = image(vec![
            ("threshold_1", tag40(2, 3, 69, Cbor::Bytes(raw.clone()))),
            ("threshold_2", tag40(2, 3, 69, Cbor::Bytes(raw.clone()))),
        ]);
        let f = frame(&buf).unwrap();
        assert_eq!((f.header.series, f.header.frame), (9, 4));
        assert_eq!((f.header.shape, f.header.elem_size), ((2, 3), 2));
        assert_eq!(
            (f.header.compression, f.header.encoding.as_str()),
            (Compression::None, "none")
        );
        assert_eq!(&buf[f.range.clone()], raw.as_slice());
        assert_eq!(
            f.header.header["channels"],
            serde_json::json!(["threshold_1", "threshold_2"])
        );
        // lz4 (HDF5 framing), uint32; bslz4 uint8
        let f = frame(&image(vec![(
            "a",
            tag40(5, 7, 70, compressed("lz4", 0, vec![1, 2, 3])),
        )]))
        .unwrap();
        assert_eq!(
            (f.header.compression, f.header.elem_size, f.range.len()),
            (Compression::Lz4Hdf5, 4, 3)
        );
        let f = frame(&image(vec![(
            "a",
            tag40(5, 7, 64, compressed("bslz4", 1, vec![9; 20])),
        )]))
        .unwrap();
        assert_eq!(
            (f.header.compression, f.header.elem_size),
            (Compression::BsLz4, 1)
        );
        // faults
        let fault = |channels: Vec<(&str, Cbor)>| frame(&image(channels)).unwrap_err().to_string();
        assert_eq!(fault(vec![]), "part 0: image message without data channels");
        assert_eq!(
            fault(vec![("a", tag40(2, 3, 69, Cbor::Bytes(vec![0; 11])))]),
            "part 0 (blob): 11 bytes, but 2x3 pixels of 2 bytes uncompressed need 12"
        );
        assert_eq!(
            fault(vec![("a", tag40(2, 3, 85, Cbor::Bytes(vec![0; 24])))]),
            "part 0: channel \"a\": tag 40 array with unsupported element type 85"
        );
        assert_eq!(
            fault(vec![("a", tag40(2, 3, 69, compressed("zstd", 2, vec![1])))]),
            "part 0: unknown encoding \"zstd\""
        );
        assert!(fault(vec![(
            "a",
            tag40(2, 3, 69, compressed("bslz4", 4, vec![1]))
        )])
        .contains("does not match"));
        assert!(fault(vec![("a", Cbor::Bytes(vec![0; 12]))]).contains("not a tag-40 array"));
        assert!(
            fault(vec![("a", tag40(0, 3, 69, Cbor::Bytes(vec![])))]).contains("unsupported shape")
        );
        let huge = tag40(1 << 40, 1 << 40, 69, compressed("bslz4", 2, vec![1]));
        assert!(fault(vec![("a", huge)]).contains("unsupported shape"));
        let three = Cbor::Tag(
            40,
            Box::new(Cbor::Array(vec![
                Cbor::Array(vec![1.into(), 2.into(), 3.into()]),
                Cbor::Tag(64, Box::new(Cbor::Bytes(vec![0; 6]))),
            ])),
        );
        assert!(fault(vec![("a", three)]).contains("3 dimensions, expected 2"));
    }

    #[test]
    fn indefinite_lengths_are_walked() {
        // {_ "type": "image", "series_id": 5, "image_id": 7, "data": {_ "one": 40([_ [2, 3], 69(h'..' 12 bytes)])}}
        let mut buf = vec![0xd9, 0xd9, 0xf7, 0xbf];
        let t = |buf: &mut Vec<u8>, s: &str| {
            buf.push(0x60 + s.len() as u8);
            buf.extend_from_slice(s.as_bytes());
        };
        t(&mut buf, "type");
        buf.extend_from_slice(&[0x7f, 0x63]); // "image" as chunks "ima" + "ge"
        buf.extend_from_slice(b"ima");
        buf.push(0x62);
        buf.extend_from_slice(b"ge");
        buf.push(0xff);
        t(&mut buf, "series_id");
        buf.push(0x05);
        t(&mut buf, "extra");
        buf.extend_from_slice(&[0x9f, 0x01, 0xa1, 0x01, 0x02, 0xff]);
        t(&mut buf, "image_id");
        buf.push(0x07);
        t(&mut buf, "data");
        buf.push(0xbf);
        t(&mut buf, "one");
        buf.extend_from_slice(&[0xd8, 0x28, 0x9f, 0x82, 0x02, 0x03, 0xd8, 0x45, 0x4c]);
        let start = buf.len();
        buf.extend(100u8..112);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        let f = frame(&buf).unwrap();
        assert_eq!(
            (f.header.series, f.header.frame, f.header.shape),
            (5, 7, (2, 3))
        );
        assert_eq!(f.range, start..start + 12);
        // ciborium agrees that the message is well formed
        let _: Cbor = ciborium::de::from_reader(buf.as_slice()).unwrap();
        // a chunked payload cannot be handed out without a copy: refused
        let chunked = [
            &buf[..start - 1],
            &[0x5f, 0x46],
            &buf[start..start + 6],
            &[0x46],
            &buf[start + 6..start + 12],
            &[0xff],
            &buf[start + 12..],
        ]
        .concat();
        assert!(frame(&chunked)
            .unwrap_err()
            .to_string()
            .contains("definite-length"));
    }

    #[test]
    fn start_with_pixel_mask() {
        let mut mask = Vec::new();
        for v in [0u32, 1, 0, 0, 0x10, 0] {
            mask.extend_from_slice(&v.to_le_bytes());
        }
        let start = |pm: Cbor| {
            cbor(&Cbor::Tag(
                55799,
                Box::new(map(vec![
                    ("type", text("start")),
                    ("series_id", 3.into()),
                    (
                        "arm_date",
                        Cbor::Tag(0, Box::new(text("2024-01-01T00:00:00.000+00:00"))),
                    ),
                    ("big", Cbor::Integer(u64::MAX.into())),
                    ("nan", Cbor::Float(f64::NAN)),
                    ("bytes", Cbor::Bytes(vec![0xde, 0xad])),
                    ("pixel_mask", map(vec![("threshold_1", pm)])),
                    (
                        "flatfield",
                        map(vec![("threshold_1", Cbor::Bytes(vec![0; 4]))]),
                    ),
                    ("countrate_correction_lookup_table", Cbor::Bytes(vec![0; 4])),
                ])),
            ))
        };
        let parse = |buf: Vec<u8>| match parse_message(&[&buf], None) {
            Ok(mut e) => match e.remove(0) {
                Parsed::Start(s) => Ok(s),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e),
        };
        let s = parse(start(tag40(2, 3, 70, Cbor::Bytes(mask.clone())))).unwrap();
        assert_eq!(s.series, 3);
        assert_eq!(s.pixel_mask, Some((2, 3, vec![0, 1, 0, 0, 0x10, 0])));
        assert_eq!(
            s.header,
            serde_json::json!({"type": "start", "series_id": 3, "arm_date": "2024-01-01T00:00:00.000+00:00",
                               "big": u64::MAX, "nan": null, "bytes": "dead"})
        );
        let s = parse(start(tag40(2, 3, 64, Cbor::Bytes(vec![1, 0, 0, 2, 0, 0])))).unwrap();
        assert_eq!(s.pixel_mask, Some((2, 3, vec![1, 0, 0, 2, 0, 0])));
        assert!(parse(start(Cbor::Bytes(vec![0; 4])))
            .unwrap()
            .pixel_mask
            .is_none());
        assert!(
            parse(start(tag40(2, 3, 70, compressed("bslz4", 4, vec![1; 30]))))
                .unwrap()
                .pixel_mask
                .is_none()
        );
        let e = parse(start(tag40(2, 3, 70, Cbor::Bytes(mask[..20].to_vec())))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 0: pixel_mask: 20 bytes for 2x3 elements of 4 bytes"
        );
        assert!(parse(start(tag40(2, 3, 85, Cbor::Bytes(mask)))).is_err());
    }

    #[test]
    fn bad_messages() {
        let one = |buf: &[u8]| {
            parse_message(&[buf], Some(Protocol::V2))
                .unwrap_err()
                .to_string()
        };
        let msg = |entries: Vec<(&str, Cbor)>| cbor(&map(entries));
        assert_eq!(
            one(&msg(vec![("type", text("flush"))])),
            "part 0: unknown v2 message type \"flush\""
        );
        assert_eq!(
            one(&msg(vec![("series_id", 1.into())])),
            "part 0: CBOR message without a type"
        );
        assert_eq!(
            one(&msg(vec![("type", 5.into())])),
            "part 0: unknown v2 message type \"(not text)\""
        );
        assert_eq!(
            one(&cbor(&Cbor::Array(vec![1.into()]))),
            "part 0: CBOR message without a type"
        );
        assert_eq!(
            one(&msg(vec![("type", text("end")), ("series_id", text("x"))])),
            "part 0: series_id is not an integer"
        );
        assert!(one(b"").starts_with("part 0: not CBOR (truncated"));
        assert!(one(b"\xd9\xd9\xf7\xfc").starts_with("part 0: not CBOR (reserved"));
        assert!(one(b"\xff").starts_with("part 0: not CBOR (unexpected break"));
        assert!(one(b"\xa1\x64type\x65st\xffrt").starts_with("part 0: not CBOR (invalid UTF-8"));
        // huge declared lengths and deep nesting fail cleanly
        assert!(
            one(b"\xa1\x64data\x5b\xff\xff\xff\xff\xff\xff\xff\xff").contains("runs past the end")
        );
        assert!(one(b"\xa1\x64data\x9b\xff\xff\xff\xff\xff\xff\xff\xff").contains("truncated"));
        let deep = [
            vec![0xa1, 0x64, b'd', b'a', b't', b'a'],
            vec![0x81; 100_000],
            vec![0],
        ]
        .concat();
        assert!(one(&deep).contains("nested deeper"));
        // the second part of a two-part message is named
        let end = msg(vec![("type", text("end")), ("series_id", 1.into())]);
        let e = parse_message(&[&end, b"\x00junk"], None).unwrap_err();
        assert_eq!(e.part(), Some(1));
        // series_number (alpha) when series_id is absent
        let end2 = msg(vec![("type", text("end")), ("series_number", 8.into())]);
        assert!(matches!(
            parse_message(&[&end2], None).unwrap()[..],
            [Parsed::End { series: 8, .. }]
        ));
    }
}
