//! KernelSHAP (Lundberg and Lee, 2017) for any tabular model: the Shapley values of one row's
//! features, each output on its own, with the interventional value function over background
//! rows, `v(S) = mean_b f(x_S, b_rest)`.
//!
//! Coalitions are every subset of the features when the budget allows it (`2^M - 2` of them:
//! then the values are exact, by the kernel's theorem), otherwise pairs of a subset and its
//! complement, their sizes drawn from the Shapley kernel's distribution. The values solve the
//! kernel-weighted least squares with `phi_0 = E_bg[f]` and the efficiency constraint
//! `sum(phi) = f(x) - E_bg[f]` eliminated exactly, so the constraint holds to rounding
//! whatever the budget. The model is called on batches of rows (`max_batch_rows`), never one
//! row at a time.

use thiserror::Error;

/// How much work one explanation may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The most coalitions evaluated (each costs one model row per background row).
    pub max_coalitions: usize,
    /// The most rows in one model call.
    pub max_batch_rows: usize,
    /// The seed of the coalition sampling (explanations are reproducible).
    pub seed: u64,
    /// When the explanation must have ended ([`ExplainError::TimedOut`] past it, asked
    /// before each model call).
    pub deadline: Option<std::time::Instant>,
}

/// The default coalition budget: exact up to 11 features.
pub const DEFAULT_MAX_COALITIONS: usize = 2048;
/// The default rows per model call.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 4096;
/// The most features explained (coalition masks are 64-bit; more is not tabular data).
pub const MAX_FEATURES: usize = 64;

impl Default for Options {
    fn default() -> Options {
        Options {
            max_coalitions: DEFAULT_MAX_COALITIONS,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            seed: 0x5eed,
            deadline: None,
        }
    }
}

/// One row's explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// `E_bg[f]` per output.
    pub expected_value: Vec<f64>,
    /// `[output][feature]`.
    pub shap_values: Vec<Vec<f64>>,
    /// `f(x)` per output.
    pub prediction: Vec<f64>,
    /// Whether every coalition was evaluated (the values are exact).
    pub exact: bool,
    /// Coalitions evaluated.
    pub coalitions: usize,
    /// Rows the model was run on, in all.
    pub model_rows: usize,
}

#[derive(Debug, Error, PartialEq)]
pub enum ExplainError {
    #[error("{0}")]
    Input(String),
    #[error("the model failed: {0}")]
    Model(String),
    #[error(
        "the coalitions sampled do not determine the values (raise the budget above {0} coalitions)"
    )]
    Underdetermined(usize),
    #[error("the explanation ran past its time limit")]
    TimedOut,
    /// The request asks for more work than the explainer's limits allow (413).
    #[error("{0}")]
    TooLarge(String),
}

/// The model: rows (`n` rows of `M` features, row-major) to outputs (`n` rows of `K`).
pub type ModelFn<'a> = dyn FnMut(&[f64], usize) -> Result<Vec<f64>, String> + 'a;

/// The Shapley values of `x`'s features against `background` (row-major, rows of `x.len()`).
pub fn explain(
    model: &mut ModelFn<'_>,
    x: &[f64],
    background: &[f64],
    options: &Options,
) -> Result<Explanation, ExplainError> {
    let m = x.len();
    if m == 0 || m > MAX_FEATURES {
        return Err(ExplainError::Input(format!(
            "a row of 1 to {MAX_FEATURES} features is needed, not {m}"
        )));
    }
    if background.is_empty() || !background.len().is_multiple_of(m) {
        return Err(ExplainError::Input(format!(
            "the background holds {} values: not whole rows of {m} features",
            background.len()
        )));
    }
    if !x.iter().chain(background).all(|v| v.is_finite()) {
        return Err(ExplainError::Input(
            "the row and the background must be finite numbers".into(),
        ));
    }
    let rows = background.len() / m;
    let mut calls = Calls::new(model, options.deadline, options.max_batch_rows.max(rows));
    let base = calls.run(background, rows)?;
    let k = calls.outputs;
    let expected = mean_rows(&base, rows, k);
    let prediction = calls.run(x, 1)?;

    let (masks, weights, exact) = coalitions(m, options);
    // v(S) for every coalition, the model called on batches of whole coalitions.
    let per_batch = (calls.max_batch_rows / rows).max(1);
    let mut values = Vec::with_capacity(masks.len() * k);
    let mut batch = Vec::with_capacity(per_batch * rows * m);
    for chunk in masks.chunks(per_batch) {
        batch.clear();
        for mask in chunk {
            for row in background.chunks_exact(m) {
                batch.extend(
                    row.iter()
                        .zip(x)
                        .enumerate()
                        .map(|(i, (b, xi))| if mask >> i & 1 == 1 { *xi } else { *b }),
                );
            }
        }
        let out = calls.run(&batch, chunk.len() * rows)?;
        for coalition in out.chunks_exact(rows * k) {
            values.extend(mean_rows(coalition, rows, k));
        }
    }

    let delta: Vec<f64> = prediction
        .iter()
        .zip(&expected)
        .map(|(f, e)| f - e)
        .collect();
    let shap_values = if m == 1 {
        delta.iter().map(|d| vec![*d]).collect()
    } else {
        solve(m, k, &masks, &weights, &values, &expected, &delta)
            .ok_or(ExplainError::Underdetermined(masks.len()))?
    };
    Ok(Explanation {
        expected_value: expected,
        shap_values,
        prediction,
        exact,
        coalitions: masks.len(),
        model_rows: calls.rows,
    })
}

/// The model calls, checked for their shape and counted (every explainer's).
pub(crate) struct Calls<'m, 'a> {
    model: &'m mut ModelFn<'a>,
    deadline: Option<std::time::Instant>,
    pub(crate) max_batch_rows: usize,
    /// Outputs per row, from the first call.
    pub(crate) outputs: usize,
    /// Rows run, in all.
    pub(crate) rows: usize,
}

impl<'m, 'a> Calls<'m, 'a> {
    pub(crate) fn new(
        model: &'m mut ModelFn<'a>,
        deadline: Option<std::time::Instant>,
        max_batch_rows: usize,
    ) -> Calls<'m, 'a> {
        Calls {
            model,
            deadline,
            max_batch_rows,
            outputs: 0,
            rows: 0,
        }
    }

    pub(crate) fn run(&mut self, rows: &[f64], n: usize) -> Result<Vec<f64>, ExplainError> {
        if self
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Err(ExplainError::TimedOut);
        }
        let out = (self.model)(rows, n).map_err(ExplainError::Model)?;
        self.rows += n;
        if self.outputs == 0 {
            if out.is_empty() || !out.len().is_multiple_of(n) {
                return Err(ExplainError::Model(format!(
                    "{} values answered for {n} rows",
                    out.len()
                )));
            }
            self.outputs = out.len() / n;
        } else if out.len() != n * self.outputs {
            return Err(ExplainError::Model(format!(
                "{} values answered for {n} rows of {} outputs",
                out.len(),
                self.outputs
            )));
        }
        if !out.iter().all(|v| v.is_finite()) {
            return Err(ExplainError::Model(
                "it answered a value that is not finite".into(),
            ));
        }
        Ok(out)
    }
}

fn mean_rows(values: &[f64], rows: usize, k: usize) -> Vec<f64> {
    let mut mean = vec![0.0; k];
    for row in values.chunks_exact(k) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    mean
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// The coalitions to evaluate (bit `i` set: feature `i` is `x`'s), their weights, and whether
/// they are all of them.
fn coalitions(m: usize, options: &Options) -> (Vec<u64>, Vec<f64>, bool) {
    let all = if m < 63 { (1u64 << m) - 2 } else { u64::MAX };
    if all <= options.max_coalitions as u64 {
        let masks: Vec<u64> = (1..=all).collect();
        let weights = masks
            .iter()
            .map(|mask| {
                let s = mask.count_ones() as usize;
                (m - 1) as f64 / (binomial(m, s) * (s * (m - s)) as f64)
            })
            .collect();
        return (masks, weights, true);
    }
    // Sizes drawn from the kernel's distribution over sizes, p(s) ~ (m-1)/(s(m-s)); a
    // subset of that size uniformly, then its complement: each pair weighs the same.
    let sizes: Vec<f64> = (1..m).map(|s| 1.0 / (s * (m - s)) as f64).collect();
    let total: f64 = sizes.iter().sum();
    let mut rng = SplitMix(options.seed);
    let full = if m == 64 { u64::MAX } else { (1u64 << m) - 1 };
    let pairs = (options.max_coalitions / 2).max(1);
    let mut masks = Vec::with_capacity(pairs * 2);
    for _ in 0..pairs {
        let mut point = rng.unit() * total;
        let mut size = m - 1;
        for (i, p) in sizes.iter().enumerate() {
            if point < *p {
                size = i + 1;
                break;
            }
            point -= p;
        }
        // A uniform subset of `size` features (Floyd's algorithm).
        let mut mask = 0u64;
        for j in m - size..m {
            let t = (rng.next() % (j as u64 + 1)) as usize;
            mask |= if mask >> t & 1 == 1 { 1 << j } else { 1 << t };
        }
        masks.push(mask);
        masks.push(full & !mask);
    }
    let weights = vec![1.0; masks.len()];
    (masks, weights, false)
}

/// The constrained weighted least squares, the last feature eliminated with the efficiency
/// constraint: `phi_last = delta - sum(phi_rest)`. `None` if the system is singular.
fn solve(
    m: usize,
    k: usize,
    masks: &[u64],
    weights: &[f64],
    values: &[f64],
    expected: &[f64],
    delta: &[f64],
) -> Option<Vec<Vec<f64>>> {
    let n = m - 1;
    // Normal equations for every output at once: A phi = B, A n x n, B n x k.
    let mut a = vec![0.0; n * n];
    let mut b = vec![0.0; n * k];
    let mut row = vec![0.0; n];
    for ((mask, w), v) in masks.iter().zip(weights).zip(values.chunks_exact(k)) {
        let last = (mask >> n & 1) as f64;
        for (i, r) in row.iter_mut().enumerate() {
            *r = (mask >> i & 1) as f64 - last;
        }
        for i in 0..n {
            let wi = w * row[i];
            if wi == 0.0 {
                continue;
            }
            for j in 0..n {
                a[i * n + j] += wi * row[j];
            }
            for o in 0..k {
                b[i * k + o] += wi * (v[o] - expected[o] - last * delta[o]);
            }
        }
    }
    let phi = gauss(n, k, a, b)?;
    Some(
        (0..k)
            .map(|o| {
                let mut values: Vec<f64> = (0..n).map(|i| phi[i * k + o]).collect();
                let rest: f64 = values.iter().sum();
                values.push(delta[o] - rest);
                values
            })
            .collect(),
    )
}

/// Solves `A X = B` (A n x n, B n x k, row-major) by Gaussian elimination with partial
/// pivoting; `None` if A is singular.
fn gauss(n: usize, k: usize, mut a: Vec<f64>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..n {
        let pivot =
            (col..n).max_by(|x, y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs()))?;
        if a[pivot * n + col].abs() <= scale * 1e-12 {
            return None;
        }
        if pivot != col {
            for j in 0..n {
                a.swap(col * n + j, pivot * n + j);
            }
            for o in 0..k {
                b.swap(col * k + o, pivot * k + o);
            }
        }
        for r in col + 1..n {
            let f = a[r * n + col] / a[col * n + col];
            if f == 0.0 {
                continue;
            }
            for j in col..n {
                a[r * n + j] -= f * a[col * n + j];
            }
            for o in 0..k {
                b[r * k + o] -= f * b[col * k + o];
            }
        }
    }
    let mut x = vec![0.0; n * k];
    for r in (0..n).rev() {
        for o in 0..k {
            let mut s = b[r * k + o];
            for j in r + 1..n {
                s -= a[r * n + j] * x[j * k + o];
            }
            x[r * k + o] = s / a[r * n + r];
        }
    }
    Some(x)
}

/// SplitMix64: a small, good, reproducible generator.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // matrices and coalitions read best by index
mod tests {
    use super::*;

    /// A nonlinear model with two outputs and feature interactions.
    fn model(rows: &[f64], n: usize, m: usize) -> Vec<f64> {
        assert_eq!(rows.len(), n * m);
        rows.chunks_exact(m)
            .flat_map(|r| {
                let a = r[0] * r[1 % m] + (r[2 % m]).sin() + r[3 % m] * r[3 % m] * r[0]
                    - 0.5 * r[m - 1];
                let b = 1.0 / (1.0 + (-(r.iter().sum::<f64>() - r[1 % m] * r[2 % m])).exp());
                [a, b]
            })
            .collect()
    }

    fn rows(n: usize, m: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix(seed);
        (0..n * m).map(|_| rng.unit() * 4.0 - 2.0).collect()
    }

    /// The Shapley values by their definition: every coalition, the factorial weights.
    fn brute_force(x: &[f64], background: &[f64]) -> Vec<Vec<f64>> {
        let m = x.len();
        let b = background.len() / m;
        let v = |mask: u64| -> Vec<f64> {
            let mut batch = Vec::new();
            for row in background.chunks_exact(m) {
                batch.extend((0..m).map(|i| if mask >> i & 1 == 1 { x[i] } else { row[i] }));
            }
            mean_rows(&model(&batch, b, m), b, 2)
        };
        let fact = |n: usize| (1..=n).map(|i| i as f64).product::<f64>();
        let mut phi = vec![vec![0.0; m]; 2];
        for mask in 0..(1u64 << m) {
            let s = mask.count_ones() as usize;
            let without = v(mask);
            for i in 0..m {
                if mask >> i & 1 == 1 {
                    continue;
                }
                let with = v(mask | 1 << i);
                let w = fact(s) * fact(m - s - 1) / fact(m);
                for o in 0..2 {
                    phi[o][i] += w * (with[o] - without[o]);
                }
            }
        }
        phi
    }

    fn run(x: &[f64], background: &[f64], options: &Options) -> Explanation {
        let m = x.len();
        explain(&mut |rows, n| Ok(model(rows, n, m)), x, background, options).unwrap()
    }

    #[test]
    fn every_coalition_gives_the_exact_shapley_values() {
        for m in [1, 2, 3, 6, 9] {
            let x = rows(1, m, 1);
            let background = rows(7, m, 2);
            let got = run(&x, &background, &Options::default());
            assert!(got.exact && got.coalitions == (1usize << m) - 2);
            let want = brute_force(&x, &background);
            for (g, w) in got.shap_values.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-9, "M={m}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn sampled_coalitions_keep_efficiency_and_come_close() {
        let m = 12;
        let x = rows(1, m, 3);
        let background = rows(5, m, 4);
        let options = Options {
            max_coalitions: 3000,
            ..Options::default()
        };
        let got = run(&x, &background, &options);
        assert!(!got.exact);
        assert_eq!(got.coalitions, 3000);
        assert_eq!(got.model_rows, 5 + 1 + 3000 * 5);
        let want = brute_force(&x, &background);
        for o in 0..2 {
            let sum: f64 = got.shap_values[o].iter().sum();
            let delta = got.prediction[o] - got.expected_value[o];
            assert!((sum - delta).abs() < 1e-9, "efficiency: {sum} vs {delta}");
            let scale = want[o].iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for (g, w) in got.shap_values[o].iter().zip(&want[o]) {
                assert!(
                    (g - w).abs() < 0.05 * scale,
                    "output {o}: {g} vs {w} (scale {scale})"
                );
            }
        }
        // Reproducible: the same seed, the same values.
        assert_eq!(run(&x, &background, &options), got);
    }

    #[test]
    fn a_linear_model_is_explained_exactly_even_when_sampled() {
        let m = 20;
        let w: Vec<f64> = (0..m).map(|i| i as f64 - 7.5).collect();
        let x = rows(1, m, 5);
        let background = rows(3, m, 6);
        let mut linear = |rows: &[f64], _n: usize| -> Result<Vec<f64>, String> {
            Ok(rows
                .chunks_exact(m)
                .map(|r| r.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + 1.0)
                .collect())
        };
        let got = explain(&mut linear, &x, &background, &Options::default()).unwrap();
        assert!(!got.exact);
        for i in 0..m {
            let mean = background.chunks_exact(m).map(|r| r[i]).sum::<f64>() / 3.0;
            let want = w[i] * (x[i] - mean);
            assert!((got.shap_values[0][i] - want).abs() < 1e-8, "{i}");
        }
    }

    #[test]
    fn batches_stay_under_the_limit_and_bad_input_is_named() {
        let m = 4;
        let x = rows(1, m, 7);
        let background = rows(10, m, 8);
        let mut largest = 0;
        let options = Options {
            max_batch_rows: 30,
            ..Options::default()
        };
        explain(
            &mut |rows, n| {
                largest = largest.max(n);
                Ok(model(rows, n, m))
            },
            &x,
            &background,
            &options,
        )
        .unwrap();
        assert_eq!(largest, 30);
        let ok = |rows: &[f64], n: usize| -> Result<Vec<f64>, String> { Ok(model(rows, n, 4)) };
        let err = |x: &[f64], bg: &[f64]| {
            explain(&mut ok.clone(), x, bg, &Options::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[], &[]).contains("1 to 64 features"));
        assert!(err(&x, &background[..5]).contains("not whole rows of 4"));
        assert!(err(&[1.0, f64::NAN, 0.0, 0.0], &background).contains("finite"));
        let e = explain(
            &mut |_, _| Ok(vec![1.0; 3]),
            &x,
            &background,
            &Options::default(),
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("3 values answered for 10 rows")
        );
        let e = explain(
            &mut |_, _| Err("boom".into()),
            &x,
            &background,
            &Options::default(),
        );
        assert_eq!(e.unwrap_err(), ExplainError::Model("boom".into()));
    }
}
