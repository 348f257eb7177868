//! Running the real tools (mmdebstrap, apt-get, dnf, mkfs.ext4, ...) with their output
//! appended to the layer's build log, so a failure can quote what the tool said.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{BuildError, Phase};

const SETPRIV: &str = "/usr/bin/setpriv";

/// How many log lines a failure quotes.
pub const LOG_TAIL_LINES: usize = 25;

/// The build log of one layer or image: every command's output, in order.
#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    file: File,
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status; `None` when killed by a signal.
    pub status: Option<i32>,
    /// Combined stdout and stderr.
    pub output: String,
}

impl Finished {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

impl Log {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path) -> Result<Self, BuildError> {
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| BuildError::io(format!("creating build log {}", path.display()), e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a note line.
    pub fn note(&mut self, line: &str) {
        // A log that cannot be written must not fail the build it describes.
        let _ = writeln!(self.file, "certo: {line}");
    }

    /// Runs `command` with stdin closed and its output appended to the log. Where
    /// util-linux's `setpriv` exists, the tool is killed if Certo dies, so a killed build
    /// leaves no package manager writing into a staging area that is being removed.
    pub fn run(&mut self, command: &mut Command) -> Result<Finished, BuildError> {
        let shown = show(command);
        let mut wrapped;
        let command = if Path::new(SETPRIV).is_file() {
            wrapped = Command::new(SETPRIV);
            wrapped
                .args(["--pdeathsig", "KILL", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            for (k, v) in command.get_envs() {
                match v {
                    Some(v) => wrapped.env(k, v),
                    None => wrapped.env_remove(k),
                };
            }
            if let Some(dir) = command.get_current_dir() {
                wrapped.current_dir(dir);
            }
            &mut wrapped
        } else {
            command
        };
        self.note(&format!("$ {shown}"));
        let start = self
            .file
            .seek(SeekFrom::End(0))
            .map_err(|e| BuildError::io("seeking the build log", e))?;
        let out = self
            .file
            .try_clone()
            .map_err(|e| BuildError::io("sharing the build log", e))?;
        let err = self
            .file
            .try_clone()
            .map_err(|e| BuildError::io("sharing the build log", e))?;
        let program = command.get_program().to_string_lossy().into_owned();
        let status = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| BuildError::new(Phase::Stage, format!("cannot run {program}: {e}")))?;
        let mut output = String::new();
        let mut reader = &self.file;
        reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| {
                let mut bytes = Vec::new();
                reader.read_to_end(&mut bytes)?;
                output = String::from_utf8_lossy(&bytes).into_owned();
                Ok(())
            })
            .map_err(|e| BuildError::io("reading the build log", e))?;
        self.file
            .seek(SeekFrom::End(0))
            .map_err(|e| BuildError::io("seeking the build log", e))?;
        self.note(&format!("exit status {:?}", status.code()));
        Ok(Finished {
            status: status.code(),
            output,
        })
    }

    /// Runs `command` and turns a non-zero exit into a [`BuildError`] of `phase`.
    pub fn run_ok(&mut self, phase: Phase, command: &mut Command) -> Result<Finished, BuildError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let finished = self.run(command)?;
        if finished.success() {
            Ok(finished)
        } else {
            Err(self.failure(
                phase,
                None,
                finished.status,
                format!("{program} failed"),
                &finished.output,
            ))
        }
    }

    /// A failure quoting the last lines of `output`.
    pub fn failure(
        &self,
        phase: Phase,
        package: Option<String>,
        exit_status: Option<i32>,
        message: String,
        output: &str,
    ) -> BuildError {
        BuildError {
            layer: None,
            phase,
            package,
            exit_status,
            message,
            log_tail: tail(output, LOG_TAIL_LINES),
        }
    }
}

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn show(command: &Command) -> String {
    let mut s = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
