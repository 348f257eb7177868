//! The workflow engine: workflows as data ([`workflow`]); workers that claim and run steps
//! ([`worker`]); the certification workflow's steps ([`certify`]) and how a run is decided
//! ([`verdict`]). Its storage is the store's `engine` module (one seam: runs, steps,
//! claims, intents, placements, verdicts).

pub mod certify;
pub mod verdict;
pub mod worker;
pub mod workflow;
