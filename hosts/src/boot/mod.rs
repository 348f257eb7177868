//! Boot assets: the kernel and initramfs every Certo VM boots with (direct kernel boot; the
//! image is only the root filesystem, so Debian and RPM-family images boot the same way).
//!
//! - kernel: the host's Debian kernel, decompressed to `vmlinux` (QEMU boots the ELF through
//!   PVH, ~5-6 s to first output under TCG against ~11-15 s for the compressed `vmlinuz`);
//! - initramfs (newc cpio, gzip): static busybox and its applet links, the virtio/ext4 modules
//!   of that kernel in load order, `/init` and `/bin/certo-harness` (see `hosts/README.md`).
//!
//! Both are cached under `CACHE/boot-<digest>/`, the digest being SHA-256 over every input
//! (kernel image, module objects, busybox, scripts, the format version).

pub mod cpio;
pub mod kernel;
pub mod modules;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

pub use kernel::{HostKernel, extract_vmlinux, find_kernel};
pub use modules::{GUEST_MODULES, Module, resolve};

/// The guest's `/init` (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("../harness/init.sh");
/// The guest harness, `/bin/certo-harness` (busybox sh).
pub const HARNESS_SCRIPT: &str = include_str!("../harness/harness.sh");

/// Bump when the layout of the assets changes without their inputs changing.
const FORMAT: &str = "certo-boot-assets v1";

/// Preparing the boot assets failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No kernel with modules was found.
    #[error(
        "no vmlinuz-* in {boot_dir} with modules under {modules_root} (install linux-image-amd64)"
    )]
    NoKernel {
        /// Where kernels were looked for.
        boot_dir: PathBuf,
        /// Where modules were looked for.
        modules_root: PathBuf,
    },
    /// The ELF kernel could not be extracted.
    #[error("cannot extract vmlinux from {vmlinuz}: {message}")]
    Extract {
        /// The compressed kernel.
        vmlinuz: PathBuf,
        /// Why.
        message: String,
    },
    /// A module is missing or unreadable.
    #[error("kernel module {module}: {message}")]
    Module {
        /// The module name.
        module: String,
        /// Why.
        message: String,
    },
    /// busybox is missing or not static.
    #[error("busybox {path}: {message}")]
    Busybox {
        /// The binary.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// gzip of the initramfs failed.
    #[error("compressing the initramfs: {0}")]
    Compress(String),
}

impl BootError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Where the inputs come from.
#[derive(Debug, Clone)]
pub struct BootInputs {
    /// The kernel (and its modules directory).
    pub kernel: HostKernel,
    /// A static busybox binary (Debian: busybox-static, `/bin/busybox`).
    pub busybox: PathBuf,
    /// Modules to load in the guest (dependencies are added).
    pub modules: Vec<String>,
}

impl BootInputs {
    /// The host's newest Debian kernel in `/boot` with its `/lib/modules`, `/bin/busybox`,
    /// and [`GUEST_MODULES`].
    pub fn host() -> Result<Self, BootError> {
        Ok(Self {
            kernel: find_kernel(Path::new("/boot"), Path::new("/lib/modules"))?,
            busybox: PathBuf::from("/bin/busybox"),
            modules: GUEST_MODULES.iter().map(|s| (*s).to_owned()).collect(),
        })
    }
}

/// The kernel and initramfs to boot Certo VMs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAssets {
    /// The decompressed kernel (ELF, PVH entry).
    pub vmlinux: PathBuf,
    /// The initramfs (gzip'd newc cpio).
    pub initramfs: PathBuf,
    /// The kernel version, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// Hex SHA-256 over every input: the cache key.
    pub digest: String,
    /// Whether they came from the cache.
    pub cached: bool,
}

impl BootAssets {
    /// Finds or builds the assets for `inputs` under `cache_dir` (created if missing).
    /// Concurrent callers are safe: each builds in a private directory, the first rename wins.
    pub fn prepare(cache_dir: &Path, inputs: &BootInputs) -> Result<Self, BootError> {
        let started = std::time::Instant::now();
        let wanted: Vec<&str> = inputs.modules.iter().map(String::as_str).collect();
        let modules = resolve(&inputs.kernel.modules, &wanted)?;
        let vmlinuz = std::fs::read(&inputs.kernel.vmlinuz)
            .map_err(|e| BootError::io(&inputs.kernel.vmlinuz, e))?;
        let busybox =
            std::fs::read(&inputs.busybox).map_err(|e| BootError::io(&inputs.busybox, e))?;
        let mut objects = Vec::new();
        for m in &modules {
            objects.push((m.name.clone(), modules::module_object(m)?));
        }

        let mut h = Sha256::new();
        let mut part = |label: &str, bytes: &[u8]| {
            h.update((label.len() as u64).to_le_bytes());
            h.update(label.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part("format", FORMAT.as_bytes());
        part("kernel-version", inputs.kernel.version.as_bytes());
        part("vmlinuz", &vmlinuz);
        part("busybox", &busybox);
        part("init", INIT_SCRIPT.as_bytes());
        part("harness", HARNESS_SCRIPT.as_bytes());
        for (name, obj) in &objects {
            part(name, obj);
        }
        let digest = hex::encode(h.finalize());

        let dir = cache_dir.join(format!("boot-{}", &digest[..16]));
        let assets = Self {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.img"),
            kernel_version: inputs.kernel.version.clone(),
            digest: digest.clone(),
            cached: true,
        };
        if assets.vmlinux.is_file() && assets.initramfs.is_file() {
            return Ok(assets);
        }

        std::fs::create_dir_all(cache_dir).map_err(|e| BootError::io(cache_dir, e))?;
        let tmp = cache_dir.join(format!(".boot-{}.{}", &digest[..16], std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| BootError::io(&tmp, e))?;
        let result = (|| {
            let vmlinux = extract_vmlinux(&inputs.kernel.vmlinuz)?;
            write(&tmp.join("vmlinux"), &vmlinux)?;
            let cpio = initramfs_cpio(&inputs.busybox, &busybox, &objects)?;
            let gz = filter("gzip", &["-n", "-6"], &cpio).map_err(BootError::Compress)?;
            write(&tmp.join("initramfs.img"), &gz)?;
            // World-readable: libvirt's QEMU runs as its own user.
            set_readable(&tmp)?;
            match std::fs::rename(&tmp, &dir) {
                Ok(()) => Ok(()),
                // Another builder won the race with the same content.
                Err(_) if dir.join("initramfs.img").is_file() => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    Ok(())
                }
                Err(e) => Err(BootError::io(&dir, e)),
            }
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result?;
        tracing::info!(
            dir = %dir.display(),
            kernel = %inputs.kernel.version,
            modules = objects.len(),
            duration_ms = started.elapsed().as_millis() as u64,
            "boot assets built"
        );
        Ok(Self {
            cached: false,
            ..assets
        })
    }

    /// [`BootAssets::prepare`] with [`BootInputs::host`].
    pub fn prepare_host(cache_dir: &Path) -> Result<Self, BootError> {
        Self::prepare(cache_dir, &BootInputs::host()?)
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), BootError> {
    std::fs::write(path, data).map_err(|e| BootError::io(path, e))
}

fn set_readable(dir: &Path) -> Result<(), BootError> {
    use std::os::unix::fs::PermissionsExt;
    let perm = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| BootError::io(p, e))
    };
    perm(dir, 0o755)?;
    perm(&dir.join("vmlinux"), 0o644)?;
    perm(&dir.join("initramfs.img"), 0o644)
}

/// The initramfs as an uncompressed cpio archive.
fn initramfs_cpio(
    busybox_path: &Path,
    busybox: &[u8],
    modules: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, BootError> {
    let applets = applets(busybox_path)?;
    let mut c = cpio::Cpio::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "root",
        "tmp",
        "run",
        "etc",
        "lib",
        "lib/modules",
    ] {
        c.dir(d, if d == "tmp" { 0o1777 } else { 0o755 });
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("bin/busybox", 0o755, busybox);
    for a in &applets {
        if a != "bin/busybox" {
            c.symlink(a, "/bin/busybox");
        }
    }
    let mut order = String::new();
    for (name, obj) in modules {
        c.file(&format!("lib/modules/{name}.ko"), 0o644, obj);
        order.push_str(name);
        order.push('\n');
    }
    c.file("etc/certo-modules", 0o644, order.as_bytes());
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    c.file("bin/certo-harness", 0o755, HARNESS_SCRIPT.as_bytes());
    Ok(c.finish())
}

/// `bin/sh`, `sbin/ip`, ... from `busybox --list-full`; refuses a dynamically linked busybox.
fn applets(busybox: &Path) -> Result<Vec<String>, BootError> {
    let elf = std::fs::read(busybox).map_err(|e| BootError::io(busybox, e))?;
    if has_interpreter(&elf) {
        return Err(BootError::Busybox {
            path: busybox.to_owned(),
            message: "dynamically linked; install busybox-static".into(),
        });
    }
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| BootError::io(busybox, e))?;
    if !out.status.success() {
        return Err(BootError::Busybox {
            path: busybox.to_owned(),
            message: format!("--list-full: {}", out.status),
        });
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(".."))
        .map(str::to_owned)
        .collect();
    for needed in [
        "bin/sh",
        "sbin/insmod",
        "bin/mount",
        "sbin/ip",
        "usr/bin/nc",
        "sbin/rmmod",
        "usr/bin/timeout",
        "usr/bin/awk",
        "sbin/poweroff",
    ] {
        if !list.iter().any(|a| a == needed) {
            return Err(BootError::Busybox {
                path: busybox.to_owned(),
                message: format!("has no applet {needed}"),
            });
        }
    }
    Ok(list)
}

/// Whether a 64-bit little-endian ELF executable has a `PT_INTERP` program header (names a
/// dynamic loader). Anything that is not such an ELF file counts as dynamic.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF\x02\x01") {
        return true;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&elf[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff.saturating_add(i * size);
        match elf.get(at..at + 4) {
            Some(t) => u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP,
            None => true,
        }
    })
}

/// Runs `tool args` with `input` on stdin and returns its stdout.
pub(crate) fn filter(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    let fed = feeder.join();
    if !out.status.success() {
        return Err(format!(
            "{tool} {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    match fed {
        Ok(Ok(())) => Ok(out.stdout),
        Ok(Err(e)) => Err(format!("{tool}: writing its input: {e}")),
        Err(_) => Err(format!("{tool}: the input thread panicked")),
    }
}
