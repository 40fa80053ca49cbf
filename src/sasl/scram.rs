//! SCRAM server (RFC 5802 §5 and §7, RFC 7677) with channel binding (RFC 5802 §6, RFC 9266, RFC 5929).
//!
//! Role: parse client-first and client-final strictly, enforce the channel-binding rules (no `p=`
//! on a non-PLUS mechanism, `y` rejected when we offer -PLUS, `c=` must match this connection),
//! and verify the proof against stored keys in constant time.
//!
//! Must not: tell unknown, disabled or certificate-only accounts from a wrong password. They get
//! decoy keys with the real iteration count and a per-user stable salt, and fail exactly where a
//! wrong proof fails. Checks that fail early depend only on what the client itself sent.

use aws_lc_rs::{constant_time, rand};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

pub(crate) use super::credentials::Hash;
use super::credentials::{ScramKeys, decoy_keys};
use super::{SaslContext, SaslFailure, Step, authzid_names};

/// Random bytes in our part of the nonce; 18 bytes give 24 base64 characters, no padding, no ','.
const SERVER_NONCE_BYTES: usize = 18;

/// One SCRAM exchange (server side).
#[derive(Debug)]
pub(super) struct ScramServer {
    hash: Hash,
    /// The -PLUS variant was chosen: the client must bind to this connection.
    plus: bool,
    /// Set between server-first and client-final.
    pending: Option<Pending>,
}

/// What client-final is checked against.
#[derive(Debug)]
struct Pending {
    /// The gs2-header as the client sent it, then the binding data: what `c=` must decode to.
    expected_cbind: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    /// Client nonce followed by ours.
    nonce: String,
    keys: ScramKeys,
    /// Canonical localpart if `keys` are the account's own; `None` for decoy keys.
    account: Option<String>,
}

/// The GS2 channel-binding flag (RFC 5802 §7 `gs2-cbind-flag`).
#[derive(Debug, PartialEq, Eq)]
enum CbFlag<'a> {
    /// `n`: the client does not support channel binding.
    No,
    /// `y`: the client supports it but thinks the server does not.
    ClientOnly,
    /// `p=name`: the client binds with this type.
    Used(&'a str),
}

/// A parsed client-first-message.
#[derive(Debug)]
struct ClientFirst<'a> {
    gs2_header: &'a str,
    cbind: CbFlag<'a>,
    authzid: Option<String>,
    username: String,
    nonce: &'a str,
    bare: &'a str,
}

impl ScramServer {
    pub(super) fn new(hash: Hash, plus: bool) -> Box<Self> {
        Box::new(Self {
            hash,
            plus,
            pending: None,
        })
    }

    /// Handles client-first, then client-final; `Exchange` stops calling after a non-challenge.
    pub(super) fn step(&mut self, ctx: &SaslContext, data: &[u8]) -> Step {
        match self.pending.take() {
            None => {
                let first = server_nonce().and_then(|n| self.client_first(ctx, data, &n));
                match first {
                    Ok(pending) => {
                        let challenge = pending.server_first.clone().into_bytes();
                        self.pending = Some(pending);
                        Step::Challenge(challenge)
                    }
                    Err(failure) => Step::Failure(failure),
                }
            }
            Some(pending) => self
                .client_final(pending, data)
                .unwrap_or_else(Step::Failure),
        }
    }

    fn client_first(
        &self,
        ctx: &SaslContext,
        data: &[u8],
        server_nonce: &str,
    ) -> Result<Pending, SaslFailure> {
        let msg = std::str::from_utf8(data).map_err(|_| SaslFailure::MalformedRequest)?;
        let first = ClientFirst::parse(msg)?;

        // RFC 5802 §6: -PLUS needs `p=`; `p=` on a non-PLUS mechanism is a protocol error; `y`
        // while we offer -PLUS (any binding available) means someone stripped -PLUS in transit.
        // One exception: a client that already tried -PLUS on this connection with a binding
        // type we lack (e.g. slixmpp's tls-unique) saw -PLUS offered, so nothing was stripped;
        // its `y` only says no type is common to us (XEP-0440 lists ours).
        let cb_data: &[u8] = match (&first.cbind, self.plus) {
            (CbFlag::Used(name), true) => match ctx.bindings.get(name) {
                Some(d) => d,
                None => {
                    ctx.cb_type_unsupported.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(SaslFailure::NotAuthorized);
                }
            },
            (CbFlag::Used(_), false) | (CbFlag::No | CbFlag::ClientOnly, true) => {
                return Err(SaslFailure::MalformedRequest);
            }
            (CbFlag::ClientOnly, false)
                if ctx.bindings.any() && !ctx.cb_type_unsupported.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                return Err(SaslFailure::NotAuthorized);
            }
            (CbFlag::No | CbFlag::ClientOnly, false) => &[],
        };

        // RFC 6120 §6.3.8: an authzid must be the bare JID of the authenticating account.
        if let Some(authzid) = &first.authzid
            && !authzid_names(authzid, &first.username, &ctx.domain)
        {
            return Err(SaslFailure::InvalidAuthzid);
        }

        let (account, keys) = match self.account_keys(ctx, &first.username) {
            Some((localpart, keys)) => (Some(localpart), keys),
            None => {
                let keys = decoy_keys(
                    &ctx.decoy_secret,
                    self.hash,
                    &first.username,
                    ctx.decoy_iterations,
                );
                (None, keys)
            }
        };

        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&keys.salt),
            keys.iterations
        );
        let mut expected_cbind = first.gs2_header.as_bytes().to_vec();
        expected_cbind.extend_from_slice(cb_data);
        Ok(Pending {
            expected_cbind,
            client_first_bare: first.bare.to_owned(),
            server_first,
            nonce,
            keys,
            account,
        })
    }

    /// The account's own keys for this hash, if it exists and has well-formed ones.
    fn account_keys(&self, ctx: &SaslContext, username: &str) -> Option<(String, ScramKeys)> {
        let account = ctx.lookup.lookup(username)?;
        let keys = self.hash.keys(account.credentials.as_ref()?);
        if !self.hash.well_formed(keys) {
            // A corrupt record must not crash or leak; it behaves like a wrong password.
            tracing::warn!(localpart = %account.localpart, "malformed SCRAM record; serving decoy keys");
            return None;
        }
        Some((account.localpart, keys.clone()))
    }

    fn client_final(&self, pending: Pending, data: &[u8]) -> Result<Step, SaslFailure> {
        let malformed = SaslFailure::MalformedRequest;
        let msg = std::str::from_utf8(data).map_err(|_| malformed)?;
        // RFC 5802 §7: client-final = c=…,r=…[,extensions],p=…; the proof is last and is base64,
        // so the last ',' ends client-final-message-without-proof.
        let (without_proof, proof_attr) = msg.rsplit_once(',').ok_or(malformed)?;
        let proof = proof_attr.strip_prefix("p=").ok_or(malformed)?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(malformed)?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(malformed)?;
        if !attrs.all(valid_extension) {
            return Err(malformed);
        }
        let cbind = B64.decode(cbind).map_err(|_| malformed)?;
        let proof = B64.decode(proof).map_err(|_| malformed)?;
        if proof.len() != self.hash.output_len() {
            return Err(malformed);
        }
        // RFC 5802 §6: `c=` repeats the gs2-header and, with `p=`, this connection's binding.
        if constant_time::verify_slices_are_equal(&cbind, &pending.expected_cbind).is_err()
            || nonce != pending.nonce
        {
            return Err(SaslFailure::NotAuthorized);
        }

        // RFC 5802 §3: AuthMessage, ClientProof = ClientKey XOR ClientSignature, check H(ClientKey).
        let auth_message = format!(
            "{},{},{without_proof}",
            pending.client_first_bare, pending.server_first
        );
        let keys = &pending.keys;
        let client_signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let proof_ok = constant_time::verify_slices_are_equal(
            &self.hash.digest(&client_key),
            &keys.stored_key,
        )
        .is_ok();
        let server_signature = self.hash.hmac(&keys.server_key, auth_message.as_bytes());
        match (proof_ok, pending.account) {
            (true, Some(localpart)) => Ok(Step::Success {
                localpart,
                additional_data: Some(format!("v={}", B64.encode(server_signature)).into_bytes()),
            }),
            _ => Err(SaslFailure::NotAuthorized),
        }
    }
}

/// The username a client-first message names, if it parses (for throttling failures).
pub(super) fn attempted_name(data: &[u8]) -> Option<String> {
    let msg = std::str::from_utf8(data).ok()?;
    ClientFirst::parse(msg).ok().map(|f| f.username)
}

impl<'a> ClientFirst<'a> {
    /// RFC 5802 §7: gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce
    /// ["," extensions].
    fn parse(msg: &'a str) -> Result<Self, SaslFailure> {
        let malformed = SaslFailure::MalformedRequest;
        let (flag, rest) = msg.split_once(',').ok_or(malformed)?;
        let (authz, bare) = rest.split_once(',').ok_or(malformed)?;
        let gs2_header = &msg[..msg.len() - bare.len()];
        let cbind = match flag {
            "n" => CbFlag::No,
            "y" => CbFlag::ClientOnly,
            _ => {
                // cb-name = 1*(ALPHA / DIGIT / "." / "-") (RFC 5056 §7).
                let name = flag.strip_prefix("p=").ok_or(malformed)?;
                let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
                if name.is_empty() || !name.bytes().all(valid) {
                    return Err(malformed);
                }
                CbFlag::Used(name)
            }
        };
        let authzid = match authz {
            "" => None,
            _ => Some(decode_saslname(authz.strip_prefix("a=").ok_or(malformed)?)?),
        };
        let mut attrs = bare.split(',');
        // A leading `m=` (mandatory extension) fails here too: none is defined, so we support none.
        let username = attrs
            .next()
            .and_then(|a| a.strip_prefix("n="))
            .ok_or(malformed)?;
        let username = decode_saslname(username)?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(malformed)?;
        // printable = %x21-2B / %x2D-7E: visible ASCII except ','.
        if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(malformed);
        }
        if !attrs.all(valid_extension) {
            return Err(malformed);
        }
        Ok(Self {
            gs2_header,
            cbind,
            authzid,
            username,
            nonce,
            bare,
        })
    }
}

/// Decodes a `saslname` (RFC 5802 §7): `=2C` is ',', `=3D` is '=', any other '=' or a NUL is an error.
fn decode_saslname(value: &str) -> Result<String, SaslFailure> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find(['=', '\0']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("=2C") {
            out.push(',');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("=3D") {
            out.push('=');
            rest = after;
        } else {
            return Err(SaslFailure::MalformedRequest);
        }
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(SaslFailure::MalformedRequest);
    }
    Ok(out)
}

/// `attr-val = ALPHA "=" value` with a non-empty value and no NUL (RFC 5802 §7); unknown ones are ignored.
fn valid_extension(attr: &str) -> bool {
    let b = attr.as_bytes();
    b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' && !b.contains(&0)
}

/// Our part of the nonce: fresh random bytes, base64 (printable, no ',').
fn server_nonce() -> Result<String, SaslFailure> {
    let mut bytes = [0u8; SERVER_NONCE_BYTES];
    rand::fill(&mut bytes).map_err(|_| SaslFailure::TemporaryAuthFailure)?;
    Ok(B64.encode(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::{DOMAIN, context, exporter};
    use super::super::{
        AccountAuth, ChannelBindings, Credentials, Exchange, Mechanism, SaslContext,
    };
    use super::*;
    use std::num::NonZeroU32;
    use std::sync::Arc;

    /// A small SCRAM client for driving the server into every corner.
    pub struct Client {
        hash: Hash,
        gs2: String,
        cb_data: Vec<u8>,
        user: String,
        password: String,
        nonce: String,
    }

    impl Client {
        pub fn new(hash: Hash, user: &str, password: &str) -> Self {
            Self {
                hash,
                gs2: "n,,".to_owned(),
                cb_data: Vec::new(),
                user: user.to_owned(),
                password: password.to_owned(),
                nonce: "fyko+d2lbbFgONRv9qkxdawL".to_owned(),
            }
        }

        /// Uses this gs2-header (e.g. `p=tls-exporter,,`) and binding data in `c=`.
        pub fn gs2(mut self, header: &str, cb_data: &[u8]) -> Self {
            header.clone_into(&mut self.gs2);
            self.cb_data = cb_data.to_vec();
            self
        }

        fn bare(&self) -> String {
            format!("n={},r={}", self.user, self.nonce)
        }

        pub fn first(&self) -> String {
            format!("{}{}", self.gs2, self.bare())
        }

        /// client-final for this server-first, and the `v=` the server must answer.
        pub fn final_message(&self, server_first: &[u8]) -> (String, Vec<u8>) {
            let server_first = std::str::from_utf8(server_first).expect("server-first is UTF-8");
            let attr = |name: &str| {
                server_first
                    .split(',')
                    .find_map(|a| a.strip_prefix(name))
                    .expect("server-first attribute")
                    .to_owned()
            };
            let (nonce, salt, iter) = (attr("r="), attr("s="), attr("i="));
            let salt = B64.decode(salt).expect("salt is base64");
            let iter: NonZeroU32 = iter.parse().expect("iteration count");
            let salted = self
                .hash
                .salted_password(self.password.as_bytes(), &salt, iter);
            let client_key = self.hash.hmac(&salted, b"Client Key");
            let stored_key = self.hash.digest(&client_key);
            let mut cbind = self.gs2.as_bytes().to_vec();
            cbind.extend_from_slice(&self.cb_data);
            let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
            let auth = format!("{},{server_first},{without_proof}", self.bare());
            let signature = self.hash.hmac(&stored_key, auth.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(signature)
                .map(|(k, s)| k ^ s)
                .collect();
            let server_key = self.hash.hmac(&salted, b"Server Key");
            let verifier = format!(
                "v={}",
                B64.encode(self.hash.hmac(&server_key, auth.as_bytes()))
            );
            (
                format!("{without_proof},p={}", B64.encode(proof)),
                verifier.into_bytes(),
            )
        }
    }

    /// Runs a whole exchange; on success also checks the server's `v=` against the client's.
    fn run(ctx: &Arc<SaslContext>, mech: Mechanism, client: &Client) -> Step {
        let mut ex = Exchange::start(mech, ctx.clone()).expect("mechanism starts");
        let first = match ex.step(client.first().as_bytes()) {
            Step::Challenge(first) => first,
            other => return other,
        };
        let (fin, verifier) = client.final_message(&first);
        let step = ex.step(fin.as_bytes());
        if let Step::Success {
            additional_data, ..
        } = &step
        {
            assert_eq!(
                additional_data.as_deref(),
                Some(&verifier[..]),
                "server signature"
            );
        }
        step
    }

    fn server_first(ctx: &Arc<SaslContext>, mech: Mechanism, client_first: &str) -> Step {
        let mut ex = Exchange::start(mech, ctx.clone()).expect("mechanism starts");
        ex.step(client_first.as_bytes())
    }

    fn success(localpart: &str) -> impl Fn(&Step) -> bool + '_ {
        move |s| matches!(s, Step::Success { localpart: l, .. } if l == localpart)
    }

    const NOT_AUTHORIZED: Step = Step::Failure(SaslFailure::NotAuthorized);
    const MALFORMED: Step = Step::Failure(SaslFailure::MalformedRequest);

    /// A context whose only account is `user` with keys from `pencil` at the given RFC salt.
    fn rfc_context(hash: Hash, salt_b64: &str) -> Arc<SaslContext> {
        let salt = B64.decode(salt_b64).expect("salt");
        let keys = hash.keys_from_password("pencil", salt, NonZeroU32::new(4096).expect("4096"));
        let creds = Credentials {
            sha1: keys.clone(),
            sha256: keys,
        };
        let lookup = move |name: &str| {
            (name == "user").then(|| AccountAuth {
                localpart: "user".into(),
                credentials: Some(creds.clone()),
            })
        };
        Arc::new(SaslContext {
            domain: DOMAIN.into(),
            lookup: Arc::new(lookup),
            bindings: ChannelBindings::default(),
            cert: None,
            decoy_secret: [1; 32],
            decoy_iterations: 4096,
            cb_type_unsupported: Default::default(),
        })
    }

    /// Replays an RFC transcript with the RFC's server nonce.
    fn replay_rfc(hash: Hash, salt: &str, c1: &str, snonce: &str, s1: &str, c2: &str, s2: &str) {
        let ctx = rfc_context(hash, salt);
        let server = ScramServer::new(hash, false);
        let pending = server
            .client_first(&ctx, c1.as_bytes(), snonce)
            .expect("client-first ok");
        assert_eq!(pending.server_first, s1);
        let step = server.client_final(pending, c2.as_bytes());
        let expected = Step::Success {
            localpart: "user".into(),
            additional_data: Some(s2.into()),
        };
        assert_eq!(step, Ok(expected));
        // The same transcript with one proof bit flipped fails.
        let (head, proof) = c2.rsplit_once(",p=").expect("proof");
        let mut proof = B64.decode(proof).expect("base64 proof");
        proof[0] ^= 1;
        let flipped = format!("{head},p={}", B64.encode(proof));
        let pending = server
            .client_first(&ctx, c1.as_bytes(), snonce)
            .expect("client-first ok");
        assert_eq!(
            server.client_final(pending, flipped.as_bytes()),
            Err(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn rfc_5802_sha1_transcript_is_reproduced() {
        replay_rfc(
            Hash::Sha1,
            "QSXCR+Q6sek8bf92",
            "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        );
    }

    #[test]
    fn rfc_7677_sha256_transcript_is_reproduced() {
        replay_rfc(
            Hash::Sha256,
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
    }

    #[test]
    fn sha256_and_sha1_succeed_with_the_right_password_and_fail_with_a_wrong_one() {
        let ctx = context(ChannelBindings::default(), None);
        for (mech, hash) in [
            (Mechanism::ScramSha256, Hash::Sha256),
            (Mechanism::ScramSha1, Hash::Sha1),
        ] {
            assert!(success("alice")(&run(
                &ctx,
                mech,
                &Client::new(hash, "alice", "pencil")
            )));
            // The lookup normalises the name; success names the canonical account.
            assert!(success("alice")(&run(
                &ctx,
                mech,
                &Client::new(hash, "ALICE", "pencil")
            )));
            assert_eq!(
                run(&ctx, mech, &Client::new(hash, "alice", "pencil2")),
                NOT_AUTHORIZED
            );
        }
    }

    /// Parses r=, s=, i= of a server-first message.
    fn shape(step: &Step) -> (String, Vec<u8>, u32) {
        let Step::Challenge(msg) = step else {
            panic!("expected server-first, got {step:?}")
        };
        let msg = std::str::from_utf8(msg).expect("UTF-8");
        let attr = |n: &str| {
            msg.split(',')
                .find_map(|a| a.strip_prefix(n))
                .expect("attr")
                .to_owned()
        };
        let salt = B64.decode(attr("s=")).expect("base64 salt");
        (attr("r="), salt, attr("i=").parse().expect("count"))
    }

    #[test]
    fn unknown_and_certificate_only_users_look_exactly_like_a_wrong_password() {
        let ctx = context(ChannelBindings::default(), None);
        let mech = Mechanism::ScramSha256;
        let real = shape(&server_first(&ctx, mech, "n,,n=alice,r=abc"));
        for user in ["nobody", "sensor1"] {
            let first = format!("n,,n={user},r=abc");
            let a = shape(&server_first(&ctx, mech, &first));
            let b = shape(&server_first(&ctx, mech, &first));
            assert_eq!(a.2, real.2, "same iteration count");
            assert_eq!(a.1.len(), real.1.len(), "same salt length");
            assert_eq!(a.1, b.1, "decoy salt stable across attempts");
            assert_eq!(a.0.len(), real.0.len(), "same nonce length");
            assert_ne!(a.0, b.0, "fresh server nonce every time");
            assert_eq!(
                run(&ctx, mech, &Client::new(Hash::Sha256, user, "pencil")),
                NOT_AUTHORIZED
            );
        }
        let other = shape(&server_first(&ctx, mech, "n,,n=someone,r=abc"));
        assert_ne!(
            other.1,
            shape(&server_first(&ctx, mech, "n,,n=nobody,r=abc")).1
        );
        // The real salt is stable too (it is stored), so stability tells nothing apart.
        assert_eq!(
            real.1,
            shape(&server_first(&ctx, mech, "n,,n=alice,r=abc")).1
        );
    }

    #[test]
    fn plus_with_matching_bindings_succeeds_and_other_data_fails() {
        let both = ChannelBindings {
            tls_exporter: Some(vec![1; 32]),
            tls_server_end_point: Some(vec![2; 32]),
        };
        let ctx = context(both, None);
        for (mech, hash) in [
            (Mechanism::ScramSha256Plus, Hash::Sha256),
            (Mechanism::ScramSha1Plus, Hash::Sha1),
        ] {
            let exporter = Client::new(hash, "alice", "pencil").gs2("p=tls-exporter,,", &[1; 32]);
            assert!(success("alice")(&run(&ctx, mech, &exporter)));
            let endpoint =
                Client::new(hash, "alice", "pencil").gs2("p=tls-server-end-point,,", &[2; 32]);
            assert!(success("alice")(&run(&ctx, mech, &endpoint)));
            let wrong = Client::new(hash, "alice", "pencil").gs2("p=tls-exporter,,", &[2; 32]);
            assert_eq!(run(&ctx, mech, &wrong), NOT_AUTHORIZED);
            // Binding data of another header type (the c= does not repeat this gs2-header).
            let crossed = Client::new(hash, "alice", "pencil").gs2("p=tls-exporter,,", &[]);
            assert_eq!(run(&ctx, mech, &crossed), NOT_AUTHORIZED);
        }
    }

    #[test]
    fn unsupported_or_unavailable_binding_types_fail_cleanly() {
        let ctx = context(exporter(), None);
        let mech = Mechanism::ScramSha256Plus;
        assert_eq!(
            server_first(&ctx, mech, "p=tls-unique,,n=alice,r=abc"),
            NOT_AUTHORIZED
        );
        assert_eq!(
            server_first(&ctx, mech, "p=tls-server-end-point,,n=alice,r=abc"),
            NOT_AUTHORIZED
        );
        assert_eq!(
            server_first(&ctx, mech, "p=no_such,,n=alice,r=abc"),
            MALFORMED
        );
    }

    #[test]
    fn y_flag_is_a_downgrade_when_plus_was_offered_and_fine_otherwise() {
        let offered = context(exporter(), None);
        let downgraded = Client::new(Hash::Sha256, "alice", "pencil").gs2("y,,", &[]);
        assert_eq!(
            server_first(&offered, Mechanism::ScramSha256, &downgraded.first()),
            NOT_AUTHORIZED
        );
        let not_offered = context(ChannelBindings::default(), None);
        assert!(success("alice")(&run(
            &not_offered,
            Mechanism::ScramSha256,
            &downgraded
        )));
    }

    #[test]
    fn y_flag_after_a_plus_attempt_with_an_unsupported_type_is_a_type_mismatch_not_a_downgrade() {
        // slixmpp: SCRAM-SHA-256-PLUS with tls-unique (refused), then SCRAM-SHA-256 with `y`.
        let ctx = context(exporter(), None);
        assert_eq!(server_first(&ctx, Mechanism::ScramSha256Plus, "p=tls-unique,,n=alice,r=abc"), NOT_AUTHORIZED);
        let after = Client::new(Hash::Sha256, "alice", "pencil").gs2("y,,", &[]);
        assert!(success("alice")(&run(&ctx, Mechanism::ScramSha256, &after)));
        // Wrong binding *data* for a type we have is no excuse: `y` stays a downgrade.
        let ctx = context(exporter(), None);
        let wrong = Client::new(Hash::Sha256, "alice", "pencil").gs2("p=tls-exporter,,", &[9; 32]);
        assert_eq!(run(&ctx, Mechanism::ScramSha256Plus, &wrong), NOT_AUTHORIZED);
        assert_eq!(server_first(&ctx, Mechanism::ScramSha256, &after.first()), NOT_AUTHORIZED);
    }

    #[test]
    fn binding_flags_must_match_the_mechanism() {
        let ctx = context(exporter(), None);
        let bound = "p=tls-exporter,,n=alice,r=abc";
        assert_eq!(server_first(&ctx, Mechanism::ScramSha256, bound), MALFORMED);
        assert_eq!(
            server_first(&ctx, Mechanism::ScramSha256Plus, "n,,n=alice,r=abc"),
            MALFORMED
        );
        assert_eq!(
            server_first(&ctx, Mechanism::ScramSha256Plus, "y,,n=alice,r=abc"),
            MALFORMED
        );
    }

    #[test]
    fn a_client_final_repeating_another_gs2_header_fails() {
        // Client-first claims `y`, client-final carries `n,,` (c=biws): header tampering.
        let ctx = context(ChannelBindings::default(), None);
        let client = Client::new(Hash::Sha256, "alice", "pencil");
        let mut ex = Exchange::start(Mechanism::ScramSha256, ctx).expect("starts");
        let first = client.first().replacen("n,,", "y,,", 1);
        let Step::Challenge(sf) = ex.step(first.as_bytes()) else {
            panic!("no server-first")
        };
        let (fin, _) = client.final_message(&sf);
        assert_eq!(ex.step(fin.as_bytes()), NOT_AUTHORIZED);
    }

    #[test]
    fn authzid_must_be_the_authenticating_accounts_bare_jid() {
        let ctx = context(ChannelBindings::default(), None);
        let mech = Mechanism::ScramSha256;
        let own = Client::new(Hash::Sha256, "alice", "pencil").gs2("n,a=Alice@grid.test,", &[]);
        assert!(success("alice")(&run(&ctx, mech, &own)));
        let other = "n,a=bob@grid.test,n=alice,r=abc";
        assert_eq!(
            server_first(&ctx, mech, other),
            Step::Failure(SaslFailure::InvalidAuthzid)
        );
    }

    #[test]
    fn a_wrong_nonce_in_client_final_fails() {
        let ctx = context(ChannelBindings::default(), None);
        let client = Client::new(Hash::Sha256, "alice", "pencil");
        let mut ex = Exchange::start(Mechanism::ScramSha256, ctx).expect("starts");
        let Step::Challenge(sf) = ex.step(client.first().as_bytes()) else {
            panic!("no server-first")
        };
        let tampered = String::from_utf8(sf)
            .expect("UTF-8")
            .replacen("r=fyko", "r=fyKo", 1);
        let (fin, _) = client.final_message(tampered.as_bytes());
        assert_eq!(ex.step(fin.as_bytes()), NOT_AUTHORIZED);
    }

    #[test]
    fn malformed_client_first_messages_fail() {
        let ctx = context(exporter(), None);
        for msg in [
            "",
            "n",
            "n,",
            "n,,",
            "n,,n=",
            "n,,n=alice",
            "n,,n=alice,r=",
            "n,,r=abc,n=alice",
            "x,,n=alice,r=abc",
            "p=,,n=alice,r=abc",
            "n,alice,n=alice,r=abc",
            "n,a=,n=alice,r=abc",
            "n,,m=ext,n=alice,r=abc",
            "n,,n=al=ice,r=abc",
            "n,,n=al=2cice,r=abc",
            "n,,n=a\0b,r=abc",
            "n,,n=alice,r=a b",
            "n,,n=alice,r=abc,1=x",
            "n,,n=alice,r=abc,q=",
            "n,,n=alice,r=abc,",
        ] {
            assert_eq!(
                server_first(&ctx, Mechanism::ScramSha256, msg),
                MALFORMED,
                "{msg:?}"
            );
        }
        let mut ex = Exchange::start(Mechanism::ScramSha256, ctx).expect("starts");
        assert_eq!(ex.step(b"n,,n=\xff\xfe,r=abc"), MALFORMED);
    }

    #[test]
    fn extensions_after_the_nonce_are_ignored() {
        let ctx = context(ChannelBindings::default(), None);
        let step = server_first(&ctx, Mechanism::ScramSha256, "n,,n=alice,r=abc,x=future");
        assert!(matches!(step, Step::Challenge(_)));
    }

    #[test]
    fn malformed_client_final_messages_fail() {
        let ctx = context(ChannelBindings::default(), None);
        let client = Client::new(Hash::Sha256, "alice", "pencil");
        let probe = {
            let mut ex = Exchange::start(Mechanism::ScramSha256, ctx.clone()).expect("starts");
            let Step::Challenge(sf) = ex.step(client.first().as_bytes()) else {
                panic!("no server-first")
            };
            client.final_message(&sf).0
        };
        let (without_proof, _) = probe.rsplit_once(',').expect("proof");
        let long_proof = B64.encode([0u8; 33]);
        let cases = [
            String::new(),
            "c=biws".into(),
            without_proof.to_owned(),
            format!("{without_proof},p="),
            format!("{without_proof},p=!!!!"),
            format!("{without_proof},p=AAAA"),
            format!("{without_proof},p={long_proof}"),
            format!("{without_proof},1=x,p={long_proof}"),
            probe.replacen("c=biws", "c=b!ws", 1),
            probe.replacen("c=biws,", "", 1),
        ];
        for fin in cases {
            let mut ex = Exchange::start(Mechanism::ScramSha256, ctx.clone()).expect("starts");
            assert!(matches!(
                ex.step(client.first().as_bytes()),
                Step::Challenge(_)
            ));
            assert_eq!(ex.step(fin.as_bytes()), MALFORMED, "{fin:?}");
            assert_eq!(
                ex.step(probe.as_bytes()),
                MALFORMED,
                "no step after a failure"
            );
        }
    }

    #[test]
    fn saslnames_decode_only_the_two_escapes() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Ok("a,b=c"));
        assert_eq!(decode_saslname("=3D").as_deref(), Ok("="));
        for bad in ["", "a=", "a=2", "a=41", "a=2c", "a\0"] {
            assert_eq!(
                decode_saslname(bad),
                Err(SaslFailure::MalformedRequest),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn random_and_mutated_messages_never_panic() {
        let ctx = context(exporter(), None);
        let clients = [
            (
                Mechanism::ScramSha256Plus,
                Client::new(Hash::Sha256, "alice", "pencil").gs2("p=tls-exporter,,", &[0xAB; 32]),
            ),
            (
                Mechanism::ScramSha1,
                Client::new(Hash::Sha1, "alice", "pencil"),
            ),
        ];
        let mut noise = vec![0u8; 3 * 2000];
        rand::fill(&mut noise).expect("random");
        for chunk in noise.chunks(3) {
            let (pos, byte, cut) = (usize::from(chunk[0]), chunk[1], usize::from(chunk[2]) % 4);
            for (mech, client) in &clients {
                let mut ex = Exchange::start(*mech, ctx.clone()).expect("starts");
                let mut first = client.first().into_bytes();
                let i = pos % first.len();
                first[i] = byte;
                let Step::Challenge(sf) = ex.step(&first) else {
                    continue;
                };
                let mut fin = client.final_message(&sf).0.into_bytes();
                let j = (pos * 7) % fin.len();
                fin[j] = byte;
                fin.truncate(fin.len() - cut);
                assert!(!matches!(ex.step(&fin), Step::Challenge(_)));
            }
        }
    }

    mod rsasl_peer {
        //! rsasl's client as an independent implementation (network-stack.md §3).
        use super::*;
        use rsasl::callback::{Context, Request, SessionCallback, SessionData};
        use rsasl::mechanisms::scram::{SCRAM_SHA1, SCRAM_SHA256, SCRAM_SHA256_PLUS};
        use rsasl::prelude::{
            ChannelBindingCallback, Mechname, Registry, SASLClient, SASLConfig, SessionError, State,
        };
        use rsasl::property::{AuthId, Password};

        /// Credentials of alice; `bind` makes rsasl's client select -PLUS mechanisms.
        struct Creds {
            bind: bool,
        }
        impl SessionCallback for Creds {
            fn enable_channel_binding(&self) -> bool {
                self.bind
            }
            fn callback(
                &self,
                _: &SessionData,
                _: &Context,
                request: &mut Request<'_>,
            ) -> Result<(), SessionError> {
                request
                    .satisfy::<AuthId>("alice")?
                    .satisfy::<Password>(b"pencil")?;
                Ok(())
            }
        }

        struct Binding(Vec<u8>);
        impl ChannelBindingCallback for Binding {
            fn get_cb_data(&self, cbname: &str) -> Option<&[u8]> {
                (cbname == "tls-exporter").then_some(&self.0[..])
            }
        }

        fn rsasl_exchange(ctx: &Arc<SaslContext>, ours: Mechanism, binding: Vec<u8>) -> Step {
            // Pitfall 2: the default registry lacks -PLUS, so name the mechanisms explicitly.
            let mechs =
                Box::leak(vec![SCRAM_SHA256_PLUS, SCRAM_SHA256, SCRAM_SHA1].into_boxed_slice());
            let config = SASLConfig::builder()
                .with_registry(Registry::with_mechanisms(mechs))
                .with_callback(Creds {
                    bind: ours.is_plus(),
                })
                .expect("config");
            let name = Mechname::parse(ours.name().as_bytes()).expect("mechname");
            let mut client = SASLClient::with_cb(config, Binding(binding))
                .start_suggested(&[name])
                .expect("client starts");
            let mut ex = Exchange::start(ours, ctx.clone()).expect("server starts");
            let mut out = Vec::new();
            client.step(None, &mut out).expect("client-first");
            let Step::Challenge(sf) = ex.step(&out) else {
                panic!("no server-first")
            };
            let mut out = Vec::new();
            client.step(Some(&sf), &mut out).expect("client-final");
            let step = ex.step(&out);
            if let Step::Success {
                additional_data: Some(v),
                ..
            } = &step
            {
                let state = client
                    .step(Some(v), &mut Vec::new())
                    .expect("client accepts v=");
                assert!(matches!(state, State::Finished(_)));
            }
            step
        }

        #[test]
        fn rsasl_client_authenticates_with_sha256_sha1_and_sha256_plus() {
            let plain = context(ChannelBindings::default(), None);
            assert!(success("alice")(&rsasl_exchange(
                &plain,
                Mechanism::ScramSha256,
                vec![]
            )));
            assert!(success("alice")(&rsasl_exchange(
                &plain,
                Mechanism::ScramSha1,
                vec![]
            )));
            let bound = context(exporter(), None);
            assert!(success("alice")(&rsasl_exchange(
                &bound,
                Mechanism::ScramSha256Plus,
                vec![0xAB; 32]
            )));
            assert_eq!(
                rsasl_exchange(&bound, Mechanism::ScramSha256Plus, vec![0xAC; 32]),
                NOT_AUTHORIZED
            );
        }
    }
}
