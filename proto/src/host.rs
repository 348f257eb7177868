//! Host ↔ orchestrator: registration and heartbeat (`/api/v1/hosts/{name}/...`), each
//! with the host's own token.

use serde::{Deserialize, Serialize};

/// What an agent tells the orchestrator when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Where the orchestrator reaches the agent.
    pub agent_url: String,
    /// The libvirt connection the agent boots through.
    pub libvirt_uri: String,
    pub slots: i32,
    pub memory_mib: i64,
    pub vcpus: i32,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub registered: String,
}

/// The answer to a heartbeat: the host's live VMs; the agent reaps every other domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub live_vms: Vec<String>,
}
