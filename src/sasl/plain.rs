//! PLAIN (RFC 4616): `[authzid] NUL authcid NUL passwd`, checked against the SHA-256 SCRAM keys.
//!
//! Role: parse the one message, check the authzid (RFC 6120 §6.3.8), then spend exactly one PBKDF2
//! whether or not the account exists, so timing does not tell an unknown account from a wrong
//! password. Everything before the PBKDF2 depends only on what the client sent.
//!
//! Must not: keep, log or compare the password in clear; be offered outside TLS (the caller's job).

use super::credentials::{Hash, check_password, decoy_keys};
use super::{SaslContext, SaslFailure, Step, authzid_names};

/// Handles the single PLAIN message.
/// The authcid a PLAIN message names, if it parses (for throttling failures).
pub(super) fn attempted_name(data: &[u8]) -> Option<String> {
    let msg = std::str::from_utf8(data).ok()?;
    msg.split('\0').nth(1).filter(|a| !a.is_empty()).map(str::to_owned)
}

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
    let malformed = SaslFailure::MalformedRequest;
    let msg = std::str::from_utf8(data).map_err(|_| malformed)?;
    let mut parts = msg.split('\0');
    // RFC 4616 §2: exactly two NULs; authcid and passwd are non-empty.
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(malformed);
    }
    if !authzid.is_empty() && !authzid_names(authzid, authcid, &ctx.domain) {
        return Err(SaslFailure::InvalidAuthzid);
    }

    let account = ctx.lookup.lookup(authcid);
    let real = account
        .as_ref()
        .and_then(|a| Some((a, a.credentials.as_ref()?)));
    match real {
        Some((account, creds)) if check_password(Hash::Sha256, &creds.sha256, password) => {
            Ok(account.localpart.clone())
        }
        Some(_) => Err(SaslFailure::NotAuthorized),
        None => {
            // Same PBKDF2 cost as a real check, against keys no password matches.
            let decoy = decoy_keys(
                &ctx.decoy_secret,
                Hash::Sha256,
                authcid,
                ctx.decoy_iterations,
            );
            let _ = check_password(Hash::Sha256, &decoy, password);
            Err(SaslFailure::NotAuthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{context, exporter};
    use super::super::{Exchange, Mechanism};
    use super::*;
    use std::time::{Duration, Instant};

    fn plain(msg: &[u8]) -> Step {
        let mut ex = Exchange::start(Mechanism::Plain, context(exporter(), None)).expect("starts");
        ex.step(msg)
    }

    fn ok(localpart: &str) -> Step {
        Step::Success {
            localpart: localpart.into(),
            additional_data: None,
        }
    }

    const NOT_AUTHORIZED: Step = Step::Failure(SaslFailure::NotAuthorized);

    #[test]
    fn right_password_succeeds_and_wrong_password_fails() {
        assert_eq!(plain(b"\0alice\0pencil"), ok("alice"));
        assert_eq!(plain(b"\0Alice\0pencil"), ok("alice"));
        assert_eq!(plain(b"\0bob\0correct horse"), ok("bob"));
        assert_eq!(plain(b"\0alice\0Pencil"), NOT_AUTHORIZED);
    }

    #[test]
    fn unknown_and_certificate_only_accounts_fail_like_a_wrong_password() {
        assert_eq!(plain(b"\0nobody\0pencil"), NOT_AUTHORIZED);
        assert_eq!(plain(b"\0sensor1\0pencil"), NOT_AUTHORIZED);
    }

    #[test]
    fn authzid_must_be_empty_or_the_authcids_bare_jid() {
        assert_eq!(plain(b"alice@grid.test\0alice\0pencil"), ok("alice"));
        assert_eq!(plain(b"ALICE@Grid.Test\0alice\0pencil"), ok("alice"));
        let invalid = Step::Failure(SaslFailure::InvalidAuthzid);
        assert_eq!(plain(b"bob@grid.test\0alice\0pencil"), invalid);
        assert_eq!(plain(b"alice@other.test\0alice\0pencil"), invalid);
        assert_eq!(plain(b"alice@grid.test/phone\0alice\0pencil"), invalid);
        assert_eq!(plain(b"alice\0alice\0pencil"), invalid);
    }

    #[test]
    fn malformed_messages_fail_without_panicking() {
        let malformed = Step::Failure(SaslFailure::MalformedRequest);
        for msg in [
            &b""[..],
            b"alice",
            b"\0alice",
            b"\0alice\0",
            b"\0\0pencil",
            b"\0alice\0pencil\0",
            b"\0alice\0pen\0cil",
            b"\0\0",
            b"\0\0\0",
            b"\0al\xffice\0pencil",
        ] {
            assert_eq!(plain(msg), malformed, "{msg:?}");
        }
    }

    #[test]
    fn unknown_accounts_cost_the_same_pbkdf2_as_known_ones() {
        // Coarse: both paths must spend a PBKDF2 (an early return would be ~1000x faster).
        let time = |msg: &[u8]| {
            let ctx = context(exporter(), None);
            let start = Instant::now();
            for _ in 0..5 {
                let mut ex = Exchange::start(Mechanism::Plain, ctx.clone()).expect("starts");
                ex.step(msg);
            }
            start.elapsed()
        };
        let known = time(b"\0alice\0wrong");
        let unknown = time(b"\0nobody\0wrong");
        assert!(
            unknown * 3 > known && known * 3 > unknown,
            "{known:?} vs {unknown:?}"
        );
        assert!(unknown > Duration::from_micros(50));
    }
}
