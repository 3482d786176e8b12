//! Occlusion saliency (Zeiler and Fergus, 2014; Captum's `Occlusion`) for image models: a
//! patch of `baseline` slides over the image, every channel at once, and each pixel's
//! attribution is how much the explained class's score drops, on average over the windows
//! that cover it. The heat map is the image's height by width.
//!
//! Windows start at `0, stride, 2 * stride, ...`, and one more is placed flush with the far
//! edge when the stride leaves pixels uncovered, so every pixel gets a value. The occluded
//! images go to the model in batches (`max_batch_images`).

use crate::kernel_shap::{Calls, ExplainError, ModelFn};

/// Where an image's channels are in its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[channels, height, width]` (and `[height, width]` with one channel).
    Chw,
    /// `[height, width, channels]`.
    Hwc,
}

/// One image's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub layout: Layout,
}

impl Geometry {
    fn index(&self, c: usize, y: usize, x: usize) -> usize {
        match self.layout {
            Layout::Chw => (c * self.height + y) * self.width + x,
            Layout::Hwc => (y * self.width + x) * self.channels + c,
        }
    }

    fn len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Patch height and width.
    pub patch: (usize, usize),
    /// Step between windows, down and across.
    pub stride: (usize, usize),
    /// The value a patch is filled with.
    pub baseline: f64,
    /// The most occluded images in one model call.
    pub max_batch_images: usize,
    /// The most windows one explanation may run ([`ExplainError::TooLarge`] past it).
    pub max_windows: usize,
    pub deadline: Option<std::time::Instant>,
}

pub const DEFAULT_PATCH: usize = 4;
pub const DEFAULT_MAX_BATCH_IMAGES: usize = 64;
pub const MAX_WINDOWS: usize = 4096;

impl Default for Options {
    fn default() -> Options {
        Options {
            patch: (DEFAULT_PATCH, DEFAULT_PATCH),
            stride: (DEFAULT_PATCH, DEFAULT_PATCH),
            baseline: 0.0,
            max_batch_images: DEFAULT_MAX_BATCH_IMAGES,
            max_windows: MAX_WINDOWS,
            deadline: None,
        }
    }
}

/// One image's heat map.
#[derive(Debug, Clone, PartialEq)]
pub struct Saliency {
    /// `[height][width]`, row-major: the mean drop of the target's score where occluded.
    pub attributions: Vec<f64>,
    /// The output explained (the model's highest score unless asked).
    pub target: usize,
    /// The model's scores for the image as sent.
    pub prediction: Vec<f64>,
    pub windows: usize,
    pub model_rows: usize,
}

/// Window starts along one axis of `len` for `patch` and `stride`.
fn starts(len: usize, patch: usize, stride: usize) -> Vec<usize> {
    let last = len.saturating_sub(patch);
    let mut at: Vec<usize> = (0..=last).step_by(stride.max(1)).collect();
    if at.last().is_some_and(|&s| s < last) {
        at.push(last);
    }
    at
}

/// The windows `options` makes on an image of `geometry`.
pub fn windows(geometry: &Geometry, options: &Options) -> usize {
    starts(geometry.height, options.patch.0, options.stride.0).len()
        * starts(geometry.width, options.patch.1, options.stride.1).len()
}

/// The occlusion heat map of `image` (its elements in `geometry`'s layout). `model` answers
/// the scores of each image; `target` picks one, else the highest for `image` is explained.
pub fn explain(
    model: &mut ModelFn<'_>,
    image: &[f64],
    geometry: &Geometry,
    target: Option<usize>,
    options: &Options,
) -> Result<Saliency, ExplainError> {
    if geometry.len() == 0 || image.len() != geometry.len() {
        return Err(ExplainError::Input(format!(
            "an image of {} x {} x {} is {} values, not {}",
            geometry.channels,
            geometry.height,
            geometry.width,
            geometry.len(),
            image.len()
        )));
    }
    let (ph, pw) = (
        options.patch.0.clamp(1, geometry.height),
        options.patch.1.clamp(1, geometry.width),
    );
    let count = windows(geometry, options);
    if count > options.max_windows {
        return Err(ExplainError::TooLarge(format!(
            "a {} x {} image with {}x{} patches every {}x{} pixels makes {count} windows, over the limit of {} (explainer.occlusion: raise patch or stride)",
            geometry.height,
            geometry.width,
            options.patch.0,
            options.patch.1,
            options.stride.0,
            options.stride.1,
            options.max_windows
        )));
    }
    let per_call = options.max_batch_images.max(1);
    let mut calls = Calls::new(model, options.deadline, per_call);
    let prediction = calls.run(image, 1)?;
    let k = calls.outputs;
    let target = match target {
        Some(t) if t < k => t,
        Some(t) => {
            return Err(ExplainError::Input(format!(
                "target {t} is not one of the model's {k} scores"
            )));
        }
        None => (0..k)
            .max_by(|&a, &b| prediction[a].total_cmp(&prediction[b]))
            .unwrap_or(0),
    };
    let base = prediction[target];
    let boxes: Vec<(usize, usize)> = starts(geometry.height, ph, options.stride.0)
        .into_iter()
        .flat_map(|y| {
            starts(geometry.width, pw, options.stride.1)
                .into_iter()
                .map(move |x| (y, x))
        })
        .collect();
    let (mut sum, mut covered) = (
        vec![0.0; geometry.height * geometry.width],
        vec![0u32; geometry.height * geometry.width],
    );
    let mut batch = Vec::with_capacity(per_call * image.len());
    for chunk in boxes.chunks(per_call) {
        batch.clear();
        for &(y0, x0) in chunk {
            let start = batch.len();
            batch.extend_from_slice(image);
            for c in 0..geometry.channels {
                for y in y0..y0 + ph {
                    for x in x0..x0 + pw {
                        batch[start + geometry.index(c, y, x)] = options.baseline;
                    }
                }
            }
        }
        let scores = calls.run(&batch, chunk.len())?;
        for (&(y0, x0), row) in chunk.iter().zip(scores.chunks_exact(k)) {
            let drop = base - row[target];
            for y in y0..y0 + ph {
                for x in x0..x0 + pw {
                    sum[y * geometry.width + x] += drop;
                    covered[y * geometry.width + x] += 1;
                }
            }
        }
    }
    let attributions = sum
        .iter()
        .zip(&covered)
        .map(|(s, n)| if *n == 0 { 0.0 } else { s / f64::from(*n) })
        .collect();
    Ok(Saliency {
        attributions,
        target,
        prediction,
        windows: boxes.len(),
        model_rows: calls.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores `[s, -s]` where `s` sums the region rows 4..12, columns 16..24 of channel 0.
    fn region_model(geometry: Geometry) -> impl FnMut(&[f64], usize) -> Result<Vec<f64>, String> {
        move |rows: &[f64], n: usize| {
            Ok(rows
                .chunks_exact(rows.len() / n)
                .flat_map(|image| {
                    let mut s = 0.0;
                    for y in 4..12 {
                        for x in 16..24 {
                            s += image[geometry.index(0, y, x)];
                        }
                    }
                    [s, -s]
                })
                .collect())
        }
    }

    #[test]
    fn all_the_mass_is_where_the_model_looks() {
        for layout in [Layout::Chw, Layout::Hwc] {
            let geometry = Geometry {
                channels: 2,
                height: 28,
                width: 28,
                layout,
            };
            let image = vec![1.0; geometry.len()];
            let mut model = region_model(geometry);
            let saliency =
                explain(&mut model, &image, &geometry, None, &Options::default()).unwrap();
            assert_eq!(saliency.target, 0);
            assert_eq!(saliency.windows, 49);
            assert_eq!(saliency.model_rows, 50);
            for y in 0..28 {
                for x in 0..28 {
                    let a = saliency.attributions[y * 28 + x];
                    let inside = (4..12).contains(&y) && (16..24).contains(&x);
                    // Each 4x4 window inside the region removes 16 of its ones.
                    assert_eq!(a, if inside { 16.0 } else { 0.0 }, "({y}, {x}) {layout:?}");
                }
            }
        }
    }

    #[test]
    fn strides_cover_every_pixel_and_limits_are_named() {
        assert_eq!(starts(28, 4, 4).len(), 7);
        assert_eq!(starts(10, 4, 4), [0, 4, 6]);
        assert_eq!(starts(3, 4, 4), [0]);
        let geometry = Geometry {
            channels: 1,
            height: 10,
            width: 10,
            layout: Layout::Chw,
        };
        let image = vec![1.0; 100];
        let mut model = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> {
            Ok(rows
                .chunks_exact(rows.len() / n)
                .map(|r| r.iter().sum())
                .collect())
        };
        let options = Options {
            patch: (4, 4),
            stride: (3, 3),
            ..Options::default()
        };
        let saliency = explain(&mut model, &image, &geometry, None, &options).unwrap();
        assert!(
            saliency.attributions.iter().all(|a| *a == 16.0),
            "{saliency:?}"
        );
        let small = Options {
            patch: (1, 1),
            stride: (1, 1),
            max_windows: 99,
            ..Options::default()
        };
        let err = explain(&mut model, &image, &geometry, None, &small).unwrap_err();
        assert!(matches!(err, ExplainError::TooLarge(m) if m.contains("100 windows")));
        let err = explain(&mut model, &image[1..], &geometry, None, &options).unwrap_err();
        assert!(matches!(err, ExplainError::Input(_)));
        let err = explain(&mut model, &image, &geometry, Some(3), &options).unwrap_err();
        assert!(matches!(err, ExplainError::Input(m) if m.contains("target 3")));
    }
}
