//! SSRL `cbfToEiger-0.1`: what SSRL's Splitter served to its readers. Each frame is one message of
//! six parts, every JSON part ending in a NUL byte:
//!
//! 0. header `{"header_detail":"basic","htype":"cbfToEiger-0.1","mapping":"","master_file":"...","reporting":"","series":1}`
//! 1. detector config (no htype)
//! 2. `dimage-1.0` (frame, 1-based; hash `TODO-MD5-HASH`; series)
//! 3. `dimage_d-1.0` (encoding `bs32-lz4<`, shape [width, height], size, type)
//! 4. the blob
//! 5. `dconfig-1.0`
//!
//! The header goes out with every frame, so each message gives a Start (the caller de-duplicates)
//! and then the Frame. The series ends with a single-part `dseries_end-1.0`.

use serde_json::Value;

use super::{
    check_md5, htype_of, image_desc, int_field, json_part, At, Parsed, ParsedFrame, StreamError,
};
use crate::frame::{FrameHeader, Protocol, SeriesHeader};

pub fn parse(parts: &[&[u8]]) -> Result<Vec<Parsed>, StreamError> {
    let first = parts.first().ok_or(StreamError::Empty)?;
    let at0 = At::new(0, "cbfToEiger header");
    let header = json_part(first, at0)?;
    let kind = htype_of(&header);
    if kind.starts_with("dseries_end") {
        if parts.len() != 1 {
            return Err(StreamError::PartCount {
                what: "dseries_end",
                have: parts.len(),
                expected: 1,
            });
        }
        let series = int_field(&header, "series", -1, at0)?;
        return Ok(vec![Parsed::End {
            protocol: Protocol::CbfToEiger,
            series,
        }]);
    }
    if !kind.starts_with("cbfToEiger") {
        return Err(StreamError::UnexpectedHtype {
            at: at0,
            htype: kind,
        });
    }
    if parts.len() != 6 {
        return Err(StreamError::PartCount {
            what: "cbfToEiger",
            have: parts.len(),
            expected: 6,
        });
    }
    let config = json_part(parts[1], At::new(1, "config"))?;
    let at_image = At::new(2, "dimage");
    let image = json_part(parts[2], at_image)?;
    let kind = htype_of(&image);
    if !kind.starts_with("dimage") || kind.starts_with("dimage_d") {
        return Err(StreamError::UnexpectedHtype {
            at: at_image,
            htype: kind,
        });
    }
    let at_d = At::new(3, "dimage_d");
    let d = json_part(parts[3], at_d)?;
    let kind = htype_of(&d);
    if !kind.starts_with("dimage_d") {
        return Err(StreamError::UnexpectedHtype {
            at: at_d,
            htype: kind,
        });
    }
    let desc = image_desc(&d, parts[4], at_d, 4)?;
    json_part(parts[5], At::new(5, "dconfig"))?;

    let header_series = int_field(&header, "series", -1, at0)?;
    let series = int_field(&image, "series", header_series, at_image)?;
    let frame = int_field(&image, "frame", -1, at_image)?;
    let md5_ok = check_md5(&image, parts[3]); // `TODO-MD5-HASH` in the real captures: None
    let header = Value::Object(header);
    let start = SeriesHeader {
        protocol: Protocol::CbfToEiger,
        series,
        header: header.clone(),
        config: Value::Object(config),
        pixel_mask: None,
    };
    let frame = FrameHeader {
        protocol: Protocol::CbfToEiger,
        series,
        frame,
        shape: desc.shape,
        elem_size: desc.elem_size,
        compression: desc.compression,
        encoding: desc.encoding,
        md5_ok,
        header, // mapping, reporting, master_file travel with each frame
    };
    Ok(vec![
        Parsed::Start(start),
        Parsed::Frame(ParsedFrame {
            header: frame,
            part: 4,
            range: 0..parts[4].len(),
        }),
    ])
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{self, slices};
    use super::super::{detect_protocol, parse_message};
    use super::*;
    use crate::frame::Compression;

    #[test]
    fn ssrl_capture_with_full_size_blobs() {
        let Some(msgs) = testdata::cbf_messages(false) else {
            return;
        };
        let mut frames = Vec::new();
        for msg in &msgs {
            let view = slices(msg);
            assert_eq!(detect_protocol(&view).unwrap(), Protocol::CbfToEiger);
            let events = parse_message(&view, None).unwrap();
            assert_eq!(events.len(), 2);
            let Parsed::Start(s) = &events[0] else {
                panic!()
            };
            assert_eq!(s.protocol, Protocol::CbfToEiger);
            assert_eq!(s.series, 1);
            assert_eq!(s.header["htype"], "cbfToEiger-0.1");
            assert_eq!(s.config.as_object().unwrap().len(), 51);
            assert_eq!(s.config["x_pixels_in_detector"], 4150);
            assert!(s.pixel_mask.is_none());
            let Parsed::Frame(f) = &events[1] else {
                panic!()
            };
            let h = &f.header;
            assert_eq!(h.protocol, Protocol::CbfToEiger);
            assert_eq!(h.series, 1);
            assert_eq!(h.shape, (4371, 4150));
            assert_eq!(h.elem_size, 4);
            assert_eq!(h.compression, Compression::BsLz4);
            assert_eq!(h.encoding, "bs32-lz4<");
            assert_eq!(h.md5_ok, None, "TODO-MD5-HASH is no MD5");
            assert!(h.header["master_file"]
                .as_str()
                .unwrap()
                .ends_with("hdf5_test_0361-000_master.h5"));
            assert_eq!(h.header["mapping"], "");
            assert_eq!(f.part, 4);
            assert_eq!(f.range, 0..msg[4].len());
            frames.push((h.frame, f.range.len()));
        }
        // 1-based and not contiguous; sizes as declared
        assert_eq!(
            frames,
            [
                (1, 5945496),
                (3, 5947896),
                (4, 5943154),
                (5, 5957295),
                (6, 5957604)
            ]
        );
    }

    #[test]
    fn end_and_faults() {
        let end = b"{\"htype\":\"dseries_end-1.0\",\"series\":1}\0".as_slice();
        let events = parse_message(&[end], Some(Protocol::CbfToEiger)).unwrap();
        assert!(matches!(
            events[..],
            [Parsed::End {
                protocol: Protocol::CbfToEiger,
                series: 1
            }]
        ));
        assert!(parse_message(&[end, end], Some(Protocol::CbfToEiger)).is_err());

        let Some(msgs) = testdata::cbf_messages(true) else {
            return;
        };
        let msg = &msgs[0];
        let view = slices(msg);
        assert!(parse_message(&view, None).is_ok());
        // wrong part counts
        let e = parse_message(&view[..5], None).unwrap_err();
        assert_eq!(e.to_string(), "cbfToEiger message has 5 parts, expected 6");
        let mut seven = view.clone();
        seven.push(b"extra");
        assert!(parse_message(&seven, None).is_err());
        // blob size against dimage_d
        let short = &msg[4][..msg[4].len() - 1];
        let mut v = view.clone();
        v[4] = short;
        let e = parse_message(&v, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 4 (blob): 1000 bytes, dimage_d says 1001"
        );
        // swapped parts, truncated JSON parts, garbage
        let mut v = view.clone();
        v.swap(2, 3);
        assert!(matches!(
            parse_message(&v, None),
            Err(StreamError::UnexpectedHtype { .. })
        ));
        for p in [0, 1, 2, 3, 5] {
            let mut m = msg.clone();
            let cut = m[p].len() / 2;
            m[p].truncate(cut);
            assert!(
                parse_message(&slices(&m), Some(Protocol::CbfToEiger)).is_err(),
                "part {p}"
            );
        }
        assert!(parse_message(&[b"\xff\xfe"], Some(Protocol::CbfToEiger)).is_err());
        let e = parse_message(
            &[b"{\"htype\":\"dheader-1.0\"}\0"],
            Some(Protocol::CbfToEiger),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "part 0 (cbfToEiger header): unexpected htype \"dheader-1.0\""
        );
    }
}
