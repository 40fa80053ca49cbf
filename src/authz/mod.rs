//! The authorization seam: the core asks before every action, "may principal P do
//! action A on resource R in context C?", and obeys the answer.
//!
//! Cedar policies answer in production ([`cedar::CedarAuthorizer`], policies in
//! `policies/`); [`AllowAll`] serves tests and grids without policies. Nothing
//! outside this module decides access.

pub mod cedar;
pub mod entities;

use crate::jid::BareJid;
use std::net::IpAddr;

pub use cedar::{CedarAuthorizer, Explanation, PolicyError, ReloadReport};
pub use entities::PlatformFacts;

/// What a platform is trying to do. Broker actions name the Topic they act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Log in to the controller (after authentication, before the session starts).
    Connect,
    /// See that a Topic exists (disco#items, disco#info).
    Discover,
    Create,
    Configure,
    Delete,
    Purge,
    Publish,
    Retract,
    Subscribe,
    Retrieve,
    /// Owner management of a Topic's subscriptions and affiliations.
    ManageSubscriptions,
    /// Administer the controller (XEP-0133 commands, admin socket); resource: the controller.
    Admin,
    /// See personal data (contact e-mail, telephone, postal address) in a Topic's
    /// payloads (RFC 8600 §9). Asked per subscriber by payload transformers
    /// whose manifest lists it under `grants`.
    ReadPersonalData,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Discover => "discover",
            Action::Create => "create",
            Action::Configure => "configure",
            Action::Delete => "delete",
            Action::Purge => "purge",
            Action::Publish => "publish",
            Action::Retract => "retract",
            Action::Subscribe => "subscribe",
            Action::Retrieve => "retrieve",
            Action::ManageSubscriptions => "manage-subscriptions",
            Action::Admin => "admin",
            Action::ReadPersonalData => "read-personal-data",
        }
    }

    /// Every action, in declaration order.
    pub const ALL: [Action; 13] = [
        Action::Connect,
        Action::Discover,
        Action::Create,
        Action::Configure,
        Action::Delete,
        Action::Purge,
        Action::Publish,
        Action::Retract,
        Action::Subscribe,
        Action::Retrieve,
        Action::ManageSubscriptions,
        Action::Admin,
        Action::ReadPersonalData,
    ];

    /// The action of a policy name ("publish", "manage-subscriptions", ...).
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Controller actions act on the controller, the others on a Topic.
    pub fn on_controller(self) -> bool {
        matches!(self, Action::Connect | Action::Admin)
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

/// The Topic a broker action is about, as the broker knows it.
#[derive(Debug, Clone, Copy)]
pub struct Topic<'a> {
    /// The node name.
    pub name: &'a str,
    /// `pubsub#type`: the payload namespace ("" if not set).
    pub payload_type: &'a str,
    /// The platform that created it (for a topic being created: the principal).
    pub owner: Option<&'a BareJid>,
}

/// One question to the authorizer.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub principal: &'a BareJid,
    pub action: Action,
    /// The Topic acted on (broker actions); None for controller actions.
    pub topic: Option<Topic<'a>>,
    pub context: &'a Context,
}

/// The answer, with the ids of the policies that decided it (for audit and explain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Ids of the determining policies: the satisfied forbids of a denial, the
    /// satisfied permits of an allowance; empty for a denial that no policy permits.
    pub reasons: Vec<String>,
    /// A determining policy carries `@honeytoken`: the caller raises an alert
    /// (audit record, alerts topic, optionally disabling the platform).
    pub honeytoken: bool,
}

/// Anything that can decide.
pub trait Authorize: Send + Sync {
    fn authorize(&self, request: &Request<'_>) -> Decision;
}

/// Permits everything: the controller before policies are configured.
pub struct AllowAll;

impl Authorize for AllowAll {
    fn authorize(&self, _request: &Request<'_>) -> Decision {
        Decision { allowed: true, reasons: vec!["allow-all".into()], honeytoken: false }
    }
}
