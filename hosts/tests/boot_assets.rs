//! The boot assets from the host's real Debian kernel, modules and busybox.

use std::io::Write;
use std::process::{Command, Stdio};

use certo_hosts::boot::{BootAssets, BootInputs, GUEST_MODULES};

fn cpio_listing(initramfs: &std::path::Path) -> String {
    let gz = std::fs::read(initramfs).expect("read initramfs");
    assert!(gz.starts_with(&[0x1f, 0x8b]), "gzip");
    let sh = "gzip -dc | cpio -t --quiet";
    let mut child = Command::new("sh")
        .args(["-c", sh])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || stdin.write_all(&gz));
    let out = child.wait_with_output().expect("cpio");
    feeder.join().expect("feeder").expect("write");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vmlinux_and_initramfs_are_built_once_and_cached_by_their_inputs() {
    let cache = tempfile::tempdir().expect("tempdir");
    let inputs = BootInputs::host().expect("a Debian kernel with modules (linux-image-amd64)");
    let first = BootAssets::prepare(cache.path(), &inputs).expect("boot assets");
    assert!(!first.cached);
    assert_eq!(first.kernel_version, inputs.kernel.version);
    let second = BootAssets::prepare(cache.path(), &inputs).expect("boot assets");
    assert!(second.cached);
    assert_eq!(
        (&second.vmlinux, &second.initramfs),
        (&first.vmlinux, &first.initramfs)
    );

    let elf = std::fs::read(&first.vmlinux).expect("vmlinux");
    assert!(elf.starts_with(b"\x7fELF\x02"), "a 64-bit ELF kernel");
    assert!(
        elf.len()
            > std::fs::metadata(&inputs.kernel.vmlinuz)
                .expect("vmlinuz")
                .len() as usize
    );

    let listing = cpio_listing(&first.initramfs);
    let lines: Vec<&str> = listing.lines().collect();
    for needed in [
        "init",
        "bin/certo-harness",
        "bin/busybox",
        "bin/sh",
        "usr/bin/nc",
        "sbin/rmmod",
        "dev/console",
        "etc/certo-modules",
    ] {
        assert!(
            lines.contains(&needed),
            "{needed} in the initramfs:\n{listing}"
        );
    }
    for m in GUEST_MODULES {
        assert!(
            lines.contains(&format!("lib/modules/{m}.ko").as_str()),
            "{m}:\n{listing}"
        );
    }

    // Another input, another digest and directory.
    let mut fewer = inputs.clone();
    fewer.modules.retain(|m| m != "virtio_net");
    let other = BootAssets::prepare(cache.path(), &fewer).expect("boot assets");
    assert_ne!(other.digest, first.digest);
    assert!(!other.cached);
    assert!(!cpio_listing(&other.initramfs).contains("virtio_net.ko"));
}
