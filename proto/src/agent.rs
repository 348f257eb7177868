//! Orchestrator ↔ host agent: the VM routes (`/v1/info`, `/v1/vms`, `/v1/vms/{name}`).

use serde::{Deserialize, Serialize};

/// What the orchestrator asks an agent to boot (`POST /v1/vms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    /// The domain name (`certo-r<RUN>-<TARGET>-a<ATTEMPT>`).
    pub name: String,
    /// The repository image to boot (a qcow2 overlay keeps it pristine).
    pub image: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// The host's own deadline, a backstop after the orchestrator's.
    pub deadline_seconds: f64,
    /// The fencing epoch of the engine step that asks (0: none, a one-shot `certo vm run`).
    /// The agent refuses a request for a VM of a run and target older than one it has seen.
    #[serde(default)]
    pub epoch: u64,
    pub guest: GuestSpec,
}

fn default_memory() -> u64 {
    512
}

fn one() -> u32 {
    1
}

/// What the guest harness is told: where the orchestrator is, its VM name and token, and
/// faults to inject (tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    pub url: String,
    pub vm: String,
    pub token: String,
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub panic: bool,
    #[serde(default)]
    pub crash: bool,
}

/// A VM as its agent sees the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostVmState {
    /// The domain runs.
    Running,
    /// The domain ended (powered off, crashed) or was destroyed.
    Ended,
    /// The host's own deadline passed: the agent destroyed it.
    TimedOut,
    /// The agent knows no such VM.
    Gone,
}

impl HostVmState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostVmState::Running => "running",
            HostVmState::Ended => "ended",
            HostVmState::TimedOut => "timed_out",
            HostVmState::Gone => "gone",
        }
    }
}

impl std::fmt::Display for HostVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's answer about one VM (boot, status, destroy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub state: HostVmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<String>,
    #[serde(default)]
    pub serial_tail: String,
    /// With a destroy: whether a running domain was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<bool>,
    /// How many times this agent booted a domain of this name (an effect applied twice
    /// shows here).
    #[serde(default)]
    pub boots: u32,
}

/// The agent's name, hypervisor and capacity (`GET /v1/info`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub hypervisor: String,
    pub slots: usize,
    pub memory_mib: u64,
    pub vcpus: u32,
}

/// One check of a host's health check (`POST /v1/health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `hypervisor`, `storage`, `boot assets`, `domain start`.
    pub check: String,
    pub ok: bool,
    /// What was done, or why it failed.
    pub detail: String,
}

/// A host's health check: what a VM's boot needs, tried for real (the hypervisor answers, the
/// repository and VM directories take files, the boot assets are there, and a domain starts
/// and is destroyed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub host: String,
    pub healthy: bool,
    pub checks: Vec<HealthCheck>,
}

/// What the orchestrator asks an agent to look at from outside a running guest
/// (`POST /v1/vms/{name}/probe`): a TCP port the guest says a service listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    pub port: u16,
}

/// Most bytes of a service's first words a probe keeps.
pub const PROBE_MAX_BYTES: usize = 1024;

/// What the agent found on a guest's port, seen from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum ProbeOutcome {
    /// Something answered on the port; what it said first (lossy UTF-8, at most
    /// [`PROBE_MAX_BYTES`] bytes; possibly empty for a service that waits to be spoken to).
    Answered { said: String },
    /// Nothing answered: the service is not there.
    Silent { why: String },
    /// The host cannot reach the guest's ports (e.g. the test driver, or a bridged NIC it
    /// has no route to): no outside evidence either way.
    Unverifiable { why: String },
}
