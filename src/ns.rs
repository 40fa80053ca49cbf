//! XML namespaces used by the controller, in one place.

pub const CLIENT: &str = "jabber:client";
pub const STREAM: &str = "http://etherx.jabber.org/streams";
pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 session establishment, still sent by old clients.
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// XEP-0440: SASL channel-binding type capability.
pub const SASL_CB: &str = "urn:xmpp:sasl-cb:0";
pub const PING: &str = "urn:xmpp:ping";
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0203 delayed delivery stamps.
pub const DELAY: &str = "urn:xmpp:delay";
/// XEP-0050 ad-hoc commands (carrying XEP-0133 service administration).
pub const COMMANDS: &str = "http://jabber.org/protocol/commands";
/// XEP-0133 command node prefix and form type.
pub const ADMIN: &str = "http://jabber.org/protocol/admin";
pub const DATA: &str = "jabber:x:data";
