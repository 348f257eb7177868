//! Hypervisors for tests, each over a real one (normally libvirt's `test:///default`):
//!
//! - [`SimulatedGuests`]: the test driver boots nothing, so a started domain gets a stand-in
//!   for the guest harness that speaks the same plain-text protocol (join, one passing
//!   result per planned suite, log, done) and then "powers off"; the faults of the kernel
//!   command line (`certo.hang=1`, `certo.panic=1`, `certo.crash=1`) behave as in a real
//!   guest. Production code has no simulation: this lives here only.
//! - [`Faulty`]: fails the calls a test chooses, the way a broken libvirt would.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use certo_hosts::hypervisor::{
    DomainSpec, DomainState, DomainStatus, Hypervisor, HypervisorError, HypervisorKind, Persistence,
};

/// A hypervisor whose started domains run a simulated guest harness.
#[derive(Debug)]
pub struct SimulatedGuests {
    inner: Arc<dyn Hypervisor>,
    failures: Arc<std::sync::atomic::AtomicU32>,
}

impl SimulatedGuests {
    pub fn new(inner: Arc<dyn Hypervisor>) -> Self {
        SimulatedGuests {
            inner,
            failures: Default::default(),
        }
    }

    /// Fault injection in the harness: while `failures` is above zero, each test result a
    /// guest reports is a failure, and counts it down (a test that fails once and then
    /// passes: set it to 1).
    pub fn with_failures(mut self, failures: Arc<std::sync::atomic::AtomicU32>) -> Self {
        self.failures = failures;
        self
    }
}

/// What the harness is told on its kernel command line.
#[derive(Debug, Clone, Default)]
struct GuestArgs {
    url: String,
    vm: String,
    token: String,
    hang: bool,
    panic: bool,
    crash: bool,
}

fn guest_args(cmdline: &str) -> Option<GuestArgs> {
    let mut a = GuestArgs::default();
    for word in cmdline.split_whitespace() {
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        match k {
            "certo.url" => a.url = v.to_owned(),
            "certo.vm" => a.vm = v.to_owned(),
            "certo.token" => a.token = v.to_owned(),
            "certo.hang" => a.hang = v == "1",
            "certo.panic" => a.panic = v == "1",
            "certo.crash" => a.crash = v == "1",
            _ => {}
        }
    }
    (!a.url.is_empty() && !a.vm.is_empty()).then_some(a)
}

impl Hypervisor for SimulatedGuests {
    fn kind(&self) -> HypervisorKind {
        self.inner.kind()
    }

    fn start(&self, spec: &DomainSpec, persistence: Persistence) -> Result<(), HypervisorError> {
        self.inner.start(spec, persistence)?;
        if let Some(args) = guest_args(&spec.cmdline) {
            let hv = self.inner.clone();
            let (name, serial) = (spec.name.clone(), spec.serial_log.clone());
            let failures = self.failures.clone();
            std::thread::spawn(move || {
                simulated_guest(hv.as_ref(), &name, &args, &serial, &failures)
            });
        }
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<bool, HypervisorError> {
        self.inner.destroy(name)
    }

    fn list(&self) -> Result<Vec<DomainStatus>, HypervisorError> {
        self.inner.list()
    }

    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        self.inner.state(name)
    }

    fn serial_log(&self, name: &str) -> Result<Option<PathBuf>, HypervisorError> {
        self.inner.serial_log(name)
    }
}

/// The stand-in harness: join, one passing result per planned suite, log, done, power off.
fn simulated_guest(
    hv: &dyn Hypervisor,
    name: &str,
    guest: &GuestArgs,
    serial: &Path,
    failures: &std::sync::atomic::AtomicU32,
) {
    let mut console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(serial)
        .ok();
    let mut say = |line: &str| {
        if let Some(c) = console.as_mut() {
            let _ = writeln!(c, "{line}");
        }
    };
    say("certo-harness: simulated guest (libvirt test driver)");
    if guest.hang {
        say("certo-harness: hanging (fault injection)");
        return;
    }
    if guest.panic {
        say("Kernel panic - not syncing: sysrq triggered crash");
        let _ = hv.destroy(name);
        return;
    }
    let url = guest.url.replace("//10.0.2.2:", "//127.0.0.1:");
    let plan = match http_post(&format!("{url}/api/v1/guest/join"), &guest.token, name, "") {
        Ok((200, plan)) => plan,
        Ok((status, body)) => {
            say(&format!(
                "certo-harness: join refused: {status} {}",
                body.trim()
            ));
            let _ = hv.destroy(name);
            return;
        }
        Err(e) => {
            say(&format!(
                "certo-harness: cannot reach the orchestrator: {e}"
            ));
            let _ = hv.destroy(name);
            return;
        }
    };
    say("certo-harness: joined");
    // After join the session key acts for the VM, as with the real harness.
    let session = plan
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let call = |path: &str, body: &str| http_post(&format!("{url}{path}"), &session, name, body);
    if guest.crash {
        say("certo-harness: crashing on purpose after joining (certo.crash=1)");
        let _ = hv.destroy(name);
        return;
    }
    for line in plan.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            let suite = rest.split_whitespace().next().unwrap_or("basic");
            let fail = failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let body = if fail {
                format!("{suite} simulated fail 0.0\nfailed on purpose (fault injection)\n")
            } else {
                format!("{suite} simulated pass 0.0\nsimulated under libvirt's test driver\n")
            };
            let _ = call("/api/v1/guest/result", &body);
        }
    }
    let _ = call("/api/v1/guest/log", "joined\nall suites run (simulated)\n");
    let _ = call("/api/v1/guest/done", "ok");
    say("certo-harness: done");
    let _ = hv.destroy(name);
}

/// A POST as the harness makes it: a busy orchestrator (503, the request refused before it was
/// handled) is tried again, up to 6 times, 1, 2, … 5 s apart.
fn http_post(url: &str, token: &str, vm: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut tries = 1;
    loop {
        let answer = http_post_once(url, token, vm, body)?;
        if answer.0 != 503 || tries >= 6 {
            return Ok(answer);
        }
        std::thread::sleep(Duration::from_secs(tries));
        tries += 1;
    }
}

/// A minimal blocking HTTP/1.1 POST (the harness's nc).
fn http_post_once(url: &str, token: &str, vm: &str, body: &str) -> std::io::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// URLs"))?;
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(hostport)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nX-Certo-VM: {vm}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A hypervisor that fails the calls a test switches on, and passes the others through.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Hypervisor>,
    /// `start` fails as libvirt does when it cannot create a domain.
    pub fail_start: AtomicBool,
    /// `list` fails (the connection broke).
    pub fail_list: AtomicBool,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Hypervisor>) -> Self {
        Faulty {
            inner,
            fail_start: AtomicBool::new(false),
            fail_list: AtomicBool::new(false),
        }
    }

    fn broken(op: &'static str, target: &str) -> HypervisorError {
        HypervisorError::Libvirt {
            op,
            target: target.to_owned(),
            message: "injected failure (certo-testkit Faulty)".to_owned(),
        }
    }
}

impl Hypervisor for Faulty {
    fn kind(&self) -> HypervisorKind {
        self.inner.kind()
    }

    fn start(&self, spec: &DomainSpec, persistence: Persistence) -> Result<(), HypervisorError> {
        if self.fail_start.load(Ordering::SeqCst) {
            return Err(Self::broken("create domain", &spec.name));
        }
        self.inner.start(spec, persistence)
    }

    fn destroy(&self, name: &str) -> Result<bool, HypervisorError> {
        self.inner.destroy(name)
    }

    fn list(&self) -> Result<Vec<DomainStatus>, HypervisorError> {
        if self.fail_list.load(Ordering::SeqCst) {
            return Err(Self::broken("list domains", "test:///default"));
        }
        self.inner.list()
    }

    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        self.inner.state(name)
    }

    fn serial_log(&self, name: &str) -> Result<Option<PathBuf>, HypervisorError> {
        self.inner.serial_log(name)
    }
}
