//! Boot timings of real VMs under qemu:///system (not part of the test suite).
//!
//! ```sh
//! cargo run -p certo-hosts --example boot_bench -- [--runs 3] [--max-vms 4] [--rounds 2] [--image rpm|deb]
//! ```
//!
//! 1. One VM at a time, `--runs` times: time from the start request to the guest's join and
//!    to its `done` (both seen by the in-process guest-protocol server); medians.
//! 2. N = 1..=`--max-vms` VMs started together, `--rounds` times: the median time to `done`
//!    over all N × rounds VMs, and the slowest.
//!
//! The guest is the fixture image 3.2 sl5_x86_64 glite-BDII (RPM family, busybox userland; one
//! service, three basic tests) or, with `--image deb`, 3.2 deb12_x86_64 glite-WN.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use certo_hosts::domain_name::DomainName;
use certo_hosts::hypervisor::{Hypervisor, WaitOutcome};
use common::{GuestServer, JoinPlan, Vm};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Boots `n` VMs at once; returns (to_joined, to_done) per VM in seconds.
fn boot_together(
    hv: &dyn Hypervisor,
    server: &GuestServer,
    base: &std::path::Path,
    plan: &JoinPlan,
    run: u64,
    n: usize,
) -> Vec<(f64, f64)> {
    let mut vms = Vec::new();
    for i in 0..n {
        let name = DomainName::new(run, "bench", i as u32 + 1).to_string();
        let token = format!("bench-{run}-{i}");
        server.expect_vm(&token, plan.clone());
        let vm = Vm::new(&name, base, common::cmdline(server, &name, &token));
        vms.push((vm, token));
    }
    let mut guards = Vec::new();
    let mut started = Vec::new();
    for (vm, _) in &vms {
        started.push(Instant::now());
        guards.push(vm.start(hv));
    }
    let mut out = Vec::new();
    for (i, (vm, token)) in vms.iter().enumerate() {
        let outcome = hv
            .wait_until(&vm.spec.name, Instant::now() + Duration::from_secs(300))
            .expect("wait");
        assert!(
            matches!(outcome, WaitOutcome::Ended { .. }),
            "{} did not finish: {outcome:?}\n{}",
            vm.spec.name,
            vm.serial()
        );
        let ev = server.events(token);
        let (Some(joined), Some(done)) = (common::joined_at(&ev), common::done_at(&ev)) else {
            panic!(
                "{} did not join and finish: {ev:?}\nserial log:\n{}",
                vm.spec.name,
                vm.serial()
            );
        };
        let (joined, done) = (joined - started[i], done - started[i]);
        out.push((joined.as_secs_f64(), done.as_secs_f64()));
    }
    drop(guards);
    out
}

fn main() {
    let mut runs = 3usize;
    let mut max_vms = 4usize;
    let mut rounds = 2usize;
    let mut deb = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--max-vms" => {
                max_vms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--max-vms N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--image" => deb = args.next().as_deref() == Some("deb"),
            other => panic!("unknown argument {other}; see the example's docs"),
        }
    }
    let (request, plan) = if deb {
        (
            common::deb_request("3.2", "glite-WN"),
            JoinPlan {
                hostname: "wn.bench.certo".into(),
                node_type: "glite-WN".into(),
                tests: vec![(
                    "basic".into(),
                    "/usr/share/glite-tests/glite-WN/basic/*.sh".into(),
                )],
            },
        )
    } else {
        (
            common::rpm_request("3.2", "glite-BDII"),
            JoinPlan {
                hostname: "bdii.bench.certo".into(),
                node_type: "glite-BDII".into(),
                tests: vec![(
                    "basic".into(),
                    "/usr/share/glite-tests/glite-BDII/basic/*.sh".into(),
                )],
            },
        )
    };
    let base = common::image(&request);
    let assets = common::assets();
    println!(
        "image {} ({}), kernel {} (vmlinux, PVH), initramfs {}",
        base.display(),
        request.platform.label,
        assets.kernel_version,
        assets.initramfs.display()
    );
    let hv = common::qemu();
    let server = GuestServer::start();
    let run0 = u64::from(std::process::id()) * 100;

    let mut joined = Vec::new();
    let mut done = Vec::new();
    for r in 0..runs {
        let t = boot_together(&hv, &server, &base, &plan, run0 + r as u64, 1);
        println!(
            "single VM run {}: joined {:.2} s, done {:.2} s",
            r + 1,
            t[0].0,
            t[0].1
        );
        joined.push(t[0].0);
        done.push(t[0].1);
    }
    println!(
        "single VM, median of {runs}: start -> joined {:.2} s, start -> done {:.2} s",
        median(joined),
        median(done)
    );

    println!(
        "concurrent VMs (256 MiB, 1 vCPU each; host has {} CPUs):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  N   median joined   median done   slowest done   ({rounds} rounds)");
    for n in 1..=max_vms {
        let mut t = Vec::new();
        for r in 0..rounds {
            t.extend(boot_together(
                &hv,
                &server,
                &base,
                &plan,
                run0 + 10 * (n as u64 + 1) + r as u64,
                n,
            ));
        }
        let slowest = t.iter().map(|x| x.1).fold(0.0, f64::max);
        println!(
            "  {n}   {:>10.2} s   {:>9.2} s   {:>10.2} s",
            median(t.iter().map(|x| x.0).collect()),
            median(t.iter().map(|x| x.1).collect()),
            slowest
        );
    }
}
