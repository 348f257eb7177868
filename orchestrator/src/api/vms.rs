//! A VM's record and test results, for the host that runs it or the VM itself.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::VmReader;
use super::error::ApiError;
use crate::model::{PatchId, Suite, TestStatus, VmState};
use crate::store::{ResultRow, VmRow};

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new().routes(routes!(show))
}

/// A VM run as the API shows it (no token state, no internal ids).
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    pub name: String,
    pub host: String,
    pub image: String,
    pub node_type: String,
    pub patch_id: Option<PatchId>,
    pub patch_revision: Option<i32>,
    pub attempt: i32,
    pub suite: Suite,
    pub state: VmState,
    pub reason: Option<String>,
    pub hostname: Option<String>,
    pub deadline: DateTime<Utc>,
    pub requested_at: DateTime<Utc>,
    pub joined_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<VmRow> for VmView {
    fn from(v: VmRow) -> Self {
        VmView {
            name: v.name,
            host: v.host,
            image: v.image,
            node_type: v.node_type,
            patch_id: v.patch_id,
            patch_revision: v.patch_revision,
            attempt: v.attempt,
            suite: v.suite,
            state: v.state,
            reason: v.reason,
            hostname: v.hostname,
            deadline: v.deadline,
            requested_at: v.requested_at,
            joined_at: v.joined_at,
            finished_at: v.finished_at,
        }
    }
}

/// One test result.
#[derive(Debug, Clone, Serialize)]
pub struct TestView {
    pub suite: String,
    pub name: String,
    pub status: TestStatus,
    pub seconds: f64,
    pub output: String,
}

impl From<ResultRow> for TestView {
    fn from(r: ResultRow) -> Self {
        TestView {
            suite: r.suite,
            name: r.name,
            status: r.status,
            seconds: r.seconds,
            output: r.output,
        }
    }
}

/// A VM with its results.
#[derive(Debug, Clone, Serialize)]
pub struct VmWithTests {
    pub vm: VmView,
    pub tests: Vec<TestView>,
}

/// A VM's record and results, for the host that runs it or the VM itself.
#[utoipa::path(get, path = "/api/v1/vms/{name}", operation_id = "show_vm", tag = "host protocol", params(("name" = String, Path, pattern = r"^certo-r[0-9]{1,20}-(?=[a-z0-9-]{1,40}-a[0-9]{1,20}$)[a-z0-9]+(-[a-z0-9]+)*-a[0-9]{1,20}$", description = "The VM's domain name")),
    responses((status = 200, body = Object), (status = 403, body = String, content_type = "text/plain")),
    security(("host_token" = []), ("vm_token" = [])))]
async fn show(
    State(s): State<Arc<ApiState>>,
    reader: VmReader,
) -> Result<Json<VmWithTests>, ApiError> {
    let tests = s.store.vm_results(reader.vm.id).await?;
    Ok(Json(VmWithTests {
        vm: reader.vm.into(),
        tests: tests.into_iter().map(Into::into).collect(),
    }))
}
