//! The fixture world: the synthetic gLite release shipped in `fixtures/` (sample patch
//! records, package specs), and the package repositories built from it. Used by the
//! embedded default (`certo demo`, `--repos` unset) and by the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the fixture world's repositories could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("building the fixture repositories with {script} failed ({status}):\n{tail}")]
    Failed {
        script: PathBuf,
        status: std::process::ExitStatus,
        tail: String,
    },
}

/// The fixture folder shipped with the source tree.
pub fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    dir.canonicalize().unwrap_or(dir)
}

/// The fixture world's package specs and build script.
pub fn sources() -> PathBuf {
    fixtures_dir().join("world")
}

/// Builds the fixture world's repositories into `dest` (a no-op when they are up to date).
pub fn build(dest: &Path) -> Result<(), WorldError> {
    let script = sources().join("build");
    // The script skips an up-to-date world and serialises builders with `flock DEST.lock`.
    let out = Command::new(&script)
        .arg(dest)
        .output()
        .map_err(|source| WorldError::Spawn {
            script: script.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(WorldError::Failed {
            script,
            status: out.status,
            tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(())
}
