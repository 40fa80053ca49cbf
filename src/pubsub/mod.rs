//! The Broker: the XEP-0060 publish-subscribe service at `broker.<domain>`
//! through which platforms share security information (RFC 8600 §4-§6).
//!
//! - [`model`]: the vocabulary; [`service`]: the pure rules; [`store`]: sled.
//! - [`protocol`]: XEP-0060 XML ↔ typed requests, and the error table.
//! - [`broker`]: the task that owns the service, commits in groups, and fans out.
//! - [`payload`]: payload plugins at the broker: validators before storing, transformers at delivery.

pub mod model;
pub mod protocol;

pub mod service;
pub mod store;
pub mod broker;
pub mod payload;
