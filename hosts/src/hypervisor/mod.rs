//! The hypervisor seam: start, list, watch and destroy Certo's domains.
//!
//! The trait is **blocking**: libvirt calls block (the `virt` crate has no async API). Async
//! callers run these methods on `tokio::task::spawn_blocking` or on a dedicated thread; the
//! implementation is `Send + Sync`, so one instance can be shared in an `Arc<dyn Hypervisor>`.

mod libvirt;
pub mod xml;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

pub use libvirt::LibvirtHypervisor;

use certo_proto::domain::PREFIX;

/// Which libvirt driver (and so which domain XML template) a hypervisor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypervisorKind {
    /// QEMU with TCG emulation (`<domain type='qemu'>`): works where KVM does not.
    Qemu,
    /// QEMU with KVM.
    Kvm,
    /// Xen, paravirtual guest booted from a dom0-supplied kernel.
    Xen,
    /// libvirt's in-process test driver (`test:///default`): no guest runs.
    Test,
}

impl HypervisorKind {
    /// The template name, also the value of `<domain type=...>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Kvm => "kvm",
            Self::Xen => "xen",
            Self::Test => "test",
        }
    }

    /// The serial console device the guest kernel should write to.
    pub fn console(self) -> &'static str {
        match self {
            Self::Xen => "hvc0",
            _ => "ttyS0",
        }
    }
}

/// How the guest's NIC is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No NIC.
    None,
    /// User-mode networking (QEMU slirp): the guest is 10.0.2.15, the host is reachable as
    /// 10.0.2.2. Not available on Xen.
    User,
    /// A NIC on an existing host bridge.
    Bridge(String),
}

/// Transient domains vanish when they stop; persistent ones stay defined until destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `virDomainCreateXML`: gone once it ends. What Certo uses for disposable VMs.
    Transient,
    /// `virDomainDefineXML` + `virDomainCreate`: [`Hypervisor::destroy`] undefines it.
    Persistent,
}

/// Everything needed to boot one VM by direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// The domain name (see [`crate::domain_name::DomainName`]).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Kernel image (absolute path): `vmlinux` (PVH) or `vmlinuz`.
    pub kernel: PathBuf,
    /// Initramfs (absolute path).
    pub initramfs: PathBuf,
    /// Kernel command line. [`crate::guest::GuestConfig::cmdline`] makes one with `panic=-1`.
    pub cmdline: String,
    /// The root disk, a qcow2 overlay (absolute path; see [`crate::overlay`]).
    pub root_disk: PathBuf,
    /// The overlay's raw backing file (the repository image), if any. Rendered as a read-only
    /// `backingStore` that libvirt must not relabel: with dynamic ownership libvirt would chown
    /// the shared repository image to the QEMU user and, the image being read-only, never give
    /// it back. QEMU only needs to read it (mode 0644 and searchable directories).
    pub base_image: Option<PathBuf>,
    /// Where the serial console is written (absolute path); kept after the domain ends.
    pub serial_log: PathBuf,
    /// The NIC.
    pub network: Network,
    /// Who started it (the agent's host name), kept in the domain's `<metadata>` so that
    /// several agents sharing one libvirt daemon each reap only their own domains
    /// ([`crate::domain_name::reap_owned`]). ASCII letters, digits, `.`, `_`, `-`.
    pub owner: Option<String>,
    /// A file QEMU hands the guest through fw_cfg as `opt/certo/token` (absolute path): the
    /// guest's secret stays off the kernel command line, and so out of libvirt's logs.
    /// Ignored by the Xen and test templates.
    pub secret_file: Option<PathBuf>,
}

/// A domain's run state as Certo cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or blocked on I/O).
    Running,
    /// Paused by the hypervisor or an operator.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Off (only persistent domains are seen in this state).
    ShutOff,
    /// Crashed (only with `on_crash` actions other than destroy).
    Crashed,
    /// Any other state, as libvirt reported it.
    Other(String),
}

impl DomainState {
    /// Whether the guest has stopped running for good.
    pub fn is_ended(&self) -> bool {
        matches!(self, Self::ShutOff | Self::Crashed)
    }
}

/// One of Certo's domains on a hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    /// Its name (`certo-...`).
    pub name: String,
    /// Its state.
    pub state: DomainState,
    /// Whether it stays defined after it stops.
    pub persistent: bool,
    /// The owner recorded in its metadata ([`DomainSpec::owner`]), if any.
    pub owner: Option<String>,
}

/// What [`Hypervisor::probe_tcp`] found on a guest's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// Something accepted the connection; what it said first (possibly nothing).
    Answered {
        /// The bytes read, at most the probe's limit.
        said: Vec<u8>,
    },
    /// Nothing accepted the connection: refused, reset before anything was said, or no
    /// answer within the wait.
    Silent {
        /// What happened, e.g. `connection refused`.
        why: String,
    },
}

/// How [`Hypervisor::wait_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The domain ended by itself (powered off, rebooted, crashed or panicked: all destroy it).
    Ended {
        /// Time spent waiting.
        waited: Duration,
    },
    /// The deadline passed; the domain was destroyed.
    Destroyed {
        /// Time spent waiting.
        waited: Duration,
    },
}

/// What went wrong talking to the hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A libvirt call failed.
    #[error("libvirt {op} on {target}: {message}")]
    Libvirt {
        /// The operation, e.g. `create domain`.
        op: &'static str,
        /// The connection URI or domain name.
        target: String,
        /// libvirt's message.
        message: String,
    },
    /// The domain spec cannot be rendered for this hypervisor.
    #[error("domain {name}: {message}")]
    Spec {
        /// Domain name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// What was asked cannot be done with this hypervisor or network (e.g. reaching a
    /// guest's port on the test driver, which has no guests).
    #[error("domain {name}: {message}")]
    Unsupported {
        /// Domain name.
        name: String,
        /// What cannot be done, and why.
        message: String,
    },
    /// Template rendering failed (a bug in a template).
    #[error("rendering the {kind} domain template: {message}")]
    Template {
        /// Template name.
        kind: &'static str,
        /// Tera's message (with its causes).
        message: String,
    },
}

/// How often [`Hypervisor::wait_until`] polls the domain state.
pub const POLL: Duration = Duration::from_millis(200);

/// A hypervisor that runs Certo's domains. Blocking; see the module docs.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// The kind of hypervisor (which domain XML it takes).
    fn kind(&self) -> HypervisorKind;

    /// Renders `spec`, defines (if persistent) and starts the domain.
    fn start(&self, spec: &DomainSpec, persistence: Persistence) -> Result<(), HypervisorError>;

    /// Destroys the domain if it runs and undefines it if it is persistent. Returns `false` if
    /// no such domain exists (already gone: not an error, so teardown is idempotent).
    fn destroy(&self, name: &str) -> Result<bool, HypervisorError>;

    /// Certo's domains (name prefix `certo-`), running or defined, with their state.
    fn list(&self) -> Result<Vec<DomainStatus>, HypervisorError>;

    /// The state of one domain; `None` if it does not exist (a transient domain that ended).
    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError>;

    /// The file the domain's serial console is written to, read from its live definition;
    /// `None` if the domain does not exist or has no file-backed console.
    fn serial_log(&self, name: &str) -> Result<Option<PathBuf>, HypervisorError>;

    /// Connects from this host to TCP `port` of the running guest `name` (its address on
    /// its own network), reads what the service says first (at most `max` bytes, until it
    /// closes or `wait` passes) and returns it: the evidence, taken from outside the guest,
    /// that a service the guest reported is really there. Under QEMU's user network the
    /// guest is unreachable from the host, so a port forward is added for the probe and
    /// removed after it. [`HypervisorError::Unsupported`] where the host cannot reach the
    /// guest at all.
    fn probe_tcp(
        &self,
        name: &str,
        port: u16,
        max: usize,
        wait: Duration,
    ) -> Result<ProbeAnswer, HypervisorError> {
        let _ = (port, max, wait);
        Err(HypervisorError::Unsupported {
            name: name.to_owned(),
            message: format!(
                "{} domains cannot be reached from the host",
                self.kind().as_str()
            ),
        })
    }

    /// Polls every [`POLL`] until the domain has ended (gone, shut off or crashed), or until
    /// `deadline`, when it destroys the domain. The serial log file is left in place.
    fn wait_until(&self, name: &str, deadline: Instant) -> Result<WaitOutcome, HypervisorError> {
        let started = Instant::now();
        loop {
            match self.state(name)? {
                None => {
                    return Ok(WaitOutcome::Ended {
                        waited: started.elapsed(),
                    });
                }
                Some(state) if state.is_ended() => {
                    return Ok(WaitOutcome::Ended {
                        waited: started.elapsed(),
                    });
                }
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.destroy(name)?;
                tracing::warn!(
                    vm = name,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "deadline passed; domain destroyed"
                );
                return Ok(WaitOutcome::Destroyed {
                    waited: started.elapsed(),
                });
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }
}

/// Connects to `addr` and reads what the other side says first: at most `max` bytes, until it
/// closes the connection or `wait` has passed. A connection closed before a word (what QEMU's
/// user network does with a forwarded connection when nothing listens on the guest's port) is
/// [`ProbeAnswer::Silent`]; one accepted but mute for all of `wait` is an answer of nothing.
/// `Err` when the connection cannot be made at all (through a port forward that means the
/// forward is not reachable from here, which says nothing about the guest).
pub fn read_first_words(
    addr: std::net::SocketAddr,
    max: usize,
    wait: Duration,
) -> Result<ProbeAnswer, std::io::Error> {
    use std::io::Read;
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, wait)?;
    let mut said = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() || said.len() >= max {
            break;
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) if said.is_empty() => {
                return Ok(ProbeAnswer::Silent {
                    why: "the connection was closed before anything was said".into(),
                });
            }
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n.min(max - said.len())]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if said.is_empty() => {
                return Ok(ProbeAnswer::Silent {
                    why: format!("read: {e}"),
                });
            }
            Err(_) => break,
        }
    }
    Ok(ProbeAnswer::Answered { said })
}

/// The XML namespace of Certo's domain metadata.
pub const METADATA_NS: &str = "https://certo.invalid/xmlns/domain/1";

/// Whether a domain name is one of Certo's.
pub fn is_certo_domain(name: &str) -> bool {
    name.starts_with(PREFIX)
}
