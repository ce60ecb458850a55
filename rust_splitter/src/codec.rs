//! Frame codecs of the DECTRIS stream: bitshuffle-LZ4 (`bs8/16/32-lz4<`, v2 `bslz4`) and plain LZ4
//! (`lz4<`, v2 `lz4`). No PyO3 here: `lib.rs` wraps these for Python.
//!
//! Bitshuffle-LZ4 chunk layout (Masui et al. 2015, "A compression scheme for radio data in high
//! performance computing", the `bitshuffle` HDF5 filter 32008), identical to a v1 `bs*-lz4<` blob:
//! a 12-byte big-endian header (u64 uncompressed bytes, u32 block size in bytes), then for each
//! block of `block` elements a u32 big-endian compressed length and one raw LZ4 block holding the
//! bit-transposed elements. A final partial block is rounded down to a multiple of 8 elements; the
//! last `n % 8` elements follow uncompressed.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("truncated blob: {0}")]
    Truncated(&'static str),
    #[error("blob declares {declared} uncompressed bytes but the frame needs {expected}")]
    SizeMismatch { declared: u64, expected: usize },
    #[error("bad block size {0} bytes in the bitshuffle header (elem_size {1})")]
    BadBlockSize(u32, usize),
    #[error("corrupt LZ4 block at byte {offset}: {reason}")]
    Lz4 { offset: usize, reason: String },
    #[error("element size {0} not supported (1, 2, 4 or 8)")]
    ElemSize(usize),
}

/// bitshuffle's default: blocks of 8 KiB, a multiple of 8 elements, at least 128 elements.
pub fn default_block_elems(elem_size: usize) -> usize {
    (((8192 / elem_size) / 8) * 8).max(128)
}

/// Transpose an 8x8 bit matrix held in a u64 (row j = byte j), Hacker's Delight 7-3.
#[inline(always)]
fn transpose8(mut x: u64) -> u64 {
    let mut t = (x ^ (x >> 7)) & 0x00AA_00AA_00AA_00AA;
    x = x ^ t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000_CCCC_0000_CCCC;
    x = x ^ t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x0000_0000_F0F0_F0F0;
    x ^ t ^ (t << 28)
}

/// Bit-shuffle `n` elements (n % 8 == 0): output row `b*8+k` (n/8 bytes) holds bit k of byte b of
/// every element, element 8m+j at bit j of byte m.
fn shuffle_block(src: &[u8], dst: &mut [u8], n: usize, elem_size: usize) {
    let row = n / 8;
    for m in 0..row {
        for b in 0..elem_size {
            let mut x = 0u64;
            for j in 0..8 {
                x |= (src[(8 * m + j) * elem_size + b] as u64) << (8 * j);
            }
            let t = transpose8(x);
            for k in 0..8 {
                dst[(b * 8 + k) * row + m] = (t >> (8 * k)) as u8;
            }
        }
    }
}

/// Which unshuffle kernel decodes a block: chosen once per process from the CPU (the best it
/// runs), or forced with the environment variable `INTXR_BSLZ4_KERNEL` = `scalar`, `sse2`, `avx2`,
/// `gfni` or `avx512` (for the tests, which check every path gives the same bytes; a path the CPU lacks
/// falls back to the best one below it). Ordered from the least to the most the CPU must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Portable code only (any architecture).
    Scalar,
    /// SSE2 (the x86-64 baseline) for even element sizes, scalar for the rest.
    Sse2,
    /// AVX2 byte + bit transposes with 32-byte stores, then SSE2 and scalar for the remainder.
    Avx2,
    /// As Avx2, with each group's 8x8 bit transpose one GFNI affine instruction (Intel Ice Lake,
    /// AMD Zen 4 and later) instead of 24 shift/xor/and steps per 8 registers.
    Gfni,
    /// As Gfni, compiled for AVX-512 (F, VL, BW): the same 256-bit code with 32 vector registers
    /// instead of 16, so the four byte slices of 4-byte elements stay in registers instead of
    /// spilling to the stack (measured: 4-byte frames decode 10-15% faster, 2-byte ones 2-3%).
    Avx512,
}

impl Kernel {
    /// The best kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                if std::is_x86_feature_detected!("gfni") {
                    if std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512vl")
                        && std::is_x86_feature_detected!("avx512bw")
                    {
                        return Kernel::Avx512;
                    }
                    return Kernel::Gfni;
                }
                return Kernel::Avx2;
            }
            Kernel::Sse2
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Scalar
    }

    /// `requested` if this CPU runs it, else the best one below it.
    pub fn supported(requested: Kernel) -> Kernel {
        requested.min(Kernel::detect())
    }

    /// The process-wide choice (detected, or forced by `INTXR_BSLZ4_KERNEL`), read once.
    pub fn current() -> Kernel {
        static CHOICE: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let forced = match std::env::var("INTXR_BSLZ4_KERNEL").as_deref() {
                Ok("scalar") => Kernel::Scalar,
                Ok("sse2") => Kernel::Sse2,
                Ok("avx2") => Kernel::Avx2,
                Ok("gfni") => Kernel::Gfni,
                _ => Kernel::Avx512,
            };
            Kernel::supported(forced)
        })
    }
}

/// Inverse of `shuffle_block` with the process's kernel.
#[cfg(test)]
fn unshuffle_block(src: &[u8], dst: &mut [u8], n: usize, elem_size: usize) {
    unshuffle_block_with(Kernel::current(), src, dst, n, elem_size)
}

/// Inverse of `shuffle_block` with `kernel` (which must be `Kernel::supported`).
fn unshuffle_block_with(kernel: Kernel, src: &[u8], dst: &mut [u8], n: usize, elem_size: usize) {
    let row = n / 8;
    assert!(src.len() >= n * elem_size && dst.len() >= n * elem_size);
    let mut done = 0; // groups of 8 elements already written
    #[cfg(target_arch = "x86_64")]
    {
        if kernel >= Kernel::Avx2 {
            // SAFETY: `Kernel::supported` only gives Avx2 (Gfni, Avx512) when the CPU has AVX2 (and
            // GFNI, and AVX-512 F/VL/BW);
            // the helpers check their slices' lengths before their unchecked loads and stores.
            done = unsafe {
                match (elem_size <= 4, kernel) {
                    (true, Kernel::Avx512) => {
                        avx2::unshuffle_transpose_avx512(src, dst, row, elem_size)
                    }
                    (true, Kernel::Gfni) => {
                        avx2::unshuffle_transpose_gfni(src, dst, row, elem_size)
                    }
                    (true, _) => avx2::unshuffle_transpose(src, dst, row, elem_size),
                    (false, _) => avx2::unshuffle_groups(src, dst, row, elem_size),
                }
            };
        }
        if kernel != Kernel::Scalar && elem_size.is_multiple_of(2) {
            // SAFETY: SSE2 is part of the x86_64 baseline; the helper bounds-checks its slices.
            done += unsafe { sse2::unshuffle_groups_from(src, dst, row, elem_size, done) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
    unshuffle_scalar(src, dst, row, elem_size, done);
}

/// Scalar unshuffle of the groups `first..row` (8 elements each): gather a byte from 8 bit planes,
/// transpose the 8x8 bits. The whole block (8 KiB) sits in L1 cache, so the gathers are cheap.
fn unshuffle_scalar(src: &[u8], dst: &mut [u8], row: usize, elem_size: usize, first: usize) {
    for m in first..row {
        for b in 0..elem_size {
            let mut x = 0u64;
            for k in 0..8 {
                x |= (src[(b * 8 + k) * row + m] as u64) << (8 * k);
            }
            let t = transpose8(x);
            for j in 0..8 {
                dst[(8 * m + j) * elem_size + b] = (t >> (8 * j)) as u8;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// Transpose 16 rows of 16 bytes: out[c] = (r0[c], r1[c], ..., r15[c]). Four unpack stages
    /// (bytes, 16-bit, 32-bit, 64-bit lanes).
    #[inline(always)]
    unsafe fn transpose16x16(r: &[__m128i; 16]) -> [__m128i; 16] {
        let mut a = [_mm_setzero_si128(); 16]; // a[2i] cols 0-7, a[2i+1] cols 8-15 of rows 2i, 2i+1
        for i in 0..8 {
            a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
        }
        // b[q*4 + j]: columns 4q..4q+3 of rows 4j..4j+3
        let mut b = [_mm_setzero_si128(); 16];
        for j in 0..4 {
            let (lo0, hi0, lo1, hi1) = (a[4 * j], a[4 * j + 1], a[4 * j + 2], a[4 * j + 3]);
            b[j] = _mm_unpacklo_epi16(lo0, lo1);
            b[4 + j] = _mm_unpackhi_epi16(lo0, lo1);
            b[8 + j] = _mm_unpacklo_epi16(hi0, hi1);
            b[12 + j] = _mm_unpackhi_epi16(hi0, hi1);
        }
        // d[p*2 + k]: columns 2p, 2p+1 of rows 8k..8k+7
        let mut d = [_mm_setzero_si128(); 16];
        for q in 0..4 {
            for k in 0..2 {
                d[(2 * q) * 2 + k] = _mm_unpacklo_epi32(b[q * 4 + 2 * k], b[q * 4 + 2 * k + 1]);
                d[(2 * q + 1) * 2 + k] = _mm_unpackhi_epi32(b[q * 4 + 2 * k], b[q * 4 + 2 * k + 1]);
            }
        }
        let mut out = [_mm_setzero_si128(); 16];
        for p in 0..8 {
            out[2 * p] = _mm_unpacklo_epi64(d[2 * p], d[2 * p + 1]);
            out[2 * p + 1] = _mm_unpackhi_epi64(d[2 * p], d[2 * p + 1]);
        }
        out
    }

    /// Unshuffle groups of 8 elements, 16 groups at a time, for even element sizes. For each 16
    /// bit planes (two bytes of every element), a byte transpose gives each group's plane bytes in
    /// one register; `movemask` then reads bit j of all 16 planes: element 8m+j's two bytes.
    /// Returns how many groups were done (a multiple of 16); the caller finishes the rest.
    #[target_feature(enable = "sse2")]
    pub unsafe fn unshuffle_groups_from(
        src: &[u8],
        dst: &mut [u8],
        row: usize,
        elem_size: usize,
        first: usize,
    ) -> usize {
        let groups = row - row % 16;
        let halves = elem_size / 2;
        assert!(src.len() >= 8 * elem_size * row && dst.len() >= 8 * row * elem_size);
        assert!(first.is_multiple_of(16));
        let mut m = first.min(groups);
        let start = m;
        while m < groups {
            for h in 0..halves {
                let mut r = [_mm_setzero_si128(); 16];
                for (i, reg) in r.iter_mut().enumerate() {
                    let at = (16 * h + i) * row + m;
                    *reg = _mm_loadu_si128(src.as_ptr().add(at) as *const __m128i);
                }
                let cols = transpose16x16(&r);
                for (c, col) in cols.iter().enumerate() {
                    let base = 8 * (m + c) * elem_size + 2 * h;
                    let mut v = *col;
                    for j in (0..8).rev() {
                        // bit 7 of each plane byte belongs to element j of the group; adding the
                        // vector to itself shifts every byte left by one for the next j.
                        let bits = _mm_movemask_epi8(v) as u16;
                        let at = base + j * elem_size;
                        dst[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                        v = _mm_add_epi8(v, v);
                    }
                }
            }
            m += 16;
        }
        groups - start
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The SSE2 transpose on 256-bit registers: the unpacks work within each 128-bit lane, so lane 0
    /// transposes bytes 0-15 of the 16 rows and lane 1 bytes 16-31, side by side.
    #[inline(always)]
    unsafe fn transpose16x16x2(r: &[__m256i; 16]) -> [__m256i; 16] {
        let mut a = [_mm256_setzero_si256(); 16];
        for i in 0..8 {
            a[2 * i] = _mm256_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm256_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm256_setzero_si256(); 16];
        for j in 0..4 {
            let (lo0, hi0, lo1, hi1) = (a[4 * j], a[4 * j + 1], a[4 * j + 2], a[4 * j + 3]);
            b[j] = _mm256_unpacklo_epi16(lo0, lo1);
            b[4 + j] = _mm256_unpackhi_epi16(lo0, lo1);
            b[8 + j] = _mm256_unpacklo_epi16(hi0, hi1);
            b[12 + j] = _mm256_unpackhi_epi16(hi0, hi1);
        }
        let mut d = [_mm256_setzero_si256(); 16];
        for q in 0..4 {
            for k in 0..2 {
                d[(2 * q) * 2 + k] = _mm256_unpacklo_epi32(b[q * 4 + 2 * k], b[q * 4 + 2 * k + 1]);
                d[(2 * q + 1) * 2 + k] =
                    _mm256_unpackhi_epi32(b[q * 4 + 2 * k], b[q * 4 + 2 * k + 1]);
            }
        }
        let mut out = [_mm256_setzero_si256(); 16];
        for p in 0..8 {
            out[2 * p] = _mm256_unpacklo_epi64(d[2 * p], d[2 * p + 1]);
            out[2 * p + 1] = _mm256_unpackhi_epi64(d[2 * p], d[2 * p + 1]);
        }
        out
    }

    /// `sse2::unshuffle_groups_from` 32 groups at a time: one movemask reads bit j of 16 planes
    /// for two groups at once (group m+c in the low 16 bits, group m+16+c in the high 16).
    /// Returns how many groups were done (a multiple of 32).
    #[target_feature(enable = "avx2")]
    pub unsafe fn unshuffle_groups(
        src: &[u8],
        dst: &mut [u8],
        row: usize,
        elem_size: usize,
    ) -> usize {
        let groups = row - row % 32;
        let halves = elem_size / 2;
        assert!(src.len() >= 8 * elem_size * row && dst.len() >= 8 * row * elem_size);
        let mut m = 0;
        while m < groups {
            for h in 0..halves {
                let mut r = [_mm256_setzero_si256(); 16];
                for (i, reg) in r.iter_mut().enumerate() {
                    let at = (16 * h + i) * row + m;
                    *reg = _mm256_loadu_si256(src.as_ptr().add(at) as *const __m256i);
                }
                let cols = transpose16x16x2(&r);
                for (c, col) in cols.iter().enumerate() {
                    let low = 8 * (m + c) * elem_size + 2 * h;
                    let high = 8 * (m + 16 + c) * elem_size + 2 * h;
                    let mut v = *col;
                    for j in (0..8).rev() {
                        let bits = _mm256_movemask_epi8(v) as u32;
                        let at = low + j * elem_size;
                        dst[at..at + 2].copy_from_slice(&(bits as u16).to_le_bytes());
                        let at = high + j * elem_size;
                        dst[at..at + 2].copy_from_slice(&((bits >> 16) as u16).to_le_bytes());
                        v = _mm256_add_epi8(v, v);
                    }
                }
            }
            m += 32;
        }
        groups
    }

    /// Transpose the 8x8 bit matrix in each byte position of 8 registers: afterwards bit k of
    /// byte i of `p[j]` is what bit j of byte i of `p[k]` was. Three rounds of block swaps
    /// between register pairs (1, 2 then 4 rows apart); the masks keep bits inside their byte.
    #[inline(always)]
    unsafe fn transpose_bits8(p: &mut [__m256i; 8]) {
        macro_rules! round {
            ($s:literal, $mask:expr) => {
                let mask = _mm256_set1_epi8($mask);
                for k in 0..8 {
                    if k & $s == 0 {
                        let t = _mm256_and_si256(
                            _mm256_xor_si256(_mm256_srli_epi16::<$s>(p[k]), p[k + $s]),
                            mask,
                        );
                        p[k + $s] = _mm256_xor_si256(p[k + $s], t);
                        p[k] = _mm256_xor_si256(p[k], _mm256_slli_epi16::<$s>(t));
                    }
                }
            };
        }
        round!(1, 0x55);
        round!(2, 0x33);
        round!(4, 0x0F);
    }

    /// Byte `b` of the elements of 32 groups (`m..m+32`): load the 8 bit planes of that byte (32
    /// bytes each, one per group), bit-transpose them so register j holds byte `b` of element j of
    /// every group, then byte-transpose so each u64 holds one group's 8 elements. Result `r`
    /// holds groups `2r, 2r+1` (low 128-bit lane) and `16+2r, 17+2r` (high lane), relative to m.
    ///
    /// With GFNI the bytes are transposed first, then each u64 (one group's 8 plane bytes) has its
    /// 8x8 bits transposed by one `gf2p8affineqb` (Intel SDM: result bit i of byte j is the parity
    /// of matrix byte 7-i AND data byte j; with data byte j = 1 << j and the planes loaded in
    /// reverse order, that is bit j of plane i: bit i of element j).
    #[inline(always)]
    unsafe fn plane_bytes<const GFNI: bool>(
        src: *const u8,
        row: usize,
        b: usize,
        m: usize,
    ) -> [__m256i; 8] {
        let mut p = [_mm256_setzero_si256(); 8];
        for (k, reg) in p.iter_mut().enumerate() {
            let plane = if GFNI { 8 * b + 7 - k } else { 8 * b + k };
            *reg = _mm256_loadu_si256(src.add(plane * row + m) as *const __m256i);
        }
        if !GFNI {
            transpose_bits8(&mut p);
        }
        // a[2i] / a[2i+1]: registers 2i, 2i+1 interleaved for groups 0-7 / 8-15 of each lane.
        let mut a = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            a[2 * i] = _mm256_unpacklo_epi8(p[2 * i], p[2 * i + 1]);
            a[2 * i + 1] = _mm256_unpackhi_epi8(p[2 * i], p[2 * i + 1]);
        }
        // lo[q] (elements 0-3) and hi[q] (elements 4-7): groups 4q..4q+3 of each lane, 4 bytes each.
        let mut lo = [_mm256_setzero_si256(); 4];
        let mut hi = [_mm256_setzero_si256(); 4];
        for (h, half) in [&mut lo, &mut hi].into_iter().enumerate() {
            let (x0, x1, y0, y1) = (a[4 * h], a[4 * h + 1], a[4 * h + 2], a[4 * h + 3]);
            half[0] = _mm256_unpacklo_epi16(x0, y0);
            half[1] = _mm256_unpackhi_epi16(x0, y0);
            half[2] = _mm256_unpacklo_epi16(x1, y1);
            half[3] = _mm256_unpackhi_epi16(x1, y1);
        }
        let mut out = [_mm256_setzero_si256(); 8];
        for q in 0..4 {
            out[2 * q] = _mm256_unpacklo_epi32(lo[q], hi[q]);
            out[2 * q + 1] = _mm256_unpackhi_epi32(lo[q], hi[q]);
        }
        if GFNI {
            let one_bit_each = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
            for v in out.iter_mut() {
                *v = _mm256_gf2p8affine_epi64_epi8::<0>(one_bit_each, *v);
            }
        }
        out
    }

    // One entry point per target-feature set: Rust compiles a function for the features its
    // attribute names, and `unshuffle_transpose_with` is inlined into each.
    macro_rules! unshuffle_entry {
        ($(#[$doc:meta])* $name:ident, $features:literal, $gfni:literal) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub unsafe fn $name(src: &[u8], dst: &mut [u8], row: usize, elem_size: usize) -> usize {
                unshuffle_transpose_with::<$gfni>(src, dst, row, elem_size)
            }
        };
    }
    unshuffle_entry!(
        /// Unshuffle 32 groups (256 elements) at a time for element sizes 1, 2 and 4, entirely in
        /// registers: per element byte, `plane_bytes`; then interleave the element bytes and store
        /// 32 bytes at a time straight into `dst`. Returns how many groups were done (a multiple
        /// of 32).
        unshuffle_transpose,
        "avx2",
        false
    );
    unshuffle_entry!(
        /// `unshuffle_transpose` with GFNI bit transposes.
        unshuffle_transpose_gfni,
        "avx2,gfni",
        true
    );
    unshuffle_entry!(
        /// `unshuffle_transpose_gfni` with 32 vector registers (see `Kernel::Avx512`).
        unshuffle_transpose_avx512,
        "avx2,gfni,avx512f,avx512vl,avx512bw",
        true
    );

    #[inline(always)]
    unsafe fn unshuffle_transpose_with<const GFNI: bool>(
        src: &[u8],
        dst: &mut [u8],
        row: usize,
        elem_size: usize,
    ) -> usize {
        assert!(matches!(elem_size, 1 | 2 | 4));
        // Every load below ends at or before 8 * elem_size * row, every store at 8 * row * elem_size.
        assert!(src.len() >= 8 * elem_size * row && dst.len() >= 8 * row * elem_size);
        let groups = row - row % 32;
        let s = src.as_ptr();
        let d = dst.as_mut_ptr();
        let es = elem_size;
        // 32 bytes from `group`'s first element: groups < m + 32 <= row, so the store ends within
        // 8 * es * row bytes (one group of 4-byte elements, two of 2-byte, four of 1-byte).
        macro_rules! store {
            ($group:expr, $v:expr) => {
                _mm256_storeu_si256(d.add(8 * es * ($group)) as *mut __m256i, $v)
            };
        }
        let mut m = 0;
        while m < groups {
            match es {
                1 => {
                    let t = plane_bytes::<GFNI>(s, row, 0, m);
                    for r in (0..8).step_by(2) {
                        // groups 2r..2r+3 are t[r].lo, t[r+1].lo; 16+2r.. the high lanes.
                        store!(m + 2 * r, _mm256_permute2x128_si256::<0x20>(t[r], t[r + 1]));
                        store!(
                            m + 16 + 2 * r,
                            _mm256_permute2x128_si256::<0x31>(t[r], t[r + 1])
                        );
                    }
                }
                2 => {
                    let t0 = plane_bytes::<GFNI>(s, row, 0, m);
                    let t1 = plane_bytes::<GFNI>(s, row, 1, m);
                    for r in 0..8 {
                        let e = _mm256_unpacklo_epi8(t0[r], t1[r]); // group 2r | 16+2r
                        let o = _mm256_unpackhi_epi8(t0[r], t1[r]); // group 2r+1 | 17+2r
                        store!(m + 2 * r, _mm256_permute2x128_si256::<0x20>(e, o));
                        store!(m + 16 + 2 * r, _mm256_permute2x128_si256::<0x31>(e, o));
                    }
                }
                _ => {
                    let t0 = plane_bytes::<GFNI>(s, row, 0, m);
                    let t1 = plane_bytes::<GFNI>(s, row, 1, m);
                    let t2 = plane_bytes::<GFNI>(s, row, 2, m);
                    let t3 = plane_bytes::<GFNI>(s, row, 3, m);
                    for r in 0..8 {
                        let e01 = _mm256_unpacklo_epi8(t0[r], t1[r]);
                        let o01 = _mm256_unpackhi_epi8(t0[r], t1[r]);
                        let e23 = _mm256_unpacklo_epi8(t2[r], t3[r]);
                        let o23 = _mm256_unpackhi_epi8(t2[r], t3[r]);
                        let e_lo = _mm256_unpacklo_epi16(e01, e23); // elements 0-3 of group 2r
                        let e_hi = _mm256_unpackhi_epi16(e01, e23); // elements 4-7
                        let o_lo = _mm256_unpacklo_epi16(o01, o23);
                        let o_hi = _mm256_unpackhi_epi16(o01, o23);
                        store!(m + 2 * r, _mm256_permute2x128_si256::<0x20>(e_lo, e_hi));
                        store!(
                            m + 16 + 2 * r,
                            _mm256_permute2x128_si256::<0x31>(e_lo, e_hi)
                        );
                        store!(m + 2 * r + 1, _mm256_permute2x128_si256::<0x20>(o_lo, o_hi));
                        store!(
                            m + 17 + 2 * r,
                            _mm256_permute2x128_si256::<0x31>(o_lo, o_hi)
                        );
                    }
                }
            }
            m += 32;
        }
        groups
    }
}

/// Decode one raw LZ4 block into `out`, returning the bytes written. Safe code (every slice
/// access is checked, so a malformed block gives an error, never a panic or UB), with the fast
/// paths bitshuffle's blocks need: short literals and matches copied 16 or 32 bytes at a time when
/// both buffers have room (the bytes written past the sequence's end are rewritten by the next
/// ones), and overlapping matches (runs of short periods, common in bit planes) by doubling copies.
fn lz4_decode_block(input: &[u8], out: &mut [u8]) -> Result<usize, &'static str> {
    fn length_ext(input: &[u8], ip: &mut usize) -> Result<usize, &'static str> {
        let mut sum = 0usize;
        loop {
            let b = *input.get(*ip).ok_or("length runs past the block")?;
            *ip += 1;
            sum += b as usize;
            if b != 255 {
                return Ok(sum);
            }
        }
    }
    let (n_in, n_out) = (input.len(), out.len());
    let (mut ip, mut op) = (0usize, 0usize);
    loop {
        let token = *input.get(ip).ok_or("missing token")?;
        ip += 1;
        let mut lit = (token >> 4) as usize;
        if lit != 15 && ip + 16 <= n_in && op + 16 <= n_out {
            out[op..op + 16].copy_from_slice(&input[ip..ip + 16]);
        } else {
            if lit == 15 {
                lit += length_ext(input, &mut ip)?;
            }
            if lit > n_in - ip {
                return Err("literals run past the block");
            }
            if lit > n_out - op {
                return Err("literals overflow the output");
            }
            out[op..op + lit].copy_from_slice(&input[ip..ip + lit]);
        }
        ip += lit;
        op += lit;
        if ip == n_in {
            return Ok(op); // the last sequence holds literals only
        }
        let Some(&[lo, hi]) = input
            .get(ip..ip + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        else {
            return Err("match offset missing");
        };
        ip += 2;
        let offset = u16::from_le_bytes([lo, hi]) as usize;
        if offset == 0 || offset > op {
            return Err("match offset out of range");
        }
        let mut ml = (token & 15) as usize + 4;
        if ml == 19 {
            ml += length_ext(input, &mut ip)?;
        }
        if ml > n_out - op {
            return Err("match overflows the output");
        }
        let src = op - offset;
        if offset >= 16 && ml <= 32 && op + 32 <= n_out {
            // Each 16-byte source chunk ends at or before the destination's start.
            // Through a 16-byte temporary: two vector moves, no memmove call.
            let chunk: [u8; 16] = out[src..src + 16].try_into().unwrap();
            out[op..op + 16].copy_from_slice(&chunk);
            let chunk: [u8; 16] = out[src + 16..src + 32].try_into().unwrap();
            out[op + 16..op + 32].copy_from_slice(&chunk);
        } else if offset >= ml {
            out.copy_within(src..src + ml, op);
        } else if out[src..op].iter().all(|&b| b == out[src]) {
            // A run of one byte (offset 1, or a longer period of one byte: the zero runs of a
            // frame's high bit planes, most of a bitshuffled frame's bytes): one fill.
            let v = out[src];
            out[op..op + ml].fill(v);
        } else {
            // Period `offset`: copy the pattern, then the doubled pattern, ... (done stays a
            // multiple of the period, and each source ends where its destination starts).
            let mut done = 0;
            while done < ml {
                let chunk = (offset + done).min(ml - done);
                out.copy_within(src..src + chunk, op + done);
                done += chunk;
            }
        }
        op += ml;
    }
}

/// Ask for the cache line at `p` (`HINT`: `_MM_HINT_T0` to read, `_MM_HINT_ET0` to write). A
/// prefetch is only a hint: it never faults, wherever `p` points.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<const HINT: i32>(p: *const u8) {
    // SAFETY: prefetch instructions do not access memory architecturally and never fault.
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p as *const i8) };
}

/// Ask for the cache lines of `dst` that a block's unshuffle will write while its LZ4 decode runs.
#[cfg(target_arch = "x86_64")]
fn prefetch_for_write(dst: &[u8]) {
    for off in (0..dst.len()).step_by(64) {
        prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(dst[off..].as_ptr());
    }
}

fn check_elem_size(elem_size: usize) -> Result<(), CodecError> {
    match elem_size {
        1 | 2 | 4 | 8 => Ok(()),
        e => Err(CodecError::ElemSize(e)),
    }
}

/// Read the 12-byte header: (uncompressed bytes, block size in bytes).
pub fn bslz4_header(blob: &[u8]) -> Result<(u64, u32), CodecError> {
    if blob.len() < 12 {
        return Err(CodecError::Truncated(
            "shorter than the 12-byte bitshuffle header",
        ));
    }
    let total = u64::from_be_bytes(blob[0..8].try_into().unwrap());
    let block = u32::from_be_bytes(blob[8..12].try_into().unwrap());
    Ok((total, block))
}

/// Compress `data` (elements of `elem_size` bytes) to a bitshuffle-LZ4 chunk with its header.
pub fn bslz4_compress(
    data: &[u8],
    elem_size: usize,
    block_elems: usize,
) -> Result<Vec<u8>, CodecError> {
    check_elem_size(elem_size)?;
    let block_elems = if block_elems == 0 {
        default_block_elems(elem_size)
    } else {
        block_elems
    };
    if !block_elems.is_multiple_of(8) {
        return Err(CodecError::BadBlockSize(
            (block_elems * elem_size) as u32,
            elem_size,
        ));
    }
    let n = data.len() / elem_size;
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
    out.extend_from_slice(&((block_elems * elem_size) as u32).to_be_bytes());
    let mut shuffled = vec![0u8; block_elems * elem_size];
    let mut compressed = Vec::new();
    let mut start = 0usize;
    while start < n - n % 8 {
        let count = block_elems.min(n - start);
        let count = count - count % 8;
        let bytes = count * elem_size;
        shuffle_block(
            &data[start * elem_size..start * elem_size + bytes],
            &mut shuffled[..bytes],
            count,
            elem_size,
        );
        compressed.clear();
        compressed.resize(lz4_flex::block::get_maximum_output_size(bytes), 0);
        let len =
            lz4_flex::block::compress_into(&shuffled[..bytes], &mut compressed).map_err(|e| {
                CodecError::Lz4 {
                    offset: out.len(),
                    reason: e.to_string(),
                }
            })?;
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&compressed[..len]);
        start += count;
    }
    out.extend_from_slice(&data[start * elem_size..]);
    Ok(out)
}

/// Decompress a bitshuffle-LZ4 chunk into `out`, whose length is the frame's size in bytes.
pub fn bslz4_decompress_into(
    blob: &[u8],
    out: &mut [u8],
    elem_size: usize,
) -> Result<(), CodecError> {
    bslz4_decompress_into_with(Kernel::current(), blob, out, elem_size)
}

/// `bslz4_decompress_into` with the unshuffle `kernel` (made `Kernel::supported` here).
pub fn bslz4_decompress_into_with(
    kernel: Kernel,
    blob: &[u8],
    out: &mut [u8],
    elem_size: usize,
) -> Result<(), CodecError> {
    bslz4_decompress_with_progress(kernel, blob, out, elem_size, |_| {})
}

/// `bslz4_decompress_into_with`, calling `progress` with the bytes of `out` decoded so far after
/// each block and once at the end (the pre-screen bins rows while they are still in cache).
pub fn bslz4_decompress_with_progress<F: FnMut(&[u8])>(
    kernel: Kernel,
    blob: &[u8],
    out: &mut [u8],
    elem_size: usize,
    mut progress: F,
) -> Result<(), CodecError> {
    let kernel = Kernel::supported(kernel);
    check_elem_size(elem_size)?;
    let (total, block_bytes) = bslz4_header(blob)?;
    if total != out.len() as u64 {
        return Err(CodecError::SizeMismatch {
            declared: total,
            expected: out.len(),
        });
    }
    let block_elems = block_bytes as usize / elem_size;
    if block_bytes == 0
        || !(block_bytes as usize).is_multiple_of(elem_size)
        || !block_elems.is_multiple_of(8)
    {
        return Err(CodecError::BadBlockSize(block_bytes, elem_size));
    }
    let n = out.len() / elem_size;
    let mut shuffled = vec![0u8; block_elems * elem_size];
    let mut pos = 12usize;
    let mut start = 0usize;
    while start < n - n % 8 {
        let count = block_elems.min(n - start);
        let count = count - count % 8;
        let bytes = count * elem_size;
        if blob.len() < pos + 4 {
            return Err(CodecError::Truncated("block length missing"));
        }
        let len = u32::from_be_bytes(blob[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4;
        if blob.len() < pos + len {
            return Err(CodecError::Truncated(
                "LZ4 block shorter than its declared length",
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if elem_size == 4 {
            // Measured on a 6M and a 16M frame: 4-byte blocks decode 8-10% faster with their output
            // lines asked for first; 2-byte blocks 8% slower (the prefetches cost more than the
            // unshuffle's store misses they save).
            prefetch_for_write(&out[start * elem_size..start * elem_size + bytes]);
        }
        let got = lz4_decode_block(&blob[pos..pos + len], &mut shuffled[..bytes]).map_err(|e| {
            CodecError::Lz4 {
                offset: pos,
                reason: e.to_string(),
            }
        })?;
        if got != bytes {
            return Err(CodecError::Lz4 {
                offset: pos,
                reason: format!("gave {got} bytes, expected {bytes}"),
            });
        }
        unshuffle_block_with(
            kernel,
            &shuffled[..bytes],
            &mut out[start * elem_size..start * elem_size + bytes],
            count,
            elem_size,
        );
        pos += len;
        start += count;
        progress(&out[..start * elem_size]);
    }
    let rest = out.len() - start * elem_size;
    if blob.len() < pos + rest {
        return Err(CodecError::Truncated(
            "trailing uncompressed elements missing",
        ));
    }
    out[start * elem_size..].copy_from_slice(&blob[pos..pos + rest]);
    progress(out);
    Ok(())
}

/// Whether a bitshuffle-LZ4 chunk holds all its blocks and trailing elements, by walking the block
/// lengths without decompressing (a truncated blob whose header is intact fails here).
pub fn bslz4_check_layout(blob: &[u8], elem_size: usize) -> Result<(), CodecError> {
    check_elem_size(elem_size)?;
    let (total, block_bytes) = bslz4_header(blob)?;
    let block_elems = block_bytes as usize / elem_size;
    if block_bytes == 0
        || !(block_bytes as usize).is_multiple_of(elem_size)
        || !block_elems.is_multiple_of(8)
    {
        return Err(CodecError::BadBlockSize(block_bytes, elem_size));
    }
    let n = usize::try_from(total / elem_size as u64).unwrap_or(usize::MAX);
    let mut pos = 12usize;
    let mut start = 0usize;
    // Each block takes at least its 4-byte length: at most blob.len() / 4 steps.
    while start < n - n % 8 {
        let count = block_elems.min(n - start);
        let count = count - count % 8;
        let Some(head) = blob.get(pos..pos + 4) else {
            return Err(CodecError::Truncated("block length missing"));
        };
        let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
        // The lengths are a chain of loads through a blob just received, mostly not in this core's
        // caches: ask for the lines a few blocks ahead, guessing the blocks are about this long.
        #[cfg(target_arch = "x86_64")]
        for ahead in [4usize, 8] {
            let guess = pos.wrapping_add(ahead.wrapping_mul(4 + len));
            prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(blob.as_ptr().wrapping_add(guess));
        }
        pos = pos.saturating_add(4 + len);
        if pos > blob.len() {
            return Err(CodecError::Truncated(
                "LZ4 block shorter than its declared length",
            ));
        }
        start += count;
    }
    if blob.len() - pos < (n - start) * elem_size {
        return Err(CodecError::Truncated(
            "trailing uncompressed elements missing",
        ));
    }
    Ok(())
}

/// A v1 `lz4<` blob: one raw LZ4 block, no size prefix.
pub fn lz4_compress(data: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress(data)
}

pub fn lz4_decompress_into(blob: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let got = lz4_flex::block::decompress_into(blob, out).map_err(|e| CodecError::Lz4 {
        offset: 0,
        reason: e.to_string(),
    })?;
    if got != out.len() {
        return Err(CodecError::SizeMismatch {
            declared: got as u64,
            expected: out.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD unshuffles (AVX2 for 32 groups at a time, SSE2 for 16, then scalar) against the
    /// scalar one alone, for block lengths that leave every kind of remainder.
    #[test]
    fn every_unshuffle_kernel_on_counts_with_zero_planes() {
        // Detector counts: mostly small (their high bit planes all zero), with rare large or
        // all-ones (masked) elements that make some 32-group spans of those planes nonzero and
        // leave others zero; and some spans of all-zero elements.
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let kernels = [
            Kernel::Scalar,
            Kernel::Sse2,
            Kernel::Avx2,
            Kernel::Gfni,
            Kernel::Avx512,
        ];
        for elem_size in [1usize, 2, 4] {
            for groups in [31usize, 32, 64, 96, 256, 1024 / elem_size] {
                let n = 8 * groups;
                let mut data = Vec::with_capacity(n * elem_size);
                for e in 0..n {
                    let r = next();
                    let v: u64 = if (e / 256) % 3 == 2 {
                        0 // a whole span of zero elements: every plane zero
                    } else if r % 500 == 0 {
                        u64::MAX // a masked pixel
                    } else if r % 97 == 0 {
                        (r >> 20) & 0xFFFF_FFFF // a bright one
                    } else {
                        (r >> 40) % 6
                    };
                    data.extend_from_slice(&v.to_le_bytes()[..elem_size]);
                }
                let mut shuffled = vec![0u8; data.len()];
                shuffle_block(&data, &mut shuffled, n, elem_size);
                for kernel in kernels.into_iter().filter(|k| *k <= Kernel::detect()) {
                    let mut out = vec![0u8; data.len()];
                    unshuffle_block_with(kernel, &shuffled, &mut out, n, elem_size);
                    assert_eq!(out, data, "{kernel:?}, elem {elem_size}, {groups} groups");
                }
            }
        }
    }

    #[test]
    fn simd_unshuffle_equals_scalar() {
        let mut state = 0x2545F4914F6CDD1Du64;
        for elem_size in [1usize, 2, 4, 8] {
            for groups in [
                1usize,
                15,
                16,
                17,
                31,
                32,
                33,
                47,
                64,
                95,
                128,
                1024 / elem_size,
            ] {
                let n = 8 * groups;
                let data: Vec<u8> = (0..n * elem_size)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 24) as u8
                    })
                    .collect();
                let mut shuffled = vec![0u8; data.len()];
                shuffle_block(&data, &mut shuffled, n, elem_size);
                let mut fast = vec![0u8; data.len()];
                unshuffle_block(&shuffled, &mut fast, n, elem_size);
                let mut scalar = vec![0u8; data.len()];
                unshuffle_scalar(&shuffled, &mut scalar, groups, elem_size, 0);
                assert_eq!(scalar, data, "scalar, elem {elem_size}, {groups} groups");
                assert_eq!(fast, data, "simd, elem {elem_size}, {groups} groups");
            }
        }
    }

    const KERNELS: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Sse2,
        Kernel::Avx2,
        Kernel::Gfni,
        Kernel::Avx512,
    ];

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Detector-like data: small counts with runs of zeros and masked (all-ones) pixels.
    fn random_pixels(n: usize, elem_size: usize, state: &mut u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * elem_size);
        for _ in 0..n {
            let r = xorshift(state);
            let v: u64 = match r % 16 {
                0 => u64::MAX,
                1..=6 => 0,
                7 => r >> 8,
                _ => (r >> 20) % 9,
            };
            out.extend_from_slice(&v.to_le_bytes()[..elem_size]);
        }
        out
    }

    /// Every kernel (each one the CPU runs; the others fall back) unshuffles like the scalar code.
    #[test]
    fn every_kernel_unshuffles_like_scalar() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for kernel in KERNELS {
            for elem_size in [1usize, 2, 4, 8] {
                for groups in [1usize, 31, 32, 33, 63, 64, 65, 96, 128, 1024 / elem_size] {
                    let n = 8 * groups;
                    let data = random_pixels(n, elem_size, &mut state);
                    let mut shuffled = vec![0u8; data.len()];
                    shuffle_block(&data, &mut shuffled, n, elem_size);
                    let mut back = vec![0u8; data.len()];
                    unshuffle_block_with(
                        Kernel::supported(kernel),
                        &shuffled,
                        &mut back,
                        n,
                        elem_size,
                    );
                    assert_eq!(back, data, "{kernel:?}, elem {elem_size}, {groups} groups");
                }
            }
        }
    }

    /// Randomized round trips through every kernel: element sizes 1, 2, 4 (and 8), odd lengths
    /// (a last partial block, then up to 7 trailing elements copied as they are), small blocks.
    #[test]
    fn bslz4_random_round_trips_every_kernel() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..60 {
            let elem_size = [1usize, 2, 4, 8][(xorshift(&mut state) % 4) as usize];
            let n = (xorshift(&mut state) % 40_000) as usize;
            let block = if xorshift(&mut state).is_multiple_of(3) {
                8 * (16 + (xorshift(&mut state) % 300) as usize)
            } else {
                0
            };
            let data = random_pixels(n, elem_size, &mut state);
            let blob = bslz4_compress(&data, elem_size, block).unwrap();
            for kernel in KERNELS {
                let mut out = vec![0xA5u8; data.len()];
                bslz4_decompress_into_with(kernel, &blob, &mut out, elem_size).unwrap();
                assert_eq!(out, data, "{kernel:?} elem {elem_size} n {n} block {block}");
            }
        }
    }

    /// Malformed chunks on every kernel: truncation, wrong sizes, corrupt block lengths and bytes
    /// give an error (or, for flipped LZ4 payload bytes, some bytes), never a panic.
    #[test]
    fn bslz4_malformed_input_every_kernel() {
        let mut state = 0xD1B5_4A32_D192_ED03u64;
        for elem_size in [1usize, 2, 4] {
            let data = random_pixels(20_011, elem_size, &mut state);
            let blob = bslz4_compress(&data, elem_size, 0).unwrap();
            for kernel in KERNELS {
                let mut out = vec![0u8; data.len()];
                for cut in [0, 5, 12, 15, 16, 100, blob.len() / 2, blob.len() - 1] {
                    assert!(
                        bslz4_decompress_into_with(kernel, &blob[..cut], &mut out, elem_size)
                            .is_err(),
                        "{kernel:?} elem {elem_size} cut {cut}"
                    );
                }
                let mut small = vec![0u8; data.len() - elem_size];
                assert!(matches!(
                    bslz4_decompress_into_with(kernel, &blob, &mut small, elem_size),
                    Err(CodecError::SizeMismatch { .. })
                ));
                // A block length one short, one long, and huge.
                for len in [0u32, 1, u32::MAX] {
                    let mut bad = blob.clone();
                    let first = u32::from_be_bytes(bad[12..16].try_into().unwrap());
                    let v = match len {
                        0 => first - 1,
                        1 => first + 1,
                        _ => len,
                    };
                    bad[12..16].copy_from_slice(&v.to_be_bytes());
                    assert!(bslz4_decompress_into_with(kernel, &bad, &mut out, elem_size).is_err());
                }
                // A bad block size in the header.
                let mut bad = blob.clone();
                bad[8..12].copy_from_slice(&7u32.to_be_bytes());
                assert!(matches!(
                    bslz4_decompress_into_with(kernel, &bad, &mut out, elem_size),
                    Err(CodecError::BadBlockSize(..))
                ));
                // Random byte flips after the header: any result but a panic.
                for _ in 0..200 {
                    let mut bad = blob.clone();
                    for _ in 0..1 + xorshift(&mut state) % 4 {
                        let at = 12 + (xorshift(&mut state) as usize) % (bad.len() - 12);
                        bad[at] ^= 1 + (xorshift(&mut state) % 255) as u8;
                    }
                    let _ = bslz4_decompress_into_with(kernel, &bad, &mut out, elem_size);
                }
            }
        }
    }

    /// Our LZ4 block decoder against lz4_flex: equal bytes on valid blocks (random, runs of
    /// every short period, bit-plane-like data), no panic on corrupted ones.
    #[test]
    fn lz4_block_decoder_matches_lz4_flex() {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        for case in 0..400 {
            let n = (xorshift(&mut state) % 9000) as usize;
            // Short periods, and on odd cases long ones (32-bit frames' repeated bit planes: 256).
            let longest = if case % 2 == 1 { 300 } else { 40 };
            let period = 1 + (xorshift(&mut state) % longest) as usize;
            let data: Vec<u8> = match case % 5 {
                0 => (0..n).map(|_| xorshift(&mut state) as u8).collect(),
                // Sparse bits between long runs of zeros, as a frame's high bit planes: matches
                // of a period above 1 over one repeated byte.
                4 => (0..n)
                    .map(|i| {
                        if (i / (8 * period)).is_multiple_of(4) {
                            (xorshift(&mut state) as u8) & (xorshift(&mut state) as u8)
                        } else {
                            0
                        }
                    })
                    .collect(),
                1 => (0..n).map(|i| (i % period) as u8).collect(),
                2 => (0..n)
                    .map(|i| {
                        if (i / 37) % 3 == 0 {
                            xorshift(&mut state) as u8
                        } else {
                            (i % period) as u8
                        }
                    })
                    .collect(),
                _ => random_pixels(n / 4, 4, &mut state),
            };
            let blob = lz4_flex::block::compress(&data);
            let mut ours = vec![0u8; data.len()];
            assert_eq!(
                lz4_decode_block(&blob, &mut ours),
                Ok(data.len()),
                "case {case}"
            );
            assert_eq!(ours, data, "case {case}");
            for _ in 0..20 {
                let mut bad = blob.clone();
                if bad.is_empty() {
                    break;
                }
                let at = (xorshift(&mut state) as usize) % bad.len();
                bad[at] ^= 1 + (xorshift(&mut state) % 255) as u8;
                let cut = bad.len() - (xorshift(&mut state) as usize) % 3;
                let _ = lz4_decode_block(&bad[..cut], &mut ours);
            }
        }
        assert!(lz4_decode_block(&[], &mut [0u8; 4]).is_err());
        assert!(lz4_decode_block(&[0x50, 1, 2], &mut [0u8; 8]).is_err());
    }

    fn pattern(n: usize, elem_size: usize) -> Vec<u8> {
        (0..n * elem_size)
            .map(|i| ((i * 2654435761usize) >> 7) as u8 & 0x3f)
            .collect()
    }

    #[test]
    fn shuffle_round_trip() {
        for es in [1, 2, 4, 8] {
            for n in [8, 64, 512, 520, 4096] {
                let src = pattern(n, es);
                let mut mid = vec![0u8; src.len()];
                let mut back = vec![0u8; src.len()];
                shuffle_block(&src, &mut mid, n, es);
                assert_ne!(mid, src);
                unshuffle_block(&mid, &mut back, n, es);
                assert_eq!(back, src, "elem_size {es} n {n}");
            }
        }
    }

    #[test]
    fn shuffle_puts_bit_k_of_element_j_in_row_k() {
        // Element 3 of 8 one-byte elements has only bit 5 set: row 5, bit 3.
        let mut src = vec![0u8; 8];
        src[3] = 1 << 5;
        let mut dst = vec![0u8; 8];
        shuffle_block(&src, &mut dst, 8, 1);
        assert_eq!(dst, vec![0, 0, 0, 0, 0, 1 << 3, 0, 0]);
    }

    #[test]
    fn bslz4_round_trip_with_partial_blocks() {
        for es in [1, 2, 4] {
            for n in [0usize, 5, 8, 4096, 5000, 10_003] {
                let src = pattern(n, es);
                let blob = bslz4_compress(&src, es, 0).unwrap();
                let mut out = vec![0u8; src.len()];
                bslz4_decompress_into(&blob, &mut out, es).unwrap();
                assert_eq!(out, src, "elem_size {es} n {n}");
            }
        }
    }

    #[test]
    fn bslz4_rejects_truncation_and_wrong_size() {
        let src = pattern(5000, 2);
        let blob = bslz4_compress(&src, 2, 0).unwrap();
        let mut out = vec![0u8; src.len()];
        assert!(matches!(
            bslz4_decompress_into(&blob[..blob.len() - 20], &mut out, 2),
            Err(CodecError::Truncated(_))
        ));
        let mut small = vec![0u8; src.len() - 2];
        assert!(matches!(
            bslz4_decompress_into(&blob, &mut small, 2),
            Err(CodecError::SizeMismatch { .. })
        ));
        assert!(bslz4_decompress_into(&blob[..5], &mut out, 2).is_err());
    }

    #[test]
    fn lz4_round_trip() {
        let src = pattern(3000, 4);
        let blob = lz4_compress(&src);
        let mut out = vec![0u8; src.len()];
        lz4_decompress_into(&blob, &mut out).unwrap();
        assert_eq!(out, src);
    }
}
