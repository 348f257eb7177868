//! Fast tests against libvirt's in-process test driver (`test:///default`, no daemon) and the
//! libvirt RNG schema (`virt-xml-validate`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use certo_hosts::domain_name::{DomainName, reap, reap_owned};
use certo_hosts::hypervisor::{
    DomainSpec, DomainState, Hypervisor, HypervisorKind, LibvirtHypervisor, Network, Persistence,
    WaitOutcome, xml,
};

/// `test:///default` is one state per process, shared by every connection: tests that start
/// domains take turns.
static DRIVER: Mutex<()> = Mutex::new(());

fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        name: name.to_owned(),
        memory_mib: 128,
        vcpus: 1,
        kernel: PathBuf::from("/var/lib/certo/boot/vmlinux"),
        initramfs: PathBuf::from("/var/lib/certo/boot/initramfs.img"),
        cmdline: certo_hosts::guest::GuestConfig::user_network("http://10.0.2.2:8080", name, "t0k")
            .cmdline(HypervisorKind::Qemu)
            .expect("cmdline"),
        root_disk: PathBuf::from(format!("/var/lib/certo/vms/{name}/root.qcow2")),
        base_image: Some(PathBuf::from("/var/lib/certo/repo/images/abc/rootfs.ext4")),
        serial_log: PathBuf::from(format!("/var/lib/certo/vms/{name}/serial.log")),
        network: Network::User,
        owner: Some("nshost1".into()),
        secret_file: None,
    }
}

#[test]
fn start_list_reap_destroy_on_the_test_driver() {
    let _turn = DRIVER.lock().unwrap_or_else(|p| p.into_inner());
    let hv = LibvirtHypervisor::connect("test:///default").expect("connect");
    assert_eq!(hv.kind(), HypervisorKind::Test);
    // The test driver's own sample domain is not Certo's.
    assert!(hv.list().expect("list").is_empty());

    let finished_run = DomainName::new(7001, "3.2/sl5_x86_64/glite-WN", 1).to_string();
    let finished_run_persistent =
        DomainName::new(7002, "3.2/deb12_x86_64/glite-BDII", 2).to_string();
    let live_run = DomainName::new(7003, "3.1/sl4_i386/glite-UI", 1).to_string();
    hv.start(&spec(&finished_run), Persistence::Transient)
        .expect("start transient");
    hv.start(&spec(&finished_run_persistent), Persistence::Persistent)
        .expect("start persistent");
    hv.start(&spec(&live_run), Persistence::Transient)
        .expect("start live");
    // Starting the same name twice fails (libvirt refuses a duplicate).
    assert!(hv.start(&spec(&live_run), Persistence::Transient).is_err());

    let listed = hv.list().expect("list");
    let names: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, [&finished_run, &finished_run_persistent, &live_run]);
    assert!(listed.iter().all(|d| d.state == DomainState::Running));
    assert_eq!(
        listed.iter().map(|d| d.persistent).collect::<Vec<_>>(),
        [false, true, false]
    );
    let parsed = DomainName::parse(&finished_run_persistent).expect("parses");
    assert_eq!(
        (parsed.run, parsed.target.as_str(), parsed.attempt),
        (7002, "3-2-deb12-x86-64-glite-bdii", 2)
    );
    assert_eq!(
        hv.serial_log(&live_run).expect("serial log"),
        Some(spec(&live_run).serial_log)
    );

    // An agent restarts knowing only that run 7003 is live.
    let reaped = reap(&hv, &HashSet::from([7003])).expect("reap");
    assert_eq!(
        reaped,
        [finished_run.clone(), finished_run_persistent.clone()]
    );
    let left: Vec<String> = hv
        .list()
        .expect("list")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(left, std::slice::from_ref(&live_run));
    // The persistent one is undefined too, not just stopped.
    assert_eq!(hv.state(&finished_run_persistent).expect("state"), None);

    // A domain that never ends is destroyed at the deadline.
    let t = Instant::now();
    let outcome = hv
        .wait_until(&live_run, Instant::now() + Duration::from_millis(300))
        .expect("wait");
    assert!(
        matches!(outcome, WaitOutcome::Destroyed { .. }),
        "{outcome:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(hv.state(&live_run).expect("state"), None);
    // Destroying what is gone is not an error.
    assert!(!hv.destroy(&live_run).expect("destroy"));
    assert!(hv.list().expect("list").is_empty(), "no leaked domains");
}

#[test]
fn an_agent_reaps_only_its_own_domains() {
    let _turn = DRIVER.lock().unwrap_or_else(|p| p.into_inner());
    let hv = LibvirtHypervisor::connect("test:///default").expect("connect");
    let mine = DomainName::new(8001, "wn", 1).to_string();
    let theirs = DomainName::new(8002, "wn", 1).to_string();
    let nobodys = DomainName::new(8003, "wn", 1).to_string();
    hv.start(&spec(&mine), Persistence::Transient)
        .expect("start");
    let mut other = spec(&theirs);
    other.owner = Some("nshost2".into());
    hv.start(&other, Persistence::Transient).expect("start");
    let mut unowned = spec(&nobodys);
    unowned.owner = None;
    hv.start(&unowned, Persistence::Transient).expect("start");
    let owners: Vec<(String, Option<String>)> = hv
        .list()
        .expect("list")
        .into_iter()
        .filter(|d| d.name.starts_with("certo-r800"))
        .map(|d| (d.name, d.owner))
        .collect();
    assert_eq!(
        owners,
        [
            (mine.clone(), Some("nshost1".to_owned())),
            (theirs.clone(), Some("nshost2".to_owned())),
            (nobodys.clone(), None)
        ]
    );
    // No run is live for nshost1: only its domain goes.
    assert_eq!(
        reap_owned(&hv, "nshost1", &HashSet::new()).expect("reap"),
        std::slice::from_ref(&mine)
    );
    assert_eq!(
        hv.state(&theirs).expect("state"),
        Some(DomainState::Running)
    );
    assert_eq!(
        hv.state(&nobodys).expect("state"),
        Some(DomainState::Running)
    );
    for n in [&theirs, &nobodys] {
        assert!(hv.destroy(n).expect("destroy"));
    }
}

#[test]
fn a_domain_that_is_already_gone_ends_the_wait_at_once() {
    let hv = LibvirtHypervisor::connect("test:///default").expect("connect");
    let outcome = hv
        .wait_until(
            "certo-r1-never-started-a1",
            Instant::now() + Duration::from_secs(5),
        )
        .expect("wait");
    assert!(matches!(outcome, WaitOutcome::Ended { waited } if waited < Duration::from_secs(1)));
}

fn validate(kind: HypervisorKind, s: &DomainSpec) {
    let xml = xml::render(kind, s).expect("renders");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(format!("{}.xml", kind.as_str()));
    std::fs::write(&file, &xml).expect("write");
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect("virt-xml-validate runs (Debian package libvirt-clients)");
    assert!(
        out.status.success(),
        "{} XML does not validate:\n{}\n{}{}",
        kind.as_str(),
        xml,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_template_validates_against_the_libvirt_schema() {
    let s = spec("certo-r1-x-a1");
    validate(HypervisorKind::Qemu, &s);
    validate(HypervisorKind::Kvm, &s);
    validate(HypervisorKind::Test, &s);
    let mut xen = s.clone();
    xen.network = Network::Bridge("xenbr0".into());
    xen.cmdline =
        certo_hosts::guest::GuestConfig::user_network("http://10.0.0.1:8080", &xen.name, "t")
            .cmdline(HypervisorKind::Xen)
            .expect("cmdline");
    assert!(xen.cmdline.starts_with("console=hvc0 panic=-1"));
    validate(HypervisorKind::Xen, &xen);
    let mut none = s;
    none.network = Network::None;
    validate(HypervisorKind::Qemu, &none);
}
