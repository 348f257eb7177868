//! `/metrics` in the Prometheus text format (version 0.0.4), for an operator's scraper
//! with a user token (`authorization: credentials_file` in Prometheus).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::UserAuth;
use super::error::{ErrorBody, JsonError};
use crate::store::metrics::{DURATION_BUCKETS, Metrics};

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Queue depth by state, step durations (histograms), verdicts by kind, infrastructure
/// retries, hosts and quarantined hosts, layer-cache hits and misses, bytes sent and saved.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn metrics(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
) -> Result<Response, JsonError> {
    let m = s.store.metrics().await?;
    Ok((
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        render(&m),
    )
        .into_response())
}

/// A label value escaped as the format asks (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text of `m`.
pub fn render(m: &Metrics) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "certo_steps",
        "gauge",
        "Steps of the runs in flight, by state.",
    );
    for state in [
        "waiting",
        "runnable",
        "running",
        "passed",
        "failed",
        "cancelled",
    ] {
        let n = m.steps_by_state.get(state).copied().unwrap_or(0);
        let _ = writeln!(o, "certo_steps{{state=\"{state}\"}} {n}");
    }
    family(&mut o, "certo_runs", "gauge", "Runs, by state.");
    for state in ["running", "passed", "failed", "cancelled"] {
        let n = m.runs_by_state.get(state).copied().unwrap_or(0);
        let _ = writeln!(o, "certo_runs{{state=\"{state}\"}} {n}");
    }
    family(
        &mut o,
        "certo_step_duration_seconds",
        "histogram",
        "How long finished steps took, by step.",
    );
    for (step, h) in &m.step_seconds {
        let step = label(step);
        for (le, n) in DURATION_BUCKETS.iter().zip(&h.buckets) {
            let _ = writeln!(
                o,
                "certo_step_duration_seconds_bucket{{step=\"{step}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "certo_step_duration_seconds_bucket{{step=\"{step}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            o,
            "certo_step_duration_seconds_sum{{step=\"{step}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            o,
            "certo_step_duration_seconds_count{{step=\"{step}\"}} {}",
            h.count
        );
    }
    family(
        &mut o,
        "certo_verdicts_total",
        "counter",
        "Verdicts given, by kind.",
    );
    for kind in ["certified", "rejected", "incomplete", "cancelled"] {
        let n = m.verdicts.get(kind).copied().unwrap_or(0);
        let _ = writeln!(o, "certo_verdicts_total{{verdict=\"{kind}\"}} {n}");
    }
    let mut one = |name: &str, kind: &str, help: &str, v: i64| {
        family(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    };
    one(
        "certo_infrastructure_retries_total",
        "counter",
        "Step attempts beyond the first (a step is tried again only after an infrastructure failure).",
        m.retries,
    );
    one("certo_hosts", "gauge", "Hosts known.", m.hosts);
    one(
        "certo_hosts_quarantined",
        "gauge",
        "Hosts out of placement (quarantined).",
        m.hosts_quarantined,
    );
    one(
        "certo_users",
        "gauge",
        "Users with a token that acts.",
        m.users,
    );
    family(
        &mut o,
        "certo_layer_cache_total",
        "counter",
        "Image layers of build steps, taken from the cache (hit) or built (miss).",
    );
    let _ = writeln!(
        o,
        "certo_layer_cache_total{{outcome=\"hit\"}} {}",
        m.layer_hits
    );
    let _ = writeln!(
        o,
        "certo_layer_cache_total{{outcome=\"miss\"}} {}",
        m.layer_misses
    );
    family(
        &mut o,
        "certo_transfer_bytes_sent_total",
        "counter",
        "Bytes sent to hosts by image transfers.",
    );
    let _ = writeln!(o, "certo_transfer_bytes_sent_total {}", m.bytes_sent);
    family(
        &mut o,
        "certo_transfer_bytes_saved_total",
        "counter",
        "Bytes of the delivered images that were not sent (the host had them, or they were zero).",
    );
    let _ = writeln!(
        o,
        "certo_transfer_bytes_saved_total {}",
        (m.bytes_total - m.bytes_sent).max(0)
    );
    o
}
