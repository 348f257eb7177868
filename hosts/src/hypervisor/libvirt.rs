//! [`Hypervisor`] over libvirt, through the `virt` crate.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::error::ErrorNumber;
use virt::sys;

use super::{
    DomainSpec, DomainState, DomainStatus, Hypervisor, HypervisorError, HypervisorKind,
    Persistence, ProbeAnswer, is_certo_domain, xml,
};

/// A connection to one libvirt driver, e.g. `test:///default` or `qemu:///system`.
///
/// One connection is shared by all calls (libvirt connections are thread-safe). It is closed
/// when this value is dropped.
pub struct LibvirtHypervisor {
    uri: String,
    kind: HypervisorKind,
    conn: Connect,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("uri", &self.uri)
            .field("kind", &self.kind)
            .finish()
    }
}

fn lv(op: &'static str, target: &str, e: virt::error::Error) -> HypervisorError {
    HypervisorError::Libvirt {
        op,
        target: target.to_owned(),
        message: e.message().to_owned(),
    }
}

fn no_domain(e: &virt::error::Error) -> bool {
    matches!(e.code(), virt::enumutil::Enum::Known(ErrorNumber::NoDomain))
}

impl LibvirtHypervisor {
    /// Connects to `uri`. The domain XML template follows the driver: `qemu:///…` is
    /// [`HypervisorKind::Qemu`] (TCG) unless `kvm` is set, `xen:///…` is Xen, `test:///…` the
    /// test driver.
    pub fn connect(uri: &str) -> Result<Self, HypervisorError> {
        Self::connect_as(uri, None)
    }

    /// Connects to `uri`, choosing the template explicitly (e.g. [`HypervisorKind::Kvm`] on a
    /// `qemu:///system` host with working KVM).
    pub fn connect_as(uri: &str, kind: Option<HypervisorKind>) -> Result<Self, HypervisorError> {
        static QUIET: Once = Once::new();
        // libvirt prints every error on stderr by default; Certo reports them itself.
        QUIET.call_once(virt::error::clear_error_callback);
        let kind = match kind {
            Some(k) => k,
            None if uri.starts_with("test:") => HypervisorKind::Test,
            None if uri.starts_with("xen:") => HypervisorKind::Xen,
            None if uri.starts_with("qemu:") => HypervisorKind::Qemu,
            None => {
                return Err(HypervisorError::Spec {
                    name: uri.to_owned(),
                    message: "unknown libvirt driver; expected qemu:, xen: or test:".into(),
                });
            }
        };
        let conn = Connect::open(Some(uri)).map_err(|e| lv("connect", uri, e))?;
        tracing::debug!(uri, kind = kind.as_str(), "connected to libvirt");
        Ok(Self {
            uri: uri.to_owned(),
            kind,
            conn,
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn lookup(&self, name: &str) -> Result<Option<Domain>, HypervisorError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if no_domain(&e) => Ok(None),
            Err(e) => Err(lv("look up domain", name, e)),
        }
    }
}

fn state_of(d: &Domain, name: &str) -> Result<DomainState, HypervisorError> {
    let (state, _reason) = d.state().map_err(|e| lv("get state", name, e))?;
    Ok(match state {
        virt::enumutil::Enum::Known(VirState::Running | VirState::Blocked) => DomainState::Running,
        virt::enumutil::Enum::Known(VirState::Paused) => DomainState::Paused,
        virt::enumutil::Enum::Known(VirState::Shutdown) => DomainState::ShuttingDown,
        virt::enumutil::Enum::Known(VirState::Shutoff) => DomainState::ShutOff,
        virt::enumutil::Enum::Known(VirState::Crashed) => DomainState::Crashed,
        other => DomainState::Other(format!("{other:?}")),
    })
}

impl Hypervisor for LibvirtHypervisor {
    fn kind(&self) -> HypervisorKind {
        self.kind
    }

    fn start(&self, spec: &DomainSpec, persistence: Persistence) -> Result<(), HypervisorError> {
        let xml = xml::render(self.kind, spec)?;
        match persistence {
            Persistence::Transient => {
                self.conn
                    .create_domain_xml(&xml, sys::VIR_DOMAIN_NONE)
                    .map_err(|e| lv("create domain", &spec.name, e))?;
            }
            Persistence::Persistent => {
                let d = self
                    .conn
                    .define_domain_xml(&xml)
                    .map_err(|e| lv("define domain", &spec.name, e))?;
                if let Err(e) = d.create() {
                    let err = lv("start domain", &spec.name, e);
                    if let Err(e) = d.undefine() {
                        tracing::warn!(vm = %spec.name, error = e.message(), "cannot undefine a domain that failed to start");
                    }
                    return Err(err);
                }
            }
        }
        tracing::info!(vm = %spec.name, uri = %self.uri, ?persistence, memory_mib = spec.memory_mib, vcpus = spec.vcpus, "domain started");
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<bool, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(false);
        };
        let active = d.is_active().map_err(|e| lv("query domain", name, e))?;
        if active {
            match d.destroy() {
                Ok(()) => {}
                // It ended between the lookup and the destroy.
                Err(e) if no_domain(&e) => {}
                Err(e)
                    if matches!(
                        e.code(),
                        virt::enumutil::Enum::Known(ErrorNumber::OperationInvalid)
                    ) => {}
                Err(e) => return Err(lv("destroy domain", name, e)),
            }
        }
        // A transient domain is gone once destroyed; a persistent one stays defined.
        if let Some(d) = self.lookup(name)?
            && d.is_persistent().map_err(|e| lv("query domain", name, e))?
        {
            match d.undefine() {
                Ok(()) => {}
                Err(e) if no_domain(&e) => {}
                Err(e) => return Err(lv("undefine domain", name, e)),
            }
        }
        tracing::info!(vm = name, was_running = active, "domain destroyed");
        Ok(true)
    }

    fn list(&self) -> Result<Vec<DomainStatus>, HypervisorError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| lv("list domains", &self.uri, e))?;
        let mut out = Vec::new();
        for d in domains {
            let name = match d.name() {
                Ok(n) => n,
                Err(e) if no_domain(&e) => continue,
                Err(e) => return Err(lv("get domain name", &self.uri, e)),
            };
            if !is_certo_domain(&name) {
                continue;
            }
            let state = match state_of(&d, &name) {
                Ok(s) => s,
                // Gone since the listing.
                Err(HypervisorError::Libvirt { .. }) if self.lookup(&name)?.is_none() => continue,
                Err(e) => return Err(e),
            };
            let persistent = d.is_persistent().unwrap_or(false);
            // Gone since the listing: no owner to read, and nothing to report either.
            let owner = match d.xml_desc(0) {
                Ok(desc) => xml::owner_of(&desc),
                Err(e) if no_domain(&e) => continue,
                Err(e) => return Err(lv("get domain XML", &name, e)),
            };
            out.push(DomainStatus {
                name,
                state,
                persistent,
                owner,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(None);
        };
        match state_of(&d, name) {
            Ok(s) => Ok(Some(s)),
            Err(_) if self.lookup(name)?.is_none() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn probe_tcp(
        &self,
        name: &str,
        port: u16,
        max: usize,
        wait: Duration,
    ) -> Result<ProbeAnswer, HypervisorError> {
        let unsupported = |message: String| HypervisorError::Unsupported {
            name: name.to_owned(),
            message,
        };
        if !matches!(self.kind, HypervisorKind::Qemu | HypervisorKind::Kvm) {
            return Err(unsupported(format!(
                "{} domains cannot be reached from the host",
                self.kind.as_str()
            )));
        }
        let d = self
            .lookup(name)?
            .ok_or_else(|| unsupported("no such domain".into()))?;
        let desc = d.xml_desc(0).map_err(|e| lv("get domain XML", name, e))?;
        let alias = xml::user_net_alias(&desc)
            .ok_or_else(|| unsupported("it has no user-network NIC to forward a port of".into()))?;
        // A free loopback port for the forward (QEMU binds it right after; a race with
        // another process taking it in between makes hostfwd_add fail, reported below).
        let host_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| unsupported(format!("no free loopback port: {e}")))?
            .port();
        let hmp = |cmd: String| -> Result<String, HypervisorError> {
            d.qemu_monitor_command(&cmd, sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                .map_err(|e| lv("QEMU monitor command", name, e))
        };
        let guest = crate::guest::USER_NET_GUEST;
        let said = hmp(format!(
            "hostfwd_add host{alias} tcp:127.0.0.1:{host_port}-{guest}:{port}"
        ))?;
        if !said.trim().is_empty() {
            return Err(unsupported(format!(
                "QEMU refused to forward 127.0.0.1:{host_port} to {guest}:{port}: {}",
                said.trim()
            )));
        }
        let answer = super::read_first_words(
            std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
            max,
            wait,
        );
        if let Err(e) = hmp(format!(
            "hostfwd_remove host{alias} tcp:127.0.0.1:{host_port}"
        )) {
            tracing::warn!(vm = name, error = %e, "cannot remove a probe's port forward");
        }
        tracing::info!(
            vm = name,
            port,
            host_port,
            ?answer,
            "probed a guest port from outside"
        );
        // QEMU listens on the forward's port: failing to connect means this process does not
        // share QEMU's network namespace, not that the guest is silent.
        answer.map_err(|e| {
            unsupported(format!(
                "the port forward 127.0.0.1:{host_port} cannot be reached from here ({e}): QEMU runs in another network namespace"
            ))
        })
    }

    fn serial_log(&self, name: &str) -> Result<Option<PathBuf>, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(None);
        };
        let desc = match d.xml_desc(0) {
            Ok(x) => x,
            Err(e) if no_domain(&e) => return Ok(None),
            Err(e) => return Err(lv("get domain XML", name, e)),
        };
        Ok(xml::serial_log_of(&desc).map(PathBuf::from))
    }
}
