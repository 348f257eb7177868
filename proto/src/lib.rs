//! The messages both sides of Certo's protocols compile against, so a changed field breaks
//! the build instead of a run:
//!
//! - [`agent`]: orchestrator ↔ host agent (boot, status, destroy, info);
//! - [`host`]: host registration and heartbeat with the orchestrator;
//! - [`domain`]: the domain name `certo-r<RUN>-<TARGET>-a<ATTEMPT>`;
//! - [`token`]: the one constant-time comparison of secrets, token digests, bearer headers.
//!
//! The guest protocol is plain text for a busybox shell (hosts/README.md); its values are
//! the orchestrator's `model` states.

pub mod agent;
pub mod domain;
pub mod host;
pub mod token;
