//! Data files: `/entry/data/data` chunked (1, ny, nx) with the stream's filter, each frame's
//! blob written unchanged with a direct chunk write.

use std::ffi::{c_uint, c_void};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use hdf5_metno_sys::h5::hsize_t;
use hdf5_metno_sys::h5d::{H5Dclose, H5Dcreate2, H5Dset_extent, H5Dwrite_chunk};
use hdf5_metno_sys::h5p::{
    H5Pclose, H5Pcreate, H5Pset_alignment, H5Pset_chunk, H5Pset_filter, H5P_CLS_DATASET_CREATE,
    H5P_CLS_FILE_ACCESS, H5P_DEFAULT,
};
use hdf5_metno_sys::h5s::H5S_UNLIMITED;
use hdf5_metno_sys::h5z::H5Z_FLAG_OPTIONAL;

use crate::frame::{Compression, FrameHeader};

use super::h5::{
    c_name, create_file_with, h5_error, h5_error_detail, pixel_type, H5Writer, Handle,
};
use super::{DataFile, Result, SeriesWriter, FILTER_BITSHUFFLE, FILTER_LZ4, FLUSH_INTERVAL};

/// Objects of at least ALIGN_ABOVE bytes (frames, not metadata) start at multiples of PAGE.
const ALIGN_ABOVE: hsize_t = 16 * 1024;
const PAGE: hsize_t = 4096;

impl SeriesWriter {
    pub(super) fn write_chunk(&mut self, blob: &[u8]) -> Result<()> {
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
        if let (Some(writeback), Some(flush)) = (&self.writeback, &file.flush) {
            writeback.written(flush);
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

    /// A frame must match the series' first frame, and its blob must fit the frame.
    pub(super) fn check_frame(&self, frame: &FrameHeader, blob: &[u8]) -> Result<()> {
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

    pub(super) fn data_name(&self, number: usize) -> String {
        format!("{}_data_{number:06}.h5", self.base_name)
    }

    /// A new data file: /entry (NXentry) / data (NXdata) / data, empty, chunked one frame per
    /// chunk, extendable (DECTRIS file writer layout).
    pub(super) fn open_data_file(&self, number: usize) -> Result<DataFile> {
        let path = PathBuf::from(format!("{}_data_{number:06}.h5", self.base.display()));
        // Chunks (frames) start on 4 KiB boundaries (HDF5 file space alignment): each frame is one
        // write of whole pages, never sharing a page with the metadata or the frame before.
        let fapl = Handle {
            id: unsafe { H5Pcreate(*H5P_CLS_FILE_ACCESS) },
            close: H5Pclose,
        };
        if fapl.id < 0 || unsafe { H5Pset_alignment(fapl.id, ALIGN_ABOVE, PAGE) } < 0 {
            h5_error_detail(); // alignment only saves copies: without it the file is the same
        }
        let file = create_file_with(&path, fapl.id.max(H5P_DEFAULT))?;
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
        let (ftype, what) = pixel_type(self.elem_size);
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
        // The writeback thread's own descriptor of the file (read-only: it only starts writeback,
        // which works on the file whichever descriptor asks, and HDF5's driver stays its own).
        let flush = self
            .writeback
            .as_ref()
            .and_then(|_| std::fs::File::open(&path).ok())
            .map(|f| Arc::new(OwnedFd::from(f)));
        Ok(DataFile {
            path,
            dset,
            file,
            first: self.frames,
            count: 0,
            flush,
        })
    }

    /// Set image_nr_low/high (1-based) and close: the file is then complete and valid. A file that
    /// cannot be closed cleanly (a full disk) may not be readable: its frames no longer count.
    pub(super) fn close_data_file(&mut self, file: DataFile) -> Result<()> {
        let count = file.count;
        let closed = self.close_data_file_inner(file);
        if closed.is_err() {
            self.lost += count;
            self.last_file_broken = true;
        }
        closed
    }

    pub(super) fn close_data_file_inner(&self, file: DataFile) -> Result<()> {
        let DataFile {
            path,
            dset,
            file,
            first,
            count,
            ..
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
}
