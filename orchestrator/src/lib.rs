//! Certo: certifies patches of grid middleware releases on virtual machines it
//! builds, ships and boots. This crate is the orchestrator: the patch model and
//! its validation, the store, the application layer ([`app`]) that the command line
//! and the servers call, and the command line.

pub mod app;
pub mod catalogue;
pub mod cli;
pub mod images;
pub mod ingest;
pub mod model;
pub mod patch;
pub mod server;
pub mod store;
pub mod vmrun;
pub mod world;
