//! The host's Debian kernel: find `/boot/vmlinuz-*`, and extract the `vmlinux` ELF inside it
//! (the xz stream), which QEMU boots through PVH several seconds faster under TCG.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::BootError;

/// The start of an xz stream.
pub const XZ_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// A kernel image and the version its modules are installed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKernel {
    /// `/boot/vmlinuz-VERSION`.
    pub vmlinuz: PathBuf,
    /// `VERSION`, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// `/lib/modules/VERSION`.
    pub modules: PathBuf,
}

/// The newest `vmlinuz-*` in `boot_dir` that has a modules directory under `modules_root`
/// (versions compared numerically, part by part).
pub fn find_kernel(boot_dir: &Path, modules_root: &Path) -> Result<HostKernel, BootError> {
    let entries = std::fs::read_dir(boot_dir).map_err(|e| BootError::io(boot_dir, e))?;
    let mut found: Vec<HostKernel> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| BootError::io(boot_dir, e))?;
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else {
            continue;
        };
        let modules = modules_root.join(version);
        if modules.join("modules.dep").is_file() {
            found.push(HostKernel {
                vmlinuz: entry.path(),
                version: version.to_owned(),
                modules,
            });
        }
    }
    found.sort_by_key(|k| version_key(&k.version));
    found.pop().ok_or_else(|| BootError::NoKernel {
        boot_dir: boot_dir.to_owned(),
        modules_root: modules_root.to_owned(),
    })
}

fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '-'])
        .map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            (digits.parse().unwrap_or(0), p.to_owned())
        })
        .collect()
}

/// Extracts the ELF `vmlinux` from a compressed kernel image: tries each xz stream start in
/// the file and decompresses it with `xz -dc --single-stream` until one yields an ELF file.
pub fn extract_vmlinux(vmlinuz: &Path) -> Result<Vec<u8>, BootError> {
    let image = std::fs::read(vmlinuz).map_err(|e| BootError::io(vmlinuz, e))?;
    let mut last = String::from("no xz stream found");
    let mut at = 0;
    while let Some(pos) = find(&image[at..], &XZ_MAGIC) {
        let start = at + pos;
        match xz_decompress(&image[start..]) {
            Ok(out) if out.starts_with(b"\x7fELF") => {
                tracing::debug!(vmlinuz = %vmlinuz.display(), offset = start, bytes = out.len(), "vmlinux extracted");
                return Ok(out);
            }
            Ok(_) => last = format!("the xz stream at offset {start} is not an ELF file"),
            Err(e) => last = format!("the xz stream at offset {start}: {e}"),
        }
        at = start + 1;
    }
    Err(BootError::Extract {
        vmlinuz: vmlinuz.to_owned(),
        message: last,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decompresses one xz stream (trailing bytes are ignored) with the `xz` tool.
pub fn xz_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run xz: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = data.to_vec();
    // Feed stdin from a thread: xz writes while it reads.
    let feeder = std::thread::spawn(move || {
        // xz stops reading at the end of the stream: a broken pipe is expected.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(format!(
            "xz {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64"]);
    }

    #[test]
    fn garbage_around_an_xz_stream_is_skipped() {
        let mut child = Command::new("xz")
            .args(["-c", "-z"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz runs (Debian package xz-utils)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"\x7fELF and the rest of a kernel")
            .expect("write");
        let xz = child.wait_with_output().expect("xz").stdout;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinuz-test");
        // A false magic first, then the real stream, then trailing bytes.
        let mut image = b"MZ header \xFD7zXZ\x00 not a stream ".to_vec();
        image.extend_from_slice(&xz);
        image.extend_from_slice(b"\x00\x01\x02\x03 trailer");
        std::fs::write(&path, &image).expect("write");
        assert_eq!(
            extract_vmlinux(&path).expect("extracts"),
            b"\x7fELF and the rest of a kernel"
        );
        std::fs::write(&path, b"no stream here").expect("write");
        assert!(matches!(
            extract_vmlinux(&path),
            Err(BootError::Extract { .. })
        ));
    }
}
