//! [`RunQuery`]: which runs [`crate::ExperimentDb::query_runs`] returns, and the filter
//! syntax of the command line (`param.lr>=0.001`, `metric.valid/loss<2.5`, ...).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::records::RunStatus;
use crate::{Error, Result};

/// A comparison operator of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CompareOp {
    /// Every operator.
    pub const ALL: [CompareOp; 6] = [
        CompareOp::Eq,
        CompareOp::Ne,
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
    ];

    /// The operator as written in a filter (and in SQL): `=`, `!=`, `<`, `<=`, `>`, `>=`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    /// Parses an operator as [`CompareOp::as_str`] writes it.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the operator when it is none of the six.
    pub fn parse(s: &str) -> Result<Self> {
        CompareOp::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown operator {s:?} (expected one of = != < <= > >=)"
                ))
            })
    }

    /// Whether the operator orders (`<`, `<=`, `>`, `>=`) rather than tests equality.
    pub fn is_ordering(self) -> bool {
        !matches!(self, CompareOp::Eq | CompareOp::Ne)
    }

    /// Whether `a OP b` holds (false when the two are unordered, e.g. a NaN).
    pub fn holds<T: PartialOrd + ?Sized>(self, a: &T, b: &T) -> bool {
        match self {
            CompareOp::Eq => a == b,
            CompareOp::Ne => a != b,
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
        }
    }
}

impl fmt::Display for CompareOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which value of a metric series' summary a condition or an order reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricField {
    /// The value at the highest step.
    #[default]
    Last,
    /// The smallest finite value.
    Min,
    /// The largest finite value.
    Max,
}

impl MetricField {
    /// `last`, `min` or `max`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricField::Last => "last",
            MetricField::Min => "min",
            MetricField::Max => "max",
        }
    }

    /// The column of `metric_summaries` holding the value.
    pub(crate) fn column(self) -> &'static str {
        self.as_str()
    }
}

/// A condition on a param: `param.KEY OP VALUE`.
///
/// When the stored value and `value` both parse as numbers (`f64`, NaN excepted) they
/// are compared as numbers (`1e-3 = 0.001` holds); otherwise `=` and `!=` compare the
/// strings and the ordering operators do not hold. A run without the param matches no
/// condition on it, `!=` included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamCondition {
    /// Param key.
    pub key: String,
    /// Operator.
    pub op: CompareOp,
    /// Value to compare with; must be a number for an ordering operator.
    pub value: String,
}

fn parse_number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| !v.is_nan())
}

impl ParamCondition {
    /// Whether a run whose param is `stored` (`None` when it has none) matches.
    pub fn matches(&self, stored: Option<&str>) -> bool {
        let Some(stored) = stored else {
            return false;
        };
        match (parse_number(stored), parse_number(&self.value)) {
            (Some(a), Some(b)) => self.op.holds(&a, &b),
            _ => match self.op {
                CompareOp::Eq => stored == self.value,
                CompareOp::Ne => stored != self.value,
                _ => false,
            },
        }
    }

    fn validate(&self) -> Result<()> {
        if self.key.is_empty() {
            return Err(invalid(self, "empty param key"));
        }
        if self.op.is_ordering() && parse_number(&self.value).is_none() {
            return Err(invalid(
                self,
                &format!("{} needs a number, not {:?}", self.op, self.value),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ParamCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "param.{}{}{}", self.key, self.op, self.value)
    }
}

/// A condition on a metric's summary: `metric.SPLIT/KEY OP VALUE` (on the last value),
/// `metric.SPLIT/KEY:min OP VALUE` or `metric.SPLIT/KEY:max OP VALUE`.
///
/// A run without the series, or whose value is NaN (a last value that was NaN, or no
/// finite value for `min` and `max`), matches no condition on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricCondition {
    /// Metric name.
    pub key: String,
    /// Split.
    pub split: String,
    /// Which value of the summary is compared.
    pub field: MetricField,
    /// Operator.
    pub op: CompareOp,
    /// Value to compare with (not NaN; infinities are allowed).
    pub value: f64,
}

impl MetricCondition {
    fn validate(&self) -> Result<()> {
        if self.split.is_empty() {
            return Err(invalid(self, "empty metric split"));
        }
        if self.key.is_empty() {
            return Err(invalid(self, "empty metric key"));
        }
        if self.value.is_nan() {
            return Err(invalid(self, "the value is NaN, which compares to nothing"));
        }
        Ok(())
    }
}

/// `metric.SPLIT/KEY` with `:min` or `:max` when the field is not the last value.
fn series_name(split: &str, key: &str, field: MetricField) -> String {
    match field {
        MetricField::Last => format!("metric.{split}/{key}"),
        other => format!("metric.{split}/{key}:{}", other.as_str()),
    }
}

impl fmt::Display for MetricCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = series_name(&self.split, &self.key, self.field);
        write!(f, "{name}{}{}", self.op, self.value)
    }
}

/// Sort direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Smallest first.
    #[default]
    Ascending,
    /// Largest first.
    Descending,
}

/// Orders runs by a value of a metric's summary. Runs without it (or whose value is
/// NaN) come last; ties go to the lowest run id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MetricOrder {
    /// Metric name.
    pub key: String,
    /// Split.
    pub split: String,
    /// Which value of the summary orders.
    pub field: MetricField,
    /// Direction.
    pub order: SortOrder,
}

impl MetricOrder {
    fn validate(&self) -> Result<()> {
        let name = series_name(&self.split, &self.key, self.field);
        if self.split.is_empty() || self.key.is_empty() {
            return Err(Error::Invalid(format!(
                "bad order {name:?}: empty metric split or key"
            )));
        }
        Ok(())
    }
}

/// One condition of a [`RunQuery`], as parsed from the command line by
/// [`Filter::parse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Filter {
    /// `status=STATUS`: the run's status (as reported, so `LOST` works) is this one.
    Status(RunStatus),
    /// `tag.KEY=VALUE`: the run has this tag with this value.
    Tag {
        /// Tag key.
        key: String,
        /// Tag value.
        value: String,
    },
    /// `param.KEY OP VALUE`.
    Param(ParamCondition),
    /// `metric.SPLIT/KEY[:min|:max] OP VALUE`.
    Metric(MetricCondition),
}

impl Filter {
    /// Parses `param.KEY OP VALUE`, `metric.SPLIT/KEY OP VALUE` (the last value; append
    /// `:min` or `:max` to the key for its extremes), `tag.KEY=VALUE` or
    /// `status=STATUS` (case-insensitive), with OP one of `= != < <= > >=`. Spaces
    /// around the operator are ignored.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the filter and what is wrong with it: no or an unknown
    /// operator, an unknown field, an empty key, a value that is not a number where one
    /// is needed, a NaN, an unknown status.
    pub fn parse(text: &str) -> Result<Filter> {
        let bad = |why: &str| Error::Invalid(format!("bad filter {text:?}: {why}"));
        let Some(start) = text.find(['=', '!', '<', '>']) else {
            return Err(bad("no operator (expected one of = != < <= > >=)"));
        };
        let rest = &text[start..];
        let op_len = rest
            .find(|c| !matches!(c, '=' | '!' | '<' | '>'))
            .unwrap_or(rest.len());
        let op = CompareOp::parse(&rest[..op_len]).map_err(|e| match e {
            Error::Invalid(why) => bad(&why),
            other => other,
        })?;
        let field = text[..start].trim();
        let value = rest[op_len..].trim();
        let only_eq = |what: &str| {
            if op == CompareOp::Eq {
                Ok(())
            } else {
                Err(bad(&format!("{what} takes only =, not {op}")))
            }
        };
        let filter = if let Some(key) = field.strip_prefix("param.") {
            Filter::Param(ParamCondition {
                key: key.to_string(),
                op,
                value: value.to_string(),
            })
        } else if let Some(series) = field.strip_prefix("metric.") {
            let Some((split, key)) = series.split_once('/') else {
                return Err(bad(
                    "a metric is named metric.SPLIT/KEY, e.g. metric.valid/loss",
                ));
            };
            let (key, field) = match key.rsplit_once(':') {
                Some((key, "last")) => (key, MetricField::Last),
                Some((key, "min")) => (key, MetricField::Min),
                Some((key, "max")) => (key, MetricField::Max),
                _ => (key, MetricField::Last),
            };
            let value: f64 = value
                .parse()
                .map_err(|_| bad(&format!("{value:?} is not a number")))?;
            Filter::Metric(MetricCondition {
                key: key.to_string(),
                split: split.to_string(),
                field,
                op,
                value,
            })
        } else if let Some(key) = field.strip_prefix("tag.") {
            only_eq("a tag")?;
            Filter::Tag {
                key: key.to_string(),
                value: value.to_string(),
            }
        } else if field == "status" {
            only_eq("status")?;
            let status = RunStatus::parse(&value.to_ascii_uppercase()).map_err(|e| match e {
                Error::Invalid(why) => bad(&why),
                other => other,
            })?;
            Filter::Status(status)
        } else {
            return Err(bad(&format!(
                "unknown field {field:?} (expected param.KEY, metric.SPLIT/KEY, tag.KEY or status)"
            )));
        };
        filter.validate()?;
        Ok(filter)
    }

    /// Checks the filter as [`crate::ExperimentDb::query_runs`] does.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the filter: an empty key or split, a NaN, an ordering
    /// operator on a param with a value that is not a number.
    pub fn validate(&self) -> Result<()> {
        match self {
            Filter::Status(_) => Ok(()),
            Filter::Tag { key, .. } if key.is_empty() => Err(invalid(self, "empty tag key")),
            Filter::Tag { .. } => Ok(()),
            Filter::Param(condition) => condition.validate(),
            Filter::Metric(condition) => condition.validate(),
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Status(status) => write!(f, "status={status}"),
            Filter::Tag { key, value } => write!(f, "tag.{key}={value}"),
            Filter::Param(condition) => condition.fmt(f),
            Filter::Metric(condition) => condition.fmt(f),
        }
    }
}

fn invalid(filter: &dyn fmt::Display, why: &str) -> Error {
    Error::Invalid(format!("bad filter \"{filter}\": {why}"))
}

/// Which runs [`crate::ExperimentDb::query_runs`] returns, in which order.
///
/// Every condition must hold, except that `statuses` lists the statuses allowed (any
/// when empty). Without `order_by`, runs come in the order they started (then by id).
///
/// ```
/// # use kiln_experiment_db::{RunQuery, RunStatus, MetricField, SortOrder};
/// let query = RunQuery::new()
///     .experiment("lm")
///     .status(RunStatus::Finished)
///     .filters(["param.lr>=0.001", "tag.gpu=h200"])?
///     .order_by("loss", "valid", MetricField::Min, SortOrder::Ascending)
///     .limit(5);
/// # Ok::<(), kiln_experiment_db::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunQuery {
    /// Only the runs of this experiment.
    pub experiment: Option<String>,
    /// Only runs with one of these statuses (as reported: LOST is not RUNNING); any
    /// status when empty.
    pub statuses: Vec<RunStatus>,
    /// Tags the run must have, as `(key, value)`.
    pub tags: Vec<(String, String)>,
    /// Conditions on params.
    pub params: Vec<ParamCondition>,
    /// Conditions on metric summaries.
    pub metrics: Vec<MetricCondition>,
    /// Order by a metric; by start time when `None`.
    pub order_by: Option<MetricOrder>,
    /// At most this many runs.
    pub limit: Option<usize>,
}

impl RunQuery {
    /// A query for every run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one filter of the command line; see [`Filter::parse`].
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the filter when it is malformed.
    pub fn parse_filter(text: &str) -> Result<Filter> {
        Filter::parse(text)
    }

    /// Adds a filter.
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        match filter {
            Filter::Status(status) => self.statuses.push(status),
            Filter::Tag { key, value } => self.tags.push((key, value)),
            Filter::Param(condition) => self.params.push(condition),
            Filter::Metric(condition) => self.metrics.push(condition),
        }
        self
    }

    /// Parses filters of the command line and adds them.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first malformed filter.
    pub fn filters<I, S>(self, filters: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        filters.into_iter().try_fold(self, |query, text| {
            Ok(query.filter(Filter::parse(text.as_ref())?))
        })
    }

    /// Only the runs of this experiment.
    #[must_use]
    pub fn experiment(mut self, name: impl Into<String>) -> Self {
        self.experiment = Some(name.into());
        self
    }

    /// Allows this status (see [`RunQuery::statuses`]).
    #[must_use]
    pub fn status(mut self, status: RunStatus) -> Self {
        self.statuses.push(status);
        self
    }

    /// Only runs with this tag.
    #[must_use]
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push((key.into(), value.into()));
        self
    }

    /// Only runs whose param matches (see [`ParamCondition`]).
    #[must_use]
    pub fn param(
        mut self,
        key: impl Into<String>,
        op: CompareOp,
        value: impl Into<String>,
    ) -> Self {
        self.params.push(ParamCondition {
            key: key.into(),
            op,
            value: value.into(),
        });
        self
    }

    /// Only runs whose metric summary matches (see [`MetricCondition`]).
    #[must_use]
    pub fn metric(
        mut self,
        key: impl Into<String>,
        split: impl Into<String>,
        field: MetricField,
        op: CompareOp,
        value: f64,
    ) -> Self {
        self.metrics.push(MetricCondition {
            key: key.into(),
            split: split.into(),
            field,
            op,
            value,
        });
        self
    }

    /// Orders by a metric (see [`MetricOrder`]).
    #[must_use]
    pub fn order_by(
        mut self,
        key: impl Into<String>,
        split: impl Into<String>,
        field: MetricField,
        order: SortOrder,
    ) -> Self {
        self.order_by = Some(MetricOrder {
            key: key.into(),
            split: split.into(),
            field,
            order,
        });
        self
    }

    /// At most `n` runs.
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Checks every condition.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first bad condition (see [`Filter::validate`]), or
    /// an empty experiment name.
    pub fn validate(&self) -> Result<()> {
        if self.experiment.as_deref() == Some("") {
            return Err(Error::Invalid("bad query: empty experiment name".into()));
        }
        for (key, value) in &self.tags {
            Filter::Tag {
                key: key.clone(),
                value: value.clone(),
            }
            .validate()?;
        }
        for condition in &self.params {
            condition.validate()?;
        }
        for condition in &self.metrics {
            condition.validate()?;
        }
        if let Some(order) = &self.order_by {
            order.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_through_parse() {
        for text in [
            "param.lr>=0.001",
            "param.strategy!=ddp",
            "metric.valid/loss<2.5",
            "metric.valid/loss:min<=2",
            "metric.train/grad/norm:max>10",
            "tag.gpu=h200",
            "status=LOST",
        ] {
            let filter = Filter::parse(text).unwrap();
            assert_eq!(filter.to_string(), text);
            assert_eq!(Filter::parse(&filter.to_string()).unwrap(), filter);
        }
    }

    #[test]
    fn param_numbers_compare_as_numbers() {
        let c = |op, value: &str| ParamCondition {
            key: "lr".into(),
            op,
            value: value.into(),
        };
        assert!(c(CompareOp::Eq, "0.001").matches(Some("1e-3")));
        assert!(c(CompareOp::Lt, "10").matches(Some("9")), "not as strings");
        assert!(c(CompareOp::Eq, "adam").matches(Some("adam")));
        assert!(!c(CompareOp::Lt, "1").matches(Some("adam")));
        assert!(!c(CompareOp::Ne, "1").matches(None));
    }
}
