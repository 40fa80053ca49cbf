//! The authorization seam: the core asks before every action, "may principal P do
//! action A on resource R in context C?", and obeys the answer.
//!
//! Cedar policies answer in production (a later step); until then the controller
//! runs with [`AllowAll`]. Nothing outside this module decides access.

use crate::jid::BareJid;
use std::net::IpAddr;

/// What a platform is trying to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Log in to the controller (after authentication, before the session starts).
    Connect,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "connect",
        }
    }
}

/// Facts about the request that policies may use (RFC 8600 §8.3.3 admin by certificate only, ...).
#[derive(Debug, Clone)]
pub struct Context {
    /// "cert" for SASL EXTERNAL, otherwise the SASL mechanism name.
    pub authn: String,
    /// "TLSv1.3" or "TLSv1.2".
    pub tls_version: &'static str,
    pub source: IpAddr,
}

/// One question to the authorizer.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub principal: &'a BareJid,
    pub action: Action,
    pub context: &'a Context,
}

/// The answer, with the ids of the policies that decided it (for audit and explain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reasons: Vec<String>,
}

/// Anything that can decide.
pub trait Authorize: Send + Sync {
    fn authorize(&self, request: &Request<'_>) -> Decision;
}

/// Permits everything: the controller before policies are configured.
pub struct AllowAll;

impl Authorize for AllowAll {
    fn authorize(&self, _request: &Request<'_>) -> Decision {
        Decision { allowed: true, reasons: vec!["allow-all".into()] }
    }
}
