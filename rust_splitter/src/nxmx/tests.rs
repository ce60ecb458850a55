//! The writer's tests: files read back through the HDF5 C API.

use std::ffi::{c_char, c_uint, c_void};
use std::path::{Path, PathBuf};

use hdf5_metno_sys::h5::hsize_t;
use hdf5_metno_sys::h5a::H5Aclose;
use hdf5_metno_sys::h5d::H5Dclose;
use hdf5_metno_sys::h5f::H5Fclose;
use hdf5_metno_sys::h5i::hid_t;
use hdf5_metno_sys::h5p::{H5Pclose, H5P_DEFAULT};
use hdf5_metno_sys::h5s::{H5Sclose, H5S_ALL};
use hdf5_metno_sys::h5t::{H5Tclose, H5T_NATIVE_DOUBLE, H5T_NATIVE_UINT32, H5T_NATIVE_UINT64};
use serde_json::Value;

use crate::frame::{Compression, FrameHeader, SeriesHeader};

use super::h5::*;
use super::*;
use crate::codec;
use crate::frame::Protocol;
use hdf5_metno_sys::h5::haddr_t;
use hdf5_metno_sys::h5a::{H5Aopen, H5Aread};
use hdf5_metno_sys::h5d::{
    H5Dget_chunk_info_by_coord, H5Dget_create_plist, H5Dget_space, H5Dopen2, H5Dread, H5Dread_chunk,
};
use hdf5_metno_sys::h5f::{H5Fopen, H5F_ACC_RDONLY};
use hdf5_metno_sys::h5l::H5Lget_val;
use hdf5_metno_sys::h5p::{H5Pget_chunk, H5Pget_filter2, H5Pget_nfilters};
use hdf5_metno_sys::h5s::{H5Sget_simple_extent_dims, H5Sget_simple_extent_ndims};
use serde_json::json;

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nxmx-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn frame(n: i64, shape: (usize, usize), elem_size: usize, compression: Compression) -> FrameHeader {
    FrameHeader {
        protocol: Protocol::V1,
        series: 7,
        frame: n,
        shape,
        elem_size,
        compression,
        encoding: String::new(),
        md5_ok: None,
        header: Value::Null,
    }
}

fn v1_header() -> SeriesHeader {
    SeriesHeader {
        protocol: Protocol::V1,
        series: 7,
        header: json!({"htype": "dheader-1.0", "series": 7, "header_detail": "all"}),
        config: json!({
            "wavelength": 0.9762458, "beam_center_x": 10.5, "beam_center_y": 6.25,
            "detector_distance": 0.337, "x_pixel_size": 0.000075, "y_pixel_size": 0.000075,
            "count_time": 0.004, "frame_time": 0.0041, "nimages": 5, "ntrigger": 1,
            "countrate_correction_count_cutoff": 18533, "description": "Dectris EIGER2 Si 16M",
            "detector_number": "E-32-0117", "sensor_material": "Si", "sensor_thickness": 0.00045,
            "omega_start": 10.0, "omega_increment": 0.1, "photon_energy": 12700.1,
            "eiger_fw_version": "release-2020.2.5", "bit_depth_image": 16, "bit_depth_readout": 16
        }),
        pixel_mask: None,
    }
}

/// Test pixels: a ramp with some structure, the top value marking masked pixels.
fn pixels(n: usize, ny: usize, nx: usize, elem_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(ny * nx * elem_size);
    for i in 0..ny * nx {
        let v: u64 = if i % 97 == 13 {
            u64::MAX
        } else {
            ((i * 7 + n * 131) % 5000) as u64
        };
        out.extend_from_slice(&v.to_le_bytes()[..elem_size]);
    }
    out
}

struct Ro(hid_t, CloseFn);
impl Drop for Ro {
    fn drop(&mut self) {
        unsafe { (self.1)(self.0) };
    }
}

fn open(path: &Path) -> Ro {
    let _lock = hdf5_metno_sys::LOCK.lock();
    h5_init();
    let name = c_path(path).unwrap();
    let id = unsafe { H5Fopen(name.as_ptr(), H5F_ACC_RDONLY, H5P_DEFAULT) };
    assert!(id >= 0, "cannot open {}", path.display());
    Ro(id, H5Fclose)
}

fn dataset(file: &Ro, path: &str) -> Ro {
    let name = c_name(path).unwrap();
    let id = unsafe { H5Dopen2(file.0, name.as_ptr(), H5P_DEFAULT) };
    assert!(id >= 0, "cannot open dataset {path}: {}", h5_error_detail());
    Ro(id, H5Dclose)
}

fn dims(dset: &Ro) -> Vec<u64> {
    let space = Ro(unsafe { H5Dget_space(dset.0) }, H5Sclose);
    let n = unsafe { H5Sget_simple_extent_ndims(space.0) };
    let mut dims = vec![0; n as usize];
    let mut max = vec![0; n as usize];
    unsafe { H5Sget_simple_extent_dims(space.0, dims.as_mut_ptr(), max.as_mut_ptr()) };
    dims
}

fn chunk(dset: &Ro, n: u64) -> (u32, Vec<u8>) {
    let offset = [n, 0, 0];
    let (mut mask, mut addr, mut size): (c_uint, haddr_t, hsize_t) = (0, 0, 0);
    let ret = unsafe {
        H5Dget_chunk_info_by_coord(dset.0, offset.as_ptr(), &mut mask, &mut addr, &mut size)
    };
    assert!(ret >= 0 && size > 0, "no chunk {n}");
    let mut buf = vec![0u8; size as usize];
    let mut filters: u32 = 0;
    let ret = unsafe {
        H5Dread_chunk(
            dset.0,
            H5P_DEFAULT,
            offset.as_ptr(),
            &mut filters,
            buf.as_mut_ptr() as *mut c_void,
        )
    };
    assert!(ret >= 0, "H5Dread_chunk {n}");
    (filters, buf)
}

/// (filter id, flags, cd_values) of each filter of a dataset.
type Filters = Vec<(i32, u32, Vec<c_uint>)>;

fn filter(dset: &Ro) -> (Vec<hsize_t>, Filters) {
    let dcpl = Ro(unsafe { H5Dget_create_plist(dset.0) }, H5Pclose);
    let mut chunk = [0 as hsize_t; 3];
    let rank = unsafe { H5Pget_chunk(dcpl.0, 3, chunk.as_mut_ptr()) };
    let mut filters = Vec::new();
    for i in 0..unsafe { H5Pget_nfilters(dcpl.0) } {
        let (mut flags, mut n, mut cd, mut cfg) = (0, 8usize, [0 as c_uint; 8], 0);
        let mut name = [0 as c_char; 64];
        let id = unsafe {
            H5Pget_filter2(
                dcpl.0,
                i as c_uint,
                &mut flags,
                &mut n,
                cd.as_mut_ptr(),
                64,
                name.as_mut_ptr(),
                &mut cfg,
            )
        };
        filters.push((id, flags, cd[..n].to_vec()));
    }
    (chunk[..rank.max(0) as usize].to_vec(), filters)
}

fn attr_u64(obj: &Ro, name: &str) -> u64 {
    let cname = c_name(name).unwrap();
    let a = Ro(
        unsafe { H5Aopen(obj.0, cname.as_ptr(), H5P_DEFAULT) },
        H5Aclose,
    );
    assert!(a.0 >= 0, "no attribute {name}");
    let mut v: u64 = 0;
    assert!(unsafe { H5Aread(a.0, *H5T_NATIVE_UINT64, &mut v as *mut u64 as *mut c_void) } >= 0);
    v
}

/// Every element of a dataset, read as `mtype` (a scalar's dims are [], so it reads as one).
fn read_all<T: Copy + Default>(file: &Ro, path: &str, mtype: hid_t) -> Vec<T> {
    let d = dataset(file, path);
    let n: u64 = dims(&d).iter().product();
    let mut v = vec![T::default(); n as usize];
    let ptr = v.as_mut_ptr() as *mut c_void;
    assert!(unsafe { H5Dread(d.0, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptr) } >= 0);
    v
}

fn read_f64s(file: &Ro, path: &str) -> Vec<f64> {
    read_all(file, path, *H5T_NATIVE_DOUBLE)
}

fn read_u32s(file: &Ro, path: &str) -> Vec<u32> {
    read_all(file, path, *H5T_NATIVE_UINT32)
}

fn read_str(file: &Ro, path: &str) -> String {
    use hdf5_metno_sys::h5d::H5Dget_type;
    use hdf5_metno_sys::h5t::H5Tget_size;
    let d = dataset(file, path);
    let t = Ro(unsafe { H5Dget_type(d.0) }, H5Tclose);
    let size = unsafe { H5Tget_size(t.0) };
    let mut buf = vec![0u8; size];
    assert!(
        unsafe {
            H5Dread(
                d.0,
                t.0,
                H5S_ALL,
                H5S_ALL,
                H5P_DEFAULT,
                buf.as_mut_ptr() as *mut c_void,
            )
        } >= 0
    );
    String::from_utf8(buf)
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

fn external_link(file: &Ro, path: &str) -> (String, String) {
    let name = c_name(path).unwrap();
    let mut buf = vec![0u8; 512];
    let ret = unsafe {
        H5Lget_val(
            file.0,
            name.as_ptr(),
            buf.as_mut_ptr() as *mut c_void,
            buf.len(),
            H5P_DEFAULT,
        )
    };
    assert!(ret >= 0, "no link {path}");
    // External link value: a flags byte, then the file name and the object path, NUL-terminated.
    let parts: Vec<String> = buf[1..]
        .split(|b| *b == 0)
        .take(2)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    (parts[0].clone(), parts[1].clone())
}

#[test]
fn nxmx_bslz4_series_over_three_files() {
    let dir = test_dir("bslz4");
    let (ny, nx) = (37, 53);
    let header = v1_header();
    let first = frame(0, (ny, nx), 2, Compression::BsLz4);
    let mut writer = SeriesWriter::create(&dir, "sub/dir/run_1", &header, &first, 2).unwrap();
    assert!(
        dir.join("sub/dir/run_1_master.h5").exists(),
        "master written at the start"
    );
    let mut blobs = Vec::new();
    for n in 0..5 {
        let blob = codec::bslz4_compress(&pixels(n, ny, nx, 2), 2, 0).unwrap();
        writer
            .write_frame(&frame(n as i64, (ny, nx), 2, Compression::BsLz4), &blob)
            .unwrap();
        blobs.push(blob);
    }
    assert_eq!(writer.frames_written(), 5);
    assert_eq!(writer.paths().len(), 4);
    let summary = writer.finish().unwrap();
    assert_eq!(summary.frames, 5);
    assert_eq!(
        summary.bytes,
        blobs.iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(summary.master, dir.join("sub/dir/run_1_master.h5"));
    let names: Vec<PathBuf> = (1..=3)
        .map(|i| dir.join(format!("sub/dir/run_1_data_{i:06}.h5")))
        .collect();
    assert_eq!(summary.data_files, names);
    assert!(!dir.join("sub/dir/run_1_master.h5.tmp").exists());

    for (i, path) in names.iter().enumerate() {
        let f = open(path);
        let d = dataset(&f, "/entry/data/data");
        let n = if i < 2 { 2 } else { 1 };
        assert_eq!(dims(&d), vec![n, ny as u64, nx as u64]);
        let (chunk_dims, filters) = filter(&d);
        assert_eq!(chunk_dims, vec![1, ny as u64, nx as u64]);
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0].0, FILTER_BITSHUFFLE);
        assert_eq!(filters[0].2, vec![0, 2, 2, 0, 2]);
        assert_eq!(attr_u64(&d, "image_nr_low"), 2 * i as u64 + 1);
        assert_eq!(attr_u64(&d, "image_nr_high"), 2 * i as u64 + n);
        for k in 0..n {
            let (mask, bytes) = chunk(&d, k);
            assert_eq!(mask, 0);
            assert_eq!(bytes, blobs[2 * i + k as usize], "file {i} chunk {k}");
        }
    }

    let m = open(&summary.master);
    assert_eq!(read_str(&m, "/entry/definition"), "NXmx");
    assert_eq!(
        read_str(&m, "/entry/instrument/detector/description"),
        "Dectris EIGER2 Si 16M"
    );
    assert_eq!(
        read_f64s(&m, "/entry/instrument/beam/incident_wavelength"),
        vec![0.9762458]
    );
    assert_eq!(
        read_f64s(&m, "/entry/instrument/detector/detector_distance"),
        vec![0.337]
    );
    assert_eq!(
        read_u32s(&m, "/entry/instrument/detector/module/data_size"),
        vec![ny as u32, nx as u32]
    );
    assert_eq!(
        read_u32s(&m, "/entry/instrument/detector/detectorSpecific/nimages"),
        vec![5]
    );
    assert_eq!(
        read_u32s(
            &m,
            "/entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff"
        ),
        vec![18533]
    );
    assert_eq!(
        read_str(
            &m,
            "/entry/instrument/detector/detectorSpecific/compression"
        ),
        "bslz4"
    );
    let mask = read_u32s(&m, "/entry/instrument/detector/detectorSpecific/pixel_mask");
    assert_eq!(mask.len(), ny * nx);
    assert!(mask.iter().all(|&v| v == 0));
    let omega = read_f64s(&m, "/entry/sample/transformations/omega");
    assert_eq!(omega.len(), 5);
    assert!((omega[4] - 10.4).abs() < 1e-9);
    assert_eq!(
        read_str(&m, "/entry/sample/depends_on"),
        "/entry/sample/transformations/omega"
    );
    for i in 1..=3 {
        let link = format!("/entry/data/data_{i:06}");
        assert_eq!(
            external_link(&m, &link),
            (
                format!("run_1_data_{i:06}.h5"),
                "/entry/data/data".to_string()
            )
        );
        // The relative link resolves beside the master, wherever the process runs.
        let d = dataset(&m, &link);
        assert_eq!(dims(&d)[0], if i < 3 { 2 } else { 1 });
    }
    assert!(!m.0.is_negative());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_lz4_raw_gets_the_hdf5_lz4_prefix() {
    let dir = test_dir("lz4");
    let (ny, nx) = (21, 19);
    let mut header = v1_header();
    header.config = json!({"nimages": 3, "compression": "lz4"});
    let mask: Vec<u32> = (0..ny * nx).map(|i| u32::from(i % 11 == 0)).collect();
    header.pixel_mask = Some((ny, nx, mask.clone()));
    let first = frame(0, (ny, nx), 4, Compression::Lz4Raw);
    let mut writer = SeriesWriter::create(&dir, "lz", &header, &first, 2).unwrap();
    let mut blobs = Vec::new();
    for n in 0..3 {
        let blob = codec::lz4_compress(&pixels(n, ny, nx, 4));
        writer
            .write_frame(&frame(n as i64, (ny, nx), 4, Compression::Lz4Raw), &blob)
            .unwrap();
        blobs.push(blob);
    }
    let summary = writer.finish().unwrap();
    assert_eq!(summary.data_files.len(), 2);
    let total = (ny * nx * 4) as u64;
    for (n, blob) in blobs.iter().enumerate() {
        let f = open(&summary.data_files[n / 2]);
        let d = dataset(&f, "/entry/data/data");
        let (_, filters) = filter(&d);
        assert_eq!(filters[0].0, FILTER_LZ4);
        let (_, bytes) = chunk(&d, (n % 2) as u64);
        let mut expected = total.to_be_bytes().to_vec();
        expected.extend_from_slice(&(total as u32).to_be_bytes());
        expected.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        expected.extend_from_slice(blob);
        assert_eq!(bytes, expected);
    }
    let m = open(&summary.master);
    assert_eq!(read_u32s(&m, "/entry/instrument/detector/pixel_mask"), mask);
    assert_eq!(
        read_u32s(&m, "/entry/instrument/detector/detectorSpecific/pixel_mask"),
        mask
    );
    assert_eq!(
        read_str(
            &m,
            "/entry/instrument/detector/detectorSpecific/compression"
        ),
        "lz4"
    );
    // Defaults for what the config lacked.
    assert_eq!(
        read_f64s(&m, "/entry/instrument/beam/incident_wavelength"),
        vec![1.0]
    );
    assert_eq!(
        read_str(&m, "/entry/instrument/detector/sensor_material"),
        "Si"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_v2_keys_and_uncompressed_frames() {
    let dir = test_dir("v2");
    let (ny, nx) = (8, 12);
    let header = SeriesHeader {
        protocol: Protocol::V2,
        series: 3,
        header: Value::Null,
        config: json!({
            "type": "start", "incident_wavelength": 0.918381073013, "beam_center_x": 4.0,
            "beam_center_y": 3.0, "detector_translation": [0.0003, 0.000225, -0.23715919962215962],
            "pixel_size_x": 7.5e-05, "pixel_size_y": 7.5e-05, "number_of_images": 2,
            "saturation_value": 21517, "detector_description": "Dectris EIGER2 Si 16M",
            "goniometer": {"chi": {"increment": 0.0, "start": 30.0}, "phi": {"increment": 0.5, "start": 3.0}},
            "threshold_energy": {"threshold_1": 6750.1}
        }),
        pixel_mask: None,
    };
    let first = frame(0, (ny, nx), 1, Compression::None);
    let mut writer = SeriesWriter::create(&dir, "v2", &header, &first, 10).unwrap();
    writer
        .write_frame(
            &frame(0, (ny, nx), 1, Compression::None),
            &pixels(0, ny, nx, 1),
        )
        .unwrap();
    let summary = writer.finish().unwrap();
    assert_eq!(summary.frames, 1);
    let f = open(&summary.data_files[0]);
    let d = dataset(&f, "/entry/data/data");
    assert!(filter(&d).1.is_empty());
    let (_, bytes) = chunk(&d, 0);
    assert_eq!(bytes, pixels(0, ny, nx, 1));
    let m = open(&summary.master);
    assert_eq!(
        read_f64s(&m, "/entry/instrument/beam/incident_wavelength"),
        vec![0.918381073013]
    );
    assert_eq!(
        read_f64s(&m, "/entry/instrument/detector/detector_distance"),
        vec![0.23715919962215962]
    );
    assert_eq!(
        read_u32s(&m, "/entry/instrument/detector/saturation_value"),
        vec![21517]
    );
    assert_eq!(
        read_f64s(&m, "/entry/instrument/detector/threshold_energy"),
        vec![6750.1]
    );
    // phi moves, so it is the scan axis; only 1 of 2 frames came, so nimages says 1.
    assert_eq!(
        read_str(&m, "/entry/sample/depends_on"),
        "/entry/sample/transformations/phi"
    );
    assert_eq!(
        read_f64s(&m, "/entry/sample/transformations/phi"),
        vec![3.0]
    );
    assert_eq!(
        read_u32s(&m, "/entry/instrument/detector/detectorSpecific/nimages"),
        vec![1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_mismatched_frame_is_an_error_naming_it() {
    let dir = test_dir("mismatch");
    let header = v1_header();
    let first = frame(0, (4, 4), 2, Compression::BsLz4);
    let mut writer = SeriesWriter::create(&dir, "bad", &header, &first, 2).unwrap();
    let blob = codec::bslz4_compress(&pixels(0, 4, 5, 2), 2, 0).unwrap();
    let err = writer
        .write_frame(&frame(17, (4, 5), 2, Compression::BsLz4), &blob)
        .unwrap_err();
    assert!(err.to_string().contains("frame 17"), "{err}");
    let err = writer
        .write_frame(&frame(18, (4, 4), 4, Compression::BsLz4), &blob)
        .unwrap_err();
    assert!(err.to_string().contains("frame 18"), "{err}");
    let err = writer
        .write_frame(&frame(19, (4, 4), 2, Compression::Lz4Raw), &blob)
        .unwrap_err();
    assert!(err.to_string().contains("frame 19"), "{err}");
    // A blob whose header does not fit the frame.
    let err = writer
        .write_frame(&frame(20, (4, 4), 2, Compression::BsLz4), &blob)
        .unwrap_err();
    assert!(err.to_string().contains("frame 20"), "{err}");
    assert_eq!(writer.frames_written(), 0);
    assert!(SeriesWriter::create(&dir, "../escape", &header, &first, 2).is_err());
    assert!(SeriesWriter::create(&dir, "x", &header, &first, 0).is_err());
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_drop_finishes_the_series() {
    let dir = test_dir("drop");
    let (ny, nx) = (6, 7);
    let header = v1_header();
    let first = frame(0, (ny, nx), 2, Compression::BsLz4);
    let mut writer = SeriesWriter::create(&dir, "dropped", &header, &first, 2).unwrap();
    for n in 0..3 {
        let blob = codec::bslz4_compress(&pixels(n, ny, nx, 2), 2, 0).unwrap();
        writer
            .write_frame(&frame(n as i64, (ny, nx), 2, Compression::BsLz4), &blob)
            .unwrap();
    }
    drop(writer);
    let f = open(&dir.join("dropped_data_000002.h5"));
    let d = dataset(&f, "/entry/data/data");
    assert_eq!(attr_u64(&d, "image_nr_low"), 3);
    assert_eq!(attr_u64(&d, "image_nr_high"), 3);
    let m = open(&dir.join("dropped_master.h5"));
    // The final master links only the two files written (the first one announced three).
    assert_eq!(
        read_f64s(&m, "/entry/sample/transformations/omega").len(),
        3
    );
    let name = c_name("/entry/data/data_000003").unwrap();
    assert!(unsafe { hdf5_metno_sys::h5l::H5Lexists(m.0, name.as_ptr(), H5P_DEFAULT) } <= 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_never_replaces_a_file() {
    let dir = test_dir("excl");
    std::fs::create_dir_all(&dir).unwrap();
    let header = v1_header();
    let first = frame(0, (4, 4), 2, Compression::BsLz4);
    // Someone's master under the name: the writer refuses it and leaves it as it was.
    std::fs::write(dir.join("taken_master.h5"), b"not ours").unwrap();
    let err = SeriesWriter::create(&dir, "taken", &header, &first, 2)
        .err()
        .unwrap();
    assert!(err.to_string().contains("taken_master.h5"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("taken_master.h5")).unwrap(),
        b"not ours"
    );
    assert!(!dir.join("taken_master.h5.tmp").exists());
    // A data file under the name: the frame is refused, the file is left as it was.
    std::fs::write(dir.join("d_data_000001.h5"), b"not ours either").unwrap();
    let mut writer = SeriesWriter::create(&dir, "d", &header, &first, 2).unwrap();
    let blob = codec::bslz4_compress(&pixels(0, 4, 4, 2), 2, 0).unwrap();
    assert!(writer.write_frame(&first, &blob).is_err());
    assert!(writer.failed().is_some());
    assert_eq!(
        std::fs::read(dir.join("d_data_000001.h5")).unwrap(),
        b"not ours either"
    );
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nxmx_hdf5_errors_name_file_and_call() {
    let dir = test_dir("err");
    std::fs::create_dir_all(&dir).unwrap();
    // A directory where the data file should go: H5Fcreate fails.
    std::fs::create_dir_all(dir.join("e_data_000001.h5")).unwrap();
    let header = v1_header();
    let first = frame(0, (4, 4), 2, Compression::BsLz4);
    let mut writer = SeriesWriter::create(&dir, "e", &header, &first, 2).unwrap();
    let blob = codec::bslz4_compress(&pixels(0, 4, 4, 2), 2, 0).unwrap();
    let err = writer
        .write_frame(&frame(0, (4, 4), 2, Compression::BsLz4), &blob)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("e_data_000001.h5") && text.contains("H5Fcreate"),
        "{text}"
    );
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pilatus_gaps_are_dxtbx_s_6m_regions() {
    // dxtbx's hard-coded PILATUS 6M mask (FormatPilatusHelpers.pilatus_6M_mask, 1-based inclusive
    // f0, f1, s0, s1): columns 488-494, 982-988, 1476-1482, 1970-1976; rows 196-212, 408-424, ...
    let (ny, nx) = (2527, 2463);
    let mut mask = vec![0u32; ny * nx];
    mask[5 * nx + 7] = 2;
    assert!(meta::mark_pilatus_gaps(&mut mask, ny, nx));
    let (mut gap_col, mut gap_row) = (vec![false; nx], vec![false; ny]);
    for c in [488, 982, 1476, 1970] {
        gap_col[c - 1..c + 6].fill(true);
    }
    for i in 0..11 {
        gap_row[195 + 212 * i..212 + 212 * i].fill(true);
    }
    for y in 0..ny {
        for x in 0..nx {
            let gap = gap_col[x] || gap_row[y];
            let expected = u32::from(gap) | if (y, x) == (5, 7) { 2 } else { 0 };
            assert_eq!(mask[y * nx + x], expected, "pixel ({y}, {x})");
        }
    }
    // Not a grid of PILATUS modules (an EIGER2 1M): unchanged.
    let mut other = vec![0u32; 1062 * 1028];
    assert!(!meta::mark_pilatus_gaps(&mut other, 1062, 1028));
    assert!(other.iter().all(|&v| v == 0));
}
