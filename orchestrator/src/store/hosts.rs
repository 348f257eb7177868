//! Hosts, VM runs, guest results and the testbed registry.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;

use super::{Store, StoreError};
use crate::model::{Fault, PatchId, Suite, TestStatus, VmState};

/// A registered host.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub name: String,
    pub agent_url: Option<String>,
    pub libvirt_uri: Option<String>,
    pub slots: Option<i32>,
    pub memory_mib: Option<i64>,
    pub vcpus: Option<i32>,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Taken out of placement after repeated infrastructure failures, and why.
    pub quarantined_at: Option<DateTime<Utc>>,
    pub quarantine_reason: Option<String>,
}

/// One VM run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct VmRow {
    pub id: i64,
    pub name: String,
    pub host: String,
    pub image: String,
    pub node_type: String,
    pub patch_id: Option<PatchId>,
    pub patch_revision: Option<i32>,
    pub attempt: i32,
    pub suite: Suite,
    pub state: VmState,
    /// Whose fault an unsuccessful end was (`None` while live or when it passed).
    pub fault: Option<Fault>,
    pub reason: Option<String>,
    pub hostname: Option<String>,
    pub token_used_up: bool,
    pub serial_log: Option<String>,
    pub deadline: DateTime<Utc>,
    pub requested_at: DateTime<Utc>,
    pub joined_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a probe of a guest's service from outside found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcomeKind {
    /// The service answered on its port.
    Answered,
    /// Nothing answered.
    Silent,
    /// The host cannot reach the guest's ports: no evidence either way.
    Unverifiable,
}

impl ProbeOutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Silent => "silent",
            Self::Unverifiable => "unverifiable",
        }
    }
}

/// A test result reported by a guest.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub suite: String,
    pub name: String,
    pub status: TestStatus,
    pub seconds: f64,
    pub output: String,
}

/// A service of the testbed.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    pub id: i64,
    pub name: String,
    pub node_type: String,
    pub endpoint: String,
    /// `None`: a shared long-running service; else the patch slice that owns it.
    pub slice: Option<String>,
    pub owner_vm: Option<i64>,
    pub healthy: bool,
    pub health_detail: Option<String>,
    pub last_check: Option<DateTime<Utc>>,
}

/// What a new VM run is.
#[derive(Debug, Clone)]
pub struct NewVm<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub image: &'a str,
    pub node_type: &'a str,
    pub patch: Option<(PatchId, i32)>,
    pub attempt: i32,
    pub suite: Suite,
    pub token_sha256: &'a str,
    pub deadline: DateTime<Utc>,
}

/// Why a service cannot be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The slice's name or endpoint is a shared service's (the text the guest API answers
    /// with is [`crate::testbed::guard::registration_refusal`]'s).
    #[error(
        "{name} at {endpoint} would take over the shared service {shared_name} at {shared_endpoint}; a patch's slice cannot take over a service other patches use"
    )]
    Shared {
        name: String,
        endpoint: String,
        shared_name: String,
        shared_endpoint: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

const VM_COLUMNS: &str = "id, name, host, image, node_type, patch_id, patch_revision, attempt, suite, state, fault, reason, hostname, token_used_up, serial_log, deadline, requested_at, joined_at, finished_at";

/// What one VM left ([`Store::vm_evidence`]).
#[derive(Debug, Clone)]
pub struct VmEvidence {
    pub name: String,
    pub host: String,
    pub serial_log: Option<String>,
    /// (suite, name, status, seconds, output), in the order reported.
    pub results: Vec<(String, String, String, f64, String)>,
    /// The harness's log.
    pub log: String,
}

impl Store {
    /// Adds a host with the SHA-256 of its token; false if the name is taken.
    pub async fn add_host(&self, name: &str, token_sha256: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO hosts (name, token_sha256) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(token_sha256)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replaces a host's token (or adds the host).
    pub async fn set_host_token(&self, name: &str, token_sha256: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosts (name, token_sha256) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256",
        )
        .bind(name)
        .bind(token_sha256)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The SHA-256 of a host's token.
    pub async fn host_token(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT token_sha256 FROM hosts WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// Records what a host says about itself.
    pub async fn register_host(
        &self,
        name: &str,
        agent_url: &str,
        libvirt_uri: &str,
        slots: i32,
        memory_mib: i64,
        vcpus: i32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE hosts SET agent_url = $2, libvirt_uri = $3, slots = $4, memory_mib = $5,
                    vcpus = $6, registered_at = now(), last_heartbeat = now()
             WHERE name = $1",
        )
        .bind(name)
        .bind(agent_url)
        .bind(libvirt_uri)
        .bind(slots)
        .bind(memory_mib)
        .bind(vcpus)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A heartbeat: returns the names of the host's live VMs (the agent reaps the others).
    pub async fn heartbeat(&self, name: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query("UPDATE hosts SET last_heartbeat = now() WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.live_vms(name).await
    }

    /// Names of a host's VMs that are still booting or joined and within their deadline
    /// (the agent reaps every other domain of its own).
    pub async fn live_vms(&self, host: &str) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM vm_runs WHERE host = $1 AND state IN ('booting', 'joined')
               AND deadline > now() ORDER BY id",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Every host.
    pub async fn list_hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<i32>,
            Option<i64>,
            Option<i32>,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT name, agent_url, libvirt_uri, slots, memory_mib, vcpus, registered_at, last_heartbeat,
                    quarantined_at, quarantine_reason
             FROM hosts ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| HostRow {
                name: r.0,
                agent_url: r.1,
                libvirt_uri: r.2,
                slots: r.3,
                memory_mib: r.4,
                vcpus: r.5,
                registered_at: r.6,
                last_heartbeat: r.7,
                quarantined_at: r.8,
                quarantine_reason: r.9,
            })
            .collect())
    }

    /// Creates a VM run in state `booting`.
    pub async fn create_vm(&self, vm: &NewVm<'_>) -> Result<VmRow, StoreError> {
        let sql = format!(
            "INSERT INTO vm_runs (name, host, image, node_type, patch_id, patch_revision, attempt, suite,
                                  token_sha256, deadline)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {VM_COLUMNS}"
        );
        let t: VmRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(vm.name)
            .bind(vm.host)
            .bind(vm.image)
            .bind(vm.node_type)
            .bind(vm.patch.map(|p| p.0))
            .bind(vm.patch.map(|p| p.1))
            .bind(vm.attempt)
            .bind(vm.suite)
            .bind(vm.token_sha256)
            .bind(vm.deadline)
            .fetch_one(&self.pool)
            .await?;
        Ok(t)
    }

    /// The VM whose token has this SHA-256.
    pub async fn vm_by_token(&self, token_sha256: &str) -> Result<Option<VmRow>, StoreError> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vm_runs WHERE token_sha256 = $1");
        let t: Option<VmRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(t)
    }

    /// A VM by name.
    pub async fn vm(&self, name: &str) -> Result<Option<VmRow>, StoreError> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vm_runs WHERE name = $1");
        let t: Option<VmRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(t)
    }

    /// Marks a booting VM joined with its hostname and the digest of the session key the
    /// harness uses from now on; false if it was not booting.
    pub async fn join_vm(
        &self,
        id: i64,
        hostname: &str,
        session_sha256: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE vm_runs SET state = 'joined', joined_at = now(), hostname = $2, session_sha256 = $3
             WHERE id = $1 AND state = 'booting' AND NOT token_used_up",
        )
        .bind(id)
        .bind(hostname)
        .bind(session_sha256)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The VM whose harness holds the session key with this digest.
    pub async fn vm_by_session(&self, session_sha256: &str) -> Result<Option<VmRow>, StoreError> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vm_runs WHERE session_sha256 = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(session_sha256)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Asks for outside evidence of a service the guest reported on `port` (a pending probe;
    /// a repeated report asks again).
    pub async fn request_probe(
        &self,
        vm_id: i64,
        service: &str,
        port: u16,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO vm_service_probes (vm_id, service, port) VALUES ($1, $2, $3)
             ON CONFLICT (vm_id, service, port) DO UPDATE
                SET outcome = NULL, evidence = NULL, requested_at = now(), probed_at = NULL",
        )
        .bind(vm_id)
        .bind(service)
        .bind(i32::from(port))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The probes of a VM still waiting for the host to look: (service, port).
    pub async fn pending_probes(&self, vm_id: i64) -> Result<Vec<(String, u16)>, StoreError> {
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT service, port FROM vm_service_probes
              WHERE vm_id = $1 AND outcome IS NULL ORDER BY requested_at, service",
        )
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, p)| Some((s, u16::try_from(p).ok()?)))
            .collect())
    }

    /// Records what the host found on a reported service's port.
    pub async fn record_probe(
        &self,
        vm_id: i64,
        service: &str,
        port: u16,
        outcome: ProbeOutcomeKind,
        evidence: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE vm_service_probes SET outcome = $4, evidence = $5, probed_at = now()
              WHERE vm_id = $1 AND service = $2 AND port = $3",
        )
        .bind(vm_id)
        .bind(service)
        .bind(i32::from(port))
        .bind(outcome.as_str())
        .bind(evidence)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What the host found on a reported service's port, once it has looked.
    pub async fn probe(
        &self,
        vm_id: i64,
        service: &str,
        port: u16,
    ) -> Result<Option<(ProbeOutcomeKind, String)>, StoreError> {
        let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT outcome, evidence FROM vm_service_probes
              WHERE vm_id = $1 AND service = $2 AND port = $3",
        )
        .bind(vm_id)
        .bind(service)
        .bind(i32::from(port))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(o, e)| {
            let kind = match o.as_deref()? {
                "answered" => ProbeOutcomeKind::Answered,
                "silent" => ProbeOutcomeKind::Silent,
                _ => ProbeOutcomeKind::Unverifiable,
            };
            Some((kind, e.unwrap_or_default()))
        }))
    }

    /// Stores (or replaces) one test result, unless the VM has `max` results already;
    /// returns whether it was stored.
    pub async fn add_result(
        &self,
        id: i64,
        result: &ResultRow,
        max: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO vm_results (vm_id, suite, name, status, seconds, output)
             SELECT $1, $2, $3, $4, $5, $6
              WHERE (SELECT count(*) FROM vm_results WHERE vm_id = $1 AND (suite, name) <> ($2, $3)) < $7
             ON CONFLICT (vm_id, suite, name) DO UPDATE
               SET status = EXCLUDED.status, seconds = EXCLUDED.seconds, output = EXCLUDED.output,
                   reported_at = now()",
        )
        .bind(id)
        .bind(&result.suite)
        .bind(&result.name)
        .bind(result.status)
        .bind(result.seconds)
        .bind(&result.output)
        .bind(max)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends a VM run (its token is used up; its slice services leave the testbed). Only a
    /// live run changes; returns whether it did.
    pub async fn finish_vm(
        &self,
        id: i64,
        state: VmState,
        fault: Option<Fault>,
        reason: Option<&str>,
        serial_log: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            // A reason noted while the run was live (a refused takeover of a shared service,
            // `note_vm_reason`) stays first.
            "UPDATE vm_runs SET state = $2,
                    reason = CASE WHEN reason IS NULL THEN $3 WHEN $3 IS NULL THEN reason ELSE reason || '; ' || $3 END,
                    serial_log = coalesce($4, serial_log), fault = $5,
                    token_used_up = true, finished_at = now()
             WHERE id = $1 AND state IN ('booting', 'joined')",
        )
        .bind(id)
        .bind(state)
        .bind(reason)
        .bind(serial_log)
        .bind(fault)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM testbed_services WHERE owner_vm = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Notes why a live run will fail before it ends (the guest API refused to let its slice
    /// take over a shared service); the first note stays, and [`Store::finish_vm`] keeps it
    /// before its own reason. False if the run is not live or has a note already.
    pub async fn note_vm_reason(&self, id: i64, reason: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE vm_runs SET reason = $2
              WHERE id = $1 AND state IN ('booting', 'joined') AND reason IS NULL",
        )
        .bind(id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the serial log path of a VM (kept after it ends).
    pub async fn set_serial_log(&self, id: i64, path: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE vm_runs SET serial_log = $2 WHERE id = $1")
            .bind(id)
            .bind(path)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends a chunk of a guest's log unless the VM's log would exceed `max_bytes`;
    /// returns whether it was stored.
    pub async fn add_log(&self, id: i64, chunk: &str, max_bytes: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO vm_logs (vm_id, chunk)
             SELECT $1, $2
              WHERE (SELECT coalesce(sum(octet_length(chunk)), 0) FROM vm_logs WHERE vm_id = $1)
                    + octet_length($2) <= $3",
        )
        .bind(id)
        .bind(chunk)
        .bind(max_bytes)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// How many services a VM has registered in its slice.
    pub async fn vm_service_count(&self, id: i64) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM testbed_services WHERE owner_vm = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Ends every live run whose deadline passed more than `grace` ago (its `vm run` is gone:
    /// killed, or its machine down): `timed_out`, the product's fault if it had joined, the
    /// infrastructure's if not; its token used up, its slice's services out of the testbed.
    /// Returns the names of the runs it ended.
    pub async fn end_expired_runs(
        &self,
        grace: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ended: Vec<(i64, String)> = sqlx::query_as(
            "UPDATE vm_runs
                SET state = 'timed_out',
                    fault = CASE WHEN state = 'joined' THEN 'product' ELSE 'infrastructure' END,
                    reason = 'no result by the deadline, and no one watching the run: ended by the orchestrator',
                    token_used_up = true, finished_at = now()
              WHERE state IN ('booting', 'joined')
                AND deadline < now() - make_interval(secs => $1)
          RETURNING id, name",
        )
        .bind(grace.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<i64> = ended.iter().map(|r| r.0).collect();
        sqlx::query("DELETE FROM testbed_services WHERE owner_vm = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ended.into_iter().map(|r| r.1).collect())
    }

    /// A guest's log, in the order received.
    pub async fn vm_log(&self, id: i64) -> Result<String, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT chunk FROM vm_logs WHERE vm_id = $1 ORDER BY seq")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// What the VMs named `names` left: each one's host, serial log path, results (in the
    /// order reported) and harness log, in one round trip. Unknown names are left out.
    pub async fn vm_evidence(&self, names: &[String]) -> Result<Vec<VmEvidence>, StoreError> {
        type Row = (
            String,
            String,
            Option<String>,
            Json<Vec<(String, String, String, f64, String)>>,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT v.name, v.host, v.serial_log,
                    coalesce((SELECT json_agg(json_build_array(r.suite, r.name, r.status, r.seconds, r.output)
                                ORDER BY r.reported_at, r.suite, r.name)
                                FROM vm_results r WHERE r.vm_id = v.id), '[]'),
                    coalesce((SELECT string_agg(l.chunk, '' ORDER BY l.seq)
                                FROM vm_logs l WHERE l.vm_id = v.id), '')
               FROM vm_runs v WHERE v.name = ANY($1)",
        )
        .bind(names)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, host, serial_log, results, log)| VmEvidence {
                name,
                host,
                serial_log,
                results: results.0,
                log,
            })
            .collect())
    }

    /// A VM's results in the order reported.
    pub async fn vm_results(&self, id: i64) -> Result<Vec<ResultRow>, StoreError> {
        let rows: Vec<(String, String, TestStatus, f64, String)> = sqlx::query_as(
            "SELECT suite, name, status, seconds, output FROM vm_results WHERE vm_id = $1
             ORDER BY reported_at, suite, name",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ResultRow {
                suite: r.0,
                name: r.1,
                status: r.2,
                seconds: r.3,
                output: r.4,
            })
            .collect())
    }

    /// Registers a service in a slice (or, with `slice = None`, a shared one). A slice cannot
    /// register a name a shared service has.
    pub async fn register_service(
        &self,
        name: &str,
        node_type: &str,
        endpoint: &str,
        slice: Option<&str>,
        owner_vm: Option<i64>,
    ) -> Result<i64, RegisterError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        if slice.is_some() {
            let shared: Option<(String, String)> = sqlx::query_as(
                "SELECT name, endpoint FROM testbed_services WHERE slice IS NULL AND (name = $1 OR endpoint = $2)
                 ORDER BY (name = $1) DESC, id LIMIT 1",
            )
            .bind(name)
            .bind(endpoint)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            if let Some((shared_name, shared_endpoint)) = shared {
                return Err(RegisterError::Shared {
                    name: name.to_owned(),
                    endpoint: endpoint.to_owned(),
                    shared_name,
                    shared_endpoint,
                });
            }
        }
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO testbed_services (name, node_type, endpoint, slice, owner_vm)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(name)
        .bind(node_type)
        .bind(endpoint)
        .bind(slice)
        .bind(owner_vm)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(id)
    }

    /// The services a slice sees: the shared ones and its own (all of them with `None`).
    pub async fn services(&self, slice: Option<&str>) -> Result<Vec<ServiceRow>, StoreError> {
        type Row = (
            i64,
            String,
            String,
            String,
            Option<String>,
            Option<i64>,
            bool,
            Option<String>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, node_type, endpoint, slice, owner_vm, healthy, health_detail, last_check
             FROM testbed_services
             WHERE $1::text IS NULL OR slice IS NULL OR slice = $1
             ORDER BY slice NULLS FIRST, name, id",
        )
        .bind(slice)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ServiceRow {
                id: r.0,
                name: r.1,
                node_type: r.2,
                endpoint: r.3,
                slice: r.4,
                owner_vm: r.5,
                healthy: r.6,
                health_detail: r.7,
                last_check: r.8,
            })
            .collect())
    }

    /// Moves a shared service to another endpoint (a restarted shared service listening
    /// elsewhere); its health is unknown until the next check.
    pub async fn set_service_endpoint(&self, id: i64, endpoint: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE testbed_services SET endpoint = $2, health_detail = NULL, last_check = NULL
              WHERE id = $1 AND slice IS NULL",
        )
        .bind(id)
        .bind(endpoint)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a health check; returns whether the health changed.
    pub async fn set_health(
        &self,
        id: i64,
        healthy: bool,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let before: Option<(bool,)> =
            sqlx::query_as("SELECT healthy FROM testbed_services WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        sqlx::query(
            "UPDATE testbed_services SET healthy = $2, health_detail = $3, last_check = now() WHERE id = $1",
        )
        .bind(id)
        .bind(healthy)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(before.is_some_and(|b| b.0 != healthy))
    }
}
