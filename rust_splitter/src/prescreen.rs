//! Pre-screen kernels (the rules are in `intxr/reader/prescreen.py`): bin a frame into
//! `factor x factor` blocks of summed counts with a per-block "every pixel trusted" flag, fed with
//! rows as the bitshuffle-LZ4 decoder writes them (so each band is binned while it is still in
//! cache, not re-read from memory). DIALS's `dispersion` test on the binned frame is the one
//! threshold kernel's (`dispersion.strong_pixels`, called from `intxr/reader/prescreen.py`).
//!
//! The bins are exactly what the Cython `bin_frame` gives (the Python tests compare them).

use crate::codec::{self, CodecError, Kernel};

/// Pixel types of the frames a reader sees (the numpy dtypes uint8, uint16, uint32, int32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixel {
    U8,
    U16,
    U32,
    I32,
}

impl Pixel {
    pub fn from_dtype(elem_size: usize, signed: bool) -> Option<Pixel> {
        match (elem_size, signed) {
            (1, false) => Some(Pixel::U8),
            (2, false) => Some(Pixel::U16),
            (4, false) => Some(Pixel::U32),
            (4, true) => Some(Pixel::I32),
            _ => None,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Pixel::U8 => 1,
            Pixel::U16 => 2,
            Pixel::U32 | Pixel::I32 => 4,
        }
    }
}

/// What to bin: the frame's shape and pixel type, the block size, and the trusted range as
/// integer bounds (counts are integers: lo <= v <= hi is v >= ceil(lo) and v <= floor(hi)).
#[derive(Debug, Clone, Copy)]
pub struct BinSpec {
    pub rows: usize,
    pub cols: usize,
    pub factor: usize,
    pub pixel: Pixel,
    pub lo: i64,
    pub hi: i64,
}

impl BinSpec {
    /// Binned shape (rows // factor, cols // factor): partial blocks at the edges are left out.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows / self.factor, self.cols / self.factor)
    }
}

/// Bins `band` rows at a time into `sums` (saturated at 2^32-1, as the Cython kernel clips) and
/// `valid` (1 where every pixel of the block is trusted).
pub struct Binner<'a> {
    spec: BinSpec,
    sums: &'a mut [u32],
    valid: &'a mut [u8],
    next_band: usize,
    colsum: Vec<u64>,
    colbad: Vec<u8>,
    avx2: bool,
}

impl<'a> Binner<'a> {
    pub fn new(
        spec: BinSpec,
        sums: &'a mut [u32],
        valid: &'a mut [u8],
        kernel: Kernel,
    ) -> Result<Self, String> {
        let (h, w) = spec.shape();
        if spec.factor == 0 || sums.len() != h * w || valid.len() != h * w {
            return Err(format!(
                "binned arrays need {h} x {w} elements (factor {})",
                spec.factor
            ));
        }
        Ok(Binner {
            spec,
            sums,
            valid,
            next_band: 0,
            colsum: vec![0; spec.cols],
            colbad: vec![0; spec.cols],
            avx2: kernel >= Kernel::Avx2,
        })
    }

    /// Bin every band whose rows lie wholly inside `frame` (the frame's bytes decoded so far).
    pub fn feed(&mut self, frame: &[u8]) {
        let (h, _) = self.spec.shape();
        let row_bytes = self.spec.cols * self.spec.pixel.size();
        let band_bytes = row_bytes * self.spec.factor;
        while self.next_band < h && frame.len() >= (self.next_band + 1) * band_bytes {
            let start = self.next_band * band_bytes;
            self.bin_band(&frame[start..start + band_bytes]);
            self.next_band += 1;
        }
    }

    fn bin_band(&mut self, band: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is only set for Kernel::Avx2 or above, which `Kernel::supported`
            // gives only on CPUs with AVX2; the body is safe code compiled with AVX2 enabled.
            unsafe { self.bin_band_avx2(band) };
            return;
        }
        self.bin_band_portable(band);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn bin_band_avx2(&mut self, band: &[u8]) {
        let spec = self.spec;
        if spec.pixel == Pixel::U16 && spec.factor == 4 {
            if let Some((lo, hi)) = bounds::<u16>(spec) {
                let (_, w) = spec.shape();
                let base = self.next_band * w;
                let rows: Vec<std::borrow::Cow<'_, [u16]>> =
                    band.chunks_exact(spec.cols * 2).map(typed::<u16>).collect();
                let rows = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                let done = avx2::bin_u16_by4(
                    rows,
                    lo,
                    hi,
                    &mut self.sums[base..base + w],
                    &mut self.valid[base..base + w],
                );
                // The last few blocks (fewer than 8) the portable way.
                let band_rest: Vec<&[u16]> = rows.iter().map(|r| &r[done * 4..]).collect();
                for (k, bi) in (done..w).enumerate() {
                    let mut total = 0u32;
                    let mut bad = false;
                    for r in &band_rest {
                        for &v in &r[k * 4..k * 4 + 4] {
                            total += v as u32;
                            bad |= (v < lo) | (v > hi);
                        }
                    }
                    self.sums[base + bi] = total;
                    self.valid[base + bi] = !bad as u8;
                }
                return;
            }
        }
        self.bin_band_portable(band);
    }

    /// Column sums and "any untrusted" flags down the band's rows (unit stride: vectorised), then
    /// each block's sum from `factor` neighbouring columns.
    #[inline(always)]
    fn bin_band_portable(&mut self, band: &[u8]) {
        let spec = self.spec;
        let (_, w) = spec.shape();
        let row_bytes = spec.cols * spec.pixel.size();
        let base = self.next_band * w;
        let (sums, valid) = (
            &mut self.sums[base..base + w],
            &mut self.valid[base..base + w],
        );
        let done = match (spec.pixel, spec.factor) {
            (Pixel::U8, 4) => band_in_registers::<u8, 4>(band, spec, sums, valid),
            (Pixel::U16, 4) => band_in_registers::<u16, 4>(band, spec, sums, valid),
            (Pixel::U32, 4) => band_in_registers::<u32, 4>(band, spec, sums, valid),
            (Pixel::I32, 4) => band_in_registers::<i32, 4>(band, spec, sums, valid),
            (Pixel::U8, 2) => band_in_registers::<u8, 2>(band, spec, sums, valid),
            (Pixel::U16, 2) => band_in_registers::<u16, 2>(band, spec, sums, valid),
            (Pixel::U32, 2) => band_in_registers::<u32, 2>(band, spec, sums, valid),
            (Pixel::I32, 2) => band_in_registers::<i32, 2>(band, spec, sums, valid),
            _ => false,
        };
        if done {
            return;
        }
        self.colsum.fill(0);
        self.colbad.fill(0);
        for row in band.chunks_exact(row_bytes) {
            match spec.pixel {
                Pixel::U8 => column_pass::<u8>(row, &mut self.colsum, &mut self.colbad, spec),
                Pixel::U16 => column_pass::<u16>(row, &mut self.colsum, &mut self.colbad, spec),
                Pixel::U32 => column_pass::<u32>(row, &mut self.colsum, &mut self.colbad, spec),
                Pixel::I32 => column_pass::<i32>(row, &mut self.colsum, &mut self.colbad, spec),
            }
        }
        match spec.factor {
            4 => block_pass::<4>(&self.colsum, &self.colbad, sums, valid),
            2 => block_pass::<2>(&self.colsum, &self.colbad, sums, valid),
            f => {
                for bi in 0..w {
                    let cols = bi * f..bi * f + f;
                    let total = self.colsum[cols.clone()]
                        .iter()
                        .fold(0u64, |t, &s| t.wrapping_add(s));
                    sums[bi] = clip(total);
                    valid[bi] = self.colbad[cols].iter().all(|&b| b == 0) as u8;
                }
            }
        }
    }
}

/// Pixel types as read from the frame's bytes (native little-endian, as numpy holds them).
trait Px: Copy + PartialOrd + Default {
    const MIN: i64;
    const MAX: i64;
    /// A block sum's type: u32 for 1- and 2-byte pixels (16 x 65535 fits), 64 bits otherwise.
    type Acc: Copy + Default + std::ops::Add<Output = Self::Acc>;
    fn from_i64(v: i64) -> Self;
    fn widen(self) -> u64;
    fn acc(self) -> Self::Acc;
    fn total(a: Self::Acc) -> u64;
}
macro_rules! px {
    ($t:ty, $acc:ty) => {
        impl Px for $t {
            const MIN: i64 = <$t>::MIN as i64;
            const MAX: i64 = <$t>::MAX as i64;
            type Acc = $acc;
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn widen(self) -> u64 {
                // Two's complement for int32: a negative pixel wraps the u64 sum, which wraps
                // back as the int64 the Cython kernel keeps (see `clip`).
                self as i64 as u64
            }
            #[inline(always)]
            fn acc(self) -> $acc {
                self as $acc
            }
            #[inline(always)]
            fn total(a: $acc) -> u64 {
                a as i64 as u64
            }
        }
    };
}
px!(u8, u32);
px!(u16, u32);
px!(u32, u64);
px!(i32, i64);

/// The pixels of one row, typed (a copy only when the buffer is not aligned, never for numpy).
fn typed<T: Px>(row: &[u8]) -> std::borrow::Cow<'_, [T]> {
    // SAFETY: u8/u16/u32/i32 have no invalid bit patterns; only the aligned middle is used.
    let (head, mid, tail) = unsafe { row.align_to::<T>() };
    if head.is_empty() && tail.is_empty() {
        return std::borrow::Cow::Borrowed(mid);
    }
    std::borrow::Cow::Owned(
        row.chunks_exact(std::mem::size_of::<T>())
            .map(|b| {
                let mut v = T::default();
                // SAFETY: b holds size_of::<T>() bytes and any pattern is a valid T.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len())
                };
                v
            })
            .collect(),
    )
}

/// The trusted range in the pixel type, or None when it holds no value of the type.
fn bounds<T: Px>(spec: BinSpec) -> Option<(T, T)> {
    if spec.hi < spec.lo || spec.hi < T::MIN || spec.lo > T::MAX {
        return None;
    }
    // Equal to the i64 comparisons since the range overlaps the type's.
    Some((
        T::from_i64(spec.lo.max(T::MIN)),
        T::from_i64(spec.hi.min(T::MAX)),
    ))
}

/// A band of F rows binned F columns at a time, COLS columns per step held in registers (the
/// rows are read once, the sums never leave registers until the block totals). Returns false
/// when the band does not fit this shape (the caller takes the general path).
#[inline(always)]
fn band_in_registers<T: Px, const F: usize>(
    band: &[u8],
    spec: BinSpec,
    sums: &mut [u32],
    valid: &mut [u8],
) -> bool {
    const COLS: usize = 32;
    let Some((lo, hi)) = bounds::<T>(spec) else {
        return false;
    };
    let row_bytes = spec.cols * std::mem::size_of::<T>();
    let rows: Vec<std::borrow::Cow<'_, [T]>> =
        band.chunks_exact(row_bytes).map(typed::<T>).collect();
    if rows.len() != F {
        return false;
    }
    let w = sums.len();
    let steps = (w * F) / COLS;
    for step in 0..steps {
        let c0 = step * COLS;
        let mut acc = [T::Acc::default(); COLS];
        let mut bad = [0u8; COLS];
        for row in &rows {
            let px = &row[c0..c0 + COLS];
            for l in 0..COLS {
                acc[l] = acc[l] + px[l].acc();
                bad[l] |= ((px[l] < lo) | (px[l] > hi)) as u8;
            }
        }
        for b in 0..COLS / F {
            let mut total = T::Acc::default();
            let mut any = 0u8;
            for k in 0..F {
                total = total + acc[b * F + k];
                any |= bad[b * F + k];
            }
            sums[step * (COLS / F) + b] = clip(T::total(total));
            valid[step * (COLS / F) + b] = (any == 0) as u8;
        }
    }
    for bi in steps * (COLS / F)..w {
        let mut total = 0u64;
        let mut any = false;
        for row in &rows {
            for &v in &row[bi * F..bi * F + F] {
                total = total.wrapping_add(v.widen());
                any |= (v < lo) | (v > hi);
            }
        }
        sums[bi] = clip(total);
        valid[bi] = !any as u8;
    }
    true
}

#[inline(always)]
fn column_pass<T: Px>(row: &[u8], colsum: &mut [u64], colbad: &mut [u8], spec: BinSpec) {
    let px = typed::<T>(row);
    match bounds::<T>(spec) {
        None => colbad.fill(1), // nothing is trusted
        Some((lo, hi)) => {
            for (bad, &v) in colbad.iter_mut().zip(px.iter()) {
                *bad |= ((v < lo) | (v > hi)) as u8;
            }
        }
    }
    for (s, &v) in colsum.iter_mut().zip(px.iter()) {
        *s = s.wrapping_add(v.widen());
    }
}

/// The Cython kernel's int64 sum as numpy's `minimum(sum, 2^32-1).astype(uint32)` gives it: large
/// sums saturate, a negative one (untrusted int32 pixels; never used) wraps.
#[inline(always)]
fn clip(total: u64) -> u32 {
    let t = total as i64;
    if t < 0 {
        t as u32
    } else {
        t.min(u32::MAX as i64) as u32
    }
}

#[inline(always)]
fn block_pass<const F: usize>(colsum: &[u64], colbad: &[u8], sums: &mut [u32], valid: &mut [u8]) {
    for ((s, ok), (cs, cb)) in sums
        .iter_mut()
        .zip(valid.iter_mut())
        .zip(colsum.chunks_exact(F).zip(colbad.chunks_exact(F)))
    {
        let mut total = 0u64;
        let mut bad = 0u8;
        for k in 0..F {
            total = total.wrapping_add(cs[k]);
            bad |= cb[k];
        }
        *s = clip(total);
        *ok = (bad == 0) as u8;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// valid bytes for 8 blocks from their 8 "all trusted" bits.
    const SPREAD: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut k = 0;
            while k < 8 {
                if i & (1 << k) != 0 {
                    t[i] |= 1 << (8 * k);
                }
                k += 1;
            }
            i += 1;
        }
        t
    };

    /// 4 x 4 blocks of uint16 pixels, 8 blocks (32 columns) per step: pair sums by `madd` (on
    /// pixels biased to signed, the bias added back), horizontal adds to block sums, and each
    /// column's max and min down the rows for the trusted test. Returns the blocks done.
    #[target_feature(enable = "avx2")]
    pub unsafe fn bin_u16_by4(
        rows: [&[u16]; 4],
        lo: u16,
        hi: u16,
        sums: &mut [u32],
        valid: &mut [u8],
    ) -> usize {
        let w = sums.len().min(valid.len());
        let steps = w / 8;
        assert!(rows.iter().all(|r| r.len() >= steps * 32));
        let bias = _mm256_set1_epi16(i16::MIN);
        let ones = _mm256_set1_epi16(1);
        let (lov, hiv) = (_mm256_set1_epi16(lo as i16), _mm256_set1_epi16(hi as i16));
        // Each pair sum carries -2 x 32768 per row: a block (2 pairs, 4 rows) -16 x 32768.
        let unbias = _mm256_set1_epi32(16 * 32768);
        let all = _mm256_set1_epi64x(-1);
        for step in 0..steps {
            let c0 = step * 32;
            let mut acc = [_mm256_setzero_si256(); 2];
            let mut mx = [_mm256_setzero_si256(); 2];
            let mut mn = [_mm256_set1_epi16(-1); 2];
            for row in rows {
                for h in 0..2 {
                    // SAFETY: c0 + 16 h + 16 <= steps * 32 <= row.len() (asserted above).
                    let x = _mm256_loadu_si256(row.as_ptr().add(c0 + 16 * h) as *const __m256i);
                    mx[h] = _mm256_max_epu16(mx[h], x);
                    mn[h] = _mm256_min_epu16(mn[h], x);
                    acc[h] = _mm256_add_epi32(
                        acc[h],
                        _mm256_madd_epi16(_mm256_xor_si256(x, bias), ones),
                    );
                }
            }
            // hadd: [b0 b1 b4 b5 | b2 b3 b6 b7]; the 64-bit permute puts the blocks in order.
            let blocks = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0], acc[1]), 0xD8);
            let blocks = _mm256_add_epi32(blocks, unbias);
            _mm256_storeu_si256(sums.as_mut_ptr().add(step * 8) as *mut __m256i, blocks);
            let mut bits = 0usize;
            for h in 0..2 {
                // A column is trusted when lo <= min and max <= hi; a block when its 4 columns are.
                let ok = _mm256_and_si256(
                    _mm256_cmpeq_epi16(_mm256_max_epu16(mx[h], hiv), hiv),
                    _mm256_cmpeq_epi16(_mm256_max_epu16(mn[h], lov), mn[h]),
                );
                let block_ok = _mm256_cmpeq_epi64(ok, all);
                bits |= (_mm256_movemask_pd(_mm256_castsi256_pd(block_ok)) as usize) << (4 * h);
            }
            valid[step * 8..step * 8 + 8].copy_from_slice(&SPREAD[bits].to_le_bytes());
        }
        steps * 8
    }
}

/// Bin a whole decoded frame.
pub fn bin_frame(
    frame: &[u8],
    spec: BinSpec,
    sums: &mut [u32],
    valid: &mut [u8],
) -> Result<(), String> {
    if frame.len() != spec.rows * spec.cols * spec.pixel.size() {
        return Err("frame size does not match its shape".into());
    }
    let mut binner = Binner::new(spec, sums, valid, Kernel::current())?;
    binner.feed(frame);
    Ok(())
}

/// Decode a bitshuffle-LZ4 chunk into `out` and bin it band by band as the blocks land.
pub fn bslz4_decompress_bin_into(
    blob: &[u8],
    out: &mut [u8],
    spec: BinSpec,
    sums: &mut [u32],
    valid: &mut [u8],
) -> Result<(), CodecError> {
    if out.len() != spec.rows * spec.cols * spec.pixel.size() {
        return Err(CodecError::SizeMismatch {
            declared: out.len() as u64,
            expected: spec.rows * spec.cols * spec.pixel.size(),
        });
    }
    let kernel = Kernel::current();
    let mut binner = Binner::new(spec, sums, valid, kernel)
        .map_err(|reason| CodecError::Lz4 { offset: 0, reason })?;
    codec::bslz4_decompress_with_progress(kernel, blob, out, spec.pixel.size(), |done| {
        binner.feed(done)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rows: usize, cols: usize, factor: usize, pixel: Pixel, hi: i64) -> BinSpec {
        BinSpec {
            rows,
            cols,
            factor,
            pixel,
            lo: 0,
            hi,
        }
    }

    #[test]
    fn fused_decode_bins_like_binning_the_decoded_frame() {
        let (rows, cols) = (37, 53); // odd sizes: partial blocks at the edges, blocks across rows
        let mut state = 0x9e3779b97f4a7c15u64;
        let pixels: Vec<u16> = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state.is_multiple_of(50) {
                    65535
                } else {
                    (state % 40) as u16
                }
            })
            .collect();
        let raw: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
        let blob = codec::bslz4_compress(&raw, 2, 64).unwrap();
        for factor in [2, 3, 4] {
            let s = spec(rows, cols, factor, Pixel::U16, 65533);
            let (h, w) = s.shape();
            let (mut sums, mut valid) = (vec![0u32; h * w], vec![0u8; h * w]);
            let mut out = vec![0u8; raw.len()];
            bslz4_decompress_bin_into(&blob, &mut out, s, &mut sums, &mut valid).unwrap();
            assert_eq!(out, raw);
            for bj in 0..h {
                for bi in 0..w {
                    let block = (0..factor).flat_map(|r| {
                        let p = &pixels;
                        (0..factor).map(move |c| p[(bj * factor + r) * cols + bi * factor + c])
                    });
                    let total: u32 = block.clone().map(|v| v as u32).sum();
                    let ok = block.clone().all(|v| v <= 65533);
                    assert_eq!(sums[bj * w + bi], total);
                    assert_eq!(valid[bj * w + bi], ok as u8);
                }
            }
        }
    }
}
