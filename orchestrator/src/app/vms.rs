//! VM operations: find the image a VM boots, and run one VM (push, boot, wait, tear down)
//! recording it in the store.

use std::path::{Path, PathBuf};

use super::{AppError, Context, OpError};
use crate::vmrun::{self, VmOutcome, VmRequest, VmRunError};

/// The image file `spec` names: a file, or the ext4 artefact of a built image by a prefix
/// of its digest; with the image's record when Certo built it (node type, patch).
pub fn find_image(
    ctx: &Context,
    spec: &str,
) -> Result<(PathBuf, Option<certo_imager::ImageRecord>), OpError> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        // An artefact of Certo's image cache carries its record beside it.
        let record = p
            .parent()
            .map(|d| d.join("image.json"))
            .and_then(|j| std::fs::read(j).ok())
            .and_then(|b| serde_json::from_slice::<certo_imager::ImageRecord>(&b).ok());
        return Ok((p, record));
    }
    let cache = certo_imager::Store::open(&ctx.data_dir().join("imager"))
        .map_err(|e| OpError::App(AppError::Imager(e)))?;
    let found: Vec<_> = cache
        .images()
        .map_err(|e| OpError::App(AppError::Imager(e)))?
        .into_iter()
        .filter(|i| !spec.is_empty() && i.digest.starts_with(spec))
        .collect();
    match found.as_slice() {
        [one] => match one.ext4() {
            Some(art) => Ok((art.path.clone(), Some(one.clone()))),
            None => Err(OpError::Refused(format!(
                "image {} has no ext4 artefact",
                one.digest
            ))),
        },
        [] => Err(OpError::Refused(format!(
            "--image {spec:?} is neither a file nor a built image's digest"
        ))),
        many => Err(OpError::Refused(format!(
            "--image {spec:?} matches {} images; give more of the digest",
            many.len()
        ))),
    }
}

/// Runs one VM on the host whose agent is at `agent_url` and records it; progress goes to
/// `say`. The sender's index cache is the data directory's unless the request names one.
pub async fn run(
    ctx: &Context,
    agent_url: &str,
    token: &str,
    req: &VmRequest<'_>,
    say: &(dyn Fn(&str) + Sync),
) -> Result<VmOutcome, VmRunError> {
    let store = ctx.store().await.map_err(|e| match e {
        AppError::Store(s) => VmRunError::Store(s),
        other => VmRunError::Refused(other.to_string()),
    })?;
    let cache: PathBuf = ctx.data_dir().join("index-cache");
    let req = VmRequest {
        index_cache: Some(req.index_cache.unwrap_or(Path::new(&cache))),
        ..req.clone()
    };
    vmrun::run(store, agent_url, token, &req, say).await
}
