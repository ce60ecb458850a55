//! NXmx writer: one detector series becomes an Eiger-file-writer-style pair,
//! `<prefix>_master.h5` plus `<prefix>_data_NNNNNN.h5` (NNNNNN from 000001).
//!
//! Data files follow the DECTRIS file writer: `/entry` (NXentry), `/entry/data` (NXdata) and
//! `/entry/data/data` of shape (n, ny, nx), chunks (1, ny, nx), unlimited in the first dimension,
//! with the attributes `image_nr_low` / `image_nr_high` (1-based numbers of the first and last
//! frame in the file). Every file but the last holds exactly `frames_per_file` frames. Each
//! frame's compressed bytes go in unchanged with a direct chunk write (`H5Dwrite_chunk`): a
//! bitshuffle-LZ4 blob is a filter-32008 chunk as is, an HDF5-LZ4 blob a filter-32004 chunk, and
//! a raw LZ4 block becomes one with the 16-byte HDF5-LZ4 prefix.
//!
//! The master file follows the NeXus NXmx application definition as the DECTRIS file writer
//! fills it (`/entry/definition = "NXmx"`, NXinstrument/NXbeam/NXdetector/NXdetector_module with
//! `depends_on` chains, NXsample with its rotation axis), plus the legacy DECTRIS items that
//! other readers look for (`detectorSpecific`, `geometry`, `sample/goniometer`). `/entry/data`
//! holds external links `data_NNNNNN` -> `<prefix>_data_NNNNNN.h5:/entry/data/data` with
//! relative file names, so the set can be moved. The master is written when the series starts
//! (linking the data files the series is expected to fill) and rewritten at the end.
//!
//! Only the raw HDF5 C API (hdf5-metno-sys, linked to the system libhdf5) is used.

use std::cell::Cell;
use std::ffi::{c_char, c_uint, c_void, CStr, CString};
use std::path::{Component, Path, PathBuf};
use std::sync::Once;

use hdf5_metno_sys::h5::{herr_t, hsize_t, H5dont_atexit, H5open};
use hdf5_metno_sys::h5a::{H5Aclose, H5Acreate2, H5Awrite};
use hdf5_metno_sys::h5d::{H5Dclose, H5Dcreate2, H5Dset_extent, H5Dwrite, H5Dwrite_chunk};
use hdf5_metno_sys::h5e::{
    H5E_error2_t, H5Eclear2, H5Eset_auto2, H5Ewalk2, H5E_DEFAULT, H5E_WALK_DOWNWARD,
};
use hdf5_metno_sys::h5f::{H5F_scope_t, H5Fclose, H5Fcreate, H5Fflush, H5F_ACC_EXCL};
use hdf5_metno_sys::h5g::{H5Gclose, H5Gcreate2};
use hdf5_metno_sys::h5i::hid_t;
use hdf5_metno_sys::h5l::{H5Lcreate_external, H5Lcreate_hard};
use hdf5_metno_sys::h5p::{
    H5Pclose, H5Pcreate, H5Pset_chunk, H5Pset_deflate, H5Pset_fill_value, H5Pset_filter,
    H5P_CLS_DATASET_CREATE, H5P_DEFAULT,
};
use hdf5_metno_sys::h5s::{
    H5Sclose, H5Screate, H5Screate_simple, H5S_ALL, H5S_SCALAR, H5S_UNLIMITED,
};
use hdf5_metno_sys::h5t::{
    H5Tclose, H5Tcopy, H5Tset_size, H5Tset_strpad, H5T_C_S1, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE,
    H5T_NATIVE_INT32, H5T_NATIVE_UINT32, H5T_NATIVE_UINT64, H5T_STD_I32LE, H5T_STD_U16LE,
    H5T_STD_U32LE, H5T_STD_U64LE, H5T_STD_U8LE, H5T_STR_NULLPAD,
};
use hdf5_metno_sys::h5z::{H5Z_filter_t, H5Zfilter_avail, H5Z_FILTER_DEFLATE, H5Z_FLAG_OPTIONAL};
use serde_json::Value;
use thiserror::Error;

use crate::frame::{Compression, FrameHeader, SeriesHeader};
use crate::geometry::{DetectorKind, Geometry, Keys, EV_ANGSTROM};

/// HDF5 filter id of bitshuffle (registered with The HDF Group by K. Masui).
pub const FILTER_BITSHUFFLE: H5Z_filter_t = 32008;
/// HDF5 filter id of LZ4 (registered with The HDF Group, "HDF5-LZ4").
pub const FILTER_LZ4: H5Z_filter_t = 32004;

#[derive(Debug, Error)]
pub enum NxmxError {
    /// An HDF5 call failed: the file, the call (with the object it was made on) and the messages
    /// HDF5 left on its error stack (outermost; innermost).
    #[error("{}: {call} failed: {detail}", .file.display())]
    Hdf5 {
        file: PathBuf,
        call: String,
        detail: String,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A frame that cannot go into the series' data set.
    #[error("series {series} frame {frame}: {reason}")]
    Frame {
        series: i64,
        frame: i64,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What a finished series left on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub master: PathBuf,
    pub data_files: Vec<PathBuf>,
    pub frames: usize,
    /// Chunk bytes written to the data files (blobs, plus the LZ4 prefixes added to raw LZ4 blocks).
    pub bytes: u64,
}

/// What `SeriesWriter::close` left: the summary (frames readable on disk) and the first error.
#[derive(Debug)]
pub struct Closed {
    pub summary: WriteSummary,
    pub error: Option<NxmxError>,
}

type Result<T> = std::result::Result<T, NxmxError>;

// ------------------------------------------------------------------------------------------------
// HDF5 plumbing

static H5_OPEN: Once = Once::new();
thread_local! {
    static ERR_PRINT_OFF: Cell<bool> = const { Cell::new(false) };
}

/// The linked HDF5 library's version ("1.14.5").
pub fn hdf5_version() -> String {
    let (mut major, mut minor, mut release) = (0, 0, 0);
    let _lock = hdf5_metno_sys::LOCK.lock();
    h5_init();
    // SAFETY: three out-pointers to live integers.
    unsafe { hdf5_metno_sys::h5::H5get_libversion(&mut major, &mut minor, &mut release) };
    format!("{major}.{minor}.{release}")
}

/// Open the library once per process and, once per thread (a thread-safe libhdf5 keeps one error
/// stack per thread), turn off HDF5's automatic printing of error stacks: errors are returned.
///
/// Without HDF5's exit handler: the writer closes every file itself, and a file whose close failed
/// (a full disk) stays registered in the library, whose exit handler then crashed closing it again
/// (a segfault at exit after a disk error).
fn h5_init() {
    H5_OPEN.call_once(|| unsafe {
        H5dont_atexit();
        H5open();
    });
    ERR_PRINT_OFF.with(|off| {
        if !off.get() {
            unsafe { H5Eset_auto2(H5E_DEFAULT, None, std::ptr::null_mut()) };
            off.set(true);
        }
    });
}

unsafe extern "C" fn collect_error(
    _n: c_uint,
    err: *const H5E_error2_t,
    data: *mut c_void,
) -> herr_t {
    let out = &mut *(data as *mut Vec<String>);
    if let Some(err) = err.as_ref() {
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        out.push(format!("{}: {}", text(err.func_name), text(err.desc)));
    }
    0
}

/// The messages on this thread's HDF5 error stack (which is then cleared).
fn h5_error_detail() -> String {
    let mut messages: Vec<String> = Vec::new();
    unsafe {
        H5Ewalk2(
            H5E_DEFAULT,
            H5E_WALK_DOWNWARD,
            Some(collect_error),
            &mut messages as *mut Vec<String> as *mut c_void,
        );
        H5Eclear2(H5E_DEFAULT);
    }
    let mut text = match messages.len() {
        0 => "no HDF5 error message".to_string(),
        1 => messages.remove(0),
        n => format!("{}; {}", messages[0], messages[n - 1]),
    };
    // A failed write's message goes on with buffer addresses and byte counts after the errno.
    if let Some(cut) = text.find(", buf = ") {
        text.truncate(cut);
    }
    one_line(&text)
}

/// HDF5's messages may span lines (its write errors embed a ctime() date with a newline): one
/// line, whitespace collapsed, so an error is one line in a log.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

type CloseFn = unsafe extern "C" fn(hid_t) -> herr_t;

/// An open HDF5 identifier, closed when dropped.
struct Handle {
    id: hid_t,
    close: CloseFn,
}

impl Handle {
    /// Close now and report a failure (files: this is where the last metadata is flushed).
    fn close_checked(self, file: &Path, call: &str) -> Result<()> {
        let (id, close) = (self.id, self.close);
        std::mem::forget(self);
        if unsafe { close(id) } < 0 {
            return Err(h5_error(file, call.to_string()));
        }
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe { (self.close)(self.id) };
    }
}

fn h5_error(file: &Path, call: String) -> NxmxError {
    NxmxError::Hdf5 {
        file: file.to_path_buf(),
        call,
        detail: h5_error_detail(),
    }
}

fn c_name(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| NxmxError::Invalid(format!("name with a NUL byte: {s:?}")))
}

fn c_path(p: &Path) -> Result<CString> {
    let s = p
        .to_str()
        .ok_or_else(|| NxmxError::Invalid(format!("path is not UTF-8: {}", p.display())))?;
    c_name(s)
}

/// Writes objects into one HDF5 file; every object is named by its absolute path in the file,
/// so errors name the file, the call and the object.
struct H5Writer<'a> {
    path: &'a Path,
    file: hid_t,
}

impl H5Writer<'_> {
    fn check_id(&self, id: hid_t, close: CloseFn, call: impl FnOnce() -> String) -> Result<Handle> {
        if id < 0 {
            Err(h5_error(self.path, call()))
        } else {
            Ok(Handle { id, close })
        }
    }

    fn check(&self, ret: herr_t, call: impl FnOnce() -> String) -> Result<()> {
        if ret < 0 {
            Err(h5_error(self.path, call()))
        } else {
            Ok(())
        }
    }

    fn space(
        &self,
        dims: Option<&[hsize_t]>,
        max: Option<&[hsize_t]>,
        what: &str,
    ) -> Result<Handle> {
        match dims {
            None => self.check_id(unsafe { H5Screate(H5S_SCALAR) }, H5Sclose, || {
                format!("H5Screate({what})")
            }),
            Some(dims) => {
                let max_ptr = max.map_or(std::ptr::null(), |m| m.as_ptr());
                let id = unsafe { H5Screate_simple(dims.len() as i32, dims.as_ptr(), max_ptr) };
                self.check_id(id, H5Sclose, || format!("H5Screate_simple({what})"))
            }
        }
    }

    /// A fixed-length, NUL-padded ASCII string type of `len` bytes (what h5py writes for `bytes`).
    fn string_type(&self, len: usize, what: &str) -> Result<Handle> {
        let t = self.check_id(unsafe { H5Tcopy(*H5T_C_S1) }, H5Tclose, || {
            format!("H5Tcopy({what})")
        })?;
        self.check(unsafe { H5Tset_size(t.id, len.max(1)) }, || {
            format!("H5Tset_size({what})")
        })?;
        self.check(unsafe { H5Tset_strpad(t.id, H5T_STR_NULLPAD) }, || {
            format!("H5Tset_strpad({what})")
        })?;
        Ok(t)
    }

    /// A group with its NeXus class in the `NX_class` attribute.
    fn group(&self, path: &str, nx_class: &str) -> Result<()> {
        let name = c_name(path)?;
        let g = unsafe {
            H5Gcreate2(
                self.file,
                name.as_ptr(),
                H5P_DEFAULT,
                H5P_DEFAULT,
                H5P_DEFAULT,
            )
        };
        let g = self.check_id(g, H5Gclose, || format!("H5Gcreate2({path})"))?;
        self.attr_str(g.id, path, "NX_class", nx_class)
    }

    #[allow(clippy::too_many_arguments)]
    fn attr_raw(
        &self,
        obj: hid_t,
        obj_path: &str,
        name: &str,
        ftype: hid_t,
        mtype: hid_t,
        dims: Option<&[hsize_t]>,
        data: *const c_void,
    ) -> Result<()> {
        let what = format!("{obj_path}@{name}");
        let space = self.space(dims, None, &what)?;
        let cname = c_name(name)?;
        let a = unsafe {
            H5Acreate2(
                obj,
                cname.as_ptr(),
                ftype,
                space.id,
                H5P_DEFAULT,
                H5P_DEFAULT,
            )
        };
        let a = self.check_id(a, H5Aclose, || format!("H5Acreate2({what})"))?;
        self.check(unsafe { H5Awrite(a.id, mtype, data) }, || {
            format!("H5Awrite({what})")
        })
    }

    fn attr_str(&self, obj: hid_t, obj_path: &str, name: &str, value: &str) -> Result<()> {
        let t = self.string_type(value.len(), &format!("{obj_path}@{name}"))?;
        let mut bytes = value.as_bytes().to_vec();
        bytes.resize(value.len().max(1), 0);
        self.attr_raw(
            obj,
            obj_path,
            name,
            t.id,
            t.id,
            None,
            bytes.as_ptr() as *const c_void,
        )
    }

    fn attr_f64s(&self, obj: hid_t, obj_path: &str, name: &str, values: &[f64]) -> Result<()> {
        let dims = [values.len() as hsize_t];
        self.attr_raw(
            obj,
            obj_path,
            name,
            *H5T_IEEE_F64LE,
            *H5T_NATIVE_DOUBLE,
            Some(&dims),
            values.as_ptr() as *const c_void,
        )
    }

    fn attr_u64(&self, obj: hid_t, obj_path: &str, name: &str, value: u64) -> Result<()> {
        self.attr_raw(
            obj,
            obj_path,
            name,
            *H5T_STD_U64LE,
            *H5T_NATIVE_UINT64,
            None,
            &value as *const u64 as *const c_void,
        )
    }

    /// A contiguous dataset (scalar when `dims` is None) holding `data`.
    fn dataset(
        &self,
        path: &str,
        ftype: hid_t,
        mtype: hid_t,
        dims: Option<&[hsize_t]>,
        data: *const c_void,
    ) -> Result<Handle> {
        let space = self.space(dims, None, path)?;
        let name = c_name(path)?;
        let d = unsafe {
            H5Dcreate2(
                self.file,
                name.as_ptr(),
                ftype,
                space.id,
                H5P_DEFAULT,
                H5P_DEFAULT,
                H5P_DEFAULT,
            )
        };
        let d = self.check_id(d, H5Dclose, || format!("H5Dcreate2({path})"))?;
        if dims.is_none_or(|d| d.iter().all(|&n| n > 0)) {
            self.check(
                unsafe { H5Dwrite(d.id, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) },
                || format!("H5Dwrite({path})"),
            )?;
        }
        Ok(d)
    }

    fn str(&self, path: &str, value: &str) -> Result<Handle> {
        let t = self.string_type(value.len(), path)?;
        let mut bytes = value.as_bytes().to_vec();
        bytes.resize(value.len().max(1), 0);
        self.dataset(path, t.id, t.id, None, bytes.as_ptr() as *const c_void)
    }

    /// A scalar float64, with its `units` attribute when given.
    fn f64(&self, path: &str, value: f64, units: Option<&str>) -> Result<Handle> {
        let d = self.dataset(
            path,
            *H5T_IEEE_F64LE,
            *H5T_NATIVE_DOUBLE,
            None,
            &value as *const f64 as *const c_void,
        )?;
        if let Some(units) = units {
            self.attr_str(d.id, path, "units", units)?;
        }
        Ok(d)
    }

    fn f64s(&self, path: &str, values: &[f64], units: Option<&str>) -> Result<Handle> {
        let dims = [values.len() as hsize_t];
        let d = self.dataset(
            path,
            *H5T_IEEE_F64LE,
            *H5T_NATIVE_DOUBLE,
            Some(&dims),
            values.as_ptr() as *const c_void,
        )?;
        if let Some(units) = units {
            self.attr_str(d.id, path, "units", units)?;
        }
        Ok(d)
    }

    fn i32(&self, path: &str, value: i32) -> Result<()> {
        self.dataset(
            path,
            *H5T_STD_I32LE,
            *H5T_NATIVE_INT32,
            None,
            &value as *const i32 as *const c_void,
        )
        .map(drop)
    }

    fn u32(&self, path: &str, value: u32) -> Result<()> {
        self.dataset(
            path,
            *H5T_STD_U32LE,
            *H5T_NATIVE_UINT32,
            None,
            &value as *const u32 as *const c_void,
        )
        .map(drop)
    }

    fn u32s(&self, path: &str, values: &[u32]) -> Result<()> {
        let dims = [values.len() as hsize_t];
        self.dataset(
            path,
            *H5T_STD_U32LE,
            *H5T_NATIVE_UINT32,
            Some(&dims),
            values.as_ptr() as *const c_void,
        )
        .map(drop)
    }

    /// An NXtransformations axis: the value(s), then `transformation_type`, `units`, `vector`,
    /// `offset` and `depends_on` (NXmx: "." ends a chain).
    #[allow(clippy::too_many_arguments)]
    fn axis(
        &self,
        path: &str,
        values: &[f64],
        kind: &str,
        units: &str,
        vector: [f64; 3],
        offset: [f64; 3],
        depends_on: &str,
    ) -> Result<()> {
        let d = if values.len() == 1 && kind == "translation" {
            self.f64(path, values[0], Some(units))?
        } else {
            self.f64s(path, values, Some(units))?
        };
        self.attr_str(d.id, path, "transformation_type", kind)?;
        self.attr_f64s(d.id, path, "vector", &vector)?;
        self.attr_f64s(d.id, path, "offset", &offset)?;
        self.attr_str(d.id, path, "depends_on", depends_on)
    }

    /// A 2-D uint32 pixel mask, chunked and deflated when the library has deflate. With no data
    /// no chunk is written and every pixel reads as the fill value 0 (nothing masked).
    fn mask(&self, path: &str, ny: usize, nx: usize, data: Option<&[u32]>) -> Result<()> {
        let dims = [ny as hsize_t, nx as hsize_t];
        let space = self.space(Some(&dims), None, path)?;
        let dcpl = self.check_id(
            unsafe { H5Pcreate(*H5P_CLS_DATASET_CREATE) },
            H5Pclose,
            || format!("H5Pcreate({path})"),
        )?;
        let rows = (262_144 / nx.max(1)).clamp(1, ny.max(1));
        let chunk = [rows as hsize_t, nx.max(1) as hsize_t];
        self.check(unsafe { H5Pset_chunk(dcpl.id, 2, chunk.as_ptr()) }, || {
            format!("H5Pset_chunk({path})")
        })?;
        let zero = 0u32;
        let ret = unsafe {
            H5Pset_fill_value(
                dcpl.id,
                *H5T_NATIVE_UINT32,
                &zero as *const u32 as *const c_void,
            )
        };
        self.check(ret, || format!("H5Pset_fill_value({path})"))?;
        if unsafe { H5Zfilter_avail(H5Z_FILTER_DEFLATE) } > 0 {
            self.check(unsafe { H5Pset_deflate(dcpl.id, 4) }, || {
                format!("H5Pset_deflate({path})")
            })?;
        }
        let name = c_name(path)?;
        let d = unsafe {
            H5Dcreate2(
                self.file,
                name.as_ptr(),
                *H5T_STD_U32LE,
                space.id,
                H5P_DEFAULT,
                dcpl.id,
                H5P_DEFAULT,
            )
        };
        let d = self.check_id(d, H5Dclose, || format!("H5Dcreate2({path})"))?;
        if let Some(data) = data {
            let ret = unsafe {
                H5Dwrite(
                    d.id,
                    *H5T_NATIVE_UINT32,
                    H5S_ALL,
                    H5S_ALL,
                    H5P_DEFAULT,
                    data.as_ptr() as *const c_void,
                )
            };
            self.check(ret, || format!("H5Dwrite({path})"))?;
        }
        Ok(())
    }

    fn external_link(&self, link: &str, target_file: &str, target_path: &str) -> Result<()> {
        let (l, f, p) = (c_name(link)?, c_name(target_file)?, c_name(target_path)?);
        let ret = unsafe {
            H5Lcreate_external(
                f.as_ptr(),
                p.as_ptr(),
                self.file,
                l.as_ptr(),
                H5P_DEFAULT,
                H5P_DEFAULT,
            )
        };
        self.check(ret, || {
            format!("H5Lcreate_external({link} -> {target_file}:{target_path})")
        })
    }

    fn hard_link(&self, link: &str, target: &str) -> Result<()> {
        let (l, t) = (c_name(link)?, c_name(target)?);
        let ret = unsafe {
            H5Lcreate_hard(
                self.file,
                t.as_ptr(),
                self.file,
                l.as_ptr(),
                H5P_DEFAULT,
                H5P_DEFAULT,
            )
        };
        self.check(ret, || format!("H5Lcreate_hard({link} -> {target})"))
    }
}

/// Create a new file; never truncate one that exists (the disk is sacred: an existing file is an
/// error, the caller picks names that do not exist).
fn create_file(path: &Path) -> Result<Handle> {
    let name = c_path(path)?;
    let existed = path.symlink_metadata().is_ok();
    let id = unsafe { H5Fcreate(name.as_ptr(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT) };
    if id < 0 {
        let err = h5_error(path, "H5Fcreate".to_string());
        // A file this call made before HDF5 failed (a full disk) is removed; one that was there
        // (EEXIST, errno 17) is not ours.
        if !existed && !err.to_string().contains("errno = 17") {
            let _ = std::fs::remove_file(path);
        }
        return Err(err);
    }
    Ok(Handle {
        id,
        close: H5Fclose,
    })
}

// ------------------------------------------------------------------------------------------------
// Detector metadata: v1 config keys, v2 start-message keys, cbfToEiger config keys. The geometry
// (wavelength, distance, beam centre, pixels, sensor, axes, two-theta) is `crate::geometry`'s;
// the rest is what only the master file needs.

/// Everything the master file says about the detector and the experiment, resolved once from
/// the series header with defaults for what is missing (a missing key never fails the write).
#[derive(Debug, Clone)]
struct Meta {
    geometry: Geometry,
    /// The wavelength written (the geometry's, else a placeholder the writer says it used).
    wavelength: f64,
    photon_energy: f64,
    /// Beam centre (px), distance (m), pixel size (m), sensor thickness (m) and material as
    /// written: the geometry's, with placeholders where it has none (said once on stderr).
    beam_center: (f64, f64),
    distance: f64,
    pixel_size: (f64, f64),
    count_time: f64,
    frame_time: f64,
    sensor_material: String,
    sensor_thickness: f64,
    description: String,
    detector_number: String,
    bit_depth_image: i32,
    bit_depth_readout: i32,
    nimages: u64,
    ntrigger: u64,
    count_cutoff: u64,
    saturation_value: Option<u64>,
    countrate_correction_applied: bool,
    flatfield_correction_applied: Option<bool>,
    pixel_mask_applied: Option<bool>,
    virtual_pixel_correction_applied: Option<bool>,
    threshold_energy: Option<f64>,
    detector_readout_time: Option<f64>,
    collection_date: Option<String>,
    /// detectorSpecific strings passed through when present (eiger_fw_version, ...).
    specific_strings: Vec<(&'static str, String)>,
    number_of_excluded_pixels: Option<u64>,
}

impl Meta {
    fn from_header(header: &SeriesHeader, first: &FrameHeader) -> Meta {
        let keys = Keys(vec![&header.config, &header.header]);
        let (ny, nx) = first.shape;
        let geometry = header.geometry(ny, nx);
        let g = &geometry;
        let panel = &g.panels[0];

        // A master file must say something for these; a placeholder, said once per series
        // (readers of the served geometry see them in `missing`).
        let mut placeholders = Vec::new();
        let wavelength = g.wavelength.unwrap_or_else(|| {
            placeholders.push("wavelength 1 A");
            1.0
        });
        let distance = g.distance.map(|mm| mm / 1000.0).unwrap_or_else(|| {
            placeholders.push("distance 100 mm");
            0.1
        });
        let beam_center = g.header_beam_center.map_or_else(
            || {
                placeholders.push("beam centre at the frame's centre");
                (nx as f64 / 2.0, ny as f64 / 2.0)
            },
            |[x, y]| (x, y),
        );
        let pixel_size = if g.missing.contains(&"pixel_size") {
            placeholders.push("pixel size 75 um");
            (75e-6, 75e-6)
        } else {
            (panel.pixel_size[0] / 1000.0, panel.pixel_size[1] / 1000.0)
        };
        let sensor_material = if panel.material.is_empty() {
            placeholders.push("sensor material Si");
            "Si".to_string()
        } else {
            panel.material.clone()
        };
        let sensor_thickness = if panel.thickness > 0.0 {
            panel.thickness / 1000.0
        } else {
            placeholders.push("sensor thickness 450 um");
            450e-6
        };
        if !placeholders.is_empty() {
            eprintln!(
                "nxmx: series {}: the header lacks {}; the master file says {}",
                header.series,
                if g.missing.is_empty() {
                    "sensor details".to_string()
                } else {
                    g.missing.join(", ")
                },
                placeholders.join(", ")
            );
        }
        let energy = keys
            .f64(&["photon_energy", "incident_energy"])
            .filter(|e| *e > 0.0);
        let photon_energy = energy.unwrap_or(EV_ANGSTROM / wavelength);

        let bit_depth_image = keys
            .u64(&["bit_depth_image"])
            .map_or(8 * first.elem_size as i32, |b| b as i32);
        // DIALS picks its EIGER file-writer reader by detectorSpecific/eiger_fw_version
        // (FormatNXmxEigerFilewriter.understand), which then refuses any module size that is not
        // an EIGER's ("Unknown Eiger module size"): only EIGERs keep it; other detectors are read
        // by the generic NXmx reader (FormatNXmx).
        let fw_version = keys
            .str(&["eiger_fw_version"])
            .filter(|_| g.kind == DetectorKind::Eiger);
        // The EIGER reader then takes bit_depth_image; other readers mask 2^bit_depth_readout-1
        // and -2, which must be the top values of the stored pixels, so without a firmware
        // version use the image depth.
        let bit_depth_readout = match (&fw_version, keys.u64(&["bit_depth_readout"])) {
            (Some(_), Some(b)) => b as i32,
            _ => bit_depth_image,
        };
        // The trusted maximum: the geometry's (saturation_value, else the count-rate cutoff).
        let saturation_value = g.count_cutoff;
        let count_cutoff = keys
            .u64(&["countrate_correction_count_cutoff"])
            .or(saturation_value)
            .unwrap_or_else(|| {
                // Below the two top values that mark masked pixels.
                (1u64 << bit_depth_image.clamp(8, 31)) - 3
            });
        let threshold_energy = keys.f64(&["threshold_energy"]).or_else(|| {
            // v2: a map channel -> energy.
            let map = keys.get(&["threshold_energy"])?.as_object()?;
            map.get("threshold_1")
                .or_else(|| map.values().next())
                .and_then(Value::as_f64)
        });

        let mut specific_strings = Vec::new();
        if let Some(v) = fw_version {
            specific_strings.push(("eiger_fw_version", v));
        }
        for (name, keys_) in [
            ("software_version", &["software_version"][..]),
            ("trigger_mode", &["trigger_mode"][..]),
            ("roi_mode", &["roi_mode"][..]),
            ("calibration_type", &["calibration_type"][..]),
            ("series_unique_id", &["series_unique_id"][..]),
        ] {
            if let Some(v) = keys.str(keys_) {
                specific_strings.push((name, v));
            }
        }

        let (count_time, frame_time) = (g.count_time, g.frame_time);
        Meta {
            wavelength,
            photon_energy,
            beam_center,
            distance,
            pixel_size,
            count_time: count_time.or(frame_time).unwrap_or(0.0),
            frame_time: frame_time.or(count_time).unwrap_or(0.0),
            sensor_material,
            sensor_thickness,
            description: if g.description.is_empty() {
                "unknown".into()
            } else {
                g.description.clone()
            },
            detector_number: g.detector_number.clone(),
            bit_depth_image,
            bit_depth_readout,
            nimages: keys.u64(&["nimages", "number_of_images"]).unwrap_or(0),
            ntrigger: keys
                .u64(&["ntrigger", "number_of_triggers", "ntriggers"])
                .unwrap_or(1)
                .max(1),
            count_cutoff,
            saturation_value,
            countrate_correction_applied: keys
                .flag(&[
                    "countrate_correction_applied",
                    "countrate_correction_enabled",
                ])
                .unwrap_or(false),
            flatfield_correction_applied: keys
                .flag(&["flatfield_correction_applied", "flatfield_enabled"]),
            pixel_mask_applied: keys.flag(&["pixel_mask_applied", "pixel_mask_enabled"]),
            virtual_pixel_correction_applied: keys.flag(&[
                "virtual_pixel_correction_applied",
                "virtual_pixel_interpolation_enabled",
            ]),
            threshold_energy,
            detector_readout_time: keys.f64(&["detector_readout_time"]),
            collection_date: keys.str(&["data_collection_date", "arm_date", "series_date"]),
            specific_strings,
            number_of_excluded_pixels: keys.u64(&["number_of_excluded_pixels"]),
            geometry,
        }
    }

    /// Frames the detector announced: nimages x ntrigger (0 when unknown).
    fn expected_frames(&self) -> u64 {
        self.nimages.saturating_mul(self.ntrigger)
    }

    /// What the master file links and sizes before the frames arrive: the announcement, capped so
    /// that a header announcing absurdly many frames (10^15) cannot stall the writer building
    /// links and angle arrays for them; a longer series extends the master as its files open.
    fn announced_frames(&self) -> u64 {
        self.expected_frames().min(MAX_ANNOUNCED_FRAMES)
    }
}

/// The most frames a series' first master file is built for (see `announced_frames`).
const MAX_ANNOUNCED_FRAMES: u64 = 1_000_000;
// ------------------------------------------------------------------------------------------------
// The writer

/// One open data file.
struct DataFile {
    path: PathBuf,
    // Declared before `file` so a drop closes the dataset first.
    dset: Handle,
    file: Handle,
    /// 0-based position in the series of the file's first frame.
    first: usize,
    count: usize,
}

/// Writes one series to `<prefix>_master.h5` + `<prefix>_data_NNNNNN.h5`.
pub struct SeriesWriter {
    series: i64,
    master: PathBuf,
    /// `<dir>/<prefix>`: data files are `<base>_data_NNNNNN.h5`.
    base: PathBuf,
    /// The prefix's last component, for the master's relative external links.
    base_name: String,
    shape: (usize, usize),
    elem_size: usize,
    compression: Compression,
    frames_per_file: usize,
    meta: Meta,
    /// The pixel mask when one came with the series and fits the frames.
    pixel_mask: Option<Vec<u32>>,
    current: Option<DataFile>,
    data_files: Vec<PathBuf>,
    /// Data files the master on disk links to.
    linked: usize,
    frames: usize,
    bytes: u64,
    /// For raw LZ4 blocks: the prefixed chunk.
    scratch: Vec<u8>,
    finished: bool,
    /// A write, flush or close failed: no more writes; at the end only closed files count.
    failed: Option<String>,
    /// Frames in data files that could not be closed cleanly (not counted as readable).
    lost: usize,
    /// The last data file could not be closed cleanly.
    last_file_broken: bool,
    /// The final master (files, frames) that could not be written.
    master_pending: Option<(usize, usize)>,
    /// Frames written since the open data file's metadata last reached the disk, and when that was.
    unflushed: usize,
    flushed_at: std::time::Instant,
}

/// How often an open data file's metadata (its extent, its chunk index) is flushed, so that a
/// reader opening the series while it is written (the GUI's frame view) sees the frames so far.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl SeriesWriter {
    /// Start a series: checks the frame layout, creates the directories and writes a first master
    /// file (so a crash still leaves a readable set). The first data file is created with the
    /// first frame. `prefix` may contain `/`-separated subfolders under `dir`.
    pub fn create(
        dir: &Path,
        prefix: &str,
        header: &SeriesHeader,
        first: &FrameHeader,
        frames_per_file: usize,
    ) -> Result<SeriesWriter> {
        let rel = Path::new(prefix);
        let base_name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if prefix.is_empty()
            || prefix.ends_with('/')
            || base_name.is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(NxmxError::Invalid(format!(
                "file prefix {prefix:?} must be a relative path without '..' ending in a file name"
            )));
        }
        if frames_per_file == 0 {
            return Err(NxmxError::Invalid(
                "frames_per_file must be at least 1".to_string(),
            ));
        }
        let (ny, nx) = first.shape;
        if ny == 0 || nx == 0 {
            return Err(NxmxError::Frame {
                series: first.series,
                frame: first.frame,
                reason: format!("empty frame shape {ny}x{nx}"),
            });
        }
        if ![1, 2, 4].contains(&first.elem_size) {
            return Err(NxmxError::Frame {
                series: first.series,
                frame: first.frame,
                reason: format!(
                    "element size {} not supported (1, 2 or 4 bytes)",
                    first.elem_size
                ),
            });
        }
        let base = dir.join(rel);
        let master = PathBuf::from(format!("{}_master.h5", base.display()));
        if let Some(parent) = master.parent() {
            std::fs::create_dir_all(parent).map_err(|source| NxmxError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let pixel_mask = match &header.pixel_mask {
            Some((rows, cols, mask)) if (*rows, *cols) == (ny, nx) && mask.len() == ny * nx => {
                Some(mask.clone())
            }
            // A mask of another shape cannot describe these frames: left out.
            _ => None,
        };
        let meta = Meta::from_header(header, first);
        let mut writer = SeriesWriter {
            series: header.series,
            master,
            base_name: base_name.to_string(),
            base,
            shape: (ny, nx),
            elem_size: first.elem_size,
            compression: first.compression,
            frames_per_file,
            meta,
            pixel_mask,
            current: None,
            data_files: Vec::new(),
            linked: 0,
            frames: 0,
            bytes: 0,
            scratch: Vec::new(),
            finished: false,
            failed: None,
            lost: 0,
            last_file_broken: false,
            master_pending: None,
            unflushed: 0,
            flushed_at: std::time::Instant::now(),
        };
        let expected = writer.meta.announced_frames() as usize;
        let files = expected.div_ceil(frames_per_file).max(1);
        {
            let _lock = hdf5_metno_sys::LOCK.lock();
            h5_init();
            writer.write_master(files, expected, false)?;
        }
        // Nothing to finish if the first master could not be written.
        Ok(writer)
    }

    /// Write one frame's blob unchanged as the next chunk of the series (frames go in arrival order).
    /// A frame that does not fit the series is refused and changes nothing; after an HDF5 or file
    /// error the writer refuses every frame (a broken file is never written to again): close it.
    pub fn write_frame(&mut self, frame: &FrameHeader, blob: &[u8]) -> Result<()> {
        if self.finished {
            return Err(self.frame_error(frame, "the series is already finished".to_string()));
        }
        if let Some(first) = &self.failed {
            return Err(self.frame_error(frame, format!("not written after an error: {first}")));
        }
        self.check_frame(frame, blob)?;
        let _lock = hdf5_metno_sys::LOCK.lock();
        h5_init();
        let written = self.write_chunk(blob);
        if let Err(e) = &written {
            self.failed = Some(e.to_string());
        }
        written
    }

    fn write_chunk(&mut self, blob: &[u8]) -> Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|f| f.count >= self.frames_per_file)
        {
            let full = self.current.take().expect("an open data file");
            self.close_data_file(full)?;
        }
        if self.current.is_none() {
            let number = self.data_files.len() + 1;
            if number > self.linked {
                // More files than announced: keep the master on disk linking all of them.
                let frames =
                    self.meta
                        .announced_frames()
                        .max((number * self.frames_per_file) as u64) as usize;
                self.write_master(number, frames, false)?;
            }
            let file = self.open_data_file(number)?;
            self.data_files.push(file.path.clone());
            self.current = Some(file);
        }

        let chunk: &[u8] = match self.compression {
            Compression::Lz4Raw => {
                // HDF5-LZ4 (filter 32004) chunk: >u8 uncompressed bytes, >u4 block bytes, then per
                // block >u4 compressed length and the LZ4 block. One block holding the whole frame.
                let total = (self.shape.0 * self.shape.1 * self.elem_size) as u64;
                self.scratch.clear();
                self.scratch.reserve(16 + blob.len());
                self.scratch.extend_from_slice(&total.to_be_bytes());
                self.scratch
                    .extend_from_slice(&(total as u32).to_be_bytes());
                self.scratch
                    .extend_from_slice(&(blob.len() as u32).to_be_bytes());
                self.scratch.extend_from_slice(blob);
                &self.scratch
            }
            _ => blob,
        };
        let file = self.current.as_mut().expect("an open data file");
        let (ny, nx) = self.shape;
        let n = file.count as hsize_t;
        let w = H5Writer {
            path: &file.path,
            file: file.file.id,
        };
        let dims = [n + 1, ny as hsize_t, nx as hsize_t];
        w.check(
            unsafe { H5Dset_extent(file.dset.id, dims.as_ptr()) },
            || format!("H5Dset_extent(/entry/data/data to {} frames)", n + 1),
        )?;
        let offset = [n, 0, 0];
        // Filter mask 0: every filter of the pipeline was applied to these bytes.
        let ret = unsafe {
            H5Dwrite_chunk(
                file.dset.id,
                H5P_DEFAULT,
                0,
                offset.as_ptr(),
                chunk.len(),
                chunk.as_ptr() as *const c_void,
            )
        };
        if ret < 0 {
            let err = h5_error(
                &file.path,
                format!(
                    "H5Dwrite_chunk(/entry/data/data frame {}, {} bytes)",
                    n,
                    chunk.len()
                ),
            );
            // Shrink back so the file does not show a frame that was never written.
            let back = [n, ny as hsize_t, nx as hsize_t];
            unsafe { H5Dset_extent(file.dset.id, back.as_ptr()) };
            h5_error_detail();
            return Err(err);
        }
        file.count += 1;
        self.frames += 1;
        self.bytes += chunk.len() as u64;
        self.unflushed += 1;
        if self.flushed_at.elapsed() >= FLUSH_INTERVAL {
            self.flush_locked();
        }
        Ok(())
    }

    /// Flush the open data file's metadata when frames were written since the last flush and
    /// FLUSH_INTERVAL has passed (the Splitter calls this when idle too).
    pub fn flush_if_due(&mut self) {
        if self.unflushed > 0 && self.flushed_at.elapsed() >= FLUSH_INTERVAL {
            let _lock = hdf5_metno_sys::LOCK.lock();
            self.flush_locked();
        }
    }

    fn flush_locked(&mut self) {
        if let Some(file) = self.current.as_ref() {
            // A failed flush costs nothing but freshness: the file is complete when it is closed.
            unsafe { H5Fflush(file.file.id, H5F_scope_t::H5F_SCOPE_LOCAL) };
        }
        self.unflushed = 0;
        self.flushed_at = std::time::Instant::now();
    }

    /// Close the current data file and write the final master file.
    pub fn finish(mut self) -> Result<WriteSummary> {
        let Closed { summary, error } = self.close_inner();
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    /// Close the current data file and write the final master, also after an error: what was
    /// written stays readable. `summary.frames` counts only frames in cleanly closed data files.
    pub fn close(&mut self) -> Closed {
        if self.finished {
            return self.closed_summary(None);
        }
        self.close_inner()
    }

    /// After `close`: write the final master again if it could not be written then (a full disk:
    /// the master on disk may still link a data file that could not be finished). None when
    /// nothing was pending.
    pub fn retry_master(&mut self) -> Option<Result<()>> {
        let (files, frames) = self.master_pending?;
        let _lock = hdf5_metno_sys::LOCK.lock();
        h5_init();
        let written = self.write_master(files, frames, true);
        if written.is_ok() {
            self.master_pending = None;
        }
        Some(written)
    }

    fn closed_summary(&self, error: Option<NxmxError>) -> Closed {
        Closed {
            summary: WriteSummary {
                master: self.master.clone(),
                data_files: self.data_files.clone(),
                frames: self.frames - self.lost,
                bytes: self.bytes,
            },
            error,
        }
    }

    /// Frames written so far (in files not yet known to be lost).
    pub fn frames_written(&self) -> usize {
        self.frames - self.lost
    }

    /// The first write error, if any: the writer takes no more frames.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The master file, then the data files written so far (the open one included).
    pub fn paths(&self) -> Vec<PathBuf> {
        std::iter::once(self.master.clone())
            .chain(self.data_files.iter().cloned())
            .collect()
    }

    fn close_inner(&mut self) -> Closed {
        self.finished = true;
        let _lock = hdf5_metno_sys::LOCK.lock();
        h5_init();
        let closed = match self.current.take() {
            Some(file) => self.close_data_file(file),
            None => Ok(()),
        };
        let readable = self.frames - self.lost;
        // A data file that could not be closed cleanly is the last one (nothing is written after
        // an error): the final master leaves it out, so every file it links can be read.
        let files = self.data_files.len() - usize::from(self.last_file_broken);
        let master = self.write_master(files, readable, true);
        if master.is_err() {
            self.master_pending = Some((files, readable));
        }
        let error = match (&self.failed, closed, master) {
            (Some(first), _, _) => Some(NxmxError::Invalid(first.clone())),
            (None, Err(e), _) | (None, Ok(()), Err(e)) => Some(e),
            (None, Ok(()), Ok(())) => None,
        };
        self.closed_summary(error)
    }

    fn frame_error(&self, frame: &FrameHeader, reason: String) -> NxmxError {
        NxmxError::Frame {
            series: frame.series,
            frame: frame.frame,
            reason,
        }
    }

    /// A frame must match the series' first frame, and its blob must fit the frame.
    fn check_frame(&self, frame: &FrameHeader, blob: &[u8]) -> Result<()> {
        if frame.shape != self.shape {
            return Err(self.frame_error(
                frame,
                format!(
                    "shape {:?} differs from the series' {:?}",
                    frame.shape, self.shape
                ),
            ));
        }
        if frame.elem_size != self.elem_size {
            return Err(self.frame_error(
                frame,
                format!(
                    "element size {} differs from the series' {}",
                    frame.elem_size, self.elem_size
                ),
            ));
        }
        if frame.compression != self.compression {
            return Err(self.frame_error(
                frame,
                format!(
                    "compression {:?} differs from the series' {:?}",
                    frame.compression, self.compression
                ),
            ));
        }
        let raw = (self.shape.0 * self.shape.1 * self.elem_size) as u64;
        let declared = |what: &str, min: usize| -> Result<()> {
            if blob.len() < min {
                return Err(self.frame_error(
                    frame,
                    format!("{what} blob of {} bytes is too short", blob.len()),
                ));
            }
            let size = u64::from_be_bytes(blob[..8].try_into().expect("8 bytes"));
            if size != raw {
                return Err(self.frame_error(
                    frame,
                    format!("{what} blob declares {size} bytes, the frame has {raw}"),
                ));
            }
            Ok(())
        };
        match self.compression {
            // Both headers start with the uncompressed size as a big-endian u64.
            Compression::BsLz4 => declared("bitshuffle-LZ4", 12),
            Compression::Lz4Hdf5 => declared("HDF5-LZ4", 16),
            Compression::Lz4Raw => {
                if blob.is_empty() || raw > u32::MAX as u64 || blob.len() > u32::MAX as usize {
                    return Err(self.frame_error(
                        frame,
                        format!("LZ4 blob of {} bytes for {raw} bytes", blob.len()),
                    ));
                }
                Ok(())
            }
            Compression::None => {
                if blob.len() as u64 != raw {
                    return Err(self.frame_error(
                        frame,
                        format!("{} bytes of pixels, the frame has {raw}", blob.len()),
                    ));
                }
                Ok(())
            }
        }
    }

    fn data_name(&self, number: usize) -> String {
        format!("{}_data_{number:06}.h5", self.base_name)
    }

    /// A new data file: /entry (NXentry) / data (NXdata) / data, empty, chunked one frame per
    /// chunk, extendable (DECTRIS file writer layout).
    fn open_data_file(&self, number: usize) -> Result<DataFile> {
        let path = PathBuf::from(format!("{}_data_{number:06}.h5", self.base.display()));
        let file = create_file(&path)?;
        let w = H5Writer {
            path: &path,
            file: file.id,
        };
        w.group("/entry", "NXentry")?;
        w.group("/entry/data", "NXdata")?;

        let (ny, nx) = (self.shape.0 as hsize_t, self.shape.1 as hsize_t);
        let dcpl = w.check_id(
            unsafe { H5Pcreate(*H5P_CLS_DATASET_CREATE) },
            H5Pclose,
            || "H5Pcreate(/entry/data/data)".into(),
        )?;
        let chunk = [1, ny, nx];
        w.check(unsafe { H5Pset_chunk(dcpl.id, 3, chunk.as_ptr()) }, || {
            "H5Pset_chunk(/entry/data/data)".into()
        })?;
        // The filter is optional so the dataset can be made where the filter plugin is not
        // loaded; the chunks are written already filtered.
        let filter = match self.compression {
            // bitshuffle cd_values: (major, minor version, element size, block size 0 = default,
            // 2 = LZ4 after the shuffle).
            Compression::BsLz4 => Some((
                FILTER_BITSHUFFLE,
                vec![0, 2, self.elem_size as c_uint, 0, 2],
            )),
            Compression::Lz4Raw | Compression::Lz4Hdf5 => Some((FILTER_LZ4, vec![])),
            Compression::None => None,
        };
        if let Some((id, cd)) = filter {
            let cd_ptr = if cd.is_empty() {
                std::ptr::null()
            } else {
                cd.as_ptr()
            };
            let ret = unsafe { H5Pset_filter(dcpl.id, id, H5Z_FLAG_OPTIONAL, cd.len(), cd_ptr) };
            w.check(ret, || format!("H5Pset_filter({id}, /entry/data/data)"))?;
        }
        let (ftype, what) = match self.elem_size {
            1 => (*H5T_STD_U8LE, "u8"),
            2 => (*H5T_STD_U16LE, "u16"),
            _ => (*H5T_STD_U32LE, "u32"),
        };
        let space = w.space(
            Some(&[0, ny, nx]),
            Some(&[H5S_UNLIMITED, ny, nx]),
            "/entry/data/data",
        )?;
        let name = c_name("/entry/data/data")?;
        let d = unsafe {
            H5Dcreate2(
                file.id,
                name.as_ptr(),
                ftype,
                space.id,
                H5P_DEFAULT,
                dcpl.id,
                H5P_DEFAULT,
            )
        };
        let dset = w.check_id(d, H5Dclose, || {
            format!("H5Dcreate2(/entry/data/data, {what})")
        })?;
        Ok(DataFile {
            path,
            dset,
            file,
            first: self.frames,
            count: 0,
        })
    }

    /// Set image_nr_low/high (1-based) and close: the file is then complete and valid. A file that
    /// cannot be closed cleanly (a full disk) may not be readable: its frames no longer count.
    fn close_data_file(&mut self, file: DataFile) -> Result<()> {
        let count = file.count;
        let closed = self.close_data_file_inner(file);
        if closed.is_err() {
            self.lost += count;
            self.last_file_broken = true;
        }
        closed
    }

    fn close_data_file_inner(&self, file: DataFile) -> Result<()> {
        let DataFile {
            path,
            dset,
            file,
            first,
            count,
        } = file;
        let w = H5Writer {
            path: &path,
            file: file.id,
        };
        let low = first as u64 + 1;
        let high = (first + count) as u64;
        w.attr_u64(dset.id, "/entry/data/data", "image_nr_low", low)?;
        w.attr_u64(dset.id, "/entry/data/data", "image_nr_high", high)?;
        dset.close_checked(&path, "H5Dclose(/entry/data/data)")?;
        file.close_checked(&path, "H5Fclose")
    }

    /// Write the master file, linking data files 1..=`files`, for a series of `frames` frames.
    /// It is written beside its final name and renamed over it, so a reader never sees half a file.
    /// The first master never replaces a file (it is linked to its name, which fails if the name
    /// is taken); later ones replace only this writer's own master.
    fn write_master(&mut self, files: usize, frames: usize, last: bool) -> Result<()> {
        let tmp = PathBuf::from(format!("{}.tmp", self.master.display()));
        // A tmp file that exists is not ours: an error, and left alone.
        let file = create_file(&tmp)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NxmxError::Io { path, source }
        };
        let result = self
            .write_master_to(&tmp, file, files, frames, last)
            .and_then(|()| {
                if self.linked > 0 {
                    return std::fs::rename(&tmp, &self.master).map_err(io(&self.master));
                }
                match std::fs::hard_link(&tmp, &self.master) {
                    Ok(()) => std::fs::remove_file(&tmp).map_err(io(&tmp)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(io(&self.master)(e))
                    }
                    // A file system without hard links: check, then rename.
                    Err(_) if self.master.exists() => {
                        Err(io(&self.master)(std::io::ErrorKind::AlreadyExists.into()))
                    }
                    Err(_) => std::fs::rename(&tmp, &self.master).map_err(io(&self.master)),
                }
            });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.linked = files;
        Ok(())
    }

    fn write_master_to(
        &self,
        path: &Path,
        file: Handle,
        files: usize,
        frames: usize,
        last: bool,
    ) -> Result<()> {
        let w = H5Writer {
            path,
            file: file.id,
        };
        let m = &self.meta;
        let (ny, nx) = self.shape;
        let (px, py) = m.pixel_size;
        let (bx, by) = m.beam_center;

        // NXentry (NXmx application definition).
        w.group("/entry", "NXentry")?;
        w.str("/entry/definition", "NXmx")?;
        if let Some(date) = &m.collection_date {
            w.str("/entry/start_time", date)?;
        }

        // NXdata: one external link per data file, by relative file name.
        w.group("/entry/data", "NXdata")?;
        for number in 1..=files {
            w.external_link(
                &format!("/entry/data/data_{number:06}"),
                &self.data_name(number),
                "/entry/data/data",
            )?;
        }

        w.group("/entry/instrument", "NXinstrument")?;
        w.group("/entry/instrument/beam", "NXbeam")?;
        w.f64(
            "/entry/instrument/beam/incident_wavelength",
            m.wavelength,
            Some("angstrom"),
        )?;

        // NXdetector.
        let det = "/entry/instrument/detector";
        w.group(det, "NXdetector")?;
        w.str(
            &format!("{det}/depends_on"),
            &format!("{det}/transformations/translation"),
        )?;
        w.f64(&format!("{det}/beam_center_x"), bx, Some("pixel"))?;
        w.f64(&format!("{det}/beam_center_y"), by, Some("pixel"))?;
        w.f64(&format!("{det}/detector_distance"), m.distance, Some("m"))?;
        w.f64(&format!("{det}/distance"), m.distance, Some("m"))?;
        w.f64(&format!("{det}/x_pixel_size"), px, Some("m"))?;
        w.f64(&format!("{det}/y_pixel_size"), py, Some("m"))?;
        w.f64(&format!("{det}/count_time"), m.count_time, Some("s"))?;
        w.f64(&format!("{det}/frame_time"), m.frame_time, Some("s"))?;
        if let Some(t) = m.detector_readout_time {
            w.f64(&format!("{det}/detector_readout_time"), t, Some("s"))?;
        }
        w.str(&format!("{det}/sensor_material"), &m.sensor_material)?;
        w.f64(
            &format!("{det}/sensor_thickness"),
            m.sensor_thickness,
            Some("m"),
        )?;
        w.str(&format!("{det}/description"), &m.description)?;
        w.str(&format!("{det}/detector_number"), &m.detector_number)?;
        w.str(&format!("{det}/type"), "PIXEL")?;
        w.i32(&format!("{det}/bit_depth_image"), m.bit_depth_image)?;
        w.i32(&format!("{det}/bit_depth_readout"), m.bit_depth_readout)?;
        w.i32(
            &format!("{det}/countrate_correction_applied"),
            i32::from(m.countrate_correction_applied),
        )?;
        for (name, flag) in [
            (
                "flatfield_correction_applied",
                m.flatfield_correction_applied,
            ),
            ("pixel_mask_applied", m.pixel_mask_applied),
            (
                "virtual_pixel_correction_applied",
                m.virtual_pixel_correction_applied,
            ),
        ] {
            if let Some(flag) = flag {
                w.i32(&format!("{det}/{name}"), i32::from(flag))?;
            }
        }
        if let Some(s) = m.saturation_value {
            w.u32(
                &format!("{det}/saturation_value"),
                s.min(u32::MAX as u64) as u32,
            )?;
        }
        if let Some(e) = m.threshold_energy {
            w.f64(&format!("{det}/threshold_energy"), e, Some("eV"))?;
        }

        // The trusted range, as dxtbx's NXmx readers take it: (underload_value, saturation_value),
        // inclusive (dxtbx.nexus.get_dxtbx_detector; a missing underload is -0x7FFFFFFF for the
        // generic reader, 0 for the EIGER one). 0 as a miniCBF's (0, Count_cutoff): the gaps and
        // bad pixels a PILATUS marks -1 and -2 stay untrusted.
        w.i32(&format!("{det}/underload_value"), 0)?;

        // The detector position: a translation along the beam (McStas z) by the distance, on an
        // arm rotated by two-theta: dxtbx's two-theta axis is +x in its frame (imgCIF), -x in
        // McStas (x and z flip). dxtbx applies every rotation of the chain to the module's axes
        // and the whole chain to its origin (get_dxtbx_detector), which gives R(origin, fast, slow)
        // as DetectorFactory.two_theta does.
        w.group(&format!("{det}/transformations"), "NXtransformations")?;
        let two_theta = format!("{det}/transformations/two_theta");
        w.axis(
            &two_theta,
            &[m.geometry.two_theta],
            "rotation",
            "degree",
            [-1.0, 0.0, 0.0],
            [0.0; 3],
            ".",
        )?;
        let translation = format!("{det}/transformations/translation");
        w.axis(
            &translation,
            &[m.distance],
            "translation",
            "m",
            [0.0, 0.0, 1.0],
            [0.0; 3],
            &two_theta,
        )?;

        // NXdetector_module: the whole frame. data_size is [slow, fast] like the data's last two
        // dimensions. Pixel (0, 0) sits at (bx * px, by * py) from the beam, since the fast
        // axis runs along -x and the slow axis along -y (DECTRIS convention, NXmx McStas frame).
        let module = format!("{det}/module");
        w.group(&module, "NXdetector_module")?;
        w.u32s(&format!("{module}/data_origin"), &[0, 0])?;
        w.u32s(&format!("{module}/data_size"), &[ny as u32, nx as u32])?;
        let offset = [bx * px, by * py, 0.0];
        let length = (offset[0] * offset[0] + offset[1] * offset[1]).sqrt();
        let direction = if length > 0.0 {
            [offset[0] / length, offset[1] / length, 0.0]
        } else {
            [1.0, 0.0, 0.0]
        };
        let module_offset = format!("{module}/module_offset");
        w.axis(
            &module_offset,
            &[length],
            "translation",
            "m",
            direction,
            [0.0; 3],
            &translation,
        )?;
        w.axis(
            &format!("{module}/fast_pixel_direction"),
            &[px],
            "translation",
            "m",
            [-1.0, 0.0, 0.0],
            [0.0; 3],
            &module_offset,
        )?;
        w.axis(
            &format!("{module}/slow_pixel_direction"),
            &[py],
            "translation",
            "m",
            [0.0, -1.0, 0.0],
            [0.0; 3],
            &module_offset,
        )?;

        // Legacy DECTRIS geometry (read by older DIALS Eiger readers).
        w.group(&format!("{det}/geometry"), "NXgeometry")?;
        w.group(&format!("{det}/geometry/orientation"), "NXorientation")?;
        w.f64s(
            &format!("{det}/geometry/orientation/value"),
            &[-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
            None,
        )?;
        w.group(&format!("{det}/geometry/translation"), "NXtranslation")?;
        w.f64s(
            &format!("{det}/geometry/translation/distances"),
            &[bx * px, by * py, -m.distance],
            Some("m"),
        )?;

        // detectorSpecific (DECTRIS): what XDS's neggia plugin reads. It counts nimages x ntrigger
        // frames, so the final master states what was written.
        let spec = format!("{det}/detectorSpecific");
        w.group(&spec, "NXcollection")?;
        let (nimages, ntrigger) = if last && frames > 0 && m.expected_frames() != frames as u64 {
            (frames as u64, 1)
        } else if m.expected_frames() == 0 {
            (frames.max(1) as u64, 1)
        } else {
            (m.nimages, m.ntrigger)
        };
        let clamp = |v: u64| v.min(u32::MAX as u64) as u32;
        w.u32(&format!("{spec}/nimages"), clamp(nimages))?;
        w.u32(&format!("{spec}/ntrigger"), clamp(ntrigger))?;
        w.u32(&format!("{spec}/x_pixels_in_detector"), nx as u32)?;
        w.u32(&format!("{spec}/y_pixels_in_detector"), ny as u32)?;
        w.u32(
            &format!("{spec}/countrate_correction_count_cutoff"),
            clamp(m.count_cutoff),
        )?;
        let compression = match self.compression {
            Compression::BsLz4 => "bslz4",
            Compression::Lz4Raw | Compression::Lz4Hdf5 => "lz4",
            Compression::None => "none",
        };
        w.str(&format!("{spec}/compression"), compression)?;
        w.f64(
            &format!("{spec}/photon_energy"),
            m.photon_energy,
            Some("eV"),
        )?;
        if let Some(date) = &m.collection_date {
            w.str(&format!("{spec}/data_collection_date"), date)?;
        }
        for (name, value) in &m.specific_strings {
            w.str(&format!("{spec}/{name}"), value)?;
        }
        if let Some(n) = m.number_of_excluded_pixels {
            w.u32(&format!("{spec}/number_of_excluded_pixels"), clamp(n))?;
        }
        // The mask (zeros when none was sent); the NXdetector's pixel_mask is the same dataset.
        w.mask(
            &format!("{spec}/pixel_mask"),
            ny,
            nx,
            self.pixel_mask.as_deref(),
        )?;
        if self.pixel_mask.is_some() {
            w.hard_link(&format!("{det}/pixel_mask"), &format!("{spec}/pixel_mask"))?;
        }

        // NXsample: the rotation axis of the scan, one angle per frame (NXmx depends_on chain).
        w.group("/entry/sample", "NXsample")?;
        let scan = m.geometry.scan().expect("a stream geometry has its axes");
        let (axis, start, increment) = (scan.name.as_str(), scan.start, scan.increment);
        let angles: Vec<f64> = (0..frames).map(|i| start + increment * i as f64).collect();
        let ends: Vec<f64> = angles.iter().map(|a| a + increment).collect();
        w.str(
            "/entry/sample/depends_on",
            &format!("/entry/sample/transformations/{axis}"),
        )?;
        w.group("/entry/sample/transformations", "NXtransformations")?;
        w.axis(
            &format!("/entry/sample/transformations/{axis}"),
            &angles,
            "rotation",
            "degree",
            [-1.0, 0.0, 0.0],
            [0.0; 3],
            ".",
        )?;
        w.f64s(
            &format!("/entry/sample/transformations/{axis}_end"),
            &ends,
            Some("degree"),
        )?;

        // Legacy DECTRIS goniometer: every axis with its per-frame angles and scalars.
        let gonio = "/entry/sample/goniometer";
        w.group(gonio, "NXtransformations")?;
        for a in &m.geometry.axes {
            let (name, start, increment) = (a.name.as_str(), a.start, a.increment);
            let angles: Vec<f64> = (0..frames).map(|i| start + increment * i as f64).collect();
            let ends: Vec<f64> = angles.iter().map(|a| a + increment).collect();
            w.f64s(&format!("{gonio}/{name}"), &angles, Some("degree"))?;
            w.f64s(&format!("{gonio}/{name}_end"), &ends, Some("degree"))?;
            w.f64(&format!("{gonio}/{name}_start"), start, Some("degree"))?;
            w.f64(
                &format!("{gonio}/{name}_increment"),
                increment,
                Some("degree"),
            )?;
            w.f64(
                &format!("{gonio}/{name}_range_average"),
                increment,
                Some("degree"),
            )?;
            w.f64(
                &format!("{gonio}/{name}_range_total"),
                increment * frames as f64,
                Some("degree"),
            )?;
        }

        file.close_checked(path, "H5Fclose")
    }
}

impl Drop for SeriesWriter {
    /// A writer dropped without `finish` (an error path, a shutdown) still closes its data file
    /// and writes the final master, so what was written stays readable.
    fn drop(&mut self) {
        if !self.finished {
            if let Some(e) = self.close_inner().error {
                eprintln!(
                    "nxmx: closing series {} ({}) failed: {e}",
                    self.series,
                    self.master.display()
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::frame::Protocol;
    use hdf5_metno_sys::h5::haddr_t;
    use hdf5_metno_sys::h5a::{H5Aopen, H5Aread};
    use hdf5_metno_sys::h5d::{
        H5Dget_chunk_info_by_coord, H5Dget_create_plist, H5Dget_space, H5Dopen2, H5Dread,
        H5Dread_chunk,
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

    fn frame(
        n: i64,
        shape: (usize, usize),
        elem_size: usize,
        compression: Compression,
    ) -> FrameHeader {
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
        assert!(
            unsafe { H5Aread(a.0, *H5T_NATIVE_UINT64, &mut v as *mut u64 as *mut c_void) } >= 0
        );
        v
    }

    fn read_f64s(file: &Ro, path: &str) -> Vec<f64> {
        let d = dataset(file, path);
        let n: u64 = dims(&d).iter().product();
        let mut v = vec![0f64; n as usize];
        assert!(
            unsafe {
                H5Dread(
                    d.0,
                    *H5T_NATIVE_DOUBLE,
                    H5S_ALL,
                    H5S_ALL,
                    H5P_DEFAULT,
                    v.as_mut_ptr() as *mut c_void,
                )
            } >= 0
        );
        v
    }

    fn read_u32s(file: &Ro, path: &str) -> Vec<u32> {
        let d = dataset(file, path);
        let n: u64 = dims(&d).iter().product::<u64>().max(1);
        let mut v = vec![0u32; n as usize];
        assert!(
            unsafe {
                H5Dread(
                    d.0,
                    *H5T_NATIVE_UINT32,
                    H5S_ALL,
                    H5S_ALL,
                    H5P_DEFAULT,
                    v.as_mut_ptr() as *mut c_void,
                )
            } >= 0
        );
        v
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
}
