//! Certo's host agent (`certo agent`): the daemon on each hypervisor host. It serves the
//! host's image repository (the receiving side of transfers, from `certo-transfer`), boots,
//! watches and tears down VMs through `certo-hosts`, and registers with the orchestrator and
//! sends it heartbeats. Its messages are `certo-proto`'s. It never links the store.
//!
//! - [`vms`]: the VM routes and the VM manager (boot from a repository image through a
//!   qcow2 overlay, deadline watch, reaping of this agent's domains);
//! - [`daemon`]: settings, start-up, registration and heartbeats.

pub mod daemon;
pub mod vms;

pub use daemon::{AgentError, AgentSettings, run, run_with};
