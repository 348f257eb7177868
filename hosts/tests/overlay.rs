//! qcow2 overlays with `qemu-img` (no VM: the real boots check guest writes stay in the overlay).

use std::process::Command;

use certo_hosts::overlay::{OverlayError, create_overlay};

#[test]
fn an_overlay_is_qcow2_backed_by_the_raw_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.ext4");
    std::fs::write(&base, vec![7u8; 1 << 20]).expect("write base");
    let overlay = dir.path().join("vm.qcow2");
    create_overlay(&base, &overlay).expect("overlay");

    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    assert!(
        info.contains(&format!("\"backing-filename\": \"{}\"", base.display())),
        "{info}"
    );
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");

    // Each VM gets a fresh overlay: an existing one is refused, not reused.
    assert!(matches!(
        create_overlay(&base, &overlay),
        Err(OverlayError::Exists(_))
    ));
    assert!(matches!(
        create_overlay(
            &dir.path().join("missing.ext4"),
            &dir.path().join("x.qcow2")
        ),
        Err(OverlayError::Base { .. })
    ));
    assert!(matches!(
        create_overlay(dir.path(), &dir.path().join("y.qcow2")),
        Err(OverlayError::Base { .. })
    ));
}
