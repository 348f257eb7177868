//! `certo serve`: the orchestrator's HTTP API for hosts and guests.
//!
//! - Hosts (`certo agent --orchestrator URL`) register and send heartbeats with their own
//!   token (`Authorization: Bearer`); a host can act only for itself. A heartbeat answers with
//!   the host's live VMs, so the agent reaps any other domain.
//! - Guests (the harness inside a VM) use a token made for that VM alone: join (hostname and
//!   test plan), register services, report results, finish. A token that is used up, unknown,
//!   or presented with another VM's name is refused.
//! - The testbed registry: shared long-running services and each patch's slice; a slice cannot
//!   take over a shared service; shared services are health-checked and marked unhealthy when
//!   they stop answering.
//!
//! The guest protocol is plain text so a busybox shell can speak it (see hosts/README.md).

use crate::model::{ServiceStatus, TestStatus, VmState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use certo_proto::host::{HeartbeatReply, Registered, Registration};
use serde_json::json;

use crate::store::{RegisterError, ResultRow, Store, VmRow};

/// Largest body the API accepts (test output included).
const MAX_BODY: usize = 256 * 1024;

/// Shared state of the server.
#[derive(Debug, Clone)]
pub struct Server {
    pub store: Store,
}

/// SHA-256 of a token, hex (what the store keeps instead of the token).
pub fn token_digest(token: &str) -> String {
    certo_proto::token::digest(token)
}

/// Equal in time independent of where the strings differ (secrets).
fn same(a: &str, b: &str) -> bool {
    certo_proto::token::same(a.as_bytes(), b.as_bytes())
}

/// A new random token: 32 bytes from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()
        .and_then(certo_proto::token::bearer)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "request failed");
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
}

/// The API router.
pub fn router(server: Server) -> Router {
    Router::new()
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{name}/register", post(register_host))
        .route("/api/v1/hosts/{name}/heartbeat", post(heartbeat))
        .route("/api/v1/guest/join", post(guest_join))
        .route("/api/v1/guest/service", post(guest_service))
        .route("/api/v1/guest/result", post(guest_result))
        .route("/api/v1/guest/done", post(guest_done))
        .route("/api/v1/guest/log", post(guest_log))
        .route("/api/v1/guest/testbed", get(guest_testbed))
        .route("/api/v1/testbed", get(testbed))
        .route("/api/v1/vms/{name}", get(vm_status))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(server))
}

/// Serves until `shutdown` resolves; checks shared services' health every `health_every`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Server,
    health_every: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let checker = tokio::spawn(health_loop(server.store.clone(), health_every));
    let app = router(server);
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    checker.abort();
    result
}

async fn health_loop(store: Store, every: Duration) {
    loop {
        if let Err(e) = check_health(&store).await {
            tracing::warn!(error = %e, "health check round failed");
        }
        tokio::time::sleep(every).await;
    }
}

/// One health-check round over the shared services: a TCP connection within 2 s.
pub async fn check_health(store: &Store) -> anyhow::Result<()> {
    for service in store.services(None).await? {
        if service.slice.is_some() {
            continue;
        }
        let connect = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(service.endpoint.as_str()),
        )
        .await;
        let (healthy, detail) = match connect {
            Ok(Ok(_)) => (true, "answers".to_owned()),
            Ok(Err(e)) => (false, format!("connect: {e}")),
            Err(_) => (false, "no answer within 2 s".to_owned()),
        };
        if store.set_health(service.id, healthy, &detail).await? {
            if healthy {
                tracing::info!(service = %service.name, endpoint = %service.endpoint, "service healthy again");
            } else {
                tracing::warn!(service = %service.name, endpoint = %service.endpoint, %detail, "service unhealthy");
            }
        }
    }
    Ok(())
}

async fn authorize_host(s: &Server, name: &str, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = bearer(headers) else {
        return Err(text(StatusCode::UNAUTHORIZED, "a host token is required\n"));
    };
    match s.store.host_token(name).await {
        Ok(Some(stored)) if same(&stored, &token_digest(token)) => Ok(()),
        Ok(_) => Err(text(
            StatusCode::FORBIDDEN,
            format!("this token does not belong to host {name}\n"),
        )),
        Err(e) => Err(internal(e)),
    }
}

async fn list_hosts(State(s): State<Arc<Server>>) -> Response {
    match s.store.list_hosts().await {
        Ok(hosts) => axum::Json(hosts).into_response(),
        Err(e) => internal(e),
    }
}

async fn register_host(
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize_host(&s, &name, &headers).await {
        return r;
    }
    let reg: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("registration: {e}\n")),
    };
    if reg.slots < 0 || reg.memory_mib < 0 || reg.vcpus < 0 || reg.agent_url.len() > 2048 {
        return text(
            StatusCode::BAD_REQUEST,
            "registration: negative capacity or overlong URL\n",
        );
    }
    match s
        .store
        .register_host(
            &name,
            &reg.agent_url,
            &reg.libvirt_uri,
            reg.slots,
            reg.memory_mib,
            reg.vcpus,
        )
        .await
    {
        Ok(()) => {
            tracing::info!(host = %name, agent = %reg.agent_url, slots = reg.slots, "host registered");
            axum::Json(Registered { registered: name }).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn heartbeat(
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize_host(&s, &name, &headers).await {
        return r;
    }
    match s.store.heartbeat(&name).await {
        Ok(live_vms) => axum::Json(HeartbeatReply { live_vms }).into_response(),
        Err(e) => internal(e),
    }
}

/// The VM a guest request acts for, or the refusal.
async fn guest(s: &Server, headers: &HeaderMap) -> Result<VmRow, Response> {
    let Some(token) = bearer(headers) else {
        return Err(text(StatusCode::UNAUTHORIZED, "a VM token is required\n"));
    };
    let vm = match s.store.vm_by_token(&token_digest(token)).await {
        Ok(Some(vm)) => vm,
        Ok(None) => return Err(text(StatusCode::UNAUTHORIZED, "unknown VM token\n")),
        Err(e) => return Err(internal(e)),
    };
    if let Some(claimed) = headers.get("x-certo-vm").and_then(|v| v.to_str().ok())
        && claimed != vm.name
    {
        tracing::warn!(vm = %vm.name, claimed, "a VM token presented for another VM");
        return Err(text(
            StatusCode::FORBIDDEN,
            "this token belongs to another VM\n",
        ));
    }
    if vm.token_used_up {
        return Err(text(
            StatusCode::UNAUTHORIZED,
            format!(
                "the token of {} is used up (the run ended: {})\n",
                vm.name, vm.state
            ),
        ));
    }
    Ok(vm)
}

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

async fn guest_join(State(s): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let hostname = hostname_for(&vm);
    match s.store.join_vm(vm.id, &hostname).await {
        Ok(true) => {}
        Ok(false) => {
            return text(
                StatusCode::CONFLICT,
                format!(
                    "{} has already joined: a token is good for one boot\n",
                    vm.name
                ),
            );
        }
        Err(e) => return internal(e),
    }
    tracing::info!(vm = %vm.name, %hostname, "guest joined");
    let mut plan = format!("hostname {hostname}\nnode_type {}\n", vm.node_type);
    let dir = format!("/usr/share/glite-tests/{}", vm.node_type);
    if vm.suite.has_basic() {
        plan.push_str(&format!("test basic {dir}/basic/*.sh\n"));
    }
    if vm.suite.has_regression() {
        plan.push_str(&format!("test regression {dir}/regression/*.sh\n"));
    }
    text(StatusCode::OK, plan)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn guest_service(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let line = String::from_utf8_lossy(&body);
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, port, status] = fields[..] else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected: SERVICE PORT up|failed\n",
        );
    };
    let Ok(port) = port.parse::<u16>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("port {port:?} is not a port number\n"),
        );
    };
    let status = match status.parse::<ServiceStatus>() {
        Ok(st) if valid_name(name) => st,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "expected: SERVICE PORT up|failed\n",
            );
        }
    };
    if status == ServiceStatus::Failed || port == 0 {
        tracing::warn!(vm = %vm.name, service = name, %status, "guest service did not come up");
        return text(StatusCode::OK, "noted\n");
    }
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
        Ok(_) => text(StatusCode::OK, format!("registered {name} at {endpoint}\n")),
        Err(e @ RegisterError::Shared { .. }) => {
            tracing::warn!(vm = %vm.name, service = name, "refused: would replace a shared service");
            text(StatusCode::CONFLICT, format!("{e}\n"))
        }
        Err(e) => internal(e),
    }
}

async fn guest_result(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let body = String::from_utf8_lossy(&body);
    let (head, output) = body.split_once('\n').unwrap_or((&body, ""));
    let f: Vec<&str> = head.split_whitespace().collect();
    let [suite, name, status, seconds] = f[..] else {
        return text(
            StatusCode::BAD_REQUEST,
            "first line: SUITE NAME pass|fail|error SECONDS\n",
        );
    };
    let Ok(seconds) = seconds.parse::<f64>() else {
        return text(StatusCode::BAD_REQUEST, "SECONDS is not a number\n");
    };
    let status = match status.parse::<TestStatus>() {
        Ok(st) if valid_name(suite) && valid_name(name) => st,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "first line: SUITE NAME pass|fail|error SECONDS\n",
            );
        }
    };
    let result = ResultRow {
        suite: suite.to_owned(),
        name: name.to_owned(),
        status,
        seconds,
        output: output.to_owned(),
    };
    match s.store.add_result(vm.id, &result).await {
        Ok(()) => {
            tracing::info!(vm = %vm.name, suite, test = name, %status, "test result");
            text(StatusCode::OK, "recorded\n")
        }
        Err(e) => internal(e),
    }
}

async fn guest_log(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let chunk = String::from_utf8_lossy(&body);
    match s.store.add_log(vm.id, &chunk).await {
        Ok(()) => text(StatusCode::OK, "logged\n"),
        Err(e) => internal(e),
    }
}

async fn guest_done(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let body = String::from_utf8_lossy(&body);
    let body = body.trim();
    let (state, reason) = if body == "ok" {
        (VmState::Done, None)
    } else {
        (
            VmState::Failed,
            Some(format!(
                "the harness reported: {}",
                body.strip_prefix("error").unwrap_or(body).trim()
            )),
        )
    };
    match s
        .store
        .finish_vm(vm.id, state, reason.as_deref(), None)
        .await
    {
        Ok(_) => {
            tracing::info!(vm = %vm.name, %state, "guest finished");
            text(StatusCode::OK, "bye\n")
        }
        Err(e) => internal(e),
    }
}

/// What a guest sees of the testbed: the shared services and its own slice's, one per line:
/// `NAME NODE_TYPE ENDPOINT shared|slice healthy|unhealthy`.
async fn guest_testbed(State(s): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let vm = match guest(&s, &headers).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    match s.store.services(Some(&slice_of(&vm))).await {
        Ok(services) => {
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
            text(StatusCode::OK, out)
        }
        Err(e) => internal(e),
    }
}

async fn testbed(State(s): State<Arc<Server>>) -> Response {
    match s.store.services(None).await {
        Ok(services) => axum::Json(services).into_response(),
        Err(e) => internal(e),
    }
}

async fn vm_status(State(s): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    let vm = match s.store.vm(&name).await {
        Ok(Some(vm)) => vm,
        Ok(None) => return text(StatusCode::NOT_FOUND, format!("no VM {name}\n")),
        Err(e) => return internal(e),
    };
    match s.store.vm_results(vm.id).await {
        Ok(results) => axum::Json(json!({"vm": vm, "tests": results})).into_response(),
        Err(e) => internal(e),
    }
}
