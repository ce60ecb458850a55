//! The one header -> geometry normalisation: every source the Splitter meets (stream v1 config,
//! stream v2 `start`, SSRL cbfToEiger config, a miniCBF PILATUS_1.2 header) becomes one
//! [`Geometry`] in DIALS's dxtbx laboratory frame (lengths mm, angles degrees, wavelength
//! Angstrom). The Splitter serves it to readers (`"geometry"` in the series info and in
//! `series_start`), the NXmx master is written from it, and Python reads the same JSON
//! (`intxr.geometry.Geometry.from_wire`). No PyO3 here.
//!
//! Conventions, as dxtbx has them (facts from cctbx/dxtbx, read there, not copied):
//! - A flat detector facing the beam is dxtbx's "simple" detector
//!   (`DetectorFactory.simple`, used by `FormatCBFMini._detector` with fast "+x", slow "-y"):
//!   origin = -distance * z - fast * beam_x_mm - slow * beam_y_mm, beam centre in mm from pixels.
//! - A detector on a two-theta arm is `DetectorFactory.two_theta`: the same frame, then fast,
//!   slow and origin rotated by the angle about the two-theta axis; dxtbx's readers pass "+x"
//!   (`FormatRAXIS`: "the two-theta axis is along (1, 0, 0) which is all that makes sense";
//!   `FormatTIFFRayonix`, `FormatSMVADSCSN926`). Note: dxtbx's own miniCBF reader ignores
//!   `Detector_2theta` ("presuming no one has one of these on a two-theta stage"); this model
//!   applies it, and the NXmx master carries it in the detector's `depends_on` chain, which
//!   dxtbx's NXmx reader does apply.
//! - The trusted range is inclusive: a pixel counts when min <= value <= max
//!   (`dxtbx/model/panel.h`, `apply_trusted_range_mask`). miniCBF gives (0, Count_cutoff)
//!   (`FormatCBFMini._detector`); NXmx gives (underload_value, saturation_value), each missing
//!   one defaulting to -/+0x7FFFFFFF, the EIGER file-writer reader defaulting underload to 0.
//! - The beam direction is (0, 0, 1) (sample -> source), s0 = -direction / wavelength.

use serde_json::{json, Value};

/// hc / e in eV * Angstrom (CODATA 2018), to turn photon energies into wavelengths.
pub const EV_ANGSTROM: f64 = 12398.419843320026;

/// dxtbx's simple detector: fast along +x, slow along -y (FormatCBFMini: "+x", "-y").
pub const STANDARD_ORIENTATION: [[f64; 3]; 2] = [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]];

/// dxtbx's default for a missing saturation_value in NXmx (`dxtbx.nexus.get_dxtbx_detector`).
pub const NO_SATURATION: f64 = 2147483647.0;

/// One detector panel in the laboratory frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub name: String,
    /// Lab position (mm) of the outer corner of pixel (0, 0).
    pub origin: [f64; 3],
    pub fast_axis: [f64; 3],
    pub slow_axis: [f64; 3],
    /// (fast, slow) mm.
    pub pixel_size: [f64; 2],
    /// (fast, slow) pixels.
    pub image_size: [usize; 2],
    /// Where this panel's pixel (0, 0) sits in the frame array (fast, slow).
    pub frame_offset: [usize; 2],
    /// Sensor thickness, mm (0 when the header did not say).
    pub thickness: f64,
    /// "Si", "CdTe", ... ("" when the header did not say).
    pub material: String,
    /// Inclusive (min, max) of trusted pixel values.
    pub trusted_range: [f64; 2],
}

/// A goniometer axis with its start and increment per frame (degrees).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub name: String,
    /// Lab direction when known (the main rotation axis is dxtbx's (1, 0, 0)).
    pub vector: Option<[f64; 3]>,
    pub start: f64,
    pub increment: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorKind {
    Eiger,
    Pilatus,
    Other,
}

impl DetectorKind {
    pub fn of(description: &str) -> DetectorKind {
        let d = description.to_ascii_lowercase();
        if d.contains("eiger") {
            DetectorKind::Eiger
        } else if d.contains("pilatus") {
            DetectorKind::Pilatus
        } else {
            DetectorKind::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Eiger => "eiger",
            DetectorKind::Pilatus => "pilatus",
            DetectorKind::Other => "other",
        }
    }
}

/// The experiment's geometry as one header described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Angstrom; None when the header had none (then "wavelength" is in `missing`).
    pub wavelength: Option<f64>,
    pub beam_direction: [f64; 3],
    pub panels: Vec<Panel>,
    /// Detector two-theta (degrees), already applied to the panels.
    pub two_theta: f64,
    /// mm along the (unrotated) beam to the detector plane; None when missing.
    pub distance: Option<f64>,
    /// The beam centre as the header gave it (fast, slow pixels, detector at two-theta 0).
    pub header_beam_center: Option<[f64; 2]>,
    /// The detector's fast and slow directions before two-theta (dxtbx frame): (+x, -y) unless
    /// the header's `detector_orientation` says otherwise.
    pub orientation: [[f64; 3]; 2],
    pub axes: Vec<Axis>,
    /// Index in `axes` of the scan axis.
    pub scan_axis: usize,
    pub count_time: Option<f64>,
    pub frame_time: Option<f64>,
    /// The count cutoff / saturation value the header gave (the trusted maximum).
    pub count_cutoff: Option<u64>,
    pub description: String,
    pub detector_number: String,
    pub kind: DetectorKind,
    /// Essentials absent from the header; consumers say so, never invent them.
    pub missing: Vec<&'static str>,
    pub source: &'static str,
}

/// Where the detector's geometry came from (the wire's `source`).
pub const SOURCE_V1: &str = "stream v1 config";
pub const SOURCE_V2: &str = "stream v2 start";
pub const SOURCE_CBFTOEIGER: &str = "cbfToEiger config";
pub const SOURCE_MINICBF: &str = "miniCBF header";

fn rotate_x(v: [f64; 3], degrees: f64) -> [f64; 3] {
    let (s, c) = degrees.to_radians().sin_cos();
    [v[0], c * v[1] - s * v[2], s * v[1] + c * v[2]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// What a simple (optionally two-theta) detector is built from.
struct SimpleDetector {
    /// Fast and slow directions (dxtbx frame) before two-theta.
    orientation: [[f64; 3]; 2],
    distance: f64,
    beam_center: [f64; 2],
    pixel_size: [f64; 2],
    image_size: [usize; 2],
    two_theta: f64,
    thickness: f64,
    material: String,
    trusted_range: [f64; 2],
}

impl SimpleDetector {
    /// dxtbx's `DetectorFactory.simple` (fast +x, slow -y unless oriented otherwise), then
    /// `two_theta` about +x.
    fn panel(&self) -> Panel {
        let [fast, slow] = self.orientation;
        let (bx, by) = (
            self.beam_center[0] * self.pixel_size[0],
            self.beam_center[1] * self.pixel_size[1],
        );
        let origin = [
            -fast[0] * bx - slow[0] * by,
            -fast[1] * bx - slow[1] * by,
            -fast[2] * bx - slow[2] * by - self.distance,
        ];
        Panel {
            name: "panel0".into(),
            origin: rotate_x(origin, self.two_theta),
            fast_axis: rotate_x(fast, self.two_theta),
            slow_axis: rotate_x(slow, self.two_theta),
            pixel_size: self.pixel_size,
            image_size: self.image_size,
            frame_offset: [0, 0],
            thickness: self.thickness,
            material: self.material.clone(),
            trusted_range: self.trusted_range,
        }
    }
}

impl Geometry {
    /// Where the direct beam meets panel 0 (fast, slow pixels); None when it cannot.
    pub fn beam_center(&self) -> Option<[f64; 2]> {
        let p = self.panels.first()?;
        let normal = cross(p.fast_axis, p.slow_axis);
        // The beam travels along -beam_direction from the sample at the origin.
        let s = self.beam_direction.map(|x| -x);
        let along = dot(s, normal);
        if along.abs() < 1e-12 {
            return None;
        }
        let t = dot(p.origin, normal) / along;
        let hit = [
            t * s[0] - p.origin[0],
            t * s[1] - p.origin[1],
            t * s[2] - p.origin[2],
        ];
        Some([
            dot(hit, p.fast_axis) / p.pixel_size[0],
            dot(hit, p.slow_axis) / p.pixel_size[1],
        ])
    }

    pub fn scan(&self) -> Option<&Axis> {
        self.axes.get(self.scan_axis)
    }

    /// The wire JSON (version 1), as `intxr.geometry.Geometry.from_wire` reads it.
    pub fn to_json(&self) -> Value {
        let panels: Vec<Value> = self
            .panels
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "origin": p.origin,
                    "fast_axis": p.fast_axis,
                    "slow_axis": p.slow_axis,
                    "pixel_size": p.pixel_size,
                    "image_size": p.image_size,
                    "frame_offset": p.frame_offset,
                    "thickness": p.thickness,
                    "material": p.material,
                    "trusted_range": p.trusted_range,
                })
            })
            .collect();
        let axes: Vec<Value> = self
            .axes
            .iter()
            .map(|a| {
                json!({"name": a.name, "vector": a.vector, "start": a.start,
                       "increment": a.increment})
            })
            .collect();
        json!({
            "version": 1,
            "wavelength": self.wavelength,
            "beam_direction": self.beam_direction,
            "panels": panels,
            "two_theta": self.two_theta,
            "distance": self.distance,
            "beam_center": if self.distance.is_some() { self.beam_center() } else { None },
            "goniometer": {
                "axes": axes,
                "scan_axis": self.scan().map(|a| a.name.clone()),
            },
            "count_time": self.count_time,
            "frame_time": self.frame_time,
            "count_cutoff": self.count_cutoff,
            "description": self.description,
            "detector_number": self.detector_number,
            "detector_kind": self.kind.name(),
            "missing": self.missing,
            "source": self.source,
        })
    }

    /// From a detector stream's header: the config part (v1, cbfToEiger) or start message (v2),
    /// then the header part, first key present wins. `rows` x `cols` is the frame shape (0: take
    /// it from the header's `x/y_pixels_in_detector` / `image_size_x/y`).
    pub fn from_stream(
        config: &Value,
        header: &Value,
        rows: usize,
        cols: usize,
        source: &'static str,
    ) -> Geometry {
        let keys = Keys(vec![config, header]);
        let positive = |x: &f64| *x > 0.0;
        let mut missing = Vec::new();

        let wavelength = keys
            .f64(&["wavelength", "incident_wavelength"])
            .filter(positive)
            .or_else(|| {
                keys.f64(&["photon_energy", "incident_energy"])
                    .filter(positive)
                    .map(|e| EV_ANGSTROM / e)
            });
        if wavelength.is_none() {
            missing.push("wavelength");
        }
        // v1 and cbfToEiger send detector_distance (m); v2 only detector_translation
        // [x, y, -distance] (m), the real EIGER2 16M start gives 0.23716.
        let translation_z = keys
            .get(&["detector_translation"])
            .and_then(|t| t.get(2))
            .and_then(Value::as_f64)
            .filter(|z| z.is_finite() && *z != 0.0);
        let distance = keys
            .f64(&["detector_distance"])
            .filter(positive)
            .or(translation_z.map(f64::abs))
            .map(|m| m * 1000.0);
        if distance.is_none() {
            missing.push("distance");
        }
        let beam_center = match (keys.f64(&["beam_center_x"]), keys.f64(&["beam_center_y"])) {
            (Some(x), Some(y)) => Some([x, y]),
            _ => {
                missing.push("beam_center");
                None
            }
        };
        let pixel_size = match (
            keys.f64(&["x_pixel_size", "pixel_size_x"]).filter(positive),
            keys.f64(&["y_pixel_size", "pixel_size_y"]).filter(positive),
        ) {
            (Some(x), Some(y)) => Some([x * 1000.0, y * 1000.0]),
            _ => {
                missing.push("pixel_size");
                None
            }
        };
        let image_size = if rows > 0 && cols > 0 {
            Some([cols, rows])
        } else {
            match (
                keys.u64(&["x_pixels_in_detector", "image_size_x"]),
                keys.u64(&["y_pixels_in_detector", "image_size_y"]),
            ) {
                (Some(x), Some(y)) if x > 0 && y > 0 => Some([x as usize, y as usize]),
                _ => {
                    missing.push("image_size");
                    None
                }
            }
        };
        // What the master writes as saturation_value, and so what dxtbx reads from it.
        let count_cutoff = keys
            .u64(&["saturation_value"])
            .or(keys.u64(&["countrate_correction_count_cutoff"]));
        let description = keys
            .str(&["description", "detector_description"])
            .unwrap_or_default();
        let two_theta = keys.axis("two_theta").map_or(0.0, |(start, _)| start);

        let axes: Vec<Axis> = ["chi", "kappa", "omega", "phi"]
            .into_iter()
            .map(|name| {
                let (start, increment) = keys.axis(name).unwrap_or((0.0, 0.0));
                Axis {
                    name: name.into(),
                    vector: None,
                    start,
                    increment,
                }
            })
            .collect();
        // The scan axis: the first of omega, phi, chi, kappa that moves, else omega.
        let scan_axis = ["omega", "phi", "chi", "kappa"]
            .iter()
            .filter_map(|n| axes.iter().position(|a| a.name == *n && a.increment != 0.0))
            .next()
            .unwrap_or(2);
        // The legacy DECTRIS `detector_orientation` (NXorientation: fast then slow direction, in
        // the NeXus McStas frame; x and z flip into dxtbx's); used when it is two orthogonal unit
        // vectors, else the standard (+x, -y).
        let orientation = keys
            .get(&["detector_orientation"])
            .and_then(Value::as_array)
            .map(|o| o.iter().filter_map(Value::as_f64).collect::<Vec<f64>>())
            .filter(|o| o.len() == 6)
            .map(|o| {
                let mcstas = |v: &[f64]| [-v[0], v[1], -v[2]];
                [mcstas(&o[0..3]), mcstas(&o[3..6])]
            })
            .filter(|[f, s]| {
                (dot(*f, *f) - 1.0).abs() < 1e-6
                    && (dot(*s, *s) - 1.0).abs() < 1e-6
                    && dot(*f, *s).abs() < 1e-6
            })
            .unwrap_or(STANDARD_ORIENTATION);
        let mut geometry = Geometry {
            wavelength,
            beam_direction: [0.0, 0.0, 1.0],
            panels: Vec::new(),
            two_theta,
            distance,
            header_beam_center: beam_center,
            orientation,
            axes,
            scan_axis,
            count_time: keys.f64(&["count_time"]),
            frame_time: keys.f64(&["frame_time"]),
            count_cutoff,
            kind: DetectorKind::of(&description),
            description,
            detector_number: keys
                .str(&["detector_number", "detector_serial_number"])
                .unwrap_or_default(),
            missing,
            source,
        };
        geometry.set_scan_vector();
        geometry.panels.push(
            SimpleDetector {
                orientation,
                distance: distance.unwrap_or(0.0),
                beam_center: beam_center.unwrap_or([0.0, 0.0]),
                pixel_size: pixel_size.unwrap_or([0.0, 0.0]),
                image_size: image_size.unwrap_or([0, 0]),
                two_theta,
                thickness: keys
                    .f64(&["sensor_thickness"])
                    .filter(positive)
                    .map_or(0.0, |m| m * 1000.0),
                material: keys.str(&["sensor_material"]).unwrap_or_default(),
                trusted_range: [0.0, count_cutoff.map_or(NO_SATURATION, |c| c as f64)],
            }
            .panel(),
        );
        geometry
    }

    /// From a miniCBF PILATUS_1.2 header (the `#` lines, and the MIME lines for the image size
    /// when `rows`/`cols` are 0), keyed as dxtbx's `FormatCBFMini._start` keys it: each `#`
    /// line without `=` and `:` split on whitespace, the second token the key, the rest the value.
    pub fn from_cbf_header(text: &str, rows: usize, cols: usize) -> Geometry {
        let mut items: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix('#') {
                // The timestamp line (one or two tokens, two colons) has no key.
                if rest.split_whitespace().count() <= 2 && rest.matches(':').count() == 2 {
                    continue;
                }
                let cleaned = rest.replace(['=', ':'], "");
                let mut tokens = cleaned.split_whitespace();
                if let Some(key) = tokens.next() {
                    items.push((key.to_string(), tokens.collect::<Vec<_>>().join(" ")));
                }
            } else if let Some((key, value)) = line.split_once(':') {
                if key.starts_with("X-Binary-") {
                    items.push((key.trim().to_string(), value.trim().to_string()));
                }
            }
        }
        let get = |key: &str| {
            items
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        // The numbers of a value ("0.96859 A", "(1261.61, 1306.96) pixels", "172e-6 m x 172e-6 m").
        let numbers = |key: &str| -> Vec<f64> {
            get(key).map_or(Vec::new(), |v| {
                v.replace(['(', ')', ','], " ")
                    .split_whitespace()
                    .filter_map(|t| t.parse::<f64>().ok())
                    .filter(|x| x.is_finite())
                    .collect()
            })
        };
        let first = |key: &str| numbers(key).first().copied();

        // The header in the detector-stream vocabulary (metres, pixels, degrees), then the one
        // normalisation every stream header goes through.
        let mut keys = serde_json::Map::new();
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(v) = value {
                keys.insert(key.to_string(), v);
            }
        };
        put("wavelength", first("Wavelength").map(Value::from));
        put(
            "detector_distance",
            first("Detector_distance").map(Value::from),
        );
        let beam = numbers("Beam_xy");
        if beam.len() >= 2 {
            put("beam_center_x", Some(beam[0].into()));
            put("beam_center_y", Some(beam[1].into()));
        }
        let pixel = numbers("Pixel_size");
        if pixel.len() >= 2 {
            put("x_pixel_size", Some(pixel[0].into()));
            put("y_pixel_size", Some(pixel[1].into()));
        }
        put(
            "x_pixels_in_detector",
            first("X-Binary-Size-Fastest-Dimension").map(Value::from),
        );
        put(
            "y_pixels_in_detector",
            first("X-Binary-Size-Second-Dimension").map(Value::from),
        );
        // "# Silicon sensor, thickness 0.000450 m": the third token, in metres.
        for (key, material) in [("Silicon", "Si"), ("CdTe", "CdTe")] {
            if let Some(t) = get(key).and_then(|v| v.split_whitespace().nth(2)) {
                put("sensor_material", Some(material.into()));
                put("sensor_thickness", t.parse::<f64>().ok().map(Value::from));
                break;
            }
        }
        put(
            "countrate_correction_count_cutoff",
            first("Count_cutoff").map(Value::from),
        );
        put("two_theta_start", first("Detector_2theta").map(Value::from));
        put("count_time", first("Exposure_time").map(Value::from));
        put("frame_time", first("Exposure_period").map(Value::from));
        // "# Detector: PILATUS3 6M, S/N 60-0119"
        let detector = get("Detector").unwrap_or_default();
        let (description, number) = detector.split_once(", S/N ").unwrap_or((detector, ""));
        put("description", Some(description.trim().into()));
        put("detector_number", Some(number.trim().into()));
        // dxtbx: a single axis (1, 0, 0) scanned from Start_angle by Angle_increment, about the
        // axis Oscillation_axis names (omega unless it says phi, chi or kappa); the header's
        // other axis readings are kept for display.
        let oscillation = get("Oscillation_axis")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let scan = ["phi", "chi", "kappa"]
            .into_iter()
            .find(|n| oscillation.starts_with(n))
            .unwrap_or("omega");
        for (key, name) in [
            ("Chi", "chi"),
            ("Kappa", "kappa"),
            ("Phi", "phi"),
            ("Omega", "omega"),
        ] {
            let (start, increment) = if name == scan {
                (first("Start_angle"), first("Angle_increment"))
            } else {
                (first(key), first(&format!("{key}_increment")))
            };
            put(&format!("{name}_start"), start.map(Value::from));
            put(&format!("{name}_increment"), increment.map(Value::from));
        }
        let config = Value::Object(keys);
        Geometry::from_stream(&config, &Value::Null, rows, cols, SOURCE_MINICBF)
    }

    /// The scan axis is dxtbx's single rotation axis (1, 0, 0) (`GoniometerFactory.single_axis`;
    /// the master writes it as NXmx (-1, 0, 0) in McStas).
    fn set_scan_vector(&mut self) {
        if let Some(axis) = self.axes.get_mut(self.scan_axis) {
            axis.vector = Some([1.0, 0.0, 0.0]);
        }
    }
}

/// Looks keys up in the config, then in the series header; the first key present wins.
pub(crate) struct Keys<'a>(pub Vec<&'a Value>);

impl<'a> Keys<'a> {
    pub fn get(&self, names: &[&str]) -> Option<&'a Value> {
        names.iter().find_map(|n| {
            self.0
                .iter()
                .find_map(|v| v.get(*n).filter(|v| !v.is_null()))
        })
    }

    pub fn f64(&self, names: &[&str]) -> Option<f64> {
        self.get(names)
            .and_then(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::Bool(b) => Some(f64::from(u8::from(*b))),
                _ => None,
            })
            .filter(|x| x.is_finite())
    }

    pub fn u64(&self, names: &[&str]) -> Option<u64> {
        self.get(names).and_then(|v| {
            v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(|x| x.round() as u64)
            })
        })
    }

    pub fn str(&self, names: &[&str]) -> Option<String> {
        self.get(names).and_then(|v| v.as_str()).map(str::to_string)
    }

    /// A flag sent as a bool (v1, v2) or as 0/1 (cbfToEiger).
    pub fn flag(&self, names: &[&str]) -> Option<bool> {
        self.get(names)
            .and_then(|v| v.as_bool().or_else(|| v.as_f64().map(|x| x != 0.0)))
    }

    /// A goniometer axis: v1 `<axis>_start` / `<axis>_increment`, v2 `goniometer.<axis>.{start,increment}`.
    pub fn axis(&self, axis: &str) -> Option<(f64, f64)> {
        let v1 = (
            self.f64(&[&format!("{axis}_start")]),
            self.f64(&[&format!("{axis}_increment")]),
        );
        if v1.0.is_some() || v1.1.is_some() {
            return Some((v1.0.unwrap_or(0.0), v1.1.unwrap_or(0.0)));
        }
        let g = self.get(&["goniometer"])?.get(axis)?;
        let num = |k: &str| g.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
        Some((num("start").unwrap_or(0.0), num("increment").unwrap_or(0.0)))
    }
}

/// The wire `source` for a series header's protocol.
pub fn source_of(protocol: crate::frame::Protocol) -> &'static str {
    match protocol {
        crate::frame::Protocol::V1 => SOURCE_V1,
        crate::frame::Protocol::V2 => SOURCE_V2,
        crate::frame::Protocol::CbfToEiger => SOURCE_CBFTOEIGER,
    }
}

/// The source a header pair came from, told by its keys (for callers without a protocol).
pub fn source_from_keys(config: &Value, header: &Value) -> &'static str {
    let htype = header
        .get("htype")
        .or_else(|| config.get("htype"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if htype.starts_with("cbfToEiger") {
        SOURCE_CBFTOEIGER
    } else if config.get("type").and_then(Value::as_str) == Some("start")
        || header.get("type").and_then(Value::as_str) == Some("start")
    {
        SOURCE_V2
    } else {
        SOURCE_V1
    }
}

impl crate::frame::SeriesHeader {
    /// This series' geometry for frames of `rows` x `cols` (0: as the header says).
    pub fn geometry(&self, rows: usize, cols: usize) -> Geometry {
        Geometry::from_stream(
            &self.config,
            &self.header,
            rows,
            cols,
            source_of(self.protocol),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testdata;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// A flat 450 um Si panel facing the beam, as dxtbx's simple detector builds it.
    struct Flat {
        image_size: [usize; 2],
        pixel: f64,
        trusted_max: f64,
        beam: [f64; 2],
        distance: f64,
    }

    impl Flat {
        fn check(&self, p: &Panel) {
            assert_eq!(p.image_size, self.image_size);
            assert!(close(p.pixel_size[0], self.pixel, 1e-12));
            assert!(close(p.pixel_size[1], self.pixel, 1e-12));
            assert!(close(p.thickness, 0.45, 1e-12));
            assert_eq!(p.material, "Si");
            assert_eq!(p.trusted_range, [0.0, self.trusted_max]);
            // origin = -d z - fast * bx - slow * by (fast +x, slow -y).
            let [bx, by] = self.beam;
            assert!(close(p.origin[0], -bx * self.pixel, 1e-9));
            assert!(close(p.origin[1], by * self.pixel, 1e-9));
            assert!(close(p.origin[2], -self.distance, 1e-9));
            assert_eq!(
                (p.fast_axis, p.slow_axis),
                ([1.0, 0.0, 0.0], [0.0, -1.0, 0.0])
            );
        }
    }

    /// The series header among a message's parsed parts.
    fn start_of(parsed: Vec<crate::stream::Parsed>) -> crate::frame::SeriesHeader {
        parsed
            .into_iter()
            .find_map(|p| match p {
                crate::stream::Parsed::Start(h) => Some(h),
                _ => None,
            })
            .expect("a series start")
    }

    fn v2_start() -> Option<crate::frame::SeriesHeader> {
        let bytes = testdata::read("stream_v2/eiger2_16m_final/start.cbor")?;
        Some(start_of(crate::stream::v2::parse(&[&bytes]).unwrap()))
    }

    #[test]
    fn v2_start_of_the_real_16m_gives_237_mm_and_its_wavelength() {
        let Some(header) = v2_start() else { return };
        let g = header.geometry(4362, 4148);
        assert_eq!(g.source, SOURCE_V2);
        assert!(g.missing.is_empty(), "{:?}", g.missing);
        assert!(close(g.distance.unwrap(), 237.15919962215962, 1e-9));
        assert!(close(g.wavelength.unwrap(), 0.918381073013, 1e-12));
        assert_eq!(g.kind, DetectorKind::Eiger);
        assert_eq!(g.description, "Dectris EIGER2 Si 16M");
        assert_eq!(g.detector_number, "E-32-0117");
        let expected = Flat {
            image_size: [4148, 4362],
            pixel: 0.075,
            trusted_max: 21517.0,
            beam: [2049.3840906675064, 2163.621048575148],
            distance: 237.15919962215962,
        };
        expected.check(&g.panels[0]);
        let bc = g.beam_center().unwrap();
        assert!(close(bc[0], 2049.3840906675064, 1e-9) && close(bc[1], 2163.621048575148, 1e-9));
        // The scan: omega 0.1 per frame, chi at 30.
        assert_eq!(g.scan().unwrap().name, "omega");
        assert_eq!(g.scan().unwrap().increment, 0.1);
        let wire = g.to_json();
        assert!(close(
            wire["distance"].as_f64().unwrap(),
            237.15919962215962,
            1e-9
        ));
        assert_eq!(wire["detector_kind"], "eiger");
        assert_eq!(wire["goniometer"]["scan_axis"], "omega");
    }

    #[test]
    fn v1_config_of_the_real_1m_capture() {
        let Some(messages) = testdata::v1_1m_messages() else {
            return;
        };
        let parts = testdata::slices(&messages[0]);
        let header = start_of(crate::stream::v1::parse(&parts).unwrap());
        let g = header.geometry(0, 0);
        assert_eq!(g.source, SOURCE_V1);
        assert_eq!(g.kind, DetectorKind::Eiger);
        assert_eq!(g.panels[0].image_size, [1028, 1062]);
        let c = &header.config;
        // This dark test capture says detector_distance 0.0 and detector_translation [0, 0, 0]:
        // no distance, and the geometry says so.
        assert_eq!(c["detector_distance"].as_f64(), Some(0.0));
        assert_eq!(g.distance, None);
        assert_eq!(g.missing, vec!["distance"]);
        assert!(g.to_json()["beam_center"].is_null());
        assert!(close(g.wavelength.unwrap(), 1.5418000685586377, 1e-12));
        assert_eq!(g.panels[0].trusted_range, [0.0, 1702012.0]);
        assert!(close(
            g.panels[0].origin[0],
            -c["beam_center_x"].as_f64().unwrap() * c["x_pixel_size"].as_f64().unwrap() * 1000.0,
            1e-9
        ));
    }

    #[test]
    fn cbftoeiger_config_prefers_detector_distance_over_translation() {
        let Some(messages) = testdata::cbf_messages(true) else {
            return;
        };
        let parts = testdata::slices(&messages[0]);
        let header = start_of(crate::stream::cbftoeiger::parse(&parts).unwrap());
        let g = header.geometry(4371, 4150);
        assert_eq!(g.source, SOURCE_CBFTOEIGER);
        // detector_distance 0.150000005960464 m; the translation says 0.25 m.
        assert!(close(g.distance.unwrap(), 150.000005960464, 1e-9));
        assert!(close(g.wavelength.unwrap(), 0.979457974433899, 1e-12));
        assert_eq!(g.panels[0].trusted_range, [0.0, 4001400.0]);
        assert_eq!(g.two_theta, 0.0);
        assert_eq!(g.scan().unwrap().name, "phi");
        assert_eq!(g.scan().unwrap().start, 361.0);
    }

    #[test]
    fn cbftoeiger_two_theta_start_tilts_the_detector_about_x() {
        let config = json!({
            "wavelength": 1.0, "detector_distance": 0.2, "beam_center_x": 100.0,
            "beam_center_y": 50.0, "x_pixel_size": 1e-4, "y_pixel_size": 1e-4,
            "two_theta_start": 30.0, "two_theta_increment": 0.0, "description": "PILATUS 2M",
        });
        let header = json!({"htype": "cbfToEiger-0.1"});
        let g = Geometry::from_stream(&config, &header, 20, 30, source_from_keys(&config, &header));
        assert_eq!(g.source, SOURCE_CBFTOEIGER);
        assert_eq!(g.kind, DetectorKind::Pilatus);
        let p = &g.panels[0];
        let (s, c) = 30f64.to_radians().sin_cos();
        // R(+x, 30) applied to fast (1,0,0), slow (0,-1,0) and origin (-10, 5, -200).
        assert_eq!(p.fast_axis, [1.0, 0.0, 0.0]);
        assert!(close(p.slow_axis[1], -c, 1e-15) && close(p.slow_axis[2], -s, 1e-15));
        assert!(close(p.origin[0], -10.0, 1e-12));
        assert!(close(p.origin[1], c * 5.0 + s * 200.0, 1e-12));
        assert!(close(p.origin[2], s * 5.0 - c * 200.0, 1e-12));
        // The direct beam meets the tilted plane d tan(30) below the header's beam centre, so
        // further along slow (-y): slow = by + d tan(30) / pixel (as ADSC headers state it).
        let bc = g.beam_center().unwrap();
        assert!(close(bc[0], 100.0, 1e-9));
        assert!(close(bc[1], 50.0 + 200.0 * s / c / 0.1, 1e-9), "{bc:?}");
    }

    const THAU_HEADER: &str = "###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors
data_thau_3_2_0001
_array_data.header_convention \"PILATUS_1.2\"
_array_data.header_contents
;
# Detector: PILATUS3 6M, S/N 60-0119
# 2019-09-11T13:20:28.989
# Pixel_size 172e-6 m x 172e-6 m
# Silicon sensor, thickness 0.000450 m
# Exposure_time 0.0190000 s
# Exposure_period 0.0200000 s
# Tau = 0 s
# Count_cutoff 115897 counts
# Threshold_setting: 6400 eV
# Excluded_pixels: badpixel_mask.tif
# Wavelength 0.96859 A
# Detector_distance 0.35100 m
# Beam_xy (1261.61, 1306.96) pixels
# Start_angle 89.9997 deg.
# Angle_increment 0.0000 deg.
# Detector_2theta 0.0000 deg.
# Kappa 0.0000 deg.
# Phi 0.0000 deg.
# Phi_increment 0.0000 deg.
# Omega 89.9997 deg.
# Omega_increment 0.0000 deg.
# Chi 0.0000 deg.
# Chi_increment 0.0000 deg.
# Oscillation_axis X.CW +SLOW
;
Content-Type: application/octet-stream;
X-Binary-Size-Fastest-Dimension: 2463
X-Binary-Size-Second-Dimension: 2527
";

    #[test]
    fn minicbf_header_as_dxtbx_reads_it() {
        let g = Geometry::from_cbf_header(THAU_HEADER, 0, 0);
        assert!(g.missing.is_empty(), "{:?}", g.missing);
        assert_eq!(g.source, SOURCE_MINICBF);
        assert_eq!(g.description, "PILATUS3 6M");
        assert_eq!(g.detector_number, "60-0119");
        assert_eq!(g.kind, DetectorKind::Pilatus);
        assert_eq!(g.wavelength, Some(0.96859));
        assert!(close(g.distance.unwrap(), 351.0, 1e-9));
        let expected = Flat {
            image_size: [2463, 2527],
            pixel: 0.172,
            trusted_max: 115897.0,
            beam: [1261.61, 1306.96],
            distance: 351.0,
        };
        expected.check(&g.panels[0]);
        assert_eq!(g.count_time, Some(0.019));
        assert_eq!(g.frame_time, Some(0.02));
        assert_eq!(g.scan().unwrap().name, "omega");
        assert_eq!(g.scan().unwrap().start, 89.9997);
        // rows/cols given win over the MIME header.
        assert_eq!(
            Geometry::from_cbf_header(THAU_HEADER, 10, 20).panels[0].image_size,
            [20, 10]
        );
    }

    #[test]
    fn minicbf_detector_2theta_and_cdte() {
        let text = THAU_HEADER
            .replace("Detector_2theta 0.0000", "Detector_2theta 25.0000")
            .replace(
                "# Silicon sensor, thickness 0.000450 m",
                "# CdTe sensor, thickness 0.001000 m",
            );
        let g = Geometry::from_cbf_header(&text, 0, 0);
        assert_eq!(g.two_theta, 25.0);
        let p = &g.panels[0];
        assert_eq!(p.material, "CdTe");
        assert!(close(p.thickness, 1.0, 1e-12));
        let (s, c) = 25f64.to_radians().sin_cos();
        let flat = Geometry::from_cbf_header(THAU_HEADER, 0, 0).panels[0].origin;
        assert!(close(p.origin[1], c * flat[1] - s * flat[2], 1e-9));
        assert!(close(p.origin[2], s * flat[1] + c * flat[2], 1e-9));
        // Bragg's law through the model: the pixel at the beam centre of the unrotated detector
        // now sees 2theta = 25 degrees.
        let x = [
            p.origin[0] + 1261.61 * 0.172 * p.fast_axis[0] + 1306.96 * 0.172 * p.slow_axis[0],
            p.origin[1] + 1261.61 * 0.172 * p.fast_axis[1] + 1306.96 * 0.172 * p.slow_axis[1],
            p.origin[2] + 1261.61 * 0.172 * p.fast_axis[2] + 1306.96 * 0.172 * p.slow_axis[2],
        ];
        let len = dot(x, x).sqrt();
        let angle = (-x[2] / len).acos().to_degrees();
        assert!(close(angle, 25.0, 1e-9), "{angle}");
    }

    #[test]
    fn detector_orientation_turns_the_panel() {
        let mut config = json!({
            "wavelength": 1.0, "detector_distance": 0.1, "beam_center_x": 10.0,
            "beam_center_y": 20.0, "x_pixel_size": 1e-4, "y_pixel_size": 1e-4,
            // The real cbfToEiger value: DECTRIS's standard orientation.
            "detector_orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
        });
        let g = Geometry::from_stream(&config, &Value::Null, 30, 40, SOURCE_V1);
        assert_eq!(g.orientation, STANDARD_ORIENTATION);
        // A detector turned by 90 degrees: fast along -y, slow along -x (McStas: (0,-1,0), (1,0,0)).
        config["detector_orientation"] = json!([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]);
        let g = Geometry::from_stream(&config, &Value::Null, 30, 40, SOURCE_V1);
        let p = &g.panels[0];
        assert_eq!(
            (p.fast_axis, p.slow_axis),
            ([0.0, -1.0, 0.0], [-1.0, 0.0, 0.0])
        );
        // origin = -d z - fast * 1 mm - slow * 2 mm; the beam still meets it at the header's centre.
        assert_eq!(p.origin, [2.0, 1.0, -100.0]);
        let bc = g.beam_center().unwrap();
        assert!(close(bc[0], 10.0, 1e-9) && close(bc[1], 20.0, 1e-9));
        // Not two orthogonal unit vectors: the standard orientation.
        config["detector_orientation"] = json!([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
        let g = Geometry::from_stream(&config, &Value::Null, 30, 40, SOURCE_V1);
        assert_eq!(g.orientation, STANDARD_ORIENTATION);
    }

    #[test]
    fn missing_essentials_are_listed_never_invented() {
        let g = Geometry::from_stream(&json!({}), &json!({}), 10, 10, SOURCE_V1);
        assert_eq!(g.wavelength, None);
        assert_eq!(g.distance, None);
        for key in ["wavelength", "distance", "beam_center", "pixel_size"] {
            assert!(g.missing.contains(&key), "{key} not in {:?}", g.missing);
        }
        let wire = g.to_json();
        assert!(wire["wavelength"].is_null() && wire["distance"].is_null());
        assert!(wire["beam_center"].is_null());
        // A photon energy alone gives the wavelength.
        let g = Geometry::from_stream(
            &json!({"photon_energy": 12398.419843320026}),
            &json!({}),
            1,
            1,
            SOURCE_V1,
        );
        assert!(close(g.wavelength.unwrap(), 1.0, 1e-12));
        let g = Geometry::from_cbf_header("# Detector: PILATUS 2M, S/N 1\n", 5, 5);
        assert!(g.missing.contains(&"wavelength") && g.missing.contains(&"distance"));
    }
}
