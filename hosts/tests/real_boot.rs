//! Real boots under `qemu:///system` (QEMU TCG): fixture images built by the imager, booted
//! with the host kernel and Certo's initramfs, talking the guest protocol to an in-test HTTP
//! server. Needs root, libvirtd (started here if not running), qemu-system-x86 and a Debian
//! kernel (scripts/lib.sh installs them).

mod common;

use std::time::{Duration, Instant};

use certo_hosts::domain_name::DomainName;
use certo_hosts::hypervisor::{Hypervisor, WaitOutcome};
use common::{GuestEvent, GuestServer, JoinPlan, Vm};

/// Unique per test process, so parallel `cargo test` runs do not collide.
fn run_id(n: u64) -> u64 {
    u64::from(std::process::id()) * 10 + n
}

struct Certified {
    events: Vec<GuestEvent>,
    serial: String,
    to_joined: Duration,
    to_done: Duration,
}

/// Boots `base` for `plan`, waits for the guest to power off, and checks what every certified
/// boot must show: joined, done ok, the domain gone, the serial log, the base image untouched.
fn certify(run: u64, target: &str, base: &std::path::Path, plan: JoinPlan) -> Certified {
    common::init_tracing();
    let hv = common::qemu();
    let server = GuestServer::start();
    let name = DomainName::new(run, target, 1).to_string();
    let token = format!("tok-{run}");
    let hostname = plan.hostname.clone();
    server.expect_vm(&token, plan);
    let before = common::sha256_file(base);
    let owner_before = common::owner(base);
    let vm = Vm::new(&name, base, common::cmdline(&server, &name, &token));

    let started = Instant::now();
    let _guard = vm.start(&hv);
    assert_eq!(
        hv.serial_log(&name).expect("serial log"),
        Some(vm.spec.serial_log.clone())
    );
    let outcome = hv
        .wait_until(&name, Instant::now() + Duration::from_secs(150))
        .expect("wait");
    let serial = vm.serial();
    assert!(
        matches!(outcome, WaitOutcome::Ended { .. }),
        "the guest did not power off by itself: {outcome:?}\nserial log:\n{serial}"
    );
    assert_eq!(hv.state(&name).expect("state"), None, "the domain is gone");
    assert!(
        !hv.list().expect("list").iter().any(|d| d.name == name),
        "not listed any more"
    );

    let timed = server.events(&token);
    let to_joined = common::joined_at(&timed).expect("joined") - started;
    let to_done = common::done_at(&timed).expect("done") - started;
    let events: Vec<GuestEvent> = timed.into_iter().map(|(_, e)| e).collect();
    assert_eq!(events.first(), Some(&GuestEvent::Joined), "{events:?}");
    assert_eq!(
        events.last(),
        Some(&GuestEvent::Done("ok".into())),
        "{events:?}\nserial log:\n{serial}"
    );
    assert!(serial.contains("certo-harness: joined"), "{serial}");
    assert!(serial.contains("certo-harness: done"), "{serial}");
    assert_eq!(common::sha256_file(base), before, "the base image changed");
    assert_eq!(
        common::owner(base),
        owner_before,
        "libvirt relabelled the base image"
    );
    // ... while the guest's writes are in the overlay.
    assert_eq!(
        common::file_in_overlay(&vm.spec.root_disk, "/etc/hostname").trim(),
        hostname
    );
    eprintln!(
        "{name}: joined after {:.1} s, done after {:.1} s",
        to_joined.as_secs_f64(),
        to_done.as_secs_f64()
    );
    Certified {
        events,
        serial,
        to_joined,
        to_done,
    }
}

fn results(events: &[GuestEvent]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            GuestEvent::Result {
                suite,
                name,
                outcome,
                ..
            } => Some((suite.clone(), name.clone(), outcome.clone())),
            _ => None,
        })
        .collect()
}

fn services(events: &[GuestEvent]) -> Vec<(String, u16, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            GuestEvent::Service { name, port, state } => Some((name.clone(), *port, state.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn rpm_bdii_boots_starts_its_service_and_passes_its_basic_tests() {
    let base = common::image(&common::rpm_request("3.2", "glite-BDII"));
    let c = certify(
        run_id(1),
        "3.2/sl5_x86_64/glite-BDII",
        &base,
        JoinPlan {
            hostname: "bdii-under-test.certo".into(),
            node_type: "glite-BDII".into(),
            tests: vec![(
                "basic".into(),
                "/usr/share/glite-tests/glite-BDII/basic/*.sh".into(),
            )],
        },
    );
    // One service, started once (the S60bdii rcS link is skipped), listening on 2170.
    assert_eq!(
        services(&c.events),
        [("bdii".to_owned(), 2170, "up".to_owned())],
        "{}",
        c.serial
    );
    let r = results(&c.events);
    assert!(r.len() >= 3, "{r:?}");
    for (suite, name, outcome) in &r {
        assert_eq!(
            (suite.as_str(), outcome.as_str()),
            ("basic", "pass"),
            "{name}: {:?}",
            c.events
        );
    }
    // Sorted by name, as the glob expands.
    let names: Vec<&str> = r.iter().map(|(_, n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(names.contains(&"30-bdii"), "{names:?}");
    // The output came along.
    assert!(
        c.events
            .iter()
            .any(|e| matches!(e, GuestEvent::Result { name, output, .. }
        if name == "30-bdii" && output.contains("PASS: bdii answers on port 2170")))
    );
    assert!(
        c.serial
            .contains("certo-harness: joined: hostname bdii-under-test.certo")
    );
    assert!(c.to_joined < c.to_done);
}

#[test]
fn debian_wn_boots_has_no_services_and_reports_a_failing_regression_test() {
    let base = common::image(&common::deb_request("3.2", "glite-WN"));
    let c = certify(
        run_id(2),
        "3.2/deb12_x86_64/glite-WN",
        &base,
        JoinPlan {
            hostname: "wn-under-test.certo".into(),
            node_type: "glite-WN".into(),
            tests: vec![
                (
                    "basic".into(),
                    "/usr/share/glite-tests/glite-WN/basic/*.sh".into(),
                ),
                (
                    "regression".into(),
                    "/usr/share/glite-tests/glite-WN/regression/*.sh".into(),
                ),
            ],
        },
    );
    assert_eq!(services(&c.events), [], "a WN runs no service");
    let r = results(&c.events);
    let basic: Vec<_> = r.iter().filter(|(s, _, _)| s == "basic").collect();
    assert!(
        !basic.is_empty() && basic.iter().all(|(_, _, o)| o == "pass"),
        "{r:?}"
    );
    // The baseline glite-wn-env 3.2.3-1 has bug 61001: its regression test fails.
    assert!(
        r.contains(&("regression".into(), "bug61001".into(), "fail".into())),
        "{r:?}"
    );
}

#[test]
fn a_hung_guest_is_destroyed_at_the_deadline_and_its_log_kept() {
    common::init_tracing();
    let base = common::image(&common::rpm_request("3.2", "glite-WN"));
    let hv = common::qemu();
    let server = GuestServer::start();
    let name = DomainName::new(run_id(3), "hang", 1).to_string();
    let mut config =
        certo_hosts::guest::GuestConfig::user_network(&server.guest_url(), &name, "tok-hang");
    config.hang = true;
    let vm = Vm::new(
        &name,
        &base,
        config
            .cmdline(certo_hosts::hypervisor::HypervisorKind::Qemu)
            .expect("cmdline"),
    );
    let _guard = vm.start(&hv);
    let t = Instant::now();
    while !vm.serial().contains("hanging on purpose") {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no hang marker:\n{}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let outcome = hv
        .wait_until(&name, Instant::now() + Duration::from_secs(2))
        .expect("wait");
    assert!(
        matches!(outcome, WaitOutcome::Destroyed { .. }),
        "{outcome:?}"
    );
    assert_eq!(hv.state(&name).expect("state"), None);
    assert!(
        vm.serial()
            .contains("certo-harness: hanging on purpose (certo.hang=1)")
    );
    assert!(server.events("tok-hang").is_empty());
}

#[test]
fn a_kernel_panic_ends_the_domain() {
    common::init_tracing();
    let base = common::image(&common::rpm_request("3.2", "glite-WN"));
    let hv = common::qemu();
    let server = GuestServer::start();
    let name = DomainName::new(run_id(4), "panic", 1).to_string();
    let mut config =
        certo_hosts::guest::GuestConfig::user_network(&server.guest_url(), &name, "tok-panic");
    config.panic = true;
    let vm = Vm::new(
        &name,
        &base,
        config
            .cmdline(certo_hosts::hypervisor::HypervisorKind::Qemu)
            .expect("cmdline"),
    );
    let _guard = vm.start(&hv);
    let outcome = hv
        .wait_until(&name, Instant::now() + Duration::from_secs(90))
        .expect("wait");
    let serial = vm.serial();
    assert!(
        matches!(outcome, WaitOutcome::Ended { .. }),
        "{outcome:?}\n{serial}"
    );
    assert!(serial.contains("Kernel panic"), "{serial}");
    assert_eq!(hv.state(&name).expect("state"), None);
}

#[test]
fn a_refused_join_powers_the_guest_off_without_done() {
    common::init_tracing();
    let base = common::image(&common::rpm_request("3.2", "glite-WN"));
    let hv = common::qemu();
    let server = GuestServer::start();
    let name = DomainName::new(run_id(5), "refused", 1).to_string();
    // No plan registered for this token: the server answers 401.
    let vm = Vm::new(&name, &base, common::cmdline(&server, &name, "tok-unknown"));
    let _guard = vm.start(&hv);
    let outcome = hv
        .wait_until(&name, Instant::now() + Duration::from_secs(90))
        .expect("wait");
    let serial = vm.serial();
    assert!(
        matches!(outcome, WaitOutcome::Ended { .. }),
        "{outcome:?}\n{serial}"
    );
    assert_eq!(
        server
            .events("tok-unknown")
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
        [GuestEvent::Refused(401, "/api/v1/guest/join".into())]
    );
    assert!(
        serial.contains("error: POST /api/v1/guest/join failed"),
        "{serial}"
    );
    assert!(serial.contains("401"), "{serial}");
    assert!(!serial.contains("certo-harness: done"), "{serial}");
}

#[test]
fn a_root_disk_that_does_not_mount_is_reported_as_done_with_an_error() {
    common::init_tracing();
    let hv = common::qemu();
    let server = GuestServer::start();
    let name = DomainName::new(run_id(6), "no-fs", 1).to_string();
    let token = "tok-no-fs";
    server.expect_vm(
        token,
        JoinPlan {
            hostname: "never".into(),
            node_type: "glite-WN".into(),
            tests: vec![],
        },
    );
    // A disk without a filesystem.
    let blank_dir = common::vm_dir("blank");
    let blank = blank_dir.path().join("blank.raw");
    std::fs::write(&blank, vec![0u8; 8 << 20]).expect("write blank disk");
    let vm = Vm::new(&name, &blank, common::cmdline(&server, &name, token));
    let _guard = vm.start(&hv);
    let outcome = hv
        .wait_until(&name, Instant::now() + Duration::from_secs(90))
        .expect("wait");
    let serial = vm.serial();
    assert!(
        matches!(outcome, WaitOutcome::Ended { .. }),
        "{outcome:?}\n{serial}"
    );
    let events: Vec<GuestEvent> = server.events(token).into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        events,
        [GuestEvent::Done(
            "error cannot mount /dev/vda (ext4) on /root".into()
        )],
        "{serial}"
    );
}
