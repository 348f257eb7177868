//! The layer cache key: a SHA-256 digest over a canonical encoding of a layer's inputs.
//!
//! Two layers built from the same inputs get the same digest whatever order the caller
//! listed repositories, packages or configuration files in; any change to an input changes
//! the digest. A name or a tag is never a cache key.
//!
//! # Canonical encoding (version 1)
//!
//! Lengths and counts are u64 big-endian; `bytes(x)` means the length of `x` followed by `x`.
//!
//! | field            | encoding                                                              |
//! |------------------|-----------------------------------------------------------------------|
//! | domain           | `bytes("certo-imager/layer-inputs")`                                  |
//! | version          | one byte, `1`                                                         |
//! | parent           | `0`, or `1` followed by the parent's 32-byte digest                   |
//! | kind             | one byte: core `1`, base `2`, node type `3`, patch `4`, custom `5`    |
//! | backend          | `bytes(backend)`                                                      |
//! | repository state | count, then per repository sorted by id: `bytes(id)`, 32-byte digest  |
//! | packages         | count, then per package sorted by name: `bytes(name)`, `bytes(version)` |
//! | config files     | count, then per file sorted by path: `bytes(path)`, `bytes(content)`  |
//! | downgrades       | nothing when refused (the default); `bytes("allow-downgrade")` when allowed |
//! | root password    | nothing when none is set (the default); `bytes("root-password")` followed by the 32-byte SHA-256 of the password's crypt hash when one is |
//!
//! The last two fields are written only when they differ from the default, so the digests
//! of layers that do not use them are those of the encoding without them (every field
//! before them is length-prefixed and they start with distinct tags, so an encoding with
//! one never equals one without). The root password enters only as a digest of its salted
//! SHA-512 crypt hash: never in clear, and no cheaper to guess from than `/etc/shadow`.
//! Sorting compares the UTF-8 bytes of the keys. Duplicate keys, empty keys, an empty
//! backend and config file paths that are not plain relative paths are refused.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"certo-imager/layer-inputs";
const ENCODING_VERSION: u8 = 1;

/// The level of a layer in the stack core → base → node type → patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// The minimal operating system.
    Core,
    /// The operating system with the middleware baseline's common packages.
    Base,
    /// A middleware node type (UI, WN, CE, ...) on top of a base.
    NodeType,
    /// A patch under certification on top of a node type.
    Patch,
    /// What a person added on top of a core, base or node type: extra packages from the
    /// platform's repositories and/or root's password.
    Custom,
}

impl LayerKind {
    /// Stable tag in the canonical encoding; never derived from declaration order.
    fn tag(self) -> u8 {
        match self {
            Self::Core => 1,
            Self::Base => 2,
            Self::NodeType => 3,
            Self::Patch => 4,
            Self::Custom => 5,
        }
    }
}

/// Everything that determines a layer's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInputs {
    /// Digest of the layer below, `None` for a core layer.
    pub parent: Option<[u8; 32]>,
    /// Level of the layer.
    pub kind: LayerKind,
    /// Tool that builds the layer, e.g. `mmdebstrap` or `dnf`.
    pub backend: String,
    /// Repository id and the digest of its `Release` or `repomd.xml`.
    pub repository_state: Vec<(String, [u8; 32])>,
    /// Package name and its exact version-release-architecture.
    pub packages: Vec<(String, String)>,
    /// Path relative to the image root, and the file's content.
    pub config_files: Vec<(String, Vec<u8>)>,
    /// Whether the layer may replace an installed package by an older version (a patch
    /// record's explicit opt-in); refused otherwise.
    pub allow_downgrade: bool,
    /// SHA-256 of the SHA-512 crypt hash of root's password, when the layer sets one (a
    /// custom layer); never the password itself.
    pub root_password: Option<[u8; 32]>,
}

/// Why layer inputs cannot be digested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The backend name is empty.
    #[error("layer backend is empty")]
    EmptyBackend,
    /// A repository id or package name is empty.
    #[error("a {list} has an empty {key}")]
    EmptyKey {
        /// `repository` or `package`.
        list: &'static str,
        /// `id` or `name`.
        key: &'static str,
    },
    /// Two entries of one list share a key.
    #[error("{list} key {key:?} appears more than once")]
    DuplicateKey {
        /// `repository`, `package` or `config file`.
        list: &'static str,
        /// The repeated key.
        key: String,
    },
    /// A config file path is not a plain relative path.
    #[error("config file path {path:?} is invalid: {reason}")]
    InvalidConfigPath {
        /// The refused path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl LayerInputs {
    /// The canonical encoding described in the [module documentation](self).
    pub fn canonical_encoding(&self) -> Result<Vec<u8>, DigestError> {
        if self.backend.is_empty() {
            return Err(DigestError::EmptyBackend);
        }
        for (path, _) in &self.config_files {
            check_config_path(path)?;
        }
        let repositories = sorted_unique("repository", "id", &self.repository_state, |r| &r.0)?;
        let packages = sorted_unique("package", "name", &self.packages, |p| &p.0)?;
        let config_files = sorted_unique("config file", "path", &self.config_files, |c| &c.0)?;

        let mut out = Vec::new();
        put_bytes(&mut out, DOMAIN);
        out.push(ENCODING_VERSION);
        match &self.parent {
            None => out.push(0),
            Some(parent) => {
                out.push(1);
                out.extend_from_slice(parent);
            }
        }
        out.push(self.kind.tag());
        put_bytes(&mut out, self.backend.as_bytes());
        put_len(&mut out, repositories.len());
        for (id, digest) in repositories {
            put_bytes(&mut out, id.as_bytes());
            out.extend_from_slice(digest);
        }
        put_len(&mut out, packages.len());
        for (name, version) in packages {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, version.as_bytes());
        }
        put_len(&mut out, config_files.len());
        for (path, content) in config_files {
            put_bytes(&mut out, path.as_bytes());
            put_bytes(&mut out, content);
        }
        if self.allow_downgrade {
            put_bytes(&mut out, b"allow-downgrade");
        }
        if let Some(password) = &self.root_password {
            put_bytes(&mut out, b"root-password");
            out.extend_from_slice(password);
        }
        Ok(out)
    }

    /// The layer's cache key: SHA-256 of its [canonical encoding](Self::canonical_encoding).
    pub fn digest(&self) -> Result<LayerDigest, DigestError> {
        Ok(LayerDigest(
            Sha256::digest(self.canonical_encoding()?).into(),
        ))
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&(len as u64).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// The entries sorted by key, refusing an empty or repeated key.
fn sorted_unique<'a, T>(
    list: &'static str,
    key_name: &'static str,
    items: &'a [T],
    key: impl Fn(&'a T) -> &'a String,
) -> Result<Vec<&'a T>, DigestError> {
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_by(|a, b| key(a).cmp(key(b)));
    if sorted.first().is_some_and(|first| key(first).is_empty()) {
        return Err(DigestError::EmptyKey {
            list,
            key: key_name,
        });
    }
    if let Some(pair) = sorted.windows(2).find(|pair| key(pair[0]) == key(pair[1])) {
        return Err(DigestError::DuplicateKey {
            list,
            key: key(pair[0]).clone(),
        });
    }
    Ok(sorted)
}

fn check_config_path(path: &str) -> Result<(), DigestError> {
    let invalid = |reason: String| DigestError::InvalidConfigPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if path.contains('\0') {
        return Err(invalid("it contains a NUL byte".into()));
    }
    if path.starts_with('/') {
        return Err(invalid(
            "it is absolute; paths are relative to the image root".into(),
        ));
    }
    for (i, component) in path.split('/').enumerate() {
        if matches!(component, "" | "." | "..") {
            return Err(invalid(format!("component {} is {component:?}", i + 1)));
        }
    }
    Ok(())
}

/// A layer's cache key, written as 64 lower-case hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerDigest([u8; 32]);

impl LayerDigest {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes, e.g. to use as the `parent` of the next layer's inputs.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for LayerDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a string is not a layer digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDigestError {
    /// A character is not lower-case hex.
    #[error(
        "layer digest {input:?} has {found:?} at character {position}: only 0-9 and a-f are allowed"
    )]
    InvalidCharacter {
        /// The refused input.
        input: String,
        /// The offending character.
        found: char,
        /// Its position, counting characters from 0.
        position: usize,
    },
    /// The string is not 64 characters long.
    #[error("layer digest {input:?} has {len} characters; expected 64 lower-case hex characters")]
    WrongLength {
        /// The refused input.
        input: String,
        /// Its length in characters.
        len: usize,
    },
}

impl FromStr for LayerDigest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((position, found)) = s
            .chars()
            .enumerate()
            .find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(ParseDigestError::InvalidCharacter {
                input: s.to_owned(),
                found,
                position,
            });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ParseDigestError::WrongLength {
            input: s.to_owned(),
            len: s.len(),
        })?;
        Ok(Self(bytes))
    }
}

impl Serialize for LayerDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LayerDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::IntoDeserializer;
    use std::collections::HashSet;

    fn sample() -> LayerInputs {
        LayerInputs {
            parent: Some([1; 32]),
            kind: LayerKind::NodeType,
            backend: "mmdebstrap".into(),
            repository_state: vec![
                ("debian-bookworm".into(), [2; 32]),
                ("glite-3.2".into(), [3; 32]),
            ],
            packages: vec![
                ("glite-wn".into(), "3.2.1-1_amd64".into()),
                ("voms-clients".into(), "2.0.8-1_amd64".into()),
            ],
            config_files: vec![("etc/glite/site-info.def".into(), b"SITE_NAME=t\n".to_vec())],
            allow_downgrade: false,
            root_password: None,
        }
    }

    fn digest(inputs: &LayerInputs) -> LayerDigest {
        inputs.digest().expect("valid layer inputs")
    }

    fn refusal(edit: impl FnOnce(&mut LayerInputs)) -> DigestError {
        let mut inputs = sample();
        edit(&mut inputs);
        inputs.digest().expect_err("these inputs must be refused")
    }

    #[test]
    fn known_answer_pins_the_encoding() {
        // Changing this value invalidates every cached layer: bump ENCODING_VERSION with it.
        assert_eq!(
            digest(&sample()).to_hex(),
            "d045d3f694dc5d4ee111354d2aa7b61d28da695a2455fc9d7f4c09cd29f3fd8a"
        );
    }

    #[test]
    fn every_single_input_change_changes_the_digest() {
        let edits: Vec<fn(&mut LayerInputs)> = vec![
            |i| i.parent = None,
            |i| i.parent = Some([9; 32]),
            |i| i.kind = LayerKind::Patch,
            |i| i.backend = "dnf".into(),
            |i| i.repository_state[1].1[0] ^= 1,
            |i| i.repository_state[0].0 = "debian-trixie".into(),
            |i| i.packages[0].1 = "3.2.1-2_amd64".into(),
            |i| i.packages.push(("lcg-ca".into(), "1.0-1_all".into())),
            |i| i.config_files[0].1.push(b'\n'),
            |i| i.config_files[0].0 = "etc/glite/site-info.conf".into(),
            |i| i.config_files.clear(),
            |i| i.allow_downgrade = true,
            |i| i.kind = LayerKind::Custom,
            |i| i.root_password = Some([7; 32]),
            |i| i.root_password = Some([8; 32]),
        ];
        let mut seen = HashSet::from([digest(&sample())]);
        for (n, edit) in edits.iter().enumerate() {
            let mut inputs = sample();
            edit(&mut inputs);
            assert!(
                seen.insert(digest(&inputs)),
                "edit {n} left the digest unchanged or collided"
            );
        }
    }

    #[test]
    fn list_order_does_not_matter() {
        let mut reordered = sample();
        reordered.repository_state.reverse();
        reordered.packages.reverse();
        reordered
            .config_files
            .insert(0, ("etc/hosts".into(), b"x".to_vec()));
        let mut original = sample();
        original
            .config_files
            .push(("etc/hosts".into(), b"x".to_vec()));
        assert_eq!(digest(&reordered), digest(&original));
    }

    #[test]
    fn length_prefixes_prevent_ambiguity() {
        let with = |packages: &[(&str, &str)], files: &[(&str, &[u8])]| {
            let mut inputs = sample();
            inputs.packages = packages
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            inputs.config_files = files
                .iter()
                .map(|(p, c)| (p.to_string(), c.to_vec()))
                .collect();
            digest(&inputs)
        };
        assert_ne!(with(&[("ab", "c")], &[]), with(&[("a", "bc")], &[]));
        assert_ne!(with(&[], &[("ab", b"c")]), with(&[], &[("a", b"bc")]));
        assert_ne!(with(&[("a", "b")], &[]), with(&[], &[("a", b"b")]));
    }

    #[test]
    fn duplicates_and_empty_keys_are_refused() {
        let err = refusal(|i| i.packages.push(("glite-wn".into(), "3.2.2-1_amd64".into())));
        assert_eq!(
            err.to_string(),
            "package key \"glite-wn\" appears more than once"
        );
        let err = refusal(|i| {
            i.config_files
                .push(("etc/glite/site-info.def".into(), vec![]))
        });
        assert!(matches!(
            err,
            DigestError::DuplicateKey {
                list: "config file",
                ..
            }
        ));
        let err = refusal(|i| i.repository_state.push(("glite-3.2".into(), [3; 32])));
        assert!(matches!(
            err,
            DigestError::DuplicateKey {
                list: "repository",
                ..
            }
        ));
        assert_eq!(
            refusal(|i| i.packages[1].0.clear()).to_string(),
            "a package has an empty name"
        );
        assert_eq!(refusal(|i| i.backend.clear()), DigestError::EmptyBackend);
    }

    #[test]
    fn bad_config_paths_are_refused() {
        let cases = [
            ("", "it is empty"),
            (
                "/etc/hosts",
                "it is absolute; paths are relative to the image root",
            ),
            ("etc/../root/.ssh", "component 2 is \"..\""),
            ("./etc/hosts", "component 1 is \".\""),
            ("etc//hosts", "component 2 is \"\""),
            ("etc/hosts/", "component 3 is \"\""),
            ("etc/ho\0sts", "it contains a NUL byte"),
        ];
        for (path, reason) in cases {
            let err = refusal(|i| i.config_files[0].0 = path.into());
            assert_eq!(
                err,
                DigestError::InvalidConfigPath {
                    path: path.into(),
                    reason: reason.into()
                }
            );
        }
        digest(&LayerInputs {
            config_files: vec![("a/.b/c..d".into(), vec![])],
            ..sample()
        });
    }

    #[test]
    fn hex_form_round_trips_and_refuses_bad_input() {
        let d = digest(&sample());
        assert_eq!(d.to_string(), d.to_hex());
        assert_eq!(d.to_hex().parse::<LayerDigest>(), Ok(d));
        let upper = format!("A{}", "0".repeat(63));
        let err = upper.parse::<LayerDigest>().expect_err("upper case");
        assert!(matches!(
            err,
            ParseDigestError::InvalidCharacter {
                found: 'A',
                position: 0,
                ..
            }
        ));
        let err = "abc".parse::<LayerDigest>().expect_err("too short");
        assert_eq!(
            err.to_string(),
            "layer digest \"abc\" has 3 characters; expected 64 lower-case hex characters"
        );
        let err = format!("{}g", &d.to_hex()[..63])
            .parse::<LayerDigest>()
            .expect_err("not hex");
        assert!(matches!(
            err,
            ParseDigestError::InvalidCharacter {
                found: 'g',
                position: 63,
                ..
            }
        ));
    }

    #[test]
    fn deserializes_from_the_hex_string() {
        let d = digest(&sample());
        let hex = d.to_hex();
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            hex.as_str().into_deserializer();
        assert_eq!(LayerDigest::deserialize(de).expect("valid hex"), d);
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "xyz".into_deserializer();
        let err = LayerDigest::deserialize(de).expect_err("invalid hex");
        assert!(err.to_string().contains("'x' at character 0"), "{err}");
    }

    /// A list with unique keys in key order, and the same list shuffled.
    type SortedAndShuffled<K, V> = (Vec<(K, V)>, Vec<(K, V)>);

    fn shuffled<K: Ord + Clone + fmt::Debug, V: Clone + fmt::Debug>(
        map: impl Strategy<Value = std::collections::BTreeMap<K, V>>,
    ) -> impl Strategy<Value = SortedAndShuffled<K, V>> {
        map.prop_flat_map(|m| {
            let v: Vec<(K, V)> = m.into_iter().collect();
            (Just(v.clone()), Just(v).prop_shuffle())
        })
    }

    proptest! {
        #[test]
        fn permuting_lists_keeps_the_digest(
            repos in shuffled(prop::collection::btree_map("[a-z0-9.-]{1,12}", any::<[u8; 32]>(), 0..5)),
            packages in shuffled(prop::collection::btree_map("[a-z0-9+.-]{1,12}", "[a-z0-9._-]{0,12}", 0..8)),
            files in shuffled(prop::collection::btree_map("[a-z]{1,5}(/[a-z.]{0,4}[a-z])?", any::<Vec<u8>>(), 0..5)),
        ) {
            let inputs = |r: &Vec<_>, p: &Vec<_>, f: &Vec<_>| LayerInputs {
                repository_state: r.clone(), packages: p.clone(), config_files: f.clone(), ..sample()
            };
            let sorted = inputs(&repos.0, &packages.0, &files.0);
            let permuted = inputs(&repos.1, &packages.1, &files.1);
            prop_assert_eq!(digest(&sorted), digest(&permuted));
        }
    }
}
