//! What the master file says: resolved once from the series header. The geometry (wavelength,
//! distance, beam centre, pixels, sensor, axes, two-theta) is `crate::geometry`'s; the rest is what
//! only the master file needs (bit depths, counts, corrections, detectorSpecific strings).

use serde_json::Value;

use crate::frame::{FrameHeader, SeriesHeader};
use crate::geometry::{DetectorKind, Geometry, Keys, EV_ANGSTROM};

/// Everything the master file says about the detector and the experiment, resolved once from
/// the series header with defaults for what is missing (a missing key never fails the write).
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) geometry: Geometry,
    /// The wavelength written (the geometry's, else a placeholder the writer says it used).
    pub(super) wavelength: f64,
    pub(super) photon_energy: f64,
    /// Beam centre (px), distance (m), pixel size (m), sensor thickness (m) and material as
    /// written: the geometry's, with placeholders where it has none (said once on stderr).
    pub(super) beam_center: (f64, f64),
    pub(super) distance: f64,
    pub(super) pixel_size: (f64, f64),
    pub(super) count_time: f64,
    pub(super) frame_time: f64,
    pub(super) sensor_material: String,
    pub(super) sensor_thickness: f64,
    pub(super) description: String,
    pub(super) detector_number: String,
    pub(super) bit_depth_image: i32,
    pub(super) bit_depth_readout: i32,
    pub(super) nimages: u64,
    pub(super) ntrigger: u64,
    pub(super) count_cutoff: u64,
    pub(super) saturation_value: Option<u64>,
    pub(super) countrate_correction_applied: bool,
    pub(super) flatfield_correction_applied: Option<bool>,
    pub(super) pixel_mask_applied: Option<bool>,
    pub(super) virtual_pixel_correction_applied: Option<bool>,
    pub(super) threshold_energy: Option<f64>,
    pub(super) detector_readout_time: Option<f64>,
    pub(super) collection_date: Option<String>,
    /// detectorSpecific strings passed through when present (eiger_fw_version, ...).
    pub(super) specific_strings: Vec<(&'static str, String)>,
    pub(super) number_of_excluded_pixels: Option<u64>,
}

impl Meta {
    pub(super) fn from_header(header: &SeriesHeader, first: &FrameHeader) -> Meta {
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
        // Distance and beam centre as the served geometry has them: what the header said, or 0
        // (the detector at the sample, the beam at pixel (0, 0)), never an invented value.
        let distance = g.distance.map(|mm| mm / 1000.0).unwrap_or_else(|| {
            placeholders.push("distance 0");
            0.0
        });
        let beam_center = g.header_beam_center.map_or_else(
            || {
                placeholders.push("beam centre (0, 0)");
                (0.0, 0.0)
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
    pub(super) fn expected_frames(&self) -> u64 {
        self.nimages.saturating_mul(self.ntrigger)
    }

    /// What the master file links and sizes before the frames arrive: the announcement, capped so
    /// that a header announcing absurdly many frames (10^15) cannot stall the writer building
    /// links and angle arrays for them; a longer series extends the master as its files open.
    pub(super) fn announced_frames(&self) -> u64 {
        self.expected_frames().min(MAX_ANNOUNCED_FRAMES)
    }
}

/// The most frames a series' first master file is built for (see `announced_frames`).
pub(super) const MAX_ANNOUNCED_FRAMES: u64 = 1_000_000;

/// PILATUS modules and the gaps between them, as dxtbx has them (`_DetectorDatabase["Pilatus"]`
/// in FormatPilatusHelpers): 487 x 195 pixels, gaps of 7 columns and 17 rows.
const PILATUS_MODULE: (usize, usize) = (487, 195);
const PILATUS_GAP: (usize, usize) = (7, 17);

/// Set bit 0 (gap) on a PILATUS's inter-module rows and columns, the regions dxtbx masks on every
/// PILATUS miniCBF (`determine_pilatus_mask`, added by FormatCBFMiniPilatus._detector). False (mask
/// unchanged) when the frame is not a whole grid of PILATUS modules.
pub(super) fn mark_pilatus_gaps(mask: &mut [u32], ny: usize, nx: usize) -> bool {
    let grid = |size: usize, module: usize, gap: usize| {
        let n = (size + gap) / (module + gap);
        (n >= 1 && n * module + (n - 1) * gap == size).then_some(n)
    };
    let (Some(n_fast), Some(n_slow)) = (
        grid(nx, PILATUS_MODULE.0, PILATUS_GAP.0),
        grid(ny, PILATUS_MODULE.1, PILATUS_GAP.1),
    ) else {
        return false;
    };
    if mask.len() != ny * nx {
        return false;
    }
    for i in 1..n_fast {
        let start = i * PILATUS_MODULE.0 + (i - 1) * PILATUS_GAP.0;
        for row in mask.chunks_exact_mut(nx) {
            for v in &mut row[start..start + PILATUS_GAP.0] {
                *v |= 1;
            }
        }
    }
    for i in 1..n_slow {
        let start = i * PILATUS_MODULE.1 + (i - 1) * PILATUS_GAP.1;
        for v in &mut mask[start * nx..(start + PILATUS_GAP.1) * nx] {
            *v |= 1;
        }
    }
    true
}
