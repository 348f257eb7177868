//! The workflow engine: workflows as data ([`workflow`]); the durable runs, steps and their
//! claims follow (the workflow engine issue).

pub mod workflow;
