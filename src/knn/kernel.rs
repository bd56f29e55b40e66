//! Packing and the fused CPU micro-kernels.
//!
//! A tile is [`MR`] queries x [`NR`] gallery rows. Queries are packed k-major per panel of
//! `MR` (`a[k * MR + i]`), gallery rows k-major per panel of `NR` (`b[k * NR + j]`), so the
//! kernel streams both with unit stride: per k, two 16-lane loads of gallery values, `MR`
//! broadcasts of query values and `2 * MR` FMAs into 24 accumulator registers. At the end
//! it forms each score `bias[j] + alpha * dot` and compares it with the query's admission
//! limit in registers; only tiles with a passing lane store anything.
//!
//! bf16 packs pairs of consecutive dimensions into one u32 (`kd = ceil(D / 2)` steps) for
//! AVX-512 BF16's `vdpbf16ps`, which multiplies bf16 pairs and accumulates in f32.
//!
//! Each kernel exists twice: AVX-512 intrinsics, and portable Rust (same packing, same
//! results up to rounding) for other CPUs and for testing the AVX-512 one against.
// The AVX-512 intrinsics (and `vdpbf16ps`) are stable since Rust 1.89; the crate's declared
// rust-version (1.85) predates them. This module needs 1.89 (the toolchain used is newer).
#![allow(clippy::incompatible_msrv)]
use half::bf16;

pub const MR: usize = 12;
pub const NR: usize = 32;

/// 64-byte aligned storage, so 16-lane loads never split a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u32; 16]);

/// An aligned buffer of 32-bit elements (f32 bits, or two bf16s).
#[derive(Default)]
pub struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

impl Aligned {
    pub fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(16), Line([0; 16]));
        self.len = len;
    }
    pub fn as_u32(&self) -> &[u32] {
        // SAFETY: Line is 16 u32s with no padding (size 64 = 16 * 4).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u32, self.len) }
    }
    pub fn as_u32_mut(&mut self) -> &mut [u32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, self.len) }
    }
    pub fn as_f32(&self) -> &[f32] {
        // SAFETY: f32 and u32 have the same size and alignment; every bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

/// Element format of a packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F32,
    Bf16,
}

impl Format {
    /// Number of k steps for dimension `d`.
    pub fn kd(self, d: usize) -> usize {
        match self {
            Format::F32 => d,
            Format::Bf16 => d.div_ceil(2),
        }
    }
}

/// Writes row `r` (of a panel of `width` rows) of values `v` into a k-major panel.
#[inline]
pub fn pack_row(panel: &mut [u32], width: usize, r: usize, v: &[f32], fmt: Format) {
    match fmt {
        Format::F32 => {
            for (k, &x) in v.iter().enumerate() {
                panel[k * width + r] = x.to_bits();
            }
        }
        Format::Bf16 => {
            for (k2, pair) in v.chunks(2).enumerate() {
                let lo = bf16::from_f32(pair[0]).to_bits() as u32;
                let hi = pair
                    .get(1)
                    .map_or(0, |&x| bf16::from_f32(x).to_bits() as u32);
                panel[k2 * width + r] = lo | (hi << 16);
            }
        }
    }
}

/// The instruction sets the kernels can use here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa {
    pub avx512: bool,
    pub avx512_bf16: bool,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::is_x86_feature_detected!("avx512f");
            Isa {
                avx512,
                avx512_bf16: avx512 && std::is_x86_feature_detected!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa {
            avx512: false,
            avx512_bf16: false,
        }
    }

    /// The portable kernels only (for tests).
    pub fn portable() -> Isa {
        Isa {
            avx512: false,
            avx512_bf16: false,
        }
    }

    pub fn describe(self) -> &'static str {
        match (self.avx512, self.avx512_bf16) {
            (true, true) => "avx512+bf16",
            (true, false) => "avx512",
            _ => "portable",
        }
    }
}

/// Result of scoring one tile: per row, a bit per lane that passed its limit, and the
/// scores of those rows.
pub struct TileOut {
    pub masks: [u32; MR],
    pub scores: [[f32; NR]; MR],
}

impl Default for TileOut {
    fn default() -> Self {
        TileOut {
            masks: [0; MR],
            scores: [[0.0; NR]; MR],
        }
    }
}

/// Scores one tile: `s[i][j] = bias[j] + alpha * <a_i, b_j>`; sets `out.masks[i]` bit `j`
/// when `s[i][j] <= limit[i]` (NaN never passes) and stores row `i`'s scores when any bit is
/// set. Returns whether any lane passed.
///
/// `a` is one packed query panel (`kd * MR` elements), `b` one packed gallery panel
/// (`kd * NR`, 64-byte aligned), `bias` NR values.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn tile(
    isa: Isa,
    fmt: Format,
    a: &[u32],
    b: &[u32],
    kd: usize,
    alpha: f32,
    bias: &[f32],
    limit: &[f32; MR],
    out: &mut TileOut,
) -> bool {
    debug_assert!(a.len() >= kd * MR && b.len() >= kd * NR && bias.len() >= NR);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the features were detected at run time; slices are long enough (above).
        if fmt == Format::F32 && isa.avx512 {
            let p = avx512::Panels {
                a,
                b,
                kd,
                alpha,
                bias,
                limit,
            };
            return unsafe { avx512::tile_f32(&p, out) };
        }
        if fmt == Format::Bf16 && isa.avx512_bf16 {
            let p = avx512::Panels {
                a,
                b,
                kd,
                alpha,
                bias,
                limit,
            };
            return unsafe { avx512::tile_bf16(&p, out) };
        }
    }
    let _ = isa;
    portable::tile(fmt, a, b, kd, alpha, bias, limit, out)
}

mod portable {
    use super::*;

    #[inline]
    fn bf16_pair(x: u32) -> (f32, f32) {
        (f32::from_bits(x << 16), f32::from_bits(x & 0xffff_0000))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn tile(
        fmt: Format,
        a: &[u32],
        b: &[u32],
        kd: usize,
        alpha: f32,
        bias: &[f32],
        limit: &[f32; MR],
        out: &mut TileOut,
    ) -> bool {
        let mut acc = [[0f32; NR]; MR];
        for k in 0..kd {
            let av = &a[k * MR..k * MR + MR];
            let bv = &b[k * NR..k * NR + NR];
            match fmt {
                Format::F32 => {
                    for i in 0..MR {
                        let x = f32::from_bits(av[i]);
                        for j in 0..NR {
                            acc[i][j] += x * f32::from_bits(bv[j]);
                        }
                    }
                }
                Format::Bf16 => {
                    for i in 0..MR {
                        let (x0, x1) = bf16_pair(av[i]);
                        for j in 0..NR {
                            let (y0, y1) = bf16_pair(bv[j]);
                            acc[i][j] += x0 * y0 + x1 * y1;
                        }
                    }
                }
            }
        }
        let mut any = false;
        for i in 0..MR {
            let mut m = 0u32;
            for j in 0..NR {
                let s = bias[j] + alpha * acc[i][j];
                out.scores[i][j] = s;
                if s <= limit[i] {
                    m |= 1 << j;
                }
            }
            out.masks[i] = m;
            any |= m != 0;
        }
        any
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn finish(
        acc: &[[__m512; 2]; MR],
        alpha: f32,
        bias: &[f32],
        limit: &[f32; MR],
        out: &mut TileOut,
    ) -> bool {
        // SAFETY (whole fn): bias has NR = 32 values; out rows have NR floats.
        unsafe {
            let al = _mm512_set1_ps(alpha);
            let b0 = _mm512_loadu_ps(bias.as_ptr());
            let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
            let mut any = 0u32;
            for i in 0..MR {
                let l = _mm512_set1_ps(limit[i]);
                let s0 = _mm512_fmadd_ps(acc[i][0], al, b0);
                let s1 = _mm512_fmadd_ps(acc[i][1], al, b1);
                let m = (_mm512_cmp_ps_mask::<_CMP_LE_OQ>(s0, l) as u32)
                    | ((_mm512_cmp_ps_mask::<_CMP_LE_OQ>(s1, l) as u32) << 16);
                out.masks[i] = m;
                if m != 0 {
                    _mm512_storeu_ps(out.scores[i].as_mut_ptr(), s0);
                    _mm512_storeu_ps(out.scores[i].as_mut_ptr().add(16), s1);
                }
                any |= m;
            }
            any != 0
        }
    }

    /// One tile's panels and epilogue (see [`super::tile`]).
    pub struct Panels<'a> {
        pub a: &'a [u32],
        pub b: &'a [u32],
        pub kd: usize,
        pub alpha: f32,
        pub bias: &'a [f32],
        pub limit: &'a [f32; MR],
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_f32(p: &Panels, out: &mut TileOut) -> bool {
        // SAFETY (whole fn): a has kd*MR elements, b kd*NR (checked by the caller).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let mut ap = p.a.as_ptr() as *const f32;
            let mut bp = p.b.as_ptr() as *const f32;
            for _ in 0..p.kd {
                let b0 = _mm512_load_ps(bp);
                let b1 = _mm512_load_ps(bp.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(i));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            finish(&acc, p.alpha, p.bias, p.limit, out)
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_bf16(p: &Panels, out: &mut TileOut) -> bool {
        // SAFETY (whole fn): as tile_f32; bf16 pairs are reinterpreted as __m512bh lanes.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let mut ap = p.a.as_ptr();
            let mut bp = p.b.as_ptr();
            for _ in 0..p.kd {
                let b0: __m512bh = std::mem::transmute(_mm512_load_si512(bp as *const __m512i));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_load_si512(bp.add(16) as *const __m512i));
                for (i, row) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], x, b1);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            finish(&acc, p.alpha, p.bias, p.limit, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn pack(rows: &[Vec<f32>], width: usize, fmt: Format, d: usize) -> Aligned {
        let kd = fmt.kd(d);
        let mut buf = Aligned::default();
        buf.resize(kd * width);
        for (r, v) in rows.iter().enumerate() {
            pack_row(buf.as_u32_mut(), width, r, v, fmt);
        }
        buf
    }

    fn round_bf16(v: f32) -> f64 {
        bf16::from_f32(v).to_f32() as f64
    }

    /// Both kernels against an f64 reference, for both formats and odd dimensions.
    #[test]
    #[allow(clippy::needless_range_loop)] // (i, j) index queries, gallery rows and outputs
    fn kernels_match_reference() {
        let mut seed = 3;
        for d in [1usize, 7, 16, 33, 128] {
            let q: Vec<Vec<f32>> = (0..MR)
                .map(|_| (0..d).map(|_| lcg(&mut seed)).collect())
                .collect();
            let g: Vec<Vec<f32>> = (0..NR)
                .map(|_| (0..d).map(|_| lcg(&mut seed)).collect())
                .collect();
            let bias: Vec<f32> = (0..NR).map(|j| j as f32 * 0.25).collect();
            for fmt in [Format::F32, Format::Bf16] {
                let a = pack(&q, MR, fmt, d);
                let b = pack(&g, NR, fmt, d);
                let kd = fmt.kd(d);
                // All-pass limits: every score is stored.
                let limit = [f32::INFINITY; MR];
                let mut isas = vec![Isa::portable()];
                if Isa::detect().avx512 {
                    isas.push(Isa::detect());
                }
                for isa in isas {
                    if fmt == Format::Bf16 && !isa.avx512_bf16 && isa.avx512 {
                        continue;
                    }
                    let mut out = TileOut::default();
                    assert!(tile(
                        isa,
                        fmt,
                        a.as_u32(),
                        b.as_u32(),
                        kd,
                        -2.0,
                        &bias,
                        &limit,
                        &mut out
                    ));
                    for i in 0..MR {
                        assert_eq!(out.masks[i], u32::MAX);
                        for j in 0..NR {
                            let dot: f64 = (0..d)
                                .map(|k| match fmt {
                                    Format::F32 => q[i][k] as f64 * g[j][k] as f64,
                                    Format::Bf16 => round_bf16(q[i][k]) * round_bf16(g[j][k]),
                                })
                                .sum();
                            let want = bias[j] as f64 - 2.0 * dot;
                            let got = out.scores[i][j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (d as f64 + 4.0),
                                "{isa:?} {fmt:?} d={d} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                    // Limits filter lanes, and NaN bias (padding) never passes.
                    let mut bias2 = bias.clone();
                    bias2[5] = f32::NAN;
                    let mut lim = [f32::NEG_INFINITY; MR];
                    lim[3] = 4.0;
                    let mut out2 = TileOut::default();
                    tile(
                        isa,
                        fmt,
                        a.as_u32(),
                        b.as_u32(),
                        kd,
                        -2.0,
                        &bias2,
                        &lim,
                        &mut out2,
                    );
                    for i in 0..MR {
                        for j in 0..NR {
                            let pass = out2.masks[i] >> j & 1 == 1;
                            let expect = i == 3 && j != 5 && out.scores[i][j] <= 4.0;
                            // Scores within rounding of the limit may go either way between
                            // kernels; compare away from the boundary.
                            if (out.scores[i][j] - 4.0).abs() > 1e-4 || j == 5 || i != 3 {
                                assert_eq!(pass, expect, "{isa:?} {fmt:?} ({i},{j})");
                            }
                        }
                    }
                }
            }
        }
    }
}
