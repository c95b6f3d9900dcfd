//! [`TaskSpec`]: what is being learned.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The version of the [`TaskSpec`] JSON layout this build writes. Older versions are
/// read (missing fields take their defaults); newer ones are refused with an error.
pub const TASK_SPEC_SCHEMA_VERSION: u32 = 1;

/// What kind of task a model is trained for. The loss and the metrics follow from it:
///
/// | kind | loss | metrics |
/// | --- | --- | --- |
/// | `lm` | token cross-entropy | loss, perplexity, token accuracy |
/// | `classification` | cross-entropy | loss, accuracy |
/// | `regression` | mean squared error | loss (= MSE) |
/// | `custom` | the model's own (its `TrainStep`) | loss |
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task_type", rename_all = "snake_case")]
pub enum TaskKind {
    /// Next-token prediction over sequences of token ids.
    #[serde(alias = "language_modeling", alias = "causal_lm")]
    Lm {
        /// Number of distinct tokens.
        vocab_size: usize,
        /// Context length (tokens per training sequence).
        seq_len: usize,
    },
    /// One class per example.
    Classification {
        /// Number of classes.
        num_classes: usize,
    },
    /// A vector of real values per example.
    Regression {
        /// Number of outputs per example.
        outputs: usize,
    },
    /// A model that brings its own training step (burn-train's `TrainStep`): its
    /// loss is the one its step's output adapts to. kiln names a run trained
    /// through `TrainingCoordinator::fit` so.
    Custom,
}

impl TaskKind {
    /// The loss this kind is trained with, by name.
    pub fn loss_name(&self) -> &'static str {
        match self {
            TaskKind::Lm { .. } | TaskKind::Classification { .. } => "cross_entropy",
            TaskKind::Regression { .. } => "mse",
            TaskKind::Custom => "model",
        }
    }

    /// The metrics reported for this kind, by the names kiln logs them under.
    pub fn metric_names(&self) -> &'static [&'static str] {
        match self {
            TaskKind::Lm { .. } => &["loss", "perplexity", "accuracy"],
            TaskKind::Classification { .. } => &["loss", "accuracy"],
            TaskKind::Regression { .. } | TaskKind::Custom => &["loss"],
        }
    }

    /// Short name, as in the JSON `task_type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            TaskKind::Lm { .. } => "lm",
            TaskKind::Classification { .. } => "classification",
            TaskKind::Regression { .. } => "regression",
            TaskKind::Custom => "custom",
        }
    }
}

/// Whether a larger value of the metric `name` is better: accuracies, scores and
/// throughputs (`accuracy`, `top5_accuracy`, `precision`, `recall`, `f1`, `auroc`,
/// `hamming_score`, `items_per_s`); for every other metric (losses, perplexity,
/// error rates such as `cer` and `wer`) a smaller one is. A run's summaries keep
/// each metric's best value by this rule.
pub fn higher_is_better(name: &str) -> bool {
    matches!(
        name,
        "accuracy" | "top5_accuracy" | "precision" | "recall" | "f1" | "auroc" | "hamming_score"
    ) || name.ends_with("_per_s")
}

/// A description of the task a run learns, stored with every run.
///
/// It mirrors the upstream Python `TaskSpec` (name, task type, model family, input
/// and target fields, special tokens, free-form extra configuration) with the task
/// type made precise: the parameters that shape the model and the loss are typed
/// fields of [`TaskKind`] instead of loose dictionary keys.
///
/// ```
/// use kiln_core::{TaskKind, TaskSpec};
/// let spec = TaskSpec::preset("lm_tiny").unwrap();
/// assert!(matches!(spec.kind, TaskKind::Lm { vocab_size: 65, seq_len: 64 }));
/// assert_eq!(spec.kind.metric_names(), &["loss", "perplexity", "accuracy"]);
/// let json = spec.to_json();
/// assert_eq!(TaskSpec::from_json(&json).unwrap(), spec);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Layout version of this record; see [`TASK_SPEC_SCHEMA_VERSION`].
    #[serde(default = "default_schema_version")]
    pub schema_version: u32,
    /// The task's name (a preset name such as `lm_tiny`, or the user's own).
    pub name: String,
    /// The kind of task, with the sizes that shape model and loss.
    #[serde(flatten)]
    pub kind: TaskKind,
    /// `decoder_only`, `encoder_only`, `mlp`, ... (descriptive).
    #[serde(default)]
    pub model_family: String,
    /// `text`, `tabular`, ... (descriptive).
    #[serde(default = "default_modality")]
    pub modality: String,
    /// Names of the batch's input fields (descriptive).
    #[serde(default)]
    pub input_fields: Vec<String>,
    /// Name of the batch's target field (descriptive).
    #[serde(default)]
    pub target_field: Option<String>,
    /// Special token ids, e.g. `pad_token_id`.
    #[serde(default)]
    pub special_tokens: std::collections::BTreeMap<String, i64>,
    /// Anything else the user wants stored with the task.
    #[serde(default)]
    pub additional_config: serde_json::Map<String, serde_json::Value>,
}

fn default_schema_version() -> u32 {
    TASK_SPEC_SCHEMA_VERSION
}

fn default_modality() -> String {
    "text".into()
}

/// The names [`TaskSpec::preset`] accepts.
pub const PRESETS: &[&str] = &["lm_tiny", "cls_tiny", "reg_tiny"];

impl TaskSpec {
    /// A task spec with the given name and kind and every descriptive field empty.
    pub fn new(name: impl Into<String>, kind: TaskKind) -> Self {
        Self {
            schema_version: TASK_SPEC_SCHEMA_VERSION,
            name: name.into(),
            kind,
            model_family: String::new(),
            modality: default_modality(),
            input_fields: Vec::new(),
            target_field: None,
            special_tokens: Default::default(),
            additional_config: Default::default(),
        }
    }

    /// Character-level language modelling: vocabulary 65, context 64 (the tiny GPT
    /// of the benchmark).
    pub fn lm_tiny() -> Self {
        Self {
            model_family: "decoder_only".into(),
            input_fields: vec!["input_ids".into()],
            target_field: Some("labels".into()),
            ..Self::new(
                "lm_tiny",
                TaskKind::Lm {
                    vocab_size: 65,
                    seq_len: 64,
                },
            )
        }
    }

    /// Two-class classification of 16 tabular features.
    pub fn cls_tiny() -> Self {
        Self {
            model_family: "mlp".into(),
            modality: "tabular".into(),
            input_fields: vec!["features".into()],
            target_field: Some("labels".into()),
            ..Self::new("cls_tiny", TaskKind::Classification { num_classes: 2 })
        }
    }

    /// Regression of one value from 16 tabular features.
    pub fn reg_tiny() -> Self {
        Self {
            model_family: "mlp".into(),
            modality: "tabular".into(),
            input_fields: vec!["features".into()],
            target_field: Some("targets".into()),
            ..Self::new("reg_tiny", TaskKind::Regression { outputs: 1 })
        }
    }

    /// The task of a model trained through its own `TrainStep`
    /// ([`TaskKind::Custom`]), named `name`.
    ///
    /// ```
    /// let spec = kiln_core::TaskSpec::custom("cnn");
    /// assert_eq!(spec.kind.type_name(), "custom");
    /// assert_eq!(spec.kind.metric_names(), &["loss"]);
    /// ```
    pub fn custom(name: impl Into<String>) -> Self {
        Self {
            modality: String::new(),
            ..Self::new(name, TaskKind::Custom)
        }
    }

    /// A preset by name: one of [`PRESETS`].
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "lm_tiny" => Ok(Self::lm_tiny()),
            "cls_tiny" => Ok(Self::cls_tiny()),
            "reg_tiny" => Ok(Self::reg_tiny()),
            other => Err(Error::invalid("task preset", other, PRESETS.join(", "))),
        }
    }

    /// Checks that the sizes describe a trainable task.
    pub fn validate(&self) -> Result<()> {
        if self.schema_version > TASK_SPEC_SCHEMA_VERSION {
            return Err(Error::InvalidTaskSpec(format!(
                "schema_version {} is newer than this kiln understands ({TASK_SPEC_SCHEMA_VERSION})",
                self.schema_version
            )));
        }
        let bad = |what: &str, v: usize, min: usize| {
            Err(Error::InvalidTaskSpec(format!(
                "{what} is {v}, must be at least {min}"
            )))
        };
        match self.kind {
            TaskKind::Lm { vocab_size, .. } if vocab_size < 2 => bad("vocab_size", vocab_size, 2),
            TaskKind::Lm { seq_len, .. } if seq_len < 1 => bad("seq_len", seq_len, 1),
            TaskKind::Classification { num_classes } if num_classes < 2 => {
                bad("num_classes", num_classes, 2)
            }
            TaskKind::Regression { outputs } if outputs < 1 => bad("outputs", outputs, 1),
            _ => Ok(()),
        }
    }

    /// Reads and validates a task spec from JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        let spec: Self =
            serde_json::from_str(json).map_err(|e| Error::InvalidTaskSpec(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The task spec as JSON.
    pub fn to_json(&self) -> String {
        // A TaskSpec has only string keys and plain values: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("accuracy", true)]
    #[case("top5_accuracy", true)]
    #[case("f1", true)]
    #[case("hamming_score", true)]
    #[case("items_per_s", true)]
    #[case("loss", false)]
    #[case("perplexity", false)]
    #[case("cer", false)]
    #[case("grad_norm", false)]
    fn a_metric_knows_which_end_is_best(#[case] name: &str, #[case] higher: bool) {
        assert_eq!(higher_is_better(name), higher);
    }

    #[rstest]
    #[case("lm_tiny")]
    #[case("cls_tiny")]
    #[case("reg_tiny")]
    fn presets_round_trip_through_json(#[case] name: &str) {
        let spec = TaskSpec::preset(name).unwrap();
        spec.validate().unwrap();
        assert_eq!(TaskSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn old_json_without_optional_fields_still_loads() {
        let spec =
            TaskSpec::from_json(r#"{"name":"x","task_type":"classification","num_classes":3}"#)
                .unwrap();
        assert_eq!(spec.kind, TaskKind::Classification { num_classes: 3 });
        assert_eq!(spec.schema_version, TASK_SPEC_SCHEMA_VERSION);
        assert_eq!(spec.modality, "text");
    }

    #[rstest]
    #[case(
        r#"{"name":"x","task_type":"lm","vocab_size":1,"seq_len":8}"#,
        "vocab_size is 1"
    )]
    #[case(
        r#"{"name":"x","task_type":"classification","num_classes":1}"#,
        "num_classes is 1"
    )]
    #[case(r#"{"name":"x","task_type":"regression","outputs":0}"#, "outputs is 0")]
    #[case(r#"{"name":"x","task_type":"seq2seq"}"#, "unknown variant `seq2seq`")]
    #[case(
        r#"{"schema_version":99,"name":"x","task_type":"regression","outputs":1}"#,
        "newer"
    )]
    fn bad_task_specs_are_refused_with_the_reason(#[case] json: &str, #[case] needle: &str) {
        let err = TaskSpec::from_json(json).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = TaskSpec::preset("lm_huge").unwrap_err().to_string();
        assert!(
            err.contains("lm_huge") && err.contains("lm_tiny, cls_tiny"),
            "{err}"
        );
    }

    #[test]
    fn lm_alias_names_are_accepted() {
        let spec = TaskSpec::from_json(
            r#"{"name":"x","task_type":"causal_lm","vocab_size":10,"seq_len":4}"#,
        )
        .unwrap();
        assert_eq!(spec.kind.type_name(), "lm");
    }
}
