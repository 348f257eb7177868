//! Overlay and bind mounts for copy-on-write staging, through the real `mount` and
//! `umount` tools, and cleanup of whatever a killed build left mounted.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{BuildError, Phase};
use crate::rooted::ImageRoot;
use rustix::fs::FileType;

/// Mount points at or below `prefix`, deepest first, read from /proc/self/mountinfo.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape(escaped)))
        .filter(|p| p.starts_with(prefix))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `prefix` (lazily if a mount is busy).
pub fn unmount_all_under(prefix: &Path) -> Result<(), BuildError> {
    unmount_points(mounts_under(prefix))
}

/// Unmounts everything strictly below `root`, leaving a mount at `root` itself.
pub fn unmount_all_below(root: &Path) -> Result<(), BuildError> {
    unmount_points(
        mounts_under(root)
            .into_iter()
            .filter(|p| p != root)
            .collect(),
    )
}

fn unmount_points(points: Vec<PathBuf>) -> Result<(), BuildError> {
    for point in points {
        let ok = Command::new("umount")
            .arg(&point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let lazy = Command::new("umount")
                .arg("-l")
                .arg(&point)
                .status()
                .is_ok_and(|s| s.success());
            if !lazy {
                return Err(BuildError::new(
                    Phase::Stage,
                    format!("cannot unmount {}", point.display()),
                ));
            }
        }
    }
    Ok(())
}

fn mount(args: &[&std::ffi::OsStr], what: &str) -> Result<(), BuildError> {
    let out = Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| BuildError::new(Phase::Stage, format!("cannot run mount: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BuildError::new(
            Phase::Stage,
            format!(
                "mounting {what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Refuses paths that the overlay option syntax cannot carry.
fn overlay_safe(path: &Path) -> Result<String, BuildError> {
    let s = path.to_str().ok_or_else(|| {
        BuildError::new(
            Phase::Stage,
            format!("{} is not UTF-8; overlay options need text", path.display()),
        )
    })?;
    if s.contains([':', ',', '\n']) {
        return Err(BuildError::new(
            Phase::Stage,
            format!("{s} contains ':' or ','; an overlay mount cannot use it"),
        ));
    }
    Ok(s.to_owned())
}

/// Mounts an overlay at `merged`: `lowers` top-most first; writable when `upper` is given.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    merged: &Path,
) -> Result<(), BuildError> {
    let lower = lowers
        .iter()
        .map(|p| overlay_safe(p))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let mut options = format!("lowerdir={lower}");
    match upper {
        Some((upper, work)) => {
            options.push_str(&format!(
                ",upperdir={},workdir={}",
                overlay_safe(upper)?,
                overlay_safe(work)?
            ));
        }
        None => options.push_str(",ro"),
    }
    mount(
        &[
            "-t".as_ref(),
            "overlay".as_ref(),
            "overlay".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            merged.as_os_str(),
        ],
        &format!("the overlay at {}", merged.display()),
    )
}

/// The host path of the directory `rel` of an image, created if missing, for use as a
/// mount point: refused when a link or a mount point lies on the way.
fn mount_point(image: &ImageRoot, rel: &str) -> Result<PathBuf, BuildError> {
    image
        .create_dir_all(rel)
        .map_err(|e| BuildError::io(format!("creating /{rel} in the image"), e))?;
    match image.plain_path(rel) {
        Ok(Some((path, FileType::Directory))) => Ok(path),
        Ok(_) => Err(BuildError::new(
            Phase::Stage,
            format!("/{rel} in the image is not a directory: nothing is mounted there"),
        )),
        Err(e) => Err(BuildError::new(
            Phase::Stage,
            format!("refusing to mount at /{rel}: {e}"),
        )),
    }
}

/// Mounts what package managers need inside a root: /proc, /dev and /sys.
pub fn mount_chroot_basics(image: &ImageRoot) -> Result<(), BuildError> {
    let proc = mount_point(image, "proc")?;
    let dev = mount_point(image, "dev")?;
    let sys = mount_point(image, "sys")?;
    mount(
        &[
            "-t".as_ref(),
            "proc".as_ref(),
            "proc".as_ref(),
            proc.as_os_str(),
        ],
        "/proc in the staging root",
    )?;
    mount(
        &["--bind".as_ref(), "/dev".as_ref(), dev.as_os_str()],
        "/dev in the staging root",
    )?;
    mount(
        &["--bind".as_ref(), "/sys".as_ref(), sys.as_os_str()],
        "/sys in the staging root",
    )
}

/// Bind-mounts `source` read-only at the image's directory `rel` (created if missing).
pub fn bind_ro(source: &Path, image: &ImageRoot, rel: &str) -> Result<(), BuildError> {
    let target = mount_point(image, rel)?;
    mount(
        &["--bind".as_ref(), source.as_os_str(), target.as_os_str()],
        &format!("{} at {}", source.display(), target.display()),
    )?;
    mount(
        &[
            "-o".as_ref(),
            "remount,bind,ro".as_ref(),
            target.as_os_str(),
        ],
        &format!("{} read-only", target.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }
}
