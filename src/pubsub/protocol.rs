//! The XEP-0060 XML layer: IQs and messages addressed to the broker become typed
//! [`Request`]s; [`Reply`]s and [`Event`]s become XML; [`PubsubError`]s become
//! stanza errors in one table (STYLE §5).
//!
//! Pure: no I/O, no state, no access decisions (that is `service.rs`). Payloads
//! are serialized once on publish (`to_standalone_bytes`) and embedded verbatim
//! as [`Node::Raw`] afterwards: they are never parsed again here.
//!
//! Section numbers refer to XEP-0060 1.26 unless another document is named.

// StanzaError carries its `pubsub#errors` Element inline (168 bytes). Errors are
// the cold path of a per-stanza parse, so the size costs nothing measurable;
// boxing `StanzaError::app` in error.rs would remove the need for this.
#![allow(clippy::result_large_err)]

use crate::disco::{self, Identity};
use crate::error::{ErrorType, StanzaError};
use crate::jid::{BareJid, Jid};
use crate::ns;
use crate::pubsub::model::{
    AccessModel, Affiliation, ConfigPatch, Event, Item, NodeConfig, NodeId, NodeInfo, Page, PageInfo,
    PublishModel, PubsubError, Reply, Request, SendLast, SubState, SubView,
};
use crate::xml::{Element, Node};
use bytes::Bytes;

pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
pub const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const NS_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// XEP-0004 data forms.
pub const NS_DATA: &str = "jabber:x:data";
/// XEP-0059 result set management.
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
/// FORM_TYPE of node configuration forms (§16.4.4).
pub const FORM_NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";
/// FORM_TYPE of publish-options forms (§7.1.5).
pub const FORM_PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
/// FORM_TYPE of node meta-data in disco#info (§5.4).
pub const FORM_META_DATA: &str = "http://jabber.org/protocol/pubsub#meta-data";
/// FORM_TYPE of subscription options (§6.3).
pub const FORM_SUBSCRIBE_OPTIONS: &str = "http://jabber.org/protocol/pubsub#subscribe_options";
/// FORM_TYPE of the subscription authorization form (§8.6).
pub const FORM_SUBSCRIBE_AUTH: &str = "http://jabber.org/protocol/pubsub#subscribe_authorization";

/// What the broker's disco#info advertises (§10, XEP-0030): exactly what the
/// service implements. Not advertised, because not implemented: `get-pending`
/// (ad-hoc commands), `retrieve-default-sub`,
/// `multi-subscribe`, `collections`, `presence-*`, `access-presence`,
/// `access-roster`, `auto-create`, `auto-subscribe`, `filtered-notifications`,
/// `leased-subscription`, `multi-items`.
pub const FEATURES: &[&str] = &[
    "http://jabber.org/protocol/pubsub",
    "http://jabber.org/protocol/pubsub#access-authorize",
    "http://jabber.org/protocol/pubsub#access-open",
    "http://jabber.org/protocol/pubsub#access-whitelist",
    "http://jabber.org/protocol/pubsub#config-node",
    "http://jabber.org/protocol/pubsub#config-node-max",
    "http://jabber.org/protocol/pubsub#create-and-configure",
    "http://jabber.org/protocol/pubsub#create-nodes",
    // §7.2 retraction is announced as `delete-items` (the feature its errors name)
    // and `retract-items` (the older registry name); clients look for either.
    "http://jabber.org/protocol/pubsub#delete-items",
    "http://jabber.org/protocol/pubsub#delete-nodes",
    "http://jabber.org/protocol/pubsub#instant-nodes",
    "http://jabber.org/protocol/pubsub#item-ids",
    "http://jabber.org/protocol/pubsub#last-published",
    "http://jabber.org/protocol/pubsub#manage-subscriptions",
    "http://jabber.org/protocol/pubsub#member-affiliation",
    "http://jabber.org/protocol/pubsub#meta-data",
    "http://jabber.org/protocol/pubsub#modify-affiliations",
    "http://jabber.org/protocol/pubsub#outcast-affiliation",
    "http://jabber.org/protocol/pubsub#persistent-items",
    "http://jabber.org/protocol/pubsub#publish",
    "http://jabber.org/protocol/pubsub#publish-only-affiliation",
    "http://jabber.org/protocol/pubsub#publish-options",
    "http://jabber.org/protocol/pubsub#publisher-affiliation",
    "http://jabber.org/protocol/pubsub#purge-nodes",
    "http://jabber.org/protocol/pubsub#retract-items",
    "http://jabber.org/protocol/pubsub#retrieve-affiliations",
    "http://jabber.org/protocol/pubsub#retrieve-default",
    "http://jabber.org/protocol/pubsub#retrieve-items",
    "http://jabber.org/protocol/pubsub#retrieve-subscriptions",
    "http://jabber.org/protocol/pubsub#rsm",
    "http://jabber.org/protocol/pubsub#subscribe",
    "http://jabber.org/protocol/pubsub#subscription-notifications",
    "http://jabber.org/protocol/pubsub#subscription-options",
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    NS_RSM,
    ns::DELAY,
];

// ---------------------------------------------------------------------------
// Errors: the one table (STYLE §5)
// ---------------------------------------------------------------------------

/// A `pubsub#errors` application condition element.
fn app(name: &str) -> Element {
    Element::new(name, NS_ERRORS)
}

/// A stanza error of type `kind` with an optional `pubsub#errors` condition.
fn err(kind: ErrorType, condition: &'static str, app_cond: Option<&str>) -> StanzaError {
    let e = StanzaError::new(condition).kind(kind);
    match app_cond {
        Some(a) => e.app(app(a)),
        None => e,
    }
}

/// modify/bad-request with a `pubsub#errors` condition (the §7.1.3, §6.1.3 shape).
fn bad_request(app_cond: &str) -> StanzaError {
    err(ErrorType::Modify, "bad-request", Some(app_cond))
}

/// modify/bad-request with only a text: malformed XML for which XEP-0060 names no condition.
fn malformed(text: &str) -> StanzaError {
    StanzaError::new("bad-request").kind(ErrorType::Modify).text(text)
}

/// cancel/feature-not-implemented + `<unsupported feature=…/>` (§5.1 and passim).
fn unsupported(feature: &str) -> StanzaError {
    err(ErrorType::Cancel, "feature-not-implemented", None)
        .app(app("unsupported").with_attr("feature", feature))
}

/// The XEP-0060 error for each service error.
impl From<&PubsubError> for StanzaError {
    fn from(e: &PubsubError) -> Self {
        use ErrorType::*;
        match e {
            // §6.1.3.?, §7.1.3.1 and passim: insufficient privileges.
            PubsubError::Forbidden => err(Auth, "forbidden", None),
            // §6.1.3.12, §7.1.3.3: node does not exist; §6.5.9.11: item does not exist.
            PubsubError::NodeNotFound | PubsubError::ItemNotFound => err(Cancel, "item-not-found", None),
            // §8.1.3: NodeID already exists.
            PubsubError::Conflict => err(Cancel, "conflict", None),
            // §6.2.3.2: requesting entity is not a subscriber.
            PubsubError::NotSubscribed => err(Cancel, "unexpected-request", Some("not-subscribed")),
            // §6.5.9.7: items requested while the subscription is pending.
            PubsubError::PendingSubscription => err(Auth, "not-authorized", Some("pending-subscription")),
            // §6.2.3.1, §6.3.3.?: several subscriptions and no subid.
            PubsubError::SubidRequired => bad_request("subid-required"),
            // §6.2.3.4: invalid subscription id.
            PubsubError::InvalidSubid => err(Modify, "not-acceptable", Some("invalid-subid")),
            // §6.1.3.1, §6.2.3.3: the JID does not match the requester.
            PubsubError::InvalidJid => bad_request("invalid-jid"),
            PubsubError::NodeIdRequired => bad_request("nodeid-required"),
            // §7.1.3.6 (publish to a persistent node without item), §7.2.3.3.
            PubsubError::ItemRequired => bad_request("item-required"),
            // §7.1.3.7: a payload-carrying node gets an item without payload.
            PubsubError::PayloadRequired => bad_request("payload-required"),
            // §7.1.3.4.
            PubsubError::PayloadTooBig { .. } => err(Modify, "not-acceptable", Some("payload-too-big")),
            // §7.1.5: publish-options do not match the node configuration.
            PubsubError::PreconditionNotMet(reason) => {
                err(Cancel, "conflict", Some("precondition-not-met")).text(reason.clone())
            }
            // §6.1.3.4: not on the whitelist.
            PubsubError::ClosedNode => err(Cancel, "not-allowed", Some("closed-node")),
            // §4.1, §6.1.3.?: outcasts are blocked.
            PubsubError::Outcast => err(Auth, "forbidden", None),
            PubsubError::Unsupported(feature) => unsupported(feature),
            // §8.2.5 (configuration form with an unacceptable value).
            PubsubError::BadConfig(text) => err(Modify, "not-acceptable", None).text(text.clone()),
            // A deployment quota (RFC 8600 §8.3.4: nodes per platform, items, subscriptions).
            // XEP-0060 answers its one quota, too-many-subscriptions (§6.1.3.?), with
            // wait/policy-violation; `max-nodes-exceeded`/`max-items-exceeded` exist in the
            // schema but need to know which limit, which the variant does not say.
            // resource-constraint would claim a transient server overload.
            PubsubError::LimitReached(text) => err(Wait, "policy-violation", None).text(text.clone()),
            // A payload validator (plugins/) refused the payload. XEP-0060 has no case
            // for content rules: §7.1.3.5 (bad-request + invalid-payload) is for the
            // wrong number or namespace of payloads. The payload is well-formed but
            // not acceptable, as for payload-too-big (§7.1.3.4): not-acceptable with
            // the §7.1.3.5 application condition, the violations as the text.
            PubsubError::InvalidPayload { reason, .. } => {
                err(Modify, "not-acceptable", Some("invalid-payload")).text(reason.clone())
            }
            // Detail goes to the log and audit, never on the wire.
            PubsubError::Storage(_) => err(Wait, "internal-server-error", None).text("internal error"),
        }
    }
}

/// The error for `e` in answer to `req`: where XEP-0060 words one service error
/// differently per use case, the request decides; otherwise the table above.
pub fn error_for(req: &Request, e: &PubsubError) -> StanzaError {
    match (req, e) {
        // §6.5.9.3: retrieving items of an authorize node without a subscription
        // (unsubscribing without one stays §6.2.3.2 unexpected-request).
        (Request::Items { .. }, PubsubError::NotSubscribed) => err(ErrorType::Auth, "not-authorized", Some("not-subscribed")),
        // §6.1.3.9: the subscription quota.
        (Request::Subscribe { .. }, PubsubError::LimitReached(text)) => {
            err(ErrorType::Wait, "policy-violation", Some("too-many-subscriptions")).text(text.clone())
        }
        _ => StanzaError::from(e),
    }
}

impl From<PubsubError> for StanzaError {
    fn from(e: PubsubError) -> Self {
        StanzaError::from(&e)
    }
}

// ---------------------------------------------------------------------------
// Parsing IQs
// ---------------------------------------------------------------------------

/// An IQ of type get or set addressed to the broker, as one typed request.
/// The router has checked the IQ shape; the checks are repeated cheaply here so
/// that this function is total on any input.
pub fn parse_iq(iq: &Element) -> Result<Request, StanzaError> {
    let set = match iq.attr("type") {
        Some("set") => true,
        Some("get") => false,
        _ => return Err(malformed("IQ type must be get or set")),
    };
    let mut children = iq.elements();
    let (Some(payload), None) = (children.next(), children.next()) else {
        return Err(malformed("an IQ carries exactly one child element"));
    };
    match payload.ns.as_str() {
        NS_PUBSUB if payload.name == "pubsub" => parse_pubsub(payload, set),
        NS_OWNER if payload.name == "pubsub" => parse_owner(payload, set),
        ns::DISCO_INFO if payload.name == "query" => {
            expect_get(set)?;
            Ok(Request::DiscoInfo { node: opt_node(payload) })
        }
        ns::DISCO_ITEMS if payload.name == "query" => {
            expect_get(set)?;
            Ok(Request::DiscoItems { node: opt_node(payload), page: parse_rsm(payload)? })
        }
        _ => Err(StanzaError::new("service-unavailable")),
    }
}

/// The action elements of the `pubsub` namespace; the other children
/// (`configure`, `publish-options`, `options`, RSM `set`) qualify an action.
const USER_ACTIONS: &[&str] = &[
    "create", "publish", "retract", "subscribe", "unsubscribe", "items", "subscriptions", "affiliations", "default",
];

fn parse_pubsub(ps: &Element, set: bool) -> Result<Request, StanzaError> {
    let action = ps
        .elements()
        .find(|e| e.ns == NS_PUBSUB && USER_ACTIONS.contains(&e.name.as_str()))
        .or_else(|| ps.child("options", NS_PUBSUB))
        .or_else(|| ps.elements().find(|e| e.ns == NS_PUBSUB));
    let Some(a) = action else {
        return Err(malformed("empty pubsub element"));
    };
    match (a.name.as_str(), set) {
        // §8.1.1 instant nodes (no node attribute), §8.1.2 create and configure.
        ("create", true) => {
            let config = match ps.child("configure", NS_PUBSUB) {
                Some(c) => parse_node_config_holder(c)?.unwrap_or_default(),
                None => ConfigPatch::default(),
            };
            Ok(Request::Create { node: opt_node(a), config })
        }
        // §7.1.1; §7.1.5 publish-options.
        ("publish", true) => {
            let node = node_attr(a)?;
            let mut items = a.elements().filter(|e| e.is("item", NS_PUBSUB));
            let item = match (items.next(), items.next()) {
                (Some(i), None) => i,
                // §7.1.3.6: our nodes always persist items, so an item is required.
                (None, _) => return Err(bad_request("item-required")),
                (Some(_), Some(_)) => return Err(malformed("one item per publish request")),
            };
            let item_id = item.attr("id").filter(|s| !s.is_empty()).map(str::to_owned);
            let payload = item_payload(item)?;
            let preconditions = match ps.child("publish-options", NS_PUBSUB) {
                Some(po) => match po.child("x", NS_DATA) {
                    Some(x) => parse_form(x, FORM_PUBLISH_OPTIONS, Mode::PublishOptions)?,
                    None => ConfigPatch::default(),
                },
                None => ConfigPatch::default(),
            };
            Ok(Request::Publish { node, item_id, payload, preconditions })
        }
        // §7.2.1.
        ("retract", true) => {
            let node = node_attr(a)?;
            let item_ids: Vec<String> = a
                .elements()
                .filter(|e| e.is("item", NS_PUBSUB))
                .map(|e| e.attr("id").unwrap_or_default().to_owned())
                .collect();
            // §7.2.3.3: every retraction names an item.
            if item_ids.is_empty() || item_ids.iter().any(String::is_empty) {
                return Err(bad_request("item-required"));
            }
            let notify = matches!(a.attr("notify"), Some("1" | "true"));
            Ok(Request::Retract { node, item_ids, notify })
        }
        // §6.1.1, with subscription options (§6.3.7).
        ("subscribe", true) => {
            let node = node_attr(a)?;
            let jid = jid_attr(a)?;
            let deliver = match ps.child("options", NS_PUBSUB).and_then(|o| o.child("x", NS_DATA)) {
                Some(x) => parse_sub_options(x)?,
                None => None,
            };
            Ok(Request::Subscribe { node, jid, deliver })
        }
        // §6.2.1.
        ("unsubscribe", true) => {
            let node = node_attr(a)?;
            let jid = jid_attr(a)?;
            Ok(Request::Unsubscribe { node, jid, subid: subid_attr(a) })
        }
        // §6.3.2 retrieve options, §6.3.5 submit them.
        ("options", false) => {
            let node = node_attr(a)?;
            let jid = jid_attr(a)?;
            Ok(Request::OptionsGet { node, jid, subid: subid_attr(a) })
        }
        ("options", true) => {
            let node = node_attr(a)?;
            let jid = jid_attr(a)?;
            let x = a.child("x", NS_DATA).ok_or_else(|| bad_request("invalid-options"))?;
            let deliver = parse_sub_options(x)?;
            Ok(Request::OptionsSet { node, jid, subid: subid_attr(a), deliver })
        }
        // §6.5.2 all items, §6.5.7 max_items, §6.5.8 by id, §6.5.4 RSM.
        ("items", false) => {
            let node = node_attr(a)?;
            let max_items = match a.attr("max_items") {
                Some(s) => Some(s.trim().parse::<u32>().map_err(|_| malformed("max_items is not a number"))?),
                None => None,
            };
            let mut item_ids = Vec::new();
            for i in a.elements().filter(|e| e.is("item", NS_PUBSUB)) {
                match i.attr("id") {
                    Some(id) if !id.is_empty() => item_ids.push(id.to_owned()),
                    _ => return Err(bad_request("item-required")),
                }
            }
            Ok(Request::Items { node, max_items, item_ids, page: parse_rsm(ps)? })
        }
        // §5.6.
        ("subscriptions", false) => Ok(Request::Subscriptions { node: opt_node(a) }),
        // §5.7.
        ("affiliations", false) => Ok(Request::Affiliations { node: opt_node(a) }),
        // §6.4: default *subscription* options; node defaults are asked in #owner (§8.3).
        ("default", false) => Err(unsupported("retrieve-default-sub")),
        (name, _) if USER_ACTIONS.contains(&name) || name == "options" => {
            Err(malformed(if set { "this request needs type get" } else { "this request needs type set" }))
        }
        _ => Err(err(ErrorType::Cancel, "feature-not-implemented", None)),
    }
}

const OWNER_ACTIONS: &[&str] = &["configure", "default", "delete", "purge", "subscriptions", "affiliations"];

fn parse_owner(ps: &Element, set: bool) -> Result<Request, StanzaError> {
    let Some(a) = ps.elements().find(|e| e.ns == NS_OWNER) else {
        return Err(malformed("empty pubsub element"));
    };
    match (a.name.as_str(), set) {
        // §8.2.1.
        ("configure", false) => Ok(Request::ConfigureGet { node: node_attr(a)? }),
        // §8.2.4 submit; §8.2.5 cancel (an empty patch: nothing changes).
        ("configure", true) => {
            let node = node_attr(a)?;
            match parse_node_config_holder(a)? {
                Some(config) => Ok(Request::ConfigureSet { node, config }),
                None => Err(malformed("configure needs a data form")),
            }
        }
        // §8.3.
        ("default", false) => Ok(Request::DefaultConfig),
        // §8.4.
        ("delete", true) => Ok(Request::Delete { node: node_attr(a)? }),
        // §8.5.
        ("purge", true) => Ok(Request::Purge { node: node_attr(a)? }),
        // §8.8.1.
        ("subscriptions", false) => Ok(Request::OwnerSubscriptions { node: node_attr(a)? }),
        // §8.8.2.
        ("subscriptions", true) => {
            let node = node_attr(a)?;
            let mut changes = Vec::new();
            for s in a.elements().filter(|e| e.is("subscription", NS_OWNER)) {
                let jid = jid_attr(s)?;
                let state = match s.attr("subscription") {
                    Some("none") => None,
                    Some("subscribed") => Some(SubState::Subscribed),
                    Some("pending") => Some(SubState::Pending),
                    Some("unconfigured") => return Err(unsupported("subscription-options")),
                    _ => return Err(malformed("unknown subscription state")),
                };
                changes.push((jid, state));
            }
            Ok(Request::OwnerSubscriptionsSet { node, changes })
        }
        // §8.9.1.
        ("affiliations", false) => Ok(Request::OwnerAffiliations { node: node_attr(a)? }),
        // §8.9.2: affiliations belong to bare JIDs (§4.1).
        ("affiliations", true) => {
            let node = node_attr(a)?;
            let mut changes = Vec::new();
            for e in a.elements().filter(|e| e.is("affiliation", NS_OWNER)) {
                let jid = jid_attr(e)?.bare().clone();
                let aff = e
                    .attr("affiliation")
                    .and_then(Affiliation::from_name)
                    .ok_or_else(|| malformed("unknown affiliation"))?;
                changes.push((jid, aff));
            }
            Ok(Request::OwnerAffiliationsSet { node, changes })
        }
        (name, _) if OWNER_ACTIONS.contains(&name) => {
            Err(malformed(if set { "this request needs type get" } else { "this request needs type set" }))
        }
        _ => Err(err(ErrorType::Cancel, "feature-not-implemented", None)),
    }
}

fn expect_get(set: bool) -> Result<(), StanzaError> {
    if set { Err(malformed("this request needs type get")) } else { Ok(()) }
}

/// The `node` attribute, which this request requires (nodeid-required).
fn node_attr(e: &Element) -> Result<NodeId, StanzaError> {
    opt_node(e).ok_or_else(|| bad_request("nodeid-required"))
}

/// The `node` attribute if present and non-empty.
fn opt_node(e: &Element) -> Option<NodeId> {
    e.attr("node").filter(|n| !n.is_empty()).map(|n| NodeId(n.to_owned()))
}

/// The `jid` attribute: missing → jid-required, unparsable → jid-malformed (RFC 6120 §8.3.3.8).
fn jid_attr(e: &Element) -> Result<Jid, StanzaError> {
    let s = e.attr("jid").filter(|s| !s.is_empty()).ok_or_else(|| bad_request("jid-required"))?;
    Jid::parse(s).map_err(|_| StanzaError::new("jid-malformed").kind(ErrorType::Modify))
}

fn subid_attr(e: &Element) -> Option<String> {
    e.attr("subid").filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The one payload element of an `<item>`, serialized standalone (empty if none).
/// §7.1.3.5: more than one payload element is bad-request + invalid-payload.
fn item_payload(item: &Element) -> Result<Bytes, StanzaError> {
    let mut payload = None;
    for n in &item.children {
        match n {
            Node::Element(e) if payload.is_none() => payload = Some(e),
            Node::Element(_) => return Err(bad_request("invalid-payload")),
            Node::Text(t) if t.trim().is_empty() => {}
            Node::Text(_) | Node::Raw(_) => return Err(bad_request("invalid-payload")),
        }
    }
    Ok(payload.map(|e| Bytes::from(e.to_standalone_bytes())).unwrap_or_default())
}

/// The XEP-0059 `<set>` child of `parent`, if any.
fn parse_rsm(parent: &Element) -> Result<Option<Page>, StanzaError> {
    let Some(set) = parent.child("set", NS_RSM) else {
        return Ok(None);
    };
    let max = match set.child("max", NS_RSM) {
        Some(m) => Some(m.text().trim().parse::<u32>().map_err(|_| malformed("RSM max is not a number"))?),
        None => None,
    };
    Ok(Some(Page {
        max,
        after: set.child("after", NS_RSM).map(Element::text),
        before: set.child("before", NS_RSM).map(Element::text),
    }))
}

// ---------------------------------------------------------------------------
// Data forms (XEP-0004) for node_config and publish-options
// ---------------------------------------------------------------------------

/// Where a configuration form comes from: the error for a value we cannot
/// honour differs (§8.2.5 not-acceptable; §7.1.5 precondition-not-met).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    NodeConfig,
    PublishOptions,
}

/// A submitted form's fields: (var, values).
struct Fields<'a> {
    form_type: Option<String>,
    fields: Vec<(&'a str, Vec<String>)>,
}

fn read_fields(x: &Element) -> Fields<'_> {
    let mut form_type = None;
    let mut fields = Vec::new();
    for f in x.elements().filter(|e| e.is("field", NS_DATA)) {
        let var = f.attr("var").unwrap_or_default();
        let values: Vec<String> = f.elements().filter(|v| v.is("value", NS_DATA)).map(Element::text).collect();
        if var == "FORM_TYPE" {
            form_type = values.first().map(|v| v.trim().to_owned());
        } else {
            fields.push((var, values));
        }
    }
    Fields { form_type, fields }
}

/// A `<configure>` (create or owner configure): `None` for a cancelled form,
/// the empty patch for no form at all.
fn parse_node_config_holder(c: &Element) -> Result<Option<ConfigPatch>, StanzaError> {
    match c.child("x", NS_DATA) {
        Some(x) if x.attr("type") == Some("cancel") => Ok(Some(ConfigPatch::default())),
        Some(x) => parse_form(x, FORM_NODE_CONFIG, Mode::NodeConfig).map(Some),
        None => Ok(None),
    }
}

/// A submitted subscribe_options form (§6.3.5, fields of §16.4.2): the
/// `pubsub#deliver` value it asks for. Options with one behaviour here are
/// accepted when they ask for it; anything else is §6.3.5's bad-request +
/// invalid-options.
fn parse_sub_options(x: &Element) -> Result<Option<bool>, StanzaError> {
    let invalid = |text: String| bad_request("invalid-options").text(text);
    if x.attr("type") != Some("submit") {
        return Err(invalid("the data form must be of type submit".into()));
    }
    let f = read_fields(x);
    if f.form_type.as_deref() != Some(FORM_SUBSCRIBE_OPTIONS) {
        return Err(invalid(format!("the data form needs FORM_TYPE {FORM_SUBSCRIBE_OPTIONS}")));
    }
    let mut deliver = None;
    for (var, values) in f.fields {
        let Some(v) = values.first().map(|v| v.trim()) else { continue };
        let flag = match v {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        };
        match (var, flag) {
            ("pubsub#deliver", Some(d)) => deliver = Some(d),
            ("pubsub#digest" | "pubsub#include_body", Some(false)) => {}
            ("pubsub#subscription_type", _) if v == "items" => {}
            ("pubsub#subscription_depth", _) if v == "1" => {}
            _ if v.is_empty() => {}
            _ => return Err(invalid(format!("{var}={v} is not supported"))),
        }
    }
    Ok(deliver)
}

/// A submitted node_config or publish-options form as a patch.
fn parse_form(x: &Element, form_type: &str, mode: Mode) -> Result<ConfigPatch, StanzaError> {
    if x.attr("type") != Some("submit") {
        return Err(malformed("the data form must be of type submit"));
    }
    let f = read_fields(x);
    if f.form_type.as_deref() != Some(form_type) {
        return Err(malformed(&format!("the data form needs FORM_TYPE {form_type}")));
    }
    let mut p = ConfigPatch::default();
    for (var, values) in f.fields {
        let Some(v) = values.first().map(|v| v.trim()) else {
            continue; // no value: nothing requested for this field
        };
        let text = || values.first().cloned().unwrap_or_default();
        match var {
            "pubsub#title" => p.title = Some(text()),
            "pubsub#description" => p.description = Some(text()),
            "pubsub#type" => p.payload_type = Some(v.to_owned()),
            "pubsub#access_model" => match AccessModel::from_name(v) {
                Some(m) => p.access_model = Some(m),
                None if mode == Mode::NodeConfig => {
                    return Err(err(ErrorType::Modify, "not-acceptable", Some("unsupported-access-model")));
                }
                None => return Err(cannot_honour(var, v, mode)),
            },
            "pubsub#publish_model" => {
                p.publish_model = Some(PublishModel::from_name(v).ok_or_else(|| cannot_honour(var, v, mode))?)
            }
            // §16.4.4, config-node-max: "max" is the service maximum, clamped by the service.
            "pubsub#max_items" => {
                p.max_items = Some(if v == "max" {
                    u32::MAX
                } else {
                    let n = v.parse::<u64>().map_err(|_| cannot_honour(var, v, mode))?;
                    u32::try_from(n).unwrap_or(u32::MAX)
                })
            }
            "pubsub#item_expire" => p.item_expire_secs = Some(v.parse().map_err(|_| cannot_honour(var, v, mode))?),
            "pubsub#notify_retract" => p.notify_retract = Some(boolean(var, v, mode)?),
            "pubsub#notify_delete" => p.notify_delete = Some(boolean(var, v, mode)?),
            "pubsub#notify_config" => p.notify_config = Some(boolean(var, v, mode)?),
            "pubsub#persist_items" => p.persist_items = Some(boolean(var, v, mode)?),
            "pubsub#send_last_published_item" => {
                p.send_last_published_item = Some(SendLast::from_name(v).ok_or_else(|| cannot_honour(var, v, mode))?)
            }
            // Options with one behaviour here: accepted when they ask for it.
            "pubsub#deliver_payloads" | "pubsub#deliver_notifications" | "pubsub#subscribe" => {
                if !boolean(var, v, mode)? {
                    return Err(cannot_honour(var, v, mode));
                }
            }
            "pubsub#presence_based_delivery" | "pubsub#purge_offline" | "pubsub#notify_sub" => {
                if boolean(var, v, mode)? {
                    return Err(cannot_honour(var, v, mode));
                }
            }
            "pubsub#node_type" if v == "leaf" => {}
            // Unknown or unsupported options are ignored when empty, refused otherwise.
            _ if values.iter().all(|v| v.trim().is_empty()) => {}
            _ => return Err(cannot_honour(var, v, mode)),
        }
    }
    Ok(p)
}

/// A value we cannot honour: not-acceptable for configuration (§8.2.5), a failed
/// precondition for publish-options (§7.1.5: the node cannot match it).
fn cannot_honour(var: &str, value: &str, mode: Mode) -> StanzaError {
    let text = format!("{var}={value} is not supported");
    match mode {
        Mode::NodeConfig => err(ErrorType::Modify, "not-acceptable", None).text(text),
        Mode::PublishOptions => err(ErrorType::Cancel, "conflict", Some("precondition-not-met")).text(text),
    }
}

/// XEP-0004 §3.3 boolean: "1"/"true" or "0"/"false".
fn boolean(var: &str, v: &str, mode: Mode) -> Result<bool, StanzaError> {
    match v {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(cannot_honour(var, v, mode)),
    }
}

// ---------------------------------------------------------------------------
// Parsing messages
// ---------------------------------------------------------------------------

/// The owner's answer to a subscription authorization request (§8.6): a submitted
/// `pubsub#subscribe_authorization` form. None for any other message, for a
/// cancelled form, or for a malformed one (messages get no error replies here).
pub fn parse_message(msg: &Element) -> Option<Request> {
    if msg.attr("type") == Some("error") {
        return None;
    }
    let x = msg.child("x", NS_DATA)?;
    if x.attr("type") != Some("submit") {
        return None;
    }
    let f = read_fields(x);
    if f.form_type.as_deref() != Some(FORM_SUBSCRIBE_AUTH) {
        return None;
    }
    let value = |name: &str| {
        f.fields
            .iter()
            .find(|(var, _)| *var == name)
            .and_then(|(_, vals)| vals.first())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let node = NodeId(value("pubsub#node")?.to_owned());
    let jid = Jid::parse(value("pubsub#subscriber_jid")?).ok()?;
    let allow = match value("pubsub#allow")? {
        "1" | "true" => true,
        "0" | "false" => false,
        _ => return None,
    };
    let subid = value("pubsub#subid").map(str::to_owned);
    Some(Request::Approve { node, jid, subid, allow })
}

// ---------------------------------------------------------------------------
// Rendering replies
// ---------------------------------------------------------------------------

/// The payload of the IQ result answering `request` with `reply`; None for an
/// empty result. `broker` is the service's JID (disco#items lists nodes at it).
pub fn render_reply(reply: &Reply, request: &Request, broker: &str) -> Option<Element> {
    let pubsub = |child: Element| Element::new("pubsub", NS_PUBSUB).with_child(child);
    let owner = |child: Element| Element::new("pubsub", NS_OWNER).with_child(child);
    Some(match reply {
        Reply::Empty => return None,
        // §8.1.1: the result names the node (required for instant nodes).
        Reply::Created { node } => pubsub(Element::new("create", NS_PUBSUB).with_attr("node", &node.0)),
        // §8.2.1, §8.3.
        Reply::Config { node, config } => {
            let form = config_form(config);
            match (request, node) {
                (Request::DefaultConfig, _) | (_, None) => owner(Element::new("default", NS_OWNER).with_child(form)),
                (_, Some(n)) => owner(Element::new("configure", NS_OWNER).with_attr("node", &n.0).with_child(form)),
            }
        }
        // §7.1.2: the ItemID, ours or the publisher's.
        Reply::Published { node, item_id } => pubsub(
            Element::new("publish", NS_PUBSUB)
                .with_attr("node", &node.0)
                .with_child(Element::new("item", NS_PUBSUB).with_attr("id", item_id)),
        ),
        // §6.3.2: the options of a subscription: `pubsub#deliver` (§16.4.2).
        Reply::Subscription(s) if matches!(request, Request::OptionsGet { .. }) => {
            let deliver = Element::new("field", NS_DATA)
                .with_attr("var", "pubsub#deliver")
                .with_attr("type", "boolean")
                .with_attr("label", "Enable delivery?")
                .with_child(Element::new("value", NS_DATA).with_text(if s.deliver { "1" } else { "0" }));
            pubsub(
                Element::new("options", NS_PUBSUB)
                    .with_attr("node", &s.node.0)
                    .with_attr("jid", &s.jid)
                    .with_attr("subid", &s.subid)
                    .with_child(
                        Element::new("x", NS_DATA)
                            .with_attr("type", "form")
                            .with_child(hidden_form_type(FORM_SUBSCRIBE_OPTIONS))
                            .with_child(deliver),
                    ),
            )
        }
        // §6.1.2.
        Reply::Subscription(s) => pubsub(sub_element(s, NS_PUBSUB, true)),
        Reply::Subscriptions { node, subs } => {
            if matches!(request, Request::OwnerSubscriptions { .. } | Request::OwnerSubscriptionsSet { .. }) {
                // §8.8.1: the node on the list, the JIDs on the entries.
                let mut list = Element::new("subscriptions", NS_OWNER);
                if let Some(n) = node.as_ref().or_else(|| request_node(request)) {
                    list.set_attr("node", &n.0);
                }
                for s in subs {
                    list.push(sub_element(s, NS_OWNER, false));
                }
                owner(list)
            } else {
                // §5.6: each entry names its node.
                let mut list = Element::new("subscriptions", NS_PUBSUB);
                if let Some(n) = node {
                    list.set_attr("node", &n.0);
                }
                for s in subs {
                    list.push(sub_element(s, NS_PUBSUB, true));
                }
                pubsub(list)
            }
        }
        Reply::Affiliations { node, affs } => {
            if matches!(request, Request::OwnerAffiliations { .. } | Request::OwnerAffiliationsSet { .. }) {
                // §8.9.1: entities affiliated with one node.
                let mut list = Element::new("affiliations", NS_OWNER);
                if let Some(n) = node.as_ref().or_else(|| request_node(request)) {
                    list.set_attr("node", &n.0);
                }
                for (_, jid, aff) in affs {
                    list.push(
                        Element::new("affiliation", NS_OWNER)
                            .with_attr("jid", jid.to_string())
                            .with_attr("affiliation", aff.name()),
                    );
                }
                owner(list)
            } else {
                // §5.7: the requester's own affiliations, by node.
                let mut list = Element::new("affiliations", NS_PUBSUB);
                if let Some(n) = node {
                    list.set_attr("node", &n.0);
                }
                for (n, _, aff) in affs {
                    list.push(
                        Element::new("affiliation", NS_PUBSUB)
                            .with_attr("node", &n.0)
                            .with_attr("affiliation", aff.name()),
                    );
                }
                pubsub(list)
            }
        }
        // §6.5.2; §6.5.4 with the RSM set next to <items>.
        Reply::Items { node, items, page } => {
            let mut list = Element::new("items", NS_PUBSUB).with_attr("node", &node.0);
            for it in items {
                list.push(item_element(it, NS_PUBSUB));
            }
            let mut ps = pubsub(list);
            if let Some(p) = page {
                ps.push(rsm_set(p));
            }
            ps
        }
        // §5.1, XEP-0030.
        Reply::ServiceInfo => disco::info(
            None,
            &[Identity { category: "pubsub", kind: "service", name: "XMPP-Grid Broker".into() }],
            FEATURES,
        ),
        // §5.3, §5.4; RFC 8600 §5: pubsub#type must be given.
        Reply::NodeInfo(info) => node_info(info),
        // §5.2.
        Reply::NodeList { nodes, page } => {
            let mut q = Element::new("query", ns::DISCO_ITEMS);
            if let Request::DiscoItems { node: Some(n), .. } = request {
                q.set_attr("node", &n.0);
            }
            for (id, title) in nodes {
                let mut item = Element::new("item", ns::DISCO_ITEMS).with_attr("jid", broker).with_attr("node", &id.0);
                if !title.is_empty() {
                    item.set_attr("name", title);
                }
                q.push(item);
            }
            if let Some(p) = page {
                q.push(rsm_set(p));
            }
            q
        }
        // §5.5: items as `<item jid=BROKER name=ITEM-ID/>`.
        Reply::ItemIds { node, ids } => {
            let mut q = Element::new("query", ns::DISCO_ITEMS).with_attr("node", &node.0);
            for id in ids {
                q.push(Element::new("item", ns::DISCO_ITEMS).with_attr("jid", broker).with_attr("name", id));
            }
            q
        }
    })
}

/// The node a request is about, if it names one.
fn request_node(r: &Request) -> Option<&NodeId> {
    match r {
        Request::OwnerSubscriptions { node }
        | Request::OwnerSubscriptionsSet { node, .. }
        | Request::OwnerAffiliations { node }
        | Request::OwnerAffiliationsSet { node, .. } => Some(node),
        _ => None,
    }
}

/// A `<subscription>` entry; `with_node` for the user namespace, where each names its node.
fn sub_element(s: &SubView, namespace: &str, with_node: bool) -> Element {
    let mut e = Element::new("subscription", namespace);
    if with_node {
        e.set_attr("node", &s.node.0);
    }
    e.with_attr("jid", &s.jid).with_attr("subid", &s.subid).with_attr("subscription", s.state.name())
}

/// `<item id publisher>` with the stored payload embedded verbatim.
fn item_element(it: &Item, namespace: &str) -> Element {
    let mut e = Element::new("item", namespace)
        .with_attr("id", &it.id)
        .with_attr("publisher", it.publisher.to_string());
    if !it.payload.is_empty() {
        e.children.push(Node::Raw(it.payload.clone()));
    }
    e
}

/// The XEP-0059 `<set>` describing a returned page.
fn rsm_set(p: &PageInfo) -> Element {
    let mut set = Element::new("set", NS_RSM);
    if let Some(f) = &p.first {
        set.push(Element::new("first", NS_RSM).with_text(f));
    }
    if let Some(l) = &p.last {
        set.push(Element::new("last", NS_RSM).with_text(l));
    }
    set.with_child(Element::new("count", NS_RSM).with_text(p.count.to_string()))
}

/// A data form field with type, label and values.
fn field(var: &str, kind: &str, label: &str, values: &[&str]) -> Element {
    let mut f = Element::new("field", NS_DATA).with_attr("var", var).with_attr("type", kind);
    if !label.is_empty() {
        f.set_attr("label", label);
    }
    for v in values {
        f.push(Element::new("value", NS_DATA).with_text(*v));
    }
    f
}

fn hidden_form_type(form_type: &str) -> Element {
    field("FORM_TYPE", "hidden", "", &[form_type])
}

/// A list-single field with its options (value, label).
fn list_single(var: &str, label: &str, value: &str, options: &[(&str, &str)]) -> Element {
    let mut f = field(var, "list-single", label, &[value]);
    for (v, l) in options {
        f.push(
            Element::new("option", NS_DATA)
                .with_attr("label", *l)
                .with_child(Element::new("value", NS_DATA).with_text(*v)),
        );
    }
    f
}

fn bool_str(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

/// The full `pubsub#node_config` form (§16.4.4) for a node's configuration.
fn config_form(c: &NodeConfig) -> Element {
    let max_items = c.max_items.to_string();
    let expire = c.item_expire_secs.to_string();
    Element::new("x", NS_DATA)
        .with_attr("type", "form")
        .with_child(hidden_form_type(FORM_NODE_CONFIG))
        .with_child(field("pubsub#title", "text-single", "A friendly name for the node", &[&c.title]))
        .with_child(field("pubsub#description", "text-single", "A description of the node", &[&c.description]))
        .with_child(field(
            "pubsub#type",
            "text-single",
            "The type of node data, usually specified by the namespace of the payload",
            &[&c.payload_type],
        ))
        .with_child(list_single(
            "pubsub#access_model",
            "Specify the subscriber model",
            c.access_model.name(),
            &[
                ("authorize", "Subscription requests must be approved and only subscribers may retrieve items"),
                ("open", "Anyone may subscribe and retrieve items"),
                ("whitelist", "Only those on a whitelist may subscribe and retrieve items"),
            ],
        ))
        .with_child(list_single(
            "pubsub#publish_model",
            "Specify the publisher model",
            c.publish_model.name(),
            &[
                ("publishers", "Only publishers may publish"),
                ("subscribers", "Subscribers may publish"),
                ("open", "Anyone may publish"),
            ],
        ))
        .with_child(field("pubsub#max_items", "text-single", "Max # of items to persist", &[&max_items]))
        .with_child(field(
            "pubsub#item_expire",
            "text-single",
            "Number of seconds after which to automatically purge items (0: never)",
            &[&expire],
        ))
        .with_child(field("pubsub#persist_items", "boolean", "Persist items to storage", &["1"]))
        .with_child(field(
            "pubsub#notify_retract",
            "boolean",
            "Notify subscribers when items are removed from the node",
            &[bool_str(c.notify_retract)],
        ))
        .with_child(field(
            "pubsub#notify_delete",
            "boolean",
            "Notify subscribers when the node is deleted",
            &[bool_str(c.notify_delete)],
        ))
        .with_child(field(
            "pubsub#notify_config",
            "boolean",
            "Notify subscribers when the node configuration changes",
            &[bool_str(c.notify_config)],
        ))
        .with_child(list_single(
            "pubsub#send_last_published_item",
            "When to send the last published item",
            c.send_last_published_item.name(),
            &[("never", "Never"), ("on_sub", "When a new subscription is processed")],
        ))
}

/// disco#info of one node: identity pubsub/leaf and the meta-data form (§5.4).
fn node_info(info: &NodeInfo) -> Element {
    let c = &info.config;
    let owners: Vec<String> = info.owners.iter().map(BareJid::to_string).collect();
    let owner_refs: Vec<&str> = owners.iter().map(String::as_str).collect();
    let creator = info.creator.to_string();
    let created = xep0082(info.created.saturating_mul(1000), false);
    let subs = info.num_subscribers.to_string();
    let max_items = c.max_items.to_string();
    let form = Element::new("x", NS_DATA)
        .with_attr("type", "result")
        .with_child(hidden_form_type(FORM_META_DATA))
        .with_child(field("pubsub#type", "text-single", "Payload type", &[&c.payload_type]))
        .with_child(field("pubsub#title", "text-single", "A short name for the node", &[&c.title]))
        .with_child(field("pubsub#description", "text-single", "A description of the node", &[&c.description]))
        .with_child(field("pubsub#owner", "jid-multi", "Node owners", &owner_refs))
        .with_child(field("pubsub#creator", "jid-single", "Node creator", &[&creator]))
        .with_child(field("pubsub#creation_date", "text-single", "Creation date", &[&created]))
        .with_child(field("pubsub#access_model", "text-single", "Access model", &[c.access_model.name()]))
        .with_child(field("pubsub#publish_model", "text-single", "Publish model", &[c.publish_model.name()]))
        .with_child(field("pubsub#num_subscribers", "text-single", "Number of subscribers", &[&subs]))
        .with_child(field("pubsub#max_items", "text-single", "Max # of items to persist", &[&max_items]));
    let mut identity = Element::new("identity", ns::DISCO_INFO).with_attr("category", "pubsub").with_attr("type", "leaf");
    if !c.title.is_empty() {
        identity.set_attr("name", &c.title);
    }
    Element::new("query", ns::DISCO_INFO)
        .with_attr("node", &info.id.0)
        .with_child(identity)
        .with_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", NS_PUBSUB))
        .with_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", ns::DISCO_INFO))
        .with_child(form)
}

// ---------------------------------------------------------------------------
// Rendering events
// ---------------------------------------------------------------------------

/// The content of a notification `<message>` from `broker`: the `pubsub#event`
/// element (§7.1.2.1 items, §7.2.2.1 retract, §8.5.2 purge, §8.4.2 delete,
/// §8.2.6 configuration, §8.8.4 subscription), or for an approval request the
/// §8.6 authorization form.
pub fn render_event(event: &Event, broker: &str) -> Element {
    let ev = |child: Element| Element::new("event", NS_EVENT).with_child(child);
    match event {
        Event::Items { node, items } => {
            let mut list = Element::new("items", NS_EVENT).with_attr("node", &node.0);
            for it in items {
                list.push(item_element(it, NS_EVENT));
            }
            ev(list)
        }
        Event::Retract { node, item_ids } => {
            let mut list = Element::new("items", NS_EVENT).with_attr("node", &node.0);
            for id in item_ids {
                list.push(Element::new("retract", NS_EVENT).with_attr("id", id));
            }
            ev(list)
        }
        Event::Purge { node } => ev(Element::new("purge", NS_EVENT).with_attr("node", &node.0)),
        Event::Delete { node } => ev(Element::new("delete", NS_EVENT).with_attr("node", &node.0)),
        Event::Configuration { node } => ev(Element::new("configuration", NS_EVENT).with_attr("node", &node.0)),
        Event::Subscription { node, jid, subid, state } => {
            let mut e = Element::new("subscription", NS_EVENT)
                .with_attr("node", &node.0)
                .with_attr("jid", jid)
                .with_attr("subscription", state.map_or("none", SubState::name));
            if !subid.is_empty() {
                e.set_attr("subid", subid);
            }
            ev(e)
        }
        Event::ApprovalRequest { node, jid, subid } => {
            let _ = broker; // the message's `from`, set by the caller
            Element::new("x", NS_DATA)
                .with_attr("type", "form")
                .with_child(Element::new("title", NS_DATA).with_text("PubSub subscriber request"))
                .with_child(Element::new("instructions", NS_DATA).with_text(
                    "To approve this entity's subscription request, click the OK button. \
                     To deny the request, click the cancel button.",
                ))
                .with_child(hidden_form_type(FORM_SUBSCRIBE_AUTH))
                .with_child(field("pubsub#subid", "hidden", "", &[subid]))
                .with_child(field("pubsub#node", "text-single", "Node ID", &[&node.0]))
                .with_child(field("pubsub#subscriber_jid", "jid-single", "Subscriber Address", &[jid]))
                .with_child(field(
                    "pubsub#allow",
                    "boolean",
                    "Allow this JID to subscribe to this pubsub node?",
                    &["false"],
                ))
        }
    }
}

/// XEP-0203 `<delay/>` for an item delivered late (last published item,
/// offline delivery), stamped with its publication time.
pub fn delay(stamp_ms: u64, broker: &str) -> Element {
    Element::new("delay", ns::DELAY).with_attr("from", broker).with_attr("stamp", xep0082(stamp_ms, true))
}

/// XEP-0082 DateTime in UTC, `YYYY-MM-DDThh:mm:ss[.sss]Z`.
pub fn xep0082(ms: u64, with_millis: bool) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    let sod = secs % 86_400;
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    if with_millis {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z", ms % 1000)
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (H. Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    const BROKER: &str = "broker.grid.test";
    const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";

    fn stanza(xml: &str) -> Element {
        crate::stream::parser::test_stanza(xml)
    }

    fn iq(kind: &str, body: &str) -> Element {
        stanza(&format!("<iq type='{kind}' id='q1' from='hamlet@grid.test/elsinore' to='{BROKER}'>{body}</iq>"))
    }

    fn ps(kind: &str, body: &str) -> Result<Request, StanzaError> {
        parse_iq(&iq(kind, &format!("<pubsub xmlns='{NS_PUBSUB}'>{body}</pubsub>")))
    }

    fn owner(kind: &str, body: &str) -> Result<Request, StanzaError> {
        parse_iq(&iq(kind, &format!("<pubsub xmlns='{NS_OWNER}'>{body}</pubsub>")))
    }

    fn node(s: &str) -> NodeId {
        NodeId(s.into())
    }

    fn jid(s: &str) -> Jid {
        Jid::parse(s).unwrap()
    }

    fn bare(s: &str) -> BareJid {
        BareJid::parse(s).unwrap()
    }

    /// (type, condition, pubsub#errors condition) of an error.
    type Shape = (&'static str, &'static str, Option<String>);

    fn shape(e: &StanzaError) -> Shape {
        (e.kind.name(), e.condition, e.app.as_ref().map(|a| a.name.clone()))
    }

    fn fails(r: Result<Request, StanzaError>) -> Shape {
        match r {
            Err(e) => shape(&e),
            Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    fn s(e: &Element) -> String {
        String::from_utf8(e.to_bytes(ns::CLIENT)).unwrap()
    }

    fn form(form_type: &str, fields: &str) -> String {
        format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
             <value>{form_type}</value></field>{fields}</x>"
        )
    }

    fn f(var: &str, value: &str) -> String {
        format!("<field var='{var}'><value>{value}</value></field>")
    }

    fn sample_config() -> NodeConfig {
        NodeConfig {
            title: "Incidents".into(),
            description: "IODEF incident reports".into(),
            payload_type: IODEF.into(),
            access_model: AccessModel::Whitelist,
            publish_model: PublishModel::Publishers,
            max_items: 500,
            item_expire_secs: 86_400,
            notify_retract: true,
            notify_delete: false,
            notify_config: true,
            send_last_published_item: SendLast::OnSub,
        }
    }

    fn sample_item(id: &str, payload: &str) -> Item {
        Item {
            id: id.into(),
            seq: 1,
            publisher: bare("sensor1@grid.test"),
            published_ms: 0,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    // --- create and configure (§8.1, §8.2, §8.3) ---

    #[test]
    fn create_with_node_and_without_node_for_instant_nodes() {
        assert_eq!(
            ps("set", "<create node='princely_musings'/>"),
            Ok(Request::Create { node: Some(node("princely_musings")), config: ConfigPatch::default() })
        );
        assert_eq!(ps("set", "<create/>"), Ok(Request::Create { node: None, config: ConfigPatch::default() }));
        assert_eq!(
            ps("set", "<create node=''/><configure/>"),
            Ok(Request::Create { node: None, config: ConfigPatch::default() })
        );
    }

    #[test]
    fn create_and_configure_maps_every_node_config_field() {
        let fields = [
            f("pubsub#title", "Princely Musings (Atom)"),
            f("pubsub#description", " spaces kept "),
            f("pubsub#type", IODEF),
            f("pubsub#access_model", "authorize"),
            f("pubsub#publish_model", "subscribers"),
            f("pubsub#max_items", "max"),
            f("pubsub#item_expire", "604800"),
            f("pubsub#notify_retract", "true"),
            f("pubsub#notify_delete", "0"),
            f("pubsub#notify_config", "1"),
            f("pubsub#send_last_published_item", "on_sub_and_presence"),
            f("pubsub#persist_items", "false"),
            f("pubsub#deliver_payloads", "1"),
            f("pubsub#presence_based_delivery", "false"),
            f("pubsub#node_type", "leaf"),
            "<field var='pubsub#roster_groups_allowed'/>".into(),
            f("pubsub#collection", ""),
        ]
        .concat();
        let r = ps("set", &format!("<create node='n'/><configure>{}</configure>", form(FORM_NODE_CONFIG, &fields)));
        let want = ConfigPatch {
            title: Some("Princely Musings (Atom)".into()),
            description: Some(" spaces kept ".into()),
            payload_type: Some(IODEF.into()),
            access_model: Some(AccessModel::Authorize),
            publish_model: Some(PublishModel::Subscribers),
            max_items: Some(u32::MAX),
            item_expire_secs: Some(604_800),
            notify_retract: Some(true),
            notify_delete: Some(false),
            notify_config: Some(true),
            send_last_published_item: Some(SendLast::OnSub),
            persist_items: Some(false),
        };
        assert_eq!(r, Ok(Request::Create { node: Some(node("n")), config: want }));
    }

    #[test]
    fn max_items_above_u32_saturates_and_garbage_is_not_acceptable() {
        let cfg = |v: &str| {
            owner("set", &format!("<configure node='n'>{}</configure>", form(FORM_NODE_CONFIG, &f("pubsub#max_items", v))))
        };
        assert!(matches!(
            cfg("99999999999"),
            Ok(Request::ConfigureSet { config: ConfigPatch { max_items: Some(u32::MAX), .. }, .. })
        ));
        assert_eq!(fails(cfg("-1")), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg("lots")), ("modify", "not-acceptable", None));
    }

    #[test]
    fn config_form_errors_follow_xep_0060() {
        let cfg =
            |fields: &str| owner("set", &format!("<configure node='n'>{}</configure>", form(FORM_NODE_CONFIG, fields)));
        // Access models we do not implement (presence, roster) or unknown ones.
        assert_eq!(
            fails(cfg(&f("pubsub#access_model", "presence"))),
            ("modify", "not-acceptable", Some("unsupported-access-model".into()))
        );
        assert_eq!(fails(cfg(&f("pubsub#publish_model", "everyone"))), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg(&f("pubsub#notify_retract", "yes"))), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg(&f("pubsub#send_last_published_item", "always"))), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg(&f("pubsub#item_expire", "soon"))), ("modify", "not-acceptable", None));
        // Fixed behaviours: asking for the other one cannot be honoured.
        assert_eq!(fails(cfg(&f("pubsub#deliver_payloads", "0"))), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg(&f("pubsub#presence_based_delivery", "1"))), ("modify", "not-acceptable", None));
        assert_eq!(fails(cfg(&f("pubsub#node_type", "collection"))), ("modify", "not-acceptable", None));
        // Unknown field with a value.
        let e = cfg(&f("pubsub#body_xslt", "x.xsl")).unwrap_err();
        assert_eq!(e.text.as_deref(), Some("pubsub#body_xslt=x.xsl is not supported"));
        // Wrong or missing FORM_TYPE, wrong form type.
        let bad_type = format!("<configure node='n'>{}</configure>", form("urn:other", ""));
        assert_eq!(fails(owner("set", &bad_type)), ("modify", "bad-request", None));
        let no_type = "<configure node='n'><x xmlns='jabber:x:data' type='submit'/></configure>";
        assert_eq!(fails(owner("set", no_type)), ("modify", "bad-request", None));
        let not_submit =
            format!("<configure node='n'>{}</configure>", form(FORM_NODE_CONFIG, "").replace("submit", "form"));
        assert_eq!(fails(owner("set", &not_submit)), ("modify", "bad-request", None));
        // A configure set without any form.
        assert_eq!(fails(owner("set", "<configure node='n'/>")), ("modify", "bad-request", None));
    }

    #[test]
    fn configure_get_set_cancel_and_default() {
        assert_eq!(owner("get", "<configure node='n'/>"), Ok(Request::ConfigureGet { node: node("n") }));
        assert_eq!(fails(owner("get", "<configure/>")), ("modify", "bad-request", Some("nodeid-required".into())));
        let set = format!("<configure node='n'>{}</configure>", form(FORM_NODE_CONFIG, &f("pubsub#title", "T")));
        assert_eq!(
            owner("set", &set),
            Ok(Request::ConfigureSet {
                node: node("n"),
                config: ConfigPatch { title: Some("T".into()), ..Default::default() }
            })
        );
        // §8.2.5: a cancelled form changes nothing.
        let cancel = "<configure node='n'><x xmlns='jabber:x:data' type='cancel'/></configure>";
        assert_eq!(owner("set", cancel), Ok(Request::ConfigureSet { node: node("n"), config: ConfigPatch::default() }));
        assert_eq!(owner("get", "<default/>"), Ok(Request::DefaultConfig));
    }

    #[test]
    fn rendered_config_form_parses_back_to_the_same_configuration() {
        let c = sample_config();
        let reply = Reply::Config { node: Some(node("n")), config: c.clone() };
        let req = Request::ConfigureGet { node: node("n") };
        let out = render_reply(&reply, &req, BROKER).unwrap();
        let text = s(&out);
        assert!(
            text.starts_with(&format!(
                "<pubsub xmlns='{NS_OWNER}'><configure node='n'><x xmlns='jabber:x:data' type='form'>"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "<field var='pubsub#access_model' type='list-single' label='Specify the subscriber model'>\
                 <value>whitelist</value><option label="
            ),
            "{text}"
        );
        // A client submits the form back: same fields, type submit.
        let x = out.child("configure", NS_OWNER).and_then(|c| c.child("x", NS_DATA)).unwrap();
        let submitted = String::from_utf8(x.to_bytes("")).unwrap().replacen("type='form'", "type='submit'", 1);
        let r = owner("set", &format!("<configure node='n'>{submitted}</configure>"));
        let Ok(Request::ConfigureSet { config: p, .. }) = r else { panic!("{r:?}") };
        let back = NodeConfig {
            title: p.title.unwrap(),
            description: p.description.unwrap(),
            payload_type: p.payload_type.unwrap(),
            access_model: p.access_model.unwrap(),
            publish_model: p.publish_model.unwrap(),
            max_items: p.max_items.unwrap(),
            item_expire_secs: p.item_expire_secs.unwrap(),
            notify_retract: p.notify_retract.unwrap(),
            notify_delete: p.notify_delete.unwrap(),
            notify_config: p.notify_config.unwrap(),
            send_last_published_item: p.send_last_published_item.unwrap(),
        };
        assert_eq!(back, c);
        assert_eq!(p.persist_items, Some(true));
    }

    #[test]
    fn default_config_renders_in_default_element() {
        let reply = Reply::Config { node: None, config: sample_config() };
        let out = render_reply(&reply, &Request::DefaultConfig, BROKER).unwrap();
        assert!(out.is("pubsub", NS_OWNER));
        assert!(out.child("default", NS_OWNER).and_then(|d| d.child("x", NS_DATA)).is_some());
    }

    #[test]
    fn delete_and_purge() {
        assert_eq!(owner("set", "<delete node='n'/>"), Ok(Request::Delete { node: node("n") }));
        assert_eq!(owner("set", "<purge node='n'/>"), Ok(Request::Purge { node: node("n") }));
        assert_eq!(fails(owner("set", "<delete/>")), ("modify", "bad-request", Some("nodeid-required".into())));
        assert_eq!(fails(owner("get", "<purge node='n'/>")), ("modify", "bad-request", None));
    }

    // --- publish and retract (§7) ---

    #[test]
    fn publish_serializes_the_one_payload_standalone() {
        let body = format!(
            "<publish node='incidents'><item id='ae890ac52d0df67ed7cfdf51b644e901'>\
             <iodef:IODEF-Document xmlns:iodef='{IODEF}' version='2.00'><iodef:Incident purpose='reporting'/>\
             </iodef:IODEF-Document></item></publish>"
        );
        let r = ps("set", &body).unwrap();
        let Request::Publish { node: n, item_id, payload, preconditions } = r else { panic!() };
        assert_eq!(n, node("incidents"));
        assert_eq!(item_id.as_deref(), Some("ae890ac52d0df67ed7cfdf51b644e901"));
        assert_eq!(preconditions, ConfigPatch::default());
        assert_eq!(
            std::str::from_utf8(&payload).unwrap(),
            format!(
                "<iodef:IODEF-Document xmlns:iodef='{IODEF}' version='2.00'><iodef:Incident purpose='reporting'/>\
                 </iodef:IODEF-Document>"
            )
        );
        // A payload in no namespace keeps `xmlns=''` so it never inherits its new parent's.
        let r = ps("set", "<publish node='n'><item><entry xmlns=''>x</entry></item></publish>").unwrap();
        let Request::Publish { item_id, payload, .. } = r else { panic!() };
        assert_eq!(item_id, None);
        assert_eq!(&payload[..], b"<entry xmlns=''>x</entry>");
        // Without payload: empty bytes, the service decides.
        let r = ps("set", "<publish node='n'><item id='i'> </item></publish>").unwrap();
        assert!(matches!(r, Request::Publish { payload, .. } if payload.is_empty()));
    }

    #[test]
    fn publish_errors() {
        assert_eq!(
            fails(ps("set", "<publish><item/></publish>")),
            ("modify", "bad-request", Some("nodeid-required".into()))
        );
        assert_eq!(fails(ps("set", "<publish node='n'/>")), ("modify", "bad-request", Some("item-required".into())));
        assert_eq!(
            fails(ps("set", "<publish node='n'><item><a xmlns='urn:a'/><b xmlns='urn:b'/></item></publish>")),
            ("modify", "bad-request", Some("invalid-payload".into()))
        );
        assert_eq!(
            fails(ps("set", "<publish node='n'><item>text<a xmlns='urn:a'/></item></publish>")),
            ("modify", "bad-request", Some("invalid-payload".into()))
        );
        assert_eq!(fails(ps("set", "<publish node='n'><item/><item/></publish>")), ("modify", "bad-request", None));
        assert_eq!(fails(ps("get", "<publish node='n'><item/></publish>")), ("modify", "bad-request", None));
    }

    #[test]
    fn publish_options_become_preconditions() {
        let po =
            form(FORM_PUBLISH_OPTIONS, &(f("pubsub#access_model", "whitelist") + &f("pubsub#max_items", "max")));
        let body = format!(
            "<publish node='n'><item id='i'><x xmlns='urn:p'/></item></publish><publish-options>{po}</publish-options>"
        );
        let r = ps("set", &body).unwrap();
        let Request::Publish { preconditions, .. } = r else { panic!() };
        assert_eq!(
            preconditions,
            ConfigPatch { access_model: Some(AccessModel::Whitelist), max_items: Some(u32::MAX), ..Default::default() }
        );
        // Options the node can never match fail as preconditions (§7.1.5).
        let po = form(FORM_PUBLISH_OPTIONS, &f("pubsub#access_model", "presence"));
        let body = format!("<publish node='n'><item/></publish><publish-options>{po}</publish-options>");
        assert_eq!(fails(ps("set", &body)), ("cancel", "conflict", Some("precondition-not-met".into())));
        let po = form(FORM_PUBLISH_OPTIONS, &f("pubsub#itemreply", "owner"));
        let body = format!("<publish node='n'><item/></publish><publish-options>{po}</publish-options>");
        assert_eq!(fails(ps("set", &body)), ("cancel", "conflict", Some("precondition-not-met".into())));
        // The node_config FORM_TYPE is not the publish-options one.
        let po = form(FORM_NODE_CONFIG, "");
        let body = format!("<publish node='n'><item/></publish><publish-options>{po}</publish-options>");
        assert_eq!(fails(ps("set", &body)), ("modify", "bad-request", None));
    }

    #[test]
    fn retract_with_notify_and_errors() {
        assert_eq!(
            ps("set", "<retract node='n' notify='true'><item id='a'/><item id='b'/></retract>"),
            Ok(Request::Retract { node: node("n"), item_ids: vec!["a".into(), "b".into()], notify: true })
        );
        assert_eq!(
            ps("set", "<retract node='n'><item id='a'/></retract>"),
            Ok(Request::Retract { node: node("n"), item_ids: vec!["a".into()], notify: false })
        );
        assert_eq!(fails(ps("set", "<retract node='n'/>")), ("modify", "bad-request", Some("item-required".into())));
        assert_eq!(
            fails(ps("set", "<retract node='n'><item/></retract>")),
            ("modify", "bad-request", Some("item-required".into()))
        );
        assert_eq!(
            fails(ps("set", "<retract><item id='a'/></retract>")),
            ("modify", "bad-request", Some("nodeid-required".into()))
        );
    }

    // --- subscriptions (§6) ---

    #[test]
    fn subscribe_unsubscribe_and_options() {
        assert_eq!(
            ps("set", "<subscribe node='princely_musings' jid='Francisco@Denmark.lit'/>"),
            Ok(Request::Subscribe { node: node("princely_musings"), jid: jid("francisco@denmark.lit"), deliver: None })
        );
        assert_eq!(
            ps(
                "set",
                "<unsubscribe node='n' jid='francisco@denmark.lit/barracks' \
                 subid='ba49252aaa4f5d320c24d3766f0bdcade78c78d3'/>"
            ),
            Ok(Request::Unsubscribe {
                node: node("n"),
                jid: jid("francisco@denmark.lit/barracks"),
                subid: Some("ba49252aaa4f5d320c24d3766f0bdcade78c78d3".into())
            })
        );
        assert_eq!(
            ps("get", "<options node='n' jid='francisco@denmark.lit'/>"),
            Ok(Request::OptionsGet { node: node("n"), jid: jid("francisco@denmark.lit"), subid: None })
        );
        // §6.3.5: options submitted with a form; without one, bad-request + invalid-options.
        assert_eq!(
            fails(ps("set", "<options node='n' jid='francisco@denmark.lit'/>")),
            ("modify", "bad-request", Some("invalid-options".into()))
        );
        let options = |fields: &str| format!("<options node='n' jid='a@b'>{}</options>", form(FORM_SUBSCRIBE_OPTIONS, fields));
        assert_eq!(
            ps("set", &options(&f("pubsub#deliver", "0"))),
            Ok(Request::OptionsSet { node: node("n"), jid: jid("a@b"), subid: None, deliver: Some(false) })
        );
        assert_eq!(
            ps("set", &options(&format!("{}{}", f("pubsub#deliver", "true"), f("pubsub#digest", "0")))),
            Ok(Request::OptionsSet { node: node("n"), jid: jid("a@b"), subid: None, deliver: Some(true) })
        );
        for unsupported in [f("pubsub#digest", "1"), f("pubsub#expire", "2030-01-01T00:00:00Z"), f("pubsub#deliver", "maybe")] {
            assert_eq!(fails(ps("set", &options(&unsupported))), ("modify", "bad-request", Some("invalid-options".into())));
        }
        // An empty <options/> next to <subscribe/> asks for nothing; a form is §6.3.7.
        assert!(ps("set", "<subscribe node='n' jid='a@b'/><options/>").is_ok());
        let opts = format!("<subscribe node='n' jid='a@b'/><options>{}</options>", form(FORM_SUBSCRIBE_OPTIONS, &f("pubsub#deliver", "0")));
        assert_eq!(ps("set", &opts), Ok(Request::Subscribe { node: node("n"), jid: jid("a@b"), deliver: Some(false) }));
    }

    #[test]
    fn subscription_jid_errors() {
        assert_eq!(fails(ps("set", "<subscribe node='n'/>")), ("modify", "bad-request", Some("jid-required".into())));
        assert_eq!(fails(ps("set", "<subscribe node='n' jid='a@'/>")), ("modify", "jid-malformed", None));
        assert_eq!(fails(ps("set", "<unsubscribe node='n' jid='@b'/>")), ("modify", "jid-malformed", None));
        assert_eq!(
            fails(ps("set", "<unsubscribe node='n'/>")),
            ("modify", "bad-request", Some("jid-required".into()))
        );
        assert_eq!(
            fails(ps("set", "<subscribe jid='a@b'/>")),
            ("modify", "bad-request", Some("nodeid-required".into()))
        );
    }

    #[test]
    fn user_default_is_subscription_options_and_unsupported() {
        let e = ps("get", "<default/>").unwrap_err();
        assert_eq!(shape(&e), ("cancel", "feature-not-implemented", Some("unsupported".into())));
        assert_eq!(e.app.as_ref().and_then(|a| a.attr("feature")), Some("retrieve-default-sub"));
    }

    // --- retrieval (§5, §6.5) ---

    #[test]
    fn items_all_max_by_id_and_rsm() {
        assert_eq!(
            ps("get", "<items node='n'/>"),
            Ok(Request::Items { node: node("n"), max_items: None, item_ids: vec![], page: None })
        );
        assert_eq!(
            ps("get", "<items node='n' max_items='2'/>"),
            Ok(Request::Items { node: node("n"), max_items: Some(2), item_ids: vec![], page: None })
        );
        assert_eq!(
            ps(
                "get",
                "<items node='n'><item id='368866411b877c30064a5f62b917cffe'/>\
                 <item id='4e30f35051b7b8b42abe083742187228'/></items>"
            ),
            Ok(Request::Items {
                node: node("n"),
                max_items: None,
                item_ids: vec!["368866411b877c30064a5f62b917cffe".into(), "4e30f35051b7b8b42abe083742187228".into()],
                page: None
            })
        );
        let rsm = format!("<items node='n'/><set xmlns='{NS_RSM}'><max>10</max><after>i7</after></set>");
        assert_eq!(
            ps("get", &rsm),
            Ok(Request::Items {
                node: node("n"),
                max_items: None,
                item_ids: vec![],
                page: Some(Page { max: Some(10), after: Some("i7".into()), before: None })
            })
        );
        let last = format!("<items node='n'/><set xmlns='{NS_RSM}'><max>5</max><before/></set>");
        assert!(matches!(
            ps("get", &last),
            Ok(Request::Items { page: Some(Page { before: Some(b), .. }), .. }) if b.is_empty()
        ));
    }

    #[test]
    fn items_errors() {
        assert_eq!(fails(ps("get", "<items/>")), ("modify", "bad-request", Some("nodeid-required".into())));
        assert_eq!(fails(ps("get", "<items node='n' max_items='many'/>")), ("modify", "bad-request", None));
        assert_eq!(
            fails(ps("get", "<items node='n'><item/></items>")),
            ("modify", "bad-request", Some("item-required".into()))
        );
        let rsm = format!("<items node='n'/><set xmlns='{NS_RSM}'><max>-1</max></set>");
        assert_eq!(fails(ps("get", &rsm)), ("modify", "bad-request", None));
        assert_eq!(fails(ps("set", "<items node='n'/>")), ("modify", "bad-request", None));
    }

    #[test]
    fn user_subscriptions_and_affiliations() {
        assert_eq!(ps("get", "<subscriptions/>"), Ok(Request::Subscriptions { node: None }));
        assert_eq!(ps("get", "<subscriptions node='n'/>"), Ok(Request::Subscriptions { node: Some(node("n")) }));
        assert_eq!(ps("get", "<affiliations/>"), Ok(Request::Affiliations { node: None }));
        assert_eq!(ps("get", "<affiliations node='n'/>"), Ok(Request::Affiliations { node: Some(node("n")) }));
    }

    #[test]
    fn owner_subscriptions_get_and_set() {
        assert_eq!(owner("get", "<subscriptions node='n'/>"), Ok(Request::OwnerSubscriptions { node: node("n") }));
        let set = "<subscriptions node='n'><subscription jid='bard@shakespeare.lit' subscription='subscribed'/>\
                   <subscription jid='polonius@denmark.lit' subscription='none'/>\
                   <subscription jid='horatio@denmark.lit/r' subscription='pending'/></subscriptions>";
        assert_eq!(
            owner("set", set),
            Ok(Request::OwnerSubscriptionsSet {
                node: node("n"),
                changes: vec![
                    (jid("bard@shakespeare.lit"), Some(SubState::Subscribed)),
                    (jid("polonius@denmark.lit"), None),
                    (jid("horatio@denmark.lit/r"), Some(SubState::Pending)),
                ]
            })
        );
        assert_eq!(
            fails(owner("set", "<subscriptions node='n'><subscription jid='a@b' subscription='maybe'/></subscriptions>")),
            ("modify", "bad-request", None)
        );
        assert_eq!(
            fails(owner("set", "<subscriptions node='n'><subscription subscription='none'/></subscriptions>")),
            ("modify", "bad-request", Some("jid-required".into()))
        );
        assert_eq!(
            fails(owner("get", "<subscriptions/>")),
            ("modify", "bad-request", Some("nodeid-required".into()))
        );
    }

    #[test]
    fn owner_affiliations_get_and_set() {
        assert_eq!(owner("get", "<affiliations node='n'/>"), Ok(Request::OwnerAffiliations { node: node("n") }));
        let set = "<affiliations node='n'><affiliation jid='hamlet@denmark.lit' affiliation='owner'/>\
                   <affiliation jid='polonius@denmark.lit/arras' affiliation='outcast'/>\
                   <affiliation jid='bard@shakespeare.lit' affiliation='publish-only'/>\
                   <affiliation jid='x@y' affiliation='none'/></affiliations>";
        assert_eq!(
            owner("set", set),
            Ok(Request::OwnerAffiliationsSet {
                node: node("n"),
                changes: vec![
                    (bare("hamlet@denmark.lit"), Affiliation::Owner),
                    (bare("polonius@denmark.lit"), Affiliation::Outcast),
                    (bare("bard@shakespeare.lit"), Affiliation::PublishOnly),
                    (bare("x@y"), Affiliation::None),
                ]
            })
        );
        assert_eq!(
            fails(owner("set", "<affiliations node='n'><affiliation jid='a@b' affiliation='king'/></affiliations>")),
            ("modify", "bad-request", None)
        );
        assert_eq!(
            fails(owner("set", "<affiliations node='n'><affiliation jid='a@' affiliation='member'/></affiliations>")),
            ("modify", "jid-malformed", None)
        );
    }

    #[test]
    fn disco_info_and_items_with_rsm() {
        let q = |ns: &str, body: &str| parse_iq(&iq("get", &format!("<query xmlns='{ns}'{body}")));
        assert_eq!(q(ns::DISCO_INFO, "/>"), Ok(Request::DiscoInfo { node: None }));
        assert_eq!(q(ns::DISCO_INFO, " node='n'/>"), Ok(Request::DiscoInfo { node: Some(node("n")) }));
        assert_eq!(q(ns::DISCO_ITEMS, "/>"), Ok(Request::DiscoItems { node: None, page: None }));
        let rsm = format!("><set xmlns='{NS_RSM}'><max>20</max></set></query>");
        assert_eq!(
            q(ns::DISCO_ITEMS, &rsm),
            Ok(Request::DiscoItems { node: None, page: Some(Page { max: Some(20), ..Default::default() }) })
        );
        let set = parse_iq(&iq("set", &format!("<query xmlns='{}'/>", ns::DISCO_INFO)));
        assert_eq!(fails(set), ("modify", "bad-request", None));
    }

    #[test]
    fn malformed_iqs() {
        let result = iq("result", &format!("<pubsub xmlns='{NS_PUBSUB}'/>"));
        assert_eq!(fails(parse_iq(&result)), ("modify", "bad-request", None));
        assert_eq!(fails(parse_iq(&iq("get", ""))), ("modify", "bad-request", None));
        let two = format!("<pubsub xmlns='{NS_PUBSUB}'><items node='n'/></pubsub><pubsub xmlns='{NS_PUBSUB}'/>");
        assert_eq!(fails(parse_iq(&iq("get", &two))), ("modify", "bad-request", None));
        assert_eq!(fails(ps("get", "")), ("modify", "bad-request", None));
        assert_eq!(fails(ps("get", "<frobnicate/>")), ("cancel", "feature-not-implemented", None));
        assert_eq!(fails(owner("get", "<frobnicate/>")), ("cancel", "feature-not-implemented", None));
        assert_eq!(
            fails(parse_iq(&iq("get", "<query xmlns='jabber:iq:version'/>"))),
            ("cancel", "service-unavailable", None)
        );
    }

    // --- subscription approval (§8.6) ---

    #[test]
    fn approval_form_round_trips_through_parse_message() {
        let ev = Event::ApprovalRequest {
            node: node("princely_musings"),
            jid: "horatio@denmark.lit".into(),
            subid: "123-abc".into(),
        };
        let x = render_event(&ev, BROKER);
        let text = s(&x);
        assert!(text.contains(&format!("<value>{FORM_SUBSCRIBE_AUTH}</value>")), "{text}");
        assert!(
            text.contains(
                "<field var='pubsub#allow' type='boolean' label='Allow this JID to subscribe to this pubsub node?'>\
                 <value>false</value></field>"
            ),
            "{text}"
        );
        // The owner answers with the same form, type submit and allow = true.
        let answer = String::from_utf8(x.to_bytes(ns::CLIENT))
            .unwrap()
            .replacen("type='form'", "type='submit'", 1)
            .replace("<value>false</value>", "<value>true</value>");
        let msg = stanza(&format!("<message to='{BROKER}' id='approve1'>{answer}</message>"));
        assert_eq!(
            parse_message(&msg),
            Some(Request::Approve {
                node: node("princely_musings"),
                jid: jid("horatio@denmark.lit"),
                subid: Some("123-abc".into()),
                allow: true
            })
        );
    }

    #[test]
    fn parse_message_ignores_everything_else() {
        let m = |body: &str| parse_message(&stanza(&format!("<message to='{BROKER}'>{body}</message>")));
        let fields = f("pubsub#node", "n") + &f("pubsub#subscriber_jid", "a@b");
        let deny = form(FORM_SUBSCRIBE_AUTH, &(fields.clone() + &f("pubsub#allow", "0")));
        assert_eq!(m(&deny), Some(Request::Approve { node: node("n"), jid: jid("a@b"), subid: None, allow: false }));
        assert_eq!(m("<body>hello</body>"), None);
        assert_eq!(m(&deny.replace("submit", "cancel")), None);
        assert_eq!(m(&form(FORM_NODE_CONFIG, &f("pubsub#node", "n"))), None);
        assert_eq!(m(&form(FORM_SUBSCRIBE_AUTH, &fields)), None, "no pubsub#allow");
        assert_eq!(m(&form(FORM_SUBSCRIBE_AUTH, &(fields.clone() + &f("pubsub#allow", "perhaps")))), None);
        let bad_jid = form(
            FORM_SUBSCRIBE_AUTH,
            &(f("pubsub#node", "n") + &f("pubsub#subscriber_jid", "a@") + &f("pubsub#allow", "1")),
        );
        assert_eq!(m(&bad_jid), None);
        let err = stanza(&format!("<message to='{BROKER}' type='error'>{deny}</message>"));
        assert_eq!(parse_message(&err), None);
    }

    // --- replies ---

    #[test]
    fn simple_replies() {
        let req = Request::DiscoInfo { node: None };
        assert_eq!(render_reply(&Reply::Empty, &req, BROKER), None);
        let n = node("25e3d37dabbab9541f7523321421edc5bfeb2dae");
        let created = render_reply(&Reply::Created { node: n }, &req, BROKER).unwrap();
        assert_eq!(
            s(&created),
            format!("<pubsub xmlns='{NS_PUBSUB}'><create node='25e3d37dabbab9541f7523321421edc5bfeb2dae'/></pubsub>")
        );
        let published = Reply::Published { node: node("n"), item_id: "i1".into() };
        assert_eq!(
            s(&render_reply(&published, &req, BROKER).unwrap()),
            format!("<pubsub xmlns='{NS_PUBSUB}'><publish node='n'><item id='i1'/></publish></pubsub>")
        );
        let sub = SubView { node: node("n"), jid: "a@b".into(), subid: "s1".into(), state: SubState::Pending, deliver: true };
        let out = render_reply(&Reply::Subscription(sub), &req, BROKER).unwrap();
        assert_eq!(
            s(&out),
            format!(
                "<pubsub xmlns='{NS_PUBSUB}'><subscription node='n' jid='a@b' subid='s1' subscription='pending'/></pubsub>"
            )
        );
    }

    #[test]
    fn options_get_renders_the_deliver_option() {
        let sub = SubView { node: node("n"), jid: "a@b".into(), subid: "s1".into(), state: SubState::Subscribed, deliver: true };
        let req = Request::OptionsGet { node: node("n"), jid: jid("a@b"), subid: None };
        let out = render_reply(&Reply::Subscription(sub), &req, BROKER).unwrap();
        assert_eq!(
            s(&out),
            format!(
                "<pubsub xmlns='{NS_PUBSUB}'><options node='n' jid='a@b' subid='s1'><x xmlns='jabber:x:data' \
                 type='form'><field var='FORM_TYPE' type='hidden'><value>{FORM_SUBSCRIBE_OPTIONS}</value></field>\
                 <field var='pubsub#deliver' type='boolean' label='Enable delivery?'><value>1</value></field>\
                 </x></options></pubsub>"
            )
        );
    }

    #[test]
    fn items_reply_embeds_payload_bytes_verbatim_with_rsm() {
        let payload = format!("<IODEF-Document xmlns='{IODEF}' lang='en'><Incident/></IODEF-Document>");
        let reply = Reply::Items {
            node: node("n"),
            items: vec![sample_item("i1", &payload), sample_item("i2", "")],
            page: Some(PageInfo { first: Some("i1".into()), last: Some("i2".into()), count: 7 }),
        };
        let req = Request::Items { node: node("n"), max_items: None, item_ids: vec![], page: None };
        let out = render_reply(&reply, &req, BROKER).unwrap();
        assert_eq!(
            s(&out),
            format!(
                "<pubsub xmlns='{NS_PUBSUB}'><items node='n'>\
                 <item id='i1' publisher='sensor1@grid.test'>{payload}</item>\
                 <item id='i2' publisher='sensor1@grid.test'/></items>\
                 <set xmlns='{NS_RSM}'><first>i1</first><last>i2</last><count>7</count></set></pubsub>"
            )
        );
        let empty =
            Reply::Items { node: node("n"), items: vec![], page: Some(PageInfo { first: None, last: None, count: 0 }) };
        let out = render_reply(&empty, &req, BROKER).unwrap();
        assert!(s(&out).ends_with(&format!("<items node='n'/><set xmlns='{NS_RSM}'><count>0</count></set></pubsub>")));
    }

    #[test]
    fn subscriptions_and_affiliations_in_user_and_owner_namespaces() {
        let subs =
            vec![SubView { node: node("n"), jid: "a@b/r".into(), subid: "s1".into(), state: SubState::Subscribed, deliver: true }];
        let reply = Reply::Subscriptions { node: None, subs };
        let user = render_reply(&reply, &Request::Subscriptions { node: None }, BROKER).unwrap();
        assert_eq!(
            s(&user),
            format!(
                "<pubsub xmlns='{NS_PUBSUB}'><subscriptions><subscription node='n' jid='a@b/r' subid='s1' \
                 subscription='subscribed'/></subscriptions></pubsub>"
            )
        );
        let own = render_reply(&reply, &Request::OwnerSubscriptions { node: node("n") }, BROKER).unwrap();
        assert_eq!(
            s(&own),
            format!(
                "<pubsub xmlns='{NS_OWNER}'><subscriptions node='n'><subscription jid='a@b/r' subid='s1' \
                 subscription='subscribed'/></subscriptions></pubsub>"
            )
        );
        let affs = Reply::Affiliations { node: None, affs: vec![(node("n"), bare("a@b"), Affiliation::Publisher)] };
        let user = render_reply(&affs, &Request::Affiliations { node: None }, BROKER).unwrap();
        assert_eq!(
            s(&user),
            format!(
                "<pubsub xmlns='{NS_PUBSUB}'><affiliations><affiliation node='n' affiliation='publisher'/>\
                 </affiliations></pubsub>"
            )
        );
        let own = render_reply(&affs, &Request::OwnerAffiliations { node: node("n") }, BROKER).unwrap();
        assert_eq!(
            s(&own),
            format!(
                "<pubsub xmlns='{NS_OWNER}'><affiliations node='n'><affiliation jid='a@b' affiliation='publisher'/>\
                 </affiliations></pubsub>"
            )
        );
    }

    #[test]
    fn service_info_advertises_exactly_the_features() {
        let out = render_reply(&Reply::ServiceInfo, &Request::DiscoInfo { node: None }, BROKER).unwrap();
        assert!(out.is("query", ns::DISCO_INFO));
        let id = out.child("identity", ns::DISCO_INFO).unwrap();
        assert_eq!((id.attr("category"), id.attr("type")), (Some("pubsub"), Some("service")));
        let vars: Vec<&str> = out.elements().filter_map(|e| e.attr("var")).collect();
        assert_eq!(vars, FEATURES);
        for not_implemented in ["get-pending", "multi-subscribe", "collections"] {
            assert!(!vars.iter().any(|v| v.ends_with(&format!("#{not_implemented}"))), "{not_implemented}");
        }
        let mut sorted = vars.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), vars.len(), "no duplicates");
    }

    #[test]
    fn node_info_has_leaf_identity_and_meta_data() {
        let info = NodeInfo {
            id: node("incidents"),
            config: sample_config(),
            owners: vec![bare("soc@grid.test"), bare("cert@grid.test")],
            creator: bare("soc@grid.test"),
            created: 1_795_795_200, // 2026-11-27T16:00:00Z
            num_subscribers: 3,
        };
        let req = Request::DiscoInfo { node: Some(node("incidents")) };
        let out = render_reply(&Reply::NodeInfo(info), &req, BROKER).unwrap();
        assert_eq!(out.attr("node"), Some("incidents"));
        let id = out.child("identity", ns::DISCO_INFO).unwrap();
        assert_eq!(
            (id.attr("category"), id.attr("type"), id.attr("name")),
            (Some("pubsub"), Some("leaf"), Some("Incidents"))
        );
        let x = out.child("x", NS_DATA).unwrap();
        assert_eq!(x.attr("type"), Some("result"));
        let value = |var: &str| -> Vec<String> {
            x.elements()
                .find(|f| f.attr("var") == Some(var))
                .map(|f| f.elements().map(Element::text).collect())
                .unwrap_or_default()
        };
        assert_eq!(value("FORM_TYPE"), [FORM_META_DATA]);
        assert_eq!(value("pubsub#type"), [IODEF]);
        assert_eq!(value("pubsub#owner"), ["soc@grid.test", "cert@grid.test"]);
        assert_eq!(value("pubsub#creator"), ["soc@grid.test"]);
        assert_eq!(value("pubsub#creation_date"), ["2026-11-27T16:00:00Z"]);
        assert_eq!(value("pubsub#access_model"), ["whitelist"]);
        assert_eq!(value("pubsub#publish_model"), ["publishers"]);
        assert_eq!(value("pubsub#num_subscribers"), ["3"]);
        assert_eq!(value("pubsub#max_items"), ["500"]);
        assert_eq!(value("pubsub#title"), ["Incidents"]);
        assert_eq!(value("pubsub#description"), ["IODEF incident reports"]);
    }

    #[test]
    fn node_list_names_nodes_at_the_broker_with_rsm() {
        let reply = Reply::NodeList {
            nodes: vec![(node("incidents"), "Incidents".into()), (node("untitled"), String::new())],
            page: Some(PageInfo { first: Some("incidents".into()), last: Some("untitled".into()), count: 2 }),
        };
        let out = render_reply(&reply, &Request::DiscoItems { node: None, page: None }, BROKER).unwrap();
        assert_eq!(
            s(&out),
            format!(
                "<query xmlns='{}'><item jid='{BROKER}' node='incidents' name='Incidents'/>\
                 <item jid='{BROKER}' node='untitled'/><set xmlns='{NS_RSM}'><first>incidents</first>\
                 <last>untitled</last><count>2</count></set></query>",
                ns::DISCO_ITEMS
            )
        );
    }

    // --- events ---

    #[test]
    fn item_event_embeds_raw_payload() {
        let payload = format!("<IODEF-Document xmlns='{IODEF}'/>");
        let ev = Event::Items { node: node("n"), items: vec![sample_item("i1", &payload)] };
        assert_eq!(
            s(&render_event(&ev, BROKER)),
            format!(
                "<event xmlns='{NS_EVENT}'><items node='n'><item id='i1' publisher='sensor1@grid.test'>{payload}\
                 </item></items></event>"
            )
        );
    }

    #[test]
    fn retract_purge_delete_configuration_and_subscription_events() {
        let cases = [
            (
                Event::Retract { node: node("n"), item_ids: vec!["a".into(), "b".into()] },
                "<items node='n'><retract id='a'/><retract id='b'/></items>",
            ),
            (Event::Purge { node: node("n") }, "<purge node='n'/>"),
            (Event::Delete { node: node("n") }, "<delete node='n'/>"),
            (Event::Configuration { node: node("n") }, "<configuration node='n'/>"),
            (
                Event::Subscription {
                    node: node("n"),
                    jid: "a@b".into(),
                    subid: "s1".into(),
                    state: Some(SubState::Subscribed),
                },
                "<subscription node='n' jid='a@b' subscription='subscribed' subid='s1'/>",
            ),
            (
                Event::Subscription { node: node("n"), jid: "a@b".into(), subid: String::new(), state: None },
                "<subscription node='n' jid='a@b' subscription='none'/>",
            ),
        ];
        for (ev, inner) in cases {
            assert_eq!(s(&render_event(&ev, BROKER)), format!("<event xmlns='{NS_EVENT}'>{inner}</event>"));
        }
    }

    // --- XEP-0203 / XEP-0082 ---

    #[test]
    fn delay_stamps_are_utc_with_milliseconds() {
        assert_eq!(
            s(&delay(1_795_795_200_123, BROKER)),
            format!("<delay xmlns='urn:xmpp:delay' from='{BROKER}' stamp='2026-11-27T16:00:00.123Z'/>")
        );
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (999, "1970-01-01T00:00:00.999Z"),
            (86_399_999, "1970-01-01T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"), // leap day of a century divisible by 400
            (951_868_800_000, "2000-03-01T00:00:00.000Z"),
            (1_709_164_800_000, "2024-02-29T00:00:00.000Z"),
            (1_735_689_599_000, "2024-12-31T23:59:59.000Z"), // day 366 of a leap year
            (2_147_483_647_000, "2038-01-19T03:14:07.000Z"), // the last i32 second
            (2_147_483_648_000, "2038-01-19T03:14:08.000Z"),
            (4_107_456_000_000, "2100-02-28T00:00:00.000Z"), // 2100 is not a leap year
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (253_402_300_799_000, "9999-12-31T23:59:59.000Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(xep0082(ms, true), want, "{ms}");
        }
        assert_eq!(xep0082(1_795_795_200_999, false), "2026-11-27T16:00:00Z");
    }

    // --- the error table ---

    #[test]
    fn error_table_follows_xep_0060() {
        let some = |s: &str| Some(s.to_owned());
        let invalid = PubsubError::InvalidPayload { plugin: "iodef".into(), reason: "not IODEF 2".into() };
        let storage = PubsubError::Storage("sled: io error at /var/lib/grid".into());
        let cases: Vec<(PubsubError, Shape)> = vec![
            (PubsubError::Forbidden, ("auth", "forbidden", None)),
            (PubsubError::NodeNotFound, ("cancel", "item-not-found", None)),
            (PubsubError::ItemNotFound, ("cancel", "item-not-found", None)),
            (PubsubError::Conflict, ("cancel", "conflict", None)),
            (PubsubError::NotSubscribed, ("cancel", "unexpected-request", some("not-subscribed"))),
            (PubsubError::PendingSubscription, ("auth", "not-authorized", some("pending-subscription"))),
            (PubsubError::SubidRequired, ("modify", "bad-request", some("subid-required"))),
            (PubsubError::InvalidSubid, ("modify", "not-acceptable", some("invalid-subid"))),
            (PubsubError::InvalidJid, ("modify", "bad-request", some("invalid-jid"))),
            (PubsubError::NodeIdRequired, ("modify", "bad-request", some("nodeid-required"))),
            (PubsubError::ItemRequired, ("modify", "bad-request", some("item-required"))),
            (PubsubError::PayloadRequired, ("modify", "bad-request", some("payload-required"))),
            (PubsubError::PayloadTooBig { size: 10, limit: 5 }, ("modify", "not-acceptable", some("payload-too-big"))),
            (
                PubsubError::PreconditionNotMet("pubsub#access_model".into()),
                ("cancel", "conflict", some("precondition-not-met")),
            ),
            (PubsubError::ClosedNode, ("cancel", "not-allowed", some("closed-node"))),
            (PubsubError::Outcast, ("auth", "forbidden", None)),
            (PubsubError::Unsupported("purge-nodes"), ("cancel", "feature-not-implemented", some("unsupported"))),
            (PubsubError::BadConfig("max_items too large".into()), ("modify", "not-acceptable", None)),
            (PubsubError::LimitReached("nodes per platform".into()), ("wait", "policy-violation", None)),
            (invalid.clone(), ("modify", "not-acceptable", some("invalid-payload"))),
            (storage.clone(), ("wait", "internal-server-error", None)),
        ];
        for (e, want) in cases {
            let got = StanzaError::from(&e);
            assert_eq!(shape(&got), want, "{e:?}");
            if let Some(a) = &got.app {
                assert_eq!(a.ns, NS_ERRORS);
            }
        }
        let e = StanzaError::from(PubsubError::Unsupported("purge-nodes"));
        assert_eq!(e.app.as_ref().and_then(|a| a.attr("feature")), Some("purge-nodes"));
        assert_eq!(StanzaError::from(&invalid).text.as_deref(), Some("not IODEF 2"));
        let e = StanzaError::from(&storage);
        assert_eq!(e.text.as_deref(), Some("internal error"), "no internals on the wire");
        let wire = s(&e.to_element());
        assert!(!wire.contains("sled"), "{wire}");
    }

    #[test]
    fn some_errors_depend_on_the_request() {
        let some = |s: &str| Some(s.to_owned());
        let items = Request::Items { node: node("n"), max_items: None, item_ids: vec![], page: None };
        let unsub = Request::Unsubscribe { node: node("n"), jid: jid("a@grid.test"), subid: None };
        let sub = Request::Subscribe { node: node("n"), jid: jid("a@grid.test"), deliver: None };
        let create = Request::Create { node: Some(node("n")), config: ConfigPatch::default() };
        let limit = PubsubError::LimitReached("a platform may hold at most 2 subscriptions".into());
        // §6.5.9.3 vs §6.2.3.2.
        assert_eq!(shape(&error_for(&items, &PubsubError::NotSubscribed)), ("auth", "not-authorized", some("not-subscribed")));
        assert_eq!(shape(&error_for(&unsub, &PubsubError::NotSubscribed)), ("cancel", "unexpected-request", some("not-subscribed")));
        // §6.1.3.9; other quotas have no XEP-0060 condition of their own.
        let e = error_for(&sub, &limit);
        assert_eq!(shape(&e), ("wait", "policy-violation", some("too-many-subscriptions")));
        assert!(e.text.is_some());
        assert_eq!(shape(&error_for(&create, &limit)), ("wait", "policy-violation", None));
        assert_eq!(shape(&error_for(&items, &PubsubError::Forbidden)), ("auth", "forbidden", None));
    }
}
