//! Paths inside an image tree, resolved the way the image itself resolves them.
//!
//! The imager works on a tree (a staging overlay or a core layer) after package scripts
//! have run in it, as root, outside the chroot. A script may have made any directory a
//! symbolic link (`/var/tmp -> /tmp` is a common layout; `-> /` a broken one). A plain
//! `root.join(rel)` would follow such a link out of the image and act on the build host.
//! [`ImageRoot`] resolves every path with `openat2(RESOLVE_IN_ROOT)`: an absolute link
//! or a `..` is scoped to the tree, as it would be in the guest, and no path crosses a
//! mount point (`RESOLVE_NO_XDEV`: the `/proc`, `/dev` and `/sys` binds of a chroot are
//! the host's own). Removal walks directories by descriptor and never follows a link.

use std::ffi::CStr;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How every path inside an image is resolved.
const IN_IMAGE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A path Certo hands to an outside tool (a mount point): no link in any component.
const PLAIN: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_XDEV);

/// An image tree, opened once; every operation stays inside it.
#[derive(Debug)]
pub struct ImageRoot {
    dir: OwnedFd,
    path: PathBuf,
}

impl ImageRoot {
    /// Opens the tree at `path` (a directory on the host, chosen by Certo).
    pub fn open(path: &Path) -> io::Result<Self> {
        let dir = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ImageRoot {
            dir,
            path: path.to_owned(),
        })
    }

    /// The tree's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn resolve(&self, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat2(
            &self.dir,
            relative(rel),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            IN_IMAGE,
        )
    }

    /// The directory holding `rel`, resolved inside the image, and the last component.
    fn parent_of<'a>(&self, rel: &'a str) -> io::Result<(OwnedFd, &'a str)> {
        let rel = relative(rel);
        let (parent, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => (".", rel),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{rel} does not name a file"),
            ));
        }
        Ok((
            self.resolve(parent, OFlags::PATH | OFlags::DIRECTORY)?,
            name,
        ))
    }

    /// Opens the regular file `rel` for reading and writing; a link on the way is
    /// followed inside the image.
    pub fn open_file(&self, rel: &str) -> io::Result<std::fs::File> {
        let fd = self.resolve(rel, OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK)?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{} is not a regular file", relative(rel)),
            ));
        }
        Ok(std::fs::File::from(fd))
    }

    /// Whether `rel` is a regular file (a link on the way followed inside the image).
    pub fn is_file(&self, rel: &str) -> bool {
        self.resolve(rel, OFlags::PATH)
            .and_then(|fd| rustix::fs::fstat(&fd))
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
    }

    /// Reads the regular file `rel`.
    pub fn read_to_string(&self, rel: &str) -> io::Result<String> {
        let mut text = String::new();
        self.open_file(rel)?.read_to_string(&mut text)?;
        Ok(text)
    }

    /// Replaces the content of the existing regular file `rel` (same inode, same mode).
    pub fn rewrite(&self, rel: &str, content: &[u8]) -> io::Result<()> {
        let mut file = self.open_file(rel)?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(content)
    }

    /// Creates the file `rel` with `content` and `mode`; false if something is there
    /// already (which is left as it is).
    pub fn create_new(&self, rel: &str, content: &[u8], mode: u32) -> io::Result<bool> {
        let (parent, name) = self.parent_of(rel)?;
        let fd = match rustix::fs::openat(
            &parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::EXIST) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mut file = std::fs::File::from(fd);
        file.write_all(content)?;
        // The mode is exact, whatever the umask.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
        Ok(true)
    }

    /// Writes `content` to `rel`, creating or truncating a regular file; a link as the
    /// last component is refused.
    pub fn write(&self, rel: &str, content: &[u8]) -> io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        std::fs::File::from(fd).write_all(content)
    }

    /// Removes the file (or link) `rel`; nothing there is not an error.
    pub fn remove_file(&self, rel: &str) -> io::Result<()> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the directory `rel` and everything in it; nothing there is not an error.
    pub fn remove_tree(&self, rel: &str) -> io::Result<()> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let parent = reopen_dir(&parent)?;
        remove_entry(&parent, cstr(name)?.as_c_str(), dev_of(&parent)?)
    }

    /// Removes everything in the directory `rel` but the entries named in `keep`,
    /// never following a link and never leaving the tree's filesystem. A missing
    /// directory is left alone; so is one that is a link (emptying what `/var/tmp -> /`
    /// names would empty the whole image): that is an error the caller may report.
    pub fn empty_dir(&self, rel: &str, keep: &[&str]) -> io::Result<()> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let dir = match rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("/{} is not a directory (a symbolic link?)", relative(rel)),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let dev = dev_of(&dir)?;
        if dev != dev_of(&self.dir)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{} is a mount point", relative(rel)),
            ));
        }
        for name in entries(&dir)? {
            if keep.iter().any(|k| k.as_bytes() == name.as_bytes()) {
                continue;
            }
            remove_entry(&dir, &name, dev)?;
        }
        Ok(())
    }

    /// The entries of the directory `rel` (resolved inside the image), sorted, each with
    /// whether it is itself a directory (a link is not: it is not followed).
    pub fn list_dir(&self, rel: &str) -> io::Result<Vec<(String, bool)>> {
        let dir = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut out = Vec::new();
        for name in entries(&dir)? {
            let is_dir = rustix::fs::statat(&dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
            if let Ok(name) = name.into_string() {
                out.push((name, is_dir));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates the directory `rel` and its parents (mode 0755), resolving inside the image.
    pub fn create_dir_all(&self, rel: &str) -> io::Result<()> {
        let rel = relative(rel);
        let mut done = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let parent = self.resolve(
                if done.is_empty() { "." } else { &done },
                OFlags::PATH | OFlags::DIRECTORY,
            )?;
            match rustix::fs::mkdirat(&parent, part, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(part);
        }
        // What is there must be a directory, reached inside the image.
        self.resolve(rel, OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(())
    }

    /// The host path of `rel` when no component of it is a link and it does not cross
    /// a mount point: a path that may be given to `mount` or another outside tool.
    /// `Ok(None)` when nothing is there.
    pub fn plain_path(&self, rel: &str) -> io::Result<Option<(PathBuf, FileType)>> {
        let rel = relative(rel);
        match rustix::fs::openat2(
            &self.dir,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            PLAIN,
        ) {
            Ok(fd) => {
                let stat = rustix::fs::fstat(&fd)?;
                Ok(Some((
                    self.path.join(rel),
                    FileType::from_raw_mode(stat.st_mode),
                )))
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(rustix::io::Errno::LOOP) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{rel} in the image goes through a symbolic link"),
            )),
            Err(rustix::io::Errno::XDEV) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{rel} in the image crosses a mount point"),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

/// `rel` without leading slashes: every path is taken relative to the image root.
fn relative(rel: &str) -> &str {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() { "." } else { rel }
}

fn cstr(name: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

fn dev_of(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_dev)
}

fn reopen_dir(fd: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in a directory, without `.` and `..`.
fn entries(dir: &OwnedFd) -> io::Result<Vec<std::ffi::CString>> {
    let mut names = Vec::new();
    let mut reader = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`: a directory depth first (opened without following links,
/// left alone if it is another filesystem's mount point), anything else unlinked.
fn remove_entry(dir: &OwnedFd, name: &CStr, dev: u64) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let child = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if dev_of(&child)? != dev {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a mount point: not removed", name.to_string_lossy()),
        ));
    }
    for entry in entries(&child)? {
        remove_entry(&child, &entry, dev)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A tree with links that point out of it, at a canary directory beside it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let top = tempfile::tempdir().expect("tempdir");
        let canary = top.path().join("canary");
        std::fs::create_dir_all(canary.join("etc")).expect("canary");
        std::fs::write(canary.join("keep.txt"), "host file\n").expect("canary file");
        std::fs::write(canary.join("etc/site.conf"), "KEY=host\n").expect("canary conf");
        let root = top.path().join("root");
        for d in ["var", "opt/app", "spool"] {
            std::fs::create_dir_all(root.join(d)).expect("tree");
        }
        // The image's own copy of the place the links name.
        let inside = root.join(canary.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(inside.join("etc")).expect("inside");
        std::fs::write(inside.join("junk"), "image junk\n").expect("inside junk");
        std::fs::write(inside.join("etc/site.conf"), "KEY=image\n").expect("inside conf");
        symlink(&canary, root.join("var/tmp")).expect("link");
        symlink(canary.join("etc"), root.join("opt/app/etc")).expect("link");
        symlink("../../..", root.join("spool/up")).expect("link");
        (top, root, canary)
    }

    #[test]
    fn emptying_never_follows_a_link() {
        let (_top, root, canary) = setup();
        let image = ImageRoot::open(&root).expect("open");
        let err = image
            .empty_dir("var/tmp", &[])
            .expect_err("a link is refused");
        assert!(err.to_string().contains("/var/tmp"), "{err}");
        // A link inside an emptied directory is removed as a link.
        std::fs::write(root.join("spool/junk"), "x").expect("junk");
        image.empty_dir("spool", &[]).expect("empty spool");
        // A linked parent resolves inside the image.
        let inside = root.join(canary.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(inside.join("etc/sub")).expect("sub");
        std::fs::write(inside.join("etc/sub/f"), "x").expect("f");
        std::fs::create_dir_all(canary.join("etc/sub")).expect("sub");
        std::fs::write(canary.join("etc/sub/f"), "x").expect("f");
        image
            .empty_dir("opt/app/etc/sub", &[])
            .expect("empty through a linked parent");
        assert_eq!(
            std::fs::read_to_string(canary.join("keep.txt")).expect("host file"),
            "host file\n"
        );
        assert!(canary.join("etc/sub/f").exists(), "the host's copy stays");
        assert!(
            !inside.join("etc/sub/f").exists(),
            "the image's copy is emptied"
        );
        assert!(
            inside.join("junk").exists(),
            "what the refused link names stays"
        );
        assert!(
            root.join("opt").is_dir(),
            "a link to .. removes only the link"
        );
        assert!(
            root.join("spool")
                .read_dir()
                .expect("spool")
                .next()
                .is_none()
        );
    }

    #[test]
    fn configuration_through_a_linked_parent_changes_the_image_only() {
        let (_top, root, canary) = setup();
        let image = ImageRoot::open(&root).expect("open");
        assert_eq!(
            image.read_to_string("opt/app/etc/site.conf").expect("read"),
            "KEY=image\n"
        );
        image
            .rewrite("/opt/app/etc/site.conf", b"KEY=new\n")
            .expect("rewrite");
        assert_eq!(
            std::fs::read_to_string(canary.join("etc/site.conf")).expect("host"),
            "KEY=host\n"
        );
        let inside = root.join(canary.strip_prefix("/").expect("absolute"));
        assert_eq!(
            std::fs::read_to_string(inside.join("etc/site.conf")).expect("image"),
            "KEY=new\n"
        );
    }

    #[test]
    fn files_are_created_and_removed_inside_the_image() {
        let (_top, root, canary) = setup();
        let image = ImageRoot::open(&root).expect("open");
        assert!(
            image
                .create_new("var/tmp/made", b"x", 0o600)
                .expect("create")
        );
        assert!(!canary.join("made").exists());
        assert!(
            !image
                .create_new("var/tmp/made", b"y", 0o600)
                .expect("again")
        );
        image.remove_file("var/tmp/made").expect("remove");
        image.remove_file("var/tmp/absent").expect("absent is fine");
        image
            .write("opt/app/etc/new.conf", b"A=1\n")
            .expect("write");
        assert!(!canary.join("etc/new.conf").exists());
        image.create_dir_all("var/tmp/a/b").expect("mkdir");
        assert!(!canary.join("a").exists());
        image.remove_tree("var/tmp/a").expect("remove tree");
    }

    #[test]
    fn plain_paths_refuse_links() {
        let (_top, root, _canary) = setup();
        let image = ImageRoot::open(&root).expect("open");
        assert!(image.plain_path("var/tmp").is_err());
        assert!(image.plain_path("var/tmp/keep.txt").is_err());
        assert!(image.plain_path("opt/app/etc/site.conf").is_err());
        let (path, kind) = image.plain_path("opt/app").expect("ok").expect("there");
        assert_eq!(path, root.join("opt/app"));
        assert_eq!(kind, FileType::Directory);
        assert!(image.plain_path("nothing/here").expect("ok").is_none());
    }
}
