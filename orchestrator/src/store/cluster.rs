//! The embedded default store: a private PostgreSQL cluster under Certo's data
//! directory, started with the system's `initdb`/`pg_ctl`, listening only on a
//! Unix socket in a directory that only its owner can enter.
//!
//! PostgreSQL refuses to run as root. When Certo runs as root, the server runs
//! as the `postgres` system user and the cluster's files belong to it; if that
//! user cannot reach the data directory (a home directory closed to others, say),
//! the cluster lives in `/var/lib/certo/postgres-<hash of the data directory>`
//! instead, and `certo db status` says where.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The database Certo uses inside its cluster, and the superuser that owns it.
pub const DATABASE: &str = "certo";
pub const SUPERUSER: &str = "certo";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server programs not found in {0} (set CERTO_PG_BIN, or install the Debian package postgresql-15)"
    )]
    NoBinaries(PathBuf),
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` user to run it (install postgresql-15, or run Certo as an ordinary user)"
    )]
    NoServerUser,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {detail}")]
    Command {
        program: String,
        status: String,
        detail: String,
    },
}

fn io<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> ClusterError + use<'p> {
    move |source| ClusterError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The system user the server runs as, when Certo itself runs as root.
#[derive(Debug, Clone)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

/// A private PostgreSQL cluster: where its files live and how to reach it.
#[derive(Debug, Clone)]
pub struct Cluster {
    data_dir: PathBuf,
    root: PathBuf,
    bin_dir: PathBuf,
    server_user: Option<ServerUser>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub running: bool,
    pub pid: Option<u32>,
    pub initialised: bool,
    pub pgdata: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub url: String,
    pub server_version: Option<String>,
}

/// The effective user id of this process (from `/proc/self/status`).
pub(crate) fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(ServerUser {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
    })
}

fn short_hash(path: &Path) -> String {
    hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..6])
}

/// Finds the PostgreSQL server programs: `CERTO_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("CERTO_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if dir.join("pg_ctl").is_file() {
            Ok(dir)
        } else {
            Err(ClusterError::NoBinaries(dir))
        };
    }
    let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
    if preferred.join("pg_ctl").is_file() {
        return Ok(preferred);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(ClusterError::NoBinaries(preferred))
}

impl Cluster {
    /// Describes the cluster of a data directory; touches nothing.
    pub fn new(data_dir: &Path) -> Result<Cluster, ClusterError> {
        let bin_dir = find_bin_dir()?;
        let data_dir = absolute(data_dir);
        let server_user = if effective_uid() == Some(0) {
            Some(lookup_user("postgres").ok_or(ClusterError::NoServerUser)?)
        } else {
            None
        };
        let mut root = data_dir.join("postgres");
        if let Some(user) = &server_user
            && !user_can_reach(user, &data_dir)
        {
            root = PathBuf::from(format!("/var/lib/certo/postgres-{}", short_hash(&data_dir)));
        }
        Ok(Cluster {
            data_dir,
            root,
            bin_dir,
            server_user,
        })
    }

    pub fn pgdata(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The socket directory: inside the cluster's folder unless that path is too
    /// long for a Unix socket address (108 bytes), then a short one under /tmp.
    pub fn socket_dir(&self) -> PathBuf {
        let dir = self.root.join("run");
        if dir.as_os_str().len() + "/.s.PGSQL.5432".len() < 100 {
            dir
        } else {
            PathBuf::from(format!("/tmp/certo-pg-{}", short_hash(&self.root)))
        }
    }

    /// A libpq-style URL for the cluster's database (trust authentication over
    /// the private socket: only the socket directory's owner can connect).
    pub fn url(&self, database: &str) -> String {
        let host: String = self
            .socket_dir()
            .display()
            .to_string()
            .chars()
            .map(|c| match c {
                ' ' => "%20".to_string(),
                '%' => "%25".to_string(),
                '&' => "%26".to_string(),
                '#' => "%23".to_string(),
                '?' => "%3F".to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("postgres://{SUPERUSER}@localhost/{database}?host={host}")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.env_remove("PGDATA")
            .env("LC_ALL", "C")
            .current_dir(if self.root.is_dir() {
                &self.root
            } else {
                Path::new("/")
            });
        if let Some(user) = &self.server_user {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    fn run(&self, mut cmd: Command, program: &str) -> Result<Output, ClusterError> {
        let out = cmd.output().map_err(|e| ClusterError::Command {
            program: program.to_string(),
            status: "not started".into(),
            detail: e.to_string(),
        })?;
        if out.status.success() {
            Ok(out)
        } else {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if detail.is_empty() {
                detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            Err(ClusterError::Command {
                program: program.to_string(),
                status: out.status.to_string(),
                detail,
            })
        }
    }

    /// Makes a directory owned by the server user, mode 0700.
    fn private_dir(&self, dir: &Path) -> Result<(), ClusterError> {
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        if let Some(user) = &self.server_user {
            chown(dir, Some(user.uid), Some(user.gid)).map_err(io("cannot chown", dir))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("cannot set permissions of", dir))
    }

    pub fn is_initialised(&self) -> bool {
        self.pgdata().join("PG_VERSION").is_file()
    }

    /// The server's process id from `postmaster.pid`, if the file exists.
    fn recorded_pid(&self) -> Option<u32> {
        fs::read_to_string(self.pgdata().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
    }

    /// Whether the server runs: the process `postmaster.pid` names is alive (not
    /// a zombie) and works in this data directory. (`pg_ctl status` is not
    /// enough: where nothing reaps orphans, a killed server lingers as a zombie
    /// that still "exists".)
    pub fn status(&self) -> ClusterStatus {
        let pid = self
            .recorded_pid()
            .filter(|pid| server_processes(&self.pgdata()).contains(pid));
        ClusterStatus {
            running: pid.is_some(),
            pid,
            initialised: self.is_initialised(),
            pgdata: self.pgdata(),
            socket_dir: self.socket_dir(),
            log_file: self.log_file(),
            url: self.url(DATABASE),
            server_version: fs::read_to_string(self.pgdata().join("PG_VERSION"))
                .ok()
                .map(|v| v.trim().to_string()),
        }
    }

    /// After a crash of the server: waits for its orphaned backends to exit
    /// (they notice the postmaster's death within moments), then removes the
    /// stale `postmaster.pid`, so that a new server can start safely.
    fn clear_after_crash(&self) -> Result<(), ClusterError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = server_processes(&self.pgdata());
            if left.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(ClusterError::Command {
                    program: "postgres".into(),
                    status: "stale".into(),
                    detail: format!(
                        "the server is not answering but processes {left:?} still work in {}; stop them first",
                        self.pgdata().display()
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pid_file = self.pgdata().join("postmaster.pid");
        if pid_file.exists() {
            tracing::warn!(pgdata = %self.pgdata().display(), "the embedded server had stopped without shutting down; restarting it");
            fs::remove_file(&pid_file).map_err(io("cannot remove", &pid_file))?;
            // The socket and its lock file name the dead server too; the
            // socket directory is Certo's own, so they can go.
            for name in [".s.PGSQL.5432", ".s.PGSQL.5432.lock"] {
                let path = self.socket_dir().join(name);
                if path.exists() {
                    fs::remove_file(&path).map_err(io("cannot remove", &path))?;
                }
            }
        }
        Ok(())
    }

    /// Takes the data directory's lock for the duration of a start or stop, so
    /// that two Certo processes starting at once do not both run initdb.
    fn lock(&self) -> Result<File, ClusterError> {
        fs::create_dir_all(&self.data_dir).map_err(io("cannot create", &self.data_dir))?;
        let path = self.data_dir.join("postgres.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        file.lock().map_err(io("cannot lock", &path))?;
        Ok(file)
    }

    /// Initialises the cluster if needed and starts it if it is not running.
    /// Returns true when this call started the server.
    pub fn start(&self) -> Result<bool, ClusterError> {
        let _lock = self.lock()?;
        if self.status().running {
            return Ok(false);
        }
        self.private_dir(&self.root)?;
        if !self.is_initialised() {
            self.init()?;
        }
        self.clear_after_crash()?;
        let socket_dir = self.socket_dir();
        self.private_dir(&socket_dir)?;
        let conf = self.pgdata().join("certo.conf");
        let settings = format!(
            "# Written by Certo at every start.\nlisten_addresses = ''\nunix_socket_directories = '{}'\nunix_socket_permissions = 0700\nmax_connections = 100\nlog_min_messages = warning\n",
            socket_dir.display().to_string().replace('\'', "''")
        );
        fs::write(&conf, settings).map_err(io("cannot write", &conf))?;
        if let Some(user) = &self.server_user {
            chown(&conf, Some(user.uid), Some(user.gid)).map_err(io("cannot chown", &conf))?;
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-w")
            .args(["-t", "120"])
            .arg("-D")
            .arg(self.pgdata())
            .arg("-l")
            .arg(self.log_file());
        if let Err(e) = self.run(cmd, "pg_ctl start") {
            let tail = fs::read_to_string(self.log_file())
                .map(|log| {
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(8)..].join("\n")
                })
                .unwrap_or_default();
            return Err(ClusterError::Command {
                program: "pg_ctl start".into(),
                status: "failed".into(),
                detail: format!("{e}\nlast lines of {}:\n{tail}", self.log_file().display()),
            });
        }
        tracing::info!(pgdata = %self.pgdata().display(), socket = %socket_dir.display(), "started the embedded PostgreSQL cluster");
        Ok(true)
    }

    /// Runs initdb into a fresh directory and renames it into place, so that an
    /// interrupted initdb never leaves a half-made cluster behind.
    fn init(&self) -> Result<(), ClusterError> {
        let staging = self.root.join("data.init");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io("cannot remove", &staging))?;
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&staging).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ]);
        self.run(cmd, "initdb")?;
        let conf = staging.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io("cannot open", &conf))?;
        f.write_all(b"\n# Certo's settings (socket directory, no TCP) are rewritten at each start.\ninclude_if_exists = 'certo.conf'\n")
            .map_err(io("cannot write", &conf))?;
        fs::rename(&staging, self.pgdata()).map_err(io("cannot rename", &staging))?;
        tracing::info!(pgdata = %self.pgdata().display(), "initialised the embedded PostgreSQL cluster");
        Ok(())
    }

    /// Stops the server (fast shutdown: open sessions are rolled back).
    /// Returns false when it was not running.
    pub fn stop(&self) -> Result<bool, ClusterError> {
        let _lock = self.lock()?;
        if !self.status().running {
            return Ok(false);
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-w")
            .args(["-m", "fast"])
            .arg("-D")
            .arg(self.pgdata());
        self.run(cmd, "pg_ctl stop")?;
        Ok(true)
    }
}

/// Live (non-zombie) processes whose working directory is `pgdata`: every
/// PostgreSQL server process works in its data directory.
fn server_processes(pgdata: &Path) -> Vec<u32> {
    let Ok(target) = fs::canonicalize(pgdata) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == target)
                && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    // The state follows the parenthesised command name.
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        .is_some_and(|state| state != "Z" && state != "X")
                })
        })
        .collect()
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Whether the server user can search every directory down to `dir` (or to
/// its nearest existing ancestor, the rest being created for it).
fn user_can_reach(user: &ServerUser, dir: &Path) -> bool {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.to_path_buf(),
            None => return false,
        }
    }
    Command::new("test")
        .arg("-x")
        .arg(&probe)
        .uid(user.uid)
        .gid(user.gid)
        .status()
        .is_ok_and(|s| s.success())
}
