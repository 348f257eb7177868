//! Domain names (defined in `certo-proto`, which both sides compile against) and [`reap`],
//! which destroys the domains of runs that are no longer live.

use std::collections::HashSet;

pub use certo_proto::domain::{DomainName, MAX_SLUG, PREFIX, slug};

use crate::hypervisor::{DomainStatus, Hypervisor, HypervisorError};

/// Destroys every Certo domain whose run is not in `live_runs`, whoever started it; returns
/// the names destroyed. Domains whose name has the `certo-` prefix but does not parse are left
/// alone (with a warning): nothing says which run they belong to.
///
/// On a libvirt daemon shared by several agents (or by test suites), use [`reap_owned`]: this
/// one destroys the other agents' domains too.
pub fn reap(
    hypervisor: &dyn Hypervisor,
    live_runs: &HashSet<u64>,
) -> Result<Vec<String>, HypervisorError> {
    reap_where(hypervisor, live_runs, |_| true)
}

/// [`reap`] limited to the domains whose metadata names `owner` ([`DomainSpec::owner`]).
///
/// [`DomainSpec::owner`]: crate::hypervisor::DomainSpec::owner
pub fn reap_owned(
    hypervisor: &dyn Hypervisor,
    owner: &str,
    live_runs: &HashSet<u64>,
) -> Result<Vec<String>, HypervisorError> {
    reap_where(hypervisor, live_runs, |d| d.owner.as_deref() == Some(owner))
}

fn reap_where(
    hypervisor: &dyn Hypervisor,
    live_runs: &HashSet<u64>,
    mine: impl Fn(&DomainStatus) -> bool,
) -> Result<Vec<String>, HypervisorError> {
    let mut destroyed = Vec::new();
    for domain in hypervisor.list()?.into_iter().filter(|d| mine(d)) {
        let Some(parsed) = DomainName::parse(&domain.name) else {
            tracing::warn!(vm = %domain.name, "a certo- domain with a name Certo does not make; left alone");
            continue;
        };
        if live_runs.contains(&parsed.run) {
            continue;
        }
        if hypervisor.destroy(&domain.name)? {
            tracing::info!(vm = %domain.name, run = parsed.run, state = ?domain.state, "reaped a domain of a finished run");
            destroyed.push(domain.name);
        }
    }
    Ok(destroyed)
}
