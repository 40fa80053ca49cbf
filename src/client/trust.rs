//! Which server certificates the client accepts, and the client's own certificate.
//!
//! Role: build the rustls client configuration from a CA file (normally the grid CA),
//! and/or a pinned SHA-256 fingerprint of the controller's leaf certificate (RFC 8600
//! §8.3.6: relying parties may "pin" the controller's certificate). With a pin and no
//! explicit CA, the pin alone decides; with both, both must agree. Either way the
//! handshake signature is still checked, so only the holder of the pinned
//! certificate's key gets through.
//!
//! Must not: accept a certificate with neither a CA nor a pin vouching for it, or skip
//! the handshake signature check.

use super::{ClientCert, ClientError};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a CA bundle is looked for when neither a CA nor a pin is given (Debian's path,
/// or `SSL_CERT_FILE` as OpenSSL honours it): for controllers with a public certificate.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate (what `openssl x509 -fingerprint -sha256` shows).
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Parses `AB:CD:…` (colons optional, any case, `sha256//` or `SHA256:` prefix
    /// tolerated as some tools print it).
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256//")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256:"))
            .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 {
            return Err(format!("a SHA-256 fingerprint has 32 bytes (64 hex digits), got {:?}", s));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(|| format!("not hex: {s:?}"))?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| format!("not hex: {s:?}"))?;
        }
        Ok(Fingerprint(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// What vouches for the server's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// CA certificates (PEM), e.g. the grid CA `<data_dir>/tls/ca.pem`.
    pub ca_files: Vec<PathBuf>,
    /// The controller's leaf certificate fingerprint.
    pub pin: Option<Fingerprint>,
}

/// Builds the client config: TLS 1.2+ with Extended Master Secret required (RFC 9266
/// §3: without EMS a TLS 1.2 exporter is no channel binding), our trust, optional
/// client certificate, ALPN `xmpp-client` for direct TLS (XEP-0368).
pub(crate) fn client_config(trust: &Trust, cert: Option<&ClientCert>, alpn: bool) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = verifier(trust, provider.clone())?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain = load_certs(&c.cert)?;
            let key = PrivateKeyDer::from_pem_file(&c.key)
                .map_err(|e| ClientError::Config(format!("{}: {e}", c.key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("client certificate {}: {e}", c.cert.display())))?
        }
    };
    config.require_ems = true;
    if alpn {
        config.alpn_protocols = vec![crate::tls::ALPN_XMPP_CLIENT.to_vec()];
    }
    Ok(Arc::new(config))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Config(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

fn verifier(trust: &Trust, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>, ClientError> {
    let mut ca_files = trust.ca_files.clone();
    if ca_files.is_empty() && trust.pin.is_none() {
        let system = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).unwrap_or_else(|| SYSTEM_BUNDLE.into());
        if !system.exists() {
            return Err(ClientError::Config(
                "nothing to trust the server with: give a CA file (--ca, default the grid CA) or a pin (--pin)".into(),
            ));
        }
        ca_files.push(system);
    }
    let webpki = if ca_files.is_empty() {
        None
    } else {
        let mut roots = RootCertStore::empty();
        for f in &ca_files {
            for c in load_certs(f)? {
                roots.add(c).map_err(|e| ClientError::Config(format!("{}: {e}", f.display())))?;
            }
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| ClientError::Config(format!("CA: {e}")))?;
        Some(v)
    };
    match (trust.pin, webpki) {
        (None, Some(v)) => Ok(v),
        (pin, webpki) => Ok(Arc::new(PinningVerifier {
            pin,
            webpki,
            algorithms: provider.signature_verification_algorithms,
        })),
    }
}

/// Accepts the server's leaf if its SHA-256 matches the pin (and, when a CA is also
/// given, the chain verifies too). Signatures are checked as usual.
#[derive(Debug)]
struct PinningVerifier {
    pin: Option<Fingerprint>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(pin) = &self.pin {
            pin_matches(pin, end_entity)?;
        }
        match &self.webpki {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            // The pin names this exact certificate: its name and chain add nothing.
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The pin check, with the fingerprint seen in the error so the operator can compare.
fn pin_matches(pin: &Fingerprint, der: &[u8]) -> Result<(), rustls::Error> {
    let seen = Fingerprint::of(der);
    // Not secret, but compared in constant time anyway: it costs nothing.
    aws_lc_rs::constant_time::verify_slices_are_equal(&seen.0, &pin.0)
        .map_err(|_| rustls::Error::General(format!("server certificate SHA-256 {seen} does not match the pin {pin}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings_and_print_as_openssl_does() {
        let colon = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";
        let f = Fingerprint::parse(colon).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.to_string(), colon);
        let plain = colon.replace(':', "").to_lowercase();
        assert_eq!(Fingerprint::parse(&plain), Ok(f));
        assert_eq!(Fingerprint::parse(&format!("sha256 Fingerprint={colon}").replace("sha256", "SHA256")), Ok(f));
        assert!(Fingerprint::parse("AB:CD").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
        assert!(Fingerprint::parse(&"é".repeat(32)).is_err());
    }

    #[test]
    fn pin_accepts_only_the_pinned_certificate() {
        let der = b"not really a certificate, but hashed all the same";
        let pin = Fingerprint::of(der);
        assert!(pin_matches(&pin, der).is_ok());
        let err = pin_matches(&pin, b"another certificate").map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("does not match the pin"), "{err}");
        assert!(err.contains(&Fingerprint::of(b"another certificate").to_string()), "{err}");
    }

    #[test]
    fn pinned_verifier_refuses_other_certificates_before_any_chain_check() {
        let v = PinningVerifier {
            pin: Some(Fingerprint::of(b"pinned")),
            webpki: None,
            algorithms: rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from("grid.test").unwrap_or_else(|e| panic!("{e}"));
        let other = CertificateDer::from(b"other".to_vec());
        assert!(v.verify_server_cert(&other, &[], &name, &[], UnixTime::now()).is_err());
        let pinned = CertificateDer::from(b"pinned".to_vec());
        assert!(v.verify_server_cert(&pinned, &[], &name, &[], UnixTime::now()).is_ok());
    }

    #[test]
    fn no_trust_anchor_is_an_error_not_an_open_door() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let t = Trust { ca_files: vec!["/nonexistent/ca.pem".into()], pin: None };
        assert!(verifier(&t, provider).is_err());
    }
}
