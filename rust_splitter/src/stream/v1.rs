//! DECTRIS stream v1: multipart JSON plus binary, read part by part by `htype` (a sender may merge
//! a header and its first frame into one multipart, so the part count says nothing).
//!
//! - Header: `dheader-1.0` (`{"header_detail":"all","htype":"dheader-1.0","series":71}`), then with
//!   `header_detail` basic or all the detector config (JSON without htype); with `all` also
//!   `dflatfield-1.0` (tickit-devices: `flatfield-1.0`), `dpixelmask-1.0`, `dcountrate_table-1.0`,
//!   each a JSON part (`shape` [width, height], `type`) followed by a blob part (possibly empty).
//!   An optional appendix part (no htype) may end the message.
//! - Image: `dimage-1.0` (frame, hash, series), `dimage_d-1.0` (encoding, shape [w, h], size, type),
//!   the blob, `dconfig-1.0` (times); then an optional appendix part.
//! - End: `dseries_end-1.0` (series), one part.

use serde_json::{Map, Value};

use super::{
    check_md5, htype, htype_of, image_desc, int_field, json_part, type_size, value_text, At,
    Parsed, ParsedFrame, StreamError,
};
use crate::frame::{FrameHeader, Protocol, SeriesHeader};

/// Header arrays that come as a header part plus a blob part (with `header_detail` all).
/// `flatfield-1.0` is tickit-devices' misspelling of `dflatfield-1.0`.
const HEADER_ARRAYS: [(&str, &str); 4] = [
    ("dflatfield", "flatfield"),
    ("flatfield", "flatfield"),
    ("dpixelmask", "pixelmask"),
    ("dcountrate", "countrate_table"),
];

fn header_array_name(htype: &str) -> Option<&'static str> {
    HEADER_ARRAYS
        .iter()
        .find(|(prefix, _)| htype.starts_with(prefix))
        .map(|(_, name)| *name)
}

/// Parse a v1 message (any run of header, image and end messages).
pub fn parse(parts: &[&[u8]]) -> Result<Vec<Parsed>, StreamError> {
    let n = parts.len();
    let mut events = Vec::new();
    let mut i = 0;
    while i < n {
        let at = At::new(i, "");
        let header = json_part(parts[i], at)?;
        let kind = htype_of(&header);
        if kind.starts_with("dheader") {
            let (start, next) = parse_header(parts, i, header)?;
            events.push(Parsed::Start(start));
            i = next;
        } else if kind.starts_with("dimage") && !kind.starts_with("dimage_d") {
            let (frame, next) = parse_image(parts, i, header)?;
            events.push(Parsed::Frame(frame));
            i = next;
        } else if kind.starts_with("dseries_end") {
            let series = int_field(&header, "series", -1, at)?;
            events.push(Parsed::End {
                protocol: Protocol::V1,
                series,
            });
            i += 1;
        } else {
            return Err(StreamError::UnexpectedHtype { at, htype: kind });
        }
    }
    Ok(events)
}

/// `dheader-1.0` at part `i`; returns the start and the index of the part after the header.
fn parse_header(
    parts: &[&[u8]],
    i: usize,
    header: Map<String, Value>,
) -> Result<(SeriesHeader, usize), StreamError> {
    let n = parts.len();
    let series = int_field(&header, "series", -1, At::new(i, ""))?;
    let detail = header
        .get("header_detail")
        .map(value_text)
        .unwrap_or_else(|| "none".into());
    let mut i = i;
    let config = if detail != "none" {
        // basic / all: the detector config follows (a dheader sent alone gives an empty config;
        // the config may then come as a message of its own, see `super::lone_config`).
        let config = if i + 1 < n {
            json_part(parts[i + 1], At::new(i + 1, "config"))?
        } else {
            Map::new()
        };
        i += 2;
        config
    } else {
        i += 1;
        Map::new()
    };
    let mut pixel_mask = None;
    // header_detail all: flatfield / pixel mask / count-rate table, each a header part + a blob part.
    while i + 1 < n {
        let Some(name) = htype(parts[i]).as_deref().and_then(header_array_name) else {
            break;
        };
        let h = json_part(parts[i], At::new(i, name))?;
        let blob = parts[i + 1];
        if let Some((dims, dtype)) = header_array(&h, blob, At::new(i + 1, name))? {
            if name == "pixelmask" {
                pixel_mask = Some(pixel_mask_of(
                    &h,
                    &dims,
                    &dtype,
                    blob,
                    At::new(i + 1, name),
                )?);
            }
        }
        i += 2;
    }
    if i + 1 == n && htype(parts[i]).is_none() {
        i += 1; // header appendix: one last part without an htype
    }
    let start = SeriesHeader {
        protocol: Protocol::V1,
        series,
        header: Value::Object(header),
        config: Value::Object(config),
        pixel_mask,
    };
    Ok((start, i))
}

/// Check a header array's blob against its header part: `shape` (fastest first) x `type`.
/// None when nothing was sent (`shape` [], `type` "undefined", or an empty blob).
/// Returns the dims slowest first and the type name.
fn header_array(
    h: &Map<String, Value>,
    blob: &[u8],
    at: At,
) -> Result<Option<(Vec<usize>, String)>, StreamError> {
    let mismatch = |reason: String| StreamError::ArrayMismatch {
        at,
        header: Value::Object(h.clone()).to_string(),
        reason,
    };
    let shape_given = match h.get("shape") {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let dtype = match h.get("type") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => value_text(v),
    };
    if !shape_given || dtype == "undefined" || blob.is_empty() {
        return Ok(None);
    }
    let mut dims = Vec::new();
    match h.get("shape") {
        Some(Value::Array(items)) => {
            for v in items {
                match v.as_u64().and_then(|d| usize::try_from(d).ok()) {
                    Some(d) => dims.push(d),
                    None => return Err(mismatch(format!("shape item {v} is not a size"))),
                }
            }
        }
        other => {
            return Err(mismatch(format!(
                "shape {} is not a list",
                other.unwrap_or(&Value::Null)
            )))
        }
    }
    dims.reverse(); // v1 shapes are fastest first
    let elem = type_size(&dtype).ok_or_else(|| mismatch(format!("unknown type {dtype:?}")))?;
    let need = dims.iter().try_fold(elem, |acc, &d| acc.checked_mul(d));
    if need != Some(blob.len()) {
        return Err(mismatch(format!(
            "{} bytes, shape and type need {}",
            blob.len(),
            need.map_or("too many".into(), |v| v.to_string())
        )));
    }
    Ok(Some((dims, dtype)))
}

/// The pixel mask as (rows, cols, u32 values); sent as uint32 [width, height] little-endian.
fn pixel_mask_of(
    h: &Map<String, Value>,
    dims: &[usize],
    dtype: &str,
    blob: &[u8],
    at: At,
) -> Result<(usize, usize, Vec<u32>), StreamError> {
    let mismatch = |reason: String| StreamError::ArrayMismatch {
        at,
        header: Value::Object(h.clone()).to_string(),
        reason,
    };
    if dims.len() != 2 {
        return Err(mismatch(format!(
            "pixel mask has {} dimensions, expected 2",
            dims.len()
        )));
    }
    let values: Vec<u32> = match dtype {
        "uint32" | "int32" => blob
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "uint16" | "int16" => blob
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        "uint8" | "int8" => blob.iter().map(|&b| u32::from(b)).collect(),
        _ => {
            return Err(mismatch(format!(
                "pixel mask type {dtype:?} is not an integer type"
            )))
        }
    };
    Ok((dims[0], dims[1], values))
}

/// `dimage-1.0` at part `i`, then `dimage_d-1.0`, the blob and (optional)
/// `dconfig-1.0`, then an optional appendix. Returns the frame and the index after it.
fn parse_image(
    parts: &[&[u8]],
    i: usize,
    image: Map<String, Value>,
) -> Result<(ParsedFrame, usize), StreamError> {
    let n = parts.len();
    let at = At::new(i, "dimage");
    if i + 2 >= n {
        return Err(StreamError::Truncated {
            at,
            what: "image",
            have: n - i,
            need: 4,
        });
    }
    let at_d = At::new(i + 1, "dimage_d");
    let d = json_part(parts[i + 1], at_d)?;
    let kind = htype_of(&d);
    if !kind.starts_with("dimage_d") {
        return Err(StreamError::UnexpectedHtype {
            at: at_d,
            htype: kind,
        });
    }
    let blob = parts[i + 2];
    let desc = image_desc(&d, blob, at_d, i + 2)?;
    let series = int_field(&image, "series", -1, at)?;
    let frame = int_field(&image, "frame", -1, at)?;
    let md5_ok = check_md5(&image, parts[i + 1]);
    let mut next = i + 3;
    if next < n && htype(parts[next]).is_some_and(|h| h.starts_with("dconfig")) {
        next += 1;
    }
    if next < n && htype(parts[next]).is_none() {
        next += 1; // image appendix
    }
    let header = FrameHeader {
        protocol: Protocol::V1,
        series,
        frame,
        shape: desc.shape,
        elem_size: desc.elem_size,
        compression: desc.compression,
        encoding: desc.encoding,
        md5_ok,
        header: Value::Object(image),
    };
    Ok((
        ParsedFrame {
            header,
            part: i + 2,
            range: 0..blob.len(),
        },
        next,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::parse_message;
    use super::super::testdata::{self, slices};
    use super::*;
    use crate::frame::Compression;

    fn frames(events: &[Parsed]) -> Vec<&ParsedFrame> {
        events
            .iter()
            .filter_map(|e| {
                if let Parsed::Frame(f) = e {
                    Some(f)
                } else {
                    None
                }
            })
            .collect()
    }

    fn replace(part: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = std::str::from_utf8(part).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn eiger2_1m_capture() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        assert_eq!(msgs.len(), 24);
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        let mut n_frames = 0;
        for msg in &msgs {
            let view = slices(msg);
            let events = parse_message(&view, None).unwrap();
            assert_eq!(events.len(), 1);
            match &events[0] {
                Parsed::Start(s) => {
                    assert_eq!(msg.len(), 8);
                    assert_eq!(s.protocol, Protocol::V1);
                    assert_eq!(s.header["header_detail"], "all");
                    assert_eq!(s.config["x_pixels_in_detector"], 1028);
                    assert_eq!(s.config["wavelength"].as_f64(), Some(1.5418000685586377));
                    assert!(
                        s.pixel_mask.is_none(),
                        "the capture sent an empty pixel mask"
                    );
                    starts.push(s.series);
                }
                Parsed::Frame(f) => {
                    assert_eq!(msg.len(), 4);
                    let h = &f.header;
                    assert_eq!(h.protocol, Protocol::V1);
                    assert_eq!(h.shape, (1062, 1028));
                    assert_eq!(h.elem_size, 4);
                    assert_eq!(h.compression, Compression::Lz4Raw);
                    assert_eq!(h.encoding, "lz4<");
                    assert_eq!(h.md5_ok, Some(true), "frame {}", h.frame);
                    assert_eq!(h.frame, n_frames % 10);
                    assert_eq!(h.series, if n_frames < 10 { 71 } else { 72 });
                    assert_eq!(f.part, 2);
                    assert_eq!(f.range, 0..msg[2].len());
                    assert_eq!(
                        f.blob(&view).len(),
                        json_part(&msg[1], At::new(1, "")).unwrap()["size"]
                    );
                    n_frames += 1;
                }
                Parsed::End { protocol, series } => {
                    assert_eq!(*protocol, Protocol::V1);
                    ends.push(*series);
                }
            }
        }
        assert_eq!(n_frames, 20);
        assert_eq!(starts, [71, 72]);
        assert_eq!(ends, [71, 72]);
    }

    #[test]
    fn merged_series_in_one_multipart() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        // Series 71 as one multipart: header, 10 frames, end (49 parts).
        let all: Vec<Vec<u8>> = msgs[..12].iter().flatten().cloned().collect();
        let view = slices(&all);
        assert_eq!(view.len(), 49);
        let events = parse_message(&view, None).unwrap();
        assert_eq!(events.len(), 12);
        assert!(matches!(events[0], Parsed::Start(ref s) if s.series == 71));
        assert!(matches!(events[11], Parsed::End { series: 71, .. }));
        let fr = frames(&events);
        for (k, f) in fr.iter().enumerate() {
            assert_eq!(f.header.frame, k as i64);
            assert_eq!(f.part, 8 + 4 * k + 2);
            assert_eq!(f.blob(&view), view[f.part]);
        }
    }

    #[test]
    fn header_detail_none_basic_and_appendices() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        let header = &msgs[0];
        let image = &msgs[1];
        // none: one part, empty config
        let none = replace(&header[0], "\"all\"", "\"none\"");
        let events = parse_message(&[&none], None).unwrap();
        let Parsed::Start(s) = &events[0] else {
            panic!()
        };
        assert_eq!(s.config, Value::Object(Map::new()));
        // basic: dheader + config, then the first frame in the same multipart
        let basic = replace(&header[0], "\"all\"", "\"basic\"");
        let mut parts: Vec<&[u8]> = vec![&basic, &header[1]];
        parts.extend(slices(image));
        let events = parse_message(&parts, None).unwrap();
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], Parsed::Start(s) if s.config["nimages"] == 10));
        assert!(matches!(&events[1], Parsed::Frame(f) if f.part == 4));
        // appendices after the header and after the image (text, and JSON without htype)
        let mut parts = slices(header);
        parts.push(b"header appendix");
        let events = parse_message(&parts, None).unwrap();
        assert_eq!(events.len(), 1);
        let mut parts = slices(image);
        parts.push(b"{\"user\":\"appendix\"}");
        parts.extend(slices(&msgs[2]));
        let events = parse_message(&parts, None).unwrap();
        let fr = frames(&events);
        assert_eq!(fr.len(), 2);
        assert_eq!((fr[0].part, fr[1].part), (2, 7));
        // tickit-devices' flatfield-1.0 misspelling, and JSON parts ending in \n or NUL
        let mut owned: Vec<Vec<u8>> = header.clone();
        owned[2] = replace(&owned[2], "dflatfield-1.0", "flatfield-1.0");
        owned[0].push(b'\n');
        owned[1].push(0);
        owned[4].extend_from_slice(b"\r\n");
        let events = parse_message(&slices(&owned), None).unwrap();
        assert!(matches!(&events[0], Parsed::Start(s) if s.series == 71));
    }

    #[test]
    fn md5_wrong_missing_and_trailing_newline() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        let mut image = msgs[1].clone();
        let parse = |m: &Vec<Vec<u8>>| match parse_message(&slices(m), None).unwrap().remove(0) {
            Parsed::Frame(f) => f.header,
            other => panic!("{other:?}"),
        };
        assert_eq!(parse(&image).md5_ok, Some(true));
        // the hash covers the dimage_d part as sent: a newline added changes it
        image[1].push(b'\n');
        assert_eq!(parse(&image).md5_ok, Some(false));
        image[1].pop();
        image[0] = replace(&image[0], "\"hash\":\"2c", "\"hash\":\"3c");
        assert_eq!(parse(&image).md5_ok, Some(false));
        image[0] = replace(
            &image[0],
            "\"hash\":\"3c68ca550c9ffa44e6beadad7e9be5fd\"",
            "\"hash\":\"TODO-MD5-HASH\"",
        );
        assert_eq!(parse(&image).md5_ok, None);
        image[0] = replace(&image[0], "\"hash\":\"TODO-MD5-HASH\",", "");
        assert_eq!(parse(&image).md5_ok, None);
        // upper-case hex also compares
        let mut upper = msgs[1].clone();
        upper[0] = replace(
            &upper[0],
            "2c68ca550c9ffa44e6beadad7e9be5fd",
            "2C68CA550C9FFA44E6BEADAD7E9BE5FD",
        );
        assert_eq!(parse(&upper).md5_ok, Some(true));
    }

    #[test]
    fn encodings_and_types() {
        let d = |enc: &str, ty: &str, size: usize| {
            format!("{{\"encoding\":\"{enc}\",\"htype\":\"dimage_d-1.0\",\"shape\":[3,2],\"size\":{size},\"type\":\"{ty}\"}}")
        };
        let image = b"{\"frame\":7,\"htype\":\"dimage-1.0\",\"series\":3}".as_slice();
        let dconfig =
            b"{\"htype\":\"dconfig-1.0\",\"real_time\":1,\"start_time\":0,\"stop_time\":1}"
                .as_slice();
        let run = |enc: &str, ty: &str, blob: &[u8]| {
            let dd = d(enc, ty, blob.len());
            parse_message(&[image, dd.as_bytes(), blob, dconfig], None)
        };
        let blob = [0u8; 24];
        let f = |r: Result<Vec<Parsed>, StreamError>| match r.unwrap().remove(0) {
            Parsed::Frame(f) => f.header,
            other => panic!("{other:?}"),
        };
        let h = f(run("<", "uint32", &blob));
        assert_eq!(
            (h.shape, h.elem_size, h.compression, h.frame, h.series),
            ((2, 3), 4, Compression::None, 7, 3)
        );
        assert_eq!(h.md5_ok, None);
        assert_eq!(
            f(run("none", "uint16", &blob[..12])).compression,
            Compression::None
        );
        assert_eq!(
            f(run("bs32-lz4<", "uint32", &blob[..20])).compression,
            Compression::BsLz4
        );
        assert_eq!(f(run("bs32-lz4<", "int32", &blob[..20])).elem_size, 4);
        assert_eq!(f(run("bs16-lz4<", "uint16", &blob[..20])).elem_size, 2);
        assert_eq!(f(run("bs8-lz4<", "uint8", &blob[..20])).elem_size, 1);
        assert_eq!(
            f(run("lz4<", "uint8", &blob[..5])).compression,
            Compression::Lz4Raw
        );
        let e = run("bs16-lz4<", "uint32", &blob).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 1 (dimage_d): encoding \"bs16-lz4<\" does not match pixel type \"uint32\""
        );
        let e = run("zstd", "uint32", &blob).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 1 (dimage_d): unknown encoding \"zstd\""
        );
        let e = run("<", "uint32", &blob[..23]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 2 (blob): 23 bytes, but 2x3 pixels of 4 bytes uncompressed need 24"
        );
        assert!(matches!(
            run("<", "float32", &blob),
            Err(StreamError::Unsupported { .. })
        ));
        // size disagreeing with the blob
        let dd = d("lz4<", "uint32", 18);
        let e = parse_message(&[image, dd.as_bytes(), &blob[..17], dconfig], None).unwrap_err();
        assert_eq!(e.to_string(), "part 2 (blob): 17 bytes, dimage_d says 18");
        assert_eq!(e.part(), Some(2));
        // bad shapes
        for shape in [
            "[3]",
            "[3,0]",
            "[-3,2]",
            "\"3x2\"",
            "[3,2,1]",
            "[3.5,2]",
            "[4294967296,4294967296]",
        ] {
            let dd = d("lz4<", "uint32", 24).replace("[3,2]", shape);
            let r = parse_message(&[image, dd.as_bytes(), &blob, dconfig], None);
            assert!(r.is_err(), "{shape}");
        }
    }

    #[test]
    fn pixel_mask_and_header_arrays() {
        let dheader =
            b"{\"header_detail\":\"all\",\"htype\":\"dheader-1.0\",\"series\":5}".as_slice();
        let config = b"{\"nimages\":1}\n".as_slice();
        let ff = b"{\"htype\":\"dflatfield-1.0\",\"shape\":[3,2],\"type\":\"float32\"}".as_slice();
        let pm = b"{\"htype\":\"dpixelmask-1.0\",\"shape\":[3,2],\"type\":\"uint32\"}".as_slice();
        let ct =
            b"{\"htype\":\"dcountrate_table-1.0\",\"shape\":[2,1],\"type\":\"float32\"}".as_slice();
        let ff_blob = [0u8; 24];
        let mut pm_blob = Vec::new();
        for v in [0u32, 1, 2, 4, 0, 0x8000_0000] {
            pm_blob.extend_from_slice(&v.to_le_bytes());
        }
        let ct_blob = [0u8; 8];
        let events = parse_message(
            &[dheader, config, ff, &ff_blob, pm, &pm_blob, ct, &ct_blob],
            None,
        )
        .unwrap();
        let Parsed::Start(s) = &events[0] else {
            panic!()
        };
        assert_eq!(s.series, 5);
        assert_eq!(s.pixel_mask, Some((2, 3, vec![0, 1, 2, 4, 0, 0x8000_0000])));
        // empty blobs: nothing sent
        let events = parse_message(&[dheader, config, ff, b"", pm, b"", ct, b""], None).unwrap();
        let Parsed::Start(s) = &events[0] else {
            panic!()
        };
        assert!(s.pixel_mask.is_none());
        // a mask blob of the wrong size
        let e = parse_message(
            &[
                dheader,
                config,
                ff,
                &ff_blob,
                pm,
                &pm_blob[..20],
                ct,
                &ct_blob,
            ],
            None,
        )
        .unwrap_err();
        assert_eq!(e.part(), Some(5));
        assert!(
            e.to_string()
                .starts_with("part 5 (pixelmask): blob does not match {"),
            "{e}"
        );
        // a header array without its blob part
        assert!(parse_message(&[dheader, config, ff, &ff_blob, pm], None).is_err());
    }

    #[test]
    fn truncated_and_garbage_messages() {
        let Some(msgs) = testdata::v1_1m_messages() else {
            return;
        };
        let image = &msgs[1];
        // drop the blob and everything after it
        let e = parse_message(&slices(&image[..2]), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 0 (dimage): image message truncated (2 parts, need 4)"
        );
        // every JSON part cut short; the blob cut short. (Not the dconfig part:
        // dconfig is optional and a part after the blob without an htype is
        // taken for an image appendix.)
        for msg in [&msgs[0], image, &msgs[11]] {
            for p in 0..msg.len() {
                if msg[p].first() != Some(&b'{') || (msg.len() == 4 && p == 3) {
                    continue;
                }
                for cut in [1, msg[p].len() / 2, msg[p].len() - 1] {
                    let mut m = msg.clone();
                    m[p].truncate(cut);
                    assert!(
                        parse_message(&slices(&m), None).is_err(),
                        "part {p} cut at {cut}"
                    );
                }
            }
        }
        let mut m = image.clone();
        m[2].pop();
        let e = parse_message(&slices(&m), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 2 (blob): 17444 bytes, dimage_d says 17445"
        );
        // a dimage_d that is something else
        let mut m = image.clone();
        m[1] = m[3].clone();
        assert!(matches!(
            parse_message(&slices(&m), None),
            Err(StreamError::UnexpectedHtype { .. })
        ));
        // unknown htype, garbage parts, non-object JSON, bad series
        let e = parse_message(&[b"{\"htype\":\"dfoo-1.0\"}"], Some(Protocol::V1)).unwrap_err();
        assert_eq!(e.to_string(), "part 0: unexpected htype \"dfoo-1.0\"");
        let e = parse_message(&[b"\x00\x01garbage"], Some(Protocol::V1)).unwrap_err();
        assert!(e.to_string().starts_with("part 0: not JSON ("), "{e}");
        assert!(matches!(
            parse_message(&[b"[1,2]"], Some(Protocol::V1)),
            Err(StreamError::NotObject { .. })
        ));
        let e = parse_message(&[b"{\"htype\":\"dseries_end-1.0\",\"series\":\"x\"}"], None)
            .unwrap_err();
        assert!(matches!(e, StreamError::BadField { key: "series", .. }));
        // a header followed by a part that is no message start
        let mut m = msgs[0].clone();
        m.push(b"{\"htype\":\"dconfig-1.0\"}".to_vec());
        m.push(b"tail".to_vec());
        assert!(parse_message(&slices(&m), None).is_err());
    }

    /// Just enough MessagePack for the DLS files: arrays of bin, str and str-keyed maps.
    enum Mp {
        Bin(Vec<u8>),
        Json(Value),
    }

    fn mp_read(buf: &[u8], pos: &mut usize) -> Mp {
        let take = |pos: &mut usize, n: usize| {
            let s = &buf[*pos..*pos + n];
            *pos += n;
            s
        };
        let be = |s: &[u8]| s.iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        let b = take(pos, 1)[0];
        let json = |v: Value| Mp::Json(v);
        match b {
            0x00..=0x7f => json(Value::from(b)),
            0x80..=0x8f | 0xde | 0xdf => {
                let n = match b {
                    0xde => be(take(pos, 2)),
                    0xdf => be(take(pos, 4)),
                    _ => (b & 0x0f) as usize,
                };
                let mut map = Map::new();
                for _ in 0..n {
                    let Mp::Json(Value::String(k)) = mp_read(buf, pos) else {
                        panic!("map key")
                    };
                    let v = match mp_read(buf, pos) {
                        Mp::Json(v) => v,
                        Mp::Bin(_) => panic!("bin in map"),
                    };
                    map.insert(k, v);
                }
                json(Value::Object(map))
            }
            0xa0..=0xbf | 0xd9 | 0xda | 0xdb => {
                let n = match b {
                    0xd9 => be(take(pos, 1)),
                    0xda => be(take(pos, 2)),
                    0xdb => be(take(pos, 4)),
                    _ => (b & 0x1f) as usize,
                };
                json(Value::from(std::str::from_utf8(take(pos, n)).unwrap()))
            }
            0xc0 => json(Value::Null),
            0xc2 => json(Value::Bool(false)),
            0xc3 => json(Value::Bool(true)),
            0xc4..=0xc6 => {
                let n = be(take(pos, 1 << (b - 0xc4)));
                Mp::Bin(take(pos, n).to_vec())
            }
            0xcc..=0xcf => json(Value::from(be(take(pos, 1 << (b - 0xcc))) as u64)),
            _ => panic!("msgpack byte {b:02x} not supported here"),
        }
    }

    /// A DLS file: a msgpack array of parts; a decoded map is written back as compact JSON
    /// (keys in their msgpack order, so `acqID` comes last as on the wire).
    fn dls_parts(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut pos = 1;
        let n = match bytes[0] {
            b @ 0x90..=0x9f => (b & 0x0f) as usize,
            b => panic!("not a msgpack array: {b:02x}"),
        };
        let parts = (0..n)
            .map(|_| match mp_read(bytes, &mut pos) {
                Mp::Bin(b) => b,
                Mp::Json(Value::String(s)) => s.into_bytes(), // the blanked blobs are empty str
                Mp::Json(v) => serde_json::to_vec(&v).unwrap(),
            })
            .collect();
        assert_eq!(pos, bytes.len());
        parts
    }

    #[test]
    fn dls_eiger2_16m_capture() {
        let Some(header) = testdata::read("stream_v1/dls_eiger2_16m_roi4m/header") else {
            return;
        };
        let image = testdata::read("stream_v1/dls_eiger2_16m_roi4m/image000044").unwrap();
        let header = dls_parts(&header);
        let image = dls_parts(&image);
        assert_eq!((header.len(), image.len()), (8, 4));
        let mut merged = header.clone();
        merged.extend(image.iter().cloned());
        let view = slices(&merged);
        let events = parse_message(&view, None).unwrap();
        assert_eq!(events.len(), 2);
        let Parsed::Start(s) = &events[0] else {
            panic!()
        };
        assert_eq!(s.series, 2619);
        assert_eq!(s.header["acqID"], "5291452");
        assert_eq!(s.config["roi_mode"], "4M");
        assert!(s.pixel_mask.is_none(), "blobs were blanked");
        let Parsed::Frame(f) = &events[1] else {
            panic!()
        };
        let h = &f.header;
        assert_eq!((h.series, h.frame), (2619, 43));
        assert_eq!(h.shape, (2162, 2068));
        assert_eq!(h.elem_size, 2);
        assert_eq!(h.compression, Compression::BsLz4);
        assert_eq!(h.encoding, "bs16-lz4<");
        assert_eq!(
            h.md5_ok,
            Some(true),
            "MD5 of the dimage_d part with its newline"
        );
        assert_eq!(f.part, 10);
        let blob = f.blob(&view);
        assert_eq!(blob.len(), 673061);
        assert_eq!(
            &blob[..12],
            &[0, 0, 0, 0, 0x00, 0x88, 0x71, 0xd0, 0, 0, 0x20, 0]
        );
    }
}
