//! Stored SCRAM credentials (RFC 5802 §3): derivation at provisioning, the PLAIN check, decoy keys.
//!
//! Role: turn a password into per-hash SCRAM keys (SaltedPassword is never kept), check a PLAIN
//! password against the SHA-256 keys in constant time, and make decoy keys for accounts that must
//! look like a wrong password. All crypto is aws-lc-rs.
//!
//! Must not: keep or log a password or a SaltedPassword, or compare keys with `==`.

use std::num::NonZeroU32;

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2, rand};
use serde::{Deserialize, Serialize};

use super::SaslError;

/// Lowest iteration count we derive with: RFC 7677 §4 asks for at least 4096.
pub const MIN_ITERATIONS: u32 = 4096;
/// Highest iteration count we derive with: bounds the cost of one PLAIN check (about 7 s at this
/// count), so a config typo cannot stall the server.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Salt length of derived credentials (RFC 5802 §5.1 leaves it open; NIST SP 800-132 asks ≥ 16).
pub const SALT_LEN: usize = 16;

/// What is stored per account and hash: SCRAM keys only, never a password (RFC 5802 §3).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramKeys {
    /// PBKDF2 iteration count (`i=`).
    pub iterations: u32,
    /// Salt (`s=`, sent base64-encoded).
    pub salt: Vec<u8>,
    /// StoredKey = H(HMAC(SaltedPassword, "Client Key")).
    pub stored_key: Vec<u8>,
    /// ServerKey = HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramKeys {
    // The keys let their holder impersonate the server (ServerKey), so they stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

/// An account's SCRAM keys for both hashes (SCRAM-SHA-1 and SCRAM-SHA-256 need separate records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Keys for SCRAM-SHA-1(-PLUS).
    pub sha1: ScramKeys,
    /// Keys for SCRAM-SHA-256(-PLUS) and PLAIN.
    pub sha256: ScramKeys,
}

/// The SCRAM hash function (RFC 5802 §2.2 "H").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    /// Output length of H and HMAC, in bytes.
    pub(crate) const fn output_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }

    /// This hash's record in an account's credentials.
    pub(crate) const fn keys(self, creds: &Credentials) -> &ScramKeys {
        match self {
            Hash::Sha1 => &creds.sha1,
            Hash::Sha256 => &creds.sha256,
        }
    }

    const fn label(self) -> &'static [u8] {
        match self {
            Hash::Sha1 => b"SCRAM-SHA-1",
            Hash::Sha256 => b"SCRAM-SHA-256",
        }
    }

    /// HMAC(key, data).
    pub(crate) fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // SHA-1 is still what SCRAM-SHA-1 is defined with (RFC 5802); aws-lc-rs names it "legacy".
        let alg = match self {
            Hash::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => hmac::HMAC_SHA256,
        };
        hmac::sign(&hmac::Key::new(alg, key), data)
            .as_ref()
            .to_vec()
    }

    /// H(data).
    pub(crate) fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &digest::SHA256,
        };
        digest::digest(alg, data).as_ref().to_vec()
    }

    /// SaltedPassword = Hi(password, salt, i), which is PBKDF2 with HMAC-H (RFC 5802 §2.2).
    pub(crate) fn salted_password(
        self,
        password: &[u8],
        salt: &[u8],
        iterations: NonZeroU32,
    ) -> Vec<u8> {
        let alg = match self {
            Hash::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            Hash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
        };
        let mut out = vec![0; self.output_len()];
        pbkdf2::derive(alg, iterations, salt, password, &mut out);
        out
    }

    /// StoredKey and ServerKey from an already SASLprepped password (RFC 5802 §3).
    pub(crate) fn keys_from_password(
        self,
        prepared: &str,
        salt: Vec<u8>,
        iterations: NonZeroU32,
    ) -> ScramKeys {
        let salted = self.salted_password(prepared.as_bytes(), &salt, iterations);
        let client_key = self.hmac(&salted, b"Client Key");
        ScramKeys {
            iterations: iterations.get(),
            stored_key: self.digest(&client_key),
            server_key: self.hmac(&salted, b"Server Key"),
            salt,
        }
    }

    /// True if `keys` fit this hash (a corrupt store must not make us misbehave).
    pub(crate) fn well_formed(self, keys: &ScramKeys) -> bool {
        keys.iterations > 0
            && !keys.salt.is_empty()
            && keys.stored_key.len() == self.output_len()
            && keys.server_key.len() == self.output_len()
    }
}

/// Derives both SCRAM records for a password with fresh random salts. The password is SASLprepped
/// (RFC 4013, stored-string rules) first, as RFC 5802 §2.2 `Normalize` requires.
pub fn derive_credentials(password: &str, iterations: u32) -> Result<Credentials, SaslError> {
    if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
        return Err(SaslError::Iterations(iterations));
    }
    let iter = NonZeroU32::new(iterations).ok_or(SaslError::Iterations(iterations))?;
    let prepared = stringprep::saslprep(password).map_err(|_| SaslError::Saslprep)?;
    if prepared.is_empty() {
        return Err(SaslError::EmptyPassword);
    }
    let record = |hash: Hash| -> Result<ScramKeys, SaslError> {
        let mut salt = vec![0; SALT_LEN];
        rand::fill(&mut salt).map_err(|_| SaslError::Random)?;
        Ok(hash.keys_from_password(&prepared, salt, iter))
    };
    Ok(Credentials {
        sha1: record(Hash::Sha1)?,
        sha256: record(Hash::Sha256)?,
    })
}

/// Checks a PLAIN password: recomputes the SHA-256 StoredKey and compares it in constant time.
/// Costs one PBKDF2 at the record's iteration count.
pub fn verify_password(creds: &Credentials, password: &str) -> bool {
    check_password(Hash::Sha256, &creds.sha256, password)
}

/// Recomputes StoredKey for `password` under `keys` and compares in constant time.
pub(crate) fn check_password(hash: Hash, keys: &ScramKeys, password: &str) -> bool {
    // RFC 4616 §2: the server SASLpreps the password before comparing; a password SASLprep
    // rejects can match nothing, and failing early reveals only what the client sent itself.
    let Ok(prepared) = stringprep::saslprep(password) else {
        return false;
    };
    let Some(iterations) = NonZeroU32::new(keys.iterations) else {
        return false;
    };
    if prepared.is_empty() || !hash.well_formed(keys) {
        return false;
    }
    let computed = hash.keys_from_password(&prepared, keys.salt.clone(), iterations);
    constant_time::verify_slices_are_equal(&computed.stored_key, &keys.stored_key).is_ok()
}

/// Keys served for an unknown, disabled or certificate-only account, so that the exchange looks
/// like a wrong password (network-stack.md pitfall 3). The salt and keys are HMAC(secret, hash,
/// username): stable across attempts, as a real account's would be, and matched by no password.
pub(crate) fn decoy_keys(
    secret: &[u8; 32],
    hash: Hash,
    username: &str,
    iterations: u32,
) -> ScramKeys {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let derive = |purpose: &[u8], len: usize| {
        let mut ctx = hmac::Context::with_key(&key);
        for part in [purpose, b"\0", hash.label(), b"\0", username.as_bytes()] {
            ctx.update(part);
        }
        let mut out = ctx.sign().as_ref().to_vec();
        out.truncate(len);
        out
    };
    ScramKeys {
        // A zero count would be both visibly fake and unusable for PBKDF2.
        iterations: iterations.max(1),
        salt: derive(b"salt", SALT_LEN),
        stored_key: derive(b"stored-key", hash.output_len()),
        server_key: derive(b"server-key", hash.output_len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_credentials_hold_keys_of_the_right_size_and_no_password() {
        let creds = derive_credentials("pencil", 4096).expect("derives");
        assert_eq!(creds.sha1.stored_key.len(), 20);
        assert_eq!(creds.sha256.server_key.len(), 32);
        assert_eq!(creds.sha256.salt.len(), SALT_LEN);
        assert_ne!(creds.sha1.salt, creds.sha256.salt);
        let json = serde_json::to_string(&creds).expect("serializes");
        assert!(!json.contains("pencil"));
        let back: Credentials = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, creds);
    }

    #[test]
    fn each_derivation_uses_a_fresh_salt() {
        let a = derive_credentials("pencil", 4096).expect("derives");
        let b = derive_credentials("pencil", 4096).expect("derives");
        assert_ne!(a.sha256.salt, b.sha256.salt);
        assert_ne!(a.sha256.stored_key, b.sha256.stored_key);
    }

    #[test]
    fn verify_password_accepts_the_password_and_its_saslprep_equivalents_only() {
        let creds = derive_credentials("I\u{00AD}X", 4096).expect("derives");
        // RFC 4013 §3 examples: soft hyphen maps to nothing; U+2168 (Roman nine) is NFKC "IX".
        assert!(verify_password(&creds, "IX"));
        assert!(verify_password(&creds, "\u{2168}"));
        assert!(!verify_password(&creds, "ix"));
        assert!(!verify_password(&creds, "\u{0007}"));
        assert!(!verify_password(&creds, ""));
    }

    #[test]
    fn derive_rejects_bad_iterations_empty_and_prohibited_passwords() {
        assert_eq!(
            derive_credentials("pw", 4095).err(),
            Some(SaslError::Iterations(4095))
        );
        assert_eq!(
            derive_credentials("\u{00AD}", 4096).err(),
            Some(SaslError::EmptyPassword)
        );
        assert_eq!(
            derive_credentials("a\u{0007}", 4096).err(),
            Some(SaslError::Saslprep)
        );
    }

    #[test]
    fn decoy_keys_are_stable_per_user_and_differ_between_users_and_hashes() {
        let secret = [9; 32];
        let a1 = decoy_keys(&secret, Hash::Sha256, "nobody", 4096);
        let a2 = decoy_keys(&secret, Hash::Sha256, "nobody", 4096);
        let b = decoy_keys(&secret, Hash::Sha256, "someone", 4096);
        let c = decoy_keys(&secret, Hash::Sha1, "nobody", 4096);
        assert_eq!(a1, a2);
        assert_ne!(a1.salt, b.salt);
        assert_ne!(a1.salt, c.salt);
        assert!(Hash::Sha1.well_formed(&c) && Hash::Sha256.well_formed(&a1));
        assert_eq!(a1.salt.len(), SALT_LEN);
    }

    #[test]
    fn debug_output_hides_keys() {
        let creds = derive_credentials("pencil", 4096).expect("derives");
        let shown = format!("{creds:?}");
        assert!(!shown.contains("stored_key") && !shown.contains("server_key"));
    }
}
