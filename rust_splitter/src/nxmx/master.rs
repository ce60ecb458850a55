//! The master file: NXmx as the DECTRIS file writer fills it, plus the generic NXmx items
//! DIALS's reader needs for detectors that are not EIGERs.

use std::path::{Path, PathBuf};

use crate::frame::Compression;

use super::h5::{create_file, pixel_type, H5Writer, Handle};
use super::{NxmxError, Result, SeriesWriter};
use crate::geometry::DetectorKind;

impl SeriesWriter {
    /// Write the master file, linking data files 1..=`files`, for a series of `frames` frames.
    /// It is written beside its final name and renamed over it, so a reader never sees half a file.
    /// The first master never replaces a file (it is linked to its name, which fails if the name
    /// is taken); later ones replace only this writer's own master.
    pub(super) fn write_master(&mut self, files: usize, frames: usize, last: bool) -> Result<()> {
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

    pub(super) fn write_master_to(
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
        let data = w.group("/entry/data", "NXdata")?;
        for number in 1..=files {
            w.external_link(
                &format!("/entry/data/data_{number:06}"),
                &self.data_name(number),
                "/entry/data/data",
            )?;
        }
        // dxtbx's generic NXmx reader (every detector but an EIGER) reads frame i as
        // nxdata[signal][i], else as the first member's (dxtbx.nexus.get_raw_data): without a
        // signal only data_000001's frames. So for those, a virtual dataset over all the data files
        // named by the NXdata's signal; EIGERs keep the file writer's layout (DIALS's EIGER reader
        // walks data_NNNNNN). Named `frames`, not `data`, so readers that take every `data*` member
        // (and the DECTRIS-layout readers) see the links only.
        if self.meta.geometry.kind != DetectorKind::Eiger && frames > 0 {
            let sources: Vec<(String, usize, usize)> = (1..=files)
                .map(|n| {
                    let first = (n - 1) * self.frames_per_file;
                    (
                        self.data_name(n),
                        first,
                        self.frames_per_file.min(frames.saturating_sub(first)),
                    )
                })
                .filter(|s| s.2 > 0)
                .collect();
            w.virtual_frames(
                "/entry/data/frames",
                pixel_type(self.elem_size).0,
                self.shape,
                &sources,
                "/entry/data/data",
            )?;
            w.attr_str(data.id, "/entry/data", "signal", "frames")?;
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
        w.rotation(&two_theta, &[m.geometry.two_theta], [-1.0, 0.0, 0.0], ".")?;
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
        // dimensions. Pixel (0, 0) sits at -fast * bx * px - slow * by * py from where the beam
        // meets the detector (the geometry's orientation, (+x, -y) in dxtbx's frame unless the
        // header oriented it otherwise), written in the McStas frame (x and z flip).
        let mcstas = |v: [f64; 3]| [-v[0], v[1], -v[2]];
        let [fast, slow] = m.geometry.orientation.map(mcstas);
        let module = format!("{det}/module");
        w.group(&module, "NXdetector_module")?;
        w.u32s(&format!("{module}/data_origin"), &[0, 0])?;
        w.u32s(&format!("{module}/data_size"), &[ny as u32, nx as u32])?;
        let offset: [f64; 3] = std::array::from_fn(|i| -fast[i] * bx * px - slow[i] * by * py);
        let length = offset.iter().map(|x| x * x).sum::<f64>().sqrt();
        let direction = if length > 0.0 {
            offset.map(|x| x / length)
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
        for (name, size, vector) in [("fast", px, fast), ("slow", py, slow)] {
            w.axis(
                &format!("{module}/{name}_pixel_direction"),
                &[size],
                "translation",
                "m",
                vector,
                [0.0; 3],
                &module_offset,
            )?;
        }

        // Legacy DECTRIS geometry (read by older DIALS Eiger readers).
        w.group(&format!("{det}/geometry"), "NXgeometry")?;
        w.group(&format!("{det}/geometry/orientation"), "NXorientation")?;
        w.f64s(
            &format!("{det}/geometry/orientation/value"),
            &[fast, slow].concat(),
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
        // The mask (zeros when none was sent and none is known); the NXdetector's pixel_mask is the
        // same dataset. A mask is deflated once: a later master of this series or the next ones
        // gets the stored chunks again (`H5Writer::mask`).
        let mask_path = format!("{spec}/pixel_mask");
        w.mask(&mask_path, ny, nx, self.pixel_mask.as_deref())?;
        // Always there: dxtbx's generic NXmx reader takes its static mask only from the NXdetector.
        w.hard_link(&format!("{det}/pixel_mask"), &format!("{spec}/pixel_mask"))?;

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
        w.rotation(
            &format!("/entry/sample/transformations/{axis}"),
            &angles,
            [-1.0, 0.0, 0.0],
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
