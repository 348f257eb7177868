//! Feeds arbitrary bytes to the patch-record readers. The first byte picks the
//! form (text, YAML, JSON); the rest is the file. A reader must never panic,
//! and every error it reports must point inside the file.
#![no_main]

use std::sync::OnceLock;

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::patch::{self, SourceFormat};
use libfuzzer_sys::fuzz_target;

fn catalogue() -> &'static Catalogue {
    static C: OnceLock<Catalogue> = OnceLock::new();
    C.get_or_init(Catalogue::builtin)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, src)) = data.split_first() else {
        return;
    };
    let format = match selector % 3 {
        0 => SourceFormat::Text,
        1 => SourceFormat::Yaml,
        _ => SourceFormat::Json,
    };
    let lines = src.iter().filter(|b| **b == b'\n').count() as u32 + 1;
    match patch::load("fuzz", src, Some(format), catalogue()) {
        Ok(records) => assert!(!records.is_empty()),
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(e.line >= 1 && e.line <= lines + 1 && e.col >= 1, "{e}");
                // Outside text is quoted shortened, control characters escaped.
                assert!(!e.message.chars().any(char::is_control), "{e:?}");
                assert!(!e.field.chars().any(char::is_control), "{e:?}");
            }
        }
    }
});
