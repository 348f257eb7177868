//! Package repositories a layer installs from, identified by content: the SHA-256 of a
//! Debian suite's `InRelease`, a flat repository's `Release`, or an RPM repository's
//! `repodata/repomd.xml` — never by URL, so a refreshed repository is a new input.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{BuildError, Phase};

/// A repository used by one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Stable id, used in the layer inputs and as the repository's name in apt/dnf.
    pub id: String,
    /// Where it is.
    pub location: RepoLocation,
}

/// The kinds of repository Certo reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    /// A Debian archive suite over HTTP.
    DebMirror {
        /// Archive URL.
        url: String,
        /// Suite name.
        suite: String,
    },
    /// A flat Debian repository in a local directory (`Packages`, `Release`).
    DebFlat(PathBuf),
    /// An RPM repository in a local directory (`repodata/repomd.xml`).
    Rpm(PathBuf),
}

impl Repo {
    /// SHA-256 of the repository's metadata, fetched or read now.
    pub fn state(&self) -> Result<[u8; 32], BuildError> {
        match &self.location {
            RepoLocation::DebMirror { url, suite } => {
                let url = format!("{}/dists/{suite}/InRelease", url.trim_end_matches('/'));
                fetch_digest(&url)
            }
            RepoLocation::DebFlat(dir) => {
                let release = dir.join("Release");
                let file = if release.is_file() {
                    release
                } else {
                    dir.join("Packages")
                };
                file_digest(&file)
            }
            RepoLocation::Rpm(dir) => file_digest(&dir.join("repodata/repomd.xml")),
        }
    }
}

/// SHA-256 of a local file, with a message naming the repository file on failure.
pub fn file_digest(path: &Path) -> Result<[u8; 32], BuildError> {
    let mut file = std::fs::File::open(path).map_err(|e| {
        BuildError::new(
            Phase::Prepare,
            format!("repository metadata {} cannot be read: {e}", path.display()),
        )
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| {
            BuildError::new(Phase::Prepare, format!("reading {}: {e}", path.display()))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Downloads `url` with apt's own downloader (it honours the machine's apt proxy and
/// mirror settings) and returns the SHA-256 of its content.
fn fetch_digest(url: &str) -> Result<[u8; 32], BuildError> {
    let dir = tempfile_dir()?;
    let dest = dir.join("InRelease");
    let out = Command::new("/usr/lib/apt/apt-helper")
        .arg("download-file")
        .arg(url)
        .arg(&dest)
        .output()
        .map_err(|e| BuildError::new(Phase::Prepare, format!("cannot run apt-helper: {e}")))?;
    let result = if out.status.success() {
        file_digest(&dest)
    } else {
        Err(BuildError::new(
            Phase::Prepare,
            format!(
                "cannot fetch the repository state {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The one version a repository `listing` (e.g. "DIR has") offers of `package`, none, or an
/// error when it offers several.
fn one_version(
    mut found: Vec<String>,
    package: &str,
    listing: &str,
) -> Result<Option<String>, BuildError> {
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(BuildError::new(
            Phase::Resolve,
            format!(
                "{listing} {package} in several versions ({}); a baseline repository must pin one",
                found.join(", ")
            ),
        )
        .package(package)),
    }
}

fn tempfile_dir() -> Result<PathBuf, BuildError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("certo-repo-state-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BuildError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// The version of `package` in a flat Debian repository's `Packages` file (the highest
/// listed, compared as dpkg does only when one version is listed; several versions of one
/// package in a baseline repository are refused as ambiguous).
pub fn deb_flat_version(dir: &Path, package: &str) -> Result<Option<String>, BuildError> {
    let path = dir.join("Packages");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        BuildError::new(
            Phase::Prepare,
            format!("repository index {} cannot be read: {e}", path.display()),
        )
    })?;
    let mut found: Vec<String> = Vec::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            }
        }
        if name == Some(package)
            && let Some(v) = version
            && !found.iter().any(|f| f == v)
        {
            found.push(v.to_owned());
        }
    }
    one_version(found, package, &format!("{} lists", path.display()))
}

/// The `version-release` of `package` in an RPM repository (from its primary metadata).
pub fn rpm_version(dir: &Path, package: &str) -> Result<Option<String>, BuildError> {
    let repomd_path = dir.join("repodata/repomd.xml");
    let repomd = std::fs::read_to_string(&repomd_path).map_err(|e| {
        BuildError::new(
            Phase::Prepare,
            format!(
                "repository metadata {} cannot be read: {e}",
                repomd_path.display()
            ),
        )
    })?;
    let href = primary_href(&repomd).ok_or_else(|| {
        BuildError::new(
            Phase::Prepare,
            format!("{} names no primary metadata", repomd_path.display()),
        )
    })?;
    crate::request::safe_relative(&href).map_err(|why| {
        BuildError::new(
            Phase::Prepare,
            format!(
                "{}: primary location {href:?}: {why}",
                repomd_path.display()
            ),
        )
    })?;
    let primary_path = dir.join(&href);
    let compressed = std::fs::read(&primary_path).map_err(|e| {
        BuildError::new(
            Phase::Prepare,
            format!("{} cannot be read: {e}", primary_path.display()),
        )
    })?;
    let mut xml = String::new();
    if href.ends_with(".gz") {
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_string(&mut xml)
            .map_err(|e| {
                BuildError::new(
                    Phase::Prepare,
                    format!("{} is not valid gzip: {e}", primary_path.display()),
                )
            })?;
    } else if href.ends_with(".xml") {
        xml = String::from_utf8_lossy(&compressed).into_owned();
    } else {
        return Err(BuildError::new(
            Phase::Prepare,
            format!(
                "{}: Certo reads gzip or plain primary metadata",
                primary_path.display()
            ),
        ));
    }
    let mut found: Vec<String> = Vec::new();
    for entry in xml.split("<package ").skip(1) {
        let name = between(entry, "<name>", "</name>");
        if name != Some(package) {
            continue;
        }
        if let Some(tag) = between(entry, "<version ", "/>") {
            let ver = attr(tag, "ver").unwrap_or_default();
            let rel = attr(tag, "rel").unwrap_or_default();
            let v = format!("{ver}-{rel}");
            if !found.contains(&v) {
                found.push(v);
            }
        }
    }
    one_version(found, package, &format!("{} has", dir.display()))
}

fn primary_href(repomd: &str) -> Option<String> {
    let data = repomd
        .split("<data ")
        .find(|d| d.starts_with("type=\"primary\""))?;
    let location = between(data, "<location ", "/>")?;
    attr(location, "href").map(str::to_owned)
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let to = s[from..].find(end)? + from;
    Some(&s[from..to])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let from = tag.find(&key)? + key.len();
    let to = tag[from..].find('"')? + from;
    Some(&tag[from..to])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_location_is_read_from_repomd() {
        let repomd = r#"<repomd><data type="filelists"><location href="repodata/f.xml.gz"/></data>
<data type="primary"><checksum>x</checksum><location href="repodata/abc-primary.xml.gz"/></data></repomd>"#;
        assert_eq!(
            primary_href(repomd).as_deref(),
            Some("repodata/abc-primary.xml.gz")
        );
    }

    #[test]
    fn flat_repository_versions_are_read_and_ambiguity_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("Packages"),
            "Package: a\nVersion: 1.0-1\n\nPackage: b\nVersion: 2\n\nPackage: b\nVersion: 3\n",
        )
        .expect("write");
        assert_eq!(
            deb_flat_version(dir.path(), "a").expect("a").as_deref(),
            Some("1.0-1")
        );
        assert_eq!(deb_flat_version(dir.path(), "c").expect("c"), None);
        let err = deb_flat_version(dir.path(), "b").expect_err("ambiguous");
        assert!(err.message.contains("several versions (2, 3)"), "{err}");
    }
}
