//! Client side of SASL: which mechanism to use, and the SCRAM client (RFC 5802, RFC 7677)
//! with channel binding (RFC 5802 §6; tls-exporter RFC 9266, tls-server-end-point
//! RFC 5929).
//!
//! Role: pure message building and checking. The server's signature (`v=`) is always
//! verified: a server that cannot produce it does not know our credentials.
//!
//! Must not: do I/O or base64 framing (the caller does), keep the password longer than
//! the exchange, or fall back to PLAIN while any SCRAM variant is offered.

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::num::NonZeroU32;

use super::ClientError;

/// Fewest PBKDF2 iterations we accept from a server (RFC 7677 §4 asks for at least 4096);
/// fewer would make an offline guess at our password cheap for whoever sees the exchange.
const MIN_ITERATIONS: u32 = 4096;
/// Most iterations we compute: a hostile server must not pin our CPU for minutes.
const MAX_ITERATIONS: u32 = 10_000_000;

/// The SCRAM hash (RFC 5802 §2.2 "H").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // SCRAM-SHA-1 is defined with SHA-1 (RFC 5802); aws-lc-rs calls it legacy.
        let alg = match self {
            Hash::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => hmac::HMAC_SHA256,
        };
        hmac::sign(&hmac::Key::new(alg, key), data).as_ref().to_vec()
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &digest::SHA256,
        };
        digest::digest(alg, data).as_ref().to_vec()
    }

    fn salted_password(self, password: &[u8], salt: &[u8], iterations: NonZeroU32) -> Vec<u8> {
        let (alg, len) = match self {
            Hash::Sha1 => (pbkdf2::PBKDF2_HMAC_SHA1, 20),
            Hash::Sha256 => (pbkdf2::PBKDF2_HMAC_SHA256, 32),
        };
        let mut out = vec![0; len];
        pbkdf2::derive(alg, iterations, salt, password, &mut out);
        out
    }
}

/// Channel bindings this TLS connection can provide.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bindings {
    /// RFC 9266 tls-exporter value.
    pub tls_exporter: Option<Vec<u8>>,
    /// RFC 5929 tls-server-end-point value (hash of the server's certificate).
    pub tls_server_end_point: Option<Vec<u8>>,
    /// TLS 1.3 was negotiated: tls-exporter is then the default binding (RFC 9266 §3).
    pub tls13: bool,
}

impl Bindings {
    /// The binding to use with a -PLUS mechanism. With XEP-0440 the server lists its
    /// types and we take the best we share; without it only TLS 1.3's default
    /// (tls-exporter) is a safe guess (TLS 1.2's default, tls-unique, we cannot do).
    fn pick(&self, advertised: Option<&[String]>) -> Option<Cb> {
        let has = |t: &str| advertised.is_some_and(|a| a.iter().any(|x| x == t));
        let exporter = self.tls_exporter.clone().filter(|_| has("tls-exporter") || (advertised.is_none() && self.tls13));
        if let Some(data) = exporter {
            return Some(Cb::Bound { name: "tls-exporter", data });
        }
        let endpoint = self.tls_server_end_point.clone().filter(|_| has("tls-server-end-point"));
        endpoint.map(|data| Cb::Bound { name: "tls-server-end-point", data })
    }

    fn any(&self) -> bool {
        self.tls_exporter.is_some() || self.tls_server_end_point.is_some()
    }
}

/// The GS2 channel-binding part of a SCRAM exchange (RFC 5802 §7 `gs2-cbind-flag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cb {
    /// `n`: no channel binding.
    None,
    /// `y`: we could bind but the server offered no -PLUS; a server that did offer it
    /// sees the downgrade and refuses (RFC 5802 §6).
    ClientOnly,
    /// `p=name`, with the binding data.
    Bound { name: &'static str, data: Vec<u8> },
}

/// The mechanism chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    External,
    Scram { hash: Hash, plus: bool, cb: Cb },
    Plain,
}

impl Choice {
    /// The IANA mechanism name (RFC 4422 §3.1).
    pub fn name(&self) -> String {
        match self {
            Choice::External => "EXTERNAL".into(),
            Choice::Plain => "PLAIN".into(),
            Choice::Scram { hash, plus, .. } => {
                let base = match hash {
                    Hash::Sha1 => "SCRAM-SHA-1",
                    Hash::Sha256 => "SCRAM-SHA-256",
                };
                if *plus { format!("{base}-PLUS") } else { base.to_owned() }
            }
        }
    }
}

/// Picks the mechanism: EXTERNAL when we have a certificate and it is offered; else,
/// with a password, SCRAM-SHA-256-PLUS (with a binding we share), SCRAM-SHA-256,
/// SCRAM-SHA-1-PLUS, SCRAM-SHA-1, and PLAIN only when no SCRAM is offered at all (we
/// are always inside TLS here). `None`: nothing usable.
pub(crate) fn choose(
    offered: &[String],
    have_cert: bool,
    have_password: bool,
    bindings: &Bindings,
    advertised_cb: Option<&[String]>,
) -> Option<Choice> {
    let has = |m: &str| offered.iter().any(|o| o.eq_ignore_ascii_case(m));
    if have_cert && has("EXTERNAL") {
        return Some(Choice::External);
    }
    if !have_password {
        return None;
    }
    let any_plus = offered.iter().any(|o| o.to_ascii_uppercase().ends_with("-PLUS"));
    let binding = bindings.pick(advertised_cb);
    // Without -PLUS we say `y` only if we could have bound but the server offered no
    // -PLUS at all; if it offered -PLUS with a type we lack, `y` would read as an attack.
    let unbound = if !any_plus && bindings.any() { Cb::ClientOnly } else { Cb::None };
    for (hash, name) in [(Hash::Sha256, "SCRAM-SHA-256"), (Hash::Sha1, "SCRAM-SHA-1")] {
        if let Some(cb) = binding.clone().filter(|_| has(&format!("{name}-PLUS"))) {
            return Some(Choice::Scram { hash, plus: true, cb });
        }
        if has(name) {
            return Some(Choice::Scram { hash, plus: false, cb: unbound });
        }
    }
    has("PLAIN").then_some(Choice::Plain)
}

/// Why a SCRAM exchange failed on our side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScramError {
    #[error("password cannot be prepared (SASLprep, RFC 4013)")]
    Saslprep,
    #[error("malformed server-first-message: {0}")]
    BadServerFirst(&'static str),
    #[error("server nonce does not extend ours")]
    BadNonce,
    #[error("server asks for {0} iterations (accepted: {MIN_ITERATIONS}..={MAX_ITERATIONS})")]
    Iterations(u32),
    #[error("malformed server-final-message")]
    BadServerFinal,
    #[error("server signature does not match: the server does not know our credentials")]
    BadServerSignature,
    #[error("{0}")]
    ServerError(String),
    #[error("SCRAM messages out of order")]
    OutOfOrder,
}

/// One SCRAM exchange, client side (RFC 5802 §3, §5).
pub(crate) struct ScramClient {
    hash: Hash,
    password: String,
    gs2_header: String,
    cb_data: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    /// ServerSignature, known after server-first.
    expected_v: Option<Vec<u8>>,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient").field("hash", &self.hash).field("gs2_header", &self.gs2_header).finish_non_exhaustive()
    }
}

/// RFC 5802 §5.1 `saslname`: `=` and `,` escaped.
fn saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// 18 random bytes, base64: 24 printable characters without `,`.
pub(crate) fn random_nonce() -> Result<String, ClientError> {
    let mut b = [0u8; 18];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| ClientError::Config("no randomness".into()))?;
    Ok(B64.encode(b))
}

impl ScramClient {
    /// Starts an exchange for `username` (the JID's localpart) with a fresh `nonce`.
    pub fn new(hash: Hash, username: &str, password: &str, cb: Cb, nonce: String) -> Result<Self, ScramError> {
        let password = stringprep::saslprep(password).map_err(|_| ScramError::Saslprep)?.into_owned();
        let user = stringprep::saslprep(username).map_err(|_| ScramError::Saslprep)?;
        let (gs2_header, cb_data) = match cb {
            Cb::None => ("n,,".to_owned(), Vec::new()),
            Cb::ClientOnly => ("y,,".to_owned(), Vec::new()),
            Cb::Bound { name, data } => (format!("p={name},,"), data),
        };
        let client_first_bare = format!("n={},r={nonce}", saslname(&user));
        Ok(ScramClient { hash, password, gs2_header, cb_data, nonce, client_first_bare, expected_v: None })
    }

    /// client-first-message.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// Checks server-first and returns client-final (with the proof).
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.expected_v.is_some() {
            return Err(ScramError::OutOfOrder);
        }
        let server_first = std::str::from_utf8(msg).map_err(|_| ScramError::BadServerFirst("not UTF-8"))?;
        let mut parts = server_first.split(',');
        // RFC 5802 §5.1: `m=` (mandatory extension) must make us fail: we know none.
        let nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::BadServerFirst("no r="))?;
        let salt = parts.next().and_then(|p| p.strip_prefix("s=")).ok_or(ScramError::BadServerFirst("no s="))?;
        let iterations = parts.next().and_then(|p| p.strip_prefix("i=")).ok_or(ScramError::BadServerFirst("no i="))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::BadNonce);
        }
        if nonce.bytes().any(|b| !(0x21..=0x7e).contains(&b) || b == b',') {
            return Err(ScramError::BadServerFirst("bad nonce characters"));
        }
        let salt = B64.decode(salt).map_err(|_| ScramError::BadServerFirst("salt is not base64"))?;
        let i: u32 = iterations.parse().map_err(|_| ScramError::BadServerFirst("bad i="))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&i) {
            return Err(ScramError::Iterations(i));
        }
        let iterations = NonZeroU32::new(i).ok_or(ScramError::Iterations(i))?;

        let mut cbind_input = self.gs2_header.clone().into_bytes();
        cbind_input.extend_from_slice(&self.cb_data);
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind_input));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);

        let h = self.hash;
        let salted = h.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = h.hmac(&salted, b"Client Key");
        let stored_key = h.digest(&client_key);
        let client_signature = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&client_signature).map(|(a, b)| a ^ b).collect();
        let server_key = h.hmac(&salted, b"Server Key");
        self.expected_v = Some(h.hmac(&server_key, auth_message.as_bytes()));
        // The password is no longer needed; do not keep it around.
        self.password.clear();
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final: `v=` must equal ServerSignature (constant time), `e=` is
    /// the server's error.
    pub fn verify_server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let expected = self.expected_v.as_ref().ok_or(ScramError::OutOfOrder)?;
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::BadServerFinal)?;
        let first = text.split(',').next().unwrap_or_default();
        if let Some(e) = first.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_owned()));
        }
        let v = first.strip_prefix("v=").ok_or(ScramError::BadServerFinal)?;
        let v = B64.decode(v).map_err(|_| ScramError::BadServerFinal)?;
        constant_time::verify_slices_are_equal(&v, expected).map_err(|_| ScramError::BadServerSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap_or("<not utf-8>")
    }

    /// RFC 7677 §3 test vector (SCRAM-SHA-256, user "user", password "pencil").
    #[test]
    fn scram_sha256_matches_the_rfc_7677_vector() {
        let mut c = ScramClient::new(Hash::Sha256, "user", "pencil", Cb::None, "rOprNGfwEbeRWgbNEkqO".into())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&c.client_first()), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = c.handle_server_first(server_first).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            text(&fin),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(()));
        assert_eq!(
            c.verify_server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::BadServerSignature)
        );
        assert_eq!(c.verify_server_final(b"e=invalid-proof"), Err(ScramError::ServerError("invalid-proof".into())));
    }

    /// RFC 5802 §5 test vector (SCRAM-SHA-1).
    #[test]
    fn scram_sha1_matches_the_rfc_5802_vector() {
        let mut c = ScramClient::new(Hash::Sha1, "user", "pencil", Cb::None, "fyko+d2lbbFgONRv9qkxdawL".into())
            .unwrap_or_else(|e| panic!("{e}"));
        let fin = c
            .handle_server_first(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&fin), "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=");
        assert_eq!(c.verify_server_final(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="), Ok(()));
    }

    #[test]
    fn channel_binding_goes_into_the_header_and_c_attribute() {
        let data = vec![1u8, 2, 3];
        let mut c = ScramClient::new(
            Hash::Sha256,
            "a=b,c",
            "pw",
            Cb::Bound { name: "tls-exporter", data: data.clone() },
            "abc".into(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&c.client_first()), "p=tls-exporter,,n=a=3Db=2Cc,r=abc");
        let fin = c.handle_server_first(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4096").unwrap_or_else(|e| panic!("{e}"));
        let mut cbind = b"p=tls-exporter,,".to_vec();
        cbind.extend_from_slice(&data);
        assert!(text(&fin).starts_with(&format!("c={},r=abcdef,p=", B64.encode(cbind))), "{}", text(&fin));
        let y = ScramClient::new(Hash::Sha256, "u", "pw", Cb::ClientOnly, "n".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&y.client_first()), "y,,n=u,r=n");
    }

    #[test]
    fn hostile_server_first_messages_are_refused() {
        let new = || ScramClient::new(Hash::Sha256, "u", "pw", Cb::None, "abc".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(new().handle_server_first(b"r=xyzdef,s=QSXC,i=4096"), Err(ScramError::BadNonce));
        assert_eq!(new().handle_server_first(b"r=abc,s=QSXC,i=4096"), Err(ScramError::BadNonce));
        assert_eq!(new().handle_server_first(b"r=abcd,s=QSXCR+Q6sek8bf92,i=1"), Err(ScramError::Iterations(1)));
        assert_eq!(
            new().handle_server_first(b"r=abcd,s=QSXCR+Q6sek8bf92,i=4294967295"),
            Err(ScramError::Iterations(u32::MAX))
        );
        assert!(matches!(new().handle_server_first(b"m=ext,r=abcd,s=QSXC,i=4096"), Err(ScramError::BadServerFirst(_))));
        assert!(matches!(new().handle_server_first(b"r=abcd,s=!!,i=4096"), Err(ScramError::BadServerFirst(_))));
        // Server-final before server-first proves nothing.
        assert_eq!(new().verify_server_final(b"v=AAAA"), Err(ScramError::OutOfOrder));
    }

    fn bindings(tls13: bool) -> Bindings {
        Bindings { tls_exporter: Some(vec![7; 32]), tls_server_end_point: Some(vec![9; 32]), tls13 }
    }

    #[test]
    fn sha256_plus_with_tls_exporter_is_preferred() {
        let offered = s(&["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
        let adv = s(&["tls-server-end-point", "tls-exporter"]);
        let c = choose(&offered, false, true, &bindings(false), Some(&adv));
        assert_eq!(c, Some(Choice::Scram { hash: Hash::Sha256, plus: true, cb: Cb::Bound { name: "tls-exporter", data: vec![7; 32] } }));
        assert_eq!(c.map(|c| c.name()).as_deref(), Some("SCRAM-SHA-256-PLUS"));
        // Only tls-server-end-point advertised: use it.
        let adv = s(&["tls-server-end-point"]);
        let c = choose(&offered, false, true, &bindings(true), Some(&adv));
        assert!(matches!(c, Some(Choice::Scram { plus: true, cb: Cb::Bound { name: "tls-server-end-point", .. }, .. })));
        // No XEP-0440: tls-exporter on TLS 1.3 only; on TLS 1.2 fall back without binding.
        let c = choose(&offered, false, true, &bindings(true), None);
        assert!(matches!(c, Some(Choice::Scram { plus: true, cb: Cb::Bound { name: "tls-exporter", .. }, .. })));
        let c = choose(&offered, false, true, &bindings(false), None);
        assert_eq!(c, Some(Choice::Scram { hash: Hash::Sha256, plus: false, cb: Cb::None }));
    }

    #[test]
    fn without_plus_the_flag_says_whether_a_downgrade_is_possible() {
        let offered = s(&["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"]);
        let c = choose(&offered, false, true, &bindings(true), None);
        assert_eq!(c, Some(Choice::Scram { hash: Hash::Sha256, plus: false, cb: Cb::ClientOnly }));
        let c = choose(&s(&["SCRAM-SHA-1"]), false, true, &bindings(true), None);
        assert_eq!(c, Some(Choice::Scram { hash: Hash::Sha1, plus: false, cb: Cb::ClientOnly }));
        let c = choose(&s(&["SCRAM-SHA-1"]), false, true, &Bindings::default(), None);
        assert_eq!(c, Some(Choice::Scram { hash: Hash::Sha1, plus: false, cb: Cb::None }));
    }

    #[test]
    fn plain_only_when_no_scram_is_offered_and_external_needs_a_certificate() {
        assert_eq!(choose(&s(&["PLAIN"]), false, true, &bindings(true), None), Some(Choice::Plain));
        assert_eq!(choose(&s(&["PLAIN", "EXTERNAL"]), true, true, &bindings(true), None), Some(Choice::External));
        assert_eq!(
            choose(&s(&["PLAIN", "SCRAM-SHA-1"]), true, true, &Bindings::default(), None),
            Some(Choice::Scram { hash: Hash::Sha1, plus: false, cb: Cb::None })
        );
        assert_eq!(choose(&s(&["SCRAM-SHA-256"]), true, false, &bindings(true), None), None);
        assert_eq!(choose(&s(&["DIGEST-MD5"]), false, true, &bindings(true), None), None);
    }
}
