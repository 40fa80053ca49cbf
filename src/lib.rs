//! xmpp-grid: an XMPP-Grid Controller and Broker (draft-ietf-mile-xmpp-grid,
//! published as RFC 8600).
//!
//! Glossary: a *Platform* (the draft's word) is an XMPP client account; the
//! *Controller* is this XMPP server; the *Broker* is its XEP-0060 service at
//! `broker.<domain>`, whose *Topics* are pubsub nodes.
//!
//! Map of the crate:
//! - [`config`]: `grid.toml`, typed, with defaults and bounds.
//! - [`server`]: listeners, shared state, shutdown; [`stream`]: one task per
//!   connection, the stream parser, negotiation (STARTTLS, SASL, bind).
//! - [`tls`], [`pki`]: rustls configuration, client identities, channel binding;
//!   the grid CA, certificates and CRL.
//! - [`sasl`]: SCRAM (-PLUS), PLAIN, EXTERNAL against stored SCRAM keys.
//! - [`router`], [`session`], [`disco`]: stanza routing between sessions and services.
//! - [`store`]: sled; [`admin`], [`provision`]: platform provisioning and revocation.
//! - [`audit`]: the hash-chained security audit log and its non-blocking sink.
//! - [`authz`]: the authorization seam; [`limits`]: per-address and per-account limits.
//! - [`xml`], [`jid`], [`error`], [`ns`]: elements, addresses, protocol errors, namespaces.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod authz;
pub mod client;
pub mod config;
pub mod disco;
pub mod error;
pub mod jid;
pub mod limits;
pub mod ns;
pub mod pki;
pub mod plugins;
pub mod provision;
pub mod pubsub;
pub mod router;
pub mod sasl;
pub mod server;
pub mod session;
pub mod store;
pub mod stream;
pub mod tls;
pub mod xml;

/// Logs to standard error, at `RUST_LOG` or else `info`: the binary's and the
/// examples' setting (stdout stays theirs for results).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}
