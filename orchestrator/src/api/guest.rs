//! The guest protocol: what the harness inside a VM calls, with the token made for that VM
//! alone. Plain text, so a busybox shell can speak it (hosts/README.md).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::{GuestAuth, GuestCredential};
use super::error::{ApiError, text};
use crate::model::{Fault, ServiceStatus, TestStatus, VmState};
use crate::store::{ProbeOutcomeKind, RegisterError, ResultRow, VmRow};

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(join))
        .routes(routes!(service))
        .routes(routes!(result))
        .routes(routes!(done))
        .routes(routes!(log))
        .routes(routes!(testbed))
}

/// Most test results one VM may report.
pub const MAX_RESULTS: i64 = 1000;
/// Most output one test result may carry (the harness sends its last 16 KiB).
pub const MAX_RESULT_OUTPUT: usize = 64 * 1024;
/// Most log bytes one VM may store.
pub const MAX_LOG_BYTES: i64 = 8 * 1024 * 1024;
/// Most services one VM may register in its slice.
pub const MAX_SERVICES: i64 = 64;

/// How long a service report waits for the host to look at the port from outside.
pub const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The first line of a probe's evidence, printable, at most 200 characters.
fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut out: String = line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect();
    if out.is_empty() {
        out = "(it said nothing)".into();
    }
    out
}

/// Services, results and logs come after `join`, in protocol order.
fn joined(vm: &VmRow, what: &str) -> Result<(), ApiError> {
    if vm.state == VmState::Joined {
        Ok(())
    } else {
        Err(ApiError::conflict(format!(
            "{what} before join: {} is {}",
            vm.name, vm.state
        )))
    }
}

fn quota(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "quota", message)
}

/// The testbed slice a VM's services belong to: its patch's, or its own.
fn slice_of(vm: &VmRow) -> String {
    match vm.patch_id {
        Some(p) => format!("patch-{p}"),
        None => format!("vm-{}", vm.name),
    }
}

/// The hostname a VM gets in the testbed.
pub fn hostname_for(vm: &VmRow) -> String {
    let nt = vm
        .node_type
        .trim_start_matches("glite-")
        .to_ascii_lowercase()
        .replace('_', "-");
    format!("{nt}-{}.certo", vm.id)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A guest's text body: UTF-8 without NUL bytes (which PostgreSQL's text cannot hold).
fn body_text<'a>(body: &'a [u8], what: &str) -> Result<std::borrow::Cow<'a, str>, ApiError> {
    if body.contains(&0) {
        return Err(ApiError::bad_request(format!(
            "the {what} contains a NUL byte"
        )));
    }
    Ok(String::from_utf8_lossy(body))
}

/// Join: the harness gets its hostname and its test plan; a token is good for one boot.
/// Join takes the VM token and answers with a `session KEY` line: the key, which only the
/// harness holds (in memory), acts for the VM from now on, and the VM token no longer does.
/// The harness joins: its hostname and test plan, and the session key every later call carries.
#[utoipa::path(post, path = "/api/v1/guest/join", tag = "guest", responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn join(State(s): State<Arc<ApiState>>, guest: GuestAuth) -> Result<Response, ApiError> {
    if guest.credential != GuestCredential::VmToken {
        return Err(ApiError::conflict(format!(
            "{} has already joined: a token is good for one boot",
            guest.vm.name
        )));
    }
    let vm = guest.vm;
    let hostname = hostname_for(&vm);
    let session = super::new_token().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("making a session key: {e}"),
        )
    })?;
    if !s
        .store
        .join_vm(vm.id, &hostname, &super::token_digest(&session))
        .await?
    {
        return Err(ApiError::conflict(format!(
            "{} has already joined: a token is good for one boot",
            vm.name
        )));
    }
    tracing::info!(vm = %vm.name, %hostname, "guest joined");
    let mut plan = format!(
        "session {session}\nhostname {hostname}\nnode_type {}\n",
        vm.node_type
    );
    let dir = format!("/usr/share/glite-tests/{}", vm.node_type);
    if vm.suite.has_basic() {
        plan.push_str(&format!("test basic {dir}/basic/*.sh\n"));
    }
    if vm.suite.has_regression() {
        plan.push_str(&format!("test regression {dir}/regression/*.sh\n"));
    }
    Ok(text(StatusCode::OK, plan))
}

/// `SERVICE PORT up|failed`: a service of the patch's slice came up (or did not).
/// A service the VM started, for the host to probe from outside and the testbed to list.
#[utoipa::path(post, path = "/api/v1/guest/service", tag = "guest", request_body(content = String, content_type = "text/plain"), responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn service(
    State(s): State<Arc<ApiState>>,
    guest: GuestAuth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    guest.require_session("a service")?;
    let vm = guest.vm;
    joined(&vm, "a service")?;
    let usage = || ApiError::bad_request("expected: SERVICE PORT up|failed");
    let line = body_text(&body, "service line")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, port, status] = fields[..] else {
        return Err(usage());
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(ApiError::bad_request(format!(
            "port {port:?} is not a port number"
        )));
    };
    let status = match status.parse::<ServiceStatus>() {
        Ok(st) if valid_name(name) => st,
        _ => return Err(usage()),
    };
    if status == ServiceStatus::Failed || port == 0 {
        tracing::warn!(vm = %vm.name, service = name, %status, "guest service did not come up");
        return Ok(text(StatusCode::OK, "noted\n"));
    }
    if s.store.vm_service_count(vm.id).await? >= MAX_SERVICES {
        return Err(quota(format!(
            "{} has registered {MAX_SERVICES} services, the most a VM may",
            vm.name
        )));
    }
    // The guest's word is not evidence: the host looks at the port from outside before the
    // service joins the testbed (the run's driver asks the host's agent; see vmrun).
    s.store.request_probe(vm.id, name, port).await?;
    let waited = std::time::Instant::now();
    let (outcome, evidence) = loop {
        if let Some(found) = s.store.probe(vm.id, name, port).await? {
            break found;
        }
        if waited.elapsed() >= PROBE_WAIT {
            tracing::warn!(vm = %vm.name, service = name, port, "no outside evidence of a reported service");
            return Err(ApiError::conflict(format!(
                "{name} on port {port}: the host did not look at the port within {} s, so the report is not evidence",
                PROBE_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // A slice's service that announces a shared service's identity from outside (3506's
    // top BDII saying it is the testbed's) does not join the testbed, and its run fails.
    if outcome == ProbeOutcomeKind::Answered {
        let shared = s.store.services(None).await?;
        if let Some(line) = crate::testbed::guard::takeover(name, port, &evidence, &shared) {
            let refusal = format!("{}{line}", crate::testbed::guard::REFUSAL_PREFIX);
            tracing::warn!(vm = %vm.name, service = name, port, %line, "refused: announces a shared service");
            s.store.note_vm_reason(vm.id, &refusal).await?;
            return Err(ApiError::conflict(refusal));
        }
    }
    let evidence = first_line(&evidence);
    let detail = match outcome {
        ProbeOutcomeKind::Silent => {
            tracing::warn!(vm = %vm.name, service = name, port, %evidence, "a reported service did not answer from outside");
            return Err(ApiError::conflict(format!(
                "{name} was reported up on port {port}, but nothing answered there from outside the guest: {evidence}"
            )));
        }
        ProbeOutcomeKind::Answered => format!("answered from outside: {evidence}"),
        ProbeOutcomeKind::Unverifiable => format!("unverified (reported by the guest): {evidence}"),
    };
    let endpoint = format!(
        "{}:{port}",
        vm.hostname.clone().unwrap_or_else(|| hostname_for(&vm))
    );
    match s
        .store
        .register_service(
            name,
            &vm.node_type,
            &endpoint,
            Some(&slice_of(&vm)),
            Some(vm.id),
        )
        .await
    {
        Ok(id) => {
            s.store.set_health(id, true, &detail).await?;
            Ok(text(
                StatusCode::OK,
                format!("registered {name} at {endpoint}: {detail}\n"),
            ))
        }
        Err(RegisterError::Shared {
            name,
            endpoint,
            shared_name,
            shared_endpoint,
        }) => {
            let refusal = crate::testbed::guard::registration_refusal(
                &name,
                &endpoint,
                &shared_name,
                &shared_endpoint,
            );
            tracing::warn!(vm = %vm.name, service = %name, shared = %shared_name, "refused: would take over a shared service");
            // The run fails for it, whatever the harness reports later.
            s.store.note_vm_reason(vm.id, &refusal).await?;
            Err(ApiError::conflict(refusal))
        }
        Err(RegisterError::Store(e)) => Err(e.into()),
    }
}

/// `SUITE NAME pass|fail|error SECONDS`, then the test's output.
/// One test's result, with its output.
#[utoipa::path(post, path = "/api/v1/guest/result", tag = "guest", request_body(content = String, content_type = "text/plain"), responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn result(
    State(s): State<Arc<ApiState>>,
    guest: GuestAuth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    guest.require_session("a result")?;
    let vm = guest.vm;
    joined(&vm, "a result")?;
    let usage = || ApiError::bad_request("first line: SUITE NAME pass|fail|error SECONDS");
    let body = body_text(&body, "result")?;
    let (head, output) = body.split_once('\n').unwrap_or((&body, ""));
    let f: Vec<&str> = head.split_whitespace().collect();
    let [suite, name, status, seconds] = f[..] else {
        return Err(usage());
    };
    let seconds = match seconds.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => s,
        _ => {
            return Err(ApiError::bad_request(
                "SECONDS is not a finite, non-negative number",
            ));
        }
    };
    let status = match status.parse::<TestStatus>() {
        Ok(st) if valid_name(suite) && valid_name(name) => st,
        _ => return Err(usage()),
    };
    let result = ResultRow {
        suite: suite.to_owned(),
        name: name.to_owned(),
        status,
        seconds,
        output: output.to_owned(),
    };
    if result.output.len() > MAX_RESULT_OUTPUT {
        return Err(quota(format!(
            "a result's output may have {MAX_RESULT_OUTPUT} bytes; this one has {}",
            result.output.len()
        )));
    }
    if !s.store.add_result(vm.id, &result, MAX_RESULTS).await? {
        return Err(quota(format!(
            "{} has reported {MAX_RESULTS} results, the most a VM may",
            vm.name
        )));
    }
    tracing::info!(vm = %vm.name, suite, test = name, %status, "test result");
    Ok(text(StatusCode::OK, "recorded\n"))
}

/// A chunk of the harness's own log.
/// A part of the harness's log.
#[utoipa::path(post, path = "/api/v1/guest/log", tag = "guest", request_body(content = String, content_type = "text/plain"), responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn log(
    State(s): State<Arc<ApiState>>,
    guest: GuestAuth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    guest.require_session("a log")?;
    joined(&guest.vm, "a log")?;
    let chunk = body_text(&body, "log")?;
    if !s.store.add_log(guest.vm.id, &chunk, MAX_LOG_BYTES).await? {
        return Err(quota(format!(
            "{} has stored {MAX_LOG_BYTES} log bytes, the most a VM may",
            guest.vm.name
        )));
    }
    Ok(text(StatusCode::OK, "logged\n"))
}

/// `ok`, or `error REASON`: the harness is done; the run ends and the token is used up.
/// The harness is done (or could not start, with the reason).
#[utoipa::path(post, path = "/api/v1/guest/done", tag = "guest", request_body(content = String, content_type = "text/plain"), responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn done(
    State(s): State<Arc<ApiState>>,
    guest: GuestAuth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Before join, the VM token may report that the harness could not start; after, only
    // the session key.
    if guest.vm.state != VmState::Booting {
        guest.require_session("done")?;
    }
    let vm = guest.vm;
    let body = body_text(&body, "done line")?;
    let body = body.trim();
    // Before join only a fatal error may be reported (the harness could not start: the
    // root did not mount); that is the infrastructure's fault, not the patch's.
    if vm.state != VmState::Joined && body == "ok" {
        return Err(ApiError::conflict(format!(
            "done ok before join: {} is {}",
            vm.name, vm.state
        )));
    }
    let (state, fault, reason) = if vm.reason.is_some() && vm.state == VmState::Joined {
        // The guest API refused to let the slice take over a shared service (the reason
        // noted then stays first): the patch's fault, whatever the tests said.
        (
            VmState::Failed,
            Some(Fault::Product),
            (body != "ok").then(|| {
                format!(
                    "the harness reported: {}",
                    body.strip_prefix("error").unwrap_or(body).trim()
                )
            }),
        )
    } else if body == "ok" {
        // Done; a failed test is the product's fault.
        let failed = s
            .store
            .vm_results(vm.id)
            .await?
            .iter()
            .any(|r| r.status != TestStatus::Pass);
        (VmState::Done, failed.then_some(Fault::Product), None)
    } else {
        (
            VmState::Failed,
            Some(if vm.state == VmState::Joined {
                Fault::Product
            } else {
                Fault::Infrastructure
            }),
            Some(format!(
                "the harness reported: {}",
                body.strip_prefix("error").unwrap_or(body).trim()
            )),
        )
    };
    s.store
        .finish_vm(vm.id, state, fault, reason.as_deref(), None)
        .await?;
    tracing::info!(vm = %vm.name, %state, "guest finished");
    Ok(text(StatusCode::OK, "bye\n"))
}

/// What a guest sees of the testbed: the shared services and its own slice's, one per line:
/// `NAME NODE_TYPE ENDPOINT shared|slice healthy|unhealthy`.
/// The testbed as this VM sees it: the shared services and its patch's slice.
#[utoipa::path(get, path = "/api/v1/guest/testbed", tag = "guest", responses((status = 200, description = "Plain text", body = String, content_type = "text/plain"), (status = 401, description = "Plain text; the code in X-Certo-Error", body = String, content_type = "text/plain")), security(("vm_token" = [])))]
async fn testbed(State(s): State<Arc<ApiState>>, guest: GuestAuth) -> Result<Response, ApiError> {
    guest.require_session("the testbed")?;
    let services = s.store.services(Some(&slice_of(&guest.vm))).await?;
    let mut out = String::new();
    for svc in services {
        out.push_str(&format!(
            "{} {} {} {} {}\n",
            svc.name,
            svc.node_type,
            svc.endpoint,
            if svc.slice.is_some() {
                "slice"
            } else {
                "shared"
            },
            if svc.healthy { "healthy" } else { "unhealthy" }
        ));
    }
    Ok(text(StatusCode::OK, out))
}

/// How long after its deadline a live run is ended by the orchestrator itself: `vm run`
/// ends its run at the deadline, and the host destroys the domain 5 s later; this is the
/// backstop for a run whose `vm run` is gone.
pub const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Ends runs whose deadline passed long ago, every `every`, forever.
pub async fn sweep_loop(store: crate::store::Store, every: std::time::Duration) {
    loop {
        match store.end_expired_runs(SWEEP_GRACE).await {
            Ok(ended) if !ended.is_empty() => {
                tracing::warn!(runs = ?ended, "ended runs whose deadline passed with no one watching them");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping expired runs failed"),
        }
        tokio::time::sleep(every).await;
    }
}
