//! The broker's vocabulary (XEP-0060 words): nodes (the draft's Topics), their
//! configuration, items, subscriptions, affiliations; the typed requests the
//! protocol layer produces and the replies and events the service returns.
//!
//! Plain data: no XML, no I/O. Payloads are kept as the serialized XML of the
//! one payload element, which the service never looks inside.

use crate::jid::{BareJid, Jid};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A node name (XEP-0060 NodeID): any non-empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who may subscribe and retrieve (XEP-0060 §4.5). RFC 8600 §8.3.4 recommends
/// `authorize` or `whitelist`; `open` is for development.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessModel {
    Open,
    Authorize,
    Whitelist,
}

impl AccessModel {
    pub fn name(self) -> &'static str {
        match self {
            AccessModel::Open => "open",
            AccessModel::Authorize => "authorize",
            AccessModel::Whitelist => "whitelist",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [AccessModel::Open, AccessModel::Authorize, AccessModel::Whitelist].into_iter().find(|m| m.name() == s)
    }
}

/// Who may publish (XEP-0060 §16.4.4 `pubsub#publish_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishModel {
    Publishers,
    Subscribers,
    Open,
}

impl PublishModel {
    pub fn name(self) -> &'static str {
        match self {
            PublishModel::Publishers => "publishers",
            PublishModel::Subscribers => "subscribers",
            PublishModel::Open => "open",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [PublishModel::Publishers, PublishModel::Subscribers, PublishModel::Open].into_iter().find(|m| m.name() == s)
    }
}

/// When the last published item is sent to a new subscriber (`pubsub#send_last_published_item`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendLast {
    Never,
    OnSub,
}

impl SendLast {
    pub fn name(self) -> &'static str {
        match self {
            SendLast::Never => "never",
            SendLast::OnSub => "on_sub",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "never" => Some(SendLast::Never),
            // on_sub_and_presence behaves as on_sub: platforms have no rosters.
            "on_sub" | "on_sub_and_presence" => Some(SendLast::OnSub),
            _ => None,
        }
    }
}

/// A node's configuration (XEP-0060 §16.4.4 `pubsub#node_config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub title: String,
    pub description: String,
    /// `pubsub#type`: the payload namespace (RFC 8600 §5: MUST be set for discovery).
    pub payload_type: String,
    pub access_model: AccessModel,
    pub publish_model: PublishModel,
    /// Items kept; older ones are dropped (retention).
    pub max_items: u32,
    /// Items older than this are dropped; 0 keeps them until max_items pushes them out.
    pub item_expire_secs: u64,
    pub notify_retract: bool,
    pub notify_delete: bool,
    pub notify_config: bool,
    pub send_last_published_item: SendLast,
}

/// The configuration fields a form may set; unset fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub payload_type: Option<String>,
    pub access_model: Option<AccessModel>,
    pub publish_model: Option<PublishModel>,
    pub max_items: Option<u32>,
    pub item_expire_secs: Option<u64>,
    pub notify_retract: Option<bool>,
    pub notify_delete: Option<bool>,
    pub notify_config: Option<bool>,
    pub send_last_published_item: Option<SendLast>,
    /// `pubsub#persist_items`: only `true` is accepted (items are always stored).
    pub persist_items: Option<bool>,
}

/// An affiliation with a node (XEP-0060 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affiliation {
    Owner,
    Publisher,
    PublishOnly,
    Member,
    None,
    Outcast,
}

impl Affiliation {
    pub fn name(self) -> &'static str {
        match self {
            Affiliation::Owner => "owner",
            Affiliation::Publisher => "publisher",
            Affiliation::PublishOnly => "publish-only",
            Affiliation::Member => "member",
            Affiliation::None => "none",
            Affiliation::Outcast => "outcast",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Affiliation::Owner,
            Affiliation::Publisher,
            Affiliation::PublishOnly,
            Affiliation::Member,
            Affiliation::None,
            Affiliation::Outcast,
        ]
        .into_iter()
        .find(|a| a.name() == s)
    }
}

/// The state of a subscription (XEP-0060 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubState {
    Subscribed,
    /// Awaiting the owner's approval (access model `authorize`).
    Pending,
}

impl SubState {
    pub fn name(self) -> &'static str {
        match self {
            SubState::Subscribed => "subscribed",
            SubState::Pending => "pending",
        }
    }
}

/// A node as stored (items are stored separately).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub config: NodeConfig,
    /// The platform that created it (always also an owner).
    pub creator: BareJid,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Explicit affiliations; everyone else is `none`.
    pub affiliations: BTreeMap<BareJid, Affiliation>,
    /// Sequence number the next item gets (publish order; never reused).
    pub next_seq: u64,
}

/// A published item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// Position in the node's log: strictly increasing in publish order.
    pub seq: u64,
    pub publisher: BareJid,
    /// Milliseconds since the Unix epoch.
    pub published_ms: u64,
    /// Serialized XML of the payload element (empty for a notification-only item).
    pub payload: Bytes,
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRecord {
    pub node: NodeId,
    /// The subscribed address: a platform's bare JID, or one session's full JID.
    pub jid: String,
    pub subid: String,
    pub state: SubState,
    /// The owner platform (bare JID of `jid`).
    pub owner: BareJid,
    /// Seq of the last item delivered (offline delivery resumes after it).
    pub delivered: u64,
    /// Subscription option `pubsub#deliver` (XEP-0060 §6.3): false pauses
    /// every notification; turning it on again resumes with new items.
    #[serde(default = "yes")]
    pub deliver: bool,
}

fn yes() -> bool {
    true
}

/// Who asks. The controller itself (e.g. for its alerts topic) is not a platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Controller,
    Platform(BareJid),
}

impl Actor {
    pub fn platform(&self) -> Option<&BareJid> {
        match self {
            Actor::Controller => None,
            Actor::Platform(j) => Some(j),
        }
    }
}

/// XEP-0059 paging over a list in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub max: Option<u32>,
    /// Items after this cursor.
    pub after: Option<String>,
    /// Items before this cursor; `Some("")` asks for the last page.
    pub before: Option<String>,
}

/// XEP-0059 result set information for a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageInfo {
    pub first: Option<String>,
    pub last: Option<String>,
    pub count: usize,
}

/// One typed broker request, as parsed from an IQ (XEP-0060 §5-§8).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Create { node: Option<NodeId>, config: ConfigPatch },
    ConfigureGet { node: NodeId },
    ConfigureSet { node: NodeId, config: ConfigPatch },
    DefaultConfig,
    Delete { node: NodeId },
    Purge { node: NodeId },
    /// `preconditions`: publish-options (XEP-0060 §7.1.5) that must match the node.
    Publish { node: NodeId, item_id: Option<String>, payload: Bytes, preconditions: ConfigPatch },
    Retract { node: NodeId, item_ids: Vec<String>, notify: bool },
    /// §6.1.1; `deliver` from options submitted with it (§6.3.7).
    Subscribe { node: NodeId, jid: Jid, deliver: Option<bool> },
    Unsubscribe { node: NodeId, jid: Jid, subid: Option<String> },
    OptionsGet { node: NodeId, jid: Jid, subid: Option<String> },
    /// §6.3.5: set subscription options (`pubsub#deliver`; None leaves it).
    OptionsSet { node: NodeId, jid: Jid, subid: Option<String>, deliver: Option<bool> },
    Items { node: NodeId, max_items: Option<u32>, item_ids: Vec<String>, page: Option<Page> },
    Subscriptions { node: Option<NodeId> },
    Affiliations { node: Option<NodeId> },
    OwnerSubscriptions { node: NodeId },
    OwnerSubscriptionsSet { node: NodeId, changes: Vec<(Jid, Option<SubState>)> },
    OwnerAffiliations { node: NodeId },
    OwnerAffiliationsSet { node: NodeId, changes: Vec<(BareJid, Affiliation)> },
    /// The owner's answer to a pending subscription (XEP-0060 §8.6, a data form in a message).
    Approve { node: NodeId, jid: Jid, subid: Option<String>, allow: bool },
    DiscoInfo { node: Option<NodeId> },
    DiscoItems { node: Option<NodeId>, page: Option<Page> },
}

/// Node metadata for disco#info (`pubsub#meta-data`, XEP-0060 §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub config: NodeConfig,
    pub owners: Vec<BareJid>,
    pub creator: BareJid,
    pub created: u64,
    pub num_subscribers: usize,
}

/// A subscription as shown to the platform or the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubView {
    pub node: NodeId,
    pub jid: String,
    pub subid: String,
    pub state: SubState,
    /// `pubsub#deliver`.
    pub deliver: bool,
}

/// The reply to a request (the protocol layer renders it).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An empty IQ result.
    Empty,
    Created { node: NodeId },
    Config { node: Option<NodeId>, config: NodeConfig },
    Published { node: NodeId, item_id: String },
    Subscription(SubView),
    Subscriptions { node: Option<NodeId>, subs: Vec<SubView> },
    Affiliations { node: Option<NodeId>, affs: Vec<(NodeId, BareJid, Affiliation)> },
    Items { node: NodeId, items: Vec<Item>, page: Option<PageInfo> },
    ServiceInfo,
    NodeInfo(NodeInfo),
    NodeList { nodes: Vec<(NodeId, String)>, page: Option<PageInfo> },
    /// disco#items on a topic: its item ids (XEP-0060 §5.5).
    ItemIds { node: NodeId, ids: Vec<String> },
}

/// What subscribers are told (XEP-0060 §7, §8).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New item(s) on a node.
    Items { node: NodeId, items: Vec<Item> },
    Retract { node: NodeId, item_ids: Vec<String> },
    Purge { node: NodeId },
    Delete { node: NodeId },
    Configuration { node: NodeId },
    /// A subscription's state changed (approval, owner change, removal).
    Subscription { node: NodeId, jid: String, subid: String, state: Option<SubState> },
    /// An owner is asked to approve a pending subscription (XEP-0060 §8.6).
    ApprovalRequest { node: NodeId, jid: String, subid: String },
}

/// Service-level errors, mapped to XEP-0060 stanza errors in one table in `protocol.rs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PubsubError {
    #[error("forbidden")]
    Forbidden,
    #[error("no such node")]
    NodeNotFound,
    #[error("no such item")]
    ItemNotFound,
    #[error("node already exists")]
    Conflict,
    #[error("not subscribed")]
    NotSubscribed,
    #[error("subscription is pending approval")]
    PendingSubscription,
    #[error("subid required")]
    SubidRequired,
    #[error("invalid subid")]
    InvalidSubid,
    #[error("the subscription JID does not match the requester")]
    InvalidJid,
    #[error("node id required")]
    NodeIdRequired,
    #[error("item id required")]
    ItemRequired,
    #[error("payload required")]
    PayloadRequired,
    #[error("payload too large ({size} bytes, limit {limit})")]
    PayloadTooBig { size: usize, limit: usize },
    #[error("publish-options precondition not met: {0}")]
    PreconditionNotMet(String),
    #[error("not in the whitelist")]
    ClosedNode,
    #[error("outcast")]
    Outcast,
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("invalid configuration: {0}")]
    BadConfig(String),
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("payload rejected by {plugin}: {reason}")]
    InvalidPayload { plugin: String, reason: String },
    #[error("storage failure")]
    Storage(String),
}
