//! Patches as operations see them: resolved from a file or the store, expanded into the
//! targets they need an image for.

use std::path::Path;

use serde_json::{Value, json};

use super::{Context, OpError, Page, PageAsk};
use crate::patch::PatchRecord;
use crate::store::{PatchRow, PatchState};

/// A stored revision as lists show it.
pub fn summary(row: &PatchRow) -> Value {
    json!({
        "patch_id": row.patch_id,
        "revision": row.revision,
        "state": row.state,
        "title": row.record.title,
        "release": row.record.release,
        "release_shown": row.record.release_shown(),
        "platforms": row.record.platforms,
        "node_types": row.record.node_types,
        "submitter": row.record.submitter,
        "tracker_status": row.record.status,
        "submitted_at": row.submitted_at,
        "superseded_by": row.superseded_by,
        "content_sha256": row.content_sha256,
    })
}

/// Which patches a list shows.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PatchFilter {
    /// Only revisions in this state (submitted, recorded, superseded).
    #[param(value_type = Option<String>)]
    pub state: Option<PatchState>,
    /// Only patches of this release (`3.2`, `gLite 3.2`).
    pub release: Option<String>,
    /// Every revision, superseded ones included (without `state`).
    #[serde(default)]
    pub all_revisions: bool,
}

/// One page of stored revisions (current ones unless the filter asks for more).
pub async fn list(ctx: &Context, filter: &PatchFilter, page: PageAsk) -> Result<Page, OpError> {
    let release = match &filter.release {
        Some(r) => Some(
            ctx.catalogue()
                .release(r)
                .map(|r| r.name.clone())
                .ok_or_else(|| OpError::Refused(format!("unknown release `{r}`")))?,
        ),
        None => None,
    };
    let current_only = filter.state.is_none() && !filter.all_revisions;
    let (limit, offset) = page.bounds();
    // A cursor is `ID.REVISION` of the last item seen.
    let after = page.after_key("patches", |a| {
        let (id, rev) = a.split_once('.')?;
        Some((id.parse::<i64>().ok()?, rev.parse::<i32>().ok()?))
    })?;
    // One row past the page says whether another page follows.
    let (mut rows, total) = ctx
        .store()
        .await?
        .list_patches_page(
            filter.state,
            release.as_deref(),
            current_only,
            limit + 1,
            offset,
            after,
        )
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let last = rows
        .last()
        .map(|r| format!("{}.{}", r.patch_id, r.revision));
    Ok(Page::keyed(
        rows.iter().map(summary).collect(),
        total,
        limit,
        offset,
        more,
        last,
        after.is_some(),
    ))
}

/// Resolves `spec`: a patch record file (with `patch_id` choosing among several records),
/// or a stored patch `ID` (newest revision) or `ID@REVISION`.
pub async fn resolve(
    ctx: &Context,
    spec: &str,
    patch_id: Option<u64>,
) -> Result<PatchRecord, OpError> {
    let path = Path::new(spec);
    if path.exists() {
        let loaded = crate::ingest::load_files(&[path.to_owned()], ctx.catalogue(), || {});
        if !loaded.errors.is_empty() {
            let lines: Vec<String> = loaded.errors.iter().map(|d| d.to_string()).collect();
            return Err(OpError::Refused(lines.join("\n")));
        }
        let mut records: Vec<PatchRecord> = loaded.records.into_iter().map(|r| r.record).collect();
        if let Some(id) = patch_id {
            records.retain(|r| r.id == id);
        }
        return match records.len() {
            1 => Ok(records.remove(0)),
            0 => Err(OpError::Refused(format!(
                "{spec}: no record with id {:?}",
                patch_id.unwrap_or(0)
            ))),
            n => Err(OpError::Refused(format!(
                "{spec} holds {n} records ({}); choose one with --patch-id",
                records
                    .iter()
                    .map(|r| r.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        };
    }
    let (id, rev) = match spec.split_once('@') {
        Some((i, r)) => (i, Some(r)),
        None => (spec, None),
    };
    let Ok(id) = id.parse::<u64>() else {
        return Err(OpError::Refused(format!(
            "--patch {spec:?} is neither a file nor a patch number (ID or ID@REVISION)"
        )));
    };
    let rev = match rev.map(str::parse::<u32>) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(_)) => {
            return Err(OpError::Refused(format!(
                "--patch {spec:?}: the revision is not a number"
            )));
        }
    };
    match ctx.store().await?.get_patch(id, rev).await? {
        Some(row) => Ok(row.record),
        None => Err(OpError::Refused(format!("patch {spec} is not stored"))),
    }
}

/// One image a patch needs: its release on one platform for one node type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub release: String,
    pub platform: String,
    pub node_type: String,
}

/// Every target of a patch: each combination of its platforms and node types that the
/// catalogue offers, in record order.
pub fn targets(catalogue: &crate::catalogue::Catalogue, p: &PatchRecord) -> Vec<Target> {
    crate::images::patch_targets(catalogue, p)
        .into_iter()
        .map(|(platform, node_type)| Target {
            release: p.release.clone(),
            platform,
            node_type,
        })
        .collect()
}

/// `release/platform/node_type`; a sweep's target of a patch in flight,
/// `release/platform/node_type#IDrREV`, gives its cell's parts.
pub fn split_target(t: &str) -> (&str, &str, &str) {
    let t = t.split('#').next().unwrap_or(t);
    let mut p = t.splitn(3, '/');
    (
        p.next().unwrap_or(""),
        p.next().unwrap_or(""),
        p.next().unwrap_or(""),
    )
}

/// The patch revision a sweep's target names (`release/platform/node_type#IDrREV`).
pub fn target_patch(t: &str) -> Option<(u64, u32)> {
    let (_, p) = t.split_once('#')?;
    let (id, rev) = p.split_once('r')?;
    Some((id.parse().ok()?, rev.parse().ok()?))
}

/// The target string of a (release, platform, node type).
pub fn target_key(release: &str, platform: &str, node_type: &str) -> String {
    format!("{release}/{platform}/{node_type}")
}
