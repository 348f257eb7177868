//! Property tests of the patch-record readers: they never panic on any input,
//! every error points inside the file, and a record written in the tracker's
//! text form, as JSON or as YAML reads back as the same record.
//!
//! `PROPTEST_CASES` raises the number of cases for a long run (see README).

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::patch::{self, SourceFormat};
use proptest::prelude::*;

fn catalogue() -> &'static Catalogue {
    static C: std::sync::OnceLock<Catalogue> = std::sync::OnceLock::new();
    C.get_or_init(Catalogue::builtin)
}

/// Checks what must hold for any input: no panic, errors located inside the input.
fn check_any(src: &[u8], format: SourceFormat) {
    let lines = src.iter().filter(|b| **b == b'\n').count() as u32 + 1;
    match patch::load("f", src, Some(format), catalogue()) {
        Ok(records) => assert!(!records.is_empty()),
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(
                    e.line >= 1 && e.line <= lines + 1,
                    "{e} outside {lines} lines"
                );
                assert!(e.col >= 1, "{e}");
                assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
                // Outside text is quoted shortened, control characters escaped.
                assert!(
                    !e.message.chars().any(char::is_control),
                    "control character in {e:?}"
                );
                assert!(
                    !e.field.chars().any(char::is_control),
                    "control character in {e:?}"
                );
            }
        }
    }
}

/// Pieces that text-form inputs are made of, so that random inputs reach deep paths.
fn text_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Patch: 12\n".to_string()),
        Just("Revision: 1\n".to_string()),
        Just("Title: t\n".to_string()),
        Just("Release: gLite 3.2\n".to_string()),
        Just("Platforms: sl5_x86_64, sl5_i386\n".to_string()),
        Just("Node types: glite-UI,glite-WN\n".to_string()),
        Just("Bugs: 1 (a (b), c), 2\n".to_string()),
        Just("RPMs:\n".to_string()),
        Just("  a-1.0-1.noarch.rpm sha256:".to_string()),
        Just("  b_1.0_all.deb repo:x/y url:https://h/p\n".to_string()),
        Just("Configuration changes:\n  f: K=V\n".to_string()),
        Just("Description:\n  x\n\n   y\n".to_string()),
        Just("Submitter: me\n".to_string()),
        Just("---\n".to_string()),
        Just("\t\r\n".to_string()),
        "[ -~]{0,20}\n?",
        "\\PC{0,8}",
    ]
}

fn yaml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id: 1\n".to_string()),
        Just("packages:\n  - file: a-1.0-1.noarch.rpm\n".to_string()),
        Just("  - {file: x, url: 'https://a'}\n".to_string()),
        Just("bugs: [1, {id: 2, title: t}]\n".to_string()),
        Just("platforms: [sl5_x86_64]\n".to_string()),
        Just("&a [*a]\n".to_string()),
        Just("!!binary x\n".to_string()),
        Just("- [[[[\n".to_string()),
        Just("{\"id\": \"x\"}\n".to_string()),
        Just("---\n".to_string()),
        "[ -~]{0,20}\n?",
    ]
}

/// A valid record in a form that every reader takes: (text form, JSON form).
#[derive(Debug, Clone)]
struct Gen {
    id: u64,
    revision: u32,
    title: String,
    platforms: Vec<&'static str>,
    node_types: Vec<&'static str>,
    bugs: Vec<(u64, Option<String>)>,
    packages: Vec<(String, Option<String>)>,
    config: Vec<(String, String, String)>,
    description: Vec<String>,
}

fn gen_record() -> impl Strategy<Value = Gen> {
    let word = "[a-z][a-z0-9]{0,7}";
    (
        1u64..1_000_000_000,
        1u32..1000,
        "[A-Za-z0-9][A-Za-z0-9 .:+&/-]{0,40}[A-Za-z0-9]",
        proptest::sample::subsequence(vec!["sl5_x86_64", "sl5_i386"], 1..=2),
        proptest::sample::subsequence(vec!["glite-UI", "glite-WN", "glite-BDII"], 1..=3),
        proptest::collection::btree_map(
            1u64..1_000_000,
            proptest::option::of("[A-Za-z0-9][A-Za-z0-9 ._-]{0,30}[A-Za-z0-9]"),
            0..4,
        ),
        proptest::collection::btree_map(
            word,
            (
                ("[0-9][0-9a-z.]{0,5}", "[0-9][a-z0-9.]{0,4}"),
                proptest::option::of("[0-9a-f]{64}"),
            ),
            1..5,
        ),
        proptest::collection::btree_map(
            (word, "[A-Z_][A-Z0-9_]{0,10}"),
            "[A-Za-z0-9/=._-]{0,20}",
            0..3,
        ),
        proptest::collection::vec("[A-Za-z0-9][A-Za-z0-9 ,.()-]{0,30}", 0..4),
    )
        .prop_map(
            |(id, revision, title, platforms, node_types, bugs, packages, config, description)| {
                Gen {
                    id,
                    revision,
                    title,
                    platforms,
                    node_types,
                    bugs: bugs.into_iter().collect(),
                    packages: packages
                        .into_iter()
                        .map(|(name, ((v, r), sha))| {
                            (format!("glite-{name}-{v}-{r}.noarch.rpm"), sha)
                        })
                        .collect(),
                    config: config
                        .into_iter()
                        .map(|((f, k), v)| (format!("{f}.conf"), k, v))
                        .collect(),
                    description,
                }
            },
        )
}

impl Gen {
    fn text(&self) -> String {
        let mut t = format!(
            "Patch: {}\nrevision:   {}\nTITLE: {}\nRelease: gLite 3.2\nPlatforms: {}\nNode Types: {}\n",
            self.id,
            self.revision,
            self.title,
            self.platforms.join(", "),
            self.node_types.join(",")
        );
        if !self.bugs.is_empty() {
            let bugs: Vec<String> = self
                .bugs
                .iter()
                .map(|(id, title)| match title {
                    Some(title) => format!("{id} ({title})"),
                    None => id.to_string(),
                })
                .collect();
            t.push_str(&format!("Bugs: {}\n", bugs.join(", ")));
        }
        t.push_str("RPMs:\n");
        for (file, sha) in &self.packages {
            match sha {
                Some(sha) => t.push_str(&format!("  {file} sha256:{sha}\n")),
                None => t.push_str(&format!("\t{file}\n")),
            }
        }
        if !self.config.is_empty() {
            t.push_str("Configuration changes:\n");
            for (f, k, v) in &self.config {
                t.push_str(&format!("  {f}: {k}={v}\n"));
            }
        }
        t.push_str("Submitter: prop\n");
        if !self.description.is_empty() {
            t.push_str("Description:\n");
            for line in &self.description {
                t.push_str(&format!("  {line}\n"));
            }
        }
        t
    }

    fn json(&self) -> String {
        let bugs: Vec<serde_json::Value> = self
            .bugs
            .iter()
            .map(|(id, title)| serde_json::json!({"id": id, "title": title}))
            .collect();
        let packages: Vec<serde_json::Value> = self
            .packages
            .iter()
            .map(|(file, sha)| serde_json::json!({"file": file, "sha256": sha}))
            .collect();
        let config: Vec<serde_json::Value> = self
            .config
            .iter()
            .map(|(f, k, v)| serde_json::json!({"file": f, "key": k, "value": v}))
            .collect();
        serde_json::json!({
            "id": self.id,
            "revision": self.revision,
            "title": self.title,
            "release": "3.2",
            "platforms": self.platforms,
            "node_types": self.node_types,
            "bugs": bugs,
            "packages": packages,
            "config_changes": config,
            "submitter": "prop",
            "description": self.description.join("\n"),
        })
        .to_string()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(src in proptest::collection::vec(any::<u8>(), 0..400)) {
        for format in [SourceFormat::Text, SourceFormat::Yaml, SourceFormat::Json] {
            check_any(&src, format);
        }
    }

    #[test]
    fn text_like_inputs_never_panic(pieces in proptest::collection::vec(text_piece(), 0..30)) {
        check_any(pieces.concat().as_bytes(), SourceFormat::Text);
    }

    #[test]
    fn yaml_like_inputs_never_panic(pieces in proptest::collection::vec(yaml_piece(), 0..30)) {
        let src = pieces.concat();
        check_any(src.as_bytes(), SourceFormat::Yaml);
        check_any(src.as_bytes(), SourceFormat::Json);
    }

    #[test]
    fn a_record_reads_the_same_in_every_form(g in gen_record()) {
        let text = g.text();
        let from_text = patch::load("g.txt", text.as_bytes(), None, catalogue())
            .map_err(|e| format!("{text}\n{e:?}"))
            .expect("text form");
        prop_assert_eq!(from_text.len(), 1);
        let r = &from_text[0].record;
        prop_assert_eq!(r.id, g.id);
        prop_assert_eq!(r.revision, g.revision);
        prop_assert_eq!(&r.title, &g.title);
        prop_assert_eq!(&r.platforms, &g.platforms);
        prop_assert_eq!(&r.node_types, &g.node_types);
        let bugs: Vec<(u64, Option<String>)> = r.bugs.iter().map(|b| (b.id, b.title.clone())).collect();
        prop_assert_eq!(bugs, g.bugs.clone());
        let packages: Vec<(String, Option<String>)> = r.packages.iter().map(|p| (p.file.clone(), p.sha256.clone())).collect();
        prop_assert_eq!(packages, g.packages.clone());
        // The description's canonical form has no trailing white space on a line.
        let description: Vec<&str> = g.description.iter().map(|l| l.trim_end()).collect();
        prop_assert_eq!(r.description.clone(), description.join("\n"));

        let json = g.json();
        for name in ["g.json", "g.yaml"] {
            let other = patch::load(name, json.as_bytes(), None, catalogue())
                .map_err(|e| format!("{json}\n{e:?}"))
                .expect("json form");
            prop_assert_eq!(&other[0].record, r);
            prop_assert_eq!(&other[0].digest, &from_text[0].digest);
        }
    }

    /// The tracker's labels (any of a field's, in any case and with `_` or spaces) and its
    /// platform and node type spellings read exactly like Certo's keys: the same digest.
    #[test]
    fn tracker_labels_and_spellings_read_like_certos_keys(
        g in gen_record(),
        picks in proptest::collection::vec(any::<u16>(), 24),
    ) {
        let canonical: serde_json::Value = serde_json::from_str(&g.json()).expect("json");
        let mut pick = picks.into_iter().cycle();
        let mut next = move |n: usize| usize::from(pick.next().unwrap_or(0)) % n.max(1);
        let mut tracker = serde_json::Map::new();
        for (key, value) in canonical.as_object().expect("object") {
            let labels: Vec<&str> = patch::labels::LABELS
                .iter()
                .filter(|(_, f)| f == key)
                .map(|(l, _)| *l)
                .collect();
            let label = labels[next(labels.len())];
            let spelled = match next(3) {
                0 => label.to_uppercase(),
                1 => label.replace(' ', "_"),
                _ => patch::text::spell_label(label),
            };
            let value = match key.as_str() {
                "platforms" => serde_json::json!(value
                    .as_array()
                    .expect("list")
                    .iter()
                    .map(|p| {
                        let p = catalogue().platform(p.as_str().expect("label")).expect("platform");
                        let all: Vec<&String> = std::iter::once(&p.label).chain(&p.aliases).collect();
                        all[next(all.len())].clone()
                    })
                    .collect::<Vec<_>>()),
                "node_types" => serde_json::json!(value
                    .as_array()
                    .expect("list")
                    .iter()
                    .map(|n| {
                        let n = catalogue()
                            .release("3.2")
                            .and_then(|r| r.node_type(n.as_str().expect("name")))
                            .expect("node type");
                        let all: Vec<&String> = std::iter::once(&n.name).chain(&n.aliases).collect();
                        all[next(all.len())].clone()
                    })
                    .collect::<Vec<_>>()),
                "release" => serde_json::json!(["3.2", "gLite 3.2", "3.2.0", "glite 3.2"][next(4)]),
                _ => value.clone(),
            };
            tracker.insert(spelled, value);
        }
        let canonical_text = canonical.to_string();
        let tracker_text = serde_json::Value::Object(tracker).to_string();
        let a = patch::load("c.json", canonical_text.as_bytes(), None, catalogue())
            .map_err(|e| format!("{canonical_text}\n{e:?}"))
            .expect("Certo's keys");
        let b = patch::load("t.json", tracker_text.as_bytes(), None, catalogue())
            .map_err(|e| format!("{tracker_text}\n{e:?}"))
            .expect("the tracker's labels");
        prop_assert_eq!(&a[0].record, &b[0].record, "{}", tracker_text);
        prop_assert_eq!(&a[0].digest, &b[0].digest);
    }
}
