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
//! DIALS (dxtbx) picks its reader by what the master holds: `detectorSpecific/eiger_fw_version`
//! selects its EIGER file-writer reader, which accepts only EIGER module sizes, so only EIGERs
//! (by their description) keep it; any other detector (a PILATUS streamed by a simulator or by
//! SSRL's cbfToEiger) is read by dxtbx's generic NXmx reader, which takes the trusted range from
//! `underload_value`/`saturation_value` (written: 0 and the count cutoff, as a miniCBF's), the mask
//! from the NXdetector's `pixel_mask`, and the detector position from the `depends_on` chain
//! `module_offset -> translation (distance) -> two_theta` (the arm's rotation about dxtbx's +x).
//! The geometry written is `crate::geometry`'s, the one the Splitter serves to readers.
//!
//! Only the raw HDF5 C API (hdf5-metno-sys, linked to the system libhdf5) is used.
//!
//! Modules: `h5` (HDF5 handles, the write helpers and their errors), `meta` (what the master
//! says, from the series header and `crate::geometry`), `master` (the master file), `data` (data
//! files, direct chunk writes); this file holds the `SeriesWriter` that drives them.

mod data;
mod h5;
mod master;
mod meta;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use hdf5_metno_sys::h5f::{H5F_scope_t, H5Fflush};
use hdf5_metno_sys::h5z::H5Z_filter_t;
use thiserror::Error;

use crate::frame::{Compression, FrameHeader, SeriesHeader};
use crate::geometry::DetectorKind;
use crate::writeback::Writeback;

use h5::{h5_init, Handle};
pub use h5::{hdf5_version, one_line};
use meta::Meta;

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
    /// This file's descriptor for the writeback thread (None: no early writeback).
    flush: Option<Arc<OwnedFd>>,
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
    /// Where the data files' bytes are handed to the device as they are written (`set_writeback`).
    writeback: Option<Writeback>,
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
        let mut pixel_mask = match &header.pixel_mask {
            Some((rows, cols, mask)) if (*rows, *cols) == (ny, nx) && mask.len() == ny * nx => {
                Some(mask.clone())
            }
            // A mask of another shape cannot describe these frames: left out.
            _ => None,
        };
        let meta = Meta::from_header(header, first);
        if meta.geometry.kind == DetectorKind::Pilatus {
            // The module gaps DIALS masks on a PILATUS's own files, whether or not a mask came.
            let mut mask = pixel_mask.take().unwrap_or_else(|| vec![0; ny * nx]);
            let gaps = meta::mark_pilatus_gaps(&mut mask, ny, nx);
            pixel_mask = (gaps || header.pixel_mask.is_some()).then_some(mask);
        }
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
            writeback: None,
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

    /// Hand each data file's bytes to the device as frames are written (see `crate::writeback`),
    /// from the next data file on.
    pub fn set_writeback(&mut self, writeback: Writeback) {
        self.writeback = Some(writeback);
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
