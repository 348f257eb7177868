//! Root's password in a custom layer: a SHA-512 crypt (`$6$`) hash computed here, in
//! Rust, and written into the image's `/etc/shadow` through [`ImageRoot`], so no tool of
//! the image (which may have no `chpasswd`) ever sees the password, and it is never on a
//! command line.
//!
//! The salt is derived from the digest of the layer below (not from the password), so
//! the same password over the same lower layer gives the same hash and the layer is a
//! cache hit, a different password gives another layer, and the salt says nothing about
//! the password.

use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};
use sha2::{Digest, Sha256};

use crate::digest::LayerDigest;
use crate::error::{BuildError, Phase};
use crate::request::RootPassword;
use crate::rooted::ImageRoot;

/// A SHA-512 crypt hash string (`$6$salt$...`); its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct CryptHash(String);

impl std::fmt::Debug for CryptHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CryptHash(<redacted>)")
    }
}

impl CryptHash {
    /// The `$6$...` string, as `/etc/shadow` holds it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the layer's digest takes of it: its SHA-256.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

/// Hashes `password` with SHA-512 crypt (5000 rounds, glibc's default) and a 12-byte
/// salt derived from the lower layer's digest.
pub fn hash(password: &RootPassword, lower: &LayerDigest) -> Result<CryptHash, BuildError> {
    let mut h = Sha256::new();
    h.update(b"certo-imager/root-password-salt\0");
    h.update(lower.as_bytes());
    let seed: [u8; 32] = h.finalize().into();
    let hashed = ShaCrypt::SHA512
        .hash_password_with_salt(password.expose(), &seed[..12])
        .map_err(|e| {
            BuildError::new(
                Phase::Prepare,
                format!("hashing the root password failed: {e}"),
            )
        })?;
    // glibc's default of 5000 rounds is implied by the plain `$6$salt$hash` form (the same
    // hash); write that form, as `chpasswd` and `openssl passwd -6` do.
    let text = hashed.to_string();
    let text = match text.strip_prefix("$6$rounds=5000$") {
        Some(rest) => format!("$6${rest}"),
        None => text,
    };
    Ok(CryptHash(text))
}

/// Whether `hash` (a `$5$`/`$6$` crypt string) is the hash of `password`.
pub fn verify(password: &str, hash: &str) -> bool {
    ShaCrypt::SHA512
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Sets root's password in the image at `root` to `hash`: root's line of `/etc/shadow` is
/// rewritten (or the file is created, mode 0600, when the image has none), and root's
/// password field in `/etc/passwd` becomes `x` so the shadow entry is the one read.
pub fn set_root_password(root: &ImageRoot, hash: &CryptHash) -> Result<(), BuildError> {
    let fail = |what: String| BuildError::new(Phase::Configure, what);
    let passwd = root
        .read_to_string("etc/passwd")
        .map_err(|e| fail(format!("the image has no readable /etc/passwd: {e}")))?;
    if !passwd.lines().any(|l| l.starts_with("root:")) {
        return Err(fail("the image's /etc/passwd has no root entry".into()));
    }
    let passwd_new = map_root_line(&passwd, |fields| {
        if fields.len() > 1 {
            fields[1] = "x".into();
        }
    });
    if passwd_new != passwd {
        root.rewrite("etc/passwd", passwd_new.as_bytes())
            .map_err(|e| fail(format!("rewriting /etc/passwd in the image: {e}")))?;
    }
    // Days since 1970 of the image's fixed time, so the layer is reproducible.
    let lastchg = (crate::export::SOURCE_DATE_EPOCH / 86_400).to_string();
    let entry = format!("root:{}:{lastchg}:0:99999:7:::", hash.as_str());
    match root.read_to_string("etc/shadow") {
        Ok(shadow) => {
            let new = if shadow.lines().any(|l| l.starts_with("root:")) {
                map_root_line(&shadow, |fields| {
                    while fields.len() < 3 {
                        fields.push(String::new());
                    }
                    fields[1] = hash.as_str().to_owned();
                    fields[2] = lastchg.clone();
                })
            } else {
                let mut s = format!("{entry}\n");
                s.push_str(&shadow);
                s
            };
            root.rewrite("etc/shadow", new.as_bytes())
                .map_err(|e| fail(format!("rewriting /etc/shadow in the image: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let created = root
                .create_new("etc/shadow", format!("{entry}\n").as_bytes(), 0o600)
                .map_err(|e| fail(format!("creating /etc/shadow in the image: {e}")))?;
            if created {
                Ok(())
            } else {
                Err(fail(
                    "/etc/shadow in the image is not a regular file".into(),
                ))
            }
        }
        Err(e) => Err(fail(format!("reading /etc/shadow in the image: {e}"))),
    }
}

/// `text` with root's line (`root:...`) changed by `edit` on its `:`-separated fields.
fn map_root_line(text: &str, edit: impl Fn(&mut Vec<String>)) -> String {
    let mut out = String::with_capacity(text.len() + 128);
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        if body.starts_with("root:") {
            let mut fields: Vec<String> = body.split(':').map(str::to_owned).collect();
            edit(&mut fields);
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(body);
        }
        out.push_str(end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> RootPassword {
        RootPassword::from_text(s).expect("password")
    }

    #[test]
    fn the_hash_is_sha512_crypt_salted_by_the_lower_layer_and_verifies() {
        let lower = LayerDigest::from_bytes([3; 32]);
        let h = hash(&pw("s3cret pass\nsecond line"), &lower).expect("hash");
        assert!(h.as_str().starts_with("$6$"), "{}", h.as_str());
        // `$6$SALT$HASH`: a 16-character salt, the 86-character hash, no rounds field.
        let parts: Vec<&str> = h.as_str().split('$').collect();
        assert_eq!(parts.len(), 4, "{}", h.as_str());
        assert_eq!((parts[2].len(), parts[3].len()), (16, 86), "{}", h.as_str());
        assert!(!h.as_str().contains("s3cret"));
        assert!(verify("s3cret pass", h.as_str()));
        assert!(!verify("s3cret", h.as_str()));
        // Deterministic for the cache; another password or lower layer differs.
        assert_eq!(h, hash(&pw("s3cret pass"), &lower).expect("hash"));
        assert_ne!(h, hash(&pw("other"), &lower).expect("hash"));
        let other = LayerDigest::from_bytes([4; 32]);
        assert_ne!(h, hash(&pw("s3cret pass"), &other).expect("hash"));
        assert_eq!(format!("{h:?}"), "CryptHash(<redacted>)");
        assert_eq!(format!("{:?}", pw("x")), "RootPassword(<redacted>)");
    }

    #[test]
    fn a_known_hash_verifies() {
        // openssl passwd -6 -salt abcdefgh secret
        assert!(verify(
            "secret",
            "$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG."
        ));
    }

    #[test]
    fn an_empty_first_line_is_refused() {
        assert!(RootPassword::from_text("").is_err());
        assert!(RootPassword::from_text("\nsecond").is_err());
        assert!(RootPassword::from_text("pw\r\n").is_ok_and(|p| p.expose() == b"pw"));
    }

    #[test]
    fn shadow_and_passwd_are_rewritten_or_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root::0:0:root:/root:/bin/sh\ndaemon:x:2:2::/:/bin/false\n",
        )
        .expect("passwd");
        let root = ImageRoot::open(dir.path()).expect("root");
        let h = hash(&pw("pw"), &LayerDigest::from_bytes([0; 32])).expect("hash");
        set_root_password(&root, &h).expect("set");
        let passwd = std::fs::read_to_string(dir.path().join("etc/passwd")).expect("read");
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:2:2::/:/bin/false\n"
        );
        let shadow = std::fs::read_to_string(dir.path().join("etc/shadow")).expect("read");
        assert_eq!(shadow, format!("root:{}:14610:0:99999:7:::\n", h.as_str()));
        // An existing entry keeps its other fields.
        std::fs::write(
            dir.path().join("etc/shadow"),
            "root:*:20788:0:99999:7:::\ndaemon:*:20788:0:99999:7:::\n",
        )
        .expect("shadow");
        set_root_password(&root, &h).expect("set");
        let shadow = std::fs::read_to_string(dir.path().join("etc/shadow")).expect("read");
        assert_eq!(
            shadow,
            format!(
                "root:{}:14610:0:99999:7:::\ndaemon:*:20788:0:99999:7:::\n",
                h.as_str()
            )
        );
    }
}
