//! Image preprocessing true to a checkpoint's `preprocessor_config.json` (CLIP / SigLIP / BLIP
//! style processors): RGB conversion, resize (shortest edge or fixed size, bicubic or bilinear),
//! center crop, rescale, normalize. Families with other processors (Qwen3-VL's smart resize)
//! build on the same helpers.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, RgbImage};

use crate::error::{Error, Result};

/// How the processor resizes.
#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    /// Scale so the shorter side is `n` (aspect kept).
    ShortestEdge(u32),
    /// Resize to exactly `height x width`.
    Exact { height: u32, width: u32 },
}

/// A CLIP-style image processor.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub do_convert_rgb: bool,
    pub resize: Option<Resize>,
    pub filter: FilterType,
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub normalize: bool,
}

fn triple(v: &serde_json::Value, key: &str, default: [f32; 3], path: &Path) -> Result<[f32; 3]> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(0.0) as f32;
            Ok([x, x, x])
        }
        Some(serde_json::Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| Error::config(path, format!("'{key}' must hold numbers")))?
                    as f32;
            }
            Ok(out)
        }
        _ => Err(Error::config(
            path,
            format!("'{key}' must be a number or a list of 3 numbers"),
        )),
    }
}

fn size_of(v: &serde_json::Value, key: &str, path: &Path) -> Result<Option<Resize>> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            Ok(Some(Resize::ShortestEdge(n.as_u64().unwrap_or(0) as u32)))
        }
        Some(o) => {
            if let Some(s) = o.get("shortest_edge").and_then(|x| x.as_u64()) {
                Ok(Some(Resize::ShortestEdge(s as u32)))
            } else if let (Some(h), Some(w)) = (
                o.get("height").and_then(|x| x.as_u64()),
                o.get("width").and_then(|x| x.as_u64()),
            ) {
                Ok(Some(Resize::Exact {
                    height: h as u32,
                    width: w as u32,
                }))
            } else {
                Err(Error::config(
                    path,
                    format!("'{key}' must be {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}"),
                ))
            }
        }
    }
}

impl ImageProcessor {
    /// Read `preprocessor_config.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Err(Error::config(
                &path,
                "missing: the image processor config is needed to prepare images",
            ));
        }
        let v = crate::source::read_json(&path)?;
        Self::from_json(&v, &path)
    }

    /// Parse a processor config value (`path` is used in error messages).
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let b = |k: &str, d: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
        let resize = if b("do_resize", true) {
            size_of(v, "size", path)?
        } else {
            None
        };
        let crop = if b("do_center_crop", false) {
            match size_of(v, "crop_size", path)? {
                Some(Resize::Exact { height, width }) => Some((height, width)),
                Some(Resize::ShortestEdge(s)) => Some((s, s)),
                None => None,
            }
        } else {
            None
        };
        let filter = match v.get("resample").and_then(|x| x.as_u64()).unwrap_or(3) {
            0 => FilterType::Nearest,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            1 => FilterType::Lanczos3,
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported 'resample' {other} (expected 0-3)"),
                ))
            }
        };
        Ok(ImageProcessor {
            do_convert_rgb: b("do_convert_rgb", true),
            resize,
            filter,
            crop,
            rescale: if b("do_rescale", true) {
                Some(
                    v.get("rescale_factor")
                        .and_then(|x| x.as_f64())
                        .unwrap_or(1.0 / 255.0) as f32,
                )
            } else {
                None
            },
            mean: triple(v, "image_mean", [0.48145466, 0.4578275, 0.40821073], path)?,
            std: triple(v, "image_std", [0.26862954, 0.261_302_6, 0.275_777_1], path)?,
            normalize: b("do_normalize", true),
        })
    }

    /// Output `(height, width)` of [`ImageProcessor::preprocess`] for an input of `(h, w)`.
    pub fn output_size(&self, h: u32, w: u32) -> (u32, u32) {
        let (mut h, mut w) = match &self.resize {
            Some(r) => resized_size(r, h, w),
            None => (h, w),
        };
        if let Some((ch, cw)) = self.crop {
            h = ch;
            w = cw;
        }
        (h, w)
    }

    /// The image as the model sees it (resized and cropped, before normalisation).
    pub fn view(&self, img: &DynamicImage) -> RgbImage {
        let rgb = to_rgb(img);
        let rgb = match &self.resize {
            Some(r) => {
                let (h, w) = resized_size(r, rgb.height(), rgb.width());
                if (h, w) == (rgb.height(), rgb.width()) {
                    rgb
                } else {
                    resize_rgb(&rgb, w, h, self.filter)
                }
            }
            None => rgb,
        };
        match self.crop {
            Some((ch, cw)) => center_crop(&rgb, ch, cw),
            None => rgb,
        }
    }

    /// Pixel values `[3, H, W]` (float32, normalised).
    pub fn preprocess(&self, img: &DynamicImage, device: &Device) -> Result<Tensor> {
        let v = self.view(img);
        self.normalize_view(&v, device)
    }

    /// Rescale and normalise an RGB view into `[3, H, W]`.
    pub fn normalize_view(&self, v: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = (v.width() as usize, v.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        let scale = self.rescale.unwrap_or(1.0);
        for (x, y, p) in v.enumerate_pixels() {
            for c in 0..3 {
                let mut val = p.0[c] as f32 * scale;
                if self.normalize {
                    val = (val - self.mean[c]) / self.std[c];
                }
                data[c * h * w + y as usize * w + x as usize] = val;
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }
}

/// Size after a resize rule (Hugging Face's rounding: the long side is truncated).
pub fn resized_size(r: &Resize, h: u32, w: u32) -> (u32, u32) {
    match *r {
        Resize::Exact { height, width } => (height, width),
        Resize::ShortestEdge(s) => {
            let (short, long) = if h <= w { (h, w) } else { (w, h) };
            let new_long = (s as u64 * long as u64 / short.max(1) as u64) as u32;
            if h <= w {
                (s, new_long)
            } else {
                (new_long, s)
            }
        }
    }
}

/// Center crop to `ch x cw` (padding with black when the image is smaller, as HF does).
pub fn center_crop(img: &RgbImage, ch: u32, cw: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    if w >= cw && h >= ch {
        let top = (h - ch) / 2;
        let left = (w - cw) / 2;
        return image::imageops::crop_imm(img, left, top, cw, ch).to_image();
    }
    let mut out = RgbImage::new(cw, ch);
    let top = (ch as i64 - h as i64) / 2;
    let left = (cw as i64 - w as i64) / 2;
    for (x, y, p) in img.enumerate_pixels() {
        let (nx, ny) = (x as i64 + left, y as i64 + top);
        if nx >= 0 && ny >= 0 && (nx as u32) < cw && (ny as u32) < ch {
            out.put_pixel(nx as u32, ny as u32, *p);
        }
    }
    out
}

/// RGB conversion as Hugging Face does it: transparent images are composited on white;
/// grayscale and palette images are expanded.
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = RgbImage::new(rgba.width(), rgba.height());
        for (x, y, p) in rgba.enumerate_pixels() {
            let a = p.0[3] as f32 / 255.0;
            let px = [0, 1, 2].map(|c| (p.0[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8);
            out.put_pixel(x, y, image::Rgb(px));
        }
        out
    } else {
        img.to_rgb8()
    }
}

/// Decode an image file, with an error naming the file when it will not decode.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|e| Error::input(format!("{}: {e}", path.display())))
}

/// Decode image bytes (PNG, JPEG, GIF, BMP, WebP).
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| {
        Error::input(format!(
            "image does not decode ({e}); expected PNG, JPEG, GIF, BMP or WebP"
        ))
    })
}

/// Resize an RGB image the way Pillow does (separable, horizontal pass first, 8-bit fixed-point
/// coefficients, rounding and clamping to 8 bits between the passes), which is also what
/// torchvision's antialiased uint8 resize reproduces. Bicubic (a = -0.5), bilinear and Lanczos-3
/// follow Pillow; nearest uses the image crate.
pub fn resize_rgb(img: &RgbImage, w: u32, h: u32, filter: FilterType) -> RgbImage {
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        FilterType::CatmullRom => (bicubic, 2.0),
        FilterType::Triangle => (triangle, 1.0),
        FilterType::Lanczos3 => (lanczos3, 3.0),
        _ => return image::imageops::resize(img, w, h, filter),
    };
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let src: Vec<u8> = img.as_raw().clone();
    // horizontal pass: [ih, w]
    let tmp = if w as usize != iw {
        let (bounds, kk, ksize) = coeffs(iw, w as usize, f, support);
        let mut out = vec![0u8; ih * w as usize * 3];
        for y in 0..ih {
            for x in 0..w as usize {
                let (xmin, n) = bounds[x];
                let k = &kk[x * ksize..x * ksize + n];
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += src[(y * iw + xmin + i) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * w as usize + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src
    };
    let tw = w as usize;
    // vertical pass: [h, w]
    let out = if h as usize != ih {
        let (bounds, kk, ksize) = coeffs(ih, h as usize, f, support);
        let mut out = vec![0u8; h as usize * tw * 3];
        for y in 0..h as usize {
            let (ymin, n) = bounds[y];
            let k = &kk[y * ksize..y * ksize + n];
            for x in 0..tw {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += tmp[((ymin + i) * tw + x) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * tw + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(v: i64) -> u8 {
    if v >= 1 << 30 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS).min(255) as u8
    }
}

fn bicubic(x: f64) -> f64 {
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

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos3(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output pixel: (first input index, count), and fixed-point weights (`ksize` per pixel).
fn coeffs(
    in_size: usize,
    out_size: usize,
    f: fn(f64) -> f64,
    support0: f64,
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut w: Vec<f64> = (0..n)
            .map(|x| f((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = w.iter().sum();
        if ww != 0.0 {
            for v in w.iter_mut() {
                *v /= ww;
            }
        }
        for (x, v) in w.iter().enumerate() {
            let scaled = v * (1u64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if *v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_conversion_grayscale_rgba_and_palette() {
        // grayscale replicates the channel
        let g = image::GrayImage::from_pixel(2, 2, image::Luma([77]));
        assert_eq!(
            to_rgb(&DynamicImage::ImageLuma8(g)).get_pixel(0, 0).0,
            [77, 77, 77]
        );
        // transparent pixels are composited on white, opaque ones kept, half alpha blended
        let mut a = image::RgbaImage::new(3, 1);
        a.put_pixel(0, 0, image::Rgba([10, 20, 30, 0]));
        a.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        a.put_pixel(2, 0, image::Rgba([0, 0, 0, 128]));
        let rgb = to_rgb(&DynamicImage::ImageRgba8(a));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
        assert_eq!(rgb.get_pixel(2, 0).0, [127, 127, 127]);
        // a palette PNG decodes to its colours
        let mut enc = Vec::new();
        {
            let mut e = png::Encoder::new(&mut enc, 2, 1);
            e.set_color(png::ColorType::Indexed);
            e.set_depth(png::BitDepth::Eight);
            e.set_palette(vec![255u8, 0, 0, 0, 0, 255]);
            let mut w = e.write_header().unwrap();
            w.write_image_data(&[0, 1]).unwrap();
        }
        let img = decode_image(&enc).unwrap();
        let rgb = to_rgb(&img);
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 0, 255]);
        // an undecodable file is a clear error
        assert!(decode_image(b"not an image")
            .unwrap_err()
            .to_string()
            .contains("does not decode"));
    }

    #[test]
    fn shortest_edge_sizes_follow_transformers() {
        assert_eq!(resized_size(&Resize::ShortestEdge(84), 90, 120), (84, 112));
        assert_eq!(
            resized_size(&Resize::ShortestEdge(336), 480, 640),
            (336, 448)
        );
        assert_eq!(resized_size(&Resize::ShortestEdge(84), 100, 100), (84, 84));
    }
}
