//! Certo: certifies patches of grid middleware releases on virtual machines it
//! builds, ships and boots. This crate is the orchestrator library: the patch model and
//! its validation, the store (the only SQL), the application layer ([`app`]) that the
//! `certo` binary (package `certo`, `cli/`) and the servers call, and the servers. It
//! never links libvirt: the host side is `certo-agent`.

pub mod api;
pub mod app;
pub mod catalogue;
pub mod engine;
pub mod images;
pub mod ingest;
pub mod model;
pub mod patch;
pub mod store;
pub mod testbed;
pub mod vmrun;
pub mod web;
pub mod world;
