//! The loss and the metrics, derived from the task kind.

use burn::prelude::*;
use kiln_core::{Error, Prediction, Targets, TaskKind};

/// Mean loss of a batch, ready for `backward`.
pub(crate) fn loss<B: Backend>(
    kind: &TaskKind,
    prediction: Prediction<B>,
    targets: Targets<B>,
) -> kiln_core::Result<Tensor<B, 1>> {
    Ok(match flatten(kind, prediction, targets)? {
        // Fused on Flex (one autodiff node), Burn's `log_softmax` and `gather` elsewhere.
        Flat::Classes { logits, targets } => kiln_kernels::cross_entropy(logits, targets),
        Flat::Values { pred, targets } => (pred - targets).powi_scalar(2).mean(),
    })
}

/// Sums over a validation batch: the loss × count, the correct predictions, the
/// count.
pub(crate) fn evaluate<B: Backend>(
    kind: &TaskKind,
    prediction: Prediction<B>,
    targets: Targets<B>,
) -> kiln_core::Result<EvalSums> {
    Ok(match flatten(kind, prediction, targets)? {
        Flat::Classes { logits, targets } => {
            let [n, _] = logits.dims();
            let correct = logits
                .clone()
                .argmax(1)
                .reshape([n])
                .equal(targets.clone())
                .int()
                .sum()
                .into_scalar()
                .elem::<f64>();
            let loss = kiln_kernels::cross_entropy(logits, targets)
                .into_scalar()
                .elem::<f64>();
            EvalSums {
                loss_sum: loss * n as f64,
                count: n as f64,
                others: vec![("accuracy", correct)],
            }
        }
        Flat::Values { pred, targets } => {
            let [n, _] = pred.dims();
            let loss = (pred - targets)
                .powi_scalar(2)
                .mean()
                .into_scalar()
                .elem::<f64>();
            EvalSums {
                loss_sum: loss * n as f64,
                count: n as f64,
                others: Vec::new(),
            }
        }
    })
}

/// Running sums of a validation pass: each batch's values weighted by its count
/// (its examples, or its tokens where the loss is per token).
#[derive(Debug, Clone, Default)]
pub(crate) struct EvalSums {
    pub loss_sum: f64,
    pub count: f64,
    /// `(name, Σ value × count)` of every further metric, in the order first seen;
    /// for `perplexity`, Σ ln(value) × count (the pass's perplexity is then the
    /// exponential of the mean log-likelihood, as one batch's is).
    pub others: Vec<(&'static str, f64)>,
}

impl EvalSums {
    /// One batch of `count` examples: its mean loss and further metrics.
    pub fn of_batch(loss: f64, count: f64, metrics: &[(&'static str, f64)]) -> Self {
        Self {
            loss_sum: loss * count,
            count,
            others: metrics
                .iter()
                .map(|&(name, value)| match name {
                    "perplexity" => (name, value.ln() * count),
                    _ => (name, value * count),
                })
                .collect(),
        }
    }

    pub fn add(&mut self, other: EvalSums) {
        self.loss_sum += other.loss_sum;
        self.count += other.count;
        for (name, sum) in other.others {
            match self.others.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += sum,
                None => self.others.push((name, sum)),
            }
        }
    }

    /// `(name, mean)` of every further metric, in the order first seen (the
    /// perplexity's from the mean log-likelihood).
    pub fn means(&self) -> Vec<(&'static str, f64)> {
        let count = self.count.max(1.0);
        self.others
            .iter()
            .map(|&(name, sum)| match name {
                "perplexity" => (name, (sum / count).exp()),
                _ => (name, sum / count),
            })
            .collect()
    }

    /// `(name, value)` of each metric of `kind`, as [`TaskKind::metric_names`] lists
    /// them; a custom task's: the loss, then every metric its outputs gave.
    pub fn metrics(&self, kind: &TaskKind) -> Vec<(&'static str, f64)> {
        let loss = self.loss_sum / self.count.max(1.0);
        if *kind == TaskKind::Custom {
            return std::iter::once(("loss", loss))
                .chain(self.means())
                .collect();
        }
        kind.metric_names()
            .iter()
            .filter_map(|&name| {
                let value = match name {
                    "loss" => loss,
                    "perplexity" => perplexity(loss),
                    other => self.means().into_iter().find(|(n, _)| *n == other)?.1,
                };
                Some((name, value))
            })
            .collect()
    }
}

/// `exp(loss)`, capped at `exp(20)` like the upstream project so a diverged run
/// still prints a number.
pub(crate) fn perplexity(loss: f64) -> f64 {
    loss.min(20.0).exp()
}

enum Flat<B: Backend> {
    Classes {
        logits: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
    },
    Values {
        pred: Tensor<B, 2>,
        targets: Tensor<B, 2>,
    },
}

/// Checks prediction and targets against the task and flattens sequences.
fn flatten<B: Backend>(
    kind: &TaskKind,
    prediction: Prediction<B>,
    targets: Targets<B>,
) -> kiln_core::Result<Flat<B>> {
    let mismatch = |msg: String| Err(Error::TaskMismatch(msg));
    match (kind, prediction, targets) {
        (TaskKind::Lm { vocab_size, .. }, Prediction::TokenLogits(logits), Targets::Tokens(t)) => {
            let [b, s, v] = logits.dims();
            if v != *vocab_size {
                return mismatch(format!(
                    "the model predicts {v} tokens but the task's vocab_size is {vocab_size}"
                ));
            }
            if t.dims() != [b, s] {
                return mismatch(format!(
                    "logits {:?} do not match targets {:?}",
                    [b, s, v],
                    t.dims()
                ));
            }
            ids_in_range(&t, v, "token id", "vocab_size")?;
            Ok(Flat::Classes {
                logits: logits.reshape([b * s, v]),
                targets: t.reshape([b * s]),
            })
        }
        (
            TaskKind::Classification { num_classes },
            Prediction::ClassLogits(logits),
            Targets::Classes(t),
        ) => {
            let [b, c] = logits.dims();
            if c != *num_classes {
                return mismatch(format!(
                    "the model predicts {c} classes but the task has {num_classes}"
                ));
            }
            if t.dims() != [b] {
                return mismatch(format!(
                    "logits {:?} do not match targets {:?}",
                    [b, c],
                    t.dims()
                ));
            }
            ids_in_range(&t, c, "class id", "num_classes")?;
            Ok(Flat::Classes { logits, targets: t })
        }
        (TaskKind::Regression { outputs }, Prediction::Values(pred), Targets::Values(t)) => {
            let [b, o] = pred.dims();
            if o != *outputs {
                return mismatch(format!(
                    "the model predicts {o} values but the task has {outputs} outputs"
                ));
            }
            if t.dims() != [b, o] {
                return mismatch(format!(
                    "predictions {:?} do not match targets {:?}",
                    [b, o],
                    t.dims()
                ));
            }
            Ok(Flat::Values { pred, targets: t })
        }
        (kind, p, t) => mismatch(format!(
            "a {} task cannot score a {} prediction against {} targets",
            kind.type_name(),
            match p {
                Prediction::TokenLogits(_) => "token-logits",
                Prediction::ClassLogits(_) => "class-logits",
                Prediction::Values(_) => "values",
            },
            match t {
                Targets::Tokens(_) => "token",
                Targets::Classes(_) => "class",
                Targets::Values(_) => "value",
            }
        )),
    }
}

/// `Ok` when every id in `ids` is in `0..limit` (the task's `field`); else an
/// error naming the first id out of range (the largest, or the smallest below 0)
/// and the limit. Without it an id out of range ends in an opaque index panic on
/// the CPU, and may be read silently out of bounds on a GPU.
fn ids_in_range<B: Backend, const D: usize>(
    ids: &Tensor<B, D, Int>,
    limit: usize,
    what: &str,
    field: &str,
) -> kiln_core::Result<()> {
    if ids.shape().num_elements() == 0 {
        return Ok(());
    }
    let flat = ids.clone().flatten::<1>(0, D - 1);
    let ends = Tensor::cat(vec![flat.clone().min(), flat.max()], 0).into_data();
    let ends = ends.convert::<i64>();
    let (min, max) = match ends.as_slice::<i64>() {
        Ok([min, max]) => (*min, *max),
        _ => return Ok(()),
    };
    let bad = match (min < 0, max >= limit as i64) {
        (_, true) => max,
        (true, false) => min,
        (false, false) => return Ok(()),
    };
    Err(Error::TaskMismatch(format!(
        "{what} {bad} is out of range: the task's {field} is {limit} (ids 0..{limit})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_backend_cpu::NdArray;

    type B = NdArray;

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_classes() {
        let dev = Default::default();
        let logits = Tensor::<B, 3>::zeros([2, 3, 5], &dev);
        let targets = Tensor::<B, 2, Int>::from_data([[0, 1, 2], [3, 4, 0]], &dev);
        let kind = TaskKind::Lm {
            vocab_size: 5,
            seq_len: 3,
        };
        let l = loss(
            &kind,
            Prediction::TokenLogits(logits),
            Targets::Tokens(targets),
        )
        .unwrap()
        .into_scalar()
        .elem::<f64>();
        assert!((l - 5f64.ln()).abs() < 1e-6, "{l}");
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let dev = Default::default();
        let logits = Tensor::<B, 2>::from_data([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], &dev);
        let targets = Tensor::<B, 1, Int>::from_data([0, 1, 1], &dev);
        let kind = TaskKind::Classification { num_classes: 2 };
        let sums = evaluate(
            &kind,
            Prediction::ClassLogits(logits),
            Targets::Classes(targets),
        )
        .unwrap();
        assert_eq!(sums.others, [("accuracy", 2.0)]);
        assert_eq!(sums.count, 3.0);
    }

    #[test]
    fn a_prediction_of_the_wrong_kind_is_a_task_mismatch() {
        let dev = Default::default();
        let pred = Prediction::Values(Tensor::<B, 2>::zeros([2, 1], &dev));
        let targets = Targets::Classes(Tensor::<B, 1, Int>::zeros([2], &dev));
        let err = loss(&TaskKind::Classification { num_classes: 2 }, pred, targets)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("classification task cannot score a values prediction"),
            "{err}"
        );
    }

    /// A token or class id outside the task's range is an error naming the id and
    /// the limit, not an index panic.
    #[rstest::rstest]
    #[case::token_too_large(true, 65, "token id 65 is out of range: the task's vocab_size is 5")]
    #[case::token_negative(true, -1, "token id -1 is out of range")]
    #[case::class_too_large(
        false,
        2,
        "class id 2 is out of range: the task's num_classes is 2 (ids 0..2)"
    )]
    fn ids_out_of_range_are_named(#[case] lm: bool, #[case] id: i64, #[case] needle: &str) {
        let dev = Default::default();
        let (kind, pred, targets) = match lm {
            true => (
                TaskKind::Lm {
                    vocab_size: 5,
                    seq_len: 2,
                },
                Prediction::TokenLogits(Tensor::<B, 3>::zeros([1, 2, 5], &dev)),
                Targets::Tokens(Tensor::<B, 2, Int>::from_data([[0, id]], &dev)),
            ),
            false => (
                TaskKind::Classification { num_classes: 2 },
                Prediction::ClassLogits(Tensor::<B, 2>::zeros([2, 2], &dev)),
                Targets::Classes(Tensor::<B, 1, Int>::from_data([id, 0], &dev)),
            ),
        };
        let err = loss(&kind, pred, targets).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn vocabulary_size_mismatch_is_named() {
        let dev = Default::default();
        let pred = Prediction::TokenLogits(Tensor::<B, 3>::zeros([1, 2, 4], &dev));
        let targets = Targets::Tokens(Tensor::<B, 2, Int>::zeros([1, 2], &dev));
        let err = loss(
            &TaskKind::Lm {
                vocab_size: 65,
                seq_len: 2,
            },
            pred,
            targets,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("predicts 4 tokens") && err.contains("vocab_size is 65"),
            "{err}"
        );
    }
}
