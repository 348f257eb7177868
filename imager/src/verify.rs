//! After a layer's install: does the image hold what the layer asked for?
//!
//! - [`check_downgrades`]: no installed package went to an older version unless the
//!   layer allows it (a patch record's explicit opt-in). The versions before and after
//!   the install come from the image's own package database ([`installed_versions`]).
//! - [`check_patch_files`]: each patch package file is installed as that very file, not
//!   merely a package of the same name and version. dnf skips a file whose
//!   name-version-release is installed ("already installed. Nothing to do."); the check
//!   compares the file's header digest (`SHA256HEADER`, else `SHA1HEADER`, else the MD5
//!   over header and payload) with the installed package's, and for Debian the files the
//!   package ships (their MD5 sums, as dpkg keeps them in `info/NAME.md5sums`).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use md5::{Digest, Md5};

use crate::error::{BuildError, Phase};
use crate::plan::{Install, LayerPlan};
use crate::version;

/// One installed package: name, architecture and version (RPM: `[EPOCH:]V-R`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Installed {
    /// Package name.
    pub name: String,
    /// Architecture (`noarch`, `x86_64`, `all`, `amd64`, ...).
    pub arch: String,
    /// Version as the package manager writes it.
    pub version: String,
}

/// Every package installed in the image at `root`, from its own database: rpm with
/// `--root` (the private HOME in `scratch` pins the database path) or dpkg-query
/// inside the image.
pub fn installed_versions(
    family: &str,
    root: &Path,
    scratch: &Path,
) -> Result<Vec<Installed>, BuildError> {
    let (mut cmd, what) = if family == "deb" {
        let mut c = Command::new("chroot");
        c.arg(root)
            .arg("dpkg-query")
            .args([
                "-W",
                "-f",
                "${Package}\\t${Architecture}\\t${Version}\\t${db:Status-Status}\\n",
            ])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C.UTF-8");
        (c, "dpkg-query -W")
    } else {
        let mut c = Command::new("rpm");
        c.env("HOME", scratch.join("home"))
            .env("LC_ALL", "C.UTF-8")
            .arg("--root")
            .arg(root)
            .args([
                "--dbpath",
                "/var/lib/rpm",
                "-qa",
                "--qf",
                "%{NAME}\\t%{ARCH}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\tinstalled\\n",
            ]);
        (c, "rpm -qa")
    };
    let out = cmd.output().map_err(|e| {
        BuildError::new(
            Phase::Stage,
            format!("cannot run {what} on {}: {e}", root.display()),
        )
    })?;
    if !out.status.success() {
        return Err(BuildError::new(
            Phase::Stage,
            format!(
                "{what} could not read the package database of {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let mut list: Vec<Installed> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            let (name, arch, version, status) = (it.next()?, it.next()?, it.next()?, it.next()?);
            (status == "installed" && !name.is_empty()).then(|| Installed {
                name: name.to_owned(),
                arch: arch.to_owned(),
                version: version.to_owned(),
            })
        })
        .collect();
    list.sort();
    Ok(list)
}

/// A package that went to an older version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downgrade {
    /// Package name (with `.ARCH` when the image has it for several architectures).
    pub package: String,
    /// The version before the layer.
    pub from: String,
    /// The version after it.
    pub to: String,
}

/// The packages whose newest installed version is older after the layer than before.
pub fn downgrades(family: &str, before: &[Installed], after: &[Installed]) -> Vec<Downgrade> {
    let newest = |list: &[Installed]| {
        let mut m: BTreeMap<(String, String), String> = BTreeMap::new();
        for p in list {
            let entry = m
                .entry((p.name.clone(), p.arch.clone()))
                .or_insert_with(|| p.version.clone());
            if version::compare(family, &p.version, entry) == Ordering::Greater {
                *entry = p.version.clone();
            }
        }
        m
    };
    let (old, new) = (newest(before), newest(after));
    let arches = |name: &str| new.keys().filter(|(n, _)| n == name).count();
    let mut out = Vec::new();
    for ((name, arch), to) in &new {
        if let Some(from) = old.get(&(name.clone(), arch.clone()))
            && version::compare(family, to, from) == Ordering::Less
        {
            out.push(Downgrade {
                package: if arches(name) > 1 {
                    format!("{name}.{arch}")
                } else {
                    name.clone()
                },
                from: from.clone(),
                to: to.clone(),
            });
        }
    }
    out
}

/// Refuses a layer that downgraded a package, unless the layer allows downgrades.
pub fn check_downgrades(
    plan: &LayerPlan,
    family: &str,
    before: &[Installed],
    after: &[Installed],
    output: &str,
) -> Result<(), BuildError> {
    if plan.allow_downgrade {
        return Ok(());
    }
    let found = downgrades(family, before, after);
    if found.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = found
        .iter()
        .map(|d| format!("{} {} → {}", d.package, d.from, d.to))
        .collect();
    let names: Vec<&str> = found.iter().map(|d| d.package.as_str()).collect();
    Err(BuildError {
        package: Some(names.join(", ")),
        log_tail: crate::cmd::tail(output, crate::cmd::LOG_TAIL_LINES),
        ..BuildError::new(
            Phase::Install,
            format!(
                "downgrade refused: {} ({})",
                list.join(", "),
                downgrade_policy(plan)
            ),
        )
    })
}

/// Why a downgrade is refused in this layer, and how a record allows one.
pub fn downgrade_policy(plan: &LayerPlan) -> String {
    if plan.kind == crate::digest::LayerKind::Patch {
        "the record does not allow downgrades; `allow_downgrade: true` \
         (text form `Downgrade: allowed`) allows them"
            .to_owned()
    } else {
        format!(
            "a {} layer never downgrades a package",
            crate::error::layer_name(plan.kind)
        )
    }
}

/// Checks that every package file of the layer is installed as that very file.
pub fn check_patch_files(
    plan: &LayerPlan,
    family: &str,
    root: &Path,
    scratch: &Path,
    output: &str,
) -> Result<(), BuildError> {
    for item in &plan.install {
        let Install::File { name, path, .. } = item else {
            continue;
        };
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let problem = if family == "deb" {
            deb_file_problem(name, path, root, scratch)?
        } else {
            rpm_file_problem(name, path, root, scratch)?
        };
        if let Some(why) = problem {
            return Err(BuildError {
                package: Some(name.clone()),
                log_tail: crate::cmd::tail(output, crate::cmd::LOG_TAIL_LINES),
                ..BuildError::new(
                    Phase::Install,
                    format!("{file} is not what is installed: {why}"),
                )
            });
        }
    }
    Ok(())
}

/// What rpm says of one package: NEVRA parts and its digests.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RpmIdentity {
    name: String,
    arch: String,
    version: String,
    /// (what the digest is, its value) for SHA256HEADER, SHA1HEADER, SIGMD5, when present.
    digests: Vec<(&'static str, String)>,
}

const RPM_QF: &str = "%{NAME}\\t%{ARCH}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\t\
                      %{SHA256HEADER}\\t%{SHA1HEADER}\\t%{SIGMD5}\\n";

fn rpm_identities(text: &str) -> Vec<RpmIdentity> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 6 {
                return None;
            }
            let digests = [
                ("header digest (SHA-256)", f[3]),
                ("header digest (SHA-1)", f[4]),
                ("header and payload digest (MD5)", f[5]),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty() && *v != "(none)")
            .map(|(k, v)| (k, v.to_owned()))
            .collect();
            Some(RpmIdentity {
                name: f[0].to_owned(),
                arch: f[1].to_owned(),
                version: f[2].to_owned(),
                digests,
            })
        })
        .collect()
}

fn rpm_query(scratch: &Path, args: &[&std::ffi::OsStr]) -> Result<(bool, String), BuildError> {
    let out = Command::new("rpm")
        .env("HOME", scratch.join("home"))
        .env("LC_ALL", "C.UTF-8")
        .args(args)
        .output()
        .map_err(|e| BuildError::new(Phase::Stage, format!("cannot run rpm: {e}")))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn rpm_file_problem(
    name: &str,
    path: &Path,
    root: &Path,
    scratch: &Path,
) -> Result<Option<String>, BuildError> {
    let (ok, text) = rpm_query(
        scratch,
        &[
            "-qp".as_ref(),
            "--nosignature".as_ref(),
            "--qf".as_ref(),
            RPM_QF.as_ref(),
            path.as_os_str(),
        ],
    )?;
    let file = match rpm_identities(&text).into_iter().next() {
        Some(f) if ok => f,
        _ => {
            return Err(BuildError::new(
                Phase::Fetch,
                format!("rpm cannot read the package file {}", path.display()),
            )
            .package(name));
        }
    };
    let (_, text) = rpm_query(
        scratch,
        &[
            "--root".as_ref(),
            root.as_os_str(),
            "--dbpath".as_ref(),
            "/var/lib/rpm".as_ref(),
            "-q".as_ref(),
            "--qf".as_ref(),
            RPM_QF.as_ref(),
            file.name.as_ref(),
        ],
    )?;
    let installed: Vec<RpmIdentity> = rpm_identities(&text)
        .into_iter()
        .filter(|i| i.arch == file.arch)
        .collect();
    let shown = |i: &RpmIdentity| format!("{}-{}", i.name, i.version);
    let Some(same) = installed.iter().find(|i| i.version == file.version) else {
        return Ok(Some(match installed.first() {
            None => format!(
                "the image has no {}.{} at all (the file is {}.{})",
                file.name,
                file.arch,
                shown(&file),
                file.arch
            ),
            Some(other) => format!(
                "the image has {}, the file is {}",
                shown(other),
                shown(&file)
            ),
        }));
    };
    for (what, theirs) in &file.digests {
        if let Some((_, ours)) = same.digests.iter().find(|(w, _)| w == what) {
            if ours != theirs {
                return Ok(Some(format!(
                    "the image has {} with {what} {ours}, the file has {theirs} \
                     (same name-version-release, other content: the package manager skipped it)",
                    shown(same)
                )));
            }
            return Ok(None);
        }
    }
    Ok(Some(format!(
        "rpm gives no digest to compare for {} (neither the file nor the image has a \
         SHA256HEADER, SHA1HEADER or SIGMD5 both can be compared by)",
        shown(same)
    )))
}

/// `path  md5` pairs, paths without a leading `/` or `./`.
type Sums = BTreeMap<String, String>;

fn parse_md5sums(text: &str) -> Sums {
    text.lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once(char::is_whitespace)?;
            let path = path.trim_start();
            let path = path.trim_start_matches("./").trim_start_matches('/');
            (!path.is_empty()).then(|| (path.to_owned(), sum.to_ascii_lowercase()))
        })
        .collect()
}

/// MD5 sums of every regular file under `dir`, paths relative to it.
fn md5_tree(dir: &Path) -> std::io::Result<Sums> {
    let mut out = Sums::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let p = entry.path();
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file() {
                let bytes = std::fs::read(&p)?;
                let rel = p
                    .strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, hex::encode(Md5::digest(&bytes)));
            }
        }
    }
    Ok(out)
}

fn deb_file_problem(
    name: &str,
    path: &Path,
    root: &Path,
    scratch: &Path,
) -> Result<Option<String>, BuildError> {
    let unreadable = |why: String| {
        BuildError::new(
            Phase::Fetch,
            format!(
                "dpkg-deb cannot read the package file {}: {why}",
                path.display()
            ),
        )
        .package(name)
    };
    let fields = Command::new("dpkg-deb")
        .arg("-f")
        .arg(path)
        .args(["Package", "Version", "Architecture"])
        .output()
        .map_err(|e| unreadable(e.to_string()))?;
    if !fields.status.success() {
        return Err(unreadable(
            String::from_utf8_lossy(&fields.stderr).trim().to_owned(),
        ));
    }
    let text = String::from_utf8_lossy(&fields.stdout).into_owned();
    let field = |f: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(f).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let (pkg, ver, arch) = (field("Package"), field("Version"), field("Architecture"));
    let query = Command::new("chroot")
        .arg(root)
        .args([
            "dpkg-query",
            "-W",
            "-f",
            "${Package}\\t${Architecture}\\t${Version}\\t${db:Status-Status}\\n",
            &pkg,
        ])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .map_err(|e| BuildError::new(Phase::Stage, format!("cannot run dpkg-query: {e}")))?;
    let listed = String::from_utf8_lossy(&query.stdout).into_owned();
    let installed: Vec<(&str, &str)> = listed
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[3] == "installed" && (f[1] == arch || arch == "all"))
                .then(|| (f[1], f[2]))
        })
        .collect();
    let Some((inst_arch, inst_ver)) = installed.first().copied() else {
        return Ok(Some(format!(
            "the image has no {pkg}:{arch} installed (the file is {pkg} {ver})"
        )));
    };
    if inst_ver != ver {
        return Ok(Some(format!(
            "the image has {pkg} {inst_ver}, the file is {pkg} {ver}"
        )));
    }
    // The file's own sums, else sums of what it ships (dpkg computes them the same way
    // for a package that ships none).
    let work = scratch.join("deb-verify").join(&pkg);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| BuildError::io(format!("creating {}", work.display()), e))?;
    let staging = |what: String| {
        BuildError::new(
            Phase::Stage,
            format!("verifying {}: {what}", path.display()),
        )
        .package(name)
    };
    let (control, data) = (work.join("control"), work.join("data"));
    for (flag, dir) in [("-e", &control), ("-x", &data)] {
        let out = Command::new("dpkg-deb")
            .arg(flag)
            .arg(path)
            .arg(dir)
            .output()
            .map_err(|e| staging(format!("cannot run dpkg-deb {flag}: {e}")))?;
        if !out.status.success() {
            return Err(staging(format!(
                "dpkg-deb {flag} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let theirs = match std::fs::read_to_string(control.join("md5sums")) {
        Ok(text) => parse_md5sums(&text),
        Err(_) => {
            md5_tree(&data).map_err(|e| staging(format!("reading what the file ships: {e}")))?
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    let image = crate::rooted::ImageRoot::open(root)
        .map_err(|e| BuildError::io(format!("opening {}", root.display()), e))?;
    let ours = [
        format!("var/lib/dpkg/info/{pkg}:{inst_arch}.md5sums"),
        format!("var/lib/dpkg/info/{pkg}.md5sums"),
    ]
    .iter()
    .find_map(|rel| image.read_to_string(rel).ok())
    .map(|t| parse_md5sums(&t))
    .unwrap_or_default();
    Ok(md5sums_difference(&ours, &theirs).map(|diff| {
        format!(
            "the image has {pkg} {inst_ver} with other files ({diff}) \
             (same version, other content: the package manager skipped it)"
        )
    }))
}

/// How the installed package's sums differ from the file's, shortly, or `None`.
fn md5sums_difference(installed: &Sums, file: &Sums) -> Option<String> {
    let mut diffs: Vec<String> = Vec::new();
    for (path, sum) in file {
        match installed.get(path) {
            None => diffs.push(format!("/{path} is not in the installed package")),
            Some(other) if other != sum => diffs.push(format!(
                "/{path} has MD5 {other} in the image, {sum} in the file"
            )),
            Some(_) => {}
        }
    }
    for path in installed.keys().filter(|p| !file.contains_key(*p)) {
        diffs.push(format!("/{path} is not in the file"));
    }
    if diffs.is_empty() {
        return None;
    }
    let more = diffs.len().saturating_sub(3);
    diffs.truncate(3);
    let mut s = diffs.join("; ");
    if more > 0 {
        s.push_str(&format!("; {more} more"));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, arch: &str, version: &str) -> Installed {
        Installed {
            name: name.into(),
            arch: arch.into(),
            version: version.into(),
        }
    }

    #[test]
    fn a_downgrade_is_found_and_an_upgrade_is_not() {
        let before = vec![
            inst("glite-yaim-core", "noarch", "4.0.11-1"),
            inst("glite-wn-info", "x86_64", "1.2.3-1.sl5"),
            inst("bdii", "noarch", "5.2.4-1"),
        ];
        let after = vec![
            inst("glite-yaim-core", "noarch", "4.0.11-0"),
            inst("glite-wn-info", "x86_64", "1.2.3-2.sl5"),
            inst("certo-test-ok", "noarch", "1.0-1"),
        ];
        assert_eq!(
            downgrades("rpm", &before, &after),
            [Downgrade {
                package: "glite-yaim-core".into(),
                from: "4.0.11-1".into(),
                to: "4.0.11-0".into()
            }]
        );
        // An epoch outweighs the version.
        let after = vec![inst("bdii", "noarch", "1:5.0-1")];
        assert!(downgrades("rpm", &before, &after).is_empty());
        // Debian order: 4.0.11-1~bpo is older than 4.0.11-1.
        let before = vec![inst("glite-yaim-core", "all", "4.0.11-1")];
        let after = vec![inst("glite-yaim-core", "all", "4.0.11-1~bpo1")];
        assert_eq!(downgrades("deb", &before, &after).len(), 1);
    }

    #[test]
    fn several_architectures_name_the_one_that_went_down() {
        let before = vec![
            inst("glite-wn-info", "i386", "1.2.3-2"),
            inst("glite-wn-info", "amd64", "1.2.3-2"),
        ];
        let after = vec![
            inst("glite-wn-info", "i386", "1.2.3-2"),
            inst("glite-wn-info", "amd64", "1.2.3-1"),
        ];
        let d = downgrades("deb", &before, &after);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].package, "glite-wn-info.amd64");
    }

    #[test]
    fn rpm_query_lines_are_read_with_their_digests() {
        let text = "glite-yaim-core\tnoarch\t4.0.11-1\t8428cf\t(none)\tcd3c7d\n\
                    kernel\tx86_64\t1:2.6.18-1\t(none)\t(none)\t(none)\n";
        let ids = rpm_identities(text);
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].version, "4.0.11-1");
        assert_eq!(
            ids[0].digests,
            [
                ("header digest (SHA-256)", "8428cf".to_owned()),
                ("header and payload digest (MD5)", "cd3c7d".to_owned())
            ]
        );
        assert!(ids[1].digests.is_empty());
    }

    #[test]
    fn md5sums_differences_are_named() {
        let a = parse_md5sums(
            "fa25518ade7760c7b6e8f71fc4b26995  opt/glite/yaim/bin/yaim-check\n\
             41ee42257ce43f27738d828e5368fd5f  ./opt/glite/yaim/etc/site-info.def\n",
        );
        let mut b = a.clone();
        assert_eq!(md5sums_difference(&a, &b), None);
        b.insert(
            "opt/glite/yaim/REBUILT".into(),
            "596a12df0a80a99a5f8cd8bc7ebb8756".into(),
        );
        assert_eq!(
            md5sums_difference(&a, &b).as_deref(),
            Some("/opt/glite/yaim/REBUILT is not in the installed package")
        );
        b.insert("opt/glite/yaim/bin/yaim-check".into(), "00".into());
        assert!(
            md5sums_difference(&a, &b)
                .unwrap_or_default()
                .contains("/opt/glite/yaim/bin/yaim-check has MD5 fa25518ade7760c7b6e8f71fc4b26995 in the image, 00 in the file")
        );
    }
}
