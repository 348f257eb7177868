//! Kernel modules for the initramfs: resolved with `modules.dep`, in load order.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::BootError;

/// What the guest needs to reach its disk, its NIC and an ext4 root: virtio (PCI), virtio-blk,
/// virtio-net and ext4 with its checksum algorithm. Dependencies are added from `modules.dep`.
pub const GUEST_MODULES: &[&str] = &[
    "qemu_fw_cfg",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "crc32c_generic",
    "crc16",
    "mbcache",
    "jbd2",
    "ext4",
];

/// One module to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name (`-` written as `_`), e.g. `virtio_pci`.
    pub name: String,
    /// Its file under the modules directory (`.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`).
    pub path: PathBuf,
}

/// `virtio-pci.ko.xz` → `virtio_pci`.
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Resolves `wanted` against `modules_dir/modules.dep`: the modules and their dependencies in
/// an order where every module comes after what it needs. Built-in modules (in
/// `modules.builtin`) are left out; an unknown module is an error.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, BootError> {
    let dep_file = modules_dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_file).map_err(|e| BootError::io(&dep_file, e))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(file), (file.to_owned(), needs));
    }
    let builtin: HashSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if !deps.contains_key(&name) {
            if builtin.contains(&name) {
                continue;
            }
            return Err(BootError::Module {
                module: name,
                message: format!("neither in {} nor built in", dep_file.display()),
            });
        }
        visit(&name, &deps, &mut seen, &mut order, 0)?;
    }
    Ok(order
        .into_iter()
        .map(|name| {
            let path = modules_dir.join(&deps[&name].0);
            Module { name, path }
        })
        .collect())
}

fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), BootError> {
    if seen.contains(name) {
        return Ok(());
    }
    if depth > 64 {
        return Err(BootError::Module {
            module: name.to_owned(),
            message: "dependency cycle in modules.dep".into(),
        });
    }
    let Some((_, needs)) = deps.get(name) else {
        return Err(BootError::Module {
            module: name.to_owned(),
            message: "a dependency missing from modules.dep".into(),
        });
    };
    for n in needs {
        visit(n, deps, seen, order, depth + 1)?;
    }
    seen.insert(name.to_owned());
    order.push(name.to_owned());
    Ok(())
}

/// The module's ELF object, decompressed if its file is `.ko.xz` (with `xz`), `.ko.zst`
/// (`zstd`) or `.ko.gz` (`gzip`).
pub fn module_object(m: &Module) -> Result<Vec<u8>, BootError> {
    let data = std::fs::read(&m.path).map_err(|e| BootError::io(&m.path, e))?;
    let file = m.path.to_string_lossy();
    let tool = if file.ends_with(".ko.xz") {
        Some(("xz", &["-dc"][..]))
    } else if file.ends_with(".ko.zst") {
        Some(("zstd", &["-dcq"][..]))
    } else if file.ends_with(".ko.gz") {
        Some(("gzip", &["-dc"][..]))
    } else {
        None
    };
    let object = match tool {
        None => data,
        Some((tool, args)) => {
            super::filter(tool, args, &data).map_err(|message| BootError::Module {
                module: m.name.clone(),
                message,
            })?
        }
    };
    if !object.starts_with(b"\x7fELF") {
        return Err(BootError::Module {
            module: m.name.clone(),
            message: format!("{} is not an ELF object", m.path.display()),
        });
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_builtins_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
             kernel/lib/crc16.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/fs/jbd2/jbd2.ko.xz:\n\
             kernel/drivers/virtio/virtio-pci.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio.ko:\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/crypto/crc32c_generic.ko\n",
        )
        .expect("write");
        let got = resolve(
            dir.path(),
            &["ext4", "crc32c-generic", "virtio_pci", "crc16"],
        )
        .expect("resolves");
        let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["crc16", "mbcache", "jbd2", "ext4", "virtio", "virtio_pci"]
        );
        assert!(got[3].path.ends_with("kernel/fs/ext4/ext4.ko.xz"));
        assert!(matches!(
            resolve(dir.path(), &["nosuch"]),
            Err(BootError::Module { .. })
        ));
    }
}
