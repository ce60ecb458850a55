//! The Splitter's loop: receive the detector stream, parse it, and write every frame to disk.
//!
//! Two threads so a slow disk never stalls the detector: the receiver only receives and parses
//! (the blob stays in its ZeroMQ message, moved, never copied) and queues frames; the writer
//! drains the queue into NXmx files. The queue is unbounded: a frame received is a frame written.
//! When the queued bytes pass `buffer_bytes` the Splitter says so loudly and counts it, but keeps
//! every frame. No PyO3 here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::frame::{Protocol, SeriesHeader};
use crate::nxmx::SeriesWriter;
use crate::serve::{open_sockets, serve_loop, unix_time, Received, ServeConfig, ServeJob};
use crate::stream::{parse_message, Parsed, ParsedFrame};

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
    /// Stop after this many series have ended.
    pub max_series: Option<u64>,
    /// Header key whose value names the series' master file (its basename gives the prefix).
    pub filepath_key: Option<String>,
    /// Queued bytes above which the Splitter reports that the disk is falling behind.
    pub buffer_bytes: u64,
    /// Frames to readers and accounting to listeners.
    pub serve: ServeConfig,
}

/// Per-run counters, shared with Python and the threads.
#[derive(Debug, Default)]
pub struct Counters {
    pub messages: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_written: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub frames_skipped: AtomicU64,
    pub requests: AtomicU64,
    pub pending_frames: AtomicU64,
    pub readers_waiting: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_written: AtomicU64,
    pub malformed: AtomicU64,
    pub md5_mismatches: AtomicU64,
    pub series_started: AtomicU64,
    pub series_ended: AtomicU64,
    pub series_timed_out: AtomicU64,
    pub write_errors: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub max_queued_bytes: AtomicU64,
    pub buffer_overruns: AtomicU64,
    pub repaired_headers: AtomicU64,
    pub last_error: Mutex<String>,
    pub files: Mutex<Vec<String>>,
    /// The latest series' accounting (`series_end` JSON, the files' `series_written` merged in).
    pub series: Mutex<std::collections::VecDeque<serde_json::Value>>,
}

/// Series accounts kept for `Counters::series` (a daemon runs for weeks).
pub const KEEP_SERIES: usize = 100;

impl Counters {
    /// Record a series event: a new account for `series_end`, merged into it for `series_written`.
    pub fn record_series(&self, body: &serde_json::Value) {
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        let number = body.get("series").cloned();
        if let Some(existing) = series
            .iter_mut()
            .rev()
            .find(|s| s.get("series") == number.as_ref())
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
            ("frames_forwarded", get(&self.frames_forwarded)),
            ("frames_skipped", get(&self.frames_skipped)),
            ("requests", get(&self.requests)),
            ("pending_frames", get(&self.pending_frames)),
            ("readers_waiting", get(&self.readers_waiting)),
            ("bytes_received", get(&self.bytes_received)),
            ("bytes_written", get(&self.bytes_written)),
            ("malformed", get(&self.malformed)),
            ("md5_mismatches", get(&self.md5_mismatches)),
            ("series_started", get(&self.series_started)),
            ("series_ended", get(&self.series_ended)),
            ("series_timed_out", get(&self.series_timed_out)),
            ("write_errors", get(&self.write_errors)),
            ("queued_bytes", get(&self.queued_bytes)),
            ("max_queued_bytes", get(&self.max_queued_bytes)),
            ("buffer_overruns", get(&self.buffer_overruns)),
            ("repaired_headers", get(&self.repaired_headers)),
        ]
    }
}

/// What the receiver hands the writer.
enum Job {
    Start(SeriesHeader),
    Frame(ParsedFrame, Arc<Received>),
    End(i64),
    /// The detector configuration, sent as its own message after a dheader (libertem-dectris does).
    Config(serde_json::Value),
    /// No message for `series_timeout`: close any open series.
    Idle,
}

/// A v1 header with header_detail basic/all may arrive without its config part, which then comes
/// as the next message on its own: a JSON object without an htype.
fn lone_config(parts: &[&[u8]]) -> Option<serde_json::Value> {
    if parts.len() != 1 {
        return None;
    }
    let text = parts[0].strip_suffix(b"\0").unwrap_or(parts[0]);
    match serde_json::from_slice::<serde_json::Value>(text.trim_ascii_end()) {
        Ok(value) if value.is_object() && value.get("htype").is_none() => Some(value),
        _ => None,
    }
}

/// Run until `stop` is set or `max_series` series have ended; returns the first fatal error
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
    let mut protocol = config.protocol;
    let mut last_message = Instant::now();
    let mut idle_sent = true;
    let mut warned_buffer = false;
    let mut expect_config = false;
    while !stop.load(Ordering::Relaxed) {
        // The writer counts ended series; checked every poll so the run ends once it has caught up.
        if config
            .max_series
            .is_some_and(|max| counters.series_ended.load(Ordering::Relaxed) >= max)
        {
            break;
        }
        match socket.poll(zmq::POLLIN, 100) {
            Ok(0) => {
                if !idle_sent && last_message.elapsed() >= config.series_timeout {
                    let _ = sender.send(Job::Idle);
                    let _ = serve_sender.send(ServeJob::TimedOut);
                    idle_sent = true;
                }
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
            if let Some(config) = lone_config(&slices) {
                let _ = sender.send(Job::Config(config));
                continue;
            }
        }
        let parsed = match parse_message(&slices, protocol) {
            Ok(parsed) => parsed,
            Err(e) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                counters.error(format!(
                    "message {n} ({} parts, {size} bytes) skipped: {e}",
                    parts.len()
                ));
                continue;
            }
        };
        drop(slices);
        let mut frames = Vec::new();
        for item in parsed {
            match item {
                Parsed::Start(header) => {
                    protocol.get_or_insert(header.protocol);
                    let detail = header
                        .header
                        .get("header_detail")
                        .and_then(|d| d.as_str())
                        .unwrap_or("none");
                    let no_config = header.config.as_object().is_none_or(|c| c.is_empty());
                    expect_config =
                        header.protocol == Protocol::V1 && detail != "none" && no_config;
                    let malformed = counters.malformed.load(Ordering::Relaxed);
                    // The server needs the header's keys, not its pixel mask (up to 64 MB).
                    let keys = SeriesHeader {
                        pixel_mask: None,
                        header: header.header.clone(),
                        config: header.config.clone(),
                        ..header
                    };
                    let _ = serve_sender.send(ServeJob::Start(keys, malformed));
                    let _ = sender.send(Job::Start(header));
                }
                Parsed::Frame(frame) => {
                    protocol.get_or_insert(frame.header.protocol);
                    frames.push(frame);
                }
                Parsed::End { series, .. } => {
                    let _ = sender.send(Job::End(series));
                    let _ = serve_sender.send(ServeJob::End(series));
                }
            }
        }
        // The writer and the server share this message's parts (and any frames in it).
        let parts = Arc::new(Received(parts));
        for mut frame in frames {
            counters.frames_received.fetch_add(1, Ordering::Relaxed);
            // Repaired here, once, so the disk and the readers get the same valid blob.
            let mut parts = parts.clone();
            if let Some(fixed) =
                repair_bslz4_header(&frame.header, &parts.0[frame.part][frame.range.clone()])
            {
                counters.repaired_headers.fetch_add(1, Ordering::Relaxed);
                frame.range = 0..fixed.len();
                frame.part = 0;
                parts = Arc::new(Received(vec![zmq::Message::from(fixed)]));
            }
            if frame.header.md5_ok == Some(false) {
                counters.md5_mismatches.fetch_add(1, Ordering::Relaxed);
                counters.error(format!(
                    "series {} frame {}: dimage hash does not match the dimage_d part",
                    frame.header.series, frame.header.frame
                ));
            }
            let blob_len = frame.range.len() as u64;
            let queued = counters.queued_bytes.fetch_add(blob_len, Ordering::Relaxed) + blob_len;
            counters
                .max_queued_bytes
                .fetch_max(queued, Ordering::Relaxed);
            if queued > config.buffer_bytes {
                counters.buffer_overruns.fetch_add(1, Ordering::Relaxed);
                if !warned_buffer {
                    counters.error(format!(
                        "disk is falling behind: {queued} bytes queued (limit {}); every frame is kept",
                        config.buffer_bytes
                    ));
                    warned_buffer = true;
                }
            } else {
                warned_buffer = false;
            }
            let _ = serve_sender.send(ServeJob::Frame {
                header: frame.header.clone(),
                parts: parts.clone(),
                part: frame.part,
                range: frame.range.clone(),
                received: received_at,
            });
            let _ = sender.send(Job::Frame(frame, parts));
        }
    }
    drop(sender);
    drop(serve_sender);
    let written = writer.join();
    let served = server.join();
    written.map_err(|_| "the writer thread panicked".to_string())?;
    served.map_err(|_| "the server thread panicked".to_string())?;
    Ok(())
}

/// Some producers (libertem-dectris's simulator) send bitshuffle-LZ4 blobs whose 12-byte header is
/// all zeros. The blocks are fine; only the header is missing, and the frame's shape gives it back
/// (total bytes; bitshuffle's default block of 8 KiB). Returns a copy with the header filled in, or
/// None when the blob needs nothing.
fn repair_bslz4_header(frame: &crate::frame::FrameHeader, blob: &[u8]) -> Option<Vec<u8>> {
    if frame.compression != crate::frame::Compression::BsLz4
        || blob.len() < 12
        || blob[..12] != [0u8; 12]
    {
        return None;
    }
    let total = (frame.shape.0 * frame.shape.1 * frame.elem_size) as u64;
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

struct OpenSeries {
    series: i64,
    header: SeriesHeader,
    writer: Option<SeriesWriter>,
}

fn write_loop(
    config: SplitterConfig,
    jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    serve: mpsc::Sender<ServeJob>,
) {
    let mut open: Option<OpenSeries> = None;
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
            Job::Start(header) => {
                // cbfToEiger resends its header with every frame: only a new series number starts one.
                if open.as_ref().is_some_and(|o| o.series == header.series) {
                    continue;
                }
                if let Some(previous) = open.take() {
                    if previous.writer.is_some() {
                        counters.error(format!(
                            "series {} started while series {} was open: closing it",
                            header.series, previous.series
                        ));
                    }
                    close(previous, &counters, &serve, false);
                }
                counters.series_started.fetch_add(1, Ordering::Relaxed);
                open = Some(OpenSeries {
                    series: header.series,
                    header,
                    writer: None,
                });
            }
            Job::Frame(frame, parts) => {
                let blob = &parts.0[frame.part][frame.range.clone()];
                let len = blob.len() as u64;
                if open
                    .as_ref()
                    .is_none_or(|o| o.series != frame.header.series)
                {
                    if let Some(previous) = open.take() {
                        counters.error(format!(
                            "series {} frame {} arrived in series {}: closing it",
                            frame.header.series, frame.header.frame, previous.series
                        ));
                        close(previous, &counters, &serve, false);
                    } else {
                        counters.error(format!(
                            "series {} frame {} arrived before any header: written with what the frame says",
                            frame.header.series, frame.header.frame
                        ));
                    }
                    counters.series_started.fetch_add(1, Ordering::Relaxed);
                    open = Some(OpenSeries {
                        series: frame.header.series,
                        header: SeriesHeader {
                            protocol: frame.header.protocol,
                            series: frame.header.series,
                            header: frame.header.header.clone(),
                            config: serde_json::Value::Null,
                            pixel_mask: None,
                        },
                        writer: None,
                    });
                }
                let series = open.as_mut().expect("a series is open");
                if series.writer.is_none() {
                    let prefix = prefix_for(&config, &series.header, &frame.header.header);
                    match SeriesWriter::create(
                        &config.output_dir,
                        &prefix,
                        &series.header,
                        &frame.header,
                        config.frames_per_file,
                    ) {
                        Ok(writer) => series.writer = Some(writer),
                        Err(e) => {
                            counters.write_errors.fetch_add(1, Ordering::Relaxed);
                            counters.error(format!(
                                "series {}: cannot create files for {prefix}: {e}",
                                series.series
                            ));
                        }
                    }
                }
                if let Some(writer) = series.writer.as_mut() {
                    match writer.write_frame(&frame.header, blob) {
                        Ok(()) => {
                            counters.frames_written.fetch_add(1, Ordering::Relaxed);
                            counters.bytes_written.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            counters.write_errors.fetch_add(1, Ordering::Relaxed);
                            counters.error(format!(
                                "series {} frame {}: {e}",
                                frame.header.series, frame.header.frame
                            ));
                        }
                    }
                }
                counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            Job::End(series) => {
                if let Some(current) = open.take() {
                    if current.series != series {
                        counters.error(format!(
                            "end of series {series} while series {} was open",
                            current.series
                        ));
                    }
                    close(current, &counters, &serve, false);
                }
                counters.series_ended.fetch_add(1, Ordering::Relaxed);
            }
            Job::Config(config) => {
                if let Some(series) = open.as_mut() {
                    series.header.config = config;
                }
            }
            Job::Idle => {
                if let Some(current) = open.take() {
                    counters.error(format!(
                        "series {}: no message for the series timeout: closing it",
                        current.series
                    ));
                    close(current, &counters, &serve, true);
                }
            }
        }
    }
    // The receiver has stopped and the queue is drained: close what is open.
    if let Some(current) = open.take() {
        close(current, &counters, &serve, false);
    }
}

fn close(series: OpenSeries, counters: &Counters, serve: &mpsc::Sender<ServeJob>, timed_out: bool) {
    if let Some(writer) = series.writer {
        match writer.finish() {
            Ok(summary) => {
                let _ = serve.send(ServeJob::Written {
                    series: series.series,
                    frames: summary.frames,
                    master: summary.master.display().to_string(),
                });
                if let Ok(mut files) = counters.files.lock() {
                    files.push(summary.master.display().to_string());
                }
            }
            Err(e) => {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
                counters.error(format!(
                    "series {}: closing its files failed: {e}",
                    series.series
                ));
            }
        }
    }
    // Counted once the files are complete: whoever sees the count can open them.
    if timed_out {
        counters.series_timed_out.fetch_add(1, Ordering::Relaxed);
        counters.series_ended.fetch_add(1, Ordering::Relaxed);
    }
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
