//! Storing and reading patch records.
//!
//! Submission rules: the same patch id and revision with the same content is
//! a no-op; the same revision with other content is refused; a higher revision
//! supersedes the current one; an older revision than the stored one is
//! refused. A batch is stored in one transaction, or not at all.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;

use super::{Store, StoreError};
use crate::patch::{Diagnostic, LoadedRecord, PatchRecord};

/// Certo's lifecycle state of a stored patch revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchState {
    /// Stored and current; waiting for certification.
    Submitted,
    /// Stored and current, shown, but not for certification: the tracker's status says it is
    /// not ready for it yet, already past it, rejected or obsolete.
    Recorded,
    /// A higher revision of the same patch replaced it.
    Superseded,
}

impl PatchState {
    pub const ALL: &[PatchState] = &[
        PatchState::Submitted,
        PatchState::Recorded,
        PatchState::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PatchState::Submitted => "submitted",
            PatchState::Recorded => "recorded",
            PatchState::Superseded => "superseded",
        }
    }
}

impl fmt::Display for PatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PatchState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PatchState::ALL
            .iter()
            .copied()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let all: Vec<&str> = PatchState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state `{s}` (expected one of: {})", all.join(", "))
            })
    }
}

/// What submission did with one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum SubmitOutcome {
    /// Stored as a new revision; `supersedes` names the revision it replaced.
    Stored { supersedes: Option<u32> },
    /// Already stored with the same content: nothing changed.
    Unchanged,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitReport {
    pub patch_id: u64,
    pub revision: u32,
    pub file: String,
    #[serde(flatten)]
    pub outcome: SubmitOutcome,
}

/// One stored revision, as listed and shown.
#[derive(Debug, Clone, Serialize)]
pub struct PatchRow {
    pub patch_id: u64,
    pub revision: u32,
    pub state: PatchState,
    pub content_sha256: String,
    pub submitted_at: DateTime<Utc>,
    pub superseded_by: Option<u32>,
    pub source_file: String,
    pub source_format: String,
    pub record: PatchRecord,
}

/// A revision with what its page shows around it ([`Store::patch_whole`]).
#[derive(Debug, Clone)]
pub struct PatchWhole {
    pub row: PatchRow,
    /// Every revision of the patch and its state, oldest first.
    pub revisions: Vec<(u32, PatchState)>,
    /// The audit trail, all revisions, in order.
    pub events: Vec<PatchEvent>,
    pub owner: Option<String>,
    /// The newest run of this revision, its verdict's detail once decided, and its steps
    /// (as [`Store::run_timeline`] reads them).
    pub run: Option<super::engine::RunRow>,
    pub verdict: Option<serde_json::Value>,
    pub steps: Vec<super::engine::StepDetail>,
}

/// What a patch page is made of ([`Store::patch_stamp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchStamp {
    pub stamp: String,
    /// No run, or the newest run has finished: the page changes only with the stamp.
    pub settled: bool,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchEvent {
    pub at: DateTime<Utc>,
    pub revision: u32,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// A row of the bulk insert: the record plus what the store adds.
#[derive(Serialize)]
struct NewRow<'a> {
    record: &'a PatchRecord,
    sha: &'a str,
    file: &'a str,
    format: &'a str,
    state: PatchState,
    superseded_by: Option<u32>,
}

type RowTuple = (
    i64,
    i32,
    String,
    String,
    DateTime<Utc>,
    Option<i32>,
    String,
    String,
    Json<PatchRecord>,
);

fn row_from(t: RowTuple) -> Result<PatchRow, StoreError> {
    let (patch_id, revision, state, sha, at, superseded_by, file, format, Json(record)) = t;
    Ok(PatchRow {
        patch_id: u64::try_from(patch_id)
            .map_err(|_| StoreError::Corrupt(format!("negative patch id {patch_id}")))?,
        revision: u32::try_from(revision)
            .map_err(|_| StoreError::Corrupt(format!("negative revision {revision}")))?,
        state: state.parse().map_err(StoreError::Corrupt)?,
        content_sha256: sha,
        submitted_at: at,
        superseded_by: superseded_by.and_then(|r| u32::try_from(r).ok()),
        source_file: file,
        source_format: format,
        record,
    })
}

const ROW_COLUMNS: &str = "patch_id, revision, state, content_sha256, submitted_at, superseded_by, source_file, source_format, record";

/// Why a batch was refused by the store.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Records that conflict with what is stored; nothing was stored.
    #[error("{} record(s) conflict with the store; nothing was stored", .0.len())]
    Conflicts(Vec<Diagnostic>),
    /// Records of patches the submitter may not add revisions to; nothing was stored.
    #[error("{} record(s) are of patches that are not the submitter's; nothing was stored", .0.len())]
    NotYours(Vec<Diagnostic>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SubmitError {
    fn from(e: sqlx::Error) -> Self {
        SubmitError::Store(StoreError::Db(e))
    }
}

fn conflict(rec: &LoadedRecord, field: &str, message: String) -> Diagnostic {
    let mut d = Diagnostic::new(rec.pos, field, message);
    d.file = rec.file.clone();
    d
}

/// Who submits through the API: a certifier may add revisions only to patches they own
/// (or that nobody owns yet, which they then own); an admin to every patch.
#[derive(Debug, Clone, Copy)]
pub struct Submitter<'a> {
    pub user: &'a str,
    pub admin: bool,
}

impl Store {
    /// Stores a batch of validated records in one transaction (on the orchestrator's own
    /// machine: no owner is checked or recorded).
    pub async fn submit(&self, records: &[LoadedRecord]) -> Result<Vec<SubmitReport>, SubmitError> {
        self.submit_as(records, None).await
    }

    /// Stores a batch of validated records in one transaction, for `submitter` when it
    /// comes through the API: refused whole when a record is of another user's patch.
    pub async fn submit_as(
        &self,
        records: &[LoadedRecord],
        submitter: Option<Submitter<'_>>,
    ) -> Result<Vec<SubmitReport>, SubmitError> {
        let mut tx = self.pool.begin().await?;
        let mut ids: Vec<i64> = records.iter().map(|r| r.record.id as i64).collect();
        ids.sort_unstable();
        ids.dedup();
        // Serialise submissions of the same patches (ordered, so no deadlock).
        sqlx::query(
            "SELECT pg_advisory_xact_lock(6871, (s.id % 2147483647)::int) FROM (SELECT DISTINCT id FROM unnest($1::bigint[]) AS id ORDER BY id) s",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        if let Some(who) = submitter {
            let owners: Vec<(i64, String)> =
                sqlx::query_as("SELECT patch_id, owner FROM patch_owners WHERE patch_id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await?;
            let unowned_stored: Vec<(i64,)> = sqlx::query_as(
                "SELECT DISTINCT patch_id FROM patches WHERE patch_id = ANY($1)
                 AND patch_id NOT IN (SELECT patch_id FROM patch_owners)",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut refused = Vec::new();
            for rec in records {
                let id = rec.record.id as i64;
                if who.admin {
                    continue;
                }
                if let Some((_, owner)) = owners.iter().find(|(p, o)| *p == id && o != who.user) {
                    refused.push(conflict(
                        rec,
                        "id",
                        format!("patch {id} belongs to {owner}: only they or an admin may submit its revisions"),
                    ));
                } else if unowned_stored.iter().any(|(p,)| *p == id) {
                    refused.push(conflict(
                        rec,
                        "id",
                        format!("patch {id} was stored on the orchestrator's machine and has no owner: only an admin may submit its revisions"),
                    ));
                }
            }
            if !refused.is_empty() {
                tx.rollback().await?;
                return Err(SubmitError::NotYours(refused));
            }
            sqlx::query(
                "INSERT INTO patch_owners (patch_id, owner)
                 SELECT id, $2 FROM unnest($1::bigint[]) AS id
                 WHERE NOT EXISTS (SELECT 1 FROM patches p WHERE p.patch_id = id)
                 ON CONFLICT (patch_id) DO NOTHING",
            )
            .bind(&ids)
            .bind(who.user)
            .execute(&mut *tx)
            .await?;
        }
        let stored: Vec<(i64, i32, String, String)> = sqlx::query_as(
            "SELECT patch_id, revision, content_sha256, state FROM patches WHERE patch_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        // patch id -> revision -> (digest, where it came from in this batch if any)
        let mut known: HashMap<u64, Vec<(u32, String, Option<usize>)>> = HashMap::new();
        let mut current: HashMap<u64, u32> = HashMap::new();
        for (id, rev, sha, state) in stored {
            known
                .entry(id as u64)
                .or_default()
                .push((rev as u32, sha, None));
            if state != "superseded" {
                current.insert(id as u64, rev as u32);
            }
        }

        // Decide, in (id, revision) order, what each record does.
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| (records[i].record.id, records[i].record.revision, i));
        let mut outcomes: Vec<Option<SubmitOutcome>> = vec![None; records.len()];
        let mut conflicts = Vec::new();
        for &i in &order {
            let rec = &records[i];
            let (id, rev) = (rec.record.id, rec.record.revision);
            let revs = known.entry(id).or_default();
            if let Some((_, sha, from_batch)) = revs.iter().find(|(r, _, _)| *r == rev) {
                if *sha == rec.digest {
                    outcomes[i] = Some(SubmitOutcome::Unchanged);
                } else {
                    let place = match from_batch {
                        Some(j) => format!("in {}:{}", records[*j].file, records[*j].pos.line),
                        None => "in the store".to_string(),
                    };
                    conflicts.push(conflict(
                        rec,
                        "revision",
                        format!(
                            "patch {id} revision {rev} is already submitted with different content ({place}); submit the change as revision {}",
                            revs.iter().map(|(r, _, _)| *r).max().unwrap_or(rev) + 1
                        ),
                    ));
                }
                continue;
            }
            let newest = revs.iter().map(|(r, _, _)| *r).max();
            if let Some(newest) = newest.filter(|n| *n > rev) {
                conflicts.push(conflict(
                    rec,
                    "revision",
                    format!("patch {id} revision {rev} is older than its stored revision {newest}; an older revision cannot be added"),
                ));
                continue;
            }
            revs.push((rev, rec.digest.clone(), Some(i)));
            let supersedes = current.insert(id, rev);
            outcomes[i] = Some(SubmitOutcome::Stored { supersedes });
        }
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Err(SubmitError::Conflicts(conflicts));
        }

        // Rows already stored that a new revision supersedes.
        let mut superseded_ids = Vec::new();
        let mut superseded_revs = Vec::new();
        let mut superseded_by = Vec::new();
        // New rows: superseded at once when a later revision is in the same batch.
        let mut rows = Vec::new();
        for &i in &order {
            let rec = &records[i];
            let Some(SubmitOutcome::Stored { supersedes }) = outcomes[i] else {
                continue;
            };
            let id = rec.record.id;
            let in_batch_successor = order
                .iter()
                .filter(|&&j| {
                    records[j].record.id == id
                        && matches!(outcomes[j], Some(SubmitOutcome::Stored { .. }))
                })
                .map(|&j| records[j].record.revision)
                .filter(|r| *r > rec.record.revision)
                .min();
            if let Some(old) = supersedes {
                let old_in_batch = order.iter().any(|&j| {
                    records[j].record.id == id
                        && records[j].record.revision == old
                        && matches!(outcomes[j], Some(SubmitOutcome::Stored { .. }))
                });
                if !old_in_batch {
                    superseded_ids.push(id as i64);
                    superseded_revs.push(old as i32);
                    superseded_by.push(rec.record.revision as i32);
                }
            }
            rows.push(NewRow {
                record: &rec.record,
                sha: &rec.digest,
                file: &rec.file,
                format: rec.format.as_str(),
                state: if in_batch_successor.is_some() {
                    PatchState::Superseded
                } else if rec.wants_certification() {
                    PatchState::Submitted
                } else {
                    PatchState::Recorded
                },
                superseded_by: in_batch_successor,
            });
        }

        if !superseded_ids.is_empty() {
            sqlx::query(
                "WITH u AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::int[]) AS u(id, old_rev, new_rev)),
                 upd AS (UPDATE patches p SET state = 'superseded', superseded_at = now(), superseded_by = u.new_rev
                         FROM u WHERE p.patch_id = u.id AND p.revision = u.old_rev RETURNING p.patch_id, p.revision, u.new_rev)
                 INSERT INTO patch_events (patch_id, revision, kind, detail)
                 SELECT patch_id, revision, 'superseded', jsonb_build_object('by_revision', new_rev) FROM upd",
            )
            .bind(&superseded_ids)
            .bind(&superseded_revs)
            .bind(&superseded_by)
            .execute(&mut *tx)
            .await?;
        }
        if !rows.is_empty() {
            // One statement stores the whole batch: the rows are encoded once and
            // parsed once by the server; the child rows come from the same JSON.
            let rows = serde_json::to_string(&rows)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode records: {e}")))?;
            sqlx::query(
                "WITH r AS (SELECT value AS r FROM jsonb_array_elements($1::text::jsonb)),
                 p AS (
                   INSERT INTO patches (patch_id, revision, content_sha256, state, title, tracker_status, release,
                                        platforms, node_types, submitter, record, source_file, source_format,
                                        superseded_at, superseded_by)
                   SELECT (r->'record'->>'id')::bigint, (r->'record'->>'revision')::int, r->>'sha', r->>'state',
                          r->'record'->>'title', r->'record'->>'status', r->'record'->>'release',
                          ARRAY(SELECT jsonb_array_elements_text(r->'record'->'platforms')),
                          ARRAY(SELECT jsonb_array_elements_text(r->'record'->'node_types')),
                          r->'record'->>'submitter', r->'record', r->>'file', r->>'format',
                          CASE WHEN r->>'state' = 'superseded' THEN now() END,
                          (r->>'superseded_by')::int
                   FROM r),
                 k AS (
                   INSERT INTO patch_packages (patch_id, revision, position, file_name, name, version, pkg_release,
                                               arch, format, source_kind, source, sha256)
                   SELECT (r->'record'->>'id')::bigint, (r->'record'->>'revision')::int, (p.ord - 1)::int,
                          p.v->>'file', p.v->>'name', p.v->>'version', p.v->>'release', p.v->>'arch', p.v->>'format',
                          p.v->'source'->>'kind', p.v->'source'->>'location', p.v->>'sha256'
                   FROM r, jsonb_array_elements(r->'record'->'packages') WITH ORDINALITY AS p(v, ord)),
                 b AS (
                   INSERT INTO patch_bugs (patch_id, revision, bug_id, title, regression_test)
                   SELECT (r->'record'->>'id')::bigint, (r->'record'->>'revision')::int, (b->>'id')::bigint,
                          b->>'title', b->>'regression_test'
                   FROM r, jsonb_array_elements(r->'record'->'bugs') AS b)
                 INSERT INTO patch_events (patch_id, revision, kind, detail)
                 SELECT (r->'record'->>'id')::bigint, (r->'record'->>'revision')::int, 'submitted',
                        jsonb_build_object('file', r->>'file', 'format', r->>'format', 'content_sha256', r->>'sha')
                 FROM r",
            )
            .bind(rows)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let reports = records
            .iter()
            .zip(outcomes)
            .map(|(rec, outcome)| SubmitReport {
                patch_id: rec.record.id,
                revision: rec.record.revision,
                file: rec.file.clone(),
                outcome: outcome.unwrap_or(SubmitOutcome::Unchanged),
            })
            .collect();
        Ok(reports)
    }

    /// Lists stored revisions, newest patch first, optionally by state and release.
    pub async fn list_patches(
        &self,
        state: Option<PatchState>,
        release: Option<&str>,
    ) -> Result<Vec<PatchRow>, StoreError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM patches
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR release = $2)
             ORDER BY patch_id, revision"
        );
        let rows: Vec<RowTuple> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(state.map(|s| s.as_str()))
            .bind(release)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(row_from).collect()
    }

    /// One page of patch revisions in (id, revision) order, and how many match in all.
    /// `current_only` leaves superseded revisions out.
    pub async fn list_patches_page(
        &self,
        state: Option<PatchState>,
        release: Option<&str>,
        current_only: bool,
        limit: i64,
        offset: i64,
        after: Option<(i64, i32)>,
    ) -> Result<(Vec<PatchRow>, i64), StoreError> {
        const FILTER: &str =
            "($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR release = $2)
             AND (NOT $3 OR state <> 'superseded')";
        // The page's keys first (the offset is skipped over the index alone; `after` starts
        // in the index), then only its rows are read whole.
        // With a cursor the index scan starts at it (a condition the plan cannot skip for
        // a NULL would make it read from the start).
        let start = if after.is_some() {
            "AND (patch_id, revision) > ($6, $7::int)"
        } else {
            "AND $6::bigint IS NULL AND $7::int IS NULL"
        };
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM patches WHERE (patch_id, revision) IN (
                 SELECT patch_id, revision FROM patches WHERE {FILTER} {start}
                  ORDER BY patch_id, revision LIMIT $4 OFFSET $5)
             ORDER BY patch_id, revision"
        );
        let rows: Vec<RowTuple> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(state.map(|s| s.as_str()))
            .bind(release)
            .bind(current_only)
            .bind(limit)
            .bind(offset)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .fetch_all(&self.pool)
            .await?;
        let total: (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM patches WHERE {FILTER}"
        )))
        .bind(state.map(|s| s.as_str()))
        .bind(release)
        .bind(current_only)
        .fetch_one(&self.pool)
        .await?;
        Ok((
            rows.into_iter().map(row_from).collect::<Result<_, _>>()?,
            total.0,
        ))
    }

    /// One revision of a patch: the given one, or the newest.
    pub async fn get_patch(
        &self,
        id: u64,
        revision: Option<u32>,
    ) -> Result<Option<PatchRow>, StoreError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM patches WHERE patch_id = $1 AND ($2::int IS NULL OR revision = $2)
             ORDER BY revision DESC LIMIT 1"
        );
        let row: Option<RowTuple> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id as i64)
            .bind(revision.map(|r| r as i32))
            .fetch_optional(&self.pool)
            .await?;
        row.map(row_from).transpose()
    }

    /// One revision (the newest unless `revision`) with what its page shows around it, in
    /// one round trip: every revision's state, the audit trail, the owner, and the newest
    /// run of that revision with its verdict and steps.
    pub async fn patch_whole(
        &self,
        id: u64,
        revision: Option<u32>,
    ) -> Result<Option<PatchWhole>, StoreError> {
        type Extra = (
            Json<Vec<(i32, String)>>,
            Json<Vec<PatchEvent>>,
            Option<String>,
            Option<Json<super::engine::RunRow>>,
            Option<serde_json::Value>,
            Json<Vec<super::engine::StepDetail>>,
        );
        let columns: Vec<String> = ROW_COLUMNS.split(", ").map(|c| format!("p.{c}")).collect();
        let sql = format!(
            "SELECT {},
                    (SELECT json_agg(json_build_array(q.revision, q.state) ORDER BY q.revision)
                       FROM patches q WHERE q.patch_id = p.patch_id),
                    coalesce((SELECT json_agg(json_build_object('at', e.at, 'revision', e.revision,
                                'kind', e.kind, 'detail', e.detail) ORDER BY e.id)
                       FROM patch_events e WHERE e.patch_id = p.patch_id), '[]'),
                    (SELECT o.owner FROM patch_owners o WHERE o.patch_id = p.patch_id),
                    CASE WHEN r.id IS NULL THEN NULL ELSE to_json(r) END,
                    (SELECT v.detail FROM verdicts v WHERE v.run_id = r.id),
                    coalesce((SELECT json_agg(json_build_object(
                        'id', s.id, 'target', s.target, 'name', s.name, 'state', s.state,
                        'attempt', s.attempt, 'epoch', s.epoch, 'host', s.host,
                        'started_at', s.started_at, 'finished_at', s.finished_at,
                        'outcome', s.outcome) ORDER BY s.id)
                      FROM engine_steps s WHERE s.run_id = r.id), '[]')
               FROM patches p
               LEFT JOIN LATERAL (
                    SELECT x.id, x.workflow, x.patch_id, x.revision, x.state, x.priority,
                           x.cancel_reason, x.targets, x.conflicts, x.created_at, x.finished_at
                      FROM engine_runs x WHERE x.patch_id = p.patch_id AND x.revision = p.revision
                     ORDER BY x.id DESC LIMIT 1) r ON true
              WHERE p.patch_id = $1 AND ($2::int IS NULL OR p.revision = $2)
              ORDER BY p.revision DESC LIMIT 1",
            columns.join(", ")
        );
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id as i64)
            .bind(revision.map(|r| r as i32))
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        use sqlx::Row;
        let t: RowTuple = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
            row.try_get(6)?,
            row.try_get(7)?,
            row.try_get(8)?,
        );
        let extra: Extra = (
            row.try_get(9)?,
            row.try_get(10)?,
            row.try_get(11)?,
            row.try_get(12)?,
            row.try_get(13)?,
            row.try_get(14)?,
        );
        let revisions = extra
            .0
            .0
            .into_iter()
            .map(|(r, s)| Ok((r as u32, s.parse().map_err(StoreError::Corrupt)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(Some(PatchWhole {
            row: row_from(t)?,
            revisions,
            events: extra.1.0,
            owner: extra.2,
            run: extra.3.map(|j| j.0),
            verdict: extra.4,
            steps: extra.5.0,
        }))
    }

    /// What the newest revision's page is made of, as a stamp, with the patch's owner: two
    /// calls that return the same stamp show the same page, as long as it is `settled`
    /// (no run, or the newest run finished). The stamp covers every revision's state, the
    /// audit trail's last entry, the owner, the newest run, its state, end and verdict, and
    /// the newest certified verdict of any patch (what "the last good run" of a target is
    /// taken from). One index lookup per part.
    pub async fn patch_stamp(&self, id: u64) -> Result<Option<PatchStamp>, StoreError> {
        let row: Option<(String, bool, Option<String>)> = sqlx::query_as(
            "SELECT concat_ws('|', p.revision,
                    (SELECT string_agg(q.revision || q.state::text, ',' ORDER BY q.revision)
                       FROM patches q WHERE q.patch_id = p.patch_id),
                    coalesce((SELECT max(e.id) FROM patch_events e
                               WHERE e.patch_id = p.patch_id)::text, '-'),
                    coalesce(o.owner, '-'),
                    coalesce(r.id::text, '-'), coalesce(r.state::text, '-'),
                    coalesce(r.finished_at::text, '-'), (r.cancel_reason IS NULL),
                    coalesce((SELECT v.decided_at FROM verdicts v WHERE v.run_id = r.id)::text, '-'),
                    coalesce((SELECT max(c.decided_at) FROM verdicts c
                               WHERE c.verdict = 'certified')::text, '-')),
                    (r.id IS NULL OR r.state <> 'running'),
                    o.owner
               FROM patches p
               LEFT JOIN patch_owners o ON o.patch_id = p.patch_id
               LEFT JOIN LATERAL (
                    SELECT x.id, x.state, x.finished_at, x.cancel_reason
                      FROM engine_runs x WHERE x.patch_id = p.patch_id AND x.revision = p.revision
                     ORDER BY x.id DESC LIMIT 1) r ON true
              WHERE p.patch_id = $1
              ORDER BY p.revision DESC LIMIT 1",
        )
        .bind(id as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(stamp, settled, owner)| PatchStamp {
            stamp,
            settled,
            owner,
        }))
    }

    /// The patch revisions of the runs still running, with their run ids, oldest run first
    /// (what a new submission is checked against for conflicts): two queries.
    pub async fn patches_in_flight(&self) -> Result<Vec<(i64, PatchRow)>, StoreError> {
        let runs: Vec<(i64, i64, i32)> = sqlx::query_as(
            "SELECT id, patch_id, revision FROM engine_runs
              WHERE state = 'running' AND cancel_reason IS NULL
                AND patch_id IS NOT NULL AND revision IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM patches WHERE (patch_id, revision) IN
               (SELECT patch_id, revision FROM engine_runs
                 WHERE state = 'running' AND cancel_reason IS NULL)"
        );
        let rows: Vec<RowTuple> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        let mut by: HashMap<(u64, u32), PatchRow> = HashMap::new();
        for r in rows {
            let row = row_from(r)?;
            by.insert((row.patch_id, row.revision), row);
        }
        Ok(runs
            .into_iter()
            .filter_map(|(run, p, r)| by.get(&(p as u64, r as u32)).map(|row| (run, row.clone())))
            .collect())
    }

    /// Every revision number of a patch, oldest first.
    pub async fn revisions(&self, id: u64) -> Result<Vec<(u32, PatchState)>, StoreError> {
        let rows: Vec<(i32, String)> = sqlx::query_as(
            "SELECT revision, state FROM patches WHERE patch_id = $1 ORDER BY revision",
        )
        .bind(id as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(r, s)| Ok((r as u32, s.parse().map_err(StoreError::Corrupt)?)))
            .collect()
    }

    /// The audit trail of a patch, all revisions, in order.
    pub async fn events(&self, id: u64) -> Result<Vec<PatchEvent>, StoreError> {
        let rows: Vec<(DateTime<Utc>, i32, String, Json<serde_json::Value>)> = sqlx::query_as(
            "SELECT at, revision, kind, detail FROM patch_events WHERE patch_id = $1 ORDER BY id",
        )
        .bind(id as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(at, revision, kind, Json(detail))| PatchEvent {
                at,
                revision: revision as u32,
                kind,
                detail,
            })
            .collect())
    }
}
