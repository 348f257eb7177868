//! Image operations: plan and build the image of one target, recording what happened in
//! the store (the built image and its layers, or the failure as evidence).

use certo_imager::{BuildError, Built, Event, Format, ImageRequest, Imager};

use super::{AppError, Context, OpError};
use crate::patch::PatchRecord;

/// The image request of one target, with an optional patch on top; refused when the
/// catalogue does not have the target or the patch does not target it.
pub fn request(
    ctx: &Context,
    release: &str,
    platform: &str,
    node_type: &str,
    patch: Option<&PatchRecord>,
) -> Result<ImageRequest, OpError> {
    crate::images::request(ctx.catalogue(), release, platform, node_type, patch)
        .map_err(|e| OpError::Refused(e.to_string()))
}

/// Builds (or finds in the cache) the image of `req`, reporting each step to `progress`,
/// and records the result or the failure. The outer error is Certo's; the inner one is
/// the build's, with its phase saying whose fault it is.
pub async fn build(
    ctx: &Context,
    req: &ImageRequest,
    formats: &[Format],
    progress: impl Fn(Event) + Send + 'static,
) -> Result<Result<Built, BuildError>, AppError> {
    let store = ctx.store().await?;
    let imager = ctx.imager()?;
    let result = {
        let imager = imager.clone();
        let req = req.clone();
        let formats = formats.to_vec();
        tokio::task::spawn_blocking(move || imager.build(&req, &formats, &progress)).await?
    };
    record(store, &imager, req, &result).await?;
    Ok(result)
}

async fn record(
    store: &crate::store::Store,
    imager: &Imager,
    req: &ImageRequest,
    result: &Result<Built, BuildError>,
) -> Result<(), AppError> {
    match result {
        Ok(built) => store.record_build(built).await?,
        Err(e) => {
            // Lower layers built before the failure are cache entries: record them.
            if let Ok(plans) = imager.plan(req) {
                let layers: Vec<_> = plans
                    .iter()
                    .filter_map(|p| imager.store().layer(&p.digest).ok().flatten())
                    .collect();
                store.record_layers(&layers).await?;
            }
            store.record_build_failure(req, e).await?;
        }
    }
    Ok(())
}
