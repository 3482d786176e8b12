//! The image steps of a request pipeline: decode (PNG, JPEG) under a pixel limit, colour,
//! resize with an aspect-ratio policy, invert, scale, normalise, and the tensor layout.
//!
//! Pixels are `f32`, interleaved (height, width, channels), in the range `0..=max` (255 after
//! decoding; `scale` scales `max` too, so `invert` stays right after it). Resizing is a
//! separable convolution with the filter widened by the reduction factor, as Pillow does:
//! `bilinear` is the triangle filter (Pillow's `BILINEAR`, torchvision's default with
//! antialiasing), `area` the box filter (Pillow's `BOX`, OpenCV's `INTER_AREA` for whole
//! factors).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};
use serde::Deserialize;

use super::TransformError;

/// A decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// The value of full intensity: 255 after decoding, then scaled with the pixels.
    pub max: f32,
    pub pixels: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Grayscale,
    Rgb,
}

impl Color {
    pub fn channels(self) -> usize {
        match self {
            Color::Grayscale => 1,
            Color::Rgb => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    #[default]
    Bilinear,
    Area,
}

/// How an image of another aspect ratio meets the target size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Resize to the target size, distorting the aspect ratio.
    #[default]
    Stretch,
    /// Fit inside the target, centred, the rest filled with `pad_value`.
    Pad,
    /// Cover the target, centred, cutting what sticks out.
    Crop,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub width: usize,
    pub height: usize,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub fit: Fit,
    /// The fill for `fit: pad`, in the image's current range (default 0).
    #[serde(default)]
    pub pad_value: f32,
}

/// The layout of one item in the batch tensor (the batch dimension comes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[N, C, H, W]` (PyTorch, ONNX convention).
    Nchw,
    /// `[N, H, W, C]` (TensorFlow, Keras).
    Nhwc,
    /// `[N, H * W * C]`: pixels as features (scikit-learn models).
    Flat,
}

/// Decodes a PNG or JPEG, refusing images over `max_pixels` before any pixel is decoded.
/// Alpha is dropped; 16-bit images are brought to 8-bit.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Image, TransformError> {
    if bytes.is_empty() {
        return Err(TransformError::bad("the image is empty (0 bytes)"));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Ok(other) => {
            return Err(TransformError::bad(format!(
                "{} images are not supported; send PNG or JPEG",
                other.extensions_str().first().copied().unwrap_or("these")
            )));
        }
        Err(_) => {
            return Err(TransformError::bad(
                "not a PNG or JPEG image (unrecognised leading bytes)",
            ));
        }
    };
    if format == ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(TransformError::bad(
            "the JPEG image is truncated (no end-of-image marker after its scan data)",
        ));
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| TransformError::bad(format!("cannot read the image header: {e}")))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(TransformError::bad(format!(
            "the image is {width}x{height}: it has no pixels"
        )));
    }
    if pixels > max_pixels {
        return Err(TransformError::too_large(format!(
            "the image is {width}x{height} ({pixels} pixels), over the limit of {max_pixels} (limits.max_image_pixels)"
        )));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoder's own working memory, with room for 16-bit RGBA.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| TransformError::bad(format!("cannot decode the {format:?} image: {e}")))?;
    Ok(from_dynamic(decoded))
}

/// Whether a JPEG has its end-of-image marker after the start of its last scan. Inside the
/// scan, a 0xFF byte is always followed by 0x00 or a restart marker, so 0xFF 0xD9 there is the
/// real end. (The decoder would otherwise fill a truncated image with grey and answer.)
fn jpeg_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w == [0xFF, m];
    let Some(scan) = bytes.windows(2).rposition(marker(0xDA)) else {
        return false;
    };
    bytes
        .get(scan..)
        .is_some_and(|rest| rest.windows(2).any(marker(0xD9)))
}

fn from_dynamic(decoded: DynamicImage) -> Image {
    let width = decoded.width() as usize;
    let height = decoded.height() as usize;
    let (channels, raw) = if decoded.color().has_color() {
        (3, decoded.into_rgb8().into_raw())
    } else {
        (1, decoded.into_luma8().into_raw())
    };
    Image {
        width,
        height,
        channels,
        max: 255.0,
        pixels: raw.into_iter().map(f32::from).collect(),
    }
}

/// Converts to grayscale (ITU-R 601-2 luma, as Pillow's `convert("L")`) or to RGB.
pub fn color(image: Image, to: Color) -> Image {
    match (image.channels, to) {
        (3, Color::Grayscale) => Image {
            pixels: image
                .pixels
                .chunks_exact(3)
                .map(|p| match p {
                    [r, g, b] => r * 0.299 + g * 0.587 + b * 0.114,
                    _ => 0.0,
                })
                .collect(),
            channels: 1,
            ..image
        },
        (1, Color::Rgb) => Image {
            pixels: image.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            channels: 3,
            ..image
        },
        _ => image,
    }
}

/// The weights one output sample takes from the input samples `start..start + weights.len()`.
#[derive(Debug)]
struct Window {
    start: usize,
    weights: Vec<f32>,
}

/// The filter windows for resampling the input span `from..to` (fractional, in input pixels)
/// of an axis of `size` samples onto `out` samples.
fn windows(size: usize, from: f64, to: f64, out: usize, method: Method) -> Vec<Window> {
    let scale = (to - from) / out as f64;
    let filter_scale = scale.max(1.0);
    let support = match method {
        Method::Bilinear => 1.0,
        Method::Area => 0.5,
    } * filter_scale;
    (0..out)
        .map(|o| {
            let center = from + (o as f64 + 0.5) * scale;
            let start = (center - support + 0.5).floor().max(0.0) as usize;
            let end = ((center + support + 0.5).floor() as usize).min(size);
            let mut weights: Vec<f64> = (start..end)
                .map(|i| {
                    let x = (i as f64 - center + 0.5) / filter_scale;
                    match method {
                        Method::Bilinear => (1.0 - x.abs()).max(0.0),
                        Method::Area => {
                            if x > -0.5 && x <= 0.5 {
                                1.0
                            } else {
                                0.0
                            }
                        }
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Window {
                start,
                weights: weights.into_iter().map(|w| w as f32).collect(),
            }
        })
        .collect()
}

/// Resamples the box `(x0, y0)..(x1, y1)` of `image` to `width` x `height`.
fn resample(
    image: &Image,
    (x0, y0, x1, y1): (f64, f64, f64, f64),
    width: usize,
    height: usize,
    method: Method,
) -> Image {
    let c = image.channels;
    let columns = windows(image.width, x0, x1, width, method);
    let rows = windows(image.height, y0, y1, height, method);
    // Only the input rows some output row reads need the horizontal pass.
    let first = rows.iter().map(|w| w.start).min().unwrap_or(0);
    let last = rows
        .iter()
        .map(|w| w.start + w.weights.len())
        .max()
        .unwrap_or(0);
    let mut horizontal = vec![0.0f32; (last - first) * width * c];
    let in_row = image.width * c;
    for (y, out_row) in (first..last).zip(horizontal.chunks_exact_mut(width * c)) {
        let Some(row) = image.pixels.get(y * in_row..(y + 1) * in_row) else {
            continue;
        };
        for (window, out) in columns.iter().zip(out_row.chunks_exact_mut(c)) {
            let Some(taps) = row.get(window.start * c..(window.start + window.weights.len()) * c)
            else {
                continue;
            };
            for (pixel, &w) in taps.chunks_exact(c).zip(&window.weights) {
                for (o, &v) in out.iter_mut().zip(pixel) {
                    *o += w * v;
                }
            }
        }
    }
    let mut pixels = vec![0.0f32; height * width * c];
    let row_len = width * c;
    for (window, out_row) in rows.iter().zip(pixels.chunks_exact_mut(row_len)) {
        for (i, &w) in window.weights.iter().enumerate() {
            let y = window.start + i - first;
            let Some(row) = horizontal.get(y * row_len..(y + 1) * row_len) else {
                continue;
            };
            for (o, &v) in out_row.iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
    Image {
        width,
        height,
        channels: c,
        max: image.max,
        pixels,
    }
}

/// Resizes to the step's size with its method and fit.
pub fn resize(image: &Image, step: &Resize) -> Image {
    let (w, h) = (image.width as f64, image.height as f64);
    let (tw, th) = (step.width as f64, step.height as f64);
    match step.fit {
        Fit::Stretch => resample(
            image,
            (0.0, 0.0, w, h),
            step.width,
            step.height,
            step.method,
        ),
        Fit::Crop => {
            // The centred box of the target's aspect ratio that the image covers.
            let scale = (tw / w).max(th / h);
            let (bw, bh) = (tw / scale, th / scale);
            let (x0, y0) = ((w - bw) / 2.0, (h - bh) / 2.0);
            resample(
                image,
                (x0, y0, x0 + bw, y0 + bh),
                step.width,
                step.height,
                step.method,
            )
        }
        Fit::Pad => {
            let scale = (tw / w).min(th / h);
            let nw = ((w * scale).round() as usize).clamp(1, step.width);
            let nh = ((h * scale).round() as usize).clamp(1, step.height);
            let inner = resample(image, (0.0, 0.0, w, h), nw, nh, step.method);
            let c = image.channels;
            let mut pixels = vec![step.pad_value; step.width * step.height * c];
            let (left, top) = ((step.width - nw) / 2, (step.height - nh) / 2);
            for (y, row) in inner.pixels.chunks_exact(nw * c).enumerate() {
                let at = ((top + y) * step.width + left) * c;
                if let Some(dst) = pixels.get_mut(at..at + nw * c) {
                    dst.copy_from_slice(row);
                }
            }
            Image {
                width: step.width,
                height: step.height,
                channels: c,
                max: image.max,
                pixels,
            }
        }
    }
}

/// `max - v` for every pixel.
pub fn invert(mut image: Image) -> Image {
    let max = image.max;
    image.pixels.iter_mut().for_each(|v| *v = max - *v);
    image
}

/// `v * factor` for every pixel (and for the range's top).
pub fn scale(mut image: Image, factor: f32) -> Image {
    image.pixels.iter_mut().for_each(|v| *v *= factor);
    image.max *= factor;
    image
}

/// `(v - mean[c]) / std[c]` per channel; one value applies to every channel.
pub fn normalize(mut image: Image, mean: &[f32], std: &[f32]) -> Result<Image, TransformError> {
    let c = image.channels;
    let per_channel = |values: &[f32], what: &str| -> Result<Vec<f32>, TransformError> {
        match values.len() {
            1 => Ok(vec![values.first().copied().unwrap_or(0.0); c]),
            n if n == c => Ok(values.to_vec()),
            n => Err(TransformError::bad(format!(
                "normalize has {n} {what} values for an image with {c} channel(s); add a `color` step"
            ))),
        }
    };
    let mean = per_channel(mean, "mean")?;
    let inv_std: Vec<f32> = per_channel(std, "std")?.iter().map(|s| 1.0 / s).collect();
    for pixel in image.pixels.chunks_exact_mut(c) {
        for ((v, m), s) in pixel.iter_mut().zip(&mean).zip(&inv_std) {
            *v = (*v - m) * s;
        }
    }
    Ok(image)
}

/// The item's tensor shape and values in `layout` (without the batch dimension).
pub fn lay_out(image: Image, layout: Layout) -> (Vec<usize>, Vec<f32>) {
    let (h, w, c) = (image.height, image.width, image.channels);
    match layout {
        Layout::Nhwc => (vec![h, w, c], image.pixels),
        Layout::Flat => (vec![h * w * c], image.pixels),
        Layout::Nchw => {
            let mut planar = Vec::with_capacity(image.pixels.len());
            for channel in 0..c {
                planar.extend(image.pixels.iter().skip(channel).step_by(c));
            }
            (vec![c, h, w], planar)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(width: usize, height: usize, pixels: Vec<f32>) -> Image {
        Image {
            width,
            height,
            channels: 1,
            max: 255.0,
            pixels,
        }
    }

    #[test]
    fn area_averages_whole_blocks() {
        let image = gray(4, 2, vec![0., 2., 4., 6., 8., 10., 12., 14.]);
        let step = Resize {
            width: 2,
            height: 1,
            method: Method::Area,
            fit: Fit::Stretch,
            pad_value: 0.0,
        };
        let out = resize(&image, &step);
        assert_eq!(out.pixels, vec![5.0, 9.0]);
    }

    #[test]
    fn bilinear_upscaling_interpolates_between_centres() {
        let image = gray(2, 1, vec![0.0, 100.0]);
        let step = Resize {
            width: 4,
            height: 1,
            method: Method::Bilinear,
            fit: Fit::Stretch,
            pad_value: 0.0,
        };
        let out = resize(&image, &step);
        assert_eq!(out.pixels, vec![0.0, 25.0, 75.0, 100.0]);
    }

    #[test]
    fn pad_and_crop_keep_the_aspect_ratio() {
        // 4x2, left half dark, right half bright.
        let image = gray(4, 2, vec![0., 0., 200., 200., 0., 0., 200., 200.]);
        let mut step = Resize {
            width: 2,
            height: 2,
            method: Method::Area,
            fit: Fit::Pad,
            pad_value: 255.0,
        };
        let padded = resize(&image, &step);
        assert_eq!(padded.pixels, vec![0.0, 200.0, 255.0, 255.0]);
        step.fit = Fit::Crop;
        let cropped = resize(&image, &step);
        // The centre 2x2 box: one dark column and one bright column.
        assert_eq!(cropped.pixels, vec![0.0, 200.0, 0.0, 200.0]);
    }

    #[test]
    fn colour_invert_scale_normalize_and_layouts() {
        let rgb = Image {
            width: 2,
            height: 1,
            channels: 3,
            max: 255.0,
            pixels: vec![255., 0., 0., 0., 0., 255.],
        };
        let g = color(rgb.clone(), Color::Grayscale);
        assert!((g.pixels[0] - 76.245).abs() < 1e-3 && (g.pixels[1] - 29.07).abs() < 1e-3);
        let scaled = scale(invert(rgb.clone()), 1.0 / 255.0);
        assert_eq!(scaled.pixels, vec![0., 1., 1., 1., 1., 0.]);
        assert_eq!(invert(scaled.clone()).pixels, vec![1., 0., 0., 0., 0., 1.]);
        let n = normalize(scaled, &[0.5], &[0.5, 0.25, 1.0]).unwrap();
        assert_eq!(n.pixels, vec![-1., 2., 0.5, 1., 2., -0.5]);
        assert_eq!(
            lay_out(rgb.clone(), Layout::Nchw),
            (vec![3, 1, 2], vec![255., 0., 0., 0., 0., 255.])
        );
        assert_eq!(lay_out(rgb.clone(), Layout::Nhwc).0, vec![1, 2, 3]);
        assert_eq!(lay_out(rgb, Layout::Flat).0, vec![6]);
        assert!(normalize(g, &[0.1, 0.2], &[1.0]).is_err());
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "empty"),
            (b"hello world", "not a PNG or JPEG"),
            (b"GIF89a\x01\x00\x01\x00\x00\x00\x00", "not supported"),
            (b"\x89PNG\r\n\x1a\n\x00\x00", "cannot read the image header"),
        ];
        for (bytes, needle) in cases {
            let err = decode(bytes, 1 << 20).unwrap_err();
            assert!(err.message.contains(needle), "{needle}: {err:?}");
        }
    }
}
