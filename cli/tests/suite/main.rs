//! The fast integration tests in one binary (one link instead of seven): the store, the
//! patch-record fixtures and properties, the embedded cluster, the hosts and guest API,
//! transfers between processes and network namespaces, and VM lifecycles over libvirt's
//! test driver. The imager's real builds and the real QEMU boots are binaries of their own
//! (`imager`, `vm_e2e`), so the heavy work of each runs alone.

#[path = "../common/mod.rs"]
mod common;

mod cli_contract;
mod cluster;
mod dashboard;
mod engine_store;
mod fixtures;
mod hardening;
mod hooks;
mod hosts_api;
mod parser_props;
mod people_api;
mod store;
mod sweep_fires;
mod testbed_guard;
mod transfer_cli;
mod vm_lifecycle;
