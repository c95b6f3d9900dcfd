//! What kiln reads of a step's output ([`StepOutput`]): the loss, through
//! burn-train's own `Adaptor<LossInput<B>>` and `LossMetric`, and further metrics
//! (of validation, and of the logged training steps): for the outputs burn-train
//! defines, every metric burn-train computes from them (through their adaptors and
//! burn-train's metrics); for a user's own output, the ones it names.

use burn::prelude::*;
use burn::train::metric::{
    AccuracyMetric, Adaptor, AurocMetric, CharErrorRate, ClassReduction, ConfusionStatsInput,
    FBetaScoreMetric, HammingScore, LossInput, LossMetric, Metric, MetricMetadata, Numeric,
    NumericEntry, PerplexityMetric, PrecisionMetric, RecallMetric, TopKAccuracyMetric,
    WordErrorRate,
};
use burn::train::{
    ClassificationOutput, MultiLabelClassificationOutput, RegressionOutput, SequenceOutput,
};

/// The `k` of the logged top-k accuracy (`top5_accuracy`), logged where there are
/// more classes than that.
const TOP_K: usize = 5;

/// The output of a model's step, as kiln reads it: the loss through burn-train's
/// own [`Adaptor`] to [`LossInput`], as burn-train's `LossMetric` reads it, and the
/// further metrics of the output.
///
/// burn-train's outputs implement it, each with every metric burn-train computes
/// from it, logged as fractions under `valid/<name>` (over each validation) and
/// `train/<name>` (on the logged training steps, `log_every_n_steps`):
///
/// | output | metrics |
/// | --- | --- |
/// | `ClassificationOutput` | `accuracy`, `top5_accuracy` (more than 5 classes), `precision`, `recall`, `f1` (top-1, macro over classes), `auroc` (2 classes), `perplexity` |
/// | `MultiLabelClassificationOutput` | `hamming_score`, `precision`, `recall`, `f1` (threshold 0.5, macro over labels) |
/// | `SequenceOutput` | `accuracy`, `top5_accuracy` (vocabulary over 5), `perplexity`, `cer`, `wer` (token error rates) |
/// | `RegressionOutput` | the loss |
///
/// A user's own output type implements it in one line, on top of its
/// `Adaptor<LossInput<B>>`, and names its metrics if it has any (rates as
/// fractions; [`burn_metric`] runs a burn-train metric):
///
/// ```
/// use burn::prelude::*;
/// use burn::train::metric::{AccuracyInput, AccuracyMetric, Adaptor, LossInput};
/// use kiln_coordinator::{StepOutput, burn_metric};
///
/// struct TwoHeads<B: Backend> {
///     loss: Tensor<B, 1>,
///     class_logits: Tensor<B, 2>,
///     classes: Tensor<B, 1, Int>,
/// }
///
/// impl<B: Backend> Adaptor<LossInput<B>> for TwoHeads<B> {
///     fn adapt(&self) -> LossInput<B> {
///         LossInput::new(self.loss.clone())
///     }
/// }
///
/// impl<B: Backend> StepOutput<B> for TwoHeads<B> {
///     fn metrics(&self) -> Vec<(&'static str, f64)> {
///         let input = AccuracyInput::new(self.class_logits.clone(), self.classes.clone());
///         vec![("accuracy", burn_metric(AccuracyMetric::new(), &input) / 100.0)]
///     }
/// }
/// ```
///
/// An output without it does not compile, with a message that says what to add:
///
/// ```compile_fail
/// use burn::prelude::Backend;
/// struct NoLoss;
/// fn needs_a_loss<B: Backend, O: kiln_coordinator::StepOutput<B>>() {}
/// fn train<B: Backend>() {
///     needs_a_loss::<B, NoLoss>();
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "kiln reads the step's loss and metrics from `{Self}` through `StepOutput`, \
               which it does not implement",
    label = "this step output is not a kiln_coordinator::StepOutput",
    note = "add `impl<B: Backend> kiln_coordinator::StepOutput<B> for {Self} {{}}` (its \
            loss comes from burn-train's `Adaptor<LossInput<B>>`; name further \
            metrics in `metrics`); burn-train's own outputs implement it"
)]
pub trait StepOutput<B: Backend>: Adaptor<LossInput<B>> {
    /// The mean loss of the step, as an `f64` (burn-train's `LossMetric` on the
    /// output's `LossInput`).
    fn loss_value(&self) -> f64 {
        burn_metric(LossMetric::<B>::new(), &self.adapt())
    }

    /// `(name, value)` of each further metric of this output, rates and scores as
    /// fractions; none by default.
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

impl<B: Backend> StepOutput<B> for ClassificationOutput<B> {
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        classification(self)
    }
}

impl<B: Backend> StepOutput<B> for MultiLabelClassificationOutput<B> {
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        multilabel(self)
    }
}

impl<B: Backend> StepOutput<B> for SequenceOutput<B> {
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        sequence(self)
    }
}

impl<B: Backend> StepOutput<B> for RegressionOutput<B> {}

/// burn-train reports rates and scores as percentages; kiln logs fractions.
fn percent<T: Metric + Numeric>(metric: T, input: &T::Input) -> f64 {
    burn_metric(metric, input) / 100.0
}

/// Precision, recall and F1 of `input`, by burn-train's metrics as configured.
fn confusion<B: Backend>(
    input: &ConfusionStatsInput<B>,
    (precision, recall, f1): (PrecisionMetric<B>, RecallMetric<B>, FBetaScoreMetric<B>),
) -> [(&'static str, f64); 3] {
    [
        ("precision", percent(precision, input)),
        ("recall", percent(recall, input)),
        ("f1", percent(f1, input)),
    ]
}

fn classification<B: Backend>(output: &ClassificationOutput<B>) -> Vec<(&'static str, f64)> {
    let [_, classes] = output.output.dims();
    // Top-1 decisions, averaged over classes.
    let (top_1, macro_) = (1, ClassReduction::Macro);
    let mut metrics = vec![("accuracy", percent(AccuracyMetric::new(), &output.adapt()))];
    metrics.extend(confusion(
        &output.adapt(),
        (
            PrecisionMetric::multiclass(top_1, macro_),
            RecallMetric::multiclass(top_1, macro_),
            FBetaScoreMetric::multiclass(1.0, top_1, macro_),
        ),
    ));
    metrics.push((
        "perplexity",
        burn_metric(PerplexityMetric::new(), &output.adapt()),
    ));
    if classes > TOP_K {
        metrics.push((
            "top5_accuracy",
            percent(TopKAccuracyMetric::new(TOP_K), &output.adapt()),
        ));
    }
    // burn-train's AUROC is binary only.
    if classes == 2 {
        metrics.push(("auroc", percent(AurocMetric::new(), &output.adapt())));
    }
    metrics
}

fn multilabel<B: Backend>(output: &MultiLabelClassificationOutput<B>) -> Vec<(&'static str, f64)> {
    // A label is predicted above probability 0.5; averaged over labels.
    let (threshold, macro_) = (0.5, ClassReduction::Macro);
    let mut metrics = vec![(
        "hamming_score",
        percent(HammingScore::new(), &output.adapt()),
    )];
    metrics.extend(confusion(
        &output.adapt(),
        (
            PrecisionMetric::multilabel(threshold, macro_),
            RecallMetric::multilabel(threshold, macro_),
            FBetaScoreMetric::multilabel(1.0, threshold, macro_),
        ),
    ));
    metrics
}

fn sequence<B: Backend>(output: &SequenceOutput<B>) -> Vec<(&'static str, f64)> {
    let [_, _, vocabulary] = output.logits.dims();
    let mut metrics = vec![
        ("accuracy", percent(AccuracyMetric::new(), &output.adapt())),
        (
            "perplexity",
            burn_metric(PerplexityMetric::new(), &output.adapt()),
        ),
        ("cer", percent(CharErrorRate::new(), &output.adapt())),
        ("wer", percent(WordErrorRate::new(), &output.adapt())),
    ];
    if vocabulary > TOP_K {
        metrics.push((
            "top5_accuracy",
            percent(TopKAccuracyMetric::new(TOP_K), &output.adapt()),
        ));
    }
    metrics
}

/// The value burn-train's `metric` gives for one `input` (as burn-train reports
/// it: rates in percent).
pub fn burn_metric<T: Metric + Numeric>(mut metric: T, input: &T::Input) -> f64 {
    let metadata = MetricMetadata {
        progress: burn::data::dataloader::Progress::new(1, 1),
        global_progress: burn::data::dataloader::Progress::new(0, 1),
        iteration: None,
        lr: None,
    };
    metric.update(input, &metadata);
    match metric.value() {
        NumericEntry::Value(v) => v,
        NumericEntry::Aggregated {
            aggregated_value, ..
        } => aggregated_value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::train::RegressionOutput;
    use kiln_backend_cpu::NdArray as B;
    use rstest::rstest;

    fn names(metrics: &[(&'static str, f64)]) -> Vec<&'static str> {
        metrics.iter().map(|(name, _)| *name).collect()
    }

    fn value(metrics: &[(&'static str, f64)], name: &str) -> f64 {
        metrics
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))
            .1
    }

    /// Right predictions on every example of `classes` classes: every rate is 1.
    #[rstest]
    #[case::binary(2, &["accuracy", "precision", "recall", "f1", "perplexity", "auroc"])]
    #[case::seven_classes(7, &["accuracy", "precision", "recall", "f1", "perplexity", "top5_accuracy"])]
    fn a_classification_output_gives_burn_trains_metrics(
        #[case] classes: usize,
        #[case] want: &[&str],
    ) {
        let device = Default::default();
        let targets: Vec<i64> = (0..classes as i64).chain(0..classes as i64).collect();
        let n = targets.len();
        let logits: Vec<f32> = targets
            .iter()
            .flat_map(|&t| (0..classes as i64).map(move |c| if c == t { 8.0 } else { 0.0 }))
            .collect();
        let output = ClassificationOutput::<B> {
            loss: Tensor::from_floats([0.5], &device),
            output: Tensor::<B, 1>::from_floats(logits.as_slice(), &device).reshape([n, classes]),
            targets: Tensor::from_ints(targets.as_slice(), &device),
        };
        let metrics = output.metrics();
        assert_eq!(names(&metrics), want);
        for name in ["accuracy", "precision", "recall", "f1"] {
            assert!((value(&metrics, name) - 1.0).abs() < 1e-6, "{metrics:?}");
        }
        let perplexity = value(&metrics, "perplexity");
        assert!((1.0..1.1).contains(&perplexity), "{metrics:?}");
        assert!((output.loss_value() - 0.5).abs() < 1e-6);
    }

    #[test]
    fn a_multilabel_output_gives_its_hamming_score() {
        let device = Default::default();
        let output = MultiLabelClassificationOutput::<B> {
            loss: Tensor::from_floats([0.1], &device),
            output: Tensor::from_floats([[4.0, -4.0, 4.0], [-4.0, 4.0, -4.0]], &device),
            targets: Tensor::from_ints([[1, 0, 0], [0, 1, 0]], &device),
        };
        let metrics = output.metrics();
        assert_eq!(
            names(&metrics),
            ["hamming_score", "precision", "recall", "f1"]
        );
        // 5 of 6 labels right.
        assert!((value(&metrics, "hamming_score") - 5.0 / 6.0).abs() < 1e-6);
    }

    #[test]
    fn a_sequence_output_gives_its_error_rates() {
        let device = Default::default();
        let targets = [[1i64, 2, 3], [4, 5, 0]];
        let logits: Vec<f32> = targets
            .iter()
            .flatten()
            .flat_map(|&t| (0..6).map(move |v| if v == t { 8.0 } else { 0.0 }))
            .collect();
        let output = SequenceOutput::<B> {
            loss: Tensor::from_floats([0.2], &device),
            logits: Tensor::<B, 1>::from_floats(logits.as_slice(), &device).reshape([2, 3, 6]),
            predictions: None,
            targets: Tensor::from_ints(targets, &device),
        };
        let metrics = output.metrics();
        assert_eq!(
            names(&metrics),
            ["accuracy", "perplexity", "cer", "wer", "top5_accuracy"]
        );
        assert!((value(&metrics, "accuracy") - 1.0).abs() < 1e-6);
        assert_eq!(value(&metrics, "cer"), 0.0);
        assert_eq!(value(&metrics, "wer"), 0.0);
    }

    #[test]
    fn a_regression_output_gives_its_loss_alone() {
        let device = Default::default();
        let output = RegressionOutput::<B> {
            loss: Tensor::from_floats([0.25], &device),
            output: Tensor::from_floats([[1.0]], &device),
            targets: Tensor::from_floats([[1.5]], &device),
        };
        assert!(output.metrics().is_empty());
        assert!((output.loss_value() - 0.25).abs() < 1e-6);
    }
}
