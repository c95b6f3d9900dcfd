//! The dashboard's pages, rendered from the store: the runs (filtered and sorted like
//! `kiln runs list`), one run, and a comparison of chosen runs; and the chart
//! fragments that the pages of RUNNING runs fetch again to stay live.

use std::collections::BTreeMap;
use std::fmt::Write;

use kiln_experiment_db::{
    ExperimentDb, MetricField, RunId, RunQuery, RunRecord, RunStatus, SortOrder,
};

use crate::chart::{Curve, line_chart};
use crate::html::{duration, escape, number, page, time, url_encode};

/// Why a page cannot be shown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PageError {
    /// A run (or experiment) named in the URL does not exist: HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// A malformed filter, sort or list of runs: HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed: HTTP 500.
    #[error("{0}")]
    Store(kiln_experiment_db::Error),
}

impl From<kiln_experiment_db::Error> for PageError {
    fn from(error: kiln_experiment_db::Error) -> Self {
        match error {
            kiln_experiment_db::Error::NotFound(what) => {
                PageError::NotFound(format!("{what} not found"))
            }
            other => PageError::Store(other),
        }
    }
}

type PageResult = Result<String, PageError>;

/// Points kept per curve: a longer history is downsampled keeping each bucket's
/// smallest and largest point, so that spikes show.
const MAX_POINTS: usize = 2_000;

/// What the runs page was asked for (its form's fields).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub(crate) struct RunsParams {
    /// Filters as `kiln runs list --filter` takes them, separated by spaces.
    #[serde(default)]
    pub(crate) filter: String,
    /// One status, or empty for any.
    #[serde(default)]
    pub(crate) status: String,
    /// A metric `split/key` to sort by (its last value), or empty for the start time.
    #[serde(default)]
    pub(crate) sort: String,
    /// `asc` or `desc`.
    #[serde(default)]
    pub(crate) order: String,
}

/// The runs page: a filter form, the runs' table, and a form to compare the runs
/// ticked.
pub(crate) fn runs(db: &ExperimentDb, params: &RunsParams) -> PageResult {
    let bad = |e: kiln_experiment_db::Error| PageError::BadRequest(e.to_string());
    let mut query = RunQuery::new()
        .filters(params.filter.split_whitespace())
        .map_err(bad)?;
    if !params.status.is_empty() {
        query = query.status(RunStatus::parse(&params.status.to_uppercase()).map_err(bad)?);
    }
    let sort = match params.sort.trim() {
        "" => None,
        metric => Some(split_metric(metric)?),
    };
    let order = match params.order.as_str() {
        "" | "asc" => SortOrder::Ascending,
        "desc" => SortOrder::Descending,
        other => {
            return Err(PageError::BadRequest(format!(
                "invalid order {other:?}: expected asc or desc"
            )));
        }
    };
    if let Some((split, key)) = &sort {
        query = query.order_by(key.as_str(), split.as_str(), MetricField::Last, order);
    }
    let found = db.query_runs(&query).map_err(|e| match e {
        kiln_experiment_db::Error::Invalid(_) => bad(e),
        other => other.into(),
    })?;
    let mut columns = vec![
        ("train".to_string(), "loss".to_string()),
        ("valid".into(), "loss".into()),
    ];
    if let Some(metric) = &sort
        && !columns.contains(metric)
    {
        columns.push(metric.clone());
    }

    let mut body = String::from("<form class=\"filters\" method=\"get\" action=\"/\">");
    let _ = write!(
        body,
        "<label>status <select name=\"status\"><option value=\"\">any</option>{}</select></label>\
         <label>filters <input name=\"filter\" size=\"48\" value=\"{}\" \
         placeholder=\"param.lr&gt;=0.001 metric.valid/loss&lt;2 tag.gpu=h200\"></label>\
         <label>sort by <input name=\"sort\" size=\"12\" value=\"{}\" placeholder=\"valid/loss\"></label>\
         <select name=\"order\"><option value=\"asc\"{}>ascending</option>\
         <option value=\"desc\"{}>descending</option></select> <button>apply</button></form>",
        RunStatus::ALL
            .iter()
            .map(|s| format!(
                "<option{}>{s}</option>",
                if params.status.eq_ignore_ascii_case(s.as_str()) {
                    " selected"
                } else {
                    ""
                }
            ))
            .collect::<String>(),
        escape(&params.filter),
        escape(&params.sort),
        if order == SortOrder::Ascending {
            " selected"
        } else {
            ""
        },
        if order == SortOrder::Descending {
            " selected"
        } else {
            ""
        },
    );
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/compare\"><p class=\"count\">{} run(s)</p>\
         <table class=\"runs\"><thead><tr><th></th><th>id</th><th>experiment</th><th>name</th>\
         <th>status</th><th>started</th><th>duration</th><th>params</th>{}</tr></thead><tbody>",
        found.len(),
        columns
            .iter()
            .map(|(s, k)| format!("<th>{}</th>", escape(&format!("{s}/{k}"))))
            .collect::<String>()
    );
    for run in &found {
        let params = db.params(run.id)?;
        let shown: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        let mut metrics = String::new();
        for (split, key) in &columns {
            let last = db
                .metric_summary(run.id, key, split)?
                .map_or_else(|| "-".to_string(), |s| number(s.last));
            let _ = write!(metrics, "<td class=\"num\">{last}</td>");
        }
        let _ = write!(
            body,
            "<tr data-run=\"{id}\"><td><input type=\"checkbox\" name=\"run\" value=\"{id}\"></td>\
             <td><a href=\"/runs/{id}\">{id}</a></td><td>{}</td><td><a href=\"/runs/{id}\">{}</a></td>\
             {}<td>{}</td><td>{}</td><td class=\"params\">{}</td>{metrics}</tr>",
            escape(&run.experiment),
            escape(&run.name),
            status_cell(run.status),
            time(run.started_at),
            duration(run_seconds(run)),
            shown.join(" "),
            id = run.id,
        );
    }
    body.push_str("</tbody></table><button>compare the runs ticked</button></form>");
    Ok(page("runs", &body))
}

/// One run: its facts, live curves of every metric series, summaries, params, tags,
/// resumes and artifacts.
pub(crate) fn run(db: &ExperimentDb, id: &str) -> PageResult {
    let id = run_id(id)?;
    let run = db.run(id)?;
    let mut body = format!(
        "<h1>run {} · {}</h1><dl class=\"facts\"><dt>experiment</dt><dd>{}</dd>\
         <dt>status</dt><dd class=\"status status-{}\">{}</dd><dt>attempt</dt><dd>{}</dd>\
         <dt>started</dt><dd>{}</dd><dt>ended</dt><dd>{}</dd><dt>duration</dt><dd>{}</dd>\
         <dt>host</dt><dd>{}</dd><dt>kiln</dt><dd>{}</dd><dt>commit</dt><dd>{}</dd>",
        run.id,
        escape(&run.name),
        escape(&run.experiment),
        run.status.as_str().to_lowercase(),
        run.status,
        run.attempt,
        time(run.started_at),
        run.ended_at.map_or_else(|| "-".into(), time),
        duration(run_seconds(&run)),
        escape(&run.host),
        escape(&run.kiln_version),
        escape(run.git_commit.as_deref().unwrap_or("-")),
    );
    if let Some(reason) = &run.failure_reason {
        let _ = write!(
            body,
            "<dt>reason</dt><dd class=\"reason\">{}</dd>",
            escape(reason)
        );
    }
    body.push_str("</dl>");
    let live = match run.status {
        RunStatus::Running => format!(" data-live=\"/runs/{id}/charts\""),
        _ => String::new(),
    };
    let _ = write!(
        body,
        "<section><h2>curves</h2><div id=\"charts\"{live}>{}</div></section>",
        run_charts(db, id)?
    );
    body.push_str(
        "<section><h2>metric summaries</h2><table><thead><tr><th>series</th>\
        <th>last</th><th>at step</th><th>min</th><th>at step</th><th>max</th><th>at step</th>\
        </tr></thead><tbody>",
    );
    for s in db.metric_summaries(id)? {
        let pair = |p: Option<(u64, f64)>| {
            p.map_or_else(
                || ("-".into(), "-".into()),
                |(step, v)| (number(v), step.to_string()),
            )
        };
        let ((min, min_step), (max, max_step)) = (pair(s.min), pair(s.max));
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{min}</td><td class=\"num\">{min_step}</td>\
             <td class=\"num\">{max}</td><td class=\"num\">{max_step}</td></tr>",
            escape(&format!("{}/{}", s.split, s.key)),
            number(s.last),
            s.last_step,
        );
    }
    body.push_str("</tbody></table></section>");
    body.push_str(&pairs_table("params", &db.params(id)?));
    body.push_str(&pairs_table("tags", &db.tags(id)?));
    let resumes = db.resumes(id)?;
    if !resumes.is_empty() {
        body.push_str(
            "<section><h2>resumes</h2><table><thead><tr><th>attempt</th>\
            <th>from step</th><th>at</th><th>previous attempt</th></tr></thead><tbody>",
        );
        for r in resumes {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td></tr>",
                r.attempt,
                r.from_step,
                time(r.resumed_at),
                r.previous_status,
                r.previous_reason
                    .map_or_else(String::new, |why| format!(": {}", escape(&why)))
            );
        }
        body.push_str("</tbody></table></section>");
    }
    let artifacts = db.artifacts(id)?;
    if !artifacts.is_empty() {
        body.push_str(
            "<section><h2>artifacts</h2><table><thead><tr><th>kind</th><th>path</th>\
            <th>bytes</th><th>sha-256</th></tr></thead><tbody>",
        );
        for a in artifacts {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
                escape(&a.kind),
                escape(&a.path),
                a.size_bytes,
                escape(a.sha256.as_deref().unwrap_or("-"))
            );
        }
        body.push_str("</tbody></table></section>");
    }
    Ok(page(&format!("run {id}"), &body))
}

/// The curves of every metric series of a run, as the run page shows them and its
/// script fetches them again.
pub(crate) fn run_charts(db: &ExperimentDb, id: RunId) -> PageResult {
    let run = db.run(id)?;
    let label = format!("{} (run {})", run.name, run.id);
    let mut out = format!(
        "<div class=\"charts\" data-running=\"{}\">",
        run.status == RunStatus::Running
    );
    let summaries = db.metric_summaries(id)?;
    if summaries.is_empty() {
        out.push_str("<p class=\"empty\">no metric points yet</p>");
    }
    for s in summaries {
        let points = db.metric_history_downsampled(id, &s.key, &s.split, MAX_POINTS)?;
        let curve = Curve {
            label: label.clone(),
            run: id,
            points,
        };
        out.push_str(&line_chart(&format!("{}/{}", s.split, s.key), &[curve]));
    }
    out.push_str("</div>");
    Ok(out)
}

/// Runs side by side: their table, their params with the differing ones marked, their
/// summaries, and one chart per metric series with a curve per run.
pub(crate) fn compare(db: &ExperimentDb, query: &[(String, String)]) -> PageResult {
    let ids = compared(query)?;
    let comparison = db.compare_runs(&ids)?;
    let any_running = comparison
        .runs
        .iter()
        .any(|r| r.status == RunStatus::Running);
    let mut body = String::from(
        "<h1>comparison</h1><table class=\"runs\"><thead><tr><th>id</th>\
        <th>experiment</th><th>name</th><th>status</th><th>started</th><th>duration</th></tr>\
        </thead><tbody>",
    );
    for run in &comparison.runs {
        let _ = write!(
            body,
            "<tr data-run=\"{id}\"><td><a href=\"/runs/{id}\">{id}</a></td><td>{}</td><td>{}</td>\
             {}<td>{}</td><td>{}</td></tr>",
            escape(&run.experiment),
            escape(&run.name),
            status_cell(run.status),
            time(run.started_at),
            duration(run_seconds(run)),
            id = run.id
        );
    }
    body.push_str("</tbody></table>");
    let heads: String = comparison
        .runs
        .iter()
        .map(|r| format!("<th>run {}</th>", r.id))
        .collect();
    let _ = write!(
        body,
        "<section><h2>params</h2><p class=\"note\">≠ marks a param on which the runs differ.</p>\
         <table class=\"params\"><thead><tr><th></th><th>param</th>{heads}</tr></thead><tbody>"
    );
    for row in &comparison.params {
        let differs = row.differs();
        let _ = write!(
            body,
            "<tr{}><td>{}</td><td>{}</td>{}</tr>",
            if differs { " class=\"differs\"" } else { "" },
            if differs { "≠" } else { "" },
            escape(&row.key),
            row.values
                .iter()
                .map(|v| format!("<td>{}</td>", escape(v.as_deref().unwrap_or("-"))))
                .collect::<String>()
        );
    }
    body.push_str("</tbody></table></section>");
    let _ = write!(
        body,
        "<section><h2>last values</h2><table><thead><tr><th>series</th>{heads}</tr></thead><tbody>"
    );
    for row in &comparison.metrics {
        let _ = write!(
            body,
            "<tr><td>{}</td>{}</tr>",
            escape(&format!("{}/{}", row.split, row.key)),
            row.values
                .iter()
                .map(|v| format!(
                    "<td class=\"num\">{}</td>",
                    v.as_ref().map_or_else(|| "-".into(), |s| number(s.last))
                ))
                .collect::<String>()
        );
    }
    body.push_str("</tbody></table></section>");
    let live = if any_running {
        format!(" data-live=\"/compare/charts?{}\"", runs_query(&ids))
    } else {
        String::new()
    };
    let _ = write!(
        body,
        "<section><h2>curves</h2><div id=\"charts\"{live}>{}</div></section>",
        compare_charts(db, query)?
    );
    let title = format!(
        "compare runs {}",
        ids.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(page(&title, &body))
}

/// One chart per metric series any of the compared runs has, with a curve per run
/// that has it.
pub(crate) fn compare_charts(db: &ExperimentDb, query: &[(String, String)]) -> PageResult {
    let ids = compared(query)?;
    let mut series: BTreeMap<(String, String), Vec<Curve>> = BTreeMap::new();
    let mut running = false;
    for &id in &ids {
        let run = db.run(id)?;
        running |= run.status == RunStatus::Running;
        for s in db.metric_summaries(id)? {
            let points = db.metric_history_downsampled(id, &s.key, &s.split, MAX_POINTS)?;
            series.entry((s.split, s.key)).or_default().push(Curve {
                label: format!("{} (run {})", run.name, run.id),
                run: id,
                points,
            });
        }
    }
    let mut out = format!("<div class=\"charts\" data-running=\"{running}\">");
    for ((split, key), curves) in series {
        out.push_str(&line_chart(&format!("{split}/{key}"), &curves));
    }
    out.push_str("</div>");
    Ok(out)
}

/// The page of a page that cannot be shown.
pub(crate) fn error_page(error: &PageError) -> String {
    let (title, hint) = match error {
        PageError::NotFound(_) => ("not found", "<a href=\"/\">all runs</a>"),
        PageError::BadRequest(_) => ("bad request", "<a href=\"/\">all runs</a>"),
        PageError::Store(_) => ("the store failed", "try again; the server's log says more"),
    };
    page(
        title,
        &format!(
            "<h1>{title}</h1><p class=\"error\">{}</p><p>{hint}</p>",
            escape(&error.to_string())
        ),
    )
}

/// The runs a comparison names: `run=ID` (repeated) or `runs=ID,ID,...`.
fn compared(query: &[(String, String)]) -> Result<Vec<RunId>, PageError> {
    let mut ids = Vec::new();
    for (key, value) in query {
        if key == "run" || key == "runs" {
            for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                ids.push(part.parse::<RunId>().map_err(|_| {
                    PageError::BadRequest(format!("invalid run id {part:?}: expected a number"))
                })?);
            }
        }
    }
    if ids.is_empty() {
        return Err(PageError::BadRequest(
            "no runs to compare: tick them on the runs page, or give ?run=1&run=2".into(),
        ));
    }
    Ok(ids)
}

fn runs_query(ids: &[RunId]) -> String {
    ids.iter()
        .map(|id| format!("run={}", url_encode(&id.to_string())))
        .collect::<Vec<_>>()
        .join("&amp;")
}

/// A run id from a URL; anything else names no run.
pub(crate) fn run_id(text: &str) -> Result<RunId, PageError> {
    text.parse()
        .map_err(|_| PageError::NotFound(format!("run {text:?} not found: run ids are numbers")))
}

fn split_metric(metric: &str) -> Result<(String, String), PageError> {
    metric
        .split_once('/')
        .filter(|(s, k)| !s.is_empty() && !k.is_empty())
        .map(|(s, k)| (s.to_string(), k.to_string()))
        .ok_or_else(|| {
            PageError::BadRequest(format!(
                "invalid sort metric {metric:?}: expected split/name such as valid/loss"
            ))
        })
}

fn status_cell(status: RunStatus) -> String {
    format!(
        "<td class=\"status status-{}\">{status}</td>",
        status.as_str().to_lowercase()
    )
}

/// How long the run ran: to its end, or to its last heartbeat while it runs.
fn run_seconds(run: &RunRecord) -> f64 {
    run.ended_at.or(run.heartbeat_at).unwrap_or(run.started_at) - run.started_at
}

fn pairs_table(title: &str, pairs: &[(String, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let rows: String = pairs
        .iter()
        .map(|(k, v)| format!("<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v)))
        .collect();
    format!("<section><h2>{title}</h2><table><tbody>{rows}</tbody></table></section>")
}

#[cfg(test)]
mod tests {
    use kiln_experiment_db::{EndStatus, MetricPoint, NewRun, RunTracker};
    use rstest::rstest;

    use super::*;

    fn store() -> (tempfile::TempDir, ExperimentDb) {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ExperimentDb::open(dir.path().join("kiln.sqlite")).unwrap();
        for (name, lr) in [("a", "0.001"), ("b", "0.01")] {
            let run = db
                .start_run(&NewRun {
                    experiment: "lm".into(),
                    name: name.into(),
                    config: serde_json::json!({}),
                    params: vec![("lr".into(), lr.into())],
                    kiln_version: "0.1.0".into(),
                    git_commit: None,
                    host: "h".into(),
                })
                .unwrap();
            let points: Vec<MetricPoint> = (0..4)
                .map(|step| MetricPoint {
                    key: "loss".into(),
                    split: "valid".into(),
                    step,
                    epoch: 0,
                    value: if name == "a" { 1.0 } else { 2.0 } / (step as f64 + 1.0),
                    wall_time: 0.0,
                })
                .collect();
            db.log_metrics(run, &points).unwrap();
            db.finish_run(run, EndStatus::Finished, None).unwrap();
        }
        (dir, db)
    }

    fn names(html: &str) -> Vec<String> {
        html.split("<tr data-run=")
            .skip(1)
            .map(|row| {
                let name = row.split("</a></td>").nth(1).unwrap();
                name.rsplit('>').next().unwrap().to_string()
            })
            .collect()
    }

    #[rstest]
    #[case::all("", "", "", "", &["a", "b"])]
    #[case::filter("param.lr>=0.005", "", "", "", &["b"])]
    #[case::status("", "finished", "", "", &["a", "b"])]
    #[case::status_none("", "RUNNING", "", "", &[])]
    #[case::sort_desc("", "", "valid/loss", "desc", &["b", "a"])]
    fn the_runs_page_filters_and_sorts(
        #[case] filter: &str,
        #[case] status: &str,
        #[case] sort: &str,
        #[case] order: &str,
        #[case] expected: &[&str],
    ) {
        let (_dir, db) = store();
        let params = RunsParams {
            filter: filter.into(),
            status: status.into(),
            sort: sort.into(),
            order: order.into(),
        };
        assert_eq!(names(&runs(&db, &params).unwrap()), expected);
    }

    #[rstest]
    #[case::filter("param.lr~1", "", "", "param.lr~1")]
    #[case::status("", "DONE", "", "unknown run status \"DONE\"")]
    #[case::sort("", "", "loss", "invalid sort metric \"loss\"")]
    fn bad_runs_queries_are_bad_requests(
        #[case] filter: &str,
        #[case] status: &str,
        #[case] sort: &str,
        #[case] named: &str,
    ) {
        let (_dir, db) = store();
        let params = RunsParams {
            filter: filter.into(),
            status: status.into(),
            sort: sort.into(),
            order: String::new(),
        };
        match runs(&db, &params) {
            Err(PageError::BadRequest(why)) => assert!(why.contains(named), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_runs_are_not_found_and_named() {
        let (_dir, db) = store();
        for id in ["99", "abc"] {
            match run(&db, id) {
                Err(PageError::NotFound(why)) => assert!(why.contains(id), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        let query = vec![("run".to_string(), "1,99".to_string())];
        assert!(matches!(compare(&db, &query), Err(PageError::NotFound(_))));
        assert!(matches!(compare(&db, &[]), Err(PageError::BadRequest(_))));
        let html = error_page(&PageError::NotFound("run 99 not found".into()));
        assert!(
            html.contains("<title>not found · kiln</title>") && html.contains("run 99"),
            "{html}"
        );
    }

    #[test]
    fn a_comparison_draws_a_curve_per_run_and_marks_differing_params() {
        let (_dir, db) = store();
        let query = vec![
            ("run".to_string(), "1".to_string()),
            ("run".to_string(), "2".to_string()),
        ];
        let html = compare(&db, &query).unwrap();
        assert_eq!(html.matches("<polyline class=\"curve\"").count(), 2);
        assert!(
            html.contains("<tr class=\"differs\"><td>≠</td><td>lr</td>"),
            "{html}"
        );
        assert!(!html.contains("data-live"), "no run is RUNNING");
    }
}
