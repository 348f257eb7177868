//! The testbed's protection: the shared services every patch's slice uses, and the guard
//! that tells when a slice tries to take one over.
//!
//! - [`shared`]: a shared top BDII the testbed runs ([`shared::serve_top_bdii`], `certo
//!   testbed serve-bdii`).
//! - [`guard`]: what a slice's service said from outside ([`guard::takeover`]) and a
//!   refused registration ([`guard::refused_registration`]), each as one line naming the
//!   shared service.
//!
//! The registry's health checks are [`crate::api::testbed`].

pub mod guard;
pub mod shared;

pub use guard::{refused_registration, registration_refusal, takeover};
pub use shared::serve_top_bdii;
