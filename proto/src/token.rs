//! The one comparison of secrets: host tokens, VM tokens, their digests.

use sha2::{Digest, Sha256};

/// Whether a presented secret equals the expected one, in time independent of where they
/// differ and of their lengths (both are hashed first).
pub fn same(presented: &[u8], expected: &[u8]) -> bool {
    let a: [u8; 32] = Sha256::digest(presented).into();
    let b: [u8; 32] = Sha256::digest(expected).into();
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// SHA-256 of a token, hex: what the orchestrator stores instead of the token.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization: Bearer TOKEN` header value (the scheme is
/// case-insensitive, as HTTP says).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A new random token: 32 bytes from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content_only() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"", b"secret"));
        assert!(!same(b"secret-and-more", b"secret"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
