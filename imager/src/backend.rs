//! The two real backends: Debian (mmdebstrap, then apt-get in the chroot) and RPM
//! (dnf --installroot), plus configuration changes. Each turns tool output into a
//! structured [`BuildError`] naming the package, the phase and the exit status.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::Log;
use crate::error::{BuildError, Phase};
use crate::mounts;
use crate::plan::{Install, LayerPlan};
use crate::repos::RepoLocation;
use crate::request::Recipe;
use crate::rooted::ImageRoot;
use rustix::fs::FileType;

/// apt options every apt call gets: snapshot mirrors carry old Valid-Until dates.
const APT_OPTS: &[&str] = &[
    "-o",
    "Acquire::Check-Valid-Until=false",
    "-o",
    "Acquire::Languages=none",
    "-o",
    "Dpkg::Use-Pty=0",
    "-o",
    "APT::Sandbox::User=root",
];

/// Builds the core layer of a Debian platform into the empty directory `tree`.
pub fn deb_core(recipe: &Recipe, tree: &Path, log: &mut Log) -> Result<(), BuildError> {
    let Recipe::Mmdebstrap {
        suite,
        arch,
        mirror,
    } = recipe
    else {
        return Err(BuildError::new(Phase::Prepare, "not a Debian recipe"));
    };
    let out = log.run(
        Command::new("mmdebstrap")
            .arg("--variant=minbase")
            .arg("--mode=root")
            .arg(format!("--architectures={arch}"))
            .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
            .arg("--aptopt=Acquire::Languages \"none\"")
            .arg("--dpkgopt=path-exclude=/usr/share/man/*")
            .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
            .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
            .arg(suite)
            .arg(tree)
            .arg(format!("deb {mirror} {suite} main")),
    )?;
    if !out.success() {
        let message = match unreachable_archive(&out.output) {
            Some(line) => format!(
                "mmdebstrap could not reach the Debian archive {mirror} for {suite}/{arch} \
                 (Debian images are built from it at run time): {line}"
            ),
            None => format!("mmdebstrap could not build {suite}/{arch}"),
        };
        return Err(log.failure(Phase::Unpack, None, out.status, message, &out.output));
    }
    Ok(())
}

/// The first line of apt's or mmdebstrap's output that says a repository could not be
/// reached (name resolution, connection, a fetch that failed), if any.
pub fn unreachable_archive(output: &str) -> Option<&str> {
    const SIGNS: &[&str] = &[
        "Temporary failure resolving",
        "Could not resolve",
        "Failed to fetch",
        "Could not connect to",
        "Unable to connect to",
        "Connection failed",
        "Connection timed out",
        "Network is unreachable",
    ];
    output
        .lines()
        .map(str::trim)
        .find(|l| SIGNS.iter().any(|sign| l.contains(sign)))
}

/// Builds the RPM-family core layer into the empty directory `tree`.
pub fn rpm_core(
    plan: &LayerPlan,
    recipe: &Recipe,
    tree: &Path,
    scratch: &Path,
    log: &mut Log,
) -> Result<(), BuildError> {
    std::fs::create_dir_all(tree)
        .map_err(|e| BuildError::io(format!("creating {}", tree.display()), e))?;
    dnf_install(plan, recipe, tree, scratch, log)
}

/// Runs `f` with the staging root prepared for package tools: /proc, /dev, /sys, the
/// host's DNS and hosts files, and no service starts; everything is undone afterwards.
/// Every path is resolved inside the image ([`ImageRoot`]): a file that is a link there
/// is not bound over, and nothing is created or removed outside the tree.
pub fn with_chroot<T>(
    root: &Path,
    log: &mut Log,
    f: impl FnOnce(&mut Log) -> Result<T, BuildError>,
) -> Result<T, BuildError> {
    let image = open_root(root)?;
    mounts::mount_chroot_basics(&image)?;
    let mut created: Vec<&str> = Vec::new();
    let result = (|| {
        for file in ["etc/resolv.conf", "etc/hosts"] {
            let host = Path::new("/").join(file);
            if !host.is_file()
                || !matches!(image.plain_path("etc"), Ok(Some((_, FileType::Directory))))
            {
                continue;
            }
            let target = match image.plain_path(file) {
                Ok(Some((path, FileType::RegularFile))) => path,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    if !image
                        .create_new(file, b"", 0o644)
                        .map_err(|e| BuildError::io(format!("creating /{file} in the image"), e))?
                    {
                        continue;
                    }
                    created.push(file);
                    root.join(file)
                }
                Err(e) => {
                    log.note(&format!("not binding {}: {e}", host.display()));
                    continue;
                }
            };
            let ok = Command::new("mount")
                .arg("--bind")
                .arg(&host)
                .arg(&target)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                log.note(&format!(
                    "could not bind {} into the staging root",
                    host.display()
                ));
            }
        }
        let policy = "usr/sbin/policy-rc.d";
        if matches!(
            image.plain_path("usr/sbin"),
            Ok(Some((_, FileType::Directory)))
        ) && image
            .create_new(policy, b"#!/bin/sh\nexit 101\n", 0o755)
            .map_err(|e| BuildError::io("writing policy-rc.d", e))?
        {
            created.push(policy);
        }
        f(log)
    })();
    let unmounted = mounts::unmount_all_below(root);
    for rel in created {
        let _ = image.remove_file(rel);
    }
    let value = result?;
    unmounted?;
    Ok(value)
}

/// Opens an image tree for path resolution inside it.
pub fn open_root(root: &Path) -> Result<ImageRoot, BuildError> {
    ImageRoot::open(root).map_err(|e| BuildError::io(format!("opening {}", root.display()), e))
}

/// Installs a Debian layer's packages with apt-get inside the merged root.
pub fn deb_install(plan: &LayerPlan, root: &Path, log: &mut Log) -> Result<(), BuildError> {
    if plan.install.is_empty() {
        log.note("nothing to install in this layer");
        return Ok(());
    }
    // Local repositories and package files are bind-mounted read-only under /run/certo.
    let mut sources = String::new();
    let mut binds: Vec<(PathBuf, String)> = Vec::new();
    for (i, repo) in plan.repos.iter().enumerate() {
        if let RepoLocation::DebFlat(dir) = &repo.location {
            binds.push((dir.clone(), format!("run/certo/repo{i}")));
            sources.push_str(&format!("deb [trusted=yes] file:/run/certo/repo{i} ./\n"));
        }
    }
    let mut args: Vec<String> = Vec::new();
    let mut file_dirs: Vec<PathBuf> = Vec::new();
    for item in &plan.install {
        match item {
            Install::Named { name, version } if version.is_empty() => args.push(name.clone()),
            Install::Named { name, version } => args.push(format!("{name}={version}")),
            Install::File { path, .. } => {
                let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
                let idx = match file_dirs.iter().position(|d| *d == dir) {
                    Some(i) => i,
                    None => {
                        file_dirs.push(dir.clone());
                        binds.push((dir, format!("run/certo/files{}", file_dirs.len() - 1)));
                        file_dirs.len() - 1
                    }
                };
                args.push(format!(
                    "/run/certo/files{idx}/{}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
            }
        }
    }
    let image = open_root(root)?;
    let list = "etc/apt/sources.list.d/certo.list";
    // The fixture repositories (Origin: Certo) win over the Debian archive where both
    // have a package (bookworm has its own bdii).
    let prefs = "etc/apt/preferences.d/certo";
    let run_existed = image.plain_path("run/certo").is_ok_and(|p| p.is_some());
    let result = with_chroot(root, log, |log| {
        for (src, dst) in &binds {
            mounts::bind_ro(src, &image, dst)?;
        }
        let in_image =
            |what: &str, e: std::io::Error| BuildError::io(format!("{what} in the image"), e);
        image
            .write(list, sources.as_bytes())
            .map_err(|e| in_image("writing /etc/apt/sources.list.d/certo.list", e))?;
        image
            .create_dir_all("etc/apt/preferences.d")
            .map_err(|e| in_image("creating /etc/apt/preferences.d", e))?;
        image
            .write(
                prefs,
                b"Package: *\nPin: release o=Certo\nPin-Priority: 1001\n",
            )
            .map_err(|e| in_image("writing /etc/apt/preferences.d/certo", e))?;
        let mut update = chroot_cmd(root, "apt-get");
        update.args(APT_OPTS).arg("update");
        let up = log.run(&mut update)?;
        if !up.success() || up.output.contains("\nE: ") || up.output.starts_with("E: ") {
            return Err(log.failure(
                Phase::Prepare,
                None,
                up.status,
                match unreachable_archive(&up.output) {
                    Some(line) => format!(
                        "apt-get update could not reach a repository (Debian layers install \
                         from the Debian archive at run time): {line}"
                    ),
                    None => "apt-get update could not read the repositories".into(),
                },
                &up.output,
            ));
        }
        if args.is_empty() {
            return Ok(());
        }
        let mut install = chroot_cmd(root, "apt-get");
        install
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(APT_OPTS)
            .args([
                "-y",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confold",
                "install",
            ])
            .args(&args);
        let out = log.run(&mut install)?;
        if !out.success() {
            return Err(deb_failure(log, out.status, &out.output));
        }
        let mut clean = chroot_cmd(root, "apt-get");
        clean.args(APT_OPTS).arg("clean");
        log.run_ok(Phase::Stage, &mut clean)?;
        Ok(())
    });
    // with_chroot has unmounted everything below the root, the binds included.
    let _ = image.remove_file(list);
    let _ = image.remove_file(prefs);
    if !run_existed {
        let _ = image.remove_tree("run/certo");
    } else {
        for (_, dst) in &binds {
            let _ = image.remove_tree(dst);
        }
    }
    result
}

fn chroot_cmd(root: &Path, program: &str) -> Command {
    let mut c = Command::new("chroot");
    c.arg(root)
        .arg(program)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8");
    c
}

/// Reads apt/dpkg output for the first failure: package, phase, exit status.
pub fn deb_failure(log: &Log, status: Option<i32>, output: &str) -> BuildError {
    let lines: Vec<&str> = output.lines().collect();
    for line in &lines {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("E: Unable to locate package ") {
            return log.failure(
                Phase::Resolve,
                Some(name.trim().to_owned()),
                status,
                format!("no repository provides {}", name.trim()),
                output,
            );
        }
        if let Some((pkg, rest)) = l.split_once(" : Depends: ") {
            return log.failure(
                Phase::Resolve,
                Some(pkg.trim().to_owned()),
                status,
                format!(
                    "unmet dependency: {} depends on {}",
                    pkg.trim(),
                    rest.trim()
                ),
                output,
            );
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim();
        if l.contains("trying to overwrite") {
            let pkg = lines[..i]
                .iter()
                .rev()
                .find_map(|p| p.trim().strip_prefix("Unpacking "))
                .and_then(|p| p.split_whitespace().next())
                .map(|p| p.split(':').next().unwrap_or(p).to_owned());
            return log.failure(
                Phase::Unpack,
                pkg,
                status,
                format!(
                    "file conflict: {}",
                    l.trim_start_matches("dpkg: error processing archive ")
                ),
                output,
            );
        }
        for (marker, phase_name) in [
            (
                "post-installation script subprocess returned error exit status ",
                "postinst",
            ),
            (
                "pre-installation script subprocess returned error exit status ",
                "preinst",
            ),
        ] {
            if let Some(pos) = l.find(marker) {
                let code = l[pos + marker.len()..].trim().parse::<i32>().ok();
                // "installed NAME package post-installation script ..." or "new NAME package ..."
                let pkg = l
                    .split_whitespace()
                    .skip_while(|w| !matches!(*w, "installed" | "new"))
                    .nth(1)
                    .map(|p| p.split(':').next().unwrap_or(p).to_owned());
                return log.failure(
                    Phase::Script,
                    pkg.clone(),
                    code.or(status),
                    format!(
                        "the {phase_name} script of {} exited with status {}",
                        pkg.as_deref().unwrap_or("a package"),
                        code.map_or("?".into(), |c| c.to_string())
                    ),
                    output,
                );
            }
        }
    }
    log.failure(
        Phase::Unpack,
        None,
        status,
        "apt-get install failed".into(),
        output,
    )
}

/// Installs an RPM layer's packages with dnf into `root`.
pub fn dnf_install(
    plan: &LayerPlan,
    recipe: &Recipe,
    root: &Path,
    scratch: &Path,
    log: &mut Log,
) -> Result<(), BuildError> {
    let Recipe::Dnf {
        arch, releasever, ..
    } = recipe
    else {
        return Err(BuildError::new(Phase::Prepare, "not an RPM recipe"));
    };
    if plan.install.is_empty() {
        log.note("nothing to install in this layer");
        return Ok(());
    }
    // Debian's rpm keeps its database under ~/.rpmmacros' _dbpath (~/.rpmdb by default):
    // a private HOME pins it to the image's /var/lib/rpm.
    let home = scratch.join("home");
    for dir in [
        home.clone(),
        scratch.join("cache"),
        scratch.join("persist"),
        scratch.join("log"),
    ] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| BuildError::io(format!("creating {}", dir.display()), e))?;
    }
    std::fs::write(home.join(".rpmmacros"), "%_dbpath /var/lib/rpm\n")
        .map_err(|e| BuildError::io("writing .rpmmacros", e))?;
    let mut cmd = Command::new("dnf");
    cmd.env("HOME", &home)
        .env("LC_ALL", "C.UTF-8")
        .arg(format!("--installroot={}", root.display()))
        .arg(format!("--releasever={releasever}"))
        .arg(format!("--forcearch={}", dnf_arch(arch)))
        .arg("--setopt=reposdir=/dev/null")
        .arg(format!(
            "--setopt=cachedir={}",
            scratch.join("cache").display()
        ))
        .arg(format!(
            "--setopt=persistdir={}",
            scratch.join("persist").display()
        ))
        .arg(format!("--setopt=logdir={}", scratch.join("log").display()))
        .arg("--setopt=install_weak_deps=False")
        .arg("--setopt=keepcache=False")
        .arg("--nogpgcheck")
        .arg("--noplugins")
        .arg("--disableplugin=*")
        .arg("-y");
    for repo in &plan.repos {
        if let RepoLocation::Rpm(dir) = &repo.location {
            cmd.arg(format!(
                "--repofrompath={},file://{}",
                repo.id.replace('/', "-"),
                dir.display()
            ));
        }
    }
    cmd.arg("install");
    for item in &plan.install {
        match item {
            Install::Named { name, version } if version.is_empty() => {
                cmd.arg(name);
            }
            Install::Named { name, version } => {
                cmd.arg(format!("{name}-{version}"));
            }
            Install::File { path, .. } => {
                cmd.arg(path);
            }
        }
    }
    let out = log.run(&mut cmd)?;
    if let Some(err) = rpm_script_failure(log, &out.output) {
        return Err(err);
    }
    if !out.success() {
        return Err(rpm_failure(log, out.status, &out.output));
    }
    Ok(())
}

fn dnf_arch(arch: &str) -> &str {
    match arch {
        "i386" => "i686",
        other => other,
    }
}

/// rpm reports a failed `%post` as a warning and dnf still exits 0: find it.
fn rpm_script_failure(log: &Log, output: &str) -> Option<BuildError> {
    for line in output.lines() {
        let l = line.trim();
        // "warning: %post(NAME-V-R.A) scriptlet failed, exit status 1"
        let Some(start) = l.find('%') else { continue };
        let Some(pos) = l.find(" scriptlet failed, exit status ") else {
            continue;
        };
        let head = &l[start + 1..pos];
        let Some((script, rest)) = head.split_once('(') else {
            continue;
        };
        let nevra = rest.trim_end_matches(')');
        let code = l[pos + " scriptlet failed, exit status ".len()..]
            .trim()
            .parse::<i32>()
            .ok();
        return Some(log.failure(
            Phase::Script,
            Some(nevra.to_owned()),
            code,
            format!(
                "the %{script} script of {nevra} exited with status {}",
                code.map_or("?".into(), |c| c.to_string())
            ),
            output,
        ));
    }
    None
}

fn rpm_failure(log: &Log, status: Option<i32>, output: &str) -> BuildError {
    for line in output.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("No match for argument: ") {
            return log.failure(
                Phase::Resolve,
                Some(name.to_owned()),
                status,
                format!("no repository provides {name}"),
                output,
            );
        }
        if let Some(pos) = l.find("nothing provides ") {
            let rest = &l[pos + "nothing provides ".len()..];
            let (dep, needer) = rest.split_once(" needed by ").unwrap_or((rest, ""));
            let needer = needer.split_whitespace().next().unwrap_or("").to_owned();
            return log.failure(
                Phase::Resolve,
                (!needer.is_empty()).then(|| needer.clone()),
                status,
                format!("unmet dependency: {needer} requires {dep}, which no repository provides"),
                output,
            );
        }
        if l.contains(" conflicts with file from package ") {
            let pkg = l
                .split(" from install of ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned);
            return log.failure(
                Phase::Unpack,
                pkg,
                status,
                format!("file conflict: {}", l.trim_start_matches("file ")),
                output,
            );
        }
    }
    log.failure(
        Phase::Unpack,
        None,
        status,
        "dnf install failed".into(),
        output,
    )
}

/// Applies the layer's configuration changes (`KEY=VALUE`, replacing an existing
/// assignment or appending). Each file is resolved inside the image, as the guest would
/// resolve it: a link on the way (`/opt/glite/yaim/etc -> /etc`) leads to the image's
/// file, never to the build host's. Runs before the chroot's mounts exist.
pub fn apply_config(plan: &LayerPlan, root: &Path, log: &mut Log) -> Result<(), BuildError> {
    if plan.config.is_empty() {
        return Ok(());
    }
    let image = open_root(root)?;
    for (rel, key, value) in &plan.config {
        let change = format!("configuration change {key}={value}");
        let text = image.read_to_string(rel).map_err(|e| {
            BuildError::new(
                Phase::Configure,
                match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        format!("{change}: /{rel} does not exist in the image")
                    }
                    std::io::ErrorKind::InvalidInput => {
                        format!("{change}: /{rel} is not a regular file")
                    }
                    _ => format!("{change}: reading /{rel}: {e}"),
                },
            )
        })?;
        let prefix = format!("{key}=");
        let mut replaced = false;
        let mut out: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.trim_start().starts_with(&prefix) {
                out.push(format!("{key}={value}"));
                replaced = true;
            } else {
                out.push(line.to_owned());
            }
        }
        if !replaced {
            out.push(format!("{key}={value}"));
        }
        let mut new = out.join("\n");
        new.push('\n');
        image.rewrite(rel, new.as_bytes()).map_err(|e| {
            BuildError::new(Phase::Configure, format!("{change}: writing /{rel}: {e}"))
        })?;
        log.note(&format!("set {key}={value} in /{rel}"));
    }
    Ok(())
}

/// Runs YAIM's checker inside the image when the image has one (call inside
/// [`with_chroot`]).
pub fn yaim_check(root: &Path, log: &mut Log) -> Result<(), BuildError> {
    let checker = "opt/glite/yaim/bin/yaim-check";
    let image = open_root(root)?;
    if !image.is_file(checker) {
        return Ok(());
    }
    let out = log.run(&mut chroot_cmd(root, "/opt/glite/yaim/bin/yaim-check"))?;
    if !out.success() {
        let first = out
            .output
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with("certo:"))
            .unwrap_or("yaim-check refused the configuration")
            .trim()
            .to_owned();
        return Err(log.failure(
            Phase::Configure,
            None,
            out.status,
            format!("the configuration does not validate: {first}"),
            &out.output,
        ));
    }
    Ok(())
}

/// Every installed package: (name, version, arch).
pub fn installed_packages(
    family: &str,
    root: &Path,
    scratch: &Path,
) -> Vec<(String, String, String)> {
    let out = if family == "deb" {
        // Inside the image: its dpkg database is wherever the image's paths lead.
        chroot_cmd(root, "dpkg-query")
            .args(["-W", "-f", "${Package} ${Version} ${Architecture}\\n"])
            .output()
    } else {
        Command::new("rpm")
            .env("HOME", scratch.join("home"))
            .arg("--root")
            .arg(root)
            .args([
                "--dbpath",
                "/var/lib/rpm",
                "-qa",
                "--qf",
                "%{NAME} %{VERSION}-%{RELEASE} %{ARCH}\\n",
            ])
            .output()
    };
    let Ok(out) = out else { return Vec::new() };
    let mut list: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_owned(),
                it.next()?.to_owned(),
                it.next().unwrap_or("").to_owned(),
            ))
        })
        .collect();
    list.sort();
    list
}

/// Files that differ on every build and mean nothing in an image: logs, caches, indexes.
/// Each path is resolved inside the image and removal never follows a link, so a
/// package that made `/var/tmp` a link to `/tmp` (or to `/`) empties the image's own
/// directory, never the build host's.
pub fn remove_volatile(root: &Path, log: &mut Log) -> Result<(), BuildError> {
    let image = open_root(root)?;
    let dirs = [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log/apt",
        "var/cache/dnf",
        "var/lib/dnf",
        "tmp",
        "var/tmp",
    ];
    for dir in dirs {
        if let Err(e) = image.empty_dir(dir, &["partial", "archives"]) {
            log.note(&format!("left /{dir} as it is: {e}"));
        }
    }
    for file in [
        "var/log/dpkg.log",
        "var/log/alternatives.log",
        "var/log/dnf.log",
        "var/log/dnf.librepo.log",
        "var/log/dnf.rpm.log",
        "var/log/hawkey.log",
        "var/cache/debconf/config.dat-old",
        "var/cache/debconf/templates.dat-old",
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/diversions-old",
        "var/cache/ldconfig/aux-cache",
    ] {
        if let Err(e) = image.remove_file(file) {
            log.note(&format!("left /{file} as it is: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unreachable_archive;

    #[test]
    fn an_unreachable_archive_is_named_as_the_cause() {
        let out = "I: running apt-get update...\n\
                   Err:1 http://deb.debian.org/debian bookworm InRelease\n  \
                   Temporary failure resolving 'deb.debian.org'\n\
                   E: apt-get update -oAPT::Status-Fd=<$fd> failed\n";
        assert_eq!(
            unreachable_archive(out),
            Some("Temporary failure resolving 'deb.debian.org'")
        );
        assert_eq!(unreachable_archive("E: Unable to locate package x\n"), None);
    }
}
