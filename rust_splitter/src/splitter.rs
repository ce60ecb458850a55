//! The Splitter's loop: receive the detector stream, parse it, and write every frame to disk.
//!
//! Two threads so a slow disk never stalls the detector: the receiver only receives and parses
//! (the blob stays in its ZeroMQ message, moved, never copied) and queues frames; the writer
//! drains the queue into NXmx files. The queue is unbounded: a frame received is a frame written.
//! When the queued bytes pass `buffer_bytes` the Splitter says so loudly and counts it, but keeps
//! every frame. No PyO3 here.
//!
//! The receiver alone decides what a series is, so the writer and the server follow one truth: it
//! opens a series (a header; a frame when none is open; frames of a series the timeout closed; a
//! disk with space again) under a name unique in the output directory (`series_name`: the prefix,
//! `_r2`, `_r3`, ... when it is taken), and closes it (its end, a new header, the timeout). A frame
//! that disagrees with the open series (another series id without a header, another shape, pixel
//! type or compression, a blob that cannot be the frame) is malformed: counted, reported, and it
//! changes nothing. Files are never truncated or replaced. The receiver also checks the free space
//! before each frame: when it runs short the open files are closed cleanly, frames still go to
//! readers and are counted as not written, and writing resumes under a new name when space returns.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::frame::{Compression, FrameHeader, Protocol, SeriesHeader};
use crate::nxmx::{one_line, Closed, SeriesWriter};
use crate::serve::{open_sockets, serve_loop, unix_time, Received, ServeConfig, ServeJob};
use crate::stream::{parse_message, Parsed, ParsedFrame};
use crate::writeback::Writeback;

#[derive(Debug, Clone)]
pub struct SplitterConfig {
    pub endpoint: String,
    /// Bind instead of connecting (DECTRIS detectors bind; the Splitter connects by default).
    pub bind: bool,
    /// None: detect from the first message.
    pub protocol: Option<Protocol>,
    pub output_dir: PathBuf,
    pub frames_per_file: usize,
    /// A series with no message for this long is closed (its dseries_end never came).
    pub series_timeout: Duration,
    /// Stop after this many series have ended by their end message or the timeout.
    pub max_series: Option<u64>,
    /// Header key whose value names the series' master file (its basename gives the prefix).
    pub filepath_key: Option<String>,
    /// Queued bytes above which the Splitter reports that the disk is falling behind.
    pub buffer_bytes: u64,
    /// Free space kept on the output file system beyond what the queued frames and a few more
    /// need: below it the open files are closed and frames are not written until space returns.
    pub disk_reserve: u64,
    /// Check the free space before each frame (off: write until a write fails, for file systems
    /// whose free space statvfs does not tell, e.g. some network or quota-limited ones).
    pub check_free_space: bool,
    /// Frames to readers and accounting to listeners.
    pub serve: ServeConfig,
}

/// Per-run counters, shared with Python and the threads.
#[derive(Debug, Default)]
pub struct Counters {
    pub messages: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_written: AtomicU64,
    /// Frames received but not on disk (a full disk, a write error).
    pub frames_not_written: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub frames_skipped: AtomicU64,
    pub requests: AtomicU64,
    /// Messages on the readers' port that are not a reader's request: no frame goes to them.
    pub bad_requests: AtomicU64,
    pub pending_frames: AtomicU64,
    pub readers_waiting: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Bytes of the data files whose writeback to the device was started as they were written.
    pub bytes_written_back: Arc<AtomicU64>,
    pub malformed: AtomicU64,
    pub md5_mismatches: AtomicU64,
    pub series_started: AtomicU64,
    /// Series closed, however (end message, timeout, new header, disk resume, stop): one per
    /// `series_end`, so at the end it equals `series_started`.
    pub series_ended: AtomicU64,
    /// Series closed by their end message or the timeout (what `max_series` counts).
    series_completed: AtomicU64,
    pub series_timed_out: AtomicU64,
    /// Write failures other than a full disk (`intxr splitter` exits 1 after one).
    pub write_errors: AtomicU64,
    /// Series names that were taken and replaced by a `_rN` name.
    pub renamed_series: AtomicU64,
    /// Times the free space ran short and writing stopped (seen ahead, or a write refused for
    /// want of space): handled, writing resumes when space returns.
    pub disk_full: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub max_queued_bytes: AtomicU64,
    pub buffer_overruns: AtomicU64,
    pub repaired_headers: AtomicU64,
    pub last_error: Mutex<String>,
    /// Master files of the latest `KEEP_FILES` series closed (a daemon runs for weeks).
    pub files: Mutex<std::collections::VecDeque<String>>,
    /// Master files written, all of them.
    pub master_files: AtomicU64,
    /// The latest series' accounting (`series_end` JSON, the files' `series_written` merged in).
    pub series: Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// The writer's word to the receiver: writing series `name` failed (`true`: for want of space).
    write_failed: Mutex<Option<(Arc<str>, bool)>>,
}

/// Series accounts kept for `Counters::series` (a daemon runs for weeks).
pub const KEEP_SERIES: usize = 100;

/// Master files kept for `Counters::files` (who needs all of them reads `series_written`).
pub const KEEP_FILES: usize = 1000;

impl Counters {
    /// Record a series event: a new account for `series_end`, merged into it for `series_written`
    /// (accounts are told apart by `series_name`, unique per series opened).
    pub fn record_series(&self, body: &serde_json::Value) {
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        let name = body.get("series_name").cloned();
        if let Some(existing) = series
            .iter_mut()
            .rev()
            .find(|s| s.get("series_name") == name.as_ref())
        {
            if let (Some(into), Some(from)) = (existing.as_object_mut(), body.as_object()) {
                for (key, value) in from {
                    into.insert(key.clone(), value.clone());
                }
            }
            return;
        }
        series.push_back(body.clone());
        while series.len() > KEEP_SERIES {
            series.pop_front();
        }
    }
}

impl Counters {
    pub fn error(&self, message: String) {
        eprintln!("splitter: {message}");
        if let Ok(mut last) = self.last_error.lock() {
            *last = message;
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("messages", get(&self.messages)),
            ("frames_received", get(&self.frames_received)),
            ("frames_written", get(&self.frames_written)),
            ("frames_not_written", get(&self.frames_not_written)),
            ("frames_forwarded", get(&self.frames_forwarded)),
            ("frames_skipped", get(&self.frames_skipped)),
            ("requests", get(&self.requests)),
            ("bad_requests", get(&self.bad_requests)),
            ("pending_frames", get(&self.pending_frames)),
            ("readers_waiting", get(&self.readers_waiting)),
            ("bytes_received", get(&self.bytes_received)),
            ("bytes_written", get(&self.bytes_written)),
            ("bytes_written_back", get(&self.bytes_written_back)),
            ("malformed", get(&self.malformed)),
            ("md5_mismatches", get(&self.md5_mismatches)),
            ("series_started", get(&self.series_started)),
            ("series_ended", get(&self.series_ended)),
            ("master_files", get(&self.master_files)),
            ("series_timed_out", get(&self.series_timed_out)),
            ("write_errors", get(&self.write_errors)),
            ("renamed_series", get(&self.renamed_series)),
            ("disk_full", get(&self.disk_full)),
            ("queued_bytes", get(&self.queued_bytes)),
            ("max_queued_bytes", get(&self.max_queued_bytes)),
            ("buffer_overruns", get(&self.buffer_overruns)),
            ("repaired_headers", get(&self.repaired_headers)),
        ]
    }
}

/// What the receiver hands the writer.
enum Job {
    /// Open a series under `name`, unique in the output directory.
    Start {
        name: Arc<str>,
        header: Arc<SeriesHeader>,
    },
    Frame(ParsedFrame, Arc<Received>),
    /// The free space ran short: close the open series' files cleanly and write no more of it.
    Suspend(String),
    /// Close the open series; `ended` by its end message or the timeout (what max_series counts).
    End {
        timed_out: bool,
        ended: bool,
    },
    /// The detector configuration, sent as its own message after a dheader (libertem-dectris does).
    Config(Value),
}

/// Run until `stop` is set or `max_series` series have ended (end message or timeout); returns the first fatal error
/// (a socket that cannot be opened). Bad messages are counted, never fatal.
pub fn run(
    config: SplitterConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Result<(), String> {
    let context = zmq::Context::new();
    let socket = context
        .socket(zmq::PULL)
        .map_err(|e| format!("cannot create PULL socket: {e}"))?;
    socket.set_rcvhwm(0).ok(); // never refuse the detector: memory is the buffer
    socket.set_linger(0).ok();
    if config.bind {
        socket
            .bind(&config.endpoint)
            .map_err(|e| format!("cannot bind {}: {e}", config.endpoint))?;
    } else {
        socket
            .connect(&config.endpoint)
            .map_err(|e| format!("cannot connect {}: {e}", config.endpoint))?;
    }
    // So the free space can be checked before the first series.
    let _ = std::fs::create_dir_all(&config.output_dir);
    let sockets = open_sockets(&context, &config.serve)?;
    let (serve_sender, serve_receiver) = mpsc::channel::<ServeJob>();
    let server = {
        let (config, counters, stop) = (config.clone(), counters.clone(), stop.clone());
        let serve = config.serve.clone();
        thread::Builder::new()
            .name("splitter-server".into())
            .spawn(move || serve_loop(config, serve, sockets, serve_receiver, counters, stop))
            .map_err(|e| format!("cannot start the server thread: {e}"))?
    };
    let (sender, receiver) = mpsc::channel::<Job>();
    let writer = {
        let config = config.clone();
        let counters = counters.clone();
        let serve_sender = serve_sender.clone();
        thread::Builder::new()
            .name("splitter-writer".into())
            .spawn(move || write_loop(config, receiver, counters, serve_sender))
            .map_err(|e| format!("cannot start the writer thread: {e}"))?
    };
    let mut series = Series {
        config: &config,
        counters: &counters,
        writer: sender,
        server: serve_sender,
        open: None,
        timed_out: None,
        names: HashSet::new(),
        reports: Reports::default(),
        ended: 0,
    };
    let mut protocol = config.protocol;
    let mut last_message = Instant::now();
    let mut idle_sent = true;
    let mut expect_config = false;
    while !stop.load(Ordering::Relaxed) {
        // The last series is handed to the writer: stop receiving now (not at the next poll
        // timeout); the writer drains its queue and is joined below, so the run ends when the
        // files are complete and nothing after the last end is taken.
        if config.max_series.is_some_and(|max| series.ended >= max) {
            break;
        }
        match socket.poll(zmq::POLLIN, 100) {
            Ok(0) => {
                if !idle_sent && last_message.elapsed() >= config.series_timeout {
                    series.timeout();
                    idle_sent = true;
                }
                series.reports.flush(&counters);
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                counters.error(format!("poll failed: {e}"));
                continue;
            }
        }
        let parts: Vec<zmq::Message> = match receive_parts(&socket) {
            Ok(parts) => parts,
            Err(e) => {
                counters.error(format!("receive failed: {e}"));
                continue;
            }
        };
        let received_at = unix_time();
        last_message = Instant::now();
        idle_sent = false;
        let n = counters.messages.fetch_add(1, Ordering::Relaxed) + 1;
        let size: u64 = parts.iter().map(|p| p.len() as u64).sum();
        counters.bytes_received.fetch_add(size, Ordering::Relaxed);
        let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        if expect_config {
            expect_config = false;
            if let Some(config) = crate::stream::lone_config(&slices) {
                series.config_part(config);
                continue;
            }
        }
        let parsed = match parse_message(&slices, protocol) {
            Ok(parsed) => parsed,
            Err(e) => {
                series.malformed(format!(
                    "message {n} ({} parts, {size} bytes) skipped: {e}",
                    parts.len()
                ));
                continue;
            }
        };
        drop(slices);
        // The writer and the server share this message's parts (and any frames in it).
        let parts = Arc::new(Received(parts));
        for item in parsed {
            match item {
                Parsed::Start(header) => {
                    protocol.get_or_insert(header.protocol);
                    // A v1 header with header_detail basic/all may come without its config
                    // part, which then comes as the next message on its own.
                    expect_config = crate::stream::config_follows(&header);
                    series.start(header);
                }
                Parsed::Frame(frame) => {
                    protocol.get_or_insert(frame.header.protocol);
                    series.frame(frame, &parts, received_at);
                }
                Parsed::End { series: number, .. } => series.end(number),
            }
        }
    }
    // Close what is open (not an end: the stop cut it short), then let the threads drain.
    series.close(false, false);
    series.reports.flush(&counters);
    drop(series);
    let written = writer.join();
    let served = server.join();
    written.map_err(|_| "the writer thread panicked".to_string())?;
    served.map_err(|_| "the server thread panicked".to_string())?;
    Ok(())
}

/// Malformed-message reports, rate-limited: the first few in each 10 s, then how many more.
pub(crate) struct Reports {
    /// What is reported, for the count line ("malformed messages", "bad requests").
    what: &'static str,
    /// Reports shown in each window; the rest are counted and said in one line.
    per_window: u32,
    window: Option<Instant>,
    shown: u32,
    suppressed: u64,
}

impl Default for Reports {
    fn default() -> Self {
        Reports::new("malformed messages", REPORTS_PER_WINDOW)
    }
}

const REPORTS_PER_WINDOW: u32 = 20;
const REPORT_WINDOW: Duration = Duration::from_secs(10);

impl Reports {
    pub(crate) fn new(what: &'static str, per_window: u32) -> Self {
        Reports {
            what,
            per_window,
            window: None,
            shown: 0,
            suppressed: 0,
        }
    }

    pub(crate) fn report(&mut self, counters: &Counters, message: String) {
        self.flush(counters);
        self.window.get_or_insert_with(Instant::now);
        if self.shown < self.per_window {
            self.shown += 1;
            counters.error(message);
        } else {
            self.suppressed += 1;
            if let Ok(mut last) = counters.last_error.lock() {
                *last = message;
            }
        }
    }

    /// A new window: say how many were not shown in the last one.
    pub(crate) fn flush(&mut self, counters: &Counters) {
        if self.window.is_some_and(|w| w.elapsed() >= REPORT_WINDOW) {
            if self.suppressed > 0 {
                counters.error(format!(
                    "{} more {} in the last {} s (counted, not shown)",
                    self.suppressed,
                    self.what,
                    REPORT_WINDOW.as_secs()
                ));
            }
            *self = Reports::new(self.what, self.per_window);
        }
    }
}

/// What every frame of a series must share (fixed by its first frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    shape: (usize, usize),
    elem_size: usize,
    compression: Compression,
}

impl Layout {
    fn of(frame: &FrameHeader) -> Layout {
        Layout {
            shape: frame.shape,
            elem_size: frame.elem_size,
            compression: frame.compression,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{} uint{} {:?}",
            self.shape.0,
            self.shape.1,
            self.elem_size * 8,
            self.compression
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    Writing,
    /// The free space ran short: files closed; a new part opens when space returns.
    Short,
    /// Writing failed for another reason: nothing more of this series is written.
    Broken,
}

/// The series the receiver has open.
struct Account {
    series: i64,
    name: Arc<str>,
    /// The prefix before it was made unique (a reopened part starts from it again).
    base: String,
    header: Arc<SeriesHeader>,
    layout: Option<Layout>,
    /// Messages judged malformed while it was open.
    malformed: u64,
    disk: Disk,
}

/// The receiver's view of the stream: the one place where series open and close.
struct Series<'a> {
    config: &'a SplitterConfig,
    counters: &'a Counters,
    writer: mpsc::Sender<Job>,
    server: mpsc::Sender<ServeJob>,
    open: Option<Account>,
    /// The last series the timeout closed: its frames may come again.
    timed_out: Option<Account>,
    /// Names used by this run (a name whose files were never created is still not reused).
    names: HashSet<String>,
    reports: Reports,
    /// Series handed to the writer as ended (end message or timeout): what `max_series` counts.
    ended: u64,
}

/// The master file of series `name` in `dir`.
pub fn master_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}_master.h5"))
}

/// Whether a series name has files in `dir` (its master, the master's temporary, its first data file).
fn name_taken(dir: &Path, name: &str) -> bool {
    [
        format!("{name}_master.h5"),
        format!("{name}_master.h5.tmp"),
        format!("{name}_data_000001.h5"),
    ]
    .iter()
    .any(|file| dir.join(file).symlink_metadata().is_ok())
}

/// Free bytes for an unprivileged writer on the file system of `dir`; None when unknown.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs struct to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Whether a blob can be the frame its header describes: the sizes the compressed formats declare
/// must be the frame's, an LZ4 block cannot expand past LZ4's limit, raw pixels must fill it.
fn blob_fits(frame: &FrameHeader, blob: &[u8]) -> Result<(), String> {
    let (rows, cols) = frame.shape;
    let raw = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(frame.elem_size))
        .map(|n| n as u64)
        .ok_or_else(|| format!("shape {rows}x{cols} is too large"))?;
    let pixels = || format!("{rows}x{cols} pixels of {} bytes", frame.elem_size);
    let declared = |min: usize| -> Result<(), String> {
        if blob.len() < min {
            return Err(format!("blob of {} bytes is too short", blob.len()));
        }
        let size = u64::from_be_bytes(blob[..8].try_into().expect("8 bytes"));
        if size != raw {
            return Err(format!(
                "blob declares {size} bytes, {} are {raw}",
                pixels()
            ));
        }
        Ok(())
    };
    match frame.compression {
        // Both headers start with the uncompressed size as a big-endian u64.
        Compression::BsLz4 => declared(12).and_then(|()| {
            crate::codec::bslz4_check_layout(blob, frame.elem_size)
                .map_err(|e| format!("bitshuffle-LZ4 blob of {} bytes: {e}", blob.len()))
        }),
        Compression::Lz4Hdf5 => declared(16),
        Compression::Lz4Raw => {
            // An LZ4 block expands at most 255 times; incompressible data grows by 1/255 + 16.
            let len = blob.len() as u64;
            if blob.is_empty()
                || raw > u32::MAX as u64
                || raw > len.saturating_mul(255) + 255
                || len > raw + raw / 255 + 16
            {
                return Err(format!(
                    "an LZ4 block of {len} bytes cannot hold {}",
                    pixels()
                ));
            }
            Ok(())
        }
        Compression::None => {
            if blob.len() as u64 != raw {
                return Err(format!("{} bytes, {} are {raw}", blob.len(), pixels()));
            }
            Ok(())
        }
    }
}

impl Series<'_> {
    /// A malformed message or frame: counted (for the open series too) and reported.
    fn malformed(&mut self, message: String) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        if let Some(open) = self.open.as_mut() {
            open.malformed += 1;
        }
        self.reports.report(self.counters, message);
    }

    /// `base`, else `base_r2`, `base_r3`, ...: the first name with no files in the output
    /// directory and not used before by this run.
    fn unique_name(&mut self, base: &str) -> String {
        let dir = &self.config.output_dir;
        let mut k = 1u64;
        loop {
            let name = if k == 1 {
                base.to_string()
            } else {
                format!("{base}_r{k}")
            };
            if !self.names.contains(&name) && !name_taken(dir, &name) {
                self.names.insert(name.clone());
                return name;
            }
            k += 1;
        }
    }

    /// Open a series: its unique name goes to the writer and the server, one truth for both.
    fn open(
        &mut self,
        header: Arc<SeriesHeader>,
        base: String,
        layout: Option<Layout>,
        why: Option<String>,
    ) {
        let name = self.unique_name(&base);
        let series = header.series;
        if name != base {
            self.counters.renamed_series.fetch_add(1, Ordering::Relaxed);
        }
        match (why, name != base) {
            (Some(why), _) => self
                .counters
                .error(format!("series {series}: {why}: writing it as {name}")),
            (None, true) => self.counters.error(format!(
                "series {series}: {base} is already used in {}: writing it as {name}",
                self.config.output_dir.display()
            )),
            (None, false) => {}
        }
        let name: Arc<str> = name.into();
        self.counters.series_started.fetch_add(1, Ordering::Relaxed);
        // The server needs the header's keys, not its pixel mask (up to 64 MB).
        let keys = SeriesHeader {
            protocol: header.protocol,
            series,
            header: header.header.clone(),
            config: header.config.clone(),
            pixel_mask: None,
        };
        let master: Arc<str> = master_path(&self.config.output_dir, &name)
            .display()
            .to_string()
            .into();
        let _ = self.writer.send(Job::Start {
            name: name.clone(),
            header: header.clone(),
        });
        let _ = self.server.send(ServeJob::Start {
            name: name.clone(),
            header: keys,
            master,
        });
        self.open = Some(Account {
            series,
            name,
            base,
            header,
            layout,
            malformed: 0,
            disk: Disk::Writing,
        });
    }

    /// Close the open series, if any. `ended`: by its end message or the timeout.
    fn close(&mut self, timed_out: bool, ended: bool) -> Option<Account> {
        let account = self.open.take()?;
        self.ended += u64::from(ended);
        let _ = self.writer.send(Job::End { timed_out, ended });
        let _ = self.server.send(ServeJob::End {
            name: account.name.clone(),
            timed_out,
            malformed: account.malformed,
        });
        Some(account)
    }

    fn start(&mut self, header: SeriesHeader) {
        if let Some(open) = self.open.as_ref() {
            // cbfToEiger resends its header with every frame: only a new series number is new.
            if header.protocol == Protocol::CbfToEiger && open.series == header.series {
                return;
            }
            self.counters.error(format!(
                "series {} started while series {} ({}) was open: closing it",
                header.series, open.series, open.name
            ));
            self.close(false, false);
        }
        self.timed_out = None;
        let base = prefix_for(self.config, &header, &Value::Null);
        self.open(Arc::new(header), base, None, None);
    }

    fn config_part(&mut self, config: Value) {
        if let Some(open) = self.open.as_mut() {
            Arc::make_mut(&mut open.header).config = config.clone();
            let _ = self.writer.send(Job::Config(config));
        }
    }

    fn end(&mut self, series: i64) {
        match self.open.as_ref() {
            Some(open) if open.series == series => {
                self.close(false, true);
                self.timed_out = None;
            }
            Some(open) => {
                let text = format!(
                    "end of series {series} while series {} ({}) is open: ignored",
                    open.series, open.name
                );
                self.malformed(text);
            }
            None if self.timed_out.as_ref().is_some_and(|t| t.series == series) => {
                let name = self.timed_out.take().map(|t| t.name).expect("checked");
                self.counters.error(format!(
                    "series {series}: its end came after the series timeout had closed it ({name})"
                ));
            }
            None => self.counters.error(format!(
                "end of series {series} without its series open: ignored"
            )),
        }
    }

    fn timeout(&mut self) {
        if let Some(open) = self.open.as_ref() {
            self.counters.error(format!(
                "series {} ({}): no message for the series timeout: closing it",
                open.series, open.name
            ));
        }
        if let Some(account) = self.close(true, true) {
            self.timed_out = Some(account);
        }
    }

    fn frame(&mut self, mut frame: ParsedFrame, parts: &Arc<Received>, received_at: f64) {
        let (number, index) = (frame.header.series, frame.header.frame);
        // Repaired here, once, so the disk and the readers get the same valid blob.
        let mut parts = parts.clone();
        if let Some(fixed) =
            repair_bslz4_header(&frame.header, &parts.0[frame.part][frame.range.clone()])
        {
            self.counters
                .repaired_headers
                .fetch_add(1, Ordering::Relaxed);
            frame.range = 0..fixed.len();
            frame.part = 0;
            parts = Arc::new(Received(vec![zmq::Message::from(fixed)]));
        }
        let blob_len = frame.range.len() as u64;
        if let Err(reason) = blob_fits(&frame.header, &parts.0[frame.part][frame.range.clone()]) {
            self.malformed(format!("series {number} frame {index}: {reason}: skipped"));
            return;
        }
        match self.open.as_ref() {
            None => {
                if self.timed_out.as_ref().is_some_and(|t| t.series == number) {
                    let closed = self.timed_out.take().expect("checked");
                    let why = format!(
                        "frame {index} came after the series timeout had closed {}",
                        closed.name
                    );
                    self.open(closed.header, closed.base, closed.layout, Some(why));
                } else {
                    // Started mid-series (or the header was lost): the frame says what it can.
                    let header = SeriesHeader {
                        protocol: frame.header.protocol,
                        series: number,
                        header: frame.header.header.clone(),
                        config: Value::Null,
                        pixel_mask: None,
                    };
                    let base = prefix_for(self.config, &header, &frame.header.header);
                    self.timed_out = None;
                    let why = format!("frame {index} arrived before any header");
                    self.open(Arc::new(header), base, None, Some(why));
                }
            }
            Some(open) if open.series != number => {
                let text = format!(
                    "series {number} frame {index}: no header for series {number} while series {} ({}) is open: skipped",
                    open.series, open.name
                );
                self.malformed(text);
                return;
            }
            Some(_) => {}
        }
        let layout = Layout::of(&frame.header);
        let open = self.open.as_mut().expect("a series is open");
        match open.layout {
            Some(series) if series != layout => {
                let text = format!(
                    "series {number} frame {index}: {layout} differs from the series' {series}: skipped"
                );
                self.malformed(text);
                return;
            }
            Some(_) => {}
            None => open.layout = Some(layout),
        }
        self.check_disk(blob_len);
        let name = self.open.as_ref().expect("a series is open").name.clone();
        self.counters
            .frames_received
            .fetch_add(1, Ordering::Relaxed);
        if frame.header.md5_ok == Some(false) {
            self.counters.md5_mismatches.fetch_add(1, Ordering::Relaxed);
            self.counters.error(format!(
                "series {number} frame {index}: dimage hash does not match the dimage_d part"
            ));
        }
        let queued = self
            .counters
            .queued_bytes
            .fetch_add(blob_len, Ordering::Relaxed)
            + blob_len;
        self.counters
            .max_queued_bytes
            .fetch_max(queued, Ordering::Relaxed);
        // Said once per episode (the first frame over the limit), counted for every frame.
        if queued > self.config.buffer_bytes
            && (self
                .counters
                .buffer_overruns
                .fetch_add(1, Ordering::Relaxed)
                == 0
                || queued - blob_len <= self.config.buffer_bytes)
        {
            self.counters.error(format!(
                "disk is falling behind: {queued} bytes queued (limit {}); every frame is kept",
                self.config.buffer_bytes
            ));
        }
        let _ = self.server.send(ServeJob::Frame {
            name,
            header: frame.header.clone(),
            parts: parts.clone(),
            part: frame.part,
            range: frame.range.clone(),
            received: received_at,
        });
        let _ = self.writer.send(Job::Frame(frame, parts));
    }

    /// Before a frame of the open series: is there room for it, the frames queued before it and a
    /// margin? When not, the files are closed cleanly; when space returns, a new part opens.
    fn check_disk(&mut self, blob_len: u64) {
        let failed = self
            .counters
            .write_failed
            .lock()
            .ok()
            .and_then(|mut f| f.take());
        let open = self.open.as_mut().expect("a series is open");
        if let Some((name, space)) = failed {
            if name == open.name && open.disk == Disk::Writing {
                open.disk = if space { Disk::Short } else { Disk::Broken };
            }
        }
        // Unchecked, a series stops writing only when a write fails; space is still checked to resume.
        if open.disk == Disk::Broken
            || (open.disk == Disk::Writing && !self.config.check_free_space)
        {
            return;
        }
        let dir = &self.config.output_dir;
        let Some(free) = free_bytes(dir) else {
            return;
        };
        let queued = self.counters.queued_bytes.load(Ordering::Relaxed);
        // Room for what is queued, this frame and a few more, and the reserve (HDF5 metadata,
        // the master file rewritten at the end).
        let need = queued + 5 * blob_len + self.config.disk_reserve;
        match open.disk {
            Disk::Writing if free < need => {
                open.disk = Disk::Short;
                self.counters.disk_full.fetch_add(1, Ordering::Relaxed);
                let text = format!(
                    "{} free in {}, {} needed: closing its files; frames still go to readers, writing resumes when space returns",
                    mib(free),
                    dir.display(),
                    mib(need)
                );
                self.counters
                    .error(format!("series {} ({}): {text}", open.series, open.name));
                let _ = self.writer.send(Job::Suspend(format!(
                    "disk full: {} free in {}",
                    mib(free),
                    dir.display()
                )));
            }
            // Resumes with room to spare, so it does not stop again at once.
            Disk::Short if free >= need + self.config.disk_reserve => {
                let account = self.close(false, false).expect("a series is open");
                let why = format!(
                    "space again in {} ({} free) after {}",
                    dir.display(),
                    mib(free),
                    account.name
                );
                self.open(account.header, account.base, account.layout, Some(why));
            }
            _ => {}
        }
    }
}

/// Some producers (libertem-dectris's simulator) send bitshuffle-LZ4 blobs whose 12-byte header is
/// all zeros. The blocks are fine; only the header is missing, and the frame's shape gives it back
/// (total bytes; bitshuffle's default block of 8 KiB). Returns a copy with the header filled in, or
/// None when the blob needs nothing.
fn repair_bslz4_header(frame: &FrameHeader, blob: &[u8]) -> Option<Vec<u8>> {
    if frame.compression != Compression::BsLz4 || blob.len() < 12 || blob[..12] != [0u8; 12] {
        return None;
    }
    let total = frame
        .shape
        .0
        .checked_mul(frame.shape.1)?
        .checked_mul(frame.elem_size)? as u64;
    let block = (crate::codec::default_block_elems(frame.elem_size) * frame.elem_size) as u32;
    let mut fixed = blob.to_vec();
    fixed[..8].copy_from_slice(&total.to_be_bytes());
    fixed[8..12].copy_from_slice(&block.to_be_bytes());
    Some(fixed)
}

/// One multipart message as ZeroMQ messages: the blobs stay in ZeroMQ's buffers (no copy).
fn receive_parts(socket: &zmq::Socket) -> Result<Vec<zmq::Message>, zmq::Error> {
    let mut parts = Vec::new();
    loop {
        let message = socket.recv_msg(0)?;
        let more = message.get_more();
        parts.push(message);
        if !more {
            return Ok(parts);
        }
    }
}

/// The writer's side of one series.
struct OpenSeries {
    series: i64,
    name: Arc<str>,
    header: Arc<SeriesHeader>,
    writer: Option<SeriesWriter>,
    /// Its writer once the files are closed.
    closed: Option<SeriesWriter>,
    /// Writing has stopped for this series (a full disk, an error): its files are closed.
    stopped: bool,
    /// What the closed files hold: readable frames and the master file.
    written: usize,
    master: Option<String>,
    not_written: u64,
    write_error: Option<String>,
}

/// A write error that means "no space": writing may resume when space returns.
fn is_space_error(text: &str) -> bool {
    [
        "No space left",
        "errno = 28",
        "os error 28",
        "Disk quota exceeded",
        "errno = 122",
    ]
    .iter()
    .any(|s| text.contains(s))
}

impl OpenSeries {
    fn not_written(&mut self, counters: &Counters) {
        self.not_written += 1;
        counters.frames_not_written.fetch_add(1, Ordering::Relaxed);
    }

    /// Close the files (cleanly, so what was written stays readable); frames counted as written
    /// that are not readable after all (a data file that could not be closed) move to not written.
    fn close_files(&mut self, counters: &Counters) -> Option<String> {
        let mut writer = self.writer.take()?;
        let claimed = writer.frames_written();
        let Closed { summary, error } = writer.close();
        // Kept: a final master the full disk refused is written again when the series closes.
        self.closed = Some(writer);
        let lost = claimed.saturating_sub(summary.frames) as u64;
        if lost > 0 {
            counters.frames_written.fetch_sub(lost, Ordering::Relaxed);
            counters
                .frames_not_written
                .fetch_add(lost, Ordering::Relaxed);
            self.not_written += lost;
        }
        self.written = summary.frames;
        self.master = Some(summary.master.display().to_string());
        error.map(|e| one_line(&e.to_string()))
    }

    /// Writing failed: close what is open, never write to it again, tell the receiver.
    fn fail(&mut self, counters: &Counters, error: String) {
        if is_space_error(&error) {
            counters.disk_full.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.stopped = true;
        self.close_files(counters);
        counters.error(format!(
            "series {} ({}): writing failed: {error}; files closed with {} frames readable",
            self.series, self.name, self.written
        ));
        if let Ok(mut failed) = counters.write_failed.lock() {
            *failed = Some((self.name.clone(), is_space_error(&error)));
        }
        self.write_error.get_or_insert(error);
    }
}

fn write_loop(
    config: SplitterConfig,
    jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    serve: mpsc::Sender<ServeJob>,
) {
    let mut open: Option<OpenSeries> = None;
    let (writeback, flusher) = match Writeback::start(counters.bytes_written_back.clone()) {
        Ok((writeback, flusher)) => (Some(writeback), Some(flusher)),
        Err(e) => {
            counters.error(format!(
                "no early writeback (the kernel's own applies): {e}"
            ));
            (None, None)
        }
    };
    loop {
        let job = match jobs.recv_timeout(crate::nxmx::FLUSH_INTERVAL) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Idle: let readers of the open series see its last frames.
                if let Some(writer) = open.as_mut().and_then(|o| o.writer.as_mut()) {
                    writer.flush_if_due();
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match job {
            Job::Start { name, header } => {
                if let Some(previous) = open.take() {
                    close(previous, &counters, &serve, false, false);
                }
                open = Some(OpenSeries {
                    series: header.series,
                    name,
                    header,
                    writer: None,
                    closed: None,
                    stopped: false,
                    written: 0,
                    master: None,
                    not_written: 0,
                    write_error: None,
                });
            }
            Job::Frame(frame, parts) => {
                let blob = &parts.0[frame.part][frame.range.clone()];
                let len = blob.len() as u64;
                write_frame(
                    &config,
                    open.as_mut(),
                    &frame,
                    blob,
                    &counters,
                    writeback.as_ref(),
                );
                counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            Job::Suspend(reason) => {
                if let Some(series) = open.as_mut() {
                    series.stopped = true;
                    if let Some(error) = series.close_files(&counters) {
                        // Already counted as a full disk when it is one.
                        if !is_space_error(&error) {
                            counters.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        counters.error(format!(
                            "series {} ({}): closing its files failed: {error}",
                            series.series, series.name
                        ));
                    }
                    series.write_error.get_or_insert(reason);
                }
            }
            Job::End { timed_out, ended } => {
                if let Some(current) = open.take() {
                    close(current, &counters, &serve, timed_out, ended);
                }
            }
            Job::Config(config) => {
                if let Some(series) = open.as_mut() {
                    Arc::make_mut(&mut series.header).config = config;
                }
            }
        }
    }
    // The receiver has stopped and the queue is drained: close what is open.
    if let Some(current) = open.take() {
        close(current, &counters, &serve, false, false);
    }
    // The files are closed: what the flusher has not started yet, the kernel writes back itself.
    if let Some(writeback) = writeback {
        writeback.stop();
    }
    drop(flusher);
}

fn write_frame(
    config: &SplitterConfig,
    open: Option<&mut OpenSeries>,
    frame: &ParsedFrame,
    blob: &[u8],
    counters: &Counters,
    writeback: Option<&Writeback>,
) {
    let Some(series) = open else {
        // The receiver opens a series before its frames: not reached.
        counters.frames_not_written.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if series.stopped {
        series.not_written(counters);
        return;
    }
    if series.writer.is_none() {
        match SeriesWriter::create(
            &config.output_dir,
            &series.name,
            &series.header,
            &frame.header,
            config.frames_per_file,
        ) {
            Ok(mut writer) => {
                if let Some(writeback) = writeback {
                    writer.set_writeback(writeback.clone());
                }
                series.writer = Some(writer)
            }
            Err(e) => {
                series.not_written(counters);
                series.fail(
                    counters,
                    format!(
                        "cannot create files for {}: {}",
                        series.name,
                        one_line(&e.to_string())
                    ),
                );
                return;
            }
        }
    }
    let writer = series.writer.as_mut().expect("created above");
    match writer.write_frame(&frame.header, blob) {
        Ok(()) => {
            counters.frames_written.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_written
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
        }
        // A frame the series cannot take (the receiver refuses these first): that frame only.
        Err(e) if writer.failed().is_none() => {
            series.not_written(counters);
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
            counters.error(one_line(&e.to_string()));
        }
        Err(e) => {
            series.not_written(counters);
            series.fail(counters, one_line(&e.to_string()));
        }
    }
}

fn close(
    mut series: OpenSeries,
    counters: &Counters,
    serve: &mpsc::Sender<ServeJob>,
    timed_out: bool,
    ended: bool,
) {
    if let Some(error) = series.close_files(counters) {
        if is_space_error(&error) {
            counters.disk_full.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        counters.error(format!(
            "series {} ({}): closing its files failed: {error}",
            series.series, series.name
        ));
        series.write_error.get_or_insert(error);
    }
    if let Some(Err(e)) = series.closed.as_mut().and_then(|w| w.retry_master()) {
        counters.error(format!(
            "series {} ({}): its final master file could not be written: {}",
            series.series,
            series.name,
            one_line(&e.to_string())
        ));
    }
    if series.not_written > 0 {
        counters.error(format!(
            "series {} ({}): {} frames not written ({}); {} frames on disk",
            series.series,
            series.name,
            series.not_written,
            series.write_error.as_deref().unwrap_or("no reason known"),
            series.written
        ));
    }
    let master = series.master.clone();
    if let (Some(path), Ok(mut files)) = (master.as_ref(), counters.files.lock()) {
        files.push_back(path.clone());
        while files.len() > KEEP_FILES {
            files.pop_front();
        }
        counters.master_files.fetch_add(1, Ordering::Relaxed);
    }
    let _ = serve.send(ServeJob::Written(json!({
        "series": series.series,
        "series_name": &*series.name,
        "frames_written": series.written,
        "master_file": master,
        "not_written": series.not_written,
        "write_error": series.write_error,
    })));
    // Counted once the files are complete: whoever sees the count can open them.
    if timed_out {
        counters.series_timed_out.fetch_add(1, Ordering::Relaxed);
    }
    if ended {
        counters.series_completed.fetch_add(1, Ordering::Relaxed);
    }
    counters.series_ended.fetch_add(1, Ordering::Relaxed);
}

/// The file prefix of a series: the basename of the header's file-path key value without
/// `_master.h5`, else `series_NNNNNN`; always under the output directory.
pub(crate) fn prefix_for(
    config: &SplitterConfig,
    header: &SeriesHeader,
    frame_header: &serde_json::Value,
) -> String {
    let from_key = config.filepath_key.as_deref().and_then(|key| {
        header
            .header
            .get(key)
            .or_else(|| header.config.get(key))
            .or_else(|| frame_header.get(key))
    });
    if let Some(serde_json::Value::String(path)) = from_key {
        let base = path.rsplit('/').next().unwrap_or("");
        let stem = base.trim_end_matches(".h5").trim_end_matches("_master");
        let clean: String = stem
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        if !clean.is_empty() && clean != "." && clean != ".." {
            return clean;
        }
    }
    format!("series_{:06}", header.series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameHeader;

    fn frame(shape: (usize, usize), compression: Compression) -> FrameHeader {
        FrameHeader {
            protocol: Protocol::V1,
            series: 1,
            frame: 0,
            shape,
            elem_size: 2,
            compression,
            encoding: String::new(),
            md5_ok: None,
            header: Value::Null,
        }
    }

    #[test]
    fn a_blob_must_be_able_to_be_its_frame() {
        let pixels: Vec<u8> = (0..96 * 128 * 2).map(|i| (i % 7) as u8).collect();
        let blob = crate::codec::bslz4_compress(&pixels, 2, 0).unwrap();
        assert!(blob_fits(&frame((96, 128), Compression::BsLz4), &blob).is_ok());
        let absurd = blob_fits(&frame((1 << 20, 1 << 20), Compression::BsLz4), &blob).unwrap_err();
        assert!(absurd.contains("blob declares 24576 bytes"), "{absurd}");
        let cut = blob_fits(
            &frame((96, 128), Compression::BsLz4),
            &blob[..blob.len() / 2],
        );
        assert!(cut.unwrap_err().contains("truncated"));
        let lz4 = crate::codec::lz4_compress(&pixels);
        assert!(blob_fits(&frame((96, 128), Compression::Lz4Raw), &lz4).is_ok());
        assert!(blob_fits(&frame((1 << 20, 1 << 20), Compression::Lz4Raw), &lz4).is_err());
        assert!(blob_fits(&frame((96, 128), Compression::None), &pixels).is_ok());
        assert!(blob_fits(&frame((96, 129), Compression::None), &pixels).is_err());
        assert!(blob_fits(&frame((usize::MAX, 3), Compression::None), &pixels).is_err());
    }

    #[test]
    fn every_closed_series_is_counted_and_the_files_list_stays_bounded() {
        let counters = Counters::default();
        let (serve, published) = mpsc::channel();
        let n = KEEP_FILES + 5;
        for k in 0..n {
            let series = OpenSeries {
                series: k as i64,
                name: format!("s{k}").into(),
                header: Arc::new(SeriesHeader {
                    protocol: Protocol::V1,
                    series: k as i64,
                    header: Value::Null,
                    config: Value::Null,
                    pixel_mask: None,
                }),
                writer: None,
                closed: None,
                stopped: false,
                written: 0,
                master: Some(format!("s{k}_master.h5")),
                not_written: 0,
                write_error: None,
            };
            // Every other one ended by its end message; the rest cut short (a stop, a new header).
            close(series, &counters, &serve, false, k % 2 == 0);
        }
        assert_eq!(counters.series_ended.load(Ordering::Relaxed), n as u64);
        assert_eq!(
            counters.series_completed.load(Ordering::Relaxed),
            n.div_ceil(2) as u64
        );
        assert_eq!(counters.master_files.load(Ordering::Relaxed), n as u64);
        let files = counters.files.lock().unwrap();
        assert_eq!(files.len(), KEEP_FILES);
        assert_eq!(files.front().unwrap(), "s5_master.h5");
        assert_eq!(published.try_iter().count(), n); // a series_written for each
    }

    #[test]
    fn names_taken_on_disk_or_by_this_run_get_a_suffix() {
        let dir = std::env::temp_dir().join(format!("splitter-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("series_000001_master.h5"), b"earlier run").unwrap();
        std::fs::write(dir.join("series_000001_r2_data_000001.h5"), b"earlier run").unwrap();
        let config = SplitterConfig {
            endpoint: String::new(),
            bind: false,
            protocol: None,
            output_dir: dir.clone(),
            frames_per_file: 1,
            series_timeout: Duration::from_secs(1),
            max_series: None,
            filepath_key: None,
            buffer_bytes: 0,
            disk_reserve: 0,
            check_free_space: true,
            serve: ServeConfig {
                endpoint: None,
                mode: crate::serve::ServeMode::Request,
                skip_after: Duration::from_secs(1),
                heartbeat: Duration::from_secs(1),
                publish: None,
            },
        };
        let counters = Counters::default();
        let (writer, _w) = mpsc::channel();
        let (server, _s) = mpsc::channel();
        let mut series = Series {
            config: &config,
            counters: &counters,
            writer,
            server,
            open: None,
            timed_out: None,
            names: HashSet::new(),
            reports: Reports::default(),
            ended: 0,
        };
        assert_eq!(series.unique_name("series_000001"), "series_000001_r3");
        assert_eq!(series.unique_name("series_000001"), "series_000001_r4");
        assert_eq!(series.unique_name("other"), "other");
        assert_eq!(series.unique_name("other"), "other_r2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
