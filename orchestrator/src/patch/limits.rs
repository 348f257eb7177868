//! Limits on outside input. Anything larger is refused with a message that
//! names the limit; the numbers are documented in the README.

/// Largest patch file accepted.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Files in one submission through the API.
pub const MAX_FILES: usize = 200;
/// Bytes of one submission through the API (its JSON body).
pub const MAX_UPLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Records in one file.
pub const MAX_RECORDS_PER_FILE: usize = 1000;
/// Values (scalars, lists, mappings) in one YAML or JSON file.
pub const MAX_NODES: usize = 200_000;
/// Nesting depth of YAML or JSON.
pub const MAX_DEPTH: usize = 8;
/// Items in each list of a record.
pub const MAX_PLATFORMS: usize = 32;
pub const MAX_NODE_TYPES: usize = 64;
pub const MAX_PACKAGES: usize = 1000;
pub const MAX_BUGS: usize = 500;
pub const MAX_CONFIG_CHANGES: usize = 500;
/// Characters in a title, a bug title, a configuration value.
pub const MAX_TITLE_CHARS: usize = 300;
pub const MAX_VALUE_CHARS: usize = 4096;
/// Characters in a name: package file, path, key, submitter.
pub const MAX_NAME_CHARS: usize = 255;
pub const MAX_URL_CHARS: usize = 2048;
/// Characters in the free-text description.
pub const MAX_DESCRIPTION_CHARS: usize = 64 * 1024;

/// Quotes outside text in a message: at most 60 characters, control
/// characters escaped, so that a message never carries what it complains of.
pub fn shorten(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 60 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
