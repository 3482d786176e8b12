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

use super::error::TransformError;

/// A decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// The value of full intensity: 255 after decoding, then scaled with the pixels.
    pub max: f32,
    pub pixels: Pixels,
}

/// Pixel values: bytes as decoded (a quarter of the memory, which matters in a wasm VM), or
/// floats once a step has computed them.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Pixels {
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Pixels::U8(v) => v.into_iter().map(f32::from).collect(),
            Pixels::F32(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
/// Alpha is dropped; 16-bit images are brought to 8-bit. `want`: the colour the next step asks
/// for, decoded straight into it where the format allows (a JPEG's luma plane alone for
/// grayscale: no chroma to upsample or convert); otherwise the image's own (1 or 3 channels).
pub fn decode(bytes: &[u8], max_pixels: u64, want: Option<Color>) -> Result<Image, TransformError> {
    if bytes.is_empty() {
        return Err(TransformError::bad("the image is empty (0 bytes)"));
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => decode_jpeg(bytes, max_pixels, want),
        Ok(ImageFormat::Png) => decode_png(bytes, max_pixels),
        Ok(other) => Err(TransformError::bad(format!(
            "{} images are not supported; send PNG or JPEG",
            other.extensions_str().first().copied().unwrap_or("these")
        ))),
        Err(_) => Err(TransformError::bad(
            "not a PNG or JPEG image (unrecognised leading bytes)",
        )),
    }
}

fn check_size(width: u64, height: u64, max_pixels: u64) -> Result<(), TransformError> {
    let pixels = width * height;
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
    Ok(())
}

fn decode_jpeg(
    bytes: &[u8],
    max_pixels: u64,
    want: Option<Color>,
) -> Result<Image, TransformError> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;

    if !jpeg_complete(bytes) {
        return Err(TransformError::bad(
            "the JPEG image is truncated (no end-of-image marker after its scan data)",
        ));
    }
    let fail = |e: zune_jpeg::errors::DecodeErrors| {
        TransformError::bad(format!("cannot decode the JPEG image: {e}"))
    };
    let mut decoder = zune_jpeg::JpegDecoder::new(ZCursor::new(bytes));
    decoder
        .decode_headers()
        .map_err(|e| TransformError::bad(format!("cannot read the image header: {e}")))?;
    let info = decoder
        .info()
        .ok_or_else(|| TransformError::bad("cannot read the image header"))?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    check_size(width as u64, height as u64, max_pixels)?;
    let gray_source = decoder.input_colorspace() == Some(ColorSpace::Luma);
    let (out, channels) = match want {
        Some(Color::Grayscale) => (ColorSpace::Luma, 1),
        None if gray_source => (ColorSpace::Luma, 1),
        _ => (ColorSpace::RGB, 3),
    };
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(out)
        .set_max_width(width)
        .set_max_height(height);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(fail)?;
    if width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(channels))
        .is_none_or(|n| n != pixels.len())
    {
        return Err(TransformError::bad(format!(
            "cannot decode the JPEG image: {} bytes of pixels for {width}x{height}",
            pixels.len()
        )));
    }
    Ok(Image {
        width,
        height,
        channels,
        max: 255.0,
        pixels: Pixels::U8(pixels),
    })
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<Image, TransformError> {
    let format = ImageFormat::Png;
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| TransformError::bad(format!("cannot read the image header: {e}")))?;
    let pixels = u64::from(width) * u64::from(height);
    check_size(u64::from(width), u64::from(height), max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoder's own working memory, with room for 16-bit RGBA.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| TransformError::bad(format!("cannot decode the PNG image: {e}")))?;
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
        pixels: Pixels::U8(raw),
    }
}

/// Converts to grayscale (ITU-R 601-2 luma, as Pillow's `convert("L")`) or to RGB.
pub fn color(image: Image, to: Color) -> Image {
    match (image.channels, to) {
        (3, Color::Grayscale) => {
            let luma = |r: f32, g: f32, b: f32| r * 0.299 + g * 0.587 + b * 0.114;
            let pixels = match image.pixels {
                Pixels::U8(v) => v
                    .chunks_exact(3)
                    .map(|p| match p {
                        [r, g, b] => luma(f32::from(*r), f32::from(*g), f32::from(*b)),
                        _ => 0.0,
                    })
                    .collect(),
                Pixels::F32(v) => v
                    .chunks_exact(3)
                    .map(|p| match p {
                        [r, g, b] => luma(*r, *g, *b),
                        _ => 0.0,
                    })
                    .collect(),
            };
            Image {
                pixels: Pixels::F32(pixels),
                channels: 1,
                ..image
            }
        }
        (1, Color::Rgb) => Image {
            pixels: match image.pixels {
                Pixels::U8(v) => Pixels::U8(v.iter().flat_map(|&x| [x, x, x]).collect()),
                Pixels::F32(v) => Pixels::F32(v.iter().flat_map(|&x| [x, x, x]).collect()),
            },
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
    bounds: (f64, f64, f64, f64),
    width: usize,
    height: usize,
    method: Method,
) -> Image {
    let pixels = match &image.pixels {
        Pixels::U8(v) => resample_plane(v, image, bounds, width, height, method),
        Pixels::F32(v) => resample_plane(v, image, bounds, width, height, method),
    };
    Image {
        width,
        height,
        channels: image.channels,
        max: image.max,
        pixels: Pixels::F32(pixels),
    }
}

fn resample_plane<T: Copy + Into<f32>>(
    source: &[T],
    image: &Image,
    (x0, y0, x1, y1): (f64, f64, f64, f64),
    width: usize,
    height: usize,
    method: Method,
) -> Vec<f32> {
    let c = image.channels;
    let columns = windows(image.width, x0, x1, width, method);
    let rows = windows(image.height, y0, y1, height, method);
    // The vertical pass first, over the input columns some output column reads: its inner loop
    // runs along contiguous rows (vectorised), and it shrinks the image most when downscaling.
    let first = columns.iter().map(|w| w.start).min().unwrap_or(0);
    let last = columns
        .iter()
        .map(|w| w.start + w.weights.len())
        .max()
        .unwrap_or(0);
    let span = last.saturating_sub(first) * c;
    let mut pixels = vec![0.0f32; height * width * c];
    if span == 0 || width == 0 || c == 0 {
        return pixels;
    }
    let in_row = image.width * c;
    let mut vertical = vec![0.0f32; height * span];
    for (window, out_row) in rows.iter().zip(vertical.chunks_exact_mut(span)) {
        for (i, &w) in window.weights.iter().enumerate() {
            let at = (window.start + i) * in_row + first * c;
            let Some(row) = source.get(at..at + span) else {
                continue;
            };
            for (o, &v) in out_row.iter_mut().zip(row) {
                *o += w * v.into();
            }
        }
    }
    for (row, out_row) in vertical
        .chunks_exact(span)
        .zip(pixels.chunks_exact_mut(width * c))
    {
        for (window, out) in columns.iter().zip(out_row.chunks_exact_mut(c)) {
            let at = (window.start - first) * c;
            let Some(taps) = row.get(at..at + window.weights.len() * c) else {
                continue;
            };
            for (pixel, &w) in taps.chunks_exact(c).zip(&window.weights) {
                for (o, &v) in out.iter_mut().zip(pixel) {
                    *o += w * v;
                }
            }
        }
    }
    pixels
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
            for (y, row) in inner.pixels.into_f32().chunks_exact(nw * c).enumerate() {
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
                pixels: Pixels::F32(pixels),
            }
        }
    }
}

/// `max - v` for every pixel.
pub fn invert(image: Image) -> Image {
    let max = image.max;
    map(image, |v| max - v)
}

/// `v * factor` for every pixel (and for the range's top).
pub fn scale(image: Image, factor: f32) -> Image {
    let mut out = map(image, |v| v * factor);
    out.max *= factor;
    out
}

fn map(image: Image, f: impl Fn(f32) -> f32) -> Image {
    let mut pixels = image.pixels.into_f32();
    pixels.iter_mut().for_each(|v| *v = f(*v));
    Image {
        pixels: Pixels::F32(pixels),
        ..image
    }
}

/// `(v - mean[c]) / std[c]` per channel; one value applies to every channel.
pub fn normalize(image: Image, mean: &[f32], std: &[f32]) -> Result<Image, TransformError> {
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
    let mut pixels = image.pixels.into_f32();
    for pixel in pixels.chunks_exact_mut(c) {
        for ((v, m), s) in pixel.iter_mut().zip(&mean).zip(&inv_std) {
            *v = (*v - m) * s;
        }
    }
    Ok(Image {
        pixels: Pixels::F32(pixels),
        ..image
    })
}

/// The item's tensor shape and values in `layout` (without the batch dimension).
pub fn lay_out(image: Image, layout: Layout) -> (Vec<usize>, Vec<f32>) {
    let (h, w, c) = (image.height, image.width, image.channels);
    let pixels = image.pixels.into_f32();
    match layout {
        Layout::Nhwc => (vec![h, w, c], pixels),
        Layout::Flat => (vec![h * w * c], pixels),
        Layout::Nchw if c == 1 => (vec![c, h, w], pixels),
        Layout::Nchw => {
            let mut planar = Vec::with_capacity(pixels.len());
            for channel in 0..c {
                planar.extend(pixels.iter().skip(channel).step_by(c));
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
            pixels: Pixels::F32(pixels),
        }
    }

    fn values(image: &Image) -> Vec<f32> {
        image.pixels.clone().into_f32()
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
        assert_eq!(values(&out), vec![5.0, 9.0]);
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
        assert_eq!(values(&out), vec![0.0, 25.0, 75.0, 100.0]);
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
        assert_eq!(values(&padded), vec![0.0, 200.0, 255.0, 255.0]);
        step.fit = Fit::Crop;
        let cropped = resize(&image, &step);
        // The centre 2x2 box: one dark column and one bright column.
        assert_eq!(values(&cropped), vec![0.0, 200.0, 0.0, 200.0]);
    }

    #[test]
    fn colour_invert_scale_normalize_and_layouts() {
        let rgb = Image {
            width: 2,
            height: 1,
            channels: 3,
            max: 255.0,
            pixels: Pixels::U8(vec![255, 0, 0, 0, 0, 255]),
        };
        let g = values(&color(rgb.clone(), Color::Grayscale));
        assert!((g[0] - 76.245).abs() < 1e-3 && (g[1] - 29.07).abs() < 1e-3);
        let scaled = scale(invert(rgb.clone()), 1.0 / 255.0);
        assert_eq!(values(&scaled), vec![0., 1., 1., 1., 1., 0.]);
        assert_eq!(
            values(&invert(scaled.clone())),
            vec![1., 0., 0., 0., 0., 1.]
        );
        let n = normalize(scaled, &[0.5], &[0.5, 0.25, 1.0]).unwrap();
        assert_eq!(values(&n), vec![-1., 2., 0.5, 1., 2., -0.5]);
        assert_eq!(
            lay_out(rgb.clone(), Layout::Nchw),
            (vec![3, 1, 2], vec![255., 0., 0., 0., 0., 255.])
        );
        assert_eq!(lay_out(rgb.clone(), Layout::Nhwc).0, vec![1, 2, 3]);
        assert_eq!(lay_out(rgb.clone(), Layout::Flat).0, vec![6]);
        let g = color(rgb, Color::Grayscale);
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
            let err = decode(bytes, 1 << 20, None).unwrap_err();
            assert!(err.message.contains(needle), "{needle}: {err:?}");
        }
    }
}
