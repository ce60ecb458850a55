//! HDF5 plumbing: the library opened once, handles closed on drop, errors with the HDF5 error
//! stack, and the write helpers the master and data files use.

use std::cell::Cell;
use std::ffi::{c_char, c_uint, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Mutex, Once};

use hdf5_metno_sys::h5::{herr_t, hsize_t, H5dont_atexit, H5open};
use hdf5_metno_sys::h5a::{H5Aclose, H5Acreate2, H5Awrite};
use hdf5_metno_sys::h5d::{
    H5Dclose, H5Dcreate2, H5Dflush, H5Dget_chunk_info_by_coord, H5Dread_chunk, H5Dwrite,
    H5Dwrite_chunk,
};
use hdf5_metno_sys::h5e::{
    H5E_error2_t, H5Eclear2, H5Eset_auto2, H5Ewalk2, H5E_DEFAULT, H5E_WALK_DOWNWARD,
};
use hdf5_metno_sys::h5f::{H5Fclose, H5Fcreate, H5F_ACC_EXCL};
use hdf5_metno_sys::h5g::{H5Gclose, H5Gcreate2};
use hdf5_metno_sys::h5i::hid_t;
use hdf5_metno_sys::h5l::{H5Lcreate_external, H5Lcreate_hard};
use hdf5_metno_sys::h5p::{
    H5Pclose, H5Pcreate, H5Pset_chunk, H5Pset_deflate, H5Pset_fill_value, H5Pset_virtual,
    H5P_CLS_DATASET_CREATE, H5P_DEFAULT,
};
use hdf5_metno_sys::h5s::{
    H5S_seloper_t, H5Sclose, H5Screate, H5Screate_simple, H5Sselect_hyperslab, H5S_ALL, H5S_SCALAR,
};
use hdf5_metno_sys::h5t::{
    H5Tclose, H5Tcopy, H5Tset_size, H5Tset_strpad, H5T_C_S1, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE,
    H5T_NATIVE_INT32, H5T_NATIVE_UINT32, H5T_NATIVE_UINT64, H5T_STD_I32LE, H5T_STD_U16LE,
    H5T_STD_U32LE, H5T_STD_U64LE, H5T_STD_U8LE, H5T_STR_NULLPAD,
};
use hdf5_metno_sys::h5z::{H5Zfilter_avail, H5Z_FILTER_DEFLATE};

use super::{NxmxError, Result};

pub(super) static H5_OPEN: Once = Once::new();

/// The last pixel mask written, with its chunks as stored (deflated): every master of a series,
/// and of the next series (a detector sends the same mask with each), holds it, and deflating it
/// again costs ~50 ms at 6M and ~150 ms at 16M (72 MB). The same mask is written again by direct
/// chunk writes of these bytes.
struct StoredMask {
    ny: usize,
    nx: usize,
    mask: Vec<u32>,
    chunks: Vec<(u32, Vec<u8>)>, // (filter mask, stored bytes) per chunk (rows from ny, nx)
}

static LAST_MASK: Mutex<Option<StoredMask>> = Mutex::new(None);
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
pub(super) fn h5_init() {
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
pub(super) fn h5_error_detail() -> String {
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

pub(super) type CloseFn = unsafe extern "C" fn(hid_t) -> herr_t;

/// An open HDF5 identifier, closed when dropped.
pub(super) struct Handle {
    pub(super) id: hid_t,
    pub(super) close: CloseFn,
}

impl Handle {
    /// Close now and report a failure (files: this is where the last metadata is flushed).
    pub(super) fn close_checked(self, file: &Path, call: &str) -> Result<()> {
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

pub(super) fn h5_error(file: &Path, call: String) -> NxmxError {
    NxmxError::Hdf5 {
        file: file.to_path_buf(),
        call,
        detail: h5_error_detail(),
    }
}

pub(super) fn c_name(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| NxmxError::Invalid(format!("name with a NUL byte: {s:?}")))
}

pub(super) fn c_path(p: &Path) -> Result<CString> {
    let s = p
        .to_str()
        .ok_or_else(|| NxmxError::Invalid(format!("path is not UTF-8: {}", p.display())))?;
    c_name(s)
}

/// Writes objects into one HDF5 file; every object is named by its absolute path in the file,
/// so errors name the file, the call and the object.
pub(super) struct H5Writer<'a> {
    pub(super) path: &'a Path,
    pub(super) file: hid_t,
}

impl H5Writer<'_> {
    pub(super) fn check_id(
        &self,
        id: hid_t,
        close: CloseFn,
        call: impl FnOnce() -> String,
    ) -> Result<Handle> {
        if id < 0 {
            Err(h5_error(self.path, call()))
        } else {
            Ok(Handle { id, close })
        }
    }

    pub(super) fn check(&self, ret: herr_t, call: impl FnOnce() -> String) -> Result<()> {
        if ret < 0 {
            Err(h5_error(self.path, call()))
        } else {
            Ok(())
        }
    }

    pub(super) fn space(
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
    pub(super) fn string_type(&self, len: usize, what: &str) -> Result<Handle> {
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
    pub(super) fn group(&self, path: &str, nx_class: &str) -> Result<Handle> {
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
        self.attr_str(g.id, path, "NX_class", nx_class)?;
        Ok(g)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attr_raw(
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

    pub(super) fn attr_str(
        &self,
        obj: hid_t,
        obj_path: &str,
        name: &str,
        value: &str,
    ) -> Result<()> {
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

    pub(super) fn attr_f64s(
        &self,
        obj: hid_t,
        obj_path: &str,
        name: &str,
        values: &[f64],
    ) -> Result<()> {
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

    pub(super) fn attr_u64(
        &self,
        obj: hid_t,
        obj_path: &str,
        name: &str,
        value: u64,
    ) -> Result<()> {
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
    pub(super) fn dataset(
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

    pub(super) fn str(&self, path: &str, value: &str) -> Result<Handle> {
        let t = self.string_type(value.len(), path)?;
        let mut bytes = value.as_bytes().to_vec();
        bytes.resize(value.len().max(1), 0);
        self.dataset(path, t.id, t.id, None, bytes.as_ptr() as *const c_void)
    }

    /// A scalar float64, with its `units` attribute when given.
    pub(super) fn f64(&self, path: &str, value: f64, units: Option<&str>) -> Result<Handle> {
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

    pub(super) fn f64s(&self, path: &str, values: &[f64], units: Option<&str>) -> Result<Handle> {
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

    pub(super) fn i32(&self, path: &str, value: i32) -> Result<()> {
        self.dataset(
            path,
            *H5T_STD_I32LE,
            *H5T_NATIVE_INT32,
            None,
            &value as *const i32 as *const c_void,
        )
        .map(drop)
    }

    pub(super) fn u32(&self, path: &str, value: u32) -> Result<()> {
        self.dataset(
            path,
            *H5T_STD_U32LE,
            *H5T_NATIVE_UINT32,
            None,
            &value as *const u32 as *const c_void,
        )
        .map(drop)
    }

    pub(super) fn u32s(&self, path: &str, values: &[u32]) -> Result<()> {
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
    pub(super) fn axis(
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

    /// A rotation axis (degrees) about `vector`, without offset.
    pub(super) fn rotation(
        &self,
        path: &str,
        angles: &[f64],
        vector: [f64; 3],
        depends_on: &str,
    ) -> Result<()> {
        self.axis(
            path, angles, "rotation", "degree", vector, [0.0; 3], depends_on,
        )
    }

    /// A virtual dataset of `frames` x ny x nx pixels of `ftype` mapping, for each source
    /// `(file, first, count)`, frames first..first+count to that file's `src_dset` (a relative file
    /// name is found beside this file, as HDF5 resolves virtual sources).
    pub(super) fn virtual_frames(
        &self,
        path: &str,
        ftype: hid_t,
        (ny, nx): (usize, usize),
        sources: &[(String, usize, usize)],
        src_dset: &str,
    ) -> Result<()> {
        let frames = sources.iter().map(|s| s.1 + s.2).max().unwrap_or(0);
        let (ny, nx) = (ny as hsize_t, nx as hsize_t);
        let dcpl = self.check_id(
            unsafe { H5Pcreate(*H5P_CLS_DATASET_CREATE) },
            H5Pclose,
            || format!("H5Pcreate({path})"),
        )?;
        let vspace = self.space(Some(&[frames as hsize_t, ny, nx]), None, path)?;
        let src_name = c_name(src_dset)?;
        for (file, first, count) in sources {
            let block = [*count as hsize_t, ny, nx];
            let sspace = self.space(Some(&block), None, path)?;
            let start = [*first as hsize_t, 0, 0];
            self.check(
                unsafe {
                    H5Sselect_hyperslab(
                        vspace.id,
                        H5S_seloper_t::H5S_SELECT_SET,
                        start.as_ptr(),
                        std::ptr::null(),
                        block.as_ptr(),
                        std::ptr::null(),
                    )
                },
                || format!("H5Sselect_hyperslab({path}, {file})"),
            )?;
            let file_name = c_name(file)?;
            self.check(
                unsafe {
                    H5Pset_virtual(
                        dcpl.id,
                        vspace.id,
                        file_name.as_ptr(),
                        src_name.as_ptr(),
                        sspace.id,
                    )
                },
                || format!("H5Pset_virtual({path}, {file})"),
            )?;
        }
        let name = c_name(path)?;
        let d = unsafe {
            H5Dcreate2(
                self.file,
                name.as_ptr(),
                ftype,
                vspace.id,
                H5P_DEFAULT,
                dcpl.id,
                H5P_DEFAULT,
            )
        };
        self.check_id(d, H5Dclose, || format!("H5Dcreate2({path}, virtual)"))
            .map(drop)
    }

    /// A 2-D uint32 pixel mask, chunked and deflated when the library has deflate. With no data
    /// no chunk is written and every pixel reads as the fill value 0 (nothing masked).
    pub(super) fn mask(
        &self,
        path: &str,
        ny: usize,
        nx: usize,
        data: Option<&[u32]>,
    ) -> Result<()> {
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
        let Some(data) = data else {
            return Ok(());
        };
        let mut last = LAST_MASK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stored) = last
            .as_ref()
            .filter(|m| (m.ny, m.nx) == (ny, nx) && m.mask == data)
        {
            for (i, (filters, bytes)) in stored.chunks.iter().enumerate() {
                let offset = [(i * rows) as hsize_t, 0];
                let ret = unsafe {
                    H5Dwrite_chunk(
                        d.id,
                        H5P_DEFAULT,
                        *filters,
                        offset.as_ptr(),
                        bytes.len(),
                        bytes.as_ptr() as *const c_void,
                    )
                };
                self.check(ret, || format!("H5Dwrite_chunk({path} chunk {i})"))?;
            }
            return Ok(());
        }
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
        *last = stored_chunks(d.id, ny, rows).map(|chunks| StoredMask {
            ny,
            nx,
            mask: data.to_vec(),
            chunks,
        });
        Ok(())
    }

    pub(super) fn external_link(
        &self,
        link: &str,
        target_file: &str,
        target_path: &str,
    ) -> Result<()> {
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

    pub(super) fn hard_link(&self, link: &str, target: &str) -> Result<()> {
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

/// The stored bytes of each chunk of `rows` rows of a dataset just written, or None when any
/// cannot be read back (then nothing is kept, and the next mask is deflated again).
fn stored_chunks(d: hid_t, ny: usize, rows: usize) -> Option<Vec<(u32, Vec<u8>)>> {
    if unsafe { H5Dflush(d) } < 0 {
        h5_error_detail();
        return None;
    }
    let mut chunks = Vec::with_capacity(ny.div_ceil(rows));
    for first in (0..ny).step_by(rows) {
        let offset = [first as hsize_t, 0];
        let (mut filters, mut addr, mut size) = (0 as c_uint, 0, 0 as hsize_t);
        let info = unsafe {
            H5Dget_chunk_info_by_coord(d, offset.as_ptr(), &mut filters, &mut addr, &mut size)
        };
        if info < 0 || size == 0 {
            h5_error_detail();
            return None;
        }
        let mut bytes = vec![0u8; size as usize];
        let ret = unsafe {
            H5Dread_chunk(
                d,
                H5P_DEFAULT,
                offset.as_ptr(),
                &mut filters,
                bytes.as_mut_ptr() as *mut c_void,
            )
        };
        if ret < 0 {
            h5_error_detail();
            return None;
        }
        chunks.push((filters, bytes));
    }
    Some(chunks)
}

/// Create a new file; never truncate one that exists (the disk is sacred: an existing file is an
/// error, the caller picks names that do not exist).
/// The file type of pixels of `elem_size` bytes (unsigned, little-endian, as the streams send).
pub(super) fn pixel_type(elem_size: usize) -> (hid_t, &'static str) {
    match elem_size {
        1 => (*H5T_STD_U8LE, "u8"),
        2 => (*H5T_STD_U16LE, "u16"),
        _ => (*H5T_STD_U32LE, "u32"),
    }
}

pub(super) fn create_file(path: &Path) -> Result<Handle> {
    create_file_with(path, H5P_DEFAULT)
}

/// `create_file` with a file access property list.
pub(super) fn create_file_with(path: &Path, fapl: hid_t) -> Result<Handle> {
    let name = c_path(path)?;
    let existed = path.symlink_metadata().is_ok();
    let id = unsafe { H5Fcreate(name.as_ptr(), H5F_ACC_EXCL, H5P_DEFAULT, fapl) };
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
