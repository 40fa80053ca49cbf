//! The grid's own small certificate authority, kept as PEM files in one directory
//! (typically `DATA_DIR/tls/`).
//!
//! Files: `ca.pem`/`ca.key` (the CA), `server.pem`/`server.key` (the controller's TLS
//! certificate, leaf only), `crl.pem` (the CA's CRL). Private keys are PKCS#8, mode 0600,
//! written to a temporary file and renamed, so a crash never leaves a half-written key.
//!
//! Certificates carry the XMPP identity as RFC 6120 §13.7.1.4 requires: a SAN `otherName`
//! `id-on-xmppAddr` (1.3.6.1.5.5.7.8.5) holding `[0] EXPLICIT UTF8String`.
//!
//! This module must not: overwrite an existing CA, touch the network, decide who may
//! hold a certificate (that is the admin CLI's job), or keep revocation state of its own
//! beyond what is in `crl.pem` (the list of revoked serials lives in the store).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::time::ASN1Time;
use x509_parser::x509::X509Name;

/// OID of `id-on-xmppAddr` (RFC 6120 §13.7.1.4).
pub const XMPP_ADDR_OID: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 8, 5];

/// CA lifetime: long, because replacing it means re-issuing every platform certificate.
const CA_DAYS: i64 = 3650;
/// Server certificate lifetime.
const SERVER_DAYS: i64 = 730;
/// A server certificate closer than this to expiry is re-issued at start.
const SERVER_RENEW_BEFORE_DAYS: i64 = 30;
/// nextUpdate of the CRL written when none exists. The controller is expected to call
/// [`write_crl`] at start and then regularly (e.g. daily), well before this runs out,
/// because an expired CRL refuses every client certificate (see `tls.rs`).
pub const INITIAL_CRL_DAYS: u32 = 30;
/// Backdating of notBefore, to tolerate small clock differences with platforms.
const BACKDATE_SECS: i64 = 3600;
const DAY_SECS: i64 = 86_400;

/// Errors from reading, generating or writing the grid's PKI files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("i/o on {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one half of the CA exists; generating a new CA would orphan the other half.
    #[error(
        "incomplete CA in {dir}: {present} exists but {missing} does not; restore it or remove {present}"
    )]
    IncompleteCa {
        /// The PKI directory.
        dir: PathBuf,
        /// The file that exists.
        present: &'static str,
        /// The file that is missing.
        missing: &'static str,
    },
    /// rcgen refused to build a certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A name given to us cannot go into a certificate.
    #[error("invalid name {0:?} for a certificate")]
    InvalidName(String),
    /// A serial number is not hexadecimal.
    #[error("invalid serial number {0:?}: expected hexadecimal digits")]
    InvalidSerial(String),
    /// A validity period does not fit in a certificate date.
    #[error("validity period out of range")]
    TimeOutOfRange,
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// Where the PKI files of a directory are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// The directory itself.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA private key (PKCS#8 PEM, mode 0600).
    pub ca_key: PathBuf,
    /// Controller TLS certificate (PEM, leaf only).
    pub server_cert: PathBuf,
    /// Controller TLS private key (PKCS#8 PEM, mode 0600).
    pub server_key: PathBuf,
    /// The CA's certificate revocation list (PEM).
    pub crl: PathBuf,
}

impl PkiPaths {
    /// The standard file names inside `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            crl: dir.join("crl.pem"),
        }
    }
}

/// A platform certificate freshly issued by [`issue_client_cert`].
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM). Handed to the operator once; never stored by us.
    pub key_pem: String,
    /// Serial number, lowercase hex without leading zero bytes (see [`normalize_serial_hex`]).
    pub serial_hex: String,
    /// Expiry, RFC 3339 UTC (`2027-01-31T12:00:00Z`).
    pub not_after: String,
}

/// What `crl.pem` currently says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The crlNumber extension (0 when absent).
    pub crl_number: u64,
    /// thisUpdate, Unix seconds.
    pub this_update_unix: i64,
    /// nextUpdate, Unix seconds, when present.
    pub next_update_unix: Option<i64>,
    /// Revoked serials, normalised hex.
    pub revoked_serials_hex: Vec<String>,
}

/// Makes sure `dir` holds a CA, a server certificate for `domain` (and `extra_dns`, e.g.
/// `broker.<domain>`) and a CRL, creating what is missing.
///
/// Idempotent: an existing CA is never overwritten (a half-present CA is an error). The
/// server certificate is re-issued when missing, not covering every name, not issued by
/// this CA, not matching its key, or expiring within 30 days.
pub fn ensure_ca_and_server(
    dir: &Path,
    domain: &str,
    extra_dns: &[String],
) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths::new(dir);
    create_private_dir(dir)?;
    check_dns_name(domain)?;
    for name in extra_dns {
        check_dns_name(name)?;
    }

    match (paths.ca_cert.exists(), paths.ca_key.exists()) {
        (true, true) => {}
        (false, false) => generate_ca(&paths, domain)?,
        (true, false) => {
            return Err(PkiError::IncompleteCa {
                dir: dir.to_path_buf(),
                present: "ca.pem",
                missing: "ca.key",
            });
        }
        (false, true) => {
            return Err(PkiError::IncompleteCa {
                dir: dir.to_path_buf(),
                present: "ca.key",
                missing: "ca.pem",
            });
        }
    }
    let ca = load_ca(&paths)?;

    let mut names = vec![domain.to_owned()];
    for name in extra_dns {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if !server_cert_is_usable(&paths, &ca, &names)? {
        issue_server_cert(&paths, &ca, &names)?;
    }

    if !paths.crl.exists() {
        let crl = build_crl(&ca, &[], 1, now_unix(), now_unix() + days(INITIAL_CRL_DAYS))?;
        // Create-only, so a CRL written concurrently by `write_crl` is not replaced by an
        // empty one.
        write_new_file(&paths.crl, crl.as_bytes(), false)?;
    }
    Ok(paths)
}

/// Issues a platform certificate for the bare JID `jid` (already normalised), valid for
/// `days`, signed by the CA in `dir`.
///
/// Subject CN = `jid`; SAN otherName id-on-xmppAddr = `jid` (RFC 6120 §13.7.1.4); EKU
/// clientAuth; ECDSA P-256 key; random positive 16-byte serial.
pub fn issue_client_cert(dir: &Path, jid: &str, days_valid: u32) -> Result<IssuedCert, PkiError> {
    check_bare_jid(jid)?;
    if days_valid == 0 {
        return Err(PkiError::TimeOutOfRange);
    }
    let paths = PkiPaths::new(dir);
    let ca = load_ca(&paths)?;

    let now = now_unix();
    let not_after = now + days(days_valid);
    let serial = random_serial()?;
    let mut params = leaf_params(jid, now, not_after, &serial)?;
    params.subject_alt_names = vec![SanType::OtherName((
        XMPP_ADDR_OID.to_vec(),
        jid.to_owned().into(),
    ))];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    ca.check_issued(cert.der(), &paths.ca_cert)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial_hex: hex(&serial),
        not_after: rfc3339(not_after)?,
    })
}

/// Replaces `crl.pem` with a CRL signed by the CA listing `revoked_serials_hex`, valid for
/// `next_update_days`. The crlNumber always increases (RFC 5280 §5.2.3): it is the larger
/// of the previous number plus one and the current Unix time, so it survives a lost file.
pub fn write_crl(
    dir: &Path,
    revoked_serials_hex: &[String],
    next_update_days: u32,
) -> Result<(), PkiError> {
    if next_update_days == 0 {
        return Err(PkiError::TimeOutOfRange);
    }
    let now = now_unix();
    write_crl_at(dir, revoked_serials_hex, now, now + days(next_update_days))
}

/// [`write_crl`] with explicit thisUpdate/nextUpdate (Unix seconds); tests use it to make
/// an already expired CRL.
pub(crate) fn write_crl_at(
    dir: &Path,
    revoked_serials_hex: &[String],
    this_update: i64,
    next_update: i64,
) -> Result<(), PkiError> {
    let paths = PkiPaths::new(dir);
    let serials = revoked_serials_hex
        .iter()
        .map(|s| parse_serial_hex(s))
        .collect::<Result<Vec<_>, _>>()?;
    let ca = load_ca(&paths)?;
    let previous = if paths.crl.exists() {
        read_crl_info(dir)?.crl_number
    } else {
        0
    };
    let number = previous
        .saturating_add(1)
        .max(u64::try_from(now_unix()).unwrap_or(0));
    let crl = build_crl(&ca, &serials, number, this_update, next_update)?;
    write_replace(&paths.crl, crl.as_bytes(), false)
}

/// Reads `crl.pem` of `dir`: number, dates and revoked serials.
pub fn read_crl_info(dir: &Path) -> Result<CrlInfo, PkiError> {
    let path = PkiPaths::new(dir).crl;
    let pem = read(&path)?;
    let der = CertificateRevocationListDer::from_pem_slice(&pem).map_err(|e| invalid(&path, e))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| invalid(&path, e))?;
    let crl_number = match crl.crl_number() {
        None => 0,
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(invalid(&path, "crlNumber larger than 64 bits"));
            }
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    };
    Ok(CrlInfo {
        crl_number,
        this_update_unix: crl.last_update().timestamp(),
        next_update_unix: crl.next_update().map(|t| t.timestamp()),
        revoked_serials_hex: crl
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect(),
    })
}

/// SHA-256 fingerprint of the CA certificate, as `AB:CD:…` (the form `openssl x509
/// -fingerprint -sha256` prints), for the operator to compare out of band.
pub fn ca_fingerprint_sha256(dir: &Path) -> Result<String, PkiError> {
    let path = PkiPaths::new(dir).ca_cert;
    let der = read_cert(&path)?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    let parts: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    Ok(parts.join(":"))
}

/// Canonical form of a serial number: lowercase hex, no separators, no leading zero
/// bytes (DER adds one when the top bit is set; x509 tools differ on showing it).
pub fn normalize_serial_hex(serial: &str) -> Result<String, PkiError> {
    Ok(hex(&parse_serial_hex(serial)?))
}

// ---------------------------------------------------------------------------------------
// CA loading and generation

/// The CA as rcgen needs it to sign, plus what we check issued certificates against.
struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    subject_der: Vec<u8>,
    key_id_method: KeyIdMethod,
}

impl LoadedCa {
    /// The issuer name must equal the CA subject byte for byte, or path validation fails.
    /// rcgen rebuilds names from parsed values; this catches a CA whose name it cannot
    /// reproduce (e.g. repeated attributes), instead of handing out unusable certificates.
    fn check_issued(&self, der: &[u8], ca_path: &Path) -> Result<(), PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| invalid(ca_path, e))?;
        if cert.issuer().as_raw() == self.subject_der.as_slice() {
            Ok(())
        } else {
            Err(invalid(
                ca_path,
                "CA subject cannot be reproduced as an issuer name",
            ))
        }
    }
}

fn generate_ca(paths: &PkiPaths, domain: &str) -> Result<(), PkiError> {
    let now = now_unix();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("xmpp-grid CA {domain}"));
    // pathLen 0: this CA signs only leaves, never a sub-CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = asn1_time(now - BACKDATE_SECS)?.to_datetime();
    params.not_after = asn1_time(now + CA_DAYS * DAY_SECS)?.to_datetime();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    // Key first: a crash in between leaves `ca.key` alone, reported as IncompleteCa.
    // Both create-only, so a CA created concurrently is never replaced.
    write_new_file(&paths.ca_key, key.serialize_pem().as_bytes(), true)?;
    write_new_file(&paths.ca_cert, cert.pem().as_bytes(), false)
}

fn load_ca(paths: &PkiPaths) -> Result<LoadedCa, PkiError> {
    let der = read_cert(&paths.ca_cert)?;
    let key_pem = String::from_utf8(read(&paths.ca_key)?)
        .map_err(|_| invalid(&paths.ca_key, "not a PEM file"))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&paths.ca_key, e))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(&paths.ca_cert, e))?;
    if !cert.is_ca() {
        return Err(invalid(&paths.ca_cert, "not a CA certificate"));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(&paths.ca_key, "key does not match ca.pem"));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name =
        distinguished_name(cert.subject()).map_err(|e| invalid(&paths.ca_cert, e))?;
    params.key_usages = key_usages(&cert);
    // Authority Key Identifier of issued certificates must equal the CA's SKI.
    let key_id_method = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => {
                Some(KeyIdMethod::PreSpecified(ski.0.to_vec()))
            }
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256);
    params.key_identifier_method = key_id_method.clone();
    Ok(LoadedCa {
        issuer: Issuer::new(params, key),
        subject_der: cert.subject().as_raw().to_vec(),
        key_id_method,
    })
}

/// rcgen's own conversion needs its `x509-parser` feature, which pulls in ring
/// (network-stack notes, pitfall 1); this is the same mapping, one attribute per RDN.
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("multi-valued RDN in CA subject".into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("attribute OID too large")?
            .collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| "CA subject is not UTF-8")?;
        let dn_value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => {
                DnValue::PrintableString(text.try_into().map_err(|e| format!("{e}"))?)
            }
            Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(|e| format!("{e}"))?),
            Tag::T61String => DnValue::TeletexString(text.try_into().map_err(|e| format!("{e}"))?),
            other => return Err(format!("unsupported string type {other} in CA subject")),
        };
        dn.push(DnType::from_oid(&oid), dn_value);
    }
    Ok(dn)
}

fn key_usages(cert: &X509Certificate<'_>) -> Vec<KeyUsagePurpose> {
    let Ok(Some(ku)) = cert.key_usage() else {
        // No extension: any usage (RFC 5280 §4.2.1.3); an empty list tells rcgen the same.
        return Vec::new();
    };
    let ku = ku.value;
    let mut out = Vec::new();
    if ku.digital_signature() {
        out.push(KeyUsagePurpose::DigitalSignature);
    }
    if ku.key_cert_sign() {
        out.push(KeyUsagePurpose::KeyCertSign);
    }
    if ku.crl_sign() {
        out.push(KeyUsagePurpose::CrlSign);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Server certificate

fn server_cert_is_usable(
    paths: &PkiPaths,
    ca: &LoadedCa,
    names: &[String],
) -> Result<bool, PkiError> {
    if !paths.server_cert.exists() || !paths.server_key.exists() {
        return Ok(false);
    }
    let der = read_cert(&paths.server_cert)?;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Ok(false);
    };
    let key_pem = String::from_utf8(read(&paths.server_key)?).unwrap_or_default();
    let key_matches = KeyPair::from_pem(&key_pem)
        .is_ok_and(|k| k.public_key_raw() == cert.public_key().subject_public_key.data.as_ref());
    let dns: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let covers = names
        .iter()
        .all(|n| dns.iter().any(|d| d.eq_ignore_ascii_case(n)));
    let fresh =
        cert.validity().not_after.timestamp() > now_unix() + SERVER_RENEW_BEFORE_DAYS * DAY_SECS;
    let ours = cert.issuer().as_raw() == ca.subject_der.as_slice();
    Ok(key_matches && covers && fresh && ours)
}

fn issue_server_cert(paths: &PkiPaths, ca: &LoadedCa, names: &[String]) -> Result<(), PkiError> {
    let now = now_unix();
    let domain = names
        .first()
        .ok_or_else(|| PkiError::InvalidName(String::new()))?;
    let mut params = leaf_params(domain, now, now + SERVER_DAYS * DAY_SECS, &random_serial()?)?;
    let mut sans = Vec::with_capacity(names.len() * 2);
    for name in names {
        sans.push(SanType::DnsName(
            name.as_str()
                .try_into()
                .map_err(|_| PkiError::InvalidName(name.clone()))?,
        ));
    }
    // RFC 6120 §13.7.1.4 / XEP-0178: a server may also carry its domain as xmppAddr.
    for name in names {
        sans.push(SanType::OtherName((
            XMPP_ADDR_OID.to_vec(),
            name.clone().into(),
        )));
    }
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    ca.check_issued(cert.der(), &paths.ca_cert)?;
    // Key first: if we stop between the two renames, the next start sees a key that
    // does not match server.pem and re-issues.
    write_replace(&paths.server_key, key.serialize_pem().as_bytes(), true)?;
    write_replace(&paths.server_cert, cert.pem().as_bytes(), false)
}

/// Parameters shared by every leaf we issue.
fn leaf_params(
    cn: &str,
    now: i64,
    not_after: i64,
    serial: &[u8],
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = asn1_time(now - BACKDATE_SECS)?.to_datetime();
    params.not_after = asn1_time(not_after)?.to_datetime();
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn build_crl(
    ca: &LoadedCa,
    serials: &[Vec<u8>],
    number: u64,
    this_update: i64,
    next_update: i64,
) -> Result<String, PkiError> {
    let revocation_time = asn1_time(this_update)?.to_datetime();
    let params = CertificateRevocationListParams {
        this_update: asn1_time(this_update)?.to_datetime(),
        next_update: asn1_time(next_update)?.to_datetime(),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        // The CRL's Authority Key Identifier must equal the CA's SKI (RFC 5280 §5.2.1).
        key_identifier_method: ca.key_id_method.clone(),
    };
    Ok(params.signed_by(&ca.issuer)?.pem()?)
}

// ---------------------------------------------------------------------------------------
// Small helpers: names, serials, time, files

fn check_dns_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName(name.to_owned()))
    }
}

/// A bare JID as it goes into CN and xmppAddr: no resource, no whitespace or controls.
/// Full JID validation and normalisation belong to `jid.rs`.
fn check_bare_jid(jid: &str) -> Result<(), PkiError> {
    let ok = !jid.is_empty()
        && jid.len() <= 3071 // RFC 7622 §3.1: localpart + @ + domainpart at most
        && !jid.contains('/')
        && !jid.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName(jid.to_owned()))
    }
}

/// 16 random bytes, top bit clear (a positive INTEGER) and next bit set (so DER keeps
/// all 16 bytes and the hex form is stable): 126 bits of randomness (RFC 5280 §4.1.2.2).
fn random_serial() -> Result<Vec<u8>, PkiError> {
    let mut serial = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn parse_serial_hex(s: &str) -> Result<Vec<u8>, PkiError> {
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 42 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidSerial(s.to_owned()));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| PkiError::InvalidSerial(s.to_owned()))?;
    Ok(bytes)
}

/// Lowercase hex without leading zero bytes (one byte kept for zero).
pub(crate) fn hex(bytes: &[u8]) -> String {
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[first.min(bytes.len())..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn days(n: u32) -> i64 {
    i64::from(n) * DAY_SECS
}

fn asn1_time(unix: i64) -> Result<ASN1Time, PkiError> {
    ASN1Time::from_timestamp(unix).map_err(|_| PkiError::TimeOutOfRange)
}

fn rfc3339(unix: i64) -> Result<String, PkiError> {
    let t = asn1_time(unix)?.to_datetime();
    Ok(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(io_err(path))
}

fn read_cert(path: &Path) -> Result<Vec<u8>, PkiError> {
    let pem = read(path)?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| invalid(path, e))?;
    Ok(der.to_vec())
}

/// Creates `dir` (mode 0700: it holds private keys) if missing; leaves an existing one as is.
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_err(dir))
}

/// Writes `data` to a fresh temporary file next to `path` (mode 0600 if `private`),
/// fsynced, and returns its path.
fn write_temp(path: &Path, data: &[u8], private: bool) -> Result<PathBuf, PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut suffix = [0u8; 6];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| PkiError::Random)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex(&suffix)));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let result = options.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::Io {
            path: tmp,
            source: e,
        });
    }
    Ok(tmp)
}

/// Atomically replaces `path` (temp file + rename).
fn write_replace(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    let tmp = write_temp(path, data, private)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    sync_parent(path);
    Ok(())
}

/// Atomically creates `path`, failing if it exists (a hard link never replaces).
fn write_new_file(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    let tmp = write_temp(path, data, private)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(io_err(path))?;
    sync_parent(path);
    Ok(())
}

/// Makes the rename durable; best effort, as not every filesystem allows it.
fn sync_parent(path: &Path) {
    if let Some(Ok(d)) = path.parent().map(fs::File::open) {
        let _ = d.sync_all();
    }
}

/// Temporary directories for tests here and in `tls.rs` (no tempfile crate in the tree).
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A directory removed on drop.
    pub(crate) struct TestDir(PathBuf);

    impl TestDir {
        pub(crate) fn new() -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let mut r = [0u8; 4];
            aws_lc_rs::rand::fill(&mut r).expect("rand");
            let path = std::env::temp_dir().join(format!(
                "xg-pki-test-{}-{n}-{}",
                std::process::id(),
                super::hex(&r)
            ));
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TestDir;
    use super::*;

    fn grid() -> (TestDir, PkiPaths) {
        let dir = TestDir::new();
        let paths = ensure_ca_and_server(dir.path(), "grid.test", &["broker.grid.test".into()])
            .expect("pki");
        (dir, paths)
    }

    fn parse_pem_cert(pem: &[u8]) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem).expect("pem").to_vec()
    }

    #[test]
    fn ensure_creates_ca_server_and_crl_then_reloads_them_unchanged() {
        let (dir, paths) = grid();
        let before: Vec<Vec<u8>> = [
            &paths.ca_cert,
            &paths.ca_key,
            &paths.server_cert,
            &paths.server_key,
            &paths.crl,
        ]
        .iter()
        .map(|p| fs::read(p).expect("read"))
        .collect();
        let again = ensure_ca_and_server(dir.path(), "grid.test", &["broker.grid.test".into()])
            .expect("again");
        assert_eq!(again, paths);
        let after: Vec<Vec<u8>> = [
            &paths.ca_cert,
            &paths.ca_key,
            &paths.server_cert,
            &paths.server_key,
            &paths.crl,
        ]
        .iter()
        .map(|p| fs::read(p).expect("read"))
        .collect();
        assert_eq!(before, after);
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_mode_0600_and_no_temp_files_remain() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, paths) = grid();
        for key in [&paths.ca_key, &paths.server_key] {
            let mode = fs::metadata(key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn ca_is_a_constrained_ca_named_after_the_domain() {
        let (_dir, paths) = grid();
        let der = parse_pem_cert(&fs::read(&paths.ca_cert).expect("read"));
        let (_, ca) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(ca.is_ca());
        assert_eq!(ca.subject().to_string(), "CN=xmpp-grid CA grid.test");
        let ku = ca.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let years = (ca.validity().not_after.timestamp() - now_unix()) / (365 * DAY_SECS);
        assert_eq!(years, 10);
    }

    #[test]
    fn server_certificate_covers_domain_and_extra_names_with_dns_and_xmpp_addr() {
        let (_dir, paths) = grid();
        let der = parse_pem_cert(&fs::read(&paths.server_cert).expect("read"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let san = cert
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        let dns: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::DNSName(d) = n {
                    Some(*d)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(dns, ["grid.test", "broker.grid.test"]);
        let id = crate::tls::identity_from_der(&der).expect("identity");
        assert_eq!(id.xmpp_addrs, ["grid.test", "broker.grid.test"]);
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.server_auth && !eku.client_auth);
    }

    #[test]
    fn server_certificate_is_reissued_for_a_new_name_but_the_ca_is_kept() {
        let (dir, paths) = grid();
        let ca_before = fs::read(&paths.ca_cert).expect("read");
        let server_before = fs::read(&paths.server_cert).expect("read");
        ensure_ca_and_server(dir.path(), "grid.test", &["pubsub.grid.test".into()]).expect("again");
        assert_eq!(fs::read(&paths.ca_cert).expect("read"), ca_before);
        assert_ne!(fs::read(&paths.server_cert).expect("read"), server_before);
    }

    #[test]
    fn server_certificate_is_reissued_when_its_key_does_not_match() {
        let (dir, paths) = grid();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        fs::write(&paths.server_key, other.serialize_pem()).expect("write");
        let server_before = fs::read(&paths.server_cert).expect("read");
        ensure_ca_and_server(dir.path(), "grid.test", &["broker.grid.test".into()]).expect("again");
        assert_ne!(fs::read(&paths.server_cert).expect("read"), server_before);
    }

    #[test]
    fn half_present_ca_is_an_error_and_is_not_replaced() {
        let (dir, paths) = grid();
        let key = fs::read(&paths.ca_key).expect("read");
        fs::remove_file(&paths.ca_cert).expect("rm");
        let err = ensure_ca_and_server(dir.path(), "grid.test", &[]).expect_err("must refuse");
        assert!(
            matches!(
                err,
                PkiError::IncompleteCa {
                    present: "ca.key",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fs::read(&paths.ca_key).expect("read"), key);
    }

    #[test]
    fn client_certificate_has_cn_xmpp_addr_client_auth_and_a_positive_16_byte_serial() {
        let (dir, _paths) = grid();
        let issued = issue_client_cert(dir.path(), "platform1@grid.test", 30).expect("issue");
        let der = parse_pem_cert(issued.cert_pem.as_bytes());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert_eq!(cert.raw_serial().len(), 16);
        assert_eq!(cert.raw_serial()[0] & 0x80, 0);
        assert_eq!(hex(cert.raw_serial()), issued.serial_hex);
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        let id = crate::tls::identity_from_der(&der).expect("identity");
        assert_eq!(id.xmpp_addrs, ["platform1@grid.test"]);
        assert_eq!(id.common_name.as_deref(), Some("platform1@grid.test"));
        let expected = rfc3339(cert.validity().not_after.timestamp()).expect("date");
        assert_eq!(issued.not_after, expected);
        assert!(KeyPair::from_pem(&issued.key_pem).is_ok());
    }

    #[test]
    fn two_client_certificates_get_different_serials() {
        let (dir, _paths) = grid();
        let a = issue_client_cert(dir.path(), "a@grid.test", 1).expect("a");
        let b = issue_client_cert(dir.path(), "a@grid.test", 1).expect("b");
        assert_ne!(a.serial_hex, b.serial_hex);
    }

    #[test]
    fn client_certificate_for_a_full_jid_or_blank_name_is_refused() {
        let (dir, _paths) = grid();
        for bad in ["a@grid.test/res", "", "a b@grid.test"] {
            assert!(
                matches!(
                    issue_client_cert(dir.path(), bad, 1),
                    Err(PkiError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn crl_lists_revoked_serials_and_its_number_increases() {
        let (dir, _paths) = grid();
        let first = read_crl_info(dir.path()).expect("crl");
        assert!(first.revoked_serials_hex.is_empty());
        let issued = issue_client_cert(dir.path(), "p@grid.test", 1).expect("issue");
        write_crl(dir.path(), std::slice::from_ref(&issued.serial_hex), 7).expect("write");
        let second = read_crl_info(dir.path()).expect("crl");
        assert_eq!(
            second.revoked_serials_hex,
            std::slice::from_ref(&issued.serial_hex)
        );
        assert!(second.crl_number > first.crl_number);
        assert_eq!(
            second.next_update_unix.map(|n| n - second.this_update_unix),
            Some(7 * DAY_SECS)
        );
        write_crl(dir.path(), &[], 7).expect("write");
        assert!(read_crl_info(dir.path()).expect("crl").crl_number > second.crl_number);
    }

    #[test]
    fn crl_with_a_non_hex_serial_is_refused_and_the_old_crl_kept() {
        let (dir, paths) = grid();
        let before = fs::read(&paths.crl).expect("read");
        let err = write_crl(dir.path(), &["zz".into()], 7).expect_err("must refuse");
        assert!(matches!(err, PkiError::InvalidSerial(_)));
        assert_eq!(fs::read(&paths.crl).expect("read"), before);
    }

    #[test]
    fn serial_hex_is_normalised_without_separators_or_leading_zero_bytes() {
        assert_eq!(normalize_serial_hex("00:8F:0a").expect("ok"), "8f0a");
        assert_eq!(normalize_serial_hex("0").expect("ok"), "00");
        assert!(normalize_serial_hex("0x12").is_err());
    }

    #[test]
    fn ca_fingerprint_is_sha256_of_the_ca_der() {
        let (dir, paths) = grid();
        let der = parse_pem_cert(&fs::read(&paths.ca_cert).expect("read"));
        let fp = ca_fingerprint_sha256(dir.path()).expect("fp");
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
        assert_eq!(fp.replace(':', "").to_lowercase(), hex(expected.as_ref()));
        assert_eq!(fp.len(), 32 * 3 - 1);
    }

    #[test]
    fn openssl_shows_the_xmpp_addr_othername_of_a_client_certificate() {
        let Ok(version) = std::process::Command::new("openssl")
            .arg("version")
            .output()
        else {
            return; // openssl CLI not installed: nothing to compare with
        };
        assert!(version.status.success());
        let (dir, _paths) = grid();
        let issued = issue_client_cert(dir.path(), "platform1@grid.test", 1).expect("issue");
        let pem_path = dir.path().join("client.pem");
        fs::write(&pem_path, &issued.cert_pem).expect("write");
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&pem_path)
            .output()
            .expect("run openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("othername: XmppAddr:") && text.contains("platform1@grid.test"),
            "{text}"
        );
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }
}
