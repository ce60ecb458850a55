//! Early writeback of the data files: frames go to the device while the series is still arriving.
//!
//! A write only copies a frame into the page cache; the kernel writes it to the device later, when
//! its dirty-page thresholds are passed (then whoever writes next is throttled until the device
//! catches up) or when the file is synced. At a detector's rates that means gigabytes of dirty
//! pages, stalls of the writer, and a long wait for whoever syncs the files. Here each data file's
//! new bytes are handed to the device as they are written: `sync_file_range(2)` with
//! `SYNC_FILE_RANGE_WRITE` only starts the writeback (it waits for nothing but room in the
//! device's queue), and it runs in a thread of its own, so the writer never waits on the device.
//! The thread holds its own (read-only) descriptor of each file, valid after HDF5 closes its own.
//! Where a file system does not support it (the call fails), nothing changes: the kernel's
//! writeback is the fallback.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

/// Where a series writer reports what it wrote (clone one per writer).
#[derive(Clone)]
pub struct Writeback {
    /// A data file that has new bytes in the page cache.
    sender: mpsc::Sender<Arc<OwnedFd>>,
    stop: Arc<AtomicBool>,
}

impl Writeback {
    /// Start the thread; `started` counts the bytes whose writeback it has started. The thread
    /// ends when every `Writeback` is dropped, or at once after `stop`.
    pub fn start(started: Arc<AtomicU64>) -> std::io::Result<(Writeback, thread::JoinHandle<()>)> {
        let (sender, receiver) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("splitter-flush".into())
                .spawn(move || run(receiver, &started, &stop))?
        };
        Ok((Writeback { sender, stop }, handle))
    }

    /// Leave what is not yet started to the kernel's own writeback (the Splitter is stopping: its
    /// files are closed, and waiting for the device would only delay the stop).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The file has new bytes (the thread finds out how many: the writer only sends).
    pub fn written(&self, file: &Arc<OwnedFd>) {
        let _ = self.sender.send(file.clone());
    }
}

fn run(receiver: mpsc::Receiver<Arc<OwnedFd>>, started: &AtomicU64, stop: &AtomicBool) {
    // Per file (by its Arc), the offset up to which writeback has been started.
    let mut done: Vec<(Arc<OwnedFd>, u64)> = Vec::new();
    while let Ok(first) = receiver.recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Everything reported since the last round: one call per file for all of it.
        for file in std::iter::once(first).chain(receiver.try_iter()) {
            if !done.iter().any(|(f, _)| Arc::ptr_eq(f, &file)) {
                done.push((file, 0));
            }
        }
        for (file, from) in done.iter_mut() {
            // SAFETY: fstat fills the struct it is given, for a descriptor we own.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
                continue;
            }
            let end = st.st_size as u64;
            if end > *from {
                // SAFETY: a plain system call on a descriptor we own.
                let ret = unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        *from as libc::off64_t,
                        (end - *from) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
                if ret == 0 {
                    started.fetch_add(end - *from, Ordering::Relaxed);
                }
                *from = end;
            }
        }
        // Files the writer has closed (only this thread holds them now) are done.
        done.retain(|(file, _)| Arc::strong_count(file) > 1);
    }
}
