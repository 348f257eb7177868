//! Reading patch files from disk: expands folders, reads each file within the
//! size limit, and validates every record. Used by `validate`, `submit`, the
//! demo and the benchmark alike.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::catalogue::Catalogue;
use crate::patch::{self, Diagnostic, LoadedRecord, Pos, limits};

/// File extensions read when a folder is given.
const EXTENSIONS: &[&str] = &["yaml", "yml", "json", "txt"];

/// Expands folders into the patch files they hold (sorted, not recursive).
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostic> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| read_error(path, &e))?;
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| EXTENSIONS.contains(&e))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn read_error(path: &Path, e: &std::io::Error) -> Diagnostic {
    let mut d = Diagnostic::new(Pos::new(1, 1), "file", format!("cannot read: {e}"));
    d.file = path.display().to_string();
    d
}

/// Reads a file, refusing to read more than the size limit (plus one byte to
/// tell that it is over).
pub fn read_limited(path: &Path) -> Result<Vec<u8>, Diagnostic> {
    // A FIFO, a device or a socket would block the reader or never end: only regular files.
    let meta = std::fs::metadata(path).map_err(|e| read_error(path, &e))?;
    if !meta.is_file() {
        let mut d = Diagnostic::new(
            Pos::new(1, 1),
            "file",
            "not a regular file (a FIFO, device or socket is not read)".to_owned(),
        );
        d.file = path.display().to_string();
        return Err(d);
    }
    let file = std::fs::File::open(path).map_err(|e| read_error(path, &e))?;
    let mut bytes = Vec::new();
    file.take(limits::MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_error(path, &e))?;
    Ok(bytes)
}

/// The outcome of reading a set of files: every valid record, every error.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<LoadedRecord>,
    pub errors: Vec<Diagnostic>,
    /// Per file: its name, how many records it held, how many errors.
    pub files: Vec<(String, usize, usize)>,
}

/// Reads and validates every file; `tick` is called after each.
pub fn load_files(paths: &[PathBuf], catalogue: &Catalogue, mut tick: impl FnMut()) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match expand(paths) {
        Ok(files) => files,
        Err(e) => {
            loaded.errors.push(e);
            return loaded;
        }
    };
    for path in files {
        let name = path.display().to_string();
        match read_limited(&path)
            .map_err(|e| vec![e])
            .and_then(|bytes| patch::load(&name, &bytes, None, catalogue))
        {
            Ok(records) => {
                loaded.files.push((name, records.len(), 0));
                loaded.records.extend(records);
            }
            Err(errors) => {
                loaded.files.push((name, 0, errors.len()));
                loaded.errors.extend(errors);
            }
        }
        tick();
    }
    loaded
}
