// temporary: manual boot experiment
use certo_hosts::boot::BootAssets;
use certo_hosts::hypervisor::*;
#[test]
#[ignore]
fn scratch() {
    let t = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let a = BootAssets::prepare_host(&t.join("boot-cache")).expect("assets");
    let s = t.join("scratch");
    let _ = std::fs::remove_file(s.join("ov.qcow2"));
    let _ = std::fs::remove_file(s.join("serial.log"));
    certo_hosts::overlay::create_overlay(&s.join("base.ext4"), &s.join("ov.qcow2")).expect("ov");
    let hv = LibvirtHypervisor::connect("qemu:///system").expect("connect");
    let cfg =
        certo_hosts::guest::GuestConfig::user_network("http://10.0.2.2:1", "certo-r1-x-a1", "tok");
    let spec = DomainSpec {
        name: "certo-r1-x-a1".into(),
        memory_mib: 256,
        vcpus: 1,
        kernel: a.vmlinux.clone(),
        initramfs: a.initramfs.clone(),
        cmdline: cfg.cmdline(HypervisorKind::Qemu).unwrap(),
        root_disk: s.join("ov.qcow2"),
        serial_log: s.join("serial.log"),
        network: Network::User,
    };
    let t0 = std::time::Instant::now();
    hv.start(&spec, Persistence::Transient).expect("start");
    println!("log {:?}", hv.serial_log("certo-r1-x-a1"));
    let r = hv.wait_until(
        "certo-r1-x-a1",
        std::time::Instant::now() + std::time::Duration::from_secs(60),
    );
    println!("{r:?} after {:?}", t0.elapsed());
    println!(
        "{}",
        std::fs::read_to_string(s.join("serial.log")).unwrap_or_default()
    );
}
