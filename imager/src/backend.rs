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
    dnf_install(plan, recipe, tree, scratch, log).map(|_| ())
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

/// Installs a Debian layer's packages with apt-get inside the merged root; returns what
/// apt-get printed. apt refuses a downgrade by itself unless the layer allows one.
pub fn deb_install(plan: &LayerPlan, root: &Path, log: &mut Log) -> Result<String, BuildError> {
    if plan.install.is_empty() {
        log.note("nothing to install in this layer");
        return Ok(String::new());
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
            return Ok(String::new());
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
                // "name (old => new)" in apt's lists, for the messages.
                "-o",
                "APT::Get::Show-Versions=true",
            ]);
        if plan.allow_downgrade {
            install.arg("--allow-downgrades");
        }
        install.arg("install").args(&args);
        let out = log.run(&mut install)?;
        if !out.success() {
            return Err(deb_failure(log, plan, out.status, &out.output));
        }
        let mut clean = chroot_cmd(root, "apt-get");
        clean.args(APT_OPTS).arg("clean");
        log.run_ok(Phase::Stage, &mut clean)?;
        Ok(out.output)
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

/// Reads apt/dpkg output for the failure: package(s), phase, exit status, and apt's own
/// words. A failure no narrower pattern matches still names the layer's packages that the
/// failing lines mention and quotes those lines.
pub fn deb_failure(log: &Log, plan: &LayerPlan, status: Option<i32>, output: &str) -> BuildError {
    let lines: Vec<&str> = output.lines().collect();
    let errors: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("E: "))
        .collect();
    if let Some(refusal) = errors
        .iter()
        .find(|l| l.contains("Packages were downgraded and -y was used without --allow-downgrades"))
    {
        return apt_downgrade_refusal(log, plan, status, output, refusal);
    }
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
    }
    let depends: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| l.trim().split_once(" : Depends: "))
        .map(|(p, r)| (p.trim(), r.trim()))
        .collect();
    if let Some((pkg, rest)) = depends.first() {
        let mut message = format!("unmet dependency: {pkg} depends on {rest}");
        for (p, r) in depends.iter().skip(1).take(2) {
            message.push_str(&format!("; {p} depends on {r}"));
        }
        if !errors.is_empty() {
            message.push_str(&format!(" (apt-get: {})", errors.join(" ")));
        }
        // The layer's packages the dependency lines name (the depending one or the one
        // depended on), else the depending package.
        let named = mentioned_packages(
            plan,
            &depends
                .iter()
                .map(|(p, r)| format!("{p} : Depends: {r}"))
                .collect::<Vec<_>>(),
        );
        return log.failure(
            Phase::Resolve,
            Some(if named.is_empty() {
                (*pkg).to_owned()
            } else {
                named.join(", ")
            }),
            status,
            message,
            output,
        );
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
    let quoted = apt_solver_lines(&lines);
    unmatched_failure(log, plan, "apt-get", status, output, &quoted)
}

/// apt's refusal of a downgrade: which package from which version to which, from its
/// "The following packages will be DOWNGRADED:" list (`name (old => new)`).
fn apt_downgrade_refusal(
    log: &Log,
    plan: &LayerPlan,
    status: Option<i32>,
    output: &str,
    refusal: &str,
) -> BuildError {
    let listed = apt_downgraded(output);
    let names: Vec<String> = listed.iter().map(|(n, _)| n.clone()).collect();
    let package = (!names.is_empty()).then(|| names.join(", "));
    // apt lists a file of the installed version with other content as a downgrade of
    // that version to itself: the file is not what is installed.
    if !listed.is_empty()
        && listed
            .iter()
            .all(|(_, v)| v.as_ref().is_some_and(|(from, to)| from == to))
    {
        let files: Vec<String> = listed
            .iter()
            .map(|(name, v)| {
                let version = v.as_ref().map_or("", |(from, _)| from.as_str());
                let file = plan
                    .install
                    .iter()
                    .find_map(|i| match i {
                        Install::File { name: n, path, .. } if n == name => {
                            path.file_name().map(|f| f.to_string_lossy().into_owned())
                        }
                        _ => None,
                    })
                    .unwrap_or_else(|| format!("{name} {version}"));
                format!(
                    "{file} is not what is installed: the image has {name} {version} from \
                     another package file (same version, other content: apt takes the file \
                     for a downgrade of {name} {version} to itself and refuses it)"
                )
            })
            .collect();
        return log.failure(
            Phase::Install,
            package,
            status,
            format!("{}; apt-get: {refusal}", files.join("; ")),
            output,
        );
    }
    let list: Vec<String> = listed
        .iter()
        .map(|(name, v)| match v {
            Some((from, to)) => format!("{name} {from} → {to}"),
            None => name.clone(),
        })
        .collect();
    log.failure(
        Phase::Install,
        package,
        status,
        format!(
            "downgrade refused: {} ({}); apt-get: {refusal}",
            if list.is_empty() {
                "apt lists no package".to_owned()
            } else {
                list.join(", ")
            },
            crate::verify::downgrade_policy(plan)
        ),
        output,
    )
}

/// The packages of apt's "will be DOWNGRADED" list, with (old, new) when apt shows them.
pub fn apt_downgraded(output: &str) -> Vec<(String, Option<(String, String)>)> {
    let mut out = Vec::new();
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        if !line
            .trim_start()
            .starts_with("The following packages will be DOWNGRADED")
        {
            continue;
        }
        for item in lines.by_ref() {
            if !item.starts_with(' ') {
                break;
            }
            let item = item.trim();
            match item.split_once(" (") {
                Some((name, rest)) if rest.contains("=>") => {
                    let (from, to) = rest
                        .trim_end_matches(')')
                        .split_once("=>")
                        .unwrap_or_default();
                    out.push((
                        name.trim().to_owned(),
                        Some((from.trim().to_owned(), to.trim().to_owned())),
                    ));
                }
                _ => out.extend(item.split_whitespace().map(|n| (n.to_owned(), None))),
            }
        }
        break;
    }
    out
}

/// apt's and dpkg's lines that say why: `E:` lines, dpkg's errors and the reason lines
/// under them, dependency lines. The generic "dpkg returned an error code" only when
/// nothing better is there.
fn apt_solver_lines(lines: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut after_dpkg = false;
    for line in lines {
        let l = line.trim();
        if after_dpkg && line.starts_with(' ') && !l.is_empty() {
            // dpkg's reason, on the line under its "dpkg: error processing ...:".
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(l);
            }
            continue;
        }
        after_dpkg = l.starts_with("dpkg: ");
        let wanted = l.starts_with("E: ")
            || after_dpkg
            || [
                " : Depends: ",
                " : Breaks: ",
                " : Conflicts: ",
                " : PreDepends: ",
            ]
            .iter()
            .any(|m| l.contains(m));
        if wanted && !out.iter().any(|o| o == l) {
            out.push(l.to_owned());
        } else if after_dpkg {
            // A repeated dpkg line: its reason is not appended twice.
            after_dpkg = false;
        }
    }
    let generic =
        |l: &String| l.starts_with("E: Sub-process ") && l.contains("returned an error code");
    if out.iter().any(|l| !generic(l)) {
        out.retain(|l| !generic(l));
    }
    out
}

/// Installs an RPM layer's packages with dnf into `root`; returns what dnf printed.
/// dnf downgrades without a word and skips a file whose name-version-release is
/// installed: [`crate::verify`] checks the result.
pub fn dnf_install(
    plan: &LayerPlan,
    recipe: &Recipe,
    root: &Path,
    scratch: &Path,
    log: &mut Log,
) -> Result<String, BuildError> {
    let Recipe::Dnf {
        arch, releasever, ..
    } = recipe
    else {
        return Err(BuildError::new(Phase::Prepare, "not an RPM recipe"));
    };
    if plan.install.is_empty() {
        log.note("nothing to install in this layer");
        return Ok(String::new());
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
        return Err(rpm_failure(log, plan, out.status, &out.output));
    }
    Ok(out.output)
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

fn rpm_failure(log: &Log, plan: &LayerPlan, status: Option<i32>, output: &str) -> BuildError {
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
    let quoted = dnf_solver_lines(output);
    unmatched_failure(log, plan, "dnf", status, output, &quoted)
}

/// dnf's and rpm's lines that say why: the solver's `Problem:` lines and the ` - ` lines
/// under them (without those prefixes), `Error:` and rpm's `error:` lines with a text.
pub fn dnf_solver_lines(output: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in output.lines() {
        let l = line.trim();
        let text = if l.starts_with("Problem") {
            l.split_once(':').map(|(_, r)| r.trim())
        } else {
            l.strip_prefix("- ")
                .or_else(|| l.strip_prefix("Error:"))
                .or_else(|| l.strip_prefix("error:"))
                .map(str::trim)
        };
        if let Some(t) = text
            && !t.is_empty()
            && !out.iter().any(|o| o == t)
        {
            out.push(t.to_owned());
        }
    }
    out
}

/// Whether `line` names the package `name` as a package: not inside a longer name, and
/// followed by nothing, a separator, `-DIGIT` (an RPM NEVR), `_` (a Debian file name),
/// `.` (an RPM architecture) or `:` (a Debian architecture).
pub fn mentions(line: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let b = line.as_bytes();
    let part_of_name = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'_');
    let mut from = 0;
    while let Some(pos) = line[from..].find(name) {
        let (start, end) = (from + pos, from + pos + name.len());
        let before = start == 0 || !(part_of_name(b[start - 1]) || b[start - 1] == b'.');
        let after = match b.get(end) {
            None => true,
            Some(b'-') => b.get(end + 1).is_some_and(u8::is_ascii_digit),
            Some(b'_' | b'.' | b':') => true,
            Some(c) => !part_of_name(*c),
        };
        if before && after {
            return true;
        }
        from = end;
    }
    false
}

/// The layer's package names that `lines` mention, in the layer's order.
fn mentioned_packages(plan: &LayerPlan, lines: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in &plan.install {
        let (Install::Named { name, .. } | Install::File { name, .. }) = item;
        if lines.iter().any(|l| mentions(l, name)) && !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

/// A failure no narrower pattern knows: the layer's packages that the solver's lines
/// mention (else every package of the layer), and those lines (else the tool's last line).
fn unmatched_failure(
    log: &Log,
    plan: &LayerPlan,
    tool: &str,
    status: Option<i32>,
    output: &str,
    quoted: &[String],
) -> BuildError {
    const MAX_QUOTED: usize = 6;
    let mut names = mentioned_packages(plan, quoted);
    if names.is_empty() {
        let all: Vec<String> = output.lines().map(str::to_owned).collect();
        names = mentioned_packages(plan, &all);
    }
    if names.is_empty() {
        for item in &plan.install {
            let (Install::Named { name, .. } | Install::File { name, .. }) = item;
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    let why = if quoted.is_empty() {
        let last = output
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && !l.starts_with("certo:") && !l.starts_with("(try "))
            .unwrap_or("no output");
        format!(
            "{tool} exited with status {} and said: {last}",
            status.map_or("?".into(), |s| s.to_string())
        )
    } else {
        let mut q: Vec<&str> = quoted.iter().take(MAX_QUOTED).map(String::as_str).collect();
        let more = quoted.len().saturating_sub(MAX_QUOTED);
        let extra = format!("{more} more lines in the log");
        if more > 0 {
            q.push(&extra);
        }
        q.join("; ")
    };
    log.failure(
        Phase::Install,
        (!names.is_empty()).then(|| names.join(", ")),
        status,
        format!(
            "{tool} cannot install {}: {why}",
            if names.is_empty() {
                "the layer's packages".to_owned()
            } else {
                names.join(", ")
            }
        ),
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
    use super::*;
    use crate::digest::{LayerInputs, LayerKind};

    /// A patch layer installing these package files (name, file name).
    fn patch_plan(files: &[(&str, &str)], allow_downgrade: bool) -> LayerPlan {
        let inputs = LayerInputs {
            parent: Some([7; 32]),
            kind: LayerKind::Patch,
            backend: "test".into(),
            repository_state: Vec::new(),
            packages: Vec::new(),
            config_files: Vec::new(),
            allow_downgrade,
            root_password: None,
        };
        LayerPlan {
            kind: LayerKind::Patch,
            backend: "test".into(),
            repos: Vec::new(),
            install: files
                .iter()
                .map(|(name, file)| Install::File {
                    name: (*name).into(),
                    path: PathBuf::from("/srv/world").join(file),
                    sha256: String::new(),
                })
                .collect(),
            config: Vec::new(),
            digest: inputs.digest().expect("digest"),
            inputs,
            label: "patch 1 r1".into(),
            allow_downgrade,
            root_password: None,
        }
    }

    fn test_log() -> (tempfile::TempDir, Log) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::create(&dir.path().join("build.log")).expect("log");
        (dir, log)
    }

    /// dnf 4.14's words for two versions of one package in one transaction (3504 + 3505).
    #[test]
    fn dnf_cannot_install_both_names_the_package_and_quotes_the_solver() {
        let out = "Added os repo from file:///w/rpm/os/sl5/x86_64\n\
                   Last metadata expiration check: 0:15:42 ago on Tue Dec  1 15:04:17 2026.\n\
                   Error: \n \
                   Problem: cannot install both glite-info-provider-service-1.6.0-1.noarch and glite-info-provider-service-1.5.0-1.noarch\n  \
                   - conflicting requests\n\
                   (try to add '--allowerasing' to command line to replace conflicting packages or '--skip-broken' to skip uninstallable packages)\n";
        let plan = patch_plan(
            &[
                (
                    "glite-info-provider-service",
                    "glite-info-provider-service-1.5.0-1.noarch.rpm",
                ),
                (
                    "glite-info-provider-service",
                    "glite-info-provider-service-1.6.0-1.noarch.rpm",
                ),
            ],
            false,
        );
        let (_d, log) = test_log();
        let e = rpm_failure(&log, &plan, Some(1), out);
        assert_eq!(e.phase, Phase::Install);
        assert_eq!(e.package.as_deref(), Some("glite-info-provider-service"));
        assert_eq!(e.exit_status, Some(1));
        assert_eq!(
            e.message,
            "dnf cannot install glite-info-provider-service: cannot install both \
             glite-info-provider-service-1.6.0-1.noarch and \
             glite-info-provider-service-1.5.0-1.noarch; conflicting requests"
        );
    }

    /// A problem with an installed package names the layer's package the lines mention,
    /// not the installed metapackage.
    #[test]
    fn dnf_problems_name_only_the_layers_packages() {
        let out = "Error: \n \
                   Problem: problem with installed package glite-WN-3.2.0-1.noarch\n  \
                   - package glite-WN-3.2.0-1.noarch requires glite-yaim-core >= 4.0.11, but none of the providers can be installed\n  \
                   - cannot install both glite-yaim-core-4.0.10-1.noarch and glite-yaim-core-4.0.11-1.noarch\n  \
                   - conflicting requests\n";
        let plan = patch_plan(
            &[
                ("glite-yaim-core", "glite-yaim-core-4.0.10-1.noarch.rpm"),
                ("glite-wn-info", "glite-wn-info-1.2.3-2.sl5.x86_64.rpm"),
            ],
            false,
        );
        let (_d, log) = test_log();
        let e = rpm_failure(&log, &plan, Some(1), out);
        assert_eq!(e.package.as_deref(), Some("glite-yaim-core"));
        assert!(
            e.message.starts_with(
                "dnf cannot install glite-yaim-core: problem with installed package \
                 glite-WN-3.2.0-1.noarch; package glite-WN-3.2.0-1.noarch requires \
                 glite-yaim-core >= 4.0.11"
            ),
            "{}",
            e.message
        );
        // The known patterns keep their phases.
        let missing = " Problem: conflicting requests\n  \
                       - nothing provides libcerto-absent needed by certo-test-missing-dep-1.0-1.noarch\n";
        let e = rpm_failure(&log, &plan, Some(1), missing);
        assert_eq!(e.phase, Phase::Resolve);
        assert_eq!(
            e.package.as_deref(),
            Some("certo-test-missing-dep-1.0-1.noarch")
        );
    }

    /// No solver line at all: still the layer's packages and the tool's last words.
    #[test]
    fn an_unknown_dnf_failure_is_never_bare() {
        let plan = patch_plan(
            &[("certo-test-ok", "certo-test-ok-1.0-1.noarch.rpm")],
            false,
        );
        let (_d, log) = test_log();
        let e = rpm_failure(
            &log,
            &plan,
            Some(1),
            "Curl error (37): Couldn't read a file\n",
        );
        assert_eq!(e.phase, Phase::Install);
        assert_eq!(e.package.as_deref(), Some("certo-test-ok"));
        assert_eq!(
            e.message,
            "dnf cannot install certo-test-ok: dnf exited with status 1 and said: \
             Curl error (37): Couldn't read a file"
        );
    }

    /// apt-get 2.6 refusing a downgrade, with `APT::Get::Show-Versions`.
    #[test]
    fn apt_downgrade_refusal_says_which_package_from_which_version_to_which() {
        let out = "Reading package lists...\n\
                   Building dependency tree...\n\
                   Reading state information...\n\
                   The following packages will be DOWNGRADED:\n   \
                   glite-yaim-core (4.0.11-1 => 4.0.11-0)\n\
                   0 upgraded, 0 newly installed, 1 downgraded, 0 to remove and 0 not upgraded.\n\
                   E: Packages were downgraded and -y was used without --allow-downgrades.\n";
        let plan = patch_plan(
            &[("glite-yaim-core", "glite-yaim-core_4.0.11-0_all.deb")],
            false,
        );
        let (_d, log) = test_log();
        let e = deb_failure(&log, &plan, Some(100), out);
        assert_eq!(e.phase, Phase::Install);
        assert_eq!(e.package.as_deref(), Some("glite-yaim-core"));
        assert!(
            e.message.starts_with(
                "downgrade refused: glite-yaim-core 4.0.11-1 → 4.0.11-0 (the record does not allow downgrades"
            ),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with(
                "apt-get: E: Packages were downgraded and -y was used without --allow-downgrades."
            ),
            "{}",
            e.message
        );
        // Without versions (apt's default list), the names still come through.
        assert_eq!(
            apt_downgraded("The following packages will be DOWNGRADED:\n  a b\n0 upgraded\n"),
            [("a".to_owned(), None), ("b".to_owned(), None)]
        );
    }

    /// apt takes a file of the installed version with other content for a downgrade to
    /// the same version: the file is named as not what is installed.
    #[test]
    fn apt_same_version_other_content_names_the_file() {
        let out = "The following packages will be DOWNGRADED:\n   \
                   glite-yaim-core (4.0.11-1 => 4.0.11-1)\n\
                   0 upgraded, 0 newly installed, 1 downgraded, 0 to remove and 0 not upgraded.\n\
                   E: Packages were downgraded and -y was used without --allow-downgrades.\n";
        let plan = patch_plan(
            &[("glite-yaim-core", "glite-yaim-core_4.0.11-1_all.deb")],
            false,
        );
        let (_d, log) = test_log();
        let e = deb_failure(&log, &plan, Some(100), out);
        assert_eq!(e.phase, Phase::Install);
        assert!(
            e.message.starts_with(
                "glite-yaim-core_4.0.11-1_all.deb is not what is installed: the image has \
                 glite-yaim-core 4.0.11-1 from another package file (same version, other content"
            ),
            "{}",
            e.message
        );
    }

    /// apt-get 2.6's unmet dependency keeps its phase and now quotes apt's `E:` line.
    #[test]
    fn apt_unmet_dependency_quotes_apt() {
        let out = "Some packages could not be installed. This may mean that you have\n\
                   The following packages have unmet dependencies:\n \
                   certo-test-missing-dep : Depends: libcerto-absent but it is not installable\n\
                   E: Unable to correct problems, you have held broken packages.\n";
        let plan = patch_plan(
            &[(
                "certo-test-missing-dep",
                "certo-test-missing-dep_1.0-1_all.deb",
            )],
            false,
        );
        let (_d, log) = test_log();
        let e = deb_failure(&log, &plan, Some(100), out);
        assert_eq!(e.phase, Phase::Resolve);
        assert_eq!(e.package.as_deref(), Some("certo-test-missing-dep"));
        assert_eq!(
            e.message,
            "unmet dependency: certo-test-missing-dep depends on libcerto-absent but it is \
             not installable (apt-get: E: Unable to correct problems, you have held broken packages.)"
        );
    }

    /// Something no pattern knows: the `E:` lines and dpkg's reason, and the package.
    #[test]
    fn an_unknown_apt_failure_quotes_apt_and_dpkg() {
        let out = "Unpacking glite-wn-env (3.2.4-1) over (3.2.3-1) ...\n\
                   dpkg: error processing archive /run/certo/files0/glite-wn-env_3.2.4-1_all.deb (--unpack):\n \
                   cannot copy extracted data for './etc/profile.d/grid-env.sh' to '/etc/profile.d/grid-env.sh.dpkg-new': failed to write (No space left on device)\n\
                   E: Sub-process /usr/bin/dpkg returned an error code (1)\n";
        let plan = patch_plan(&[("glite-wn-env", "glite-wn-env_3.2.4-1_all.deb")], false);
        let (_d, log) = test_log();
        let e = deb_failure(&log, &plan, Some(100), out);
        assert_eq!(e.phase, Phase::Install);
        assert_eq!(e.package.as_deref(), Some("glite-wn-env"));
        assert!(
            e.message.starts_with(
                "apt-get cannot install glite-wn-env: dpkg: error processing archive \
                 /run/certo/files0/glite-wn-env_3.2.4-1_all.deb (--unpack): cannot copy \
                 extracted data"
            ),
            "{}",
            e.message
        );
        assert!(!e.message.contains("Sub-process"), "{}", e.message);
    }

    #[test]
    fn package_names_are_matched_as_names() {
        assert!(mentions(
            "cannot install both glite-wn-1.0-1.noarch and",
            "glite-wn"
        ));
        assert!(!mentions("glite-wn-info-1.2.3-1.sl5.x86_64", "glite-wn"));
        assert!(!mentions("libglite-wn-1.0", "glite-wn"));
        assert!(mentions(
            "/run/certo/files0/glite-wn-env_3.2.4-1_all.deb",
            "glite-wn-env"
        ));
        assert!(mentions("bdii:amd64 (5.2.5-1)", "bdii"));
        assert!(mentions("Depends: bdii (<< 6~)", "bdii"));
        assert!(!mentions("glite-bdii-config", "bdii"));
    }

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
