//! Domain names: `certo-r<RUN>-<TARGET>-a<ATTEMPT>`, so that an agent that restarts recognises
//! the domains it started and can destroy those of runs that are no longer live. The run and
//! the attempt in the name are the deterministic key a step's intent is recorded under.

use std::fmt;

use sha2::{Digest, Sha256};

/// Every domain Certo starts has a name with this prefix.
pub const PREFIX: &str = "certo-";

/// Longest target slug in a name (libvirt accepts long names; people read them in `virsh list`).
pub const MAX_SLUG: usize = 40;

/// The parts of a Certo domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainName {
    /// The run (certification job) the domain belongs to.
    pub run: u64,
    /// The target's slug: lower-case ASCII letters, digits and single dashes.
    pub target: String,
    /// The attempt number within the run (retries get new names).
    pub attempt: u32,
}

impl DomainName {
    /// A name for `target` (any text, e.g. `3.2/sl5_x86_64/glite-WN`), made into a slug.
    pub fn new(run: u64, target: &str, attempt: u32) -> Self {
        Self {
            run,
            target: slug(target),
            attempt,
        }
    }

    /// Parses a name made by [`DomainName::to_string`]; `None` for any other name.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(PREFIX)?.strip_prefix('r')?;
        let (run, rest) = rest.split_once('-')?;
        let (target, attempt) = rest.rsplit_once("-a")?;
        if !all_digits(run) || !all_digits(attempt) || !is_slug(target) {
            return None;
        }
        Some(Self {
            run: run.parse().ok()?,
            target: target.to_owned(),
            attempt: attempt.parse().ok()?,
        })
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}r{}-{}-a{}", self.run, self.target, self.attempt)
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SLUG
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `3.2/sl5_x86_64/glite-WN` → `3-2-sl5-x86-64-glite-wn`. Longer than [`MAX_SLUG`]: cut, and
/// the end replaced by 6 hex digits of the full text's SHA-256 so that two long targets that
/// share a prefix still get different slugs.
pub fn slug(target: &str) -> String {
    let mut out = String::new();
    for c in target.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push('x');
    }
    if out.len() > MAX_SLUG {
        let digest = hex::encode(Sha256::digest(target.as_bytes()));
        out.truncate(MAX_SLUG - 7);
        while out.ends_with('-') {
            out.pop();
        }
        out.push('-');
        out.push_str(&digest[..6]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = DomainName::new(42, "3.2/sl5_x86_64/glite-WN", 3);
        assert_eq!(n.to_string(), "certo-r42-3-2-sl5-x86-64-glite-wn-a3");
        assert_eq!(DomainName::parse(&n.to_string()), Some(n));
        // A slug that itself ends like an attempt.
        let n = DomainName::new(1, "x-a1", 2);
        assert_eq!(n.to_string(), "certo-r1-x-a1-a2");
        assert_eq!(DomainName::parse("certo-r1-x-a1-a2"), Some(n));
    }

    #[test]
    fn foreign_names_do_not_parse() {
        for name in [
            "certo-r-x-a1",
            "certo-rx-x-a1",
            "certo-r1-x-a",
            "certo-r1--a1",
            "certo-r1-X-a1",
            "certo-r1-x-b1",
            "other-r1-x-a1",
            "certo-r1-x--y-a1",
            "certo-r99999999999999999999999-x-a1",
        ] {
            assert_eq!(DomainName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn long_targets_are_cut_and_stay_distinct() {
        let a = slug(&"glite-SE_dpm_mysql ".repeat(5));
        let b = slug(&format!("{}!", "glite-SE_dpm_mysql ".repeat(5)));
        assert!(a.len() <= MAX_SLUG && b.len() <= MAX_SLUG);
        assert_ne!(a, b);
        assert!(is_slug(&a), "{a}");
        assert_eq!(slug("..."), "x");
        assert_eq!(slug("A__B"), "a-b");
    }
}
