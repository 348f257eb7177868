//! Image operations: plan and build the image of one target, recording what happened in
//! the store (the built image and its layers, or the failure as evidence).

use certo_imager::{
    BuildError, Built, Customization, Event, Format, ImageRequest, Imager, LayerKind,
};

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

/// The image request of a release's platform without a node type, for an image of its
/// core or base layers ([`Customization::top`]); refused when the catalogue does not have
/// the release on the platform.
pub fn layers_request(
    ctx: &Context,
    release: &str,
    platform: &str,
) -> Result<ImageRequest, OpError> {
    crate::images::layers_request(ctx.catalogue(), release, platform)
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
    build_custom(ctx, req, &Customization::default(), formats, progress).await
}

/// [`build`] with a person's customization: the layers up to `custom.top`, and a custom
/// layer (extra packages, root's password) on top when it asks for one.
///
/// The image and every layer, the custom one included, are recorded like any other.
pub async fn build_custom(
    ctx: &Context,
    req: &ImageRequest,
    custom: &Customization,
    formats: &[Format],
    progress: impl Fn(Event) + Send + 'static,
) -> Result<Result<Built, BuildError>, AppError> {
    let store = ctx.store().await?;
    let imager = ctx.imager()?;
    let result = {
        let imager = imager.clone();
        let req = req.clone();
        let custom = custom.clone();
        let formats = formats.to_vec();
        tokio::task::spawn_blocking(move || imager.build_custom(&req, &custom, &formats, &progress))
            .await?
    };
    record(store, &imager, req, custom, &result).await?;
    Ok(result)
}

async fn record(
    store: &crate::store::Store,
    imager: &Imager,
    req: &ImageRequest,
    custom: &Customization,
    result: &Result<Built, BuildError>,
) -> Result<(), AppError> {
    match result {
        Ok(built) => store.record_build(built).await?,
        Err(e) => {
            // Lower layers built before the failure are cache entries: record them.
            if let Ok(plans) = imager.plan_custom(req, custom) {
                let layers: Vec<_> = plans
                    .iter()
                    .filter(|p| p.kind != LayerKind::Custom)
                    .filter_map(|p| imager.store().layer(&p.digest).ok().flatten())
                    .collect();
                store.record_layers(&layers).await?;
            }
            store.record_build_failure(req, e).await?;
        }
    }
    Ok(())
}
