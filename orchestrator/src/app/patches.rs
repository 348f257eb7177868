//! Patches as operations see them: resolved from a file or the store, expanded into the
//! targets they need an image for.

use std::path::Path;

use super::{Context, OpError};
use crate::patch::PatchRecord;

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
