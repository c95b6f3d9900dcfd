//! [`Comparison`]: runs side by side, as [`crate::ExperimentDb::compare_runs`] returns
//! them.

use serde::{Deserialize, Serialize};

use crate::records::{MetricSummaryRecord, RunRecord};

/// Runs side by side: every `values` vector has one entry per run, in the order of
/// [`Comparison::runs`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The runs compared, in the order asked for.
    pub runs: Vec<RunRecord>,
    /// Every param key any of the runs has, by key.
    pub params: Vec<ParamRow>,
    /// Every metric series any of the runs has, by key then split.
    pub metrics: Vec<MetricRow>,
}

/// One param across the compared runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamRow {
    /// Param key.
    pub key: String,
    /// The value of each run; `None` where the run does not have the param.
    pub values: Vec<Option<String>>,
}

impl ParamRow {
    /// Whether the runs disagree on this param (one lacking it counts as disagreeing).
    pub fn differs(&self) -> bool {
        self.values.windows(2).any(|w| w[0] != w[1])
    }
}

/// One metric series across the compared runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// Metric name.
    pub key: String,
    /// Split.
    pub split: String,
    /// The summary (last, min, max and their steps) of each run; `None` where the run
    /// has no point of the series.
    pub values: Vec<Option<MetricSummaryRecord>>,
}
