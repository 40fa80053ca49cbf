//! Server side of SASL for client streams (RFC 6120 §6): SCRAM-SHA-256(-PLUS) and SCRAM-SHA-1(-PLUS)
//! (RFC 5802, RFC 7677; channel bindings tls-exporter RFC 9266 and tls-server-end-point RFC 5929),
//! PLAIN (RFC 4616) and EXTERNAL (RFC 4422 App. A, XEP-0178).
//!
//! Role: from the client's (already base64-decoded) SASL messages and what the connection knows
//! (an account lookup, this TLS connection's channel bindings, the client certificate's identity),
//! decide which account authenticated, or which RFC 6120 §6.5 condition to answer.
//! Accounts hold SCRAM keys only, never a password (RFC 5802 §3).
//!
//! Must not: do I/O, base64 or XML (stream negotiation does), know how accounts are stored or how
//! names are normalised (the injected [`AccountLookup`] does), or let a client tell an unknown,
//! disabled or certificate-only account from a wrong password (decoy keys, see `credentials`).
//!
//! SCRAM is our own code on aws-lc-rs rather than rsasl's server (network-stack.md §3): rsasl answers
//! unknown users with `e=unknown-user` and a fresh random salt (pitfall 3), compares StoredKey with
//! `==` (pitfall 13), accepts `p=` on a non-PLUS mechanism, cannot see whether we offered -PLUS, and
//! panics when stepped again after an error. Those checks would have needed a GS2 parser of ours in
//! front of it anyway; rsasl's client is still used in the tests as an independent peer.

mod credentials;
mod external;
mod plain;
mod scram;

use std::sync::Arc;

pub use credentials::{
    Credentials, MAX_ITERATIONS, MIN_ITERATIONS, SALT_LEN, ScramKeys, derive_credentials,
    verify_password,
};

use scram::ScramServer;

/// Largest client message we parse. SCRAM and PLAIN messages are a few hundred bytes and a JID is at
/// most 3071 bytes (RFC 7622 §3.1), so anything larger is malformed, not worth parsing.
pub const MAX_CLIENT_MESSAGE: usize = 4096;

/// A SASL mechanism this server implements (RFC 4422 §3.1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// SCRAM-SHA-256 with channel binding (RFC 7677, RFC 5802 §6).
    ScramSha256Plus,
    /// SCRAM-SHA-256 without channel binding (RFC 7677).
    ScramSha256,
    /// SCRAM-SHA-1 with channel binding (RFC 5802 §6).
    ScramSha1Plus,
    /// SCRAM-SHA-1 without channel binding (RFC 5802).
    ScramSha1,
    /// PLAIN (RFC 4616): the password crosses the (TLS) channel; only offered after TLS.
    Plain,
    /// EXTERNAL (RFC 4422 App. A): the TLS client certificate authenticates (XEP-0178).
    External,
}

impl Mechanism {
    /// Every mechanism, strongest first.
    pub const ALL: [Mechanism; 6] = [
        Mechanism::External,
        Mechanism::ScramSha256Plus,
        Mechanism::ScramSha1Plus,
        Mechanism::ScramSha256,
        Mechanism::ScramSha1,
        Mechanism::Plain,
    ];

    /// The registered mechanism name, as sent in `<mechanism/>` and `<auth mechanism=…/>`.
    pub const fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha1Plus => "SCRAM-SHA-1-PLUS",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::Plain => "PLAIN",
            Mechanism::External => "EXTERNAL",
        }
    }

    /// The mechanism with this exact name; names are upper case (RFC 4422 §3.1), so no folding.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// True for the channel-binding variants (`-PLUS`).
    pub const fn is_plus(self) -> bool {
        matches!(self, Mechanism::ScramSha256Plus | Mechanism::ScramSha1Plus)
    }
}

/// Why an exchange failed: the RFC 6120 §6.5 conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslFailure {
    /// §6.5.1: the client sent `<abort/>`.
    #[error("aborted by the client")]
    Aborted,
    /// §6.5.2: the account is disabled (we never say so: disabled accounts look like wrong passwords).
    #[error("account disabled")]
    AccountDisabled,
    /// §6.5.3: the credentials have expired.
    #[error("credentials expired")]
    CredentialsExpired,
    /// §6.5.4: the mechanism needs an encrypted channel.
    #[error("encryption required")]
    EncryptionRequired,
    /// §6.5.5: bad base64 (the caller decodes it).
    #[error("incorrect encoding")]
    IncorrectEncoding,
    /// §6.5.6: the authzid is not one the authenticated identity may act as.
    #[error("invalid authzid")]
    InvalidAuthzid,
    /// §6.5.7: the mechanism is not offered on this connection.
    #[error("invalid mechanism")]
    InvalidMechanism,
    /// §6.5.8: the client message does not follow the mechanism's syntax.
    #[error("malformed request")]
    MalformedRequest,
    /// §6.5.9: the mechanism is weaker than policy allows.
    #[error("mechanism too weak")]
    MechanismTooWeak,
    /// §6.5.10: wrong credentials, unknown account, or a failed channel binding.
    #[error("not authorized")]
    NotAuthorized,
    /// §6.5.11: a temporary server-side error (here: the random generator failed).
    #[error("temporary authentication failure")]
    TemporaryAuthFailure,
}

impl SaslFailure {
    /// The child element name of `<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>`.
    pub const fn condition(&self) -> &'static str {
        match self {
            SaslFailure::Aborted => "aborted",
            SaslFailure::AccountDisabled => "account-disabled",
            SaslFailure::CredentialsExpired => "credentials-expired",
            SaslFailure::EncryptionRequired => "encryption-required",
            SaslFailure::IncorrectEncoding => "incorrect-encoding",
            SaslFailure::InvalidAuthzid => "invalid-authzid",
            SaslFailure::InvalidMechanism => "invalid-mechanism",
            SaslFailure::MalformedRequest => "malformed-request",
            SaslFailure::MechanismTooWeak => "mechanism-too-weak",
            SaslFailure::NotAuthorized => "not-authorized",
            SaslFailure::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

/// Errors of [`derive_credentials`] (provisioning, not a SASL exchange).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The iteration count is outside [`MIN_ITERATIONS`]..=[`MAX_ITERATIONS`].
    #[error("iteration count {0} outside {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations(u32),
    /// The password contains characters SASLprep prohibits (RFC 4013 §2.3–2.5).
    #[error("password rejected by SASLprep (RFC 4013)")]
    Saslprep,
    /// The password is empty after SASLprep.
    #[error("password is empty")]
    EmptyPassword,
    /// The system random generator failed while making a salt.
    #[error("system random generator failed")]
    Random,
}

/// What [`AccountLookup`] knows about an account that may log in.
#[derive(Clone)]
pub struct AccountAuth {
    /// The account's canonical localpart (as the lookup normalised it); returned on success.
    pub localpart: String,
    /// SCRAM keys; `None` for a certificate-only platform (it then looks like a wrong password).
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for AccountAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountAuth")
            .field("localpart", &self.localpart)
            .field("has_credentials", &self.credentials.is_some())
            .finish()
    }
}

/// The account store as SASL sees it.
pub trait AccountLookup: Send + Sync {
    /// The account for this localpart, normalised by the implementation (the caller's rules);
    /// `None` for an unknown, disabled or revoked account.
    fn lookup(&self, localpart: &str) -> Option<AccountAuth>;
}

impl<F> AccountLookup for F
where
    F: Fn(&str) -> Option<AccountAuth> + Send + Sync,
{
    fn lookup(&self, localpart: &str) -> Option<AccountAuth> {
        self(localpart)
    }
}

/// Channel-binding data of this TLS connection, computed by [`crate::tls`].
pub use crate::tls::ChannelBindings;

/// The identity in a client certificate the TLS layer accepted (chain and revocation checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// Bare JIDs from the id-on-xmppAddr SANs (RFC 6120 §13.7.1.4); other entries are ignored.
    pub xmpp_addrs: Vec<String>,
}

/// Everything one connection's SASL exchanges need; shared by `Arc`.
pub struct SaslContext {
    /// Our domain (the stream's `to`); authzids and certificate JIDs must be of it.
    pub domain: String,
    /// The account store.
    pub lookup: Arc<dyn AccountLookup>,
    /// This connection's channel bindings.
    pub bindings: ChannelBindings,
    /// The client certificate's identity, if a valid one was presented.
    pub cert: Option<CertIdentity>,
    /// Server secret for decoy salts and keys (stable across restarts, or decoy salts change).
    pub decoy_secret: [u8; 32],
    /// Iteration count of decoy keys; must equal the count real accounts use.
    pub decoy_iterations: u32,
    /// Set when the client tried -PLUS with a channel-binding type we do not have:
    /// its later `y` flag then reflects a type mismatch, not a stripped mechanism list.
    pub cb_type_unsupported: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SaslContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslContext")
            .field("domain", &self.domain)
            .field("bindings", &self.bindings)
            .field("cert", &self.cert)
            .field("decoy_iterations", &self.decoy_iterations)
            .finish_non_exhaustive()
    }
}

/// The mechanisms to advertise, strongest first: EXTERNAL only with a valid client certificate,
/// -PLUS only with a channel binding (RFC 5802 §6), PLAIN only if enabled (and only over TLS).
pub fn offered_mechanisms(
    ctx_has_cert: bool,
    plain_enabled: bool,
    bindings: &ChannelBindings,
) -> Vec<Mechanism> {
    Mechanism::ALL
        .into_iter()
        .filter(|m| match m {
            Mechanism::External => ctx_has_cert,
            Mechanism::Plain => plain_enabled,
            m if m.is_plus() => bindings.any(),
            _ => true,
        })
        .collect()
}

/// One step's outcome, to be sent as `<challenge/>`, `<success/>` or `<failure/>` (RFC 6120 §6.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send a challenge with this data and wait for the next `<response/>`.
    Challenge(Vec<u8>),
    /// Authenticated: the exchange is over.
    Success {
        /// The authenticated account's canonical localpart.
        localpart: String,
        /// Additional data with success (SCRAM server-final `v=…`, RFC 6120 §6.3.10).
        additional_data: Option<Vec<u8>>,
    },
    /// Failed: the exchange is over.
    Failure(SaslFailure),
}

/// One SASL exchange on one connection.
///
/// All our mechanisms are client-first: if `<auth/>` carried no initial response, send an empty
/// challenge and feed the next response to [`Exchange::step`] (RFC 6120 §6.4.2). A PLAIN step costs
/// one PBKDF2 (0.45 ms at 4096 iterations, release), so run it on a blocking thread; a whole
/// SCRAM exchange costs the server about 3 µs.
#[derive(Debug)]
pub struct Exchange {
    ctx: Arc<SaslContext>,
    state: ExchangeState,
    /// The account name the client tried, once known (for per-account throttling).
    attempted: Option<String>,
}

#[derive(Debug)]
enum ExchangeState {
    Scram(Box<ScramServer>),
    Plain,
    External,
    /// Success or failure was returned; further steps fail.
    Done,
}

impl Exchange {
    /// Starts an exchange. Refuses a mechanism this context cannot serve (-PLUS without channel
    /// binding, EXTERNAL without a client certificate); the caller must also refuse any mechanism
    /// it did not offer (e.g. PLAIN when disabled).
    pub fn start(mech: Mechanism, ctx: Arc<SaslContext>) -> Result<Self, SaslFailure> {
        let state = match mech {
            Mechanism::External if ctx.cert.is_none() => return Err(SaslFailure::InvalidMechanism),
            Mechanism::External => ExchangeState::External,
            Mechanism::Plain => ExchangeState::Plain,
            m if m.is_plus() && !ctx.bindings.any() => return Err(SaslFailure::InvalidMechanism),
            Mechanism::ScramSha256Plus => {
                ExchangeState::Scram(ScramServer::new(credentials::Hash::Sha256, true))
            }
            Mechanism::ScramSha256 => {
                ExchangeState::Scram(ScramServer::new(credentials::Hash::Sha256, false))
            }
            Mechanism::ScramSha1Plus => {
                ExchangeState::Scram(ScramServer::new(credentials::Hash::Sha1, true))
            }
            Mechanism::ScramSha1 => {
                ExchangeState::Scram(ScramServer::new(credentials::Hash::Sha1, false))
            }
        };
        Ok(Self { ctx, state, attempted: None })
    }

    /// Feeds one client message (base64-decoded; empty for `=`) and returns what to answer.
    /// After `Success` or `Failure` every further step fails with `malformed-request`.
    pub fn step(&mut self, client_data: &[u8]) -> Step {
        let state = std::mem::replace(&mut self.state, ExchangeState::Done);
        if client_data.len() > MAX_CLIENT_MESSAGE {
            return Step::Failure(SaslFailure::MalformedRequest);
        }
        if self.attempted.is_none() {
            self.attempted = match &state {
                ExchangeState::Scram(_) => scram::attempted_name(client_data),
                ExchangeState::Plain => plain::attempted_name(client_data),
                ExchangeState::External | ExchangeState::Done => None,
            };
        }
        match state {
            ExchangeState::Scram(mut server) => {
                let step = server.step(&self.ctx, client_data);
                if matches!(step, Step::Challenge(_)) {
                    self.state = ExchangeState::Scram(server);
                }
                step
            }
            ExchangeState::Plain => plain::step(&self.ctx, client_data),
            ExchangeState::External => external::step(&self.ctx, client_data),
            ExchangeState::Done => Step::Failure(SaslFailure::MalformedRequest),
        }
    }
}

impl Exchange {
    /// The account name the client tried (SCRAM `n=`, PLAIN authcid), once a message named it.
    pub fn authcid(&self) -> Option<String> {
        self.attempted.clone()
    }
}

/// True if `authzid` is the bare JID `localpart@domain` (RFC 6120 §6.3.8), comparing case-insensitively
/// as the caller's normalisation would (UsernameCaseMapped localpart, case-insensitive domain).
fn authzid_names(authzid: &str, localpart: &str, domain: &str) -> bool {
    match split_bare_jid(authzid) {
        Some((local, dom)) => same_caseless(local, localpart) && same_domain(dom, domain),
        None => false,
    }
}

/// Splits a bare JID into (localpart, domainpart); `None` for a full JID, a domain-only JID or junk.
fn split_bare_jid(jid: &str) -> Option<(&str, &str)> {
    if jid.contains('/') {
        return None;
    }
    let (local, domain) = jid.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return None;
    }
    Some((local, domain))
}

/// Case-insensitive comparison without allocating (Unicode simple lower-casing).
fn same_caseless(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// Domain comparison: case-insensitive, ignoring one trailing dot (RFC 7622 §3.2).
fn same_domain(a: &str, b: &str) -> bool {
    same_caseless(
        a.strip_suffix('.').unwrap_or(a),
        b.strip_suffix('.').unwrap_or(b),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Iterations used by test accounts and decoys (the RFC 7677 minimum).
    pub const ITER: u32 = 4096;
    pub const DOMAIN: &str = "grid.test";

    /// A context with accounts `alice`/`pencil`, `bob`/`correct horse` and certificate-only
    /// `sensor1`; lookup lower-cases names (the stand-in for the caller's normalisation).
    pub fn context(bindings: ChannelBindings, cert: Option<CertIdentity>) -> Arc<SaslContext> {
        let mut accounts: HashMap<String, Option<Credentials>> = HashMap::new();
        for (name, password) in [("alice", "pencil"), ("bob", "correct horse")] {
            let creds = derive_credentials(password, ITER).expect("test password derives");
            accounts.insert(name.to_owned(), Some(creds));
        }
        accounts.insert("sensor1".to_owned(), None);
        let lookup = move |name: &str| {
            let canonical = name.to_lowercase();
            accounts.get(&canonical).map(|creds| AccountAuth {
                localpart: canonical.clone(),
                credentials: creds.clone(),
            })
        };
        Arc::new(SaslContext {
            domain: DOMAIN.to_owned(),
            lookup: Arc::new(lookup),
            bindings,
            cert,
            decoy_secret: [7; 32],
            decoy_iterations: ITER,
            cb_type_unsupported: Default::default(),
        })
    }

    pub fn exporter() -> ChannelBindings {
        ChannelBindings {
            tls_exporter: Some(vec![0xAB; 32]),
            tls_server_end_point: None,
        }
    }

    #[test]
    fn mechanism_names_round_trip_and_unknown_names_are_refused() {
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::from_name(m.name()), Some(m));
        }
        assert_eq!(Mechanism::from_name("scram-sha-256"), None);
        assert_eq!(Mechanism::from_name("DIGEST-MD5"), None);
    }

    #[test]
    fn plus_and_external_are_offered_only_when_the_connection_supports_them() {
        let none = ChannelBindings::default();
        assert_eq!(
            offered_mechanisms(false, false, &none),
            vec![Mechanism::ScramSha256, Mechanism::ScramSha1]
        );
        let all = offered_mechanisms(true, true, &exporter());
        assert_eq!(all, Mechanism::ALL.to_vec());
        assert!(!offered_mechanisms(false, true, &exporter()).contains(&Mechanism::External));
    }

    #[test]
    fn start_refuses_plus_without_binding_and_external_without_certificate() {
        let ctx = context(ChannelBindings::default(), None);
        assert_eq!(
            Exchange::start(Mechanism::ScramSha256Plus, ctx.clone()).err(),
            Some(SaslFailure::InvalidMechanism)
        );
        assert_eq!(
            Exchange::start(Mechanism::External, ctx).err(),
            Some(SaslFailure::InvalidMechanism)
        );
    }

    #[test]
    fn conditions_are_the_rfc_6120_element_names() {
        assert_eq!(SaslFailure::NotAuthorized.condition(), "not-authorized");
        assert_eq!(SaslFailure::InvalidAuthzid.condition(), "invalid-authzid");
        assert_eq!(
            SaslFailure::TemporaryAuthFailure.condition(),
            "temporary-auth-failure"
        );
    }

    #[test]
    fn exchange_is_send_and_static_for_spawn_blocking() {
        fn assert_send_static<T: Send + 'static>() {}
        assert_send_static::<Exchange>();
    }

    #[test]
    fn oversized_message_fails_and_the_exchange_stays_failed() {
        let mut ex = Exchange::start(Mechanism::Plain, context(exporter(), None)).expect("starts");
        let huge = vec![b'a'; MAX_CLIENT_MESSAGE + 1];
        assert_eq!(ex.step(&huge), Step::Failure(SaslFailure::MalformedRequest));
        assert_eq!(
            ex.step(b"\0alice\0pencil"),
            Step::Failure(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn authzid_comparison_is_caseless_and_needs_a_bare_jid_of_our_domain() {
        assert!(authzid_names("Alice@GRID.test", "alice", DOMAIN));
        assert!(authzid_names("alice@grid.test.", "alice", DOMAIN));
        assert!(!authzid_names("alice@grid.test/res", "alice", DOMAIN));
        assert!(!authzid_names("alice@other.test", "alice", DOMAIN));
        assert!(!authzid_names("grid.test", "alice", DOMAIN));
        assert!(!authzid_names("mallory@grid.test", "alice", DOMAIN));
    }

    /// Release measurements: `cargo test --release -- --ignored --nocapture measure_`.
    #[test]
    #[ignore = "measurement; run in release with --nocapture"]
    fn measure_derive_credentials_and_sasl_exchanges() {
        use std::time::Instant;
        let n = 200u32;
        let t = Instant::now();
        for i in 0..n {
            derive_credentials(&format!("password-{i}"), ITER).expect("derives");
        }
        let per = t.elapsed() / n;
        println!(
            "derive_credentials (SHA-1 + SHA-256, {ITER} iterations): {per:?} per account; \
             100,000 accounts on 2 cores: {:.1} s",
            per.as_secs_f64() * 100_000.0 / 2.0
        );

        let iter = std::num::NonZeroU32::new(ITER).expect("nonzero");
        for hash in [credentials::Hash::Sha1, credentials::Hash::Sha256] {
            let t = Instant::now();
            for _ in 0..n {
                hash.keys_from_password("pencil", vec![0; SALT_LEN], iter);
            }
            println!("  of which {hash:?} record: {:?}", t.elapsed() / n);
        }
        // Two provisioning threads, as a bulk import on 2 cores would run.
        let per_thread = 500u32;
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for i in 0..per_thread {
                        derive_credentials(&format!("password-{i}"), ITER).expect("derives");
                    }
                });
            }
        });
        let rate = f64::from(2 * per_thread) / t.elapsed().as_secs_f64();
        println!(
            "derive_credentials on 2 threads: {rate:.0} accounts/s; 100,000 accounts: {:.1} s",
            100_000.0 / rate
        );

        let creds = derive_credentials("pencil", ITER).expect("derives");
        let t = Instant::now();
        for _ in 0..n {
            assert!(verify_password(&creds, "pencil"));
        }
        println!("verify_password (PLAIN check): {:?}", t.elapsed() / n);

        let ctx = context(ChannelBindings::default(), None);
        let mut server_time = std::time::Duration::ZERO;
        for _ in 0..n {
            let client = scram::tests::Client::new(credentials::Hash::Sha256, "alice", "pencil");
            let t = Instant::now();
            let mut ex = Exchange::start(Mechanism::ScramSha256, ctx.clone()).expect("starts");
            let Step::Challenge(first) = ex.step(client.first().as_bytes()) else {
                panic!("no server-first")
            };
            server_time += t.elapsed();
            let (fin, _) = client.final_message(&first);
            let t = Instant::now();
            let step = ex.step(fin.as_bytes());
            server_time += t.elapsed();
            assert!(matches!(step, Step::Success { .. }));
        }
        println!(
            "SCRAM-SHA-256 server side of one exchange: {:?}",
            server_time / n
        );
    }
}
