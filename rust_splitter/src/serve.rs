//! Output 2: frames to readers, and the Splitter's accounting to whoever listens.
//!
//! Readers pull (the original Interceptor's model): a reader's REQ socket asks the Splitter's
//! ROUTER for a frame and gets the oldest one waiting. Optionally frames are pushed round-robin
//! instead (PUSH). Either way the receiver and the disk writer never wait on a reader: a frame no
//! reader takes within `skip_after` is marked skipped for processing (it is on disk all the same)
//! and counted. Readers waiting longer than `heartbeat` get an idle reply, so a reader's own
//! timeout means the Splitter is really gone (Lazy Pirate, ZeroMQ guide ch. 4).
//!
//! Zero copy: the received ZeroMQ messages are shared (`Arc<Received>`) by the writer and this
//! thread; the blob goes out as a ZeroMQ message whose data points into the received buffer and
//! whose release drops one reference (`zmq_msg_init_data`), so the blob is never copied here.
//!
//! A request is [JSON object with htype `intxr-request-1.0`] from a REQ socket; anything else on the
//! port (it is open to anyone) is counted as `bad_requests`, reported and gets no frame: a REQ-shaped
//! one gets [`intxr-error-1.0` JSON naming what was wrong], the rest nothing.
//! Reply to a reader, after the ROUTER envelope: [frame meta JSON, series JSON, blob] for a frame
//! (htypes `intxr-frame-1.0`, `intxr-series-1.0`), or [idle JSON] (`intxr-idle-1.0`).
//! Published (PUB, two parts: topic, JSON): `counters` twice a second, `series_start`, `series_end`
//! when every frame of a series has been forwarded or skipped (with the forwarded and skipped frame
//! numbers as ranges), and `series_written` when its files are closed; the series events are
//! repeated with the next three counter ticks for subscribers still joining (listeners take the
//! first and ignore repeats).
//!
//! Accounts are kept per series name (`series_name`, unique in the output directory, decided by
//! the receiver when it opens a series): a detector restart at series 1 or a series reopened after
//! the timeout is a new account with its own `series_end`.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::frame::{Compression, FrameHeader, SeriesHeader};
use crate::splitter::{Counters, Reports, SplitterConfig};

/// One received multipart message, shared read-only by the writer and the server.
pub struct Received(pub Vec<zmq::Message>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// ROUTER: a reader asks, gets the next frame.
    Request,
    /// PUSH: frames go round-robin to connected readers.
    Push,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where readers connect; None: frames are only written.
    pub endpoint: Option<String>,
    pub mode: ServeMode,
    /// A frame no reader took within this long is skipped for processing.
    pub skip_after: Duration,
    /// A waiting reader gets an idle reply after this long without frames.
    pub heartbeat: Duration,
    /// Where counters and series accounting are published (PUB); None: not published.
    pub publish: Option<String>,
}

/// What the receiver and the writer tell the server.
pub enum ServeJob {
    /// The receiver opened a series under `name` (the header without its pixel mask).
    Start {
        name: Arc<str>,
        header: SeriesHeader,
        master: Arc<str>,
    },
    Frame {
        name: Arc<str>,
        header: FrameHeader,
        parts: Arc<Received>,
        part: usize,
        range: Range<usize>,
        received: f64,
    },
    /// The receiver closed the series `name`: by its end message, a new series, or the timeout.
    End {
        name: Arc<str>,
        timed_out: bool,
        /// Messages judged malformed while it was open.
        malformed: u64,
    },
    /// The writer closed a series' files (or had none to close).
    Written(Value),
}

/// Sorted, merged, inclusive ranges of frame numbers: a 10^6-frame series served in order is one
/// range, not a million numbers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ranges(Vec<(i64, i64)>);

impl Ranges {
    pub fn insert(&mut self, n: i64) {
        // Frames come nearly in order: extending the last range is the common case.
        if let Some(last) = self.0.last_mut() {
            if n == last.1.saturating_add(1) {
                last.1 = n;
                return;
            }
            if n > last.1 {
                self.0.push((n, n));
                return;
            }
        }
        // The first range starting after n; the one before it may hold or touch n.
        let i = self.0.partition_point(|r| r.0 <= n);
        if i > 0 && self.0[i - 1].1 >= n {
            return;
        }
        let joins_left = i > 0 && self.0[i - 1].1.saturating_add(1) == n;
        let joins_right = i < self.0.len() && n.saturating_add(1) == self.0[i].0;
        match (joins_left, joins_right) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = n,
            (false, true) => self.0[i].0 = n,
            (false, false) => self.0.insert(i, (n, n)),
        }
    }

    /// How many frame numbers the ranges hold.
    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|(a, b)| (*b as i128 - *a as i128 + 1) as u64)
            .sum()
    }

    pub fn to_json(&self) -> Value {
        Value::Array(self.0.iter().map(|(a, b)| json!([a, b])).collect())
    }
}

pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

unsafe extern "C" fn release_shared(_data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the Box<Arc<Received>> leaked by `send_shared`; libzmq calls this once.
    drop(unsafe { Box::from_raw(hint as *mut Arc<Received>) });
}

/// Send `parts[part][range]` without copying: the ZeroMQ message borrows the received buffer and
/// holds a reference to it until libzmq has sent it.
pub fn send_shared(
    socket: &mut zmq::Socket,
    parts: &Arc<Received>,
    part: usize,
    range: Range<usize>,
    flags: i32,
) -> Result<(), zmq::Error> {
    let data = &parts.0[part][range];
    let hint = Box::into_raw(Box::new(parts.clone()));
    let mut msg = zmq_sys::zmq_msg_t::default();
    // SAFETY: `data` lives as long as the Arc in `hint`, which libzmq drops through
    // `release_shared` when it is done with the message; libzmq never writes to it.
    unsafe {
        let rc = zmq_sys::zmq_msg_init_data(
            &mut msg,
            data.as_ptr() as *mut c_void,
            data.len(),
            Some(release_shared),
            hint as *mut c_void,
        );
        if rc != 0 {
            drop(Box::from_raw(hint));
            return Err(zmq::Error::from_raw(zmq_sys::zmq_errno()));
        }
        let rc = zmq_sys::zmq_msg_send(&mut msg, socket.as_mut_ptr(), flags);
        if rc == -1 {
            let error = zmq::Error::from_raw(zmq_sys::zmq_errno());
            zmq_sys::zmq_msg_close(&mut msg); // calls release_shared
            return Err(error);
        }
    }
    Ok(())
}

/// What a reader's request carries (`intxr.reader.source.FrameSource`): a JSON object with this
/// htype, plus whatever names the reader (host, pid, rank).
pub const REQUEST_HTYPE: &str = "intxr-request-1.0";
/// The reply to a message that is not a request but came from a REQ-like socket.
pub const ERROR_HTYPE: &str = "intxr-error-1.0";
/// The longest request believed (a request is a small JSON object).
const MAX_REQUEST_BYTES: usize = 4096;
/// The longest message the readers' port takes at all: libzmq drops a peer sending more, so a
/// huge message is never held in memory here.
const MAX_MESSAGE_BYTES: i64 = 1 << 20;
/// Messages taken from the readers' port per loop turn.
const REQUESTS_PER_TURN: usize = 256;

/// Receive one multipart message without waiting, with the sender's address (for reports).
fn recv_with_peer(socket: &zmq::Socket) -> Option<(Vec<Vec<u8>>, String)> {
    let mut parts = Vec::new();
    let mut peer = None;
    loop {
        // After the first part the rest of a multipart message is already here (delivered whole).
        let flags = if parts.is_empty() { zmq::DONTWAIT } else { 0 };
        let Ok(mut part) = socket.recv_msg(flags) else {
            break;
        };
        // The ROUTER's own identity part carries no metadata; the parts from the wire do.
        if peer.is_none() {
            peer = part.gets("Peer-Address").map(str::to_string);
        }
        let more = part.get_more();
        parts.push(part.to_vec());
        if !more {
            break;
        }
    }
    (!parts.is_empty()).then(|| (parts, peer.unwrap_or_else(|| "an unknown peer".into())))
}

/// Why a message on the readers' port is not a request. `parts` as the ROUTER received them:
/// [identity, empty delimiter, request JSON] from a REQ socket.
pub fn check_request(parts: &[Vec<u8>]) -> Result<(), String> {
    let body = match parts {
        [] | [_] => return Err("an empty message".into()),
        [_, delimiter, ..] if !delimiter.is_empty() => {
            return Err(format!(
                "{} part(s) without the empty delimiter a REQ socket sends",
                parts.len() - 1
            ))
        }
        [_, _, body] => body,
        _ => {
            return Err(format!(
                "{} parts after the delimiter; a request is one",
                parts.len() - 2
            ))
        }
    };
    if body.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "a request of {} bytes (at most {MAX_REQUEST_BYTES})",
            body.len()
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the request is not JSON ({e})"))?;
    let Some(object) = value.as_object() else {
        return Err("the request is not a JSON object".into());
    };
    match object.get("htype") {
        Some(Value::String(htype)) if htype == REQUEST_HTYPE => Ok(()),
        None => Err(format!(
            "the request has no htype (an older reader? readers send {REQUEST_HTYPE})"
        )),
        Some(other) => {
            let text: String = other.to_string().chars().take(40).collect();
            Err(format!(
                "the request's htype is {text}, not {REQUEST_HTYPE}"
            ))
        }
    }
}

fn compression_name(compression: Compression) -> &'static str {
    match compression {
        Compression::BsLz4 => "bslz4",
        Compression::Lz4Raw => "lz4",
        Compression::Lz4Hdf5 => "lz4-hdf5",
        Compression::None => "none",
    }
}

struct PendingFrame {
    header: FrameHeader,
    parts: Arc<Received>,
    part: usize,
    range: Range<usize>,
    received: f64,
    queued: Instant,
}

enum Pending {
    Frame(PendingFrame, Arc<str>),
    /// Every frame of the series before this has been forwarded or skipped.
    End {
        name: Arc<str>,
        timed_out: bool,
        malformed: u64,
    },
}

struct SeriesTally {
    series: i64,
    name: Arc<str>,
    received: u64,
    bytes: u64,
    md5_mismatches: u64,
    forwarded: Ranges,
    skipped: Ranges,
    /// The `intxr-series-1.0` part, the same bytes for every frame of the series.
    json: Arc<[u8]>,
    /// Where the writer puts the series (decided with its name by the receiver).
    master: Arc<str>,
    /// The header the series info and its geometry were made from, and the frame shape
    /// (rows, cols) the geometry was made for ((0, 0): the header's own size keys).
    made_from: Option<(SeriesHeader, (usize, usize))>,
}

/// The `intxr-series-1.0` part: the series, its header and config, and its geometry
/// (`crate::geometry`, null when the series' start was missed).
fn series_json(
    name: &str,
    series: i64,
    header: Option<&SeriesHeader>,
    shape: (usize, usize),
) -> Arc<[u8]> {
    let null = Value::Null;
    json!({
        "htype": "intxr-series-1.0",
        "series": series,
        "series_name": name,
        "protocol": header.map_or("v1", |h| h.protocol.name()),
        "header": header.map_or(&null, |h| &h.header),
        "config": header.map_or(&null, |h| &h.config),
        "geometry": header.map(|h| h.geometry(shape.0, shape.1).to_json()),
    })
    .to_string()
    .into_bytes()
    .into()
}

struct Server {
    config: SplitterConfig,
    serve: ServeConfig,
    counters: Arc<Counters>,
    socket: Option<zmq::Socket>,
    publisher: Option<zmq::Socket>,
    pending: VecDeque<Pending>,
    /// Readers' ROUTER identities, oldest request first, with when they asked.
    waiting: VecDeque<(Vec<u8>, Instant)>,
    /// Series still being served, oldest first (a new series may start while the old drains).
    series: VecDeque<SeriesTally>,
    /// Series events to publish again with the next counter ticks: (topic, body, repeats left).
    recent: VecDeque<(&'static str, Value, u32)>,
    bad_requests: Reports,
}

/// How many times a series event is published again (twice a second) after the first time.
const REPEATS: u32 = 3;

impl Server {
    fn publish(&mut self, topic: &str, body: &Value) {
        if let Some(publisher) = self.publisher.as_ref() {
            let text = body.to_string();
            let _ = publisher.send_multipart([topic.as_bytes(), text.as_bytes()], zmq::DONTWAIT);
        }
    }

    /// Publish a series event now and again with the next few counter ticks: a subscriber that
    /// was still joining (PUB drops what is sent before a subscription arrives) gets it too.
    fn publish_event(&mut self, topic: &'static str, body: Value) {
        self.counters.record_series(&body);
        self.publish(topic, &body);
        self.recent.push_back((topic, body, REPEATS));
    }

    /// The account of series `name`; one is made (without header keys) if its Start was missed.
    fn tally(&mut self, name: &Arc<str>, series: i64) -> &mut SeriesTally {
        if let Some(index) = self.series.iter().position(|s| s.name == *name) {
            return &mut self.series[index];
        }
        let master = self.master_file(name);
        self.open_tally(name.clone(), series, None, master)
    }

    fn open_tally(
        &mut self,
        name: Arc<str>,
        series: i64,
        header: Option<SeriesHeader>,
        master: Arc<str>,
    ) -> &mut SeriesTally {
        let json = series_json(&name, series, header.as_ref(), (0, 0));
        self.series.push_back(SeriesTally {
            series,
            name,
            received: 0,
            bytes: 0,
            md5_mismatches: 0,
            forwarded: Ranges::default(),
            skipped: Ranges::default(),
            json,
            master,
            made_from: header.map(|h| (h, (0, 0))),
        });
        self.series.back_mut().expect("just pushed")
    }

    fn take_job(&mut self, job: ServeJob) {
        match job {
            ServeJob::Start {
                name,
                header,
                master,
            } => {
                let series = header.series;
                let geometry = header.geometry(0, 0).to_json();
                self.open_tally(name.clone(), series, Some(header), master);
                self.publish(
                    "series_start",
                    &json!({"series": series, "series_name": &*name, "time": unix_time(),
                            "geometry": geometry}),
                );
            }
            ServeJob::Frame {
                name,
                header,
                parts,
                part,
                range,
                received,
            } => {
                let tally = self.tally(&name, header.series);
                // The geometry is for the frames' real shape (the header's size keys may lack).
                if let Some((source, shape)) = tally.made_from.as_mut() {
                    if *shape != header.shape {
                        *shape = header.shape;
                        tally.json = series_json(&tally.name, tally.series, Some(source), *shape);
                    }
                }
                tally.received += 1;
                tally.bytes += range.len() as u64;
                tally.md5_mismatches += u64::from(header.md5_ok == Some(false));
                if self.socket.is_none() {
                    // Nothing serves frames: every frame is skipped for processing.
                    self.skip(&name, &header);
                    return;
                }
                self.pending.push_back(Pending::Frame(
                    PendingFrame {
                        header,
                        parts,
                        part,
                        range,
                        received,
                        queued: Instant::now(),
                    },
                    name,
                ));
            }
            ServeJob::End {
                name,
                timed_out,
                malformed,
            } => self.pending.push_back(Pending::End {
                name,
                timed_out,
                malformed,
            }),
            ServeJob::Written(body) => self.publish_event("series_written", body),
        }
    }

    fn skip(&mut self, name: &Arc<str>, header: &FrameHeader) {
        self.counters.frames_skipped.fetch_add(1, Ordering::Relaxed);
        self.tally(name, header.series).skipped.insert(header.frame);
    }

    fn end_series(&mut self, name: &Arc<str>, timed_out: bool, malformed: u64) {
        let Some(index) = self.series.iter().position(|s| s.name == *name) else {
            return; // already ended (a shutdown ends what is left)
        };
        let tally = self.series.remove(index).expect("index is valid");
        self.publish_event(
            "series_end",
            json!({
                "series": tally.series,
                "series_name": &*tally.name,
                "timed_out": timed_out,
                "received": tally.received,
                "forwarded": tally.forwarded.count(),
                "skipped": tally.skipped.count(),
                "forwarded_ranges": tally.forwarded.to_json(),
                "skipped_ranges": tally.skipped.to_json(),
                "malformed": malformed,
                "bytes": tally.bytes,
                "md5_mismatches": tally.md5_mismatches,
                "time": unix_time(),
            }),
        );
    }

    /// The master file of the series `name` (the receiver's choice; the writer uses the same).
    fn master_file(&self, name: &str) -> Arc<str> {
        crate::splitter::master_path(&self.config.output_dir, name)
            .display()
            .to_string()
            .into()
    }

    fn frame_meta(&mut self, frame: &PendingFrame, name: &Arc<str>) -> Vec<u8> {
        let master = self.tally(name, frame.header.series).master.clone();
        let h = &frame.header;
        json!({
            "htype": "intxr-frame-1.0",
            "series": h.series,
            "series_name": &**name,
            "frame": h.frame,
            "shape": [h.shape.0, h.shape.1],
            "type": format!("uint{}", h.elem_size * 8),
            "elem_size": h.elem_size,
            "encoding": h.encoding,
            "compression": compression_name(h.compression),
            "md5_ok": h.md5_ok,
            "received": frame.received,
            "forwarded": unix_time(),
            "master_file": &*master,
            "header": h.header,
        })
        .to_string()
        .into_bytes()
    }

    /// Send one frame: to the oldest waiting reader (ROUTER) or round-robin (PUSH). Returns false
    /// when nobody could take it now.
    fn forward(&mut self, frame: &PendingFrame, name: &Arc<str>) -> bool {
        let meta = self.frame_meta(frame, name);
        let series_json = self.tally(name, frame.header.series).json.clone();
        loop {
            let identity = match self.serve.mode {
                ServeMode::Request => match self.waiting.pop_front() {
                    Some((identity, _)) => Some(identity),
                    None => return false,
                },
                ServeMode::Push => None,
            };
            let socket = self.socket.as_mut().expect("serving");
            let sent = (|| -> Result<(), zmq::Error> {
                let flags = if identity.is_some() { 0 } else { zmq::DONTWAIT };
                if let Some(identity) = identity.as_ref() {
                    socket.send(&identity[..], zmq::SNDMORE | flags)?;
                    socket.send(&b""[..], zmq::SNDMORE)?;
                }
                socket.send(&meta[..], zmq::SNDMORE | flags)?;
                socket.send(&series_json[..], zmq::SNDMORE)?;
                send_shared(socket, &frame.parts, frame.part, frame.range.clone(), 0)
            })();
            match sent {
                Ok(()) => {
                    self.counters
                        .frames_forwarded
                        .fetch_add(1, Ordering::Relaxed);
                    self.tally(name, frame.header.series)
                        .forwarded
                        .insert(frame.header.frame);
                    return true;
                }
                // ROUTER_MANDATORY: that reader has gone; try the next one.
                Err(zmq::Error::EHOSTUNREACH) => continue,
                Err(zmq::Error::EAGAIN) => return false,
                Err(e) => {
                    self.counters.error(format!(
                        "series {} frame {}: cannot forward to a reader: {e}",
                        frame.header.series, frame.header.frame
                    ));
                    return false;
                }
            }
        }
    }

    /// Take readers' requests. The port is open to anyone: only a well-formed request joins the
    /// queue for a frame; anything else is counted, reported (rate-limited) and gets no frame.
    fn receive_requests(&mut self) {
        if self.serve.mode != ServeMode::Request {
            return;
        }
        // A bounded number per turn: a flood on this port cannot hold frames back.
        for _ in 0..REQUESTS_PER_TURN {
            let Some(socket) = self.socket.as_ref() else {
                return;
            };
            let Some((mut parts, peer)) = recv_with_peer(socket) else {
                return;
            };
            let why = check_request(&parts).err().or_else(|| {
                // A REQ socket asks once and waits; asking again while queued is not a reader.
                self.waiting
                    .iter()
                    .any(|(identity, _)| *identity == parts[0])
                    .then(|| "asked again before its reply (a reader asks once)".to_string())
            });
            let Some(why) = why else {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                self.waiting
                    .push_back((parts.swap_remove(0), Instant::now()));
                continue;
            };
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            self.bad_requests.report(
                &self.counters,
                format!("bad request on the readers' port from {peer}: {why}; no frame sent"),
            );
            // A REQ-shaped message gets an error reply: a misconfigured client learns why instead
            // of waiting forever. Anything else gets nothing (a DONTWAIT send: never blocks here).
            if parts.len() >= 2 && parts[1].is_empty() {
                let reply = json!({"htype": ERROR_HTYPE, "error": why, "expected": REQUEST_HTYPE})
                    .to_string();
                let _ =
                    socket.send_multipart([&parts[0][..], b"", reply.as_bytes()], zmq::DONTWAIT);
            }
        }
    }

    /// Forward what can be forwarded, skip what waited too long, end series that are done.
    fn dispatch(&mut self) {
        while let Some(head) = self.pending.pop_front() {
            match head {
                Pending::End {
                    name,
                    timed_out,
                    malformed,
                } => self.end_series(&name, timed_out, malformed),
                Pending::Frame(frame, name) => {
                    if self.forward(&frame, &name) {
                        continue;
                    }
                    if frame.queued.elapsed() >= self.serve.skip_after {
                        self.skip(&name, &frame.header);
                        continue;
                    }
                    self.pending.push_front(Pending::Frame(frame, name));
                    break;
                }
            }
        }
        self.counters
            .pending_frames
            .store(self.pending.len() as u64, Ordering::Relaxed);
        // Readers waiting with nothing to do get an idle reply, so they know the Splitter lives.
        while self
            .waiting
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= self.serve.heartbeat)
        {
            let (identity, _) = self.waiting.pop_front().expect("checked");
            let idle = json!({"htype": "intxr-idle-1.0", "time": unix_time()}).to_string();
            if let Some(socket) = self.socket.as_ref() {
                let _ = socket.send_multipart([&identity[..], b"", idle.as_bytes()], zmq::DONTWAIT);
            }
        }
        self.counters
            .readers_waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
    }

    fn publish_counters(&mut self) {
        let mut body = serde_json::Map::new();
        for (name, value) in self.counters.snapshot() {
            body.insert(name.into(), value.into());
        }
        body.insert("time".into(), unix_time().into());
        body.insert(
            "last_error".into(),
            self.counters
                .last_error
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default()
                .into(),
        );
        body.insert("buffer_bytes".into(), self.config.buffer_bytes.into());
        self.publish("counters", &Value::Object(body));
        let recent = std::mem::take(&mut self.recent);
        for (topic, body, left) in recent {
            self.publish(topic, &body);
            if left > 1 {
                self.recent.push_back((topic, body, left - 1));
            }
        }
    }
}

/// The server thread: runs until every job sender is gone and every pending frame has been
/// forwarded or skipped.
pub fn serve_loop(
    config: SplitterConfig,
    serve: ServeConfig,
    sockets: (Option<zmq::Socket>, Option<zmq::Socket>),
    jobs: mpsc::Receiver<ServeJob>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut server = Server {
        config,
        serve,
        counters,
        socket: sockets.0,
        publisher: sockets.1,
        pending: VecDeque::new(),
        waiting: VecDeque::new(),
        series: VecDeque::new(),
        recent: VecDeque::new(),
        bad_requests: Reports::new("bad requests on the readers' port", 3),
    };
    let mut last_published = Instant::now() - Duration::from_secs(1);
    let mut senders_gone = false;
    loop {
        // Take every job there is; wait a little on the channel only when there is nothing to do.
        loop {
            match jobs.try_recv() {
                Ok(job) => server.take_job(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone = true;
                    break;
                }
            }
        }
        server.receive_requests();
        server.bad_requests.flush(&server.counters);
        server.dispatch();
        if last_published.elapsed() >= Duration::from_millis(500) {
            server.publish_counters();
            last_published = Instant::now();
        }
        if senders_gone && server.pending.is_empty() {
            break;
        }
        // After stop, frames still pending are served until they are taken or skipped.
        let wait = if stop.load(Ordering::Relaxed) || !server.pending.is_empty() {
            1
        } else {
            5
        };
        match server.socket.as_ref() {
            Some(socket) if server.serve.mode == ServeMode::Request => {
                let _ = socket.poll(zmq::POLLIN, wait);
            }
            _ => std::thread::sleep(Duration::from_millis(wait as u64)),
        }
    }
    // The receiver ends every series it opened; anything left was cut short by a stop.
    for name in server
        .series
        .iter()
        .map(|s| s.name.clone())
        .collect::<Vec<_>>()
    {
        server.end_series(&name, false, 0);
    }
    server.publish_counters();
}

/// Open the serving and publishing sockets (errors are fatal at start, so they come first).
pub fn open_sockets(
    context: &zmq::Context,
    serve: &ServeConfig,
) -> Result<(Option<zmq::Socket>, Option<zmq::Socket>), String> {
    let socket = match serve.endpoint.as_deref() {
        None => None,
        Some(endpoint) => {
            let kind = match serve.mode {
                ServeMode::Request => zmq::ROUTER,
                ServeMode::Push => zmq::PUSH,
            };
            let socket = context
                .socket(kind)
                .map_err(|e| format!("cannot create the serving socket: {e}"))?;
            socket.set_linger(1000).ok();
            if serve.mode == ServeMode::Request {
                socket.set_router_mandatory(true).ok();
                socket.set_maxmsgsize(MAX_MESSAGE_BYTES).ok();
            } else {
                socket.set_sndhwm(4).ok(); // a few frames per reader; the rest wait here
            }
            socket
                .bind(endpoint)
                .map_err(|e| format!("cannot bind the serving endpoint {endpoint}: {e}"))?;
            Some(socket)
        }
    };
    let publisher = match serve.publish.as_deref() {
        None => None,
        Some(endpoint) => {
            let socket = context
                .socket(zmq::PUB)
                .map_err(|e| format!("cannot create the publishing socket: {e}"))?;
            socket.set_linger(1000).ok();
            socket.set_sndhwm(100_000).ok();
            socket
                .bind(endpoint)
                .map_err(|e| format!("cannot bind the publishing endpoint {endpoint}: {e}"))?;
            Some(socket)
        }
    };
    Ok((socket, publisher))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blob that arrives on the other side of an inproc pair is the very buffer that was
    /// received: libzmq's inproc transport passes the message itself, so equal addresses prove
    /// that no copy was made on the way.
    #[test]
    fn send_shared_does_not_copy_the_blob() {
        let context = zmq::Context::new();
        let mut sender = context.socket(zmq::PAIR).unwrap();
        let receiver = context.socket(zmq::PAIR).unwrap();
        sender.bind("inproc://shared").unwrap();
        receiver.connect("inproc://shared").unwrap();
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let received = Arc::new(Received(vec![
            zmq::Message::from(&b"head"[..]),
            zmq::Message::from(blob.clone()),
        ]));
        let address = received.0[1][10..].as_ptr() as usize;
        send_shared(&mut sender, &received, 1, 10..blob.len(), 0).unwrap();
        let message = receiver.recv_msg(0).unwrap();
        assert_eq!(&message[..], &blob[10..]);
        assert_eq!(message.as_ptr() as usize, address);
        // The message holds a reference until it is dropped; then only ours is left.
        assert_eq!(Arc::strong_count(&received), 2);
        drop(message);
        assert_eq!(Arc::strong_count(&received), 1);
    }
}

#[cfg(test)]
mod request_tests {
    use super::check_request;

    fn req(body: &[u8]) -> Vec<Vec<u8>> {
        vec![b"id".to_vec(), vec![], body.to_vec()]
    }

    #[test]
    fn only_a_well_formed_request_is_one() {
        assert!(check_request(&req(br#"{"htype": "intxr-request-1.0", "pid": 1}"#)).is_ok());
        let bad = [
            vec![],
            vec![b"id".to_vec()],
            vec![b"id".to_vec(), b"junk".to_vec()],
            vec![b"id".to_vec(), vec![], b"a".to_vec(), b"b".to_vec()],
            req(b""),
            req(b"\xff\xfe"),
            req(b"[1, 2]"),
            req(br#"{"pid": 1}"#),
            req(br#"{"htype": "intxr-request-2.0"}"#),
            req(br#"{"htype": 5}"#),
            req(&[b' '; 5000]),
        ];
        for parts in bad {
            assert!(check_request(&parts).is_err(), "{parts:?}");
        }
    }
}

#[cfg(test)]
mod range_tests {
    use super::Ranges;

    #[test]
    fn ranges_merge_in_any_order_and_count() {
        let mut r = Ranges::default();
        for n in [5, 6, 7, 1, 3, 2, 9, 9, 4, 8, -2, i64::MAX, i64::MIN] {
            r.insert(n);
        }
        assert_eq!(
            r.to_json().to_string(),
            format!(
                "[[{},{}],[-2,-2],[1,9],[{},{}]]",
                i64::MIN,
                i64::MIN,
                i64::MAX,
                i64::MAX
            )
        );
        assert_eq!(r.count(), 12);
        // A million frames in order are one range.
        let mut big = Ranges::default();
        (0..1_000_000).for_each(|n| big.insert(n));
        assert_eq!(big.0, vec![(0, 999_999)]);
        assert_eq!(big.count(), 1_000_000);
    }
}
