//! One stored patch revision shown whole: what `certo show` prints and the API's
//! `/api/v1/patches/{id}` answers.

use serde_json::{Value, json};

use super::{OpError, runs};
use crate::store::Store;
use crate::store::engine::{RunRow, StepDetail};

/// Everything about one stored revision (the newest unless `revision`): its record, its
/// revisions and history, its latest run's verdict (or how far it got) and timeline.
pub async fn patch(store: &Store, id: u64, revision: Option<u32>) -> Result<Value, OpError> {
    Ok(patch_and_steps(store, id, revision).await?.0)
}

/// [`patch`], and the steps of its latest run as read (the dashboard's page needs their
/// outcomes too, without reading them again).
pub async fn patch_and_steps(
    store: &Store,
    id: u64,
    revision: Option<u32>,
) -> Result<(Value, Option<RunRow>, Vec<StepDetail>), OpError> {
    // One round trip: the revision with its revisions, history, owner and newest run, and
    // that run's verdict and steps.
    let Some(whole) = store.patch_whole(id, revision).await? else {
        return Err(OpError::NotFound(match revision {
            Some(r) => format!("patch {id} revision {r} is not stored"),
            None => format!("patch {id} is not stored"),
        }));
    };
    let row = whole.row;
    let revisions: Vec<Value> = whole
        .revisions
        .iter()
        .map(|(r, s)| json!({"revision": r, "state": s}))
        .collect();
    let events = whole.events;
    let run = whole.run;
    let (run_view, steps, run_id, run_state) = match &run {
        Some(r) => {
            let steps = whole.steps;
            (
                Some(runs::view_of(r, whole.verdict, &steps)),
                steps,
                Some(r.id),
                Some(r.state.clone()),
            )
        }
        None => (None, Vec::new(), None, None),
    };
    let timeline = runs::timeline_of(
        run.as_ref().map(|r| r.targets.as_slice()).unwrap_or(&[]),
        steps.clone(),
    );
    let v = json!({
        "patch_id": row.patch_id,
        "revision": row.revision,
        "state": row.state,
        "content_sha256": row.content_sha256,
        "submitted_at": row.submitted_at,
        "superseded_by": row.superseded_by,
        "source_file": row.source_file,
        "source_format": row.source_format,
        "owner": whole.owner,
        "record": row.record,
        "revisions": revisions,
        "events": events,
        "run": run_view,
        "run_id": run_id,
        "run_state": run_state,
        "timeline": timeline,
    });
    Ok((v, run, steps))
}
