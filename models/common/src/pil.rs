//! Pillow-exact image resizing.
//!
//! transformers' image processors and diffusers' video processor resize with
//! Pillow: separable, antialiased convolution with 8-bit fixed-point
//! coefficients and an 8-bit intermediate image. Matching their pixel values
//! (and so the models' outputs) bit for bit needs the same arithmetic, which
//! [`pil_resize`] reproduces for all five filters (checked against Pillow 13).

use image::RgbImage;

/// Pillow's resampling filters (the integer codes of `PIL.Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PilFilter {
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl PilFilter {
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    (px.sin() / px) * (0.54 + 0.46 * px.cos())
                }
            }
            Self::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and the fixed-point coefficients (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: u32, out_size: u32, filter: PilFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut out = Vec::with_capacity(out_size as usize);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let weights: Vec<f64> = (xmin..xmax)
            .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = weights.iter().sum();
        let fixed = weights
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let v = w * (1u64 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        out.push((xmin as usize, fixed));
    }
    out
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One horizontal pass of Pillow's 8-bit resampler: `src` is `sw` x `sh` RGB, the result `dw` x `sh`.
fn resample_horizontal(src: &[u8], sw: u32, sh: u32, dw: u32, filter: PilFilter) -> Vec<u8> {
    let coeffs = coefficients(sw, dw, filter);
    let (sw, dw) = (sw as usize, dw as usize);
    let mut out = vec![0u8; dw * sh as usize * 3];
    for y in 0..sh as usize {
        let row = &src[y * sw * 3..(y + 1) * sw * 3];
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    ss += row[(xmin + i) * 3 + c] as i64 * kv as i64;
                }
                out[(y * dw + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

/// One vertical pass: `src` is `sw` x `sh` RGB, the result `sw` x `dh`.
fn resample_vertical(src: &[u8], sw: u32, sh: u32, dh: u32, filter: PilFilter) -> Vec<u8> {
    let coeffs = coefficients(sh, dh, filter);
    let stride = sw as usize * 3;
    let mut out = vec![0u8; stride * dh as usize];
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..stride {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kv) in k.iter().enumerate() {
                ss += src[(ymin + i) * stride + x] as i64 * kv as i64;
            }
            out[yy * stride + x] = clip8(ss);
        }
    }
    out
}

/// Resizes like Pillow's `Image.resize((w, h), filter)` on an RGB image: two separable passes,
/// each rounded to 8 bits; same size returns a copy.
///
/// The order of the passes matters for the rounding. Pillow 13 (the version the goldens were made
/// with) runs the vertical pass first exactly when the height shrinks and
/// `in_h - out_h > 2 * (in_w - out_w)`, horizontal first otherwise (found by comparing with
/// both orders on ~550 random sizes and all five filters; older Pillow always went horizontal
/// first). The committed goldens check both orders.
pub fn pil_resize(img: &RgbImage, w: u32, h: u32, filter: PilFilter) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    let src = img.as_raw();
    let vertical_first = w != iw && h < ih && (ih as i64 - h as i64) > 2 * (iw as i64 - w as i64);
    let out = if vertical_first {
        let tmp = resample_vertical(src, iw, ih, h, filter);
        resample_horizontal(&tmp, iw, h, w, filter)
    } else {
        let tmp = if w != iw {
            resample_horizontal(src, iw, ih, w, filter)
        } else {
            src.clone()
        };
        if h != ih {
            resample_vertical(&tmp, w, ih, h, filter)
        } else {
            tmp
        }
    };
    RgbImage::from_raw(w, h, out).expect("buffer size matches")
}
