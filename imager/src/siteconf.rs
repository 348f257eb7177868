//! Site configuration that a patch's package scripts changed.
//!
//! A patch record says which configuration changes it makes (`config_changes`, applied by
//! [`crate::backend::apply_config`]). Its packages' install scripts may not change site
//! configuration beyond them: a `%post` that rewrites `BDII_HOST` or `SITE_NAME` in
//! `site-info.def` changes what every service of the node says about the testbed, which
//! no certifier reviewed. [`snapshot`] reads the site configuration files before the
//! patch layer's install, [`check`] after it (before the record's own changes):
//!
//! - the files: `/opt/glite/yaim/etc/site-info.def` and every regular file under the
//!   directories of `/etc` the node types configure their services in ([`WATCHED_ETC`]:
//!   `/etc/glite*`, `/etc/bdii`, `/etc/lcg-ce`), up to [`MAX_DEPTH`] levels;
//! - a change: a `KEY=VALUE` (or `KEY = VALUE`) line whose value is not what it was, a
//!   key that appeared or went;
//! - by the payload or by a script: a changed file whose content is exactly what its
//!   package ships (the package database's digest of it: rpm's `FILEDIGESTS`, dpkg's
//!   conffile and `md5sums` MD5) is the package's new version of it, not a script's work;
//!   a file that no package owns, or that differs from what its package ships, was
//!   changed by a script;
//! - allowed: a key the record's configuration changes set to that same value.
//!
//! What is left fails the build at [`Phase::Testbed`], naming the file, the key, the old
//! and new values and, when it can be told, the layer's package whose install script did
//! it (the one whose scripts name the file or the key).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::backend::open_root;
use crate::cmd::Log;
use crate::error::{BuildError, Phase};
use crate::plan::{Install, LayerPlan};
use crate::rooted::ImageRoot;

/// YAIM's site configuration.
pub const SITE_INFO: &str = "opt/glite/yaim/etc/site-info.def";
/// Directories of `/etc` holding the node types' service configuration: a name equal to
/// one of these or, with a trailing `*`, starting with it.
pub const WATCHED_ETC: [&str; 3] = ["glite*", "bdii", "lcg-ce"];
/// How deep under a watched directory files are read.
pub const MAX_DEPTH: usize = 3;
/// Most files read under the watched directories (the rest are not compared).
pub const MAX_FILES: usize = 512;
/// Larger files are not configuration: not read.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// The site configuration of an image: file (relative to the root) → its `KEY=VALUE`
/// settings (the last line of a key wins, as a shell's `source` would have it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    files: BTreeMap<String, BTreeMap<String, String>>,
}

/// One setting the install changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The file, relative to the image root.
    pub file: String,
    pub key: String,
    /// `None`: not set before.
    pub old: Option<String>,
    /// `None`: no longer set.
    pub new: Option<String>,
}

impl Change {
    /// `/FILE: KEY: OLD → NEW`.
    pub fn describe(&self) -> String {
        let shown = |v: &Option<String>, none: &str| match v {
            Some(v) => v.clone(),
            None => none.to_owned(),
        };
        format!(
            "/{}: {}: {} → {}",
            self.file,
            self.key,
            shown(&self.old, "(unset)"),
            shown(&self.new, "(removed)")
        )
    }
}

/// The `KEY=VALUE` settings of a configuration file's text: comments and other lines are
/// skipped; `KEY = VALUE` is read as `KEY=VALUE`; quotes around a value are kept.
pub fn settings(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';', '!']) {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            continue;
        }
        out.insert(key.to_owned(), value.trim().to_owned());
    }
    out
}

fn is_watched_etc(name: &str) -> bool {
    WATCHED_ETC.iter().any(|w| match w.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *w,
    })
}

/// A package manager's copy of a configuration file (`.rpmnew`, `.dpkg-dist`, ...): the
/// new version it did not put in place, not configuration in force.
fn is_manager_copy(name: &str) -> bool {
    [
        ".rpmnew",
        ".rpmsave",
        ".rpmorig",
        ".dpkg-dist",
        ".dpkg-new",
        ".dpkg-old",
        ".dpkg-tmp",
        ".ucf-dist",
        ".ucf-new",
        ".ucf-old",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// The site configuration files of the image at `root` (see the module's list).
pub fn watched_files(image: &ImageRoot) -> Vec<String> {
    let mut files = Vec::new();
    if image.is_file(SITE_INFO) {
        files.push(SITE_INFO.to_owned());
    }
    let mut dirs: Vec<(String, usize)> = image
        .list_dir("etc")
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, is_dir)| *is_dir && is_watched_etc(name))
        .map(|(name, _)| (format!("etc/{name}"), 1))
        .collect();
    while let Some((dir, depth)) = dirs.pop() {
        for (name, is_dir) in image.list_dir(&dir).unwrap_or_default() {
            let rel = format!("{dir}/{name}");
            if is_dir {
                if depth < MAX_DEPTH {
                    dirs.push((rel, depth + 1));
                }
            } else if files.len() < MAX_FILES && !is_manager_copy(&name) && image.is_file(&rel) {
                files.push(rel);
            }
        }
    }
    files.sort();
    files
}

/// Reads the site configuration of the image at `root`.
pub fn snapshot(root: &Path) -> Result<Snapshot, BuildError> {
    let image = open_root(root)?;
    let mut files = BTreeMap::new();
    for rel in watched_files(&image) {
        let Ok(file) = image.open_file(&rel) else {
            continue;
        };
        if file.metadata().map(|m| m.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
            continue;
        }
        let Ok(text) = image.read_to_string(&rel) else {
            continue;
        };
        files.insert(rel, settings(&text));
    }
    Ok(Snapshot { files })
}

/// What changed from `before` to `after`, file by file, key by key.
pub fn changes(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        before.files.keys().chain(after.files.keys()).collect();
    for file in names {
        let (b, a) = (
            before.files.get(file).unwrap_or(&empty),
            after.files.get(file).unwrap_or(&empty),
        );
        let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
        for key in keys {
            let (old, new) = (b.get(key), a.get(key));
            if old != new {
                out.push(Change {
                    file: file.clone(),
                    key: key.clone(),
                    old: old.cloned(),
                    new: new.cloned(),
                });
            }
        }
    }
    out
}

/// The changes the record's configuration changes do not make: a key the record sets in
/// that file to the very value the scripts left is the record's own change.
pub fn beyond_record(changes: Vec<Change>, config: &[(String, String, String)]) -> Vec<Change> {
    changes
        .into_iter()
        .filter(|c| {
            !config.iter().any(|(file, key, value)| {
                file.trim_start_matches('/') == c.file
                    && *key == c.key
                    && c.new.as_deref() == Some(value.as_str())
            })
        })
        .collect()
}

/// What a package database says a file should hold: its owner and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shipped {
    package: String,
    digest: String,
}

/// The owner of `/rel` and the digest its package ships for it, from rpm's database.
fn rpm_shipped(root: &Path, scratch: &Path, rel: &str) -> Option<Shipped> {
    let out = Command::new("rpm")
        .env("HOME", scratch.join("home"))
        .env("LC_ALL", "C.UTF-8")
        .arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm", "-qf", "--qf"])
        .arg("[%{NAME}\\t%{FILENAMES}\\t%{FILEDIGESTS}\\n]")
        .arg(format!("/{rel}"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = format!("/{rel}");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut it = l.split('\t');
        let (name, file, digest) = (it.next()?, it.next()?, it.next()?);
        (file == path && !digest.is_empty()).then(|| Shipped {
            package: name.to_owned(),
            digest: digest.to_ascii_lowercase(),
        })
    })
}

/// The owner of `/rel` and the MD5 dpkg keeps of what it ships (a conffile's from the
/// status file, another file's from `info/PKG.md5sums`).
fn deb_shipped(root: &Path, image: &ImageRoot, rel: &str) -> Option<Shipped> {
    let path = format!("/{rel}");
    let out = Command::new("chroot")
        .arg(root)
        .args(["dpkg-query", "-S", &path])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .ok()?;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let package = listed
        .lines()
        .find_map(|l| l.strip_suffix(&format!(": {path}")))?
        .split(", ")
        .next()?
        .to_owned();
    let conffiles = Command::new("chroot")
        .arg(root)
        .args(["dpkg-query", "-W", "-f", "${Conffiles}\\n", &package])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .ok()?;
    let from_conffiles = String::from_utf8_lossy(&conffiles.stdout)
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == path).then(|| it.next().map(str::to_owned))?
        });
    let digest = from_conffiles.or_else(|| {
        let bare = package.split(':').next().unwrap_or(&package);
        [
            format!("var/lib/dpkg/info/{package}.md5sums"),
            format!("var/lib/dpkg/info/{bare}.md5sums"),
        ]
        .iter()
        .find_map(|f| image.read_to_string(f).ok())
        .and_then(|sums| {
            sums.lines().find_map(|l| {
                let (sum, file) = l.split_once("  ")?;
                (file == rel).then(|| sum.to_owned())
            })
        })
    })?;
    Some(Shipped {
        package,
        digest: digest.to_ascii_lowercase(),
    })
}

/// Whether `content` is what `digest` (MD5 or SHA-256, hex) says.
fn matches_digest(content: &[u8], digest: &str) -> Option<bool> {
    match digest.len() {
        32 => Some(hex::encode(Md5::digest(content)) == digest),
        64 => Some(hex::encode(Sha256::digest(content)) == digest),
        _ => None,
    }
}

/// The layer's package names.
fn layer_packages(plan: &LayerPlan) -> Vec<String> {
    plan.install
        .iter()
        .map(|i| match i {
            Install::Named { name, .. } | Install::File { name, .. } => name.clone(),
        })
        .collect()
}

/// The install scripts of `package` in the image, as text (empty when it has none).
fn scripts_of(
    family: &str,
    root: &Path,
    image: &ImageRoot,
    scratch: &Path,
    package: &str,
) -> String {
    if family == "deb" {
        let mut text = String::new();
        for script in ["preinst", "postinst"] {
            for f in [
                format!("var/lib/dpkg/info/{package}.{script}"),
                format!("var/lib/dpkg/info/{package}:amd64.{script}"),
                format!("var/lib/dpkg/info/{package}:i386.{script}"),
            ] {
                if let Ok(t) = image.read_to_string(&f) {
                    text.push_str(&t);
                }
            }
        }
        return text;
    }
    Command::new("rpm")
        .env("HOME", scratch.join("home"))
        .env("LC_ALL", "C.UTF-8")
        .arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm", "-q", "--scripts", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Which of the layer's packages changed `changes` by its scripts: the one whose scripts
/// name the file or the key, else the only one with scripts; `None` when it cannot be told.
fn culprit(
    plan: &LayerPlan,
    family: &str,
    root: &Path,
    image: &ImageRoot,
    scratch: &Path,
    changes: &[Change],
) -> Option<String> {
    let scripts: Vec<(String, String)> = layer_packages(plan)
        .into_iter()
        .map(|p| {
            let s = scripts_of(family, root, image, scratch, &p);
            (p, s)
        })
        .filter(|(_, s)| s.lines().any(|l| !l.trim().is_empty()))
        .collect();
    let naming: Vec<&String> = scripts
        .iter()
        .filter(|(_, s)| {
            changes.iter().any(|c| {
                let base = c.file.rsplit('/').next().unwrap_or(&c.file);
                s.contains(base) || s.contains(&c.key)
            })
        })
        .map(|(p, _)| p)
        .collect();
    match (naming.as_slice(), scripts.as_slice()) {
        ([one], _) => Some((*one).clone()),
        ([], [(one, _)]) => Some(one.clone()),
        _ => None,
    }
}

/// After the patch layer's install (before the record's configuration changes): fails at
/// [`Phase::Testbed`] when package scripts changed site configuration beyond what the
/// record's configuration changes set.
pub fn check(
    plan: &LayerPlan,
    family: &str,
    root: &Path,
    scratch: &Path,
    before: &Snapshot,
    log: &mut Log,
) -> Result<(), BuildError> {
    let after = snapshot(root)?;
    let changed = changes(before, &after);
    if changed.is_empty() {
        return Ok(());
    }
    let image = open_root(root)?;
    // Per file: the package's own new version of it, or a script's work?
    let mut by_scripts: Vec<Change> = Vec::new();
    let mut files: Vec<&str> = changed.iter().map(|c| c.file.as_str()).collect();
    files.dedup();
    for file in files {
        let shipped = if family == "deb" {
            deb_shipped(root, &image, file)
        } else {
            rpm_shipped(root, scratch, file)
        };
        let content = image.open_file(file).ok().and_then(|mut f| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut v).ok().map(|_| v)
        });
        let from_payload = match (&shipped, &content) {
            (Some(s), Some(c)) => matches_digest(c, &s.digest),
            // Gone: its package's new version may no longer ship it; not told apart.
            (_, None) => None,
            (None, Some(_)) => Some(false),
        };
        match from_payload {
            Some(true) => log.note(&format!(
                "/{file} changed as {} ships it",
                shipped
                    .as_ref()
                    .map_or("its package", |s| s.package.as_str())
            )),
            Some(false) => by_scripts.extend(changed.iter().filter(|c| c.file == file).cloned()),
            None => log.note(&format!(
                "/{file} changed; its package's digest {:?} cannot be compared",
                shipped.as_ref().map(|s| s.digest.as_str())
            )),
        }
    }
    let beyond = beyond_record(by_scripts, &plan.config);
    if beyond.is_empty() {
        return Ok(());
    }
    let package = culprit(plan, family, root, &image, scratch, &beyond);
    let listed: Vec<String> = beyond.iter().map(Change::describe).collect();
    for line in &listed {
        log.note(&format!(
            "site configuration changed by a package script: {line}"
        ));
    }
    let by = match &package {
        Some(p) => format!("the install script of {p}"),
        None => format!(
            "an install script of the layer's packages ({})",
            layer_packages(plan).join(", ")
        ),
    };
    let mut err = BuildError::new(
        Phase::Testbed,
        format!(
            "{by} changed the site configuration beyond the record's configuration changes: {}",
            listed.join("; ")
        ),
    );
    err.package = package;
    err.log_tail = listed;
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(files: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            files: files
                .iter()
                .map(|(f, t)| ((*f).to_owned(), settings(t)))
                .collect(),
        }
    }

    #[test]
    fn settings_are_read_as_a_shell_and_a_properties_file_would() {
        let s = settings(
            "# site-info.def\nSITE_NAME=CERTO-TESTBED\nVOS=\"dteam ops\"\nMatchMakerCache = 3.1.9-1\n  export X=1\nnot a setting\nSITE_NAME=LATER\n",
        );
        assert_eq!(s.get("SITE_NAME").map(String::as_str), Some("LATER"));
        assert_eq!(s.get("VOS").map(String::as_str), Some("\"dteam ops\""));
        assert_eq!(
            s.get("MatchMakerCache").map(String::as_str),
            Some("3.1.9-1")
        );
        assert_eq!(s.get("X").map(String::as_str), Some("1"));
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn changes_name_the_file_the_key_and_both_values_and_the_record_may_make_its_own() {
        let before = snap(&[(
            SITE_INFO,
            "SITE_NAME=CERTO-TESTBED\nBDII_HOST=localhost\nGONE=1\n",
        )]);
        let after = snap(&[
            (
                SITE_INFO,
                "SITE_NAME=CERTO-ROGUE\nBDII_HOST=testbed-bdii.certo\n",
            ),
            ("etc/glite/new.conf", "A=b\n"),
        ]);
        let all = changes(&before, &after);
        let shown: Vec<String> = all.iter().map(Change::describe).collect();
        assert_eq!(
            shown,
            [
                "/etc/glite/new.conf: A: (unset) → b",
                "/opt/glite/yaim/etc/site-info.def: BDII_HOST: localhost → testbed-bdii.certo",
                "/opt/glite/yaim/etc/site-info.def: GONE: 1 → (removed)",
                "/opt/glite/yaim/etc/site-info.def: SITE_NAME: CERTO-TESTBED → CERTO-ROGUE",
            ]
        );
        // 3506's record sets BDII_HOST=testbed-bdii.certo itself: only the rest is beyond it.
        let record = [(
            SITE_INFO.to_owned(),
            "BDII_HOST".to_owned(),
            "testbed-bdii.certo".to_owned(),
        )];
        let left: Vec<String> = beyond_record(all.clone(), &record)
            .iter()
            .map(|c| c.key.clone())
            .collect();
        assert_eq!(left, ["A", "GONE", "SITE_NAME"]);
        // A record that sets the key to another value does not cover the script's.
        let other = [(
            SITE_INFO.to_owned(),
            "BDII_HOST".to_owned(),
            "bdii.example".to_owned(),
        )];
        assert_eq!(beyond_record(all, &other).len(), 4);
    }

    #[test]
    fn digests_of_both_kinds_are_compared() {
        let text = b"SITE_NAME=CERTO-TESTBED\n";
        let md5 = hex::encode(Md5::digest(text));
        let sha = hex::encode(Sha256::digest(text));
        assert_eq!(matches_digest(text, &md5), Some(true));
        assert_eq!(matches_digest(text, &sha), Some(true));
        assert_eq!(matches_digest(b"other", &sha), Some(false));
        assert_eq!(matches_digest(text, "abcd"), None);
    }
}
