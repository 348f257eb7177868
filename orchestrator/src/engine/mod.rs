//! The workflow engine: workflows as data ([`workflow`]); workers that claim and run steps
//! ([`worker`]); how a run is decided ([`verdict`]). The certification workflow's steps are the
//! application's (`app::certify`). Its storage is the store's `engine` module (one seam: runs, steps,
//! claims, intents, placements, verdicts).

pub mod verdict;
pub mod worker;
pub mod workflow;
