//! Writes a few series with `nxmx::SeriesWriter` so they can be checked by hand with h5py +
//! hdf5plugin (the pixels read back through the HDF5 filters must equal the source arrays).
//!
//! Usage: `cargo run --example nxmx_demo -- OUT_DIR [SHARED_DATA_DIR]`
//!
//! In OUT_DIR: one file set per series, `<name>_ref.bin` (the raw little-endian pixels of all
//! frames, in order) and `manifest.json` (name, dtype, shape, frames, frames per file). With
//! SHARED_DATA_DIR (`/work/shared/data`), the real v1 captures are written too: the EIGER2 1M
//! `lz4<` frames with their own config, and the DLS `bs16-lz4<` frame (reference: the
//! known-good pair, compared by the checking script).

use std::path::{Path, PathBuf};

use _splitter::codec;
use _splitter::frame::{Compression, FrameHeader, Protocol, SeriesHeader};
use _splitter::nxmx::SeriesWriter;
use serde_json::{json, Value};

fn frame(n: i64, shape: (usize, usize), elem_size: usize, compression: Compression) -> FrameHeader {
    FrameHeader {
        protocol: Protocol::V1,
        series: 1,
        frame: n,
        shape,
        elem_size,
        compression,
        encoding: String::new(),
        md5_ok: None,
        header: Value::Null,
    }
}

fn header(config: Value) -> SeriesHeader {
    SeriesHeader {
        protocol: Protocol::V1,
        series: 1,
        header: json!({"htype": "dheader-1.0"}),
        config,
        pixel_mask: None,
    }
}

/// Pseudo-random counts with masked pixels at the top value.
fn pixels(n: usize, ny: usize, nx: usize, elem_size: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (n as u64).wrapping_mul(0x1234_5678_9ABC_DEF1);
    let mut out = Vec::with_capacity(ny * nx * elem_size);
    for i in 0..ny * nx {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let v = if i % 1013 == 5 {
            u64::MAX
        } else if state.is_multiple_of(50) {
            state % 60000
        } else {
            state % 4
        };
        out.extend_from_slice(&v.to_le_bytes()[..elem_size]);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn series(
    out: &Path,
    name: &str,
    config: Value,
    shape: (usize, usize),
    elem_size: usize,
    compression: Compression,
    frames: &[(Vec<u8>, Vec<u8>)],
    per_file: usize,
    manifest: &mut Vec<Value>,
) {
    let first = frame(0, shape, elem_size, compression);
    let mut writer =
        SeriesWriter::create(out, name, &header(config), &first, per_file).expect("create");
    let mut reference = Vec::new();
    for (n, (raw, blob)) in frames.iter().enumerate() {
        writer
            .write_frame(&frame(n as i64, shape, elem_size, compression), blob)
            .expect("write_frame");
        reference.extend_from_slice(raw);
    }
    let summary = writer.finish().expect("finish");
    std::fs::write(out.join(format!("{name}_ref.bin")), &reference).expect("write reference");
    println!(
        "{name}: {} frames, {} bytes, {} data files",
        summary.frames,
        summary.bytes,
        summary.data_files.len()
    );
    let dtype = match elem_size {
        1 => "uint8",
        2 => "uint16",
        _ => "uint32",
    };
    manifest.push(json!({"name": name, "dtype": dtype, "shape": [shape.0, shape.1], "frames": frames.len(), "per_file": per_file}));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(
        args.get(1)
            .expect("usage: nxmx_demo OUT_DIR [SHARED_DATA_DIR]"),
    );
    std::fs::create_dir_all(&out).expect("create OUT_DIR");
    let mut manifest = Vec::new();
    let config = json!({"wavelength": 0.98, "beam_center_x": 120.0, "beam_center_y": 140.0, "detector_distance": 0.2,
                        "x_pixel_size": 7.5e-5, "y_pixel_size": 7.5e-5, "nimages": 5, "ntrigger": 1,
                        "omega_start": 0.0, "omega_increment": 0.1, "description": "Dectris EIGER2 Si 4M"});
    let (ny, nx) = (301, 257);

    for (name, elem_size) in [("bslz4_u8", 1), ("bslz4_u16", 2), ("bslz4_u32", 4)] {
        let frames: Vec<_> = (0..5)
            .map(|n| {
                let raw = pixels(n, ny, nx, elem_size);
                let blob = codec::bslz4_compress(&raw, elem_size, 0).expect("bslz4");
                (raw, blob)
            })
            .collect();
        series(
            &out,
            name,
            config.clone(),
            (ny, nx),
            elem_size,
            Compression::BsLz4,
            &frames,
            2,
            &mut manifest,
        );
    }
    for (name, elem_size) in [("lz4raw_u16", 2), ("lz4raw_u32", 4)] {
        let frames: Vec<_> = (0..5)
            .map(|n| {
                let raw = pixels(n + 10, ny, nx, elem_size);
                let blob = codec::lz4_compress(&raw);
                (raw, blob)
            })
            .collect();
        series(
            &out,
            name,
            config.clone(),
            (ny, nx),
            elem_size,
            Compression::Lz4Raw,
            &frames,
            2,
            &mut manifest,
        );
    }
    // v2 `lz4`: HDF5-LZ4 framing, one block, built here from a raw LZ4 block.
    let frames: Vec<_> = (0..3)
        .map(|n| {
            let raw = pixels(n + 20, ny, nx, 2);
            let block = codec::lz4_compress(&raw);
            let mut blob = (raw.len() as u64).to_be_bytes().to_vec();
            blob.extend_from_slice(&(raw.len() as u32).to_be_bytes());
            blob.extend_from_slice(&(block.len() as u32).to_be_bytes());
            blob.extend_from_slice(&block);
            (raw, blob)
        })
        .collect();
    series(
        &out,
        "lz4hdf5_u16",
        config.clone(),
        (ny, nx),
        2,
        Compression::Lz4Hdf5,
        &frames,
        2,
        &mut manifest,
    );
    let frames: Vec<_> = (0..3)
        .map(|n| (pixels(n + 30, ny, nx, 2), pixels(n + 30, ny, nx, 2)))
        .collect();
    series(
        &out,
        "none_u16",
        config.clone(),
        (ny, nx),
        2,
        Compression::None,
        &frames,
        2,
        &mut manifest,
    );

    if let Some(shared) = args.get(2).map(PathBuf::from) {
        // EIGER2 1M, v1 `lz4<` uint32 1062 x 1028: config part 000002, blobs 000011, 000015, ...
        let capture = shared.join("stream_v1/eiger2_1m_lz4");
        let config: Value = serde_json::from_slice(
            &std::fs::read(capture.join("streamData.000002")).expect("config"),
        )
        .expect("json");
        let (ny, nx) = (1062, 1028);
        let frames: Vec<_> = (0..10)
            .map(|i| {
                let blob = std::fs::read(capture.join(format!("streamData.{:06}", 11 + 4 * i)))
                    .expect("blob");
                let mut raw = vec![0u8; ny * nx * 4];
                codec::lz4_decompress_into(&blob, &mut raw).expect("lz4");
                (raw, blob)
            })
            .collect();
        series(
            &out,
            "real_1m_lz4",
            config,
            (ny, nx),
            4,
            Compression::Lz4Raw,
            &frames,
            4,
            &mut manifest,
        );

        // DLS EIGER2 16M in 4M ROI, v1 `bs16-lz4<` uint16 2162 x 2068: msgpack lists of parts.
        let dls = shared.join("stream_v1/dls_eiger2_16m_roi4m");
        let header_bytes = std::fs::read(dls.join("header")).expect("header");
        let start = header_bytes
            .windows(17)
            .position(|w| w == b"{\"auto_summation\"")
            .expect("config part");
        let end = start
            + header_bytes[start..]
                .iter()
                .position(|&b| b == b'}')
                .expect("config end")
            + 1;
        let config: Value = serde_json::from_slice(&header_bytes[start..end]).expect("json");
        let image = std::fs::read(dls.join("image000044")).expect("image");
        // The blob: msgpack bin32 (0xc6, big-endian length 673061).
        let mut tag = vec![0xc6];
        tag.extend_from_slice(&673061u32.to_be_bytes());
        let at = image
            .windows(5)
            .position(|w| w == tag.as_slice())
            .expect("blob part")
            + 5;
        let blob = image[at..at + 673061].to_vec();
        let mut raw = vec![0u8; 2162 * 2068 * 2];
        codec::bslz4_decompress_into(&blob, &mut raw, 2).expect("bslz4");
        series(
            &out,
            "real_dls_bslz4",
            config,
            (2162, 2068),
            2,
            Compression::BsLz4,
            &[(raw, blob)],
            1000,
            &mut manifest,
        );
    }
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("manifest");
}
