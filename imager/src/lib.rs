//! Certo's image builder: turning a target (release, OS, architecture, node type, patch)
//! into layered image artefacts, each layer cached under a digest of its inputs.
//!
//! This crate is responsible for what goes into a layer and how layers are identified,
//! built and exported. It starts with the layer cache key: [`LayerInputs::digest`].
//!
//! It must never know about hosts, placement or transfers: it produces image artefacts and
//! their identities; moving them to hosts belongs to `certo-transfer` and the orchestrator.

pub mod digest;

pub use digest::{DigestError, LayerDigest, LayerInputs, LayerKind, ParseDigestError};
