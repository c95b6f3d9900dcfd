//! Run queries and their filter syntax, downsampled histories and run comparisons, on
//! real database files.

use crate::common::*;
use kiln_experiment_db::{
    CompareOp, EndStatus, Error, ExperimentDb, Filter, MetricCondition, MetricField, MetricOrder,
    ParamCondition, RunId, RunQuery, RunStatus, RunTracker, SortOrder,
};
use rstest::rstest;

// ---------------------------------------------------------------- filter syntax

fn param(key: &str, op: CompareOp, value: &str) -> Filter {
    Filter::Param(ParamCondition {
        key: key.into(),
        op,
        value: value.into(),
    })
}

fn metric(split: &str, key: &str, field: MetricField, op: CompareOp, value: f64) -> Filter {
    Filter::Metric(MetricCondition {
        key: key.into(),
        split: split.into(),
        field,
        op,
        value,
    })
}

#[rstest]
#[case::param_ge("param.lr>=0.001", param("lr", CompareOp::Ge, "0.001"))]
#[case::param_eq_string("param.strategy=ddp", param("strategy", CompareOp::Eq, "ddp"))]
#[case::param_ne("param.strategy!=ddp", param("strategy", CompareOp::Ne, "ddp"))]
#[case::param_lt_spaces(" param.batch_size < 64 ", param("batch_size", CompareOp::Lt, "64"))]
#[case::param_le_negative("param.x<=-1", param("x", CompareOp::Le, "-1"))]
#[case::param_empty_value("param.note=", param("note", CompareOp::Eq, ""))]
#[case::metric_last(
    "metric.valid/loss<2.5",
    metric("valid", "loss", MetricField::Last, CompareOp::Lt, 2.5)
)]
#[case::metric_min(
    "metric.valid/loss:min<=2",
    metric("valid", "loss", MetricField::Min, CompareOp::Le, 2.0)
)]
#[case::metric_max_slash_key(
    "metric.train/grad/norm:max>1e3",
    metric("train", "grad/norm", MetricField::Max, CompareOp::Gt, 1000.0)
)]
#[case::metric_infinity(
    "metric.train/loss!=inf",
    metric("train", "loss", MetricField::Last, CompareOp::Ne, f64::INFINITY)
)]
#[case::tag("tag.gpu=h200", Filter::Tag { key: "gpu".into(), value: "h200".into() })]
#[case::tag_value_with_equals("tag.note=a=b", Filter::Tag { key: "note".into(), value: "a=b".into() })]
#[case::status("status=FINISHED", Filter::Status(RunStatus::Finished))]
#[case::status_lowercase("status=lost", Filter::Status(RunStatus::Lost))]
fn filters_parse(#[case] text: &str, #[case] expected: Filter) {
    assert_eq!(RunQuery::parse_filter(text).unwrap(), expected);
}

/// A bad filter is an `Error::Invalid` naming the filter and what is wrong, never a
/// panic.
#[rstest]
#[case::no_operator("param.lr", "no operator")]
#[case::unknown_operator("param.lr=>1", "unknown operator \"=>\"")]
#[case::double_equals("param.lr==1", "unknown operator \"==\"")]
#[case::bang_alone("param.lr!1", "unknown operator \"!\"")]
#[case::unknown_field("lr>=1", "unknown field \"lr\"")]
#[case::empty_param_key("param.=1", "empty param key")]
#[case::ordering_on_a_string("param.opt<adam", "< needs a number")]
#[case::metric_without_split("metric.loss<1", "metric.SPLIT/KEY")]
#[case::empty_metric_key("metric.valid/<1", "empty metric key")]
#[case::empty_metric_split("metric./loss<1", "empty metric split")]
#[case::metric_not_a_number("metric.valid/loss<low", "\"low\" is not a number")]
#[case::metric_nan("metric.valid/loss<NaN", "NaN")]
#[case::tag_operator("tag.gpu!=h200", "a tag takes only =")]
#[case::empty_tag_key("tag.=x", "empty tag key")]
#[case::status_operator("status<FINISHED", "status takes only =")]
#[case::unknown_status("status=DONE", "unknown run status \"DONE\"")]
#[case::empty("", "no operator")]
fn bad_filters_are_named(#[case] text: &str, #[case] why: &str) {
    let err = RunQuery::parse_filter(text).unwrap_err();
    match &err {
        Error::Invalid(message) => {
            assert!(message.contains("bad filter"), "{message}");
            assert!(message.contains(why), "{message:?} should say {why:?}");
            let named = message.contains(&format!("{text:?}"))
                || message.contains(&format!("\"{}\"", text.trim()));
            assert!(named, "{message:?} should name {text:?}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// ---------------------------------------------------------------- query_runs

/// Five runs of experiment `lm` and one of `cls`:
///
/// | run | lr     | opt   | gpu  | status   | valid/loss (last, min) | train/acc last |
/// |-----|--------|-------|------|----------|------------------------|----------------|
/// | a   | 0.001  | adam  | h200 | FINISHED | 2.0, 1.5               | 0.5            |
/// | b   | 1e-3   | sgd   | a100 | FINISHED | 1.0, 1.0               | 0.7            |
/// | c   | 0.01   | adam  | h200 | FAILED   | NaN, 3.0               | -              |
/// | d   | 0.0001 | -     | -    | RUNNING  | 1.0, 0.9               | 0.7            |
/// | e   | 10     | adam  | h200 | RUNNING  | -                      | -              |
/// | x   | 0.001  | adam  | h200 | FINISHED | 0.1, 0.1   (cls)       | -              |
/// The fixture's store, a handle on it, and its runs' names and ids.
type Fixture = (TempStore, ExperimentDb, Vec<(String, RunId)>);

fn fixture(engine: Engine) -> Option<Fixture> {
    let (store, mut db) = temp_store(engine)?;
    type Spec<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
        Option<EndStatus>,
        &'a [f64],
        Option<f64>,
    );
    let specs: [Spec; 6] = [
        (
            "lm",
            "a",
            &[("lr", "0.001"), ("opt", "adam")],
            Some("h200"),
            Some(EndStatus::Finished),
            &[1.5, 2.0],
            Some(0.5),
        ),
        (
            "lm",
            "b",
            &[("lr", "1e-3"), ("opt", "sgd")],
            Some("a100"),
            Some(EndStatus::Finished),
            &[3.0, 1.0],
            Some(0.7),
        ),
        (
            "lm",
            "c",
            &[("lr", "0.01"), ("opt", "adam")],
            Some("h200"),
            Some(EndStatus::Failed),
            &[3.0, f64::NAN],
            None,
        ),
        (
            "lm",
            "d",
            &[("lr", "0.0001")],
            None,
            None,
            &[0.9, 1.0],
            Some(0.7),
        ),
        (
            "lm",
            "e",
            &[("lr", "10"), ("opt", "adam")],
            Some("h200"),
            None,
            &[],
            None,
        ),
        (
            "cls",
            "x",
            &[("lr", "0.001"), ("opt", "adam")],
            Some("h200"),
            Some(EndStatus::Finished),
            &[0.1],
            None,
        ),
    ];
    let mut ids = Vec::new();
    for (experiment, name, params, gpu, end, losses, acc) in specs {
        let id = db
            .start_run(&with_params(new_run(experiment, name), params))
            .unwrap();
        if let Some(gpu) = gpu {
            db.set_tag(id, "gpu", gpu).unwrap();
        }
        let mut points: Vec<_> = losses
            .iter()
            .enumerate()
            .map(|(i, &v)| point("loss", "valid", i as u64, v))
            .collect();
        if let Some(acc) = acc {
            points.push(point("acc", "train", 0, acc));
        }
        db.log_metrics(id, &points).unwrap();
        if let Some(end) = end {
            db.finish_run(id, end, None).unwrap();
        }
        ids.push((name.to_string(), id));
    }
    Some((store, db, ids))
}

fn names(db: &ExperimentDb, query: &RunQuery) -> Vec<String> {
    db.query_runs(query)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

#[rstest]
#[case::everything(RunQuery::new(), &["a", "b", "c", "d", "e", "x"])]
#[case::experiment(RunQuery::new().experiment("lm"), &["a", "b", "c", "d", "e"])]
#[case::status(RunQuery::new().status(RunStatus::Finished), &["a", "b", "x"])]
#[case::statuses_any_of(RunQuery::new().status(RunStatus::Failed).status(RunStatus::Running),
    &["c", "d", "e"])]
#[case::tag(RunQuery::new().tag("gpu", "h200"), &["a", "c", "e", "x"])]
#[case::tag_none(RunQuery::new().tag("gpu", "tpu"), &[])]
#[case::param_numeric_equality(RunQuery::new().param("lr", CompareOp::Eq, "0.001"),
    &["a", "b", "x"])]
#[case::param_numeric_order(RunQuery::new().param("lr", CompareOp::Gt, "0.002"), &["c", "e"])]
#[case::param_not_lexicographic(RunQuery::new().param("lr", CompareOp::Ge, "9"), &["e"])]
#[case::param_string(RunQuery::new().param("opt", CompareOp::Eq, "adam"), &["a", "c", "e", "x"])]
#[case::param_ne_skips_missing(RunQuery::new().param("opt", CompareOp::Ne, "adam"), &["b"])]
#[case::metric_last(RunQuery::new().metric("loss", "valid", MetricField::Last, CompareOp::Le, 1.0),
    &["b", "d", "x"])]
#[case::metric_min(RunQuery::new().metric("loss", "valid", MetricField::Min, CompareOp::Lt, 1.6),
    &["a", "b", "d", "x"])]
#[case::metric_max(RunQuery::new().metric("loss", "valid", MetricField::Max, CompareOp::Ge, 3.0),
    &["b", "c"])]
#[case::nan_last_matches_nothing(
    RunQuery::new().metric("loss", "valid", MetricField::Last, CompareOp::Ne, 0.0),
    &["a", "b", "d", "x"])]
#[case::all_together(RunQuery::new().experiment("lm").tag("gpu", "h200")
    .param("lr", CompareOp::Le, "0.01").status(RunStatus::Finished), &["a"])]
#[case::order_min_asc(RunQuery::new().experiment("lm")
    .order_by("loss", "valid", MetricField::Min, SortOrder::Ascending), &["d", "b", "a", "c", "e"])]
#[case::order_last_desc_nan_last(RunQuery::new().experiment("lm")
    .order_by("loss", "valid", MetricField::Last, SortOrder::Descending), &["a", "b", "d", "c", "e"])]
#[case::order_ties_by_id(RunQuery::new()
    .order_by("acc", "train", MetricField::Last, SortOrder::Descending), &["b", "d", "a", "c", "e", "x"])]
#[case::order_and_limit(RunQuery::new()
    .order_by("loss", "valid", MetricField::Min, SortOrder::Ascending).limit(2), &["x", "d"])]
#[case::limit_after_param_filter(RunQuery::new().param("opt", CompareOp::Eq, "adam").limit(2),
    &["a", "c"])]
#[case::limit_zero(RunQuery::new().limit(0), &[])]
fn query_runs_filters_and_orders(
    #[case] query: RunQuery,
    #[case] expected: &[&str],
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, db, _ids)) = fixture(engine) else {
        return;
    };
    assert_eq!(names(&db, &query), expected, "{query:?}");
}

#[rstest]
fn query_runs_from_parsed_filters(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, db, _ids)) = fixture(engine) else {
        return;
    };
    let query = RunQuery::new()
        .filters(["param.lr>=0.001", "tag.gpu=h200", "metric.valid/loss:min<2"])
        .unwrap();
    assert_eq!(names(&db, &query), ["a", "x"]);
    let query = RunQuery::new()
        .filters(["status=running", "metric.train/acc>0.6"])
        .unwrap();
    assert_eq!(names(&db, &query), ["d"]);
    let err = RunQuery::new()
        .filters(["tag.gpu=h200", "param.lr>>1"])
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("param.lr>>1")),
        "{err}"
    );
}

/// Bad conditions built by hand are refused by `query_runs` with an error naming them.
#[rstest]
#[case::empty_param_key(RunQuery::new().param("", CompareOp::Eq, "1"), "param.=1")]
#[case::ordering_on_a_string(RunQuery::new().param("opt", CompareOp::Ge, "adam"), "param.opt>=adam")]
#[case::nan_value(RunQuery::new().metric("loss", "valid", MetricField::Last, CompareOp::Lt, f64::NAN),
    "metric.valid/loss<NaN")]
#[case::empty_metric_key(RunQuery::new().metric("", "valid", MetricField::Min, CompareOp::Lt, 1.0),
    "metric.valid/:min<1")]
#[case::empty_tag_key(RunQuery::new().tag("", "x"), "tag.=x")]
#[case::empty_order_key(RunQuery { order_by: Some(MetricOrder {
    key: String::new(), split: "valid".into(), field: MetricField::Last, order: SortOrder::Ascending,
}), ..RunQuery::default() }, "metric.valid/")]
#[case::empty_experiment(RunQuery::new().experiment(""), "empty experiment name")]
fn bad_queries_are_refused(
    #[case] query: RunQuery,
    #[case] named: &str,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, db, _ids)) = fixture(engine) else {
        return;
    };
    let err = db.query_runs(&query).unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains(named)),
        "{err} should name {named:?}"
    );
}

#[rstest]
fn query_runs_of_a_missing_experiment_is_not_found(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, db, _ids)) = fixture(engine) else {
        return;
    };
    let err = db
        .query_runs(&RunQuery::new().experiment("nope"))
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("nope")),
        "{err}"
    );
}

// ---------------------------------------------------------------- downsampling

/// 10,000 points with a few spikes, downsampled to 100: at most 100 points, in step
/// order, spikes included, first and last buckets represented.
#[rstest]
#[case::hundred(100)]
#[case::ten(10)]
#[case::odd(33)]
#[case::two(2)]
fn downsampling_keeps_spikes(
    #[case] n: usize,
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let mut values: Vec<(u64, f64)> = (0..10_000u64)
        .map(|s| (s * 3, 5.0 + ((s * 7919) % 100) as f64 / 100.0))
        .collect();
    values[1234].1 = 1000.0;
    values[7777].1 = -1000.0;
    for chunk in values.chunks(500) {
        db.log_metrics(id, &losses(chunk)).unwrap();
    }
    let sampled = db
        .metric_history_downsampled(id, "loss", "train", n)
        .unwrap();
    assert!(sampled.len() <= n, "{} > {n}", sampled.len());
    assert!(sampled.len() >= n / 2, "{} points for {n}", sampled.len());
    assert!(sampled.windows(2).all(|w| w[0].0 <= w[1].0), "step order");
    assert!(sampled.contains(&values[1234]), "the high spike survives");
    assert!(sampled.contains(&values[7777]), "the low spike survives");
    assert!(
        sampled.iter().all(|p| values.contains(p)),
        "only real points"
    );
}

#[rstest]
fn downsampling_short_histories_and_errors(
    #[values(Engine::Sqlite, Engine::Postgres)] engine: Engine,
) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    assert!(
        db.metric_history_downsampled(id, "loss", "train", 10)
            .unwrap()
            .is_empty()
    );
    let points = [(0, 3.0), (1, f64::NAN), (2, 1.0)];
    db.log_metrics(id, &losses(&points)).unwrap();
    assert!(same_points(
        &db.metric_history_downsampled(id, "loss", "train", 3)
            .unwrap(),
        &points
    ));
    for n in [0, 1] {
        let err = db
            .metric_history_downsampled(id, "loss", "train", n)
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
    let err = db
        .metric_history_downsampled(id + 1, "loss", "train", 10)
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

/// Downsampling reads only the visible points: a spike hidden by a resume is gone.
#[rstest]
fn downsampling_skips_hidden_points(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, mut db)) = temp_store(engine) else {
        return;
    };
    let id = db.start_run(&new_run("e", "r")).unwrap();
    let mut points: Vec<(u64, f64)> = (0..1000).map(|s| (s, 1.0)).collect();
    points[900].1 = 1e9;
    db.log_metrics(id, &losses(&points)).unwrap();
    db.resume_run(id, 500).unwrap();
    let sampled = db
        .metric_history_downsampled(id, "loss", "train", 20)
        .unwrap();
    assert!(
        sampled.iter().all(|&(s, v)| s <= 500 && v == 1.0),
        "{sampled:?}"
    );
}

// ---------------------------------------------------------------- comparison

#[rstest]
fn compare_runs_side_by_side(#[values(Engine::Sqlite, Engine::Postgres)] engine: Engine) {
    let Some((_store, db, ids)) = fixture(engine) else {
        return;
    };
    let id = |name: &str| ids.iter().find(|(n, _)| n == name).unwrap().1;
    let comparison = db.compare_runs(&[id("d"), id("a"), id("e")]).unwrap();
    assert_eq!(
        comparison
            .runs
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["d", "a", "e"]
    );
    let params: Vec<(&str, Vec<Option<&str>>, bool)> = comparison
        .params
        .iter()
        .map(|row| {
            (
                row.key.as_str(),
                row.values.iter().map(Option::as_deref).collect(),
                row.differs(),
            )
        })
        .collect();
    assert_eq!(
        params,
        vec![
            ("lr", vec![Some("0.0001"), Some("0.001"), Some("10")], true),
            ("opt", vec![None, Some("adam"), Some("adam")], true),
        ]
    );
    let series: Vec<(&str, &str)> = comparison
        .metrics
        .iter()
        .map(|row| (row.key.as_str(), row.split.as_str()))
        .collect();
    assert_eq!(series, [("acc", "train"), ("loss", "valid")]);
    let loss = &comparison.metrics[1].values;
    let d = loss[0].as_ref().unwrap();
    assert_eq!(
        (d.last, d.min, d.max),
        (1.0, Some((0, 0.9)), Some((1, 1.0)))
    );
    let a = loss[1].as_ref().unwrap();
    assert_eq!(
        (a.last, a.min, a.max),
        (2.0, Some((0, 1.5)), Some((1, 2.0)))
    );
    assert_eq!(loss[2], None, "e has no loss");
    assert_eq!(comparison.metrics[0].values[2], None);

    // Same params: no difference.
    let same = db.compare_runs(&[id("a"), id("x")]).unwrap();
    assert!(same.params.iter().all(|row| !row.differs()));
    // Serialisable for `kiln runs compare --json`.
    let json = serde_json::to_value(&comparison).unwrap();
    assert_eq!(json["params"][1]["values"][0], serde_json::Value::Null);

    assert_eq!(db.compare_runs(&[]).unwrap().runs, vec![]);
    let err = db.compare_runs(&[id("a"), 999]).unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m == "run 999"),
        "{err}"
    );
}
