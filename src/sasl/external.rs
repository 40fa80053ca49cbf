//! EXTERNAL (RFC 4422 App. A) with the TLS client certificate, following XEP-0178 §3 and
//! RFC 6120 §6.4.6/§13.7.1.4.
//!
//! Role: map the certificate's xmppAddr JIDs of our domain and the optional authzid to one
//! existing account. The TLS layer has already checked the chain and revocation.
//!
//! Must not: use dNSName, email or CN entries (never implicitly; see network-stack.md §2), or
//! authenticate an account the lookup does not return.

use super::{SaslContext, SaslFailure, Step, same_caseless, same_domain, split_bare_jid};

/// Handles the single EXTERNAL message: the authzid, or empty.
pub(super) fn step(ctx: &SaslContext, data: &[u8]) -> Step {
    match authenticate(ctx, data) {
        Ok(localpart) => Step::Success {
            localpart,
            additional_data: None,
        },
        Err(failure) => Step::Failure(failure),
    }
}

fn authenticate(ctx: &SaslContext, data: &[u8]) -> Result<String, SaslFailure> {
    let cert = ctx.cert.as_ref().ok_or(SaslFailure::NotAuthorized)?;
    let authzid = std::str::from_utf8(data).map_err(|_| SaslFailure::MalformedRequest)?;
    if authzid.contains('\0') {
        return Err(SaslFailure::MalformedRequest);
    }
    // Only bare JIDs of our domain count; others (full JIDs, other domains) are ignored.
    let ours: Vec<&str> = cert
        .xmpp_addrs
        .iter()
        .filter_map(|addr| split_bare_jid(addr))
        .filter(|(_, domain)| same_domain(domain, &ctx.domain))
        .map(|(local, _)| local)
        .collect();

    let localpart = if authzid.is_empty() {
        // XEP-0178 §3: with one JID for this domain, that is the identity; with none or several
        // the server cannot choose (the client must send an authzid), so not-authorized.
        match ours.as_slice() {
            [one] => *one,
            _ => return Err(SaslFailure::NotAuthorized),
        }
    } else {
        // RFC 6120 §6.5.6: an authzid the certificate does not vouch for is invalid-authzid.
        let (local, domain) = split_bare_jid(authzid).ok_or(SaslFailure::InvalidAuthzid)?;
        if !same_domain(domain, &ctx.domain) {
            return Err(SaslFailure::InvalidAuthzid);
        }
        ours.into_iter()
            .find(|own| same_caseless(own, local))
            .ok_or(SaslFailure::InvalidAuthzid)?
    };
    // Certificate-only accounts (no SCRAM keys) are fine here; unknown or disabled ones are not.
    let account = ctx
        .lookup
        .lookup(localpart)
        .ok_or(SaslFailure::NotAuthorized)?;
    Ok(account.localpart)
}

#[cfg(test)]
mod tests {
    use super::super::tests::context;
    use super::super::{CertIdentity, ChannelBindings, Exchange, Mechanism};
    use super::*;

    fn external(addrs: &[&str], authzid: &[u8]) -> Step {
        let cert = CertIdentity {
            xmpp_addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
        };
        let mut ex = Exchange::start(
            Mechanism::External,
            context(ChannelBindings::default(), Some(cert)),
        )
        .expect("starts with a certificate");
        ex.step(authzid)
    }

    fn ok(localpart: &str) -> Step {
        Step::Success {
            localpart: localpart.into(),
            additional_data: None,
        }
    }

    const NOT_AUTHORIZED: Step = Step::Failure(SaslFailure::NotAuthorized);
    const INVALID_AUTHZID: Step = Step::Failure(SaslFailure::InvalidAuthzid);

    #[test]
    fn a_single_xmpp_addr_authenticates_with_an_empty_authzid() {
        assert_eq!(external(&["sensor1@grid.test"], b""), ok("sensor1"));
        // Accounts with a password may use their certificate too.
        assert_eq!(external(&["Alice@GRID.test"], b""), ok("alice"));
        // Addresses of other domains do not count.
        assert_eq!(
            external(&["sensor1@grid.test", "x@other.test"], b""),
            ok("sensor1")
        );
    }

    #[test]
    fn no_or_several_addresses_for_our_domain_need_an_authzid() {
        assert_eq!(external(&[], b""), NOT_AUTHORIZED);
        assert_eq!(external(&["sensor1@other.test"], b""), NOT_AUTHORIZED);
        assert_eq!(
            external(&["grid.test", "sensor1@grid.test/res"], b""),
            NOT_AUTHORIZED
        );
        let two = ["sensor1@grid.test", "alice@grid.test"];
        assert_eq!(external(&two, b""), NOT_AUTHORIZED);
        assert_eq!(external(&two, b"alice@grid.test"), ok("alice"));
    }

    #[test]
    fn authzid_must_be_one_of_the_certificates_addresses_in_our_domain() {
        let addrs = ["sensor1@grid.test", "alice@grid.test"];
        assert_eq!(external(&addrs, b"SENSOR1@grid.TEST"), ok("sensor1"));
        assert_eq!(external(&addrs, b"bob@grid.test"), INVALID_AUTHZID);
        assert_eq!(
            external(&["sensor1@other.test"], b"sensor1@other.test"),
            INVALID_AUTHZID
        );
        assert_eq!(external(&addrs, b"sensor1@grid.test/res"), INVALID_AUTHZID);
        assert_eq!(external(&addrs, b"sensor1"), INVALID_AUTHZID);
    }

    #[test]
    fn the_account_must_exist() {
        assert_eq!(external(&["revoked@grid.test"], b""), NOT_AUTHORIZED);
        assert_eq!(
            external(&["revoked@grid.test"], b"revoked@grid.test"),
            NOT_AUTHORIZED
        );
    }

    #[test]
    fn malformed_authzids_fail() {
        let malformed = Step::Failure(SaslFailure::MalformedRequest);
        assert_eq!(external(&["sensor1@grid.test"], b"\xff"), malformed);
        assert_eq!(
            external(&["sensor1@grid.test"], b"sensor1@grid.test\0x"),
            malformed
        );
    }

    #[test]
    fn without_a_certificate_external_is_not_available() {
        let ctx = context(ChannelBindings::default(), None);
        assert_eq!(
            Exchange::start(Mechanism::External, ctx.clone()).err(),
            Some(SaslFailure::InvalidMechanism)
        );
        assert_eq!(authenticate(&ctx, b""), Err(SaslFailure::NotAuthorized));
    }
}
