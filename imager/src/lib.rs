//! Certo's image builder: turning a target (release, platform, node type, patch) into
//! layered image artefacts, each layer cached under a digest of its inputs.
//!
//! - [`plan`] turns an [`ImageRequest`] into layers core → base → node type → patch, each
//!   with its [`LayerInputs`] and digest (parent, backend, repository state by content,
//!   pinned package versions, configuration content).
//! - [`builder::Imager`] finds each layer in the cache or builds it on a copy-on-write
//!   overlay of its parents with the real tools ([`backend`]: mmdebstrap/apt-get, dnf), and
//!   publishes it atomically ([`store`]); then exports a reproducible ext4 image ([`export`]).
//!
//! Every path the imager touches inside an image tree after package scripts ran is
//! resolved inside that tree ([`rooted::ImageRoot`]): a link a package planted cannot
//! lead the build out of the image onto the host.
//!
//! It must never know about hosts, placement or transfers: it produces image artefacts and
//! their identities; moving them to hosts belongs to `certo-transfer` and the orchestrator.

pub mod backend;
pub mod builder;
pub mod cmd;
pub mod digest;
pub mod error;
pub mod export;
pub mod mounts;
pub mod password;
pub mod plan;
pub mod repos;
pub mod request;
pub mod rooted;
pub mod siteconf;
pub mod store;
pub mod verify;
pub mod version;

pub use builder::{Built, Event, Format, Imager, LayerOutcome, image_id};
pub use digest::{DigestError, LayerDigest, LayerInputs, LayerKind, ParseDigestError};
pub use error::{BuildError, Phase};
pub use request::{
    ConfigChange, Customization, ImageRequest, PackageSource, PatchLayer, PatchPackage, Platform,
    Recipe, RootPassword, Top,
};
pub use store::{Artefact, ImageRecord, LayerRecord, Store};
