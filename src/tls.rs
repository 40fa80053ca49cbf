//! rustls server configuration, client-certificate identity and channel bindings.
//!
//! - [`server_config`] builds a TLS 1.3 + 1.2 config (draft-ietf-mile-xmpp-grid §8.3.1:
//!   TLS ≥ 1.2) with an *optional* client certificate checked against the client CAs and
//!   their CRLs, Extended Master Secret required on TLS 1.2 (RFC 7627, so that
//!   tls-exporter is sound, RFC 9266 §3), and fresh resumption state on every call.
//! - [`peer_identity`] reads the xmppAddr (RFC 6120 §13.7.1.4), CN and serial of the
//!   verified client certificate for SASL EXTERNAL (XEP-0178).
//! - [`channel_bindings`] computes tls-exporter (RFC 9266) and tls-server-end-point
//!   (RFC 5929 §4) for SCRAM-*-PLUS, and what XEP-0440 should advertise.
//!
//! Revocation policy. Every client CA must come with a CRL (checked when the config is
//! built: a CA without one is a config error, not a silent "everyone refused"). Status is
//! checked for the whole chain, unknown status is an error, and an **expired CRL**
//! (nextUpdate passed) **refuses every certificate of that CA** (fail closed,
//! `enforce_revocation_expiration`). A refused certificate aborts the handshake; the
//! platform can reconnect without a certificate and use SCRAM. The controller keeps its
//! own CRL fresh with `pki::write_crl` and must rebuild the config after each write.
//!
//! Resumption: a resumed session skips certificate verification and keeps the original
//! client certificate (network-stack notes, pitfall 6). Each [`server_config`] call gets
//! its own session cache and ticket keys, so sessions from a config built before a
//! revocation cannot be resumed on the rebuilt one. Live EXTERNAL sessions must still be
//! re-checked by the caller after a CRL change.
//!
//! This module must not: decide which JID a certificate maps to (SASL/XEP-0178 code
//! does), do I/O other than reading the configured PEM files, or build XML.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{ProtocolVersion, RootCertStore, ServerConfig, ServerConnection};
use x509_parser::asn1_rs::{Any, FromDer, Tag, TaggedExplicit};
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry as oids;
use x509_parser::signature_algorithm::SignatureAlgorithm;

use crate::pki::{XMPP_ADDR_OID, hex};

/// RFC 9266 §2: exporter label of the tls-exporter channel binding.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// RFC 9266 §2: length of the tls-exporter value.
pub const TLS_EXPORTER_LEN: usize = 32;
/// XEP-0440 namespace of the `<sasl-channel-binding/>` stream feature.
pub const XEP_0440_NS: &str = "urn:xmpp:sasl-cb:0";
/// XEP-0368 ALPN protocol id for direct TLS client connections.
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// TLS 1.2 session IDs cached for resumption, per config. TLS 1.3 (and TLS 1.2 clients
/// that support tickets) use stateless tickets instead, which cost the server nothing.
const SESSION_CACHE_ENTRIES: usize = 1024;
/// One TLS 1.3 ticket per handshake: platforms reconnect one connection at a time, and
/// each resumption hands out a new ticket.
const TLS13_TICKETS: usize = 1;
/// Cap on plaintext queued for sending on one connection before rustls refuses more.
/// rustls's default is 64 KiB; our own outbound queue already bounds what a session may
/// have pending, so this only needs to hold one large stanza. Apply with
/// [`tune_connection`] (e.g. in `TlsAcceptor::accept_with`).
pub const SEND_BUFFER_LIMIT: usize = 16 * 1024;

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{path}: no certificate found")]
    NoCertificate {
        /// The file concerned.
        path: PathBuf,
    },
    /// A client CA has no CRL among `crl_pems`, so every certificate it issued would be
    /// refused with "unknown revocation status".
    #[error("client CA {subject} (from {path}) has no CRL among the configured CRL files")]
    MissingCrl {
        /// The CA file.
        path: PathBuf,
        /// The CA subject, for the operator.
        subject: String,
    },
    /// The client certificate verifier could not be built (e.g. an unparsable CRL).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration (e.g. key not matching the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Our certificate chain, leaf first (PEM).
    pub cert_chain_pem: PathBuf,
    /// Our private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key_pem: PathBuf,
    /// CAs whose client certificates we accept: the grid CA plus configured ones. Empty:
    /// client certificates are not requested.
    pub client_ca_pems: Vec<PathBuf>,
    /// CRLs, at least one per client CA.
    pub crl_pems: Vec<PathBuf>,
}

/// A built server configuration with what channel binding needs from it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls configuration; share it among connections until the next reload.
    pub config: Arc<ServerConfig>,
    /// DER of our leaf certificate, for [`channel_bindings`].
    pub leaf_der: CertificateDer<'static>,
}

/// Builds a fresh server config; see [`server_tls`].
pub fn server_config(s: &TlsSettings, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(server_tls(s, alpn)?.config)
}

/// Builds a fresh server config and keeps our leaf certificate next to it.
///
/// `alpn`: `[ALPN_XMPP_CLIENT]` for direct TLS (XEP-0368), empty for STARTTLS. A client
/// offering ALPN without `xmpp-client` is then refused; a client offering none is accepted.
pub fn server_tls(s: &TlsSettings, alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = load_certs(&s.cert_chain_pem)?;
    let leaf_der = chain
        .first()
        .cloned()
        .ok_or_else(|| TlsError::NoCertificate {
            path: s.cert_chain_pem.clone(),
        })?;
    let key = PrivateKeyDer::from_pem_file(&s.key_pem).map_err(|e| pem_err(&s.key_pem, e))?;

    let verifier = if s.client_ca_pems.is_empty() {
        WebPkiClientVerifier::no_client_auth()
    } else {
        client_verifier(s, provider.clone())?
    };

    // rustls has no TLS 1.0/1.1 code; we list 1.2 explicitly so a future default change
    // does not silently drop it.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // RFC 7627 + RFC 9266 §3: without EMS, a TLS 1.2 exporter is not a secure channel
    // binding; refuse such clients instead of offering a weak binding.
    config.require_ems = true;
    // Pitfall 6: never share resumption state with a previous config.
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = TLS13_TICKETS;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(ServerTls {
        config: Arc::new(config),
        leaf_der,
    })
}

/// Per-connection settings the config cannot carry; call on every accepted connection.
pub fn tune_connection(conn: &mut ServerConnection) {
    conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
}

fn client_verifier(
    s: &TlsSettings,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut ca_subjects = Vec::new();
    for path in &s.client_ca_pems {
        let certs = load_certs(path)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { path: path.clone() });
        }
        for cert in certs {
            let (_, parsed) =
                x509_parser::parse_x509_certificate(&cert).map_err(|e| pem_err(path, e))?;
            ca_subjects.push((
                path.clone(),
                parsed.subject().as_raw().to_vec(),
                parsed.subject().to_string(),
            ));
            roots.add(cert)?;
        }
    }

    let mut crls = Vec::new();
    let mut crl_issuers = Vec::new();
    let now = x509_parser::time::ASN1Time::now();
    for path in &s.crl_pems {
        let iter =
            CertificateRevocationListDer::pem_file_iter(path).map_err(|e| pem_err(path, e))?;
        for crl in iter {
            let crl = crl.map_err(|e| pem_err(path, e))?;
            let (_, parsed) = x509_parser::parse_x509_crl(&crl).map_err(|e| pem_err(path, e))?;
            if parsed.next_update().is_some_and(|t| t <= now) {
                // Fail closed (module docs); say so loudly, the server still starts so
                // that password logins keep working.
                tracing::warn!(crl = %path.display(), issuer = %parsed.issuer(),
                    "CRL has expired: every client certificate of this CA will be refused");
            }
            crl_issuers.push(parsed.issuer().as_raw().to_vec());
            crls.push(crl);
        }
    }
    for (path, subject_der, subject) in ca_subjects {
        if !crl_issuers.contains(&subject_der) {
            return Err(TlsError::MissingCrl { path, subject });
        }
    }

    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .enforce_revocation_expiration()
            .allow_unauthenticated()
            .build()?,
    )
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// What the client certificate says about its holder (already verified by rustls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SAN otherName id-on-xmppAddr values, in certificate order, as written (not yet
    /// normalised: the caller runs them through the JID code).
    pub xmpp_addrs: Vec<String>,
    /// First subject CN, for the optional CN fallback of XEP-0178.
    pub common_name: Option<String>,
    /// Serial, lowercase hex without leading zero bytes (as `pki::normalize_serial_hex`).
    pub serial_hex: String,
}

/// The identity in the peer's leaf certificate, or None without a certificate.
///
/// After resumption this is still the certificate of the original handshake (rustls keeps
/// it in the session), which is why configs are rebuilt after a revocation.
pub fn peer_identity(conn: &ServerConnection) -> Option<PeerIdentity> {
    identity_from_der(conn.peer_certificates()?.first()?)
}

/// [`peer_identity`] from a DER certificate. A malformed xmppAddr is skipped, not fatal.
pub fn identity_from_der(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut xmpp_addrs = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::OtherName(oid, value) = name {
                let is_xmpp_addr = oid
                    .iter()
                    .is_some_and(|arcs| arcs.eq(XMPP_ADDR_OID.iter().copied()));
                if let Some(addr) = is_xmpp_addr.then(|| decode_xmpp_addr(value)).flatten() {
                    xmpp_addrs.push(addr);
                }
            }
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Some(PeerIdentity {
        xmpp_addrs,
        common_name,
        serial_hex: hex(cert.raw_serial()),
    })
}

/// RFC 6120 §13.7.1.4: `XmppAddr ::= UTF8String`, carried in otherName as
/// `[0] EXPLICIT`; x509-parser leaves that tag on the value.
fn decode_xmpp_addr(value: &[u8]) -> Option<String> {
    let (rest, tagged) =
        TaggedExplicit::<Any, x509_parser::asn1_rs::Error, 0>::from_der(value).ok()?;
    let inner = tagged.into_inner();
    if !rest.is_empty() || inner.tag() != Tag::Utf8String {
        return None;
    }
    String::from_utf8(inner.data.to_vec()).ok()
}

/// Channel-binding data of one connection, for SCRAM-*-PLUS (RFC 5802 §6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelBindings {
    /// RFC 9266 tls-exporter: 32 bytes, label `EXPORTER-Channel-Binding`, empty context.
    /// On TLS 1.2 sound only with EMS, which [`server_config`] requires of every client.
    pub tls_exporter: Option<Vec<u8>>,
    /// RFC 5929 §4.1 tls-server-end-point: hash of our leaf certificate.
    pub tls_server_end_point: Option<Vec<u8>>,
}

impl ChannelBindings {
    /// True if at least one binding is available, i.e. -PLUS mechanisms are offered.
    pub fn any(&self) -> bool {
        self.tls_exporter.is_some() || self.tls_server_end_point.is_some()
    }

    /// The channel-binding type names to list in XEP-0440 `<sasl-channel-binding/>`
    /// (one `<channel-binding type=…/>` each), best first. tls-unique is never listed:
    /// rustls does not provide it and it is undefined on TLS 1.3 (RFC 9266 §1).
    pub fn advertised_types(&self) -> Vec<&'static str> {
        let mut types = Vec::with_capacity(2);
        if self.tls_exporter.is_some() {
            types.push("tls-exporter");
        }
        if self.tls_server_end_point.is_some() {
            types.push("tls-server-end-point");
        }
        types
    }

    /// The data for a channel-binding type named by the client (`p=<type>` in GS2).
    pub fn get(&self, cb_type: &str) -> Option<&[u8]> {
        match cb_type {
            "tls-exporter" => self.tls_exporter.as_deref(),
            "tls-server-end-point" => self.tls_server_end_point.as_deref(),
            _ => None,
        }
    }
}

/// Channel bindings of a connection whose handshake is complete; `server_cert_der` is our
/// leaf ([`ServerTls::leaf_der`]).
pub fn channel_bindings(conn: &ServerConnection, server_cert_der: &[u8]) -> ChannelBindings {
    let tls_exporter = if conn.is_handshaking() {
        None
    } else {
        // RFC 9266 §2 says "empty context". On TLS 1.3 that equals no context; on 1.2
        // (RFC 5705) they differ, and we follow the RFC text: `Some(&[])`.
        conn.export_keying_material(vec![0u8; TLS_EXPORTER_LEN], TLS_EXPORTER_LABEL, Some(&[]))
            .ok()
    };
    ChannelBindings {
        tls_exporter,
        tls_server_end_point: tls_server_end_point(server_cert_der),
    }
}

/// RFC 5929 §4.1: hash of the certificate DER with the hash of its signature algorithm;
/// MD5 and SHA-1 are replaced by SHA-256. None when the algorithm has no single hash
/// (Ed25519, Ed448) or is unknown (RFC 5929 leaves it undefined).
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let alg_id = &cert.signature_algorithm;
    let alg = &alg_id.algorithm;
    let hash = if *alg == oids::OID_SIG_ECDSA_WITH_SHA256
        || *alg == oids::OID_PKCS1_SHA256WITHRSA
        || *alg == oids::OID_PKCS1_SHA1WITHRSA
        || *alg == oids::OID_PKCS1_MD5WITHRSAENC
        || alg.to_id_string() == ECDSA_WITH_SHA1
        || *alg == oids::OID_SIG_DSA_WITH_SHA1
    {
        &digest::SHA256
    } else if *alg == oids::OID_SIG_ECDSA_WITH_SHA384 || *alg == oids::OID_PKCS1_SHA384WITHRSA {
        &digest::SHA384
    } else if *alg == oids::OID_SIG_ECDSA_WITH_SHA512 || *alg == oids::OID_PKCS1_SHA512WITHRSA {
        &digest::SHA512
    } else if *alg == oids::OID_SIG_ECDSA_WITH_SHA224 || *alg == oids::OID_PKCS1_SHA224WITHRSA {
        &digest::SHA224
    } else if let Ok(SignatureAlgorithm::RSASSA_PSS(params)) = SignatureAlgorithm::try_from(alg_id)
    {
        let h = params.hash_algorithm_oid();
        if *h == oids::OID_NIST_HASH_SHA256 || *h == oids::OID_HASH_SHA1 {
            &digest::SHA256
        } else if *h == oids::OID_NIST_HASH_SHA384 {
            &digest::SHA384
        } else if *h == oids::OID_NIST_HASH_SHA512 {
            &digest::SHA512
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(digest::digest(hash, cert_der).as_ref().to_vec())
}

/// ecdsa-with-SHA1 (RFC 5758 §3.2), absent from oid-registry.
const ECDSA_WITH_SHA1: &str = "1.2.840.10045.4.1";

/// Protocol version name for logs and audit records.
pub fn tls_version_name(conn: &ServerConnection) -> &'static str {
    match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::test_support::TestDir;
    use crate::pki::{self, IssuedCert, PkiPaths};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, SupportedProtocolVersion};

    const DOMAIN: &str = "grid.test";

    struct Grid {
        dir: TestDir,
        paths: PkiPaths,
    }

    impl Grid {
        fn new() -> Self {
            let dir = TestDir::new();
            let paths = pki::ensure_ca_and_server(dir.path(), DOMAIN, &[]).expect("pki");
            Self { dir, paths }
        }

        fn settings(&self) -> TlsSettings {
            TlsSettings {
                cert_chain_pem: self.paths.server_cert.clone(),
                key_pem: self.paths.server_key.clone(),
                client_ca_pems: vec![self.paths.ca_cert.clone()],
                crl_pems: vec![self.paths.crl.clone()],
            }
        }

        fn server(&self) -> ServerTls {
            server_tls(&self.settings(), &[]).expect("server config")
        }

        fn issue(&self, jid: &str) -> IssuedCert {
            pki::issue_client_cert(self.dir.path(), jid, 30).expect("issue")
        }

        fn client(
            &self,
            version: &'static SupportedProtocolVersion,
            cert: Option<&IssuedCert>,
        ) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots
                .add(load_certs(&self.paths.ca_cert).expect("ca").remove(0))
                .expect("root");
            let builder = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots);
            let config = match cert {
                None => builder.with_no_client_auth(),
                Some(c) => builder
                    .with_client_auth_cert(
                        vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).expect("cert")],
                        PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key"),
                    )
                    .expect("client auth"),
            };
            Arc::new(config)
        }
    }

    /// Runs a handshake in memory, then lets post-handshake messages (TLS 1.3 tickets)
    /// reach the client. Returns the first error of either side.
    fn connect(
        client: &Arc<ClientConfig>,
        server: &Arc<ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from(DOMAIN).expect("name");
        let mut c = ClientConnection::new(client.clone(), name)?;
        let mut s = ServerConnection::new(server.clone())?;
        for _ in 0..20 {
            let mut progressed = false;
            while c.wants_write() {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).expect("client write");
                s.read_tls(&mut buf.as_slice()).expect("server read");
                s.process_new_packets()?;
                progressed = true;
            }
            while s.wants_write() {
                let mut buf = Vec::new();
                s.write_tls(&mut buf).expect("server write");
                c.read_tls(&mut buf.as_slice()).expect("client read");
                c.process_new_packets()?;
                progressed = true;
            }
            if !progressed && !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    fn both_versions() -> [&'static SupportedProtocolVersion; 2] {
        [&rustls::version::TLS13, &rustls::version::TLS12]
    }

    #[test]
    fn client_certificate_is_accepted_and_its_identity_read_on_both_versions() {
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        let server = grid.server();
        for v in both_versions() {
            let (_c, s) =
                connect(&grid.client(v, Some(&issued)), &server.config).expect("handshake");
            let id = peer_identity(&s).expect("identity");
            assert_eq!(id.xmpp_addrs, ["platform1@grid.test"]);
            assert_eq!(id.common_name.as_deref(), Some("platform1@grid.test"));
            assert_eq!(id.serial_hex, issued.serial_hex);
            assert_eq!(
                tls_version_name(&s),
                if v.version == ProtocolVersion::TLSv1_3 {
                    "TLSv1.3"
                } else {
                    "TLSv1.2"
                }
            );
        }
    }

    #[test]
    fn connection_without_client_certificate_is_accepted_without_identity() {
        let grid = Grid::new();
        let server = grid.server();
        for v in both_versions() {
            let (_c, s) = connect(&grid.client(v, None), &server.config).expect("handshake");
            assert_eq!(peer_identity(&s), None);
        }
    }

    #[test]
    fn revoked_certificate_is_refused_by_a_new_config_but_was_accepted_before() {
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        let other = grid.issue("platform2@grid.test");
        let before = grid.server();
        for v in both_versions() {
            assert!(connect(&grid.client(v, Some(&issued)), &before.config).is_ok());
        }
        pki::write_crl(grid.dir.path(), std::slice::from_ref(&issued.serial_hex), 7).expect("crl");
        let after = grid.server();
        for v in both_versions() {
            let err = connect(&grid.client(v, Some(&issued)), &after.config).expect_err("revoked");
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
                ),
                "{err:?}"
            );
            assert!(connect(&grid.client(v, Some(&other)), &after.config).is_ok());
        }
    }

    #[test]
    fn session_resumed_before_revocation_is_not_resumed_on_the_rebuilt_config() {
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        for v in both_versions() {
            let before = grid.server();
            // One ClientConfig = one client session cache, as a real client reconnecting.
            let client = grid.client(v, Some(&issued));
            connect(&client, &before.config).expect("first");
            let (_c, s) = connect(&client, &before.config).expect("second");
            assert_eq!(
                s.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{v:?} must resume"
            );

            pki::write_crl(grid.dir.path(), std::slice::from_ref(&issued.serial_hex), 7)
                .expect("crl");
            let after = grid.server();
            let err = connect(&client, &after.config).expect_err("must not resume");
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
                ),
                "{v:?}: {err:?}"
            );
            pki::write_crl(grid.dir.path(), &[], 7).expect("clear crl");
        }
    }

    /// The control for the test above: what pitfall 6 is about, so it can be seen to fail.
    #[test]
    fn sharing_resumption_state_with_the_old_config_would_resume_a_revoked_certificate() {
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        for v in both_versions() {
            let before = grid.server();
            let client = grid.client(v, Some(&issued));
            connect(&client, &before.config).expect("first");
            pki::write_crl(grid.dir.path(), std::slice::from_ref(&issued.serial_hex), 7)
                .expect("crl");
            let mut shared = (*grid.server().config).clone();
            shared.session_storage = before.config.session_storage.clone();
            shared.ticketer = before.config.ticketer.clone();
            let (_c, s) = connect(&client, &Arc::new(shared)).expect("resumed despite revocation");
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Resumed), "{v:?}");
            pki::write_crl(grid.dir.path(), &[], 7).expect("clear crl");
        }
    }

    #[test]
    fn expired_crl_refuses_client_certificates_but_not_password_clients() {
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        let now = x509_parser::time::ASN1Time::now().timestamp();
        pki::write_crl_at(grid.dir.path(), &[], now - 2 * 86_400, now - 86_400).expect("crl");
        let server = grid.server();
        let err = connect(
            &grid.client(&rustls::version::TLS13, Some(&issued)),
            &server.config,
        )
        .expect_err("expired CRL");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredRevocationList
                        | rustls::CertificateError::ExpiredRevocationListContext { .. }
                )
            ),
            "{err:?}"
        );
        assert!(connect(&grid.client(&rustls::version::TLS13, None), &server.config).is_ok());
    }

    #[test]
    fn client_ca_without_a_crl_is_a_config_error() {
        let grid = Grid::new();
        let mut settings = grid.settings();
        settings.crl_pems.clear();
        assert!(matches!(
            server_config(&settings, &[]),
            Err(TlsError::MissingCrl { .. })
        ));
    }

    #[test]
    fn without_client_cas_no_certificate_is_requested() {
        let grid = Grid::new();
        let mut settings = grid.settings();
        settings.client_ca_pems.clear();
        let server = server_config(&settings, &[]).expect("config");
        let issued = grid.issue("platform1@grid.test");
        let (_c, s) = connect(
            &grid.client(&rustls::version::TLS13, Some(&issued)),
            &server,
        )
        .expect("handshake");
        assert_eq!(peer_identity(&s), None);
    }

    #[test]
    fn channel_bindings_match_on_both_ends_for_tls13_and_tls12() {
        let grid = Grid::new();
        let server = grid.server();
        let mut exporters = Vec::new();
        for v in both_versions() {
            let (c, s) = connect(&grid.client(v, None), &server.config).expect("handshake");
            let ours = channel_bindings(&s, &server.leaf_der);
            let client_exporter = c
                .export_keying_material(vec![0u8; 32], TLS_EXPORTER_LABEL, Some(&[]))
                .expect("client exporter");
            let seen_by_client = &c.peer_certificates().expect("server cert")[0];
            assert_eq!(
                ours.tls_exporter.as_deref(),
                Some(client_exporter.as_slice()),
                "{v:?}"
            );
            assert_eq!(
                ours.tls_server_end_point,
                tls_server_end_point(seen_by_client),
                "{v:?}"
            );
            assert_eq!(
                ours.advertised_types(),
                ["tls-exporter", "tls-server-end-point"]
            );
            assert_eq!(ours.get("tls-exporter"), Some(client_exporter.as_slice()));
            assert_eq!(ours.get("tls-unique"), None);
            exporters.push(client_exporter);
        }
        assert_ne!(
            exporters[0], exporters[1],
            "each connection has its own exporter"
        );
    }

    #[test]
    fn tls_server_end_point_is_sha256_for_ecdsa_p256_and_absent_for_ed25519() {
        let grid = Grid::new();
        let leaf = grid.server().leaf_der;
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf);
        assert_eq!(
            tls_server_end_point(&leaf).as_deref(),
            Some(expected.as_ref())
        );

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let ed = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(tls_server_end_point(ed.der()), None);
    }

    #[test]
    fn channel_bindings_are_empty_before_the_handshake_completes() {
        let grid = Grid::new();
        let server = grid.server();
        let s = ServerConnection::new(server.config.clone()).expect("conn");
        let cb = channel_bindings(&s, &server.leaf_der);
        assert_eq!(cb.tls_exporter, None);
        assert_eq!(cb.advertised_types(), ["tls-server-end-point"]);
    }

    /// A minimal TLS 1.2 ClientHello (ECDHE-ECDSA-AES128-GCM-SHA256, P-256/X25519),
    /// optionally with the extended_master_secret extension (RFC 7627 §5.1).
    fn tls12_client_hello(with_ems: bool) -> Vec<u8> {
        fn ext(out: &mut Vec<u8>, typ: u16, body: &[u8]) {
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(body);
        }
        let mut exts = Vec::new();
        ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // supported_groups
        ext(&mut exts, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
        ext(&mut exts, 0x000d, &[0, 2, 0x04, 0x03]); // ecdsa_secp256r1_sha256
        ext(&mut exts, 0xff01, &[0]); // renegotiation_info, empty
        if with_ems {
            ext(&mut exts, 0x0017, &[]);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b]); // cipher suites
        body.extend_from_slice(&[1, 0]); // compression: null
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x01, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    #[test]
    fn tls12_client_without_extended_master_secret_is_refused() {
        let grid = Grid::new();
        let server = grid.server();
        let mut results = Vec::new();
        for with_ems in [true, false] {
            let mut s = ServerConnection::new(server.config.clone()).expect("conn");
            s.read_tls(&mut tls12_client_hello(with_ems).as_slice())
                .expect("read");
            results.push(s.process_new_packets().map(|_| ()));
        }
        assert!(
            results[0].is_ok(),
            "control hello with EMS: {:?}",
            results[0]
        );
        assert_eq!(
            results[1],
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::ExtendedMasterSecretExtensionRequired
            ))
        );
    }

    #[test]
    fn alpn_xmpp_client_is_negotiated_for_direct_tls() {
        let grid = Grid::new();
        let server = server_config(&grid.settings(), &[ALPN_XMPP_CLIENT]).expect("config");
        let mut client = (*grid.client(&rustls::version::TLS13, None)).clone();
        client.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
        let (_c, s) = connect(&Arc::new(client.clone()), &server).expect("handshake");
        assert_eq!(s.alpn_protocol(), Some(ALPN_XMPP_CLIENT));
        client.alpn_protocols = vec![b"h2".to_vec()];
        assert!(
            connect(&Arc::new(client), &server).is_err(),
            "no common protocol"
        );
    }

    #[tokio::test]
    async fn client_certificate_login_works_over_loopback_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let grid = Grid::new();
        let issued = grid.issue("platform1@grid.test");
        let server = grid.server();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
        let leaf = server.leaf_der.clone();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor
                .accept_with(tcp, tune_connection)
                .await
                .expect("tls accept");
            let conn = tls.get_ref().1;
            let id = peer_identity(conn);
            let cb = channel_bindings(conn, &leaf);
            tls.write_all(b"ok").await.expect("write");
            tls.shutdown().await.expect("shutdown");
            (id, cb)
        });
        let connector =
            tokio_rustls::TlsConnector::from(grid.client(&rustls::version::TLS13, Some(&issued)));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut tls = connector
            .connect(ServerName::try_from(DOMAIN).expect("name"), tcp)
            .await
            .expect("tls connect");
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"ok");
        let client_exporter = tls
            .get_ref()
            .1
            .export_keying_material(vec![0u8; 32], TLS_EXPORTER_LABEL, Some(&[]))
            .expect("exporter");
        let (id, cb) = server_task.await.expect("server task");
        assert_eq!(id.expect("identity").xmpp_addrs, ["platform1@grid.test"]);
        assert_eq!(cb.tls_exporter, Some(client_exporter));
    }
}
