//! XEP-0060 publish-subscribe, XEP-0030 discovery and XEP-0059 paging, client side: what
//! a Platform does with the Broker (RFC 8600 §5-§6: discover Topics, create one,
//! publish, subscribe, retrieve, receive notifications).
//!
//! Role: build requests and read replies as pure functions (tested here without a
//! network), plus thin async methods on [`Client`] that send them. Topic = pubsub node.
//!
//! Must not: interpret payloads (an IODEF document is just an element here), or trust a
//! server's paging to end by itself (every loop has a page cap).

use super::{Client, ClientError};
use crate::ns;
use crate::xml::Element;

/// XEP-0060 namespaces.
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const NS_PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
pub const NS_PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// XEP-0004 data forms.
pub const NS_DATA: &str = "jabber:x:data";
/// XEP-0059 result set management.
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
/// FORM_TYPE of the node meta-data form in disco#info (XEP-0060 §5.4).
pub const FORM_META_DATA: &str = "http://jabber.org/protocol/pubsub#meta-data";
/// FORM_TYPE of the node configuration form (XEP-0060 §8.2).
pub const FORM_NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";

/// Items (or topics) asked for per page when paging with RSM.
pub const PAGE_SIZE: usize = 100;
/// Pages fetched at most in one listing: a server whose `<last/>` never ends the list
/// must not keep us looping.
pub const MAX_PAGES: usize = 10_000;

/// A topic as listed by disco#items (XEP-0030 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// The service holding it (normally the broker).
    pub jid: String,
    /// The node name; `None` for a non-node item.
    pub node: Option<String>,
    /// Human-readable name, if any.
    pub name: Option<String>,
}

/// A topic's disco#info (XEP-0060 §5.4), with the meta-data form read out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicInfo {
    pub node: String,
    /// `(category, type)` of each identity, e.g. `("pubsub", "leaf")`.
    pub identities: Vec<(String, String)>,
    pub features: Vec<String>,
    /// `pubsub#type`: the payload namespace (RFC 8600 §5 makes it a MUST).
    pub pubsub_type: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    /// Every field of the meta-data form, in order.
    pub fields: Vec<(String, Vec<String>)>,
}

/// Configuration for a new topic (XEP-0060 §8.1.3). Fields left `None` keep the
/// broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// `pubsub#type`: payload namespace, e.g. `urn:ietf:params:xml:ns:iodef-2.0`.
    pub pubsub_type: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    /// `pubsub#access_model`: open, authorize, whitelist, presence, roster.
    pub access_model: Option<String>,
    /// Any other `pubsub#…` fields.
    pub extra: Vec<(String, String)>,
}

/// Subscription state (XEP-0060 §6.1.2 `subscription` attribute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionState {
    Subscribed,
    /// Awaiting the owner's approval (access model `authorize`).
    Pending,
    /// Subscribed, but the service wants options configured.
    Unconfigured,
    None,
    Other(String),
}

impl SubscriptionState {
    fn parse(s: &str) -> SubscriptionState {
        match s {
            "subscribed" => SubscriptionState::Subscribed,
            "pending" => SubscriptionState::Pending,
            "unconfigured" => SubscriptionState::Unconfigured,
            "none" => SubscriptionState::None,
            o => SubscriptionState::Other(o.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            SubscriptionState::Subscribed => "subscribed",
            SubscriptionState::Pending => "pending",
            SubscriptionState::Unconfigured => "unconfigured",
            SubscriptionState::None => "none",
            SubscriptionState::Other(o) => o,
        }
    }
}

/// A subscription as the broker reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub node: String,
    pub jid: String,
    pub state: SubscriptionState,
    /// Present when the service supports multiple subscriptions (XEP-0060 §6.1.6).
    pub subid: Option<String>,
}

/// One published item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: Option<String>,
    /// `publisher` attribute, when the service discloses it.
    pub publisher: Option<String>,
    /// The payload element (its first child element); `None` for a notification without payload.
    pub payload: Option<Element>,
}

/// XEP-0203 delayed-delivery stamp: the item was sent while we were away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delay {
    /// XEP-0082 date-time, as received.
    pub stamp: String,
    pub from: Option<String>,
}

/// What an event notification reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// New items, and ids of retracted ones (XEP-0060 §7.1.2.1, §7.2.2.1).
    Items { items: Vec<Item>, retracted: Vec<String> },
    /// All items were purged (§8.5).
    Purge,
    /// The node was deleted (§8.4).
    Delete,
    /// The node's configuration changed (§8.2.5.3).
    Configuration,
    /// Our subscription changed, e.g. approved (§8.8.4).
    Subscription { jid: String, state: SubscriptionState },
}

/// A pubsub event notification: `<message><event xmlns='…pubsub#event'>…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubsubEvent {
    /// The service that sent it (check it is the broker you expect).
    pub from: Option<String>,
    pub node: String,
    pub kind: EventKind,
    pub delay: Option<Delay>,
}

/// What [`Client::items`] asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retrieve {
    /// The most recent `n` items (XEP-0060 §6.5.7); no paging then.
    pub max_items: Option<u32>,
    /// These items only (§6.5.8).
    pub ids: Vec<String>,
}

/// An XEP-0059 result set description from a reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RsmSet {
    pub first: Option<String>,
    pub last: Option<String>,
    pub count: Option<usize>,
}

impl RsmSet {
    /// The `<set xmlns='…rsm'/>` child of `parent`, if any.
    pub fn parse(parent: &Element) -> Option<RsmSet> {
        let set = parent.child("set", NS_RSM)?;
        let text = |n: &str| set.child(n, NS_RSM).map(|e| e.text()).filter(|t| !t.is_empty());
        Some(RsmSet {
            first: text("first"),
            last: text("last"),
            count: text("count").and_then(|c| c.trim().parse().ok()),
        })
    }
}

/// Walks XEP-0059 pages forward: asks for `page_size` at a time, continues after the
/// last item of each page, and stops when the server stops paging (no `<set/>`: it
/// returned everything), when a page is empty, when `count` is reached, when a page
/// comes back short with no `count` to say otherwise, when the cursor does not move,
/// or after [`MAX_PAGES`].
#[derive(Debug, Clone)]
pub struct Pager {
    page_size: usize,
    after: Option<String>,
    received: usize,
    pages: usize,
}

impl Pager {
    pub fn new(page_size: usize) -> Pager {
        Pager { page_size: page_size.max(1), after: None, received: 0, pages: 0 }
    }

    /// The `<set/>` for the next request.
    pub fn request(&self) -> Element {
        let mut set = Element::new("set", NS_RSM).with_child(Element::new("max", NS_RSM).with_text(self.page_size.to_string()));
        if let Some(a) = &self.after {
            set.push(Element::new("after", NS_RSM).with_text(a));
        }
        set
    }

    /// Records a page of `page_len` entries with its `<set/>`; true if another page
    /// should be fetched.
    pub fn advance(&mut self, set: Option<&RsmSet>, page_len: usize) -> bool {
        self.pages += 1;
        self.received += page_len;
        let Some(set) = set else { return false };
        let Some(last) = &set.last else { return false };
        if page_len == 0 || self.pages >= MAX_PAGES || self.after.as_ref() == Some(last) {
            return false;
        }
        match set.count {
            Some(c) if self.received >= c => return false,
            None if page_len < self.page_size => return false,
            _ => {}
        }
        self.after = Some(last.clone());
        true
    }
}

fn iq(ty: &str, to: &str, payload: Element) -> Element {
    Element::new("iq", ns::CLIENT).with_attr("type", ty).with_attr("to", to).with_child(payload)
}

fn text_field(var: &str, value: &str) -> Element {
    Element::new("field", NS_DATA)
        .with_attr("var", var)
        .with_child(Element::new("value", NS_DATA).with_text(value))
}

/// disco#items on `to` (optionally a node), with an RSM `<set/>`.
pub fn disco_items_request(to: &str, node: Option<&str>, set: Option<Element>) -> Element {
    let mut q = Element::new("query", ns::DISCO_ITEMS);
    if let Some(n) = node {
        q.set_attr("node", n);
    }
    if let Some(s) = set {
        q.push(s);
    }
    iq("get", to, q)
}

/// Topics and the page description of a disco#items reply.
pub fn parse_disco_items(reply: &Element) -> (Vec<Topic>, Option<RsmSet>) {
    let Some(q) = reply.child("query", ns::DISCO_ITEMS) else { return (Vec::new(), None) };
    let topics = q
        .elements()
        .filter(|e| e.is("item", ns::DISCO_ITEMS))
        .filter_map(|e| {
            Some(Topic {
                jid: e.attr("jid")?.to_owned(),
                node: e.attr("node").map(str::to_owned),
                name: e.attr("name").map(str::to_owned),
            })
        })
        .collect();
    (topics, RsmSet::parse(q))
}

/// disco#info on a node of `to`.
pub fn disco_info_request(to: &str, node: &str) -> Element {
    iq("get", to, Element::new("query", ns::DISCO_INFO).with_attr("node", node))
}

/// Reads identities, features and the `pubsub#meta-data` form of a disco#info reply.
pub fn parse_disco_info(node: &str, reply: &Element) -> TopicInfo {
    let mut info = TopicInfo { node: node.to_owned(), ..TopicInfo::default() };
    let Some(q) = reply.child("query", ns::DISCO_INFO) else { return info };
    for e in q.elements() {
        if e.is("identity", ns::DISCO_INFO) {
            let attr = |n: &str| e.attr(n).unwrap_or_default().to_owned();
            info.identities.push((attr("category"), attr("type")));
        } else if e.is("feature", ns::DISCO_INFO) {
            if let Some(v) = e.attr("var") {
                info.features.push(v.to_owned());
            }
        } else if e.is("x", NS_DATA) && form_type(e).as_deref() == Some(FORM_META_DATA) {
            info.fields = form_fields(e);
        }
    }
    let first = |var: &str| info.fields.iter().find(|(v, _)| v == var).and_then(|(_, vals)| vals.first().cloned());
    info.pubsub_type = first("pubsub#type");
    info.title = first("pubsub#title");
    info.description = first("pubsub#description");
    info
}

fn form_type(x: &Element) -> Option<String> {
    form_fields(x).into_iter().find(|(v, _)| v == "FORM_TYPE").and_then(|(_, vals)| vals.into_iter().next())
}

fn form_fields(x: &Element) -> Vec<(String, Vec<String>)> {
    x.elements()
        .filter(|f| f.is("field", NS_DATA))
        .filter_map(|f| {
            let values = f.elements().filter(|v| v.is("value", NS_DATA)).map(Element::text).collect();
            Some((f.attr("var")?.to_owned(), values))
        })
        .collect()
}

/// Create a node (`None`: an instant node, named by the broker) with a configuration form.
pub fn create_request(broker: &str, node: Option<&str>, config: &NodeConfig) -> Element {
    let mut create = Element::new("create", NS_PUBSUB);
    if let Some(n) = node {
        create.set_attr("node", n);
    }
    let mut pubsub = Element::new("pubsub", NS_PUBSUB).with_child(create);
    let mut fields: Vec<(&str, &str)> = Vec::new();
    let opt = [
        ("pubsub#type", &config.pubsub_type),
        ("pubsub#title", &config.title),
        ("pubsub#description", &config.description),
        ("pubsub#access_model", &config.access_model),
    ];
    for (var, v) in &opt {
        if let Some(v) = v {
            fields.push((var, v));
        }
    }
    fields.extend(config.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if !fields.is_empty() {
        let mut x = Element::new("x", NS_DATA).with_attr("type", "submit").with_child(
            text_field("FORM_TYPE", FORM_NODE_CONFIG).with_attr("type", "hidden"),
        );
        for (var, v) in fields {
            x.push(text_field(var, v));
        }
        pubsub.push(Element::new("configure", NS_PUBSUB).with_child(x));
    }
    iq("set", broker, pubsub)
}

/// Publish `payload` (XEP-0060 §7.1), with our item id or the broker's.
pub fn publish_request(broker: &str, node: &str, payload: Element, id: Option<&str>) -> Element {
    let mut item = Element::new("item", NS_PUBSUB).with_child(payload);
    if let Some(id) = id {
        item.set_attr("id", id);
    }
    let publish = Element::new("publish", NS_PUBSUB).with_attr("node", node).with_child(item);
    iq("set", broker, Element::new("pubsub", NS_PUBSUB).with_child(publish))
}

/// The item id in a publish result (§7.1.2), if the broker sent one.
pub fn parse_publish_reply(reply: &Element) -> Option<String> {
    reply
        .child("pubsub", NS_PUBSUB)?
        .child("publish", NS_PUBSUB)?
        .child("item", NS_PUBSUB)?
        .attr("id")
        .map(str::to_owned)
}

/// Subscribe `jid` to `node` (§6.1.1).
pub fn subscribe_request(broker: &str, node: &str, jid: &str) -> Element {
    let sub = Element::new("subscribe", NS_PUBSUB).with_attr("node", node).with_attr("jid", jid);
    iq("set", broker, Element::new("pubsub", NS_PUBSUB).with_child(sub))
}

/// The subscription in a subscribe result (§6.1.2). An empty result is read as
/// "subscribed", which is what XEP-0060 §6.1.2 allows a service to mean by it.
pub fn parse_subscription(reply: &Element, node: &str, jid: &str) -> Subscription {
    let sub = reply.child("pubsub", NS_PUBSUB).and_then(|p| p.child("subscription", NS_PUBSUB));
    Subscription {
        node: sub.and_then(|s| s.attr("node")).unwrap_or(node).to_owned(),
        jid: sub.and_then(|s| s.attr("jid")).unwrap_or(jid).to_owned(),
        state: sub
            .and_then(|s| s.attr("subscription"))
            .map(SubscriptionState::parse)
            .unwrap_or(SubscriptionState::Subscribed),
        subid: sub.and_then(|s| s.attr("subid")).map(str::to_owned),
    }
}

/// Unsubscribe `jid` from `node` (§6.2.1).
pub fn unsubscribe_request(broker: &str, node: &str, jid: &str, subid: Option<&str>) -> Element {
    let mut u = Element::new("unsubscribe", NS_PUBSUB).with_attr("node", node).with_attr("jid", jid);
    if let Some(s) = subid {
        u.set_attr("subid", s);
    }
    iq("set", broker, Element::new("pubsub", NS_PUBSUB).with_child(u))
}

/// Retrieve items (§6.5): by id, the last `max_items`, or a page (`set`).
pub fn items_request(broker: &str, node: &str, what: &Retrieve, set: Option<Element>) -> Element {
    let mut items = Element::new("items", NS_PUBSUB).with_attr("node", node);
    if let Some(m) = what.max_items {
        items.set_attr("max_items", m.to_string());
    }
    for id in &what.ids {
        items.push(Element::new("item", NS_PUBSUB).with_attr("id", id));
    }
    let mut pubsub = Element::new("pubsub", NS_PUBSUB).with_child(items);
    if let Some(s) = set {
        pubsub.push(s);
    }
    iq("get", broker, pubsub)
}

fn item_of(e: &Element) -> Item {
    Item {
        id: e.attr("id").map(str::to_owned),
        publisher: e.attr("publisher").map(str::to_owned),
        payload: e.elements().next().cloned(),
    }
}

/// Items and the page description of an items result.
pub fn parse_items(reply: &Element) -> (Vec<Item>, Option<RsmSet>) {
    let Some(pubsub) = reply.child("pubsub", NS_PUBSUB) else { return (Vec::new(), None) };
    let items = pubsub
        .child("items", NS_PUBSUB)
        .map(|i| i.elements().filter(|e| e.is("item", NS_PUBSUB)).map(item_of).collect())
        .unwrap_or_default();
    (items, RsmSet::parse(pubsub))
}

/// Reads a pubsub event notification out of a `<message/>`; `None` if it is not one.
pub fn parse_event(message: &Element) -> Option<PubsubEvent> {
    if !message.is("message", ns::CLIENT) || message.attr("type") == Some("error") {
        return None;
    }
    let event = message.child("event", NS_PUBSUB_EVENT)?;
    let delay = message.child("delay", ns::DELAY).and_then(|d| {
        Some(Delay { stamp: d.attr("stamp")?.to_owned(), from: d.attr("from").map(str::to_owned) })
    });
    let child = event.elements().find(|e| e.ns == NS_PUBSUB_EVENT)?;
    let node = child.attr("node")?.to_owned();
    let kind = match child.name.as_str() {
        "items" => {
            let items = child.elements().filter(|e| e.is("item", NS_PUBSUB_EVENT)).map(item_of).collect();
            let retracted = child
                .elements()
                .filter(|e| e.is("retract", NS_PUBSUB_EVENT))
                .filter_map(|e| e.attr("id").map(str::to_owned))
                .collect();
            EventKind::Items { items, retracted }
        }
        "purge" => EventKind::Purge,
        "delete" => EventKind::Delete,
        "configuration" => EventKind::Configuration,
        "subscription" => EventKind::Subscription {
            jid: child.attr("jid").unwrap_or_default().to_owned(),
            state: SubscriptionState::parse(child.attr("subscription").unwrap_or("none")),
        },
        _ => return None,
    };
    Some(PubsubEvent { from: message.attr("from").map(str::to_owned), node, kind, delay })
}

impl Client {
    /// Lists the broker's topics (disco#items), following RSM pages when the broker pages.
    pub async fn topics(&mut self, broker: &str) -> Result<Vec<Topic>, ClientError> {
        let mut pager = Pager::new(PAGE_SIZE);
        let mut out = Vec::new();
        loop {
            let reply = self.iq(disco_items_request(broker, None, Some(pager.request()))).await?;
            let (page, set) = parse_disco_items(&reply);
            let n = page.len();
            out.extend(page);
            if !pager.advance(set.as_ref(), n) {
                return Ok(out);
            }
        }
    }

    /// A topic's disco#info with its meta-data (pubsub#type, title, description).
    pub async fn topic_info(&mut self, broker: &str, node: &str) -> Result<TopicInfo, ClientError> {
        let reply = self.iq(disco_info_request(broker, node)).await?;
        Ok(parse_disco_info(node, &reply))
    }

    /// Creates a topic; returns its name (the broker's choice for an instant node).
    pub async fn create_topic(&mut self, broker: &str, node: Option<&str>, config: &NodeConfig) -> Result<String, ClientError> {
        let reply = self.iq(create_request(broker, node, config)).await?;
        let named = reply
            .child("pubsub", NS_PUBSUB)
            .and_then(|p| p.child("create", NS_PUBSUB))
            .and_then(|c| c.attr("node"))
            .map(str::to_owned);
        named
            .or_else(|| node.map(str::to_owned))
            .ok_or_else(|| ClientError::Protocol("instant node created but not named".into()))
    }

    /// Creates `node` unless it exists; true if it was created. A `conflict` on create
    /// (someone else was quicker) counts as existing.
    pub async fn ensure_topic(&mut self, broker: &str, node: &str, config: &NodeConfig) -> Result<bool, ClientError> {
        match self.topic_info(broker, node).await {
            Ok(_) => return Ok(false),
            Err(e) if e.condition() == Some("item-not-found") => {}
            Err(e) => return Err(e),
        }
        match self.create_topic(broker, Some(node), config).await {
            Ok(_) => Ok(true),
            Err(e) if e.condition() == Some("conflict") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Publishes `payload`; returns the item id the broker assigned or kept.
    pub async fn publish(&mut self, broker: &str, node: &str, payload: Element, id: Option<&str>) -> Result<Option<String>, ClientError> {
        let reply = self.iq(publish_request(broker, node, payload, id)).await?;
        Ok(parse_publish_reply(&reply).or_else(|| id.map(str::to_owned)))
    }

    /// Subscribes `jid` (default: our bare JID, so the subscription outlives this
    /// session and items sent while away are delivered on return, RFC 8600 §6).
    pub async fn subscribe(&mut self, broker: &str, node: &str, jid: Option<&str>) -> Result<Subscription, ClientError> {
        let jid = jid.map(str::to_owned).unwrap_or_else(|| self.jid().bare().to_string());
        let reply = self.iq(subscribe_request(broker, node, &jid)).await?;
        Ok(parse_subscription(&reply, node, &jid))
    }

    /// Ends a subscription (default JID: our bare JID).
    pub async fn unsubscribe(&mut self, broker: &str, node: &str, jid: Option<&str>, subid: Option<&str>) -> Result<(), ClientError> {
        let jid = jid.map(str::to_owned).unwrap_or_else(|| self.jid().bare().to_string());
        self.iq(unsubscribe_request(broker, node, &jid, subid)).await?;
        Ok(())
    }

    /// Retrieves items: by id, the last `max_items`, or all (paged with RSM when the
    /// broker pages).
    pub async fn items(&mut self, broker: &str, node: &str, what: &Retrieve) -> Result<Vec<Item>, ClientError> {
        if what.max_items.is_some() || !what.ids.is_empty() {
            let reply = self.iq(items_request(broker, node, what, None)).await?;
            return Ok(parse_items(&reply).0);
        }
        let mut pager = Pager::new(PAGE_SIZE);
        let mut out = Vec::new();
        loop {
            let reply = self.iq(items_request(broker, node, what, Some(pager.request()))).await?;
            let (page, set) = parse_items(&reply);
            let n = page.len();
            out.extend(page);
            if !pager.advance(set.as_ref(), n) {
                return Ok(out);
            }
        }
    }

    /// The next pubsub event notification, skipping other stanzas. `Ok(None)` when the
    /// server closed the stream.
    pub async fn next_event(&mut self) -> Result<Option<PubsubEvent>, ClientError> {
        loop {
            let Some(st) = self.next_stanza().await? else { return Ok(None) };
            if let Some(ev) = parse_event(&st) {
                return Ok(Some(ev));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";

    fn wire(e: &Element) -> String {
        String::from_utf8(e.to_bytes(ns::CLIENT)).unwrap_or_default()
    }

    fn set(first: Option<&str>, last: Option<&str>, count: Option<usize>) -> RsmSet {
        RsmSet { first: first.map(Into::into), last: last.map(Into::into), count }
    }

    #[test]
    fn event_with_item_payload_and_delay_is_read() {
        let msg = Element::new("message", ns::CLIENT)
            .with_attr("from", "broker.grid.test")
            .with_attr("type", "headline")
            .with_child(
                Element::new("event", NS_PUBSUB_EVENT).with_child(
                    Element::new("items", NS_PUBSUB_EVENT).with_attr("node", "incidents").with_child(
                        Element::new("item", NS_PUBSUB_EVENT)
                            .with_attr("id", "i1")
                            .with_attr("publisher", "p1@grid.test")
                            .with_child(Element::new("IODEF-Document", IODEF).with_attr("version", "2.00")),
                    ),
                ),
            )
            .with_child(Element::new("delay", ns::DELAY).with_attr("stamp", "2024-05-01T10:00:00Z").with_attr("from", "grid.test"));
        let ev = parse_event(&msg).unwrap_or_else(|| panic!("not an event"));
        assert_eq!(ev.from.as_deref(), Some("broker.grid.test"));
        assert_eq!(ev.node, "incidents");
        assert_eq!(ev.delay, Some(Delay { stamp: "2024-05-01T10:00:00Z".into(), from: Some("grid.test".into()) }));
        let EventKind::Items { items, retracted } = ev.kind else { panic!("not items") };
        assert!(retracted.is_empty());
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id.as_deref(), Some("i1"));
        assert_eq!(items[0].publisher.as_deref(), Some("p1@grid.test"));
        assert!(items[0].payload.as_ref().is_some_and(|p| p.is("IODEF-Document", IODEF)));
    }

    #[test]
    fn retractions_purges_and_non_events_are_told_apart() {
        let ev = |child: Element| Element::new("message", ns::CLIENT).with_child(Element::new("event", NS_PUBSUB_EVENT).with_child(child));
        let r = parse_event(&ev(Element::new("items", NS_PUBSUB_EVENT)
            .with_attr("node", "n")
            .with_child(Element::new("retract", NS_PUBSUB_EVENT).with_attr("id", "x"))));
        assert!(matches!(r.map(|e| e.kind), Some(EventKind::Items { items, retracted }) if items.is_empty() && retracted == ["x"]));
        let p = parse_event(&ev(Element::new("purge", NS_PUBSUB_EVENT).with_attr("node", "n")));
        assert_eq!(p.map(|e| e.kind), Some(EventKind::Purge));
        let d = parse_event(&ev(Element::new("delete", NS_PUBSUB_EVENT).with_attr("node", "n")));
        assert!(d.is_some_and(|e| e.kind == EventKind::Delete && e.delay.is_none()));
        // Missing node, wrong namespace, plain chat, error message: not events.
        assert!(parse_event(&ev(Element::new("items", NS_PUBSUB_EVENT))).is_none());
        assert!(parse_event(&ev(Element::new("items", NS_PUBSUB).with_attr("node", "n"))).is_none());
        assert!(parse_event(&Element::new("message", ns::CLIENT).with_child(Element::new("body", ns::CLIENT).with_text("hi"))).is_none());
        let mut err = ev(Element::new("purge", NS_PUBSUB_EVENT).with_attr("node", "n"));
        err.set_attr("type", "error");
        assert!(parse_event(&err).is_none());
    }

    #[test]
    fn pager_follows_last_until_count_is_reached() {
        let mut p = Pager::new(2);
        assert_eq!(wire(&p.request()), "<set xmlns='http://jabber.org/protocol/rsm'><max>2</max></set>");
        assert!(p.advance(Some(&set(Some("a"), Some("b"), Some(5))), 2));
        assert_eq!(
            wire(&p.request()),
            "<set xmlns='http://jabber.org/protocol/rsm'><max>2</max><after>b</after></set>"
        );
        assert!(p.advance(Some(&set(Some("c"), Some("d"), Some(5))), 2));
        assert!(!p.advance(Some(&set(Some("e"), Some("e"), Some(5))), 1), "count reached");
    }

    #[test]
    fn pager_stops_without_set_on_empty_or_short_pages_and_on_a_stuck_cursor() {
        assert!(!Pager::new(10).advance(None, 50), "server ignores RSM: everything came at once");
        assert!(!Pager::new(10).advance(Some(&set(None, None, Some(0))), 0));
        assert!(!Pager::new(10).advance(Some(&set(Some("a"), Some("c"), None)), 3), "short page, no count");
        let mut p = Pager::new(2);
        assert!(p.advance(Some(&set(Some("a"), Some("b"), None)), 2), "full page, no count: ask again");
        assert!(!p.advance(Some(&set(Some("a"), Some("b"), None)), 2), "same last twice");
        let mut p = Pager::new(1);
        let mut pages = 0;
        while p.advance(Some(&set(None, Some(&pages.to_string()), Some(usize::MAX))), 1) {
            pages += 1;
        }
        assert_eq!(pages + 1, MAX_PAGES, "a never-ending server is cut off");
    }

    #[test]
    fn rsm_set_is_read_from_a_disco_items_reply() {
        let reply = Element::new("iq", ns::CLIENT).with_attr("type", "result").with_child(
            Element::new("query", ns::DISCO_ITEMS)
                .with_child(Element::new("item", ns::DISCO_ITEMS).with_attr("jid", "broker.grid.test").with_attr("node", "incidents").with_attr("name", "IODEF"))
                .with_child(Element::new("item", ns::DISCO_ITEMS).with_attr("node", "no-jid"))
                .with_child(
                    Element::new("set", NS_RSM)
                        .with_child(Element::new("first", NS_RSM).with_attr("index", "0").with_text("incidents"))
                        .with_child(Element::new("last", NS_RSM).with_text("incidents"))
                        .with_child(Element::new("count", NS_RSM).with_text("7")),
                ),
        );
        let (topics, set) = parse_disco_items(&reply);
        assert_eq!(topics, vec![Topic { jid: "broker.grid.test".into(), node: Some("incidents".into()), name: Some("IODEF".into()) }]);
        assert_eq!(set, Some(RsmSet { first: Some("incidents".into()), last: Some("incidents".into()), count: Some(7) }));
    }

    #[test]
    fn meta_data_form_gives_type_title_and_description() {
        let form = Element::new("x", NS_DATA)
            .with_attr("type", "result")
            .with_child(text_field("FORM_TYPE", FORM_META_DATA).with_attr("type", "hidden"))
            .with_child(text_field("pubsub#type", IODEF))
            .with_child(text_field("pubsub#title", "Incidents"))
            .with_child(text_field("pubsub#description", "IODEF reports"));
        let other = Element::new("x", NS_DATA).with_child(text_field("FORM_TYPE", "urn:other")).with_child(text_field("pubsub#type", "wrong"));
        let reply = Element::new("iq", ns::CLIENT).with_child(
            Element::new("query", ns::DISCO_INFO)
                .with_child(Element::new("identity", ns::DISCO_INFO).with_attr("category", "pubsub").with_attr("type", "leaf"))
                .with_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", NS_PUBSUB))
                .with_child(other)
                .with_child(form),
        );
        let info = parse_disco_info("incidents", &reply);
        assert_eq!(info.pubsub_type.as_deref(), Some(IODEF));
        assert_eq!(info.title.as_deref(), Some("Incidents"));
        assert_eq!(info.description.as_deref(), Some("IODEF reports"));
        assert_eq!(info.identities, vec![("pubsub".to_owned(), "leaf".to_owned())]);
        assert_eq!(info.features, vec![NS_PUBSUB.to_owned()]);
    }

    #[test]
    fn create_request_carries_the_configuration_form() {
        let cfg = NodeConfig { pubsub_type: Some(IODEF.into()), access_model: Some("open".into()), ..NodeConfig::default() };
        let s = wire(&create_request("broker.grid.test", Some("incidents"), &cfg));
        assert_eq!(
            s,
            "<iq type='set' to='broker.grid.test'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
             <create node='incidents'/><configure><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>\
             <field var='pubsub#type'><value>urn:ietf:params:xml:ns:iodef-2.0</value></field>\
             <field var='pubsub#access_model'><value>open</value></field></x></configure></pubsub></iq>"
        );
        let bare = wire(&create_request("b", None, &NodeConfig::default()));
        assert_eq!(bare, "<iq type='set' to='b'><pubsub xmlns='http://jabber.org/protocol/pubsub'><create/></pubsub></iq>");
    }

    #[test]
    fn publish_subscribe_and_items_round_trip_through_their_replies() {
        let req = publish_request("b", "n", Element::new("p", "urn:x"), Some("id1"));
        assert_eq!(
            wire(&req),
            "<iq type='set' to='b'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='n'>\
             <item id='id1'><p xmlns='urn:x'/></item></publish></pubsub></iq>"
        );
        let reply = Element::new("iq", ns::CLIENT).with_child(
            Element::new("pubsub", NS_PUBSUB).with_child(
                Element::new("publish", NS_PUBSUB).with_attr("node", "n").with_child(Element::new("item", NS_PUBSUB).with_attr("id", "gen-1")),
            ),
        );
        assert_eq!(parse_publish_reply(&reply).as_deref(), Some("gen-1"));
        assert_eq!(parse_publish_reply(&Element::new("iq", ns::CLIENT)), None);

        let sub = Element::new("iq", ns::CLIENT).with_child(
            Element::new("pubsub", NS_PUBSUB).with_child(
                Element::new("subscription", NS_PUBSUB)
                    .with_attr("node", "n")
                    .with_attr("jid", "p1@grid.test")
                    .with_attr("subid", "s1")
                    .with_attr("subscription", "pending"),
            ),
        );
        let s = parse_subscription(&sub, "n", "p1@grid.test");
        assert_eq!(s.state, SubscriptionState::Pending);
        assert_eq!(s.subid.as_deref(), Some("s1"));
        let empty = parse_subscription(&Element::new("iq", ns::CLIENT), "n", "p1@grid.test");
        assert_eq!(empty.state, SubscriptionState::Subscribed);

        let what = Retrieve { max_items: Some(3), ids: vec![] };
        assert!(wire(&items_request("b", "n", &what, None)).contains("<items node='n' max_items='3'/>"));
        let what = Retrieve { max_items: None, ids: vec!["a".into()] };
        assert!(wire(&items_request("b", "n", &what, None)).contains("<items node='n'><item id='a'/></items>"));
        let items = Element::new("iq", ns::CLIENT).with_child(
            Element::new("pubsub", NS_PUBSUB)
                .with_child(
                    Element::new("items", NS_PUBSUB)
                        .with_attr("node", "n")
                        .with_child(Element::new("item", NS_PUBSUB).with_attr("id", "a").with_child(Element::new("p", "urn:x")))
                        .with_child(Element::new("item", NS_PUBSUB).with_attr("id", "b")),
                )
                .with_child(Element::new("set", NS_RSM).with_child(Element::new("last", NS_RSM).with_text("b"))),
        );
        let (got, set) = parse_items(&items);
        assert_eq!(got.len(), 2);
        assert!(got[0].payload.is_some() && got[1].payload.is_none());
        assert_eq!(set.and_then(|s| s.last).as_deref(), Some("b"));
    }
}
