//! `preprocessor_config.json` and the image processor: smart-resize to
//! multiples of `patch_size * merge_size` within [min_pixels, max_pixels],
//! bicubic resize, rescale 1/255, normalise with mean/std and flatten into
//! `(grid_h * grid_w, C * T * P * P)` patches in 2×2-merge-block order.
//!
//! The resize reproduces transformers' PIL backend (`Qwen2VLImageProcessorPil`,
//! the one our golden script uses; the torchvision backend is not installed
//! there): Pillow's `Image.resize(..., BICUBIC)` on 8-bit RGB, i.e. Pillow's
//! two-pass separable resampler with a = -0.5 cubic taps widened by the
//! downscale factor (antialias), 22-bit fixed-point coefficients and a rounding
//! clip to u8 after each pass, in Pillow 13's pass order (vertical first when the
//! height shrinks by more than twice as many pixels as the width). It matches
//! Pillow 13.0 bit for bit; Pillow <= 12 always ran the horizontal pass first and
//! can differ by a few 1/255 steps on images where the order flips. transformers' torchvision backend (its default when torchvision is
//! installed) resizes in float and rounds once, so it can differ by 1/255 on some
//! pixels.

use std::path::Path;

use kubewan_model_common::pil::{PilFilter, pil_resize};
use serde_json::Value;

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

impl PreprocessorConfig {
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let v: Value = kubewan_model_common::read_json(path, "an image preprocessor config")?;
        Self::from_value(path, &v)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self, Error> {
        let num = |key: &str| v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize);
        let size = v.get("size");
        let size_num = |key: &str| {
            size.and_then(|s| s.get(key))
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
        };
        let min_pixels = num("min_pixels")
            .or_else(|| size_num("shortest_edge"))
            .or_else(|| size_num("min_pixels"))
            .unwrap_or(56 * 56);
        let max_pixels = num("max_pixels")
            .or_else(|| size_num("longest_edge"))
            .or_else(|| size_num("max_pixels"))
            .unwrap_or(28 * 28 * 1280);
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], Error> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(0.0) as f32;
                    Ok([x, x, x])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| Error::config(path, format!("{key} is not numeric")))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(Error::config(
                    path,
                    format!("{key} must be a number or 3 numbers"),
                )),
            }
        };
        let cfg = Self {
            min_pixels,
            max_pixels,
            patch_size: num("patch_size").unwrap_or(14),
            temporal_patch_size: num("temporal_patch_size").unwrap_or(2),
            merge_size: num("merge_size").unwrap_or(2),
            image_mean: triple("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73])?,
            image_std: triple("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1])?,
            rescale_factor: v
                .get("rescale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0 / 255.0),
        };
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return Err(Error::config(
                path,
                "patch_size, merge_size and temporal_patch_size must be > 0",
            ));
        }
        if cfg.min_pixels > cfg.max_pixels {
            return Err(Error::config(path, "min_pixels is larger than max_pixels"));
        }
        Ok(cfg)
    }
}

/// transformers' `smart_resize` (Python `round` is round-half-to-even).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), Error> {
    if height == 0 || width == 0 {
        return Err(Error::Image(format!("empty image {width}x{height}")));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Image(format!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// transformers' `convert_to_rgb`: RGB stays; anything with alpha is composited on
/// opaque white with Pillow's `alpha_composite` integer arithmetic.
pub fn to_rgb8(img: &image::DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = image::RgbImage::new(w, h);
    const PB: u32 = 7;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let sa = p[3] as u32;
        if sa == 0 {
            *o = image::Rgb([255, 255, 255]);
            continue;
        }
        // dst is opaque white: outa255 = 255 * 255, so coef1 = sa << PB
        let coef1 = sa * 255 * 255 * (1 << PB) / (255 * 255);
        let coef2 = 255 * (1 << PB) - coef1;
        for c in 0..3 {
            let tmp = p[c] as u32 * coef1 + 255 * coef2;
            o[c] = (div255(tmp + (0x80 << PB)) >> PB) as u8;
        }
    }
    out
}

/// One processed image: flattened patches and the (t, h, w) grid in patches.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    pub patches: Vec<f32>,
    pub grid: (usize, usize, usize),
}

impl ProcessedImage {
    /// `<|image_pad|>` tokens this image takes in the prompt.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.grid.0 * self.grid.1 * self.grid.2 / (merge_size * merge_size)
    }
}

pub fn process_image(
    cfg: &PreprocessorConfig,
    img: &image::DynamicImage,
) -> Result<ProcessedImage, Error> {
    let rgb = to_rgb8(img);
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let factor = cfg.patch_size * cfg.merge_size;
    let (oh, ow) = smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)?;
    // transformers' PIL backend: bicubic, Pillow's exact arithmetic.
    let resized = pil_resize(&rgb, ow as u32, oh as u32, PilFilter::Bicubic);
    let px = resized.as_raw();
    let p = cfg.patch_size;
    let m = cfg.merge_size;
    let t = cfg.temporal_patch_size;
    let (gh, gw) = (oh / p, ow / p);
    let norm: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let mut lut = [0f32; 256];
            for (v, o) in lut.iter_mut().enumerate() {
                let x = (v as f64 * cfg.rescale_factor) as f32;
                *o = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            lut
        })
        .collect();
    let patch_len = 3 * t * p * p;
    let mut patches = Vec::with_capacity(gh * gw * patch_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (py, pxx) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, lut) in norm.iter().enumerate() {
                        for _ in 0..t {
                            for y in 0..p {
                                for x in 0..p {
                                    let v = px[((py + y) * ow + pxx + x) * 3 + c];
                                    patches.push(lut[v as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ProcessedImage {
        patches,
        grid: (1, gh, gw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tests/data/images/resized/*.png` were written by Pillow 13 (`make_tiny.py`):
    /// `img1_150x100.png` resized bicubic to each size, both pass orders covered.
    #[test]
    fn resize_matches_pillow_bit_for_bit() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images");
        let src = image::open(dir.join("img1_150x100.png")).unwrap().to_rgb8();
        let mut n = 0;
        for entry in std::fs::read_dir(dir.join("resized")).unwrap() {
            let path = entry.unwrap().path();
            let want = image::open(&path).unwrap().to_rgb8();
            let (ow, oh) = (want.width() as usize, want.height() as usize);
            let got = pil_resize(&src, ow as u32, oh as u32, PilFilter::Bicubic).into_raw();
            let diff = got
                .iter()
                .zip(want.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diff, 0, "{}: {diff} bytes differ", path.display());
            n += 1;
        }
        assert!(n >= 5);
    }

    #[test]
    fn alpha_is_composited_on_white_like_pillow() {
        // reference values from Pillow 13: alpha_composite(white, RGBA).convert("RGB")
        let px = [
            [10u8, 200, 90, 0],
            [10, 200, 90, 255],
            [10, 200, 90, 128],
            [0, 0, 0, 1],
            [250, 3, 77, 77],
        ];
        let want = [
            [255u8, 255, 255],
            [10, 200, 90],
            [132, 227, 172],
            [254, 254, 254],
            [253, 179, 201],
        ];
        let mut img = image::RgbaImage::new(px.len() as u32, 1);
        for (i, p) in px.iter().enumerate() {
            img.put_pixel(i as u32, 0, image::Rgba(*p));
        }
        let rgb = to_rgb8(&image::DynamicImage::ImageRgba8(img));
        for (i, w) in want.iter().enumerate() {
            assert_eq!(rgb.get_pixel(i as u32, 0).0, *w, "pixel {i}");
        }
    }

    #[test]
    fn smart_resize_like_transformers() {
        // round-half-even: 98/28 = 3.5 -> 4, 70/28 = 2.5 -> 2 (then raised to min_pixels)
        assert_eq!(
            smart_resize(98, 140, 28, 56 * 56, 28 * 28 * 1280).unwrap(),
            (112, 140)
        );
        assert_eq!(
            smart_resize(100, 150, 28, 56 * 56, 28 * 28 * 40).unwrap(),
            (112, 140)
        );
        assert_eq!(
            smart_resize(230, 300, 28, 56 * 56, 28 * 28 * 40).unwrap(),
            (140, 196)
        );
        assert!(smart_resize(1, 300, 28, 56 * 56, 28 * 28 * 40).is_err());
    }
}
