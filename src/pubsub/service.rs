//! The pure broker (STYLE §1): nodes, items, subscriptions and affiliations,
//! with XEP-0060's access rules. It checks access first (affiliations and
//! access models here, everything else through the injected [`Authorize`]),
//! then changes state and the store, and *returns* what to reply and whom to
//! notify. No XML, no sockets, no clock of its own: time comes in [`Ctx`].
//!
//! Offline delivery rests on two facts it keeps: every item has a sequence
//! number in publish order, and every subscription remembers the last one it
//! was delivered (`SubRecord::delivered`).

use super::model::*;
use super::store::{BrokerStore, ItemMeta};
use crate::authz::{self, Action, Authorize};
use crate::jid::{BareJid, Jid};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Limits of RFC 8600 §8.3.4, each with a config key (`[broker]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    /// Items in one retrieval reply (a larger request is paged).
    pub max_items_per_page: u32,
    /// Upper bound of any node's `max_items`.
    pub max_items_per_node: u32,
    pub max_topics_per_platform: usize,
    pub max_subscriptions_per_platform: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 128 * 1024,
            max_items_per_page: 100,
            max_items_per_node: 10_000,
            max_topics_per_platform: 100,
            max_subscriptions_per_platform: 1000,
        }
    }
}

/// The configuration of a new node before its creator's form is applied.
pub fn default_config(access_model: AccessModel) -> NodeConfig {
    NodeConfig {
        title: String::new(),
        description: String::new(),
        payload_type: String::new(),
        access_model,
        publish_model: PublishModel::Publishers,
        max_items: 1000,
        item_expire_secs: 0,
        notify_retract: true,
        notify_delete: true,
        notify_config: false,
        send_last_published_item: SendLast::Never,
    }
}

/// Who asks, how they logged in, and when.
pub struct Ctx<'a> {
    pub actor: Actor,
    /// The session's login facts, for the authorizer (None for the controller).
    pub login: Option<&'a authz::Context>,
    pub now_ms: u64,
}

/// Where an event goes: a subscription (with its id) or a plain address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub jid: String,
    pub owner: BareJid,
    pub subid: Option<String>,
}

/// An event and its recipients.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub event: Event,
    pub to: Arc<[Target]>,
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reply: Reply,
    pub deliveries: Vec<Delivery>,
}

impl Outcome {
    fn reply(reply: Reply) -> Self {
        Outcome { reply, deliveries: Vec::new() }
    }
}

struct NodeState {
    rec: NodeRecord,
    /// Retained items in publish order.
    items: VecDeque<ItemMeta>,
    by_id: HashMap<String, u64>,
    /// Subscription ids on this node.
    subs: Vec<String>,
}

impl NodeState {
    fn affiliation(&self, who: &BareJid) -> Affiliation {
        self.rec.affiliations.get(who).copied().unwrap_or(Affiliation::None)
    }
    fn owners(&self) -> Vec<BareJid> {
        self.rec.affiliations.iter().filter(|(_, a)| **a == Affiliation::Owner).map(|(j, _)| j.clone()).collect()
    }
    fn last_seq(&self) -> u64 {
        self.rec.next_seq.saturating_sub(1)
    }
}

/// The broker's state and rules.
pub struct Service<S: BrokerStore> {
    store: S,
    authz: Arc<dyn Authorize>,
    limits: Limits,
    default_access: AccessModel,
    nodes: BTreeMap<NodeId, NodeState>,
    subs: HashMap<String, SubRecord>,
    by_platform: HashMap<BareJid, Vec<String>>,
    /// Each node's delivery targets, built on its first publish and reused by
    /// the next ones (a publish copies no subscriber's addresses). Emptied by
    /// every request but a publish, since any other may change subscriptions.
    targets: std::cell::RefCell<HashMap<NodeId, Arc<[Target]>>>,
}

fn storage(e: super::store::BrokerStoreError) -> PubsubError {
    tracing::error!("broker store: {e}");
    PubsubError::Storage(e.to_string())
}

/// A fresh random id (item ids, subids, instant node names).
pub fn random_id() -> String {
    let mut b = [0u8; 10];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl<S: BrokerStore> Service<S> {
    /// Loads the broker's state from `store`.
    pub fn open(store: S, authz: Arc<dyn Authorize>, limits: Limits, default_access: AccessModel) -> Result<Self, PubsubError> {
        let loaded = store.load().map_err(storage)?;
        let mut items = loaded.items;
        let mut nodes = BTreeMap::new();
        for mut rec in loaded.nodes {
            let list: VecDeque<ItemMeta> = items.remove(&rec.id).unwrap_or_default().into();
            if let Some(last) = list.back() {
                // next_seq is persisted whenever the newest item goes (purge, retract,
                // expiry); publishes advance it in memory only.
                rec.next_seq = rec.next_seq.max(last.seq + 1);
            }
            let by_id = list.iter().map(|m| (m.id.clone(), m.seq)).collect();
            nodes.insert(rec.id.clone(), NodeState { rec, items: list, by_id, subs: Vec::new() });
        }
        let mut svc = Service {
            store,
            authz,
            limits,
            default_access,
            nodes,
            subs: HashMap::new(),
            by_platform: HashMap::new(),
            targets: Default::default(),
        };
        for s in loaded.subs {
            let Some(n) = svc.nodes.get_mut(&s.node) else { continue };
            // Delivered cursors may run ahead of the items (all retracted): keep seqs growing.
            n.rec.next_seq = n.rec.next_seq.max(s.delivered + 1);
            n.subs.push(s.subid.clone());
            svc.by_platform.entry(s.owner.clone()).or_default().push(s.subid.clone());
            svc.subs.insert(s.subid.clone(), s);
        }
        Ok(svc)
    }

    /// True if the request changes state (its reply must wait for durability).
    pub fn is_mutation(req: &Request) -> bool {
        !matches!(
            req,
            Request::ConfigureGet { .. }
                | Request::DefaultConfig
                | Request::OptionsGet { .. }
                | Request::Items { .. }
                | Request::Subscriptions { .. }
                | Request::Affiliations { .. }
                | Request::OwnerSubscriptions { .. }
                | Request::OwnerAffiliations { .. }
                | Request::DiscoInfo { .. }
                | Request::DiscoItems { .. }
        )
    }

    /// The flush handle of the underlying store.
    pub fn flusher(&self) -> Box<dyn Fn() -> Result<(), super::store::BrokerStoreError> + Send + Sync> {
        self.store.flusher()
    }

    /// Handles one request.
    pub fn handle(&mut self, ctx: &Ctx, req: Request) -> Result<Outcome, PubsubError> {
        let publish = matches!(req, Request::Publish { .. });
        let out = self.dispatch(ctx, req);
        if !publish {
            self.targets.get_mut().clear();
        }
        out
    }

    fn dispatch(&mut self, ctx: &Ctx, req: Request) -> Result<Outcome, PubsubError> {
        match req {
            Request::Create { node, config } => self.create(ctx, node, config),
            Request::ConfigureGet { node } => {
                let n = self.owned(ctx, &node, Action::Configure)?;
                Ok(Outcome::reply(Reply::Config { node: Some(node), config: n.rec.config.clone() }))
            }
            Request::ConfigureSet { node, config } => self.configure(ctx, node, config),
            Request::DefaultConfig => {
                Ok(Outcome::reply(Reply::Config { node: None, config: default_config(self.default_access) }))
            }
            Request::Delete { node } => self.delete(ctx, node),
            Request::Purge { node } => self.purge(ctx, node),
            Request::Publish { node, item_id, payload, preconditions } => {
                self.publish(ctx, node, item_id, payload, preconditions)
            }
            Request::Retract { node, item_ids, notify } => self.retract(ctx, node, item_ids, notify),
            Request::Subscribe { node, jid, deliver } => {
                let out = self.subscribe(ctx, node.clone(), jid.clone())?;
                match deliver {
                    // §6.3.7: the options submitted with the subscription.
                    Some(false) => {
                        let subid = match &out.reply {
                            Reply::Subscription(s) => Some(s.subid.clone()),
                            _ => None,
                        };
                        self.set_options(ctx, node, jid, subid, Some(false))?;
                        let mut out = out;
                        if let Reply::Subscription(s) = &mut out.reply {
                            s.deliver = false;
                        }
                        // Nothing to deliver now (the last published item included).
                        out.deliveries.retain(|d| !matches!(d.event, Event::Items { .. }));
                        Ok(out)
                    }
                    _ => Ok(out),
                }
            }
            Request::Unsubscribe { node, jid, subid } => self.unsubscribe(ctx, node, jid, subid),
            Request::OptionsGet { node, jid, subid } => {
                let sub = self.find_sub(ctx, &node, &jid, subid.as_deref())?;
                Ok(Outcome::reply(Reply::Subscription(view(sub))))
            }
            Request::OptionsSet { node, jid, subid, deliver } => self.set_options(ctx, node, jid, subid, deliver),
            Request::Items { node, max_items, item_ids, page } => self.items(ctx, node, max_items, item_ids, page),
            Request::Subscriptions { node } => {
                let me = ctx.actor.platform().cloned();
                let subs = self
                    .subs
                    .values()
                    .filter(|s| Some(&s.owner) == me.as_ref() && node.as_ref().is_none_or(|n| &s.node == n))
                    .map(view)
                    .collect();
                Ok(Outcome::reply(Reply::Subscriptions { node, subs }))
            }
            Request::Affiliations { node } => {
                let Some(me) = ctx.actor.platform() else {
                    return Ok(Outcome::reply(Reply::Affiliations { node, affs: Vec::new() }));
                };
                let affs = self
                    .nodes
                    .values()
                    .filter(|n| node.as_ref().is_none_or(|id| &n.rec.id == id))
                    .filter_map(|n| n.rec.affiliations.get(me).map(|a| (n.rec.id.clone(), me.clone(), *a)))
                    .collect();
                Ok(Outcome::reply(Reply::Affiliations { node, affs }))
            }
            Request::OwnerSubscriptions { node } => {
                let n = self.owned(ctx, &node, Action::ManageSubscriptions)?;
                let subs = n.subs.iter().filter_map(|id| self.subs.get(id)).map(view).collect();
                Ok(Outcome::reply(Reply::Subscriptions { node: Some(node), subs }))
            }
            Request::OwnerSubscriptionsSet { node, changes } => self.owner_set_subs(ctx, node, changes),
            Request::OwnerAffiliations { node } => {
                let n = self.owned(ctx, &node, Action::ManageSubscriptions)?;
                let affs = n.rec.affiliations.iter().map(|(j, a)| (node.clone(), j.clone(), *a)).collect();
                Ok(Outcome::reply(Reply::Affiliations { node: Some(node), affs }))
            }
            Request::OwnerAffiliationsSet { node, changes } => self.owner_set_affs(ctx, node, changes),
            Request::Approve { node, jid, subid, allow } => self.approve(ctx, node, jid, subid, allow),
            Request::DiscoInfo { node: None } => Ok(Outcome::reply(Reply::ServiceInfo)),
            Request::DiscoInfo { node: Some(node) } => {
                let n = self.node(&node)?;
                self.ask(ctx, Action::Discover, &node).map_err(|_| PubsubError::NodeNotFound)?;
                Ok(Outcome::reply(Reply::NodeInfo(NodeInfo {
                    id: node,
                    config: n.rec.config.clone(),
                    owners: n.owners(),
                    creator: n.rec.creator.clone(),
                    created: n.rec.created,
                    num_subscribers: n.subs.len(),
                })))
            }
            Request::DiscoItems { node: Some(node), .. } => {
                // XEP-0060 §5.5: a leaf node lists its item ids, to those who may read them.
                let n = self.node(&node)?;
                self.ask_visible(ctx, Action::Retrieve, &node)?;
                self.may_read(ctx, n)?;
                let ids = n.items.iter().map(|m| m.id.clone()).collect();
                Ok(Outcome::reply(Reply::ItemIds { node, ids }))
            }
            Request::DiscoItems { node: None, page } => self.list_nodes(ctx, page),
        }
    }

    // ---- access ---------------------------------------------------------

    /// Asks the authorizer about an existing topic (or one about to be created, with
    /// the payload type it asks for); the controller itself is always allowed.
    fn ask(&self, ctx: &Ctx, action: Action, node: &NodeId) -> Result<(), PubsubError> {
        let (payload_type, owner) = match self.nodes.get(node) {
            Some(n) => (n.rec.config.payload_type.as_str(), Some(&n.rec.creator)),
            None => ("", ctx.actor.platform()),
        };
        self.ask_about(ctx, action, authz::Topic { name: &node.0, payload_type, owner })
    }

    fn ask_about(&self, ctx: &Ctx, action: Action, topic: authz::Topic) -> Result<(), PubsubError> {
        let (Actor::Platform(who), Some(login)) = (&ctx.actor, ctx.login) else {
            return Ok(());
        };
        let d = self.authz.authorize(&authz::Request { principal: who, action, topic: Some(topic), context: login });
        if d.allowed { Ok(()) } else { Err(PubsubError::Forbidden) }
    }

    /// Asks, and hides a node the platform may not even discover (item-not-found).
    fn ask_visible(&self, ctx: &Ctx, action: Action, node: &NodeId) -> Result<(), PubsubError> {
        match self.ask(ctx, action, node) {
            Ok(()) => Ok(()),
            Err(e) => match self.ask(ctx, Action::Discover, node) {
                Ok(()) => Err(e),
                Err(_) => Err(PubsubError::NodeNotFound),
            },
        }
    }

    fn node(&self, id: &NodeId) -> Result<&NodeState, PubsubError> {
        self.nodes.get(id).ok_or(PubsubError::NodeNotFound)
    }

    fn affiliation(&self, ctx: &Ctx, n: &NodeState) -> Affiliation {
        match &ctx.actor {
            Actor::Controller => Affiliation::Owner,
            Actor::Platform(j) => n.affiliation(j),
        }
    }

    /// The node, if the actor owns it and may do `action` on it.
    fn owned(&self, ctx: &Ctx, id: &NodeId, action: Action) -> Result<&NodeState, PubsubError> {
        let n = self.node(id)?;
        self.ask_visible(ctx, action, id)?;
        if self.affiliation(ctx, n) != Affiliation::Owner {
            return Err(PubsubError::Forbidden);
        }
        Ok(n)
    }

    /// XEP-0060 §6.5 / §4.5: may the actor see this node's items?
    fn may_read(&self, ctx: &Ctx, n: &NodeState) -> Result<(), PubsubError> {
        let aff = self.affiliation(ctx, n);
        if aff == Affiliation::Outcast {
            return Err(PubsubError::Outcast);
        }
        // §4.1: publish-only may publish (and retract its own), never read.
        if aff == Affiliation::PublishOnly {
            return Err(PubsubError::Forbidden);
        }
        if matches!(aff, Affiliation::Owner | Affiliation::Publisher | Affiliation::Member) {
            return Ok(());
        }
        match n.rec.config.access_model {
            AccessModel::Open => Ok(()),
            AccessModel::Whitelist => Err(PubsubError::ClosedNode),
            AccessModel::Authorize => {
                let me = ctx.actor.platform();
                let sub = n.subs.iter().filter_map(|id| self.subs.get(id)).find(|s| Some(&s.owner) == me);
                match sub.map(|s| s.state) {
                    Some(SubState::Subscribed) => Ok(()),
                    Some(SubState::Pending) => Err(PubsubError::PendingSubscription),
                    None => Err(PubsubError::NotSubscribed),
                }
            }
        }
    }

    // ---- owner use cases ------------------------------------------------

    fn create(&mut self, ctx: &Ctx, node: Option<NodeId>, patch: ConfigPatch) -> Result<Outcome, PubsubError> {
        let node = node.unwrap_or_else(|| NodeId(random_id()));
        if node.0.is_empty() {
            return Err(PubsubError::NodeIdRequired);
        }
        let payload_type = patch.payload_type.as_deref().unwrap_or("");
        self.ask_about(ctx, Action::Create, authz::Topic { name: &node.0, payload_type, owner: ctx.actor.platform() })?;
        if self.nodes.contains_key(&node) {
            return Err(PubsubError::Conflict);
        }
        let creator = match &ctx.actor {
            Actor::Platform(j) => j.clone(),
            Actor::Controller => BareJid::domain("controller").map_err(|e| PubsubError::BadConfig(e.to_string()))?,
        };
        if let Actor::Platform(j) = &ctx.actor {
            let owned = self.nodes.values().filter(|n| &n.rec.creator == j).count();
            if owned >= self.limits.max_topics_per_platform {
                return Err(PubsubError::LimitReached(format!(
                    "a platform may create at most {} topics",
                    self.limits.max_topics_per_platform
                )));
            }
        }
        let mut config = default_config(self.default_access);
        self.apply_patch(&mut config, &patch)?;
        let mut affiliations = BTreeMap::new();
        if matches!(ctx.actor, Actor::Platform(_)) {
            affiliations.insert(creator.clone(), Affiliation::Owner);
        }
        let rec = NodeRecord { id: node.clone(), config, creator, created: ctx.now_ms / 1000, affiliations, next_seq: 1 };
        self.store.put_node(&rec).map_err(storage)?;
        self.nodes.insert(node.clone(), NodeState { rec, items: VecDeque::new(), by_id: HashMap::new(), subs: Vec::new() });
        Ok(Outcome::reply(Reply::Created { node }))
    }

    fn apply_patch(&self, c: &mut NodeConfig, p: &ConfigPatch) -> Result<(), PubsubError> {
        if p.persist_items == Some(false) {
            // Durability is the grid's promise (RFC 8600 §6 offline delivery).
            return Err(PubsubError::BadConfig("pubsub#persist_items must be 1: items are always stored".into()));
        }
        if let Some(v) = &p.title {
            c.title = v.clone();
        }
        if let Some(v) = &p.description {
            c.description = v.clone();
        }
        if let Some(v) = &p.payload_type {
            c.payload_type = v.clone();
        }
        if let Some(v) = p.access_model {
            c.access_model = v;
        }
        if let Some(v) = p.publish_model {
            c.publish_model = v;
        }
        if let Some(v) = p.max_items {
            if v == 0 {
                return Err(PubsubError::BadConfig("pubsub#max_items must be at least 1".into()));
            }
            c.max_items = v.min(self.limits.max_items_per_node);
        }
        if let Some(v) = p.item_expire_secs {
            c.item_expire_secs = v;
        }
        if let Some(v) = p.notify_retract {
            c.notify_retract = v;
        }
        if let Some(v) = p.notify_delete {
            c.notify_delete = v;
        }
        if let Some(v) = p.notify_config {
            c.notify_config = v;
        }
        if let Some(v) = p.send_last_published_item {
            c.send_last_published_item = v;
        }
        Ok(())
    }

    fn configure(&mut self, ctx: &Ctx, node: NodeId, patch: ConfigPatch) -> Result<Outcome, PubsubError> {
        let mut config = self.owned(ctx, &node, Action::Configure)?.rec.config.clone();
        self.apply_patch(&mut config, &patch)?;
        let n = self.nodes.get_mut(&node).ok_or(PubsubError::NodeNotFound)?;
        n.rec.config = config;
        self.store.put_node(&n.rec).map_err(storage)?;
        let mut out = Outcome::reply(Reply::Empty);
        let notify = n.rec.config.notify_config;
        let max = n.rec.config.max_items as usize;
        let dropped = Self::trim(&mut self.store, n, max, 0)?;
        let _ = dropped;
        if notify {
            out.deliveries.push(Delivery { event: Event::Configuration { node: node.clone() }, to: self.subscribed(&node) });
        }
        Ok(out)
    }

    fn delete(&mut self, ctx: &Ctx, node: NodeId) -> Result<Outcome, PubsubError> {
        let n = self.owned(ctx, &node, Action::Delete)?;
        let notify = n.rec.config.notify_delete;
        let to = self.subscribed(&node);
        let subids = n.subs.clone();
        self.store.delete_node(&node).map_err(storage)?;
        for id in &subids {
            self.drop_sub(id)?;
        }
        self.nodes.remove(&node);
        let mut out = Outcome::reply(Reply::Empty);
        if notify {
            out.deliveries.push(Delivery { event: Event::Delete { node }, to });
        }
        Ok(out)
    }

    fn purge(&mut self, ctx: &Ctx, node: NodeId) -> Result<Outcome, PubsubError> {
        self.owned(ctx, &node, Action::Purge)?;
        let to = self.subscribed(&node);
        let n = self.nodes.get_mut(&node).ok_or(PubsubError::NodeNotFound)?;
        Self::trim(&mut self.store, n, 0, 0)?;
        // Persist next_seq: with no items left, it could not be recovered from them.
        self.store.put_node(&n.rec).map_err(storage)?;
        let mut out = Outcome::reply(Reply::Empty);
        if n.rec.config.notify_retract {
            out.deliveries.push(Delivery { event: Event::Purge { node }, to });
        }
        Ok(out)
    }

    // ---- publisher use cases --------------------------------------------

    fn publish(
        &mut self,
        ctx: &Ctx,
        node: NodeId,
        item_id: Option<String>,
        payload: bytes::Bytes,
        pre: ConfigPatch,
    ) -> Result<Outcome, PubsubError> {
        self.admit_publish(ctx, &node, &payload, &pre)?;
        let publisher = match &ctx.actor {
            Actor::Platform(j) => j.clone(),
            Actor::Controller => BareJid::domain("controller").map_err(|e| PubsubError::BadConfig(e.to_string()))?,
        };
        let id = item_id.filter(|i| !i.is_empty()).unwrap_or_else(random_id);
        let n = self.nodes.get_mut(&node).ok_or(PubsubError::NodeNotFound)?;
        // Publishing an existing id replaces that item (XEP-0060 §7.1.2): it moves to the end.
        if let Some(old) = n.by_id.remove(&id) {
            n.items.retain(|m| m.seq != old);
            self.store.delete_item(&node, old).map_err(storage)?;
        }
        let seq = n.rec.next_seq;
        n.rec.next_seq += 1;
        let item = Item { id: id.clone(), seq, publisher: publisher.clone(), published_ms: ctx.now_ms, payload };
        self.store.put_item(&node, &item).map_err(storage)?;
        n.items.push_back(ItemMeta { seq, id: id.clone(), publisher, published_ms: ctx.now_ms });
        n.by_id.insert(id.clone(), seq);
        let max = n.rec.config.max_items as usize;
        let expire = n.rec.config.item_expire_secs;
        Self::trim(&mut self.store, n, max, if expire > 0 { ctx.now_ms.saturating_sub(expire * 1000) } else { 0 })?;
        let to = self.subscribed(&node);
        let mut out = Outcome::reply(Reply::Published { node: node.clone(), item_id: id });
        out.deliveries.push(Delivery { event: Event::Items { node, items: vec![item] }, to });
        Ok(out)
    }

    /// The topic's `pubsub#type` and creator, as plugins see them.
    pub fn topic_info(&self, node: &NodeId) -> Option<(&str, &BareJid)> {
        self.nodes.get(node).map(|n| (n.rec.config.payload_type.as_str(), &n.rec.creator))
    }

    /// Every check of a publish short of storing it: existence, authorization,
    /// the publish model, payload size and preconditions. The broker runs it
    /// before spending a payload validator on the request.
    pub fn admit_publish(&self, ctx: &Ctx, node: &NodeId, payload: &[u8], pre: &ConfigPatch) -> Result<(), PubsubError> {
        let n = self.node(node)?;
        self.ask_visible(ctx, Action::Publish, node)?;
        let aff = self.affiliation(ctx, n);
        let allowed = match aff {
            Affiliation::Owner | Affiliation::Publisher | Affiliation::PublishOnly => true,
            Affiliation::Outcast => false,
            Affiliation::Member | Affiliation::None => match n.rec.config.publish_model {
                PublishModel::Open => true,
                PublishModel::Subscribers => {
                    let me = ctx.actor.platform();
                    n.subs.iter().filter_map(|id| self.subs.get(id)).any(|s| Some(&s.owner) == me && s.state == SubState::Subscribed)
                }
                PublishModel::Publishers => false,
            },
        };
        if !allowed {
            return Err(PubsubError::Forbidden);
        }
        if payload.is_empty() {
            return Err(PubsubError::PayloadRequired);
        }
        if payload.len() > self.limits.max_payload_bytes {
            return Err(PubsubError::PayloadTooBig { size: payload.len(), limit: self.limits.max_payload_bytes });
        }
        check_preconditions(&n.rec.config, pre, self.limits.max_items_per_node)
    }

    /// Drops items beyond `max` (oldest first) and items published before `older_than_ms`.
    fn trim(store: &mut S, n: &mut NodeState, max: usize, older_than_ms: u64) -> Result<Vec<String>, PubsubError> {
        let mut dropped = Vec::new();
        while let Some(front) = n.items.front() {
            if n.items.len() <= max && front.published_ms >= older_than_ms {
                break;
            }
            let Some(m) = n.items.pop_front() else { break };
            store.delete_item(&n.rec.id, m.seq).map_err(storage)?;
            n.by_id.remove(&m.id);
            dropped.push(m.id);
        }
        Ok(dropped)
    }

    /// Drops expired items of every node (called periodically).
    pub fn expire(&mut self, now_ms: u64) -> Result<(), PubsubError> {
        for n in self.nodes.values_mut() {
            let e = n.rec.config.item_expire_secs;
            if e > 0 {
                let max = n.rec.config.max_items as usize;
                if !Self::trim(&mut self.store, n, max, now_ms.saturating_sub(e * 1000))?.is_empty() {
                    Self::keep_next_seq(&mut self.store, n)?;
                }
            }
        }
        Ok(())
    }

    /// `open` recovers next_seq from the newest stored item; once the newest item
    /// is gone (retracted, expired) the node record must carry it, or seqs (and
    /// with them delivery cursors and RSM cursors) would be reused after a restart.
    fn keep_next_seq(store: &mut S, n: &NodeState) -> Result<(), PubsubError> {
        if n.items.back().map_or(0, |m| m.seq) != n.last_seq() {
            store.put_node(&n.rec).map_err(storage)?;
        }
        Ok(())
    }

    fn retract(&mut self, ctx: &Ctx, node: NodeId, ids: Vec<String>, notify: bool) -> Result<Outcome, PubsubError> {
        let n = self.node(&node)?;
        self.ask_visible(ctx, Action::Retract, &node)?;
        if ids.is_empty() {
            return Err(PubsubError::ItemRequired);
        }
        let aff = self.affiliation(ctx, n);
        let me = ctx.actor.platform();
        for id in &ids {
            let seq = *n.by_id.get(id).ok_or(PubsubError::ItemNotFound)?;
            let own = n.items.iter().any(|m| m.seq == seq && Some(&m.publisher) == me);
            let ok = matches!(aff, Affiliation::Owner | Affiliation::Publisher) || (aff == Affiliation::PublishOnly && own);
            if !ok {
                return Err(PubsubError::Forbidden);
            }
        }
        let to = self.subscribed(&node);
        let n = self.nodes.get_mut(&node).ok_or(PubsubError::NodeNotFound)?;
        for id in &ids {
            if let Some(seq) = n.by_id.remove(id) {
                n.items.retain(|m| m.seq != seq);
                self.store.delete_item(&node, seq).map_err(storage)?;
            }
        }
        Self::keep_next_seq(&mut self.store, n)?;
        let mut out = Outcome::reply(Reply::Empty);
        if notify || n.rec.config.notify_retract {
            out.deliveries.push(Delivery { event: Event::Retract { node, item_ids: ids }, to });
        }
        Ok(out)
    }

    // ---- subscriber use cases -------------------------------------------

    fn subscribe(&mut self, ctx: &Ctx, node: NodeId, jid: Jid) -> Result<Outcome, PubsubError> {
        let n = self.node(&node)?;
        self.ask_visible(ctx, Action::Subscribe, &node)?;
        let owner = match &ctx.actor {
            Actor::Platform(me) if jid.bare() != me => return Err(PubsubError::InvalidJid),
            Actor::Platform(me) => me.clone(),
            Actor::Controller => jid.bare().clone(),
        };
        let jid_s = jid.to_string();
        // Subscribing again returns the existing subscription (XEP-0060 §6.1.6: one per JID).
        if let Some(existing) = n.subs.iter().filter_map(|id| self.subs.get(id)).find(|s| s.jid == jid_s) {
            return Ok(Outcome::reply(Reply::Subscription(view(existing))));
        }
        let aff = self.affiliation(ctx, n);
        let state = match (aff, n.rec.config.access_model) {
            (Affiliation::Outcast, _) => return Err(PubsubError::Outcast),
            // §4.1: publish-only may not subscribe.
            (Affiliation::PublishOnly, _) => return Err(PubsubError::Forbidden),
            (Affiliation::Owner | Affiliation::Publisher | Affiliation::Member, _) => SubState::Subscribed,
            (_, AccessModel::Open) => SubState::Subscribed,
            (_, AccessModel::Whitelist) => return Err(PubsubError::ClosedNode),
            (_, AccessModel::Authorize) => SubState::Pending,
        };
        let count = self.by_platform.get(&owner).map_or(0, Vec::len);
        if count >= self.limits.max_subscriptions_per_platform {
            return Err(PubsubError::LimitReached(format!(
                "a platform may hold at most {} subscriptions",
                self.limits.max_subscriptions_per_platform
            )));
        }
        let sub = SubRecord {
            node: node.clone(),
            jid: jid_s.clone(),
            subid: random_id(),
            state,
            owner: owner.clone(),
            // Only items published from now on; the last one too when configured.
            delivered: n.last_seq(),
            deliver: true,
        };
        let owners = n.owners();
        let send_last = n.rec.config.send_last_published_item == SendLast::OnSub;
        let last = n.items.back().map(|m| m.seq);
        self.store.put_sub(&sub).map_err(storage)?;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.subs.push(sub.subid.clone());
        }
        self.by_platform.entry(owner.clone()).or_default().push(sub.subid.clone());
        let mut out = Outcome::reply(Reply::Subscription(view(&sub)));
        match state {
            SubState::Pending => out.deliveries.push(Delivery {
                event: Event::ApprovalRequest { node: node.clone(), jid: jid_s, subid: sub.subid.clone() },
                to: owners.into_iter().map(|o| Target { jid: o.to_string(), owner: o, subid: None }).collect(),
            }),
            SubState::Subscribed => {
                if let (true, Some(seq)) = (send_last, last)
                    && let Some(item) = self.store.get_item(&node, seq).map_err(storage)? {
                        out.deliveries.push(Delivery {
                            event: Event::Items { node: node.clone(), items: vec![item] },
                            to: Arc::from([target(&sub)]),
                        });
                    }
            }
        }
        self.subs.insert(sub.subid.clone(), sub);
        Ok(out)
    }

    /// The actor's subscription on `node` for `jid` (and `subid` when several could match).
    fn find_sub(&self, ctx: &Ctx, node: &NodeId, jid: &Jid, subid: Option<&str>) -> Result<&SubRecord, PubsubError> {
        let n = self.node(node)?;
        if let Actor::Platform(me) = &ctx.actor
            && jid.bare() != me && self.affiliation(ctx, n) != Affiliation::Owner {
                return Err(PubsubError::Forbidden);
            }
        let jid_s = jid.to_string();
        let mine: Vec<&SubRecord> = n.subs.iter().filter_map(|id| self.subs.get(id)).filter(|s| s.jid == jid_s).collect();
        match subid {
            Some(id) => mine.into_iter().find(|s| s.subid == id).ok_or(PubsubError::InvalidSubid),
            None => match mine.as_slice() {
                [] => Err(PubsubError::NotSubscribed),
                [one] => Ok(one),
                _ => Err(PubsubError::SubidRequired),
            },
        }
    }

    /// §6.3.5. Turning delivery back on resumes with items published from now
    /// on: notifications that were switched off are not replayed.
    fn set_options(
        &mut self,
        ctx: &Ctx,
        node: NodeId,
        jid: Jid,
        subid: Option<String>,
        deliver: Option<bool>,
    ) -> Result<Outcome, PubsubError> {
        let id = self.find_sub(ctx, &node, &jid, subid.as_deref())?.subid.clone();
        let last = self.node(&node)?.last_seq();
        let Some(sub) = self.subs.get_mut(&id) else { return Err(PubsubError::NotSubscribed) };
        if let Some(d) = deliver
            && d != sub.deliver
        {
            sub.deliver = d;
            if d {
                sub.delivered = sub.delivered.max(last);
            }
            let rec = sub.clone();
            self.store.put_sub(&rec).map_err(storage)?;
        }
        Ok(Outcome::reply(Reply::Empty))
    }

    fn unsubscribe(&mut self, ctx: &Ctx, node: NodeId, jid: Jid, subid: Option<String>) -> Result<Outcome, PubsubError> {
        let id = self.find_sub(ctx, &node, &jid, subid.as_deref())?.subid.clone();
        self.drop_sub(&id)?;
        Ok(Outcome::reply(Reply::Empty))
    }

    fn drop_sub(&mut self, subid: &str) -> Result<(), PubsubError> {
        if let Some(s) = self.subs.remove(subid) {
            self.store.delete_sub(subid).map_err(storage)?;
            if let Some(n) = self.nodes.get_mut(&s.node) {
                n.subs.retain(|x| x != subid);
            }
            if let Some(v) = self.by_platform.get_mut(&s.owner) {
                v.retain(|x| x != subid);
                if v.is_empty() {
                    self.by_platform.remove(&s.owner);
                }
            }
        }
        Ok(())
    }

    fn items(
        &self,
        ctx: &Ctx,
        node: NodeId,
        max_items: Option<u32>,
        ids: Vec<String>,
        page: Option<Page>,
    ) -> Result<Outcome, PubsubError> {
        let n = self.node(&node)?;
        self.ask_visible(ctx, Action::Retrieve, &node)?;
        self.may_read(ctx, n)?;
        let fetch = |m: &ItemMeta| self.store.get_item(&node, m.seq).map_err(storage);
        if !ids.is_empty() {
            let mut items = Vec::new();
            for id in &ids {
                let seq = n.by_id.get(id).ok_or(PubsubError::ItemNotFound)?;
                if let Some(m) = n.items.iter().find(|m| m.seq == *seq) {
                    items.extend(fetch(m)?);
                }
            }
            return Ok(Outcome::reply(Reply::Items { node, items, page: None }));
        }
        let cap = self.limits.max_items_per_page as usize;
        let (metas, info): (Vec<&ItemMeta>, Option<PageInfo>) = match page {
            None => {
                // max_items: the most recent N, in publish order; no more than a page.
                let want = max_items.map_or(cap, |m| (m as usize).min(cap));
                let skip = n.items.len().saturating_sub(want);
                let metas: Vec<&ItemMeta> = n.items.iter().skip(skip).collect();
                let info = (n.items.len() > metas.len()).then(|| page_info(&metas, n.items.len()));
                (metas, info)
            }
            Some(p) => {
                let want = p.max.map_or(cap, |m| (m as usize).min(cap));
                let after = p.after.as_deref().map(parse_cursor).transpose()?;
                let before = p.before.as_deref().filter(|b| !b.is_empty()).map(parse_cursor).transpose()?;
                let metas: Vec<&ItemMeta> = match (after, before, p.before.is_some()) {
                    (Some(a), _, _) => n.items.iter().filter(|m| m.seq > a).take(want).collect(),
                    (None, Some(b), _) => {
                        let older: Vec<&ItemMeta> = n.items.iter().filter(|m| m.seq < b).collect();
                        older[older.len().saturating_sub(want)..].to_vec()
                    }
                    (None, None, true) => n.items.iter().skip(n.items.len().saturating_sub(want)).collect(),
                    (None, None, false) => n.items.iter().take(want).collect(),
                };
                (metas.clone(), Some(page_info(&metas, n.items.len())))
            }
        };
        let mut items = Vec::with_capacity(metas.len());
        for m in metas {
            items.extend(fetch(m)?);
        }
        Ok(Outcome::reply(Reply::Items { node, items, page: info }))
    }

    fn list_nodes(&self, ctx: &Ctx, page: Option<Page>) -> Result<Outcome, PubsubError> {
        let visible: Vec<(NodeId, String)> = self
            .nodes
            .values()
            .filter(|n| self.ask(ctx, Action::Discover, &n.rec.id).is_ok())
            .map(|n| (n.rec.id.clone(), n.rec.config.title.clone()))
            .collect();
        let Some(p) = page else {
            return Ok(Outcome::reply(Reply::NodeList { nodes: visible, page: None }));
        };
        // Cursors are node names: stable as nodes come and go.
        // The same cap as item pages (RFC 8600 §8.3.4 result sizes).
        let cap = self.limits.max_items_per_page as usize;
        let want = p.max.map_or(cap, |m| (m as usize).min(cap));
        let list: Vec<(NodeId, String)> = match (&p.after, &p.before) {
            (Some(a), _) => visible.iter().filter(|(id, _)| id.0.as_str() > a.as_str()).take(want).cloned().collect(),
            (None, Some(b)) if !b.is_empty() => {
                let older: Vec<_> = visible.iter().filter(|(id, _)| id.0.as_str() < b.as_str()).cloned().collect();
                older[older.len().saturating_sub(want)..].to_vec()
            }
            (None, Some(_)) => visible[visible.len().saturating_sub(want)..].to_vec(),
            (None, None) => visible.iter().take(want).cloned().collect(),
        };
        let info = PageInfo {
            first: list.first().map(|(id, _)| id.0.clone()),
            last: list.last().map(|(id, _)| id.0.clone()),
            count: visible.len(),
        };
        Ok(Outcome::reply(Reply::NodeList { nodes: list, page: Some(info) }))
    }

    // ---- owner management -----------------------------------------------

    fn owner_set_subs(&mut self, ctx: &Ctx, node: NodeId, changes: Vec<(Jid, Option<SubState>)>) -> Result<Outcome, PubsubError> {
        self.owned(ctx, &node, Action::ManageSubscriptions)?;
        let mut out = Outcome::reply(Reply::Empty);
        for (jid, state) in changes {
            let jid_s = jid.to_string();
            let n = self.node(&node)?;
            let existing: Option<String> =
                n.subs.iter().filter_map(|id| self.subs.get(id)).find(|s| s.jid == jid_s).map(|s| s.subid.clone());
            match (state, existing) {
                (None, Some(id)) => {
                    let sub = self.subs.get(&id).cloned();
                    self.drop_sub(&id)?;
                    if let Some(s) = sub {
                        out.deliveries.push(Delivery {
                            event: Event::Subscription { node: node.clone(), jid: s.jid.clone(), subid: s.subid.clone(), state: None },
                            to: Arc::from([Target { jid: s.jid, owner: s.owner, subid: None }]),
                        });
                    }
                }
                (None, None) => {}
                (Some(st), Some(id)) => {
                    if let Some(s) = self.subs.get_mut(&id) {
                        s.state = st;
                        self.store.put_sub(s).map_err(storage)?;
                        out.deliveries.push(Delivery {
                            event: Event::Subscription { node: node.clone(), jid: s.jid.clone(), subid: s.subid.clone(), state: Some(st) },
                            to: Arc::from([Target { jid: s.jid.clone(), owner: s.owner.clone(), subid: None }]),
                        });
                    }
                }
                (Some(st), None) => {
                    let last = self.node(&node)?.last_seq();
                    let sub = SubRecord {
                        node: node.clone(),
                        jid: jid_s,
                        subid: random_id(),
                        state: st,
                        owner: jid.bare().clone(),
                        delivered: last,
                        deliver: true,
                    };
                    self.store.put_sub(&sub).map_err(storage)?;
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.subs.push(sub.subid.clone());
                    }
                    self.by_platform.entry(sub.owner.clone()).or_default().push(sub.subid.clone());
                    out.deliveries.push(Delivery {
                        event: Event::Subscription { node: node.clone(), jid: sub.jid.clone(), subid: sub.subid.clone(), state: Some(st) },
                        to: Arc::from([Target { jid: sub.jid.clone(), owner: sub.owner.clone(), subid: None }]),
                    });
                    self.subs.insert(sub.subid.clone(), sub);
                }
            }
        }
        Ok(out)
    }

    fn owner_set_affs(&mut self, ctx: &Ctx, node: NodeId, changes: Vec<(BareJid, Affiliation)>) -> Result<Outcome, PubsubError> {
        self.owned(ctx, &node, Action::ManageSubscriptions)?;
        let n = self.nodes.get_mut(&node).ok_or(PubsubError::NodeNotFound)?;
        let mut affs = n.rec.affiliations.clone();
        for (jid, a) in changes {
            if a == Affiliation::None {
                affs.remove(&jid);
            } else {
                affs.insert(jid, a);
            }
        }
        // XEP-0060 §8.9.2.4: a node never loses its last owner.
        if !affs.values().any(|a| *a == Affiliation::Owner) && matches!(ctx.actor, Actor::Platform(_)) {
            return Err(PubsubError::BadConfig("a topic must keep at least one owner".into()));
        }
        n.rec.affiliations = affs;
        self.store.put_node(&n.rec).map_err(storage)?;
        // Outcasts lose their subscriptions.
        let outcasts: Vec<String> = n
            .subs
            .iter()
            .filter_map(|id| self.subs.get(id))
            .filter(|s| n.rec.affiliations.get(&s.owner) == Some(&Affiliation::Outcast))
            .map(|s| s.subid.clone())
            .collect();
        for id in outcasts {
            self.drop_sub(&id)?;
        }
        Ok(Outcome::reply(Reply::Empty))
    }

    fn approve(&mut self, ctx: &Ctx, node: NodeId, jid: Jid, subid: Option<String>, allow: bool) -> Result<Outcome, PubsubError> {
        self.owned(ctx, &node, Action::ManageSubscriptions)?;
        let jid_s = jid.to_string();
        let n = self.node(&node)?;
        let id = n
            .subs
            .iter()
            .filter_map(|id| self.subs.get(id))
            .find(|s| s.jid == jid_s && s.state == SubState::Pending && subid.as_ref().is_none_or(|x| x == &s.subid))
            .map(|s| s.subid.clone())
            .ok_or(PubsubError::NotSubscribed)?;
        let last = n.last_seq();
        let mut out = Outcome::reply(Reply::Empty);
        let state = if allow {
            if let Some(s) = self.subs.get_mut(&id) {
                s.state = SubState::Subscribed;
                s.delivered = last;
                self.store.put_sub(s).map_err(storage)?;
            }
            Some(SubState::Subscribed)
        } else {
            self.drop_sub(&id)?;
            None
        };
        out.deliveries.push(Delivery {
            event: Event::Subscription { node, jid: jid_s.clone(), subid: id, state },
            to: Arc::from([Target { jid: jid_s, owner: jid.bare().clone(), subid: None }]),
        });
        Ok(out)
    }

    // ---- delivery support for the broker task ---------------------------

    /// Active (subscribed) subscriptions of a node, as delivery targets.
    fn subscribed(&self, node: &NodeId) -> Arc<[Target]> {
        if let Some(t) = self.targets.borrow().get(node) {
            return t.clone();
        }
        let targets: Arc<[Target]> = self
            .nodes
            .get(node)
            .map(|n| {
                n.subs
                    .iter()
                    .filter_map(|id| self.subs.get(id))
                    .filter(|s| s.state == SubState::Subscribed && s.deliver)
                    .map(target)
                    .collect()
            })
            .unwrap_or_default();
        self.targets.borrow_mut().insert(node.clone(), targets.clone());
        targets
    }

    /// The approval requests (§8.6) waiting for `owner`: one per pending
    /// subscription to a node it owns. Sent again when it comes online, so a
    /// request made while every owner was away is not lost.
    pub fn pending_approvals(&self, owner: &BareJid) -> Vec<Event> {
        let mut out = Vec::new();
        for n in self.nodes.values() {
            // Pending subscriptions exist only on authorize nodes.
            if n.rec.config.access_model != AccessModel::Authorize || n.rec.affiliations.get(owner) != Some(&Affiliation::Owner) {
                continue;
            }
            for s in n.subs.iter().filter_map(|id| self.subs.get(id)).filter(|s| s.state == SubState::Pending) {
                out.push(Event::ApprovalRequest { node: n.rec.id.clone(), jid: s.jid.clone(), subid: s.subid.clone() });
            }
        }
        out
    }

    /// A platform's active subscriptions (offline delivery starts from these).
    pub fn subscriptions_of(&self, platform: &BareJid) -> Vec<SubRecord> {
        self.by_platform
            .get(platform)
            .map(|ids| {
                ids.iter().filter_map(|id| self.subs.get(id)).filter(|s| s.state == SubState::Subscribed && s.deliver).cloned().collect()
            })
            .unwrap_or_default()
    }

    pub fn subscription(&self, subid: &str) -> Option<&SubRecord> {
        self.subs.get(subid)
    }

    /// Up to `limit` retained items of `node` with `after < seq <= upto`, in publish order.
    pub fn items_between(&self, node: &NodeId, after: u64, upto: u64, limit: usize) -> Result<Vec<Item>, PubsubError> {
        let Some(n) = self.nodes.get(node) else { return Ok(Vec::new()) };
        let start = n.items.partition_point(|m| m.seq <= after);
        let mut out = Vec::new();
        for m in n.items.range(start..).take_while(|m| m.seq <= upto).take(limit) {
            out.extend(self.store.get_item(node, m.seq).map_err(storage)?);
        }
        Ok(out)
    }

    /// The last seq given out on a node (0 if none).
    pub fn head(&self, node: &NodeId) -> u64 {
        self.nodes.get(node).map_or(0, NodeState::last_seq)
    }

    /// Every subscription's id (the broker re-checks them a few at a time).
    pub fn subscription_ids(&self) -> Vec<String> {
        self.subs.keys().cloned().collect()
    }

    /// Asks again whether subscription `subid` is still allowed (after policies
    /// or platforms changed) and ends it if not, returning the notice for its
    /// subscriber. `login` stands in for the session facts the policies may consult.
    pub fn recheck_subscription(&mut self, login: &authz::Context, subid: &str) -> Result<Option<Delivery>, PubsubError> {
        let Some(s) = self.subs.get(subid).cloned() else { return Ok(None) };
        let ctx = Ctx { actor: Actor::Platform(s.owner.clone()), login: Some(login), now_ms: 0 };
        if self.ask(&ctx, Action::Subscribe, &s.node).is_ok() {
            return Ok(None);
        }
        self.drop_sub(&s.subid)?;
        self.targets.get_mut().clear();
        Ok(Some(Delivery {
            event: Event::Subscription { node: s.node.clone(), jid: s.jid.clone(), subid: s.subid.clone(), state: None },
            to: Arc::from([Target { jid: s.jid, owner: s.owner, subid: None }]),
        }))
    }

    /// Records delivery progress of a subscription (persisted with the next flush).
    pub fn set_delivered(&mut self, subid: &str, seq: u64) -> Result<(), PubsubError> {
        if let Some(s) = self.subs.get_mut(subid)
            && seq > s.delivered {
                s.delivered = seq;
                self.store.put_sub(s).map_err(storage)?;
            }
        Ok(())
    }
}

fn target(s: &SubRecord) -> Target {
    Target { jid: s.jid.clone(), owner: s.owner.clone(), subid: Some(s.subid.clone()) }
}

fn view(s: &SubRecord) -> SubView {
    SubView { node: s.node.clone(), jid: s.jid.clone(), subid: s.subid.clone(), state: s.state, deliver: s.deliver }
}

fn page_info(metas: &[&ItemMeta], count: usize) -> PageInfo {
    PageInfo {
        first: metas.first().map(|m| m.seq.to_string()),
        last: metas.last().map(|m| m.seq.to_string()),
        count,
    }
}

fn parse_cursor(s: &str) -> Result<u64, PubsubError> {
    s.parse().map_err(|_| PubsubError::BadConfig(format!("unknown result set cursor {s:?}")))
}

/// XEP-0060 §7.1.5: every publish-option given must equal the node's configuration.
fn check_preconditions(c: &NodeConfig, p: &ConfigPatch, max_items_cap: u32) -> Result<(), PubsubError> {
    let mismatch = |field: &str| Err(PubsubError::PreconditionNotMet(field.to_string()));
    if p.access_model.is_some_and(|v| v != c.access_model) {
        return mismatch("pubsub#access_model");
    }
    if p.publish_model.is_some_and(|v| v != c.publish_model) {
        return mismatch("pubsub#publish_model");
    }
    if p.payload_type.as_ref().is_some_and(|v| v != &c.payload_type) {
        return mismatch("pubsub#type");
    }
    // "max" arrives as u32::MAX and means the service's cap, as when configuring.
    if p.max_items.is_some_and(|v| v.min(max_items_cap) != c.max_items) {
        return mismatch("pubsub#max_items");
    }
    if p.title.as_ref().is_some_and(|v| v != &c.title) {
        return mismatch("pubsub#title");
    }
    if p.send_last_published_item.is_some_and(|v| v != c.send_last_published_item) {
        return mismatch("pubsub#send_last_published_item");
    }
    if p.persist_items == Some(false) {
        return mismatch("pubsub#persist_items");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The broker's rules, one concern per group (STYLE §10): a MemStore (a sled
    //! store in a temporary directory for restarts), a table authorizer, and time
    //! passed in explicitly. No Tokio, no sockets.

    use super::*;
    use crate::pubsub::store::{MemStore, SledStore};
    use bytes::Bytes;

    // ---- harness ----------------------------------------------------------

    /// Denies the listed (principal, action, topic) triples, allows the rest.
    #[derive(Default)]
    struct Table(Vec<(String, Action, String)>);

    impl Authorize for Table {
        fn authorize(&self, r: &authz::Request<'_>) -> authz::Decision {
            let denied = self
                .0
                .iter()
                .any(|(p, a, t)| *p == r.principal.to_string() && *a == r.action && Some(t.as_str()) == r.topic.map(|t| t.name));
            authz::Decision {
                allowed: !denied,
                reasons: vec![if denied { "table-deny" } else { "table-allow" }.into()],
                honeytoken: false,
            }
        }
    }

    const T0: u64 = 1_700_000_000_000;

    struct Fx<S: BrokerStore> {
        svc: Service<S>,
        login: authz::Context,
        now: u64,
    }

    fn login() -> authz::Context {
        authz::Context { authn: "PLAIN".into(), tls_version: "TLSv1.3", source: "127.0.0.1".parse().unwrap() }
    }

    fn fx() -> Fx<MemStore> {
        fx_with(Limits::default(), Table::default(), AccessModel::Open)
    }

    fn fx_with(limits: Limits, table: Table, access: AccessModel) -> Fx<MemStore> {
        Fx { svc: Service::open(MemStore::default(), Arc::new(table), limits, access).unwrap(), login: login(), now: T0 }
    }

    fn p(name: &str) -> BareJid {
        BareJid::new(name, "grid.test").unwrap()
    }

    fn jid(s: &str) -> Jid {
        Jid::parse(s).unwrap()
    }

    fn n(s: &str) -> NodeId {
        NodeId(s.into())
    }

    fn payload(s: &str) -> Bytes {
        Bytes::from(format!("<x xmlns='urn:test'>{s}</x>"))
    }

    fn publish(node: &str, id: Option<&str>, body: &str) -> Request {
        Request::Publish { node: n(node), item_id: id.map(str::to_owned), payload: payload(body), preconditions: ConfigPatch::default() }
    }

    fn subscribe(node: &str, who: &str) -> Request {
        Request::Subscribe { node: n(node), jid: jid(who), deliver: None }
    }

    fn items(node: &str) -> Request {
        Request::Items { node: n(node), max_items: None, item_ids: Vec::new(), page: None }
    }

    fn page(node: &str, max: Option<u32>, after: Option<&str>, before: Option<&str>) -> Request {
        Request::Items {
            node: n(node),
            max_items: None,
            item_ids: Vec::new(),
            page: Some(Page { max, after: after.map(str::to_owned), before: before.map(str::to_owned) }),
        }
    }

    impl<S: BrokerStore> Fx<S> {
        /// Runs `req` as platform `who` ("" for the controller itself); the clock ticks 1 ms.
        fn run(&mut self, who: &str, req: Request) -> Result<Outcome, PubsubError> {
            self.now += 1;
            let ctx = if who.is_empty() {
                Ctx { actor: Actor::Controller, login: None, now_ms: self.now }
            } else {
                Ctx { actor: Actor::Platform(p(who)), login: Some(&self.login), now_ms: self.now }
            };
            self.svc.handle(&ctx, req)
        }
        fn ok(&mut self, who: &str, req: Request) -> Outcome {
            let what = format!("{req:?}");
            self.run(who, req).unwrap_or_else(|e| panic!("{who}: {what} failed: {e:?}"))
        }
        fn err(&mut self, who: &str, req: Request) -> PubsubError {
            let what = format!("{req:?}");
            match self.run(who, req) {
                Err(e) => e,
                Ok(o) => panic!("{who}: {what} succeeded: {o:?}"),
            }
        }
        fn create(&mut self, who: &str, node: &str, patch: ConfigPatch) {
            self.ok(who, Request::Create { node: Some(n(node)), config: patch });
        }
        /// Publishes; returns the item id.
        fn publish(&mut self, who: &str, node: &str, id: Option<&str>) -> String {
            match self.ok(who, publish(node, id, id.unwrap_or("x"))).reply {
                Reply::Published { item_id, .. } => item_id,
                r => panic!("{r:?}"),
            }
        }
        fn subscribe(&mut self, who: &str, node: &str) -> SubView {
            match self.ok(who, subscribe(node, &format!("{who}@grid.test"))).reply {
                Reply::Subscription(s) => s,
                r => panic!("{r:?}"),
            }
        }
        fn items(&mut self, who: &str, req: Request) -> (Vec<String>, Option<PageInfo>) {
            match self.ok(who, req).reply {
                Reply::Items { items, page, .. } => (items.into_iter().map(|i| i.id).collect(), page),
                r => panic!("{r:?}"),
            }
        }
        fn config(&mut self, node: &str) -> NodeConfig {
            match self.ok("", Request::ConfigureGet { node: n(node) }).reply {
                Reply::Config { config, .. } => config,
                r => panic!("{r:?}"),
            }
        }
        fn affiliate(&mut self, owner: &str, node: &str, who: &str, a: Affiliation) {
            self.ok(owner, Request::OwnerAffiliationsSet { node: n(node), changes: vec![(p(who), a)] });
        }
        fn my_subs(&mut self, who: &str) -> Vec<SubView> {
            match self.ok(who, Request::Subscriptions { node: None }).reply {
                Reply::Subscriptions { subs, .. } => subs,
                r => panic!("{r:?}"),
            }
        }
    }

    fn patch() -> ConfigPatch {
        ConfigPatch::default()
    }

    fn access(m: AccessModel) -> ConfigPatch {
        ConfigPatch { access_model: Some(m), ..ConfigPatch::default() }
    }

    /// Every recipient JID of every delivery of `event_kind` ("items", "retract", …).
    fn recipients(o: &Outcome, kind: &str) -> Vec<String> {
        o.deliveries
            .iter()
            .filter(|d| {
                let k = match &d.event {
                    Event::Items { .. } => "items",
                    Event::Retract { .. } => "retract",
                    Event::Purge { .. } => "purge",
                    Event::Delete { .. } => "delete",
                    Event::Configuration { .. } => "configuration",
                    Event::Subscription { .. } => "subscription",
                    Event::ApprovalRequest { .. } => "approval",
                };
                k == kind
            })
            .flat_map(|d| d.to.iter().map(|t| t.jid.clone()))
            .collect()
    }

    #[test]
    fn each_publish_reaches_the_subscribers_of_that_moment() {
        // Targets are reused from one publish to the next: every change in between must show.
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let send = |f: &mut Fx<MemStore>| {
            let mut to = recipients(&f.ok("alice", publish("incidents", None, "x")), "items");
            to.sort();
            to
        };
        assert!(send(&mut f).is_empty());
        f.subscribe("bob", "incidents");
        assert_eq!(send(&mut f), ["bob@grid.test"]);
        assert_eq!(send(&mut f), ["bob@grid.test"]);
        f.subscribe("carol", "incidents");
        assert_eq!(send(&mut f), ["bob@grid.test", "carol@grid.test"]);
        let quiet = Request::OptionsSet { node: n("incidents"), jid: jid("bob@grid.test"), subid: None, deliver: Some(false) };
        f.ok("bob", quiet);
        assert_eq!(send(&mut f), ["carol@grid.test"]);
        f.ok("carol", Request::Unsubscribe { node: n("incidents"), jid: jid("carol@grid.test"), subid: None });
        assert!(send(&mut f).is_empty());
        let loud = Request::OptionsSet { node: n("incidents"), jid: jid("bob@grid.test"), subid: None, deliver: Some(true) };
        f.ok("bob", loud);
        assert_eq!(send(&mut f), ["bob@grid.test"]);
        f.affiliate("alice", "incidents", "bob", Affiliation::Outcast);
        assert!(send(&mut f).is_empty());
    }

    // ---- create -----------------------------------------------------------

    #[test]
    fn create_named_node_makes_the_creator_its_only_owner() {
        let mut f = fx();
        let o = f.ok("alice", Request::Create { node: Some(n("incidents")), config: patch() });
        assert_eq!(o.reply, Reply::Created { node: n("incidents") });
        match f.ok("alice", Request::OwnerAffiliations { node: n("incidents") }).reply {
            Reply::Affiliations { affs, .. } => assert_eq!(affs, vec![(n("incidents"), p("alice"), Affiliation::Owner)]),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn create_without_a_name_makes_an_instant_node_with_a_fresh_name() {
        let mut f = fx();
        let a = match f.ok("alice", Request::Create { node: None, config: patch() }).reply {
            Reply::Created { node } => node,
            r => panic!("{r:?}"),
        };
        let b = match f.ok("alice", Request::Create { node: None, config: patch() }).reply {
            Reply::Created { node } => node,
            r => panic!("{r:?}"),
        };
        assert!(!a.0.is_empty() && a != b, "{a} {b}");
        f.publish("alice", &a.0, None);
    }

    #[test]
    fn create_of_an_existing_node_is_a_conflict() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        assert_eq!(f.err("bob", Request::Create { node: Some(n("incidents")), config: patch() }), PubsubError::Conflict);
        assert_eq!(f.err("alice", Request::Create { node: Some(n("incidents")), config: patch() }), PubsubError::Conflict);
    }

    #[test]
    fn create_applies_the_configuration_form() {
        let mut f = fx();
        let form = ConfigPatch {
            title: Some("Incidents".into()),
            description: Some("IODEF reports".into()),
            payload_type: Some("urn:ietf:params:xml:ns:iodef-2.0".into()),
            access_model: Some(AccessModel::Whitelist),
            publish_model: Some(PublishModel::Open),
            max_items: Some(7),
            item_expire_secs: Some(60),
            notify_retract: Some(false),
            notify_delete: Some(false),
            notify_config: Some(true),
            send_last_published_item: Some(SendLast::OnSub),
            persist_items: Some(true),
        };
        f.create("alice", "incidents", form);
        let c = f.config("incidents");
        assert_eq!(
            c,
            NodeConfig {
                title: "Incidents".into(),
                description: "IODEF reports".into(),
                payload_type: "urn:ietf:params:xml:ns:iodef-2.0".into(),
                access_model: AccessModel::Whitelist,
                publish_model: PublishModel::Open,
                max_items: 7,
                item_expire_secs: 60,
                notify_retract: false,
                notify_delete: false,
                notify_config: true,
                send_last_published_item: SendLast::OnSub,
            }
        );
    }

    #[test]
    fn create_clamps_max_items_to_the_service_limit_and_refuses_zero() {
        let limits = Limits { max_items_per_node: 50, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        // "max" arrives as u32::MAX.
        f.create("alice", "a", ConfigPatch { max_items: Some(u32::MAX), ..patch() });
        assert_eq!(f.config("a").max_items, 50);
        f.create("alice", "b", ConfigPatch { max_items: Some(51), ..patch() });
        assert_eq!(f.config("b").max_items, 50);
        let e = f.err("alice", Request::Create { node: Some(n("c")), config: ConfigPatch { max_items: Some(0), ..patch() } });
        assert!(matches!(e, PubsubError::BadConfig(_)), "{e:?}");
        let e = f.err("alice", Request::Create { node: Some(n("d")), config: ConfigPatch { persist_items: Some(false), ..patch() } });
        assert!(matches!(e, PubsubError::BadConfig(_)), "{e:?}");
        // Nothing was created by the refused requests.
        assert_eq!(f.err("alice", items("c")), PubsubError::NodeNotFound);
        assert_eq!(f.err("alice", items("d")), PubsubError::NodeNotFound);
    }

    #[test]
    fn create_stops_at_the_topics_per_platform_limit() {
        let limits = Limits { max_topics_per_platform: 2, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        f.create("alice", "a1", patch());
        f.create("alice", "a2", patch());
        let e = f.err("alice", Request::Create { node: Some(n("a3")), config: patch() });
        assert!(matches!(e, PubsubError::LimitReached(_)), "{e:?}");
        // Another platform has its own quota; the controller has none.
        f.create("bob", "b1", patch());
        f.create("", "c1", patch());
        f.create("", "c2", patch());
        f.create("", "c3", patch());
        // Deleting frees a place.
        f.ok("alice", Request::Delete { node: n("a1") });
        f.create("alice", "a3", patch());
    }

    // ---- configure and default --------------------------------------------

    #[test]
    fn configure_get_and_set_are_for_owners_only() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        match f.ok("alice", Request::ConfigureGet { node: n("incidents") }).reply {
            Reply::Config { node, config } => {
                assert_eq!(node, Some(n("incidents")));
                assert_eq!(config, default_config(AccessModel::Open));
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(f.err("bob", Request::ConfigureGet { node: n("incidents") }), PubsubError::Forbidden);
        let set = ConfigPatch { title: Some("T".into()), access_model: Some(AccessModel::Authorize), ..patch() };
        assert_eq!(f.err("bob", Request::ConfigureSet { node: n("incidents"), config: set.clone() }), PubsubError::Forbidden);
        assert_eq!(f.config("incidents").title, "");
        let o = f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: set });
        assert_eq!(o.reply, Reply::Empty);
        let c = f.config("incidents");
        assert_eq!((c.title.as_str(), c.access_model), ("T", AccessModel::Authorize));
        // Unset fields kept their values.
        assert_eq!(c.max_items, default_config(AccessModel::Open).max_items);
        assert_eq!(f.err("alice", Request::ConfigureGet { node: n("nope") }), PubsubError::NodeNotFound);
        // A publisher is not an owner.
        f.affiliate("alice", "incidents", "bob", Affiliation::Publisher);
        assert_eq!(f.err("bob", Request::ConfigureGet { node: n("incidents") }), PubsubError::Forbidden);
    }

    #[test]
    fn configure_notifies_subscribers_only_when_notify_config_is_set() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        let o = f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: ConfigPatch { title: Some("a".into()), ..patch() } });
        assert!(o.deliveries.is_empty(), "{o:?}");
        let o = f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: ConfigPatch { notify_config: Some(true), ..patch() } });
        assert_eq!(recipients(&o, "configuration"), vec!["bob@grid.test"]);
    }

    #[test]
    fn lowering_max_items_drops_the_oldest_items() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        for id in ["a", "b", "c", "d"] {
            f.publish("alice", "incidents", Some(id));
        }
        f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: ConfigPatch { max_items: Some(2), ..patch() } });
        assert_eq!(f.items("alice", items("incidents")).0, vec!["c", "d"]);
    }

    #[test]
    fn default_config_uses_the_service_access_model() {
        let mut f = fx_with(Limits::default(), Table::default(), AccessModel::Authorize);
        match f.ok("bob", Request::DefaultConfig).reply {
            Reply::Config { node: None, config } => assert_eq!(config, default_config(AccessModel::Authorize)),
            r => panic!("{r:?}"),
        }
        f.create("alice", "incidents", patch());
        assert_eq!(f.config("incidents").access_model, AccessModel::Authorize);
    }

    // ---- delete -----------------------------------------------------------

    #[test]
    fn delete_tells_subscribers_and_removes_their_subscriptions() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.publish("alice", "incidents", Some("a"));
        f.subscribe("bob", "incidents");
        f.subscribe("carol", "incidents");
        assert_eq!(f.err("bob", Request::Delete { node: n("incidents") }), PubsubError::Forbidden);
        let o = f.ok("alice", Request::Delete { node: n("incidents") });
        let mut to = recipients(&o, "delete");
        to.sort();
        assert_eq!(to, vec!["bob@grid.test", "carol@grid.test"]);
        assert!(f.my_subs("bob").is_empty());
        assert!(f.svc.subscriptions_of(&p("bob")).is_empty());
        assert_eq!(f.err("bob", items("incidents")), PubsubError::NodeNotFound);
        assert_eq!(f.err("alice", Request::Delete { node: n("incidents") }), PubsubError::NodeNotFound);
        // The name is free again, with nothing of the old node in it.
        f.create("carol", "incidents", patch());
        assert!(f.items("carol", items("incidents")).0.is_empty());
    }

    #[test]
    fn delete_without_notify_delete_tells_nobody() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { notify_delete: Some(false), ..patch() });
        f.subscribe("bob", "incidents");
        assert!(f.ok("alice", Request::Delete { node: n("incidents") }).deliveries.is_empty());
    }

    // ---- purge ------------------------------------------------------------

    #[test]
    fn purge_removes_every_item_and_seqs_keep_growing() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        for id in ["a", "b", "c"] {
            f.publish("alice", "incidents", Some(id));
        }
        assert_eq!(f.err("bob", Request::Purge { node: n("incidents") }), PubsubError::Forbidden);
        let o = f.ok("alice", Request::Purge { node: n("incidents") });
        assert_eq!(recipients(&o, "purge"), vec!["bob@grid.test"]);
        assert!(f.items("bob", items("incidents")).0.is_empty());
        assert_eq!(f.svc.head(&n("incidents")), 3);
        f.publish("alice", "incidents", Some("a"));
        assert_eq!(f.svc.head(&n("incidents")), 4);
        let it = f.svc.items_between(&n("incidents"), 0, u64::MAX, 10).unwrap();
        assert_eq!(it.iter().map(|i| (i.id.as_str(), i.seq)).collect::<Vec<_>>(), vec![("a", 4)]);
    }

    // ---- publish ----------------------------------------------------------

    #[test]
    fn publish_keeps_the_client_item_id_or_makes_one() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        assert_eq!(f.publish("alice", "incidents", Some("report-1")), "report-1");
        let made = f.publish("alice", "incidents", None);
        assert!(!made.is_empty() && made != "report-1");
        let made2 = f.publish("alice", "incidents", None);
        assert_ne!(made, made2);
        // An empty id is no id.
        let o = f.ok("alice", Request::Publish { node: n("incidents"), item_id: Some(String::new()), payload: payload("e"), preconditions: patch() });
        assert!(matches!(o.reply, Reply::Published { ref item_id, .. } if !item_id.is_empty()), "{o:?}");
        assert_eq!(f.items("alice", items("incidents")).0.len(), 4);
    }

    #[test]
    fn published_items_carry_publisher_time_payload_and_rising_seqs() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        let o = f.ok("alice", publish("incidents", Some("a"), "one"));
        let now = f.now;
        match &o.deliveries[..] {
            [Delivery { event: Event::Items { node, items }, to }] => {
                assert_eq!(node, &n("incidents"));
                assert_eq!(items.len(), 1);
                let it = &items[0];
                assert_eq!((it.id.as_str(), it.seq, &it.publisher, it.published_ms), ("a", 1, &p("alice"), now));
                assert_eq!(it.payload, payload("one"));
                assert_eq!(&to[..], &[Target { jid: "bob@grid.test".into(), owner: p("bob"), subid: Some(f.my_subs("bob")[0].subid.clone()) }]);
            }
            d => panic!("{d:?}"),
        }
        f.publish("alice", "incidents", Some("b"));
        assert_eq!(f.svc.head(&n("incidents")), 2);
    }

    #[test]
    fn republishing_an_id_replaces_the_item_and_moves_it_to_the_end() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        for id in ["a", "b", "c"] {
            f.publish("alice", "incidents", Some(id));
        }
        f.ok("alice", publish("incidents", Some("a"), "second version"));
        assert_eq!(f.items("alice", items("incidents")).0, vec!["b", "c", "a"]);
        match f.ok("alice", Request::Items { node: n("incidents"), max_items: None, item_ids: vec!["a".into()], page: None }).reply {
            Reply::Items { items, .. } => {
                assert_eq!(items.len(), 1);
                assert_eq!(items[0].payload, payload("second version"));
                assert_eq!(items[0].seq, 4);
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(f.svc.items_between(&n("incidents"), 0, u64::MAX, 10).unwrap().len(), 3);
    }

    #[test]
    fn publish_without_payload_is_payload_required() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let req = Request::Publish { node: n("incidents"), item_id: Some("a".into()), payload: Bytes::new(), preconditions: patch() };
        assert_eq!(f.err("alice", req), PubsubError::PayloadRequired);
        assert!(f.items("alice", items("incidents")).0.is_empty());
    }

    #[test]
    fn publish_over_the_payload_limit_is_payload_too_big() {
        let limits = Limits { max_payload_bytes: 64, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        f.create("alice", "incidents", patch());
        let fits = Bytes::from(format!("<x xmlns='urn:test'>{}</x>", "a".repeat(64 - 24)));
        assert_eq!(fits.len(), 64);
        f.ok("alice", Request::Publish { node: n("incidents"), item_id: None, payload: fits, preconditions: patch() });
        let big = Bytes::from(format!("<x xmlns='urn:test'>{}</x>", "a".repeat(64 - 23)));
        let e = f.err("alice", Request::Publish { node: n("incidents"), item_id: None, payload: big, preconditions: patch() });
        assert_eq!(e, PubsubError::PayloadTooBig { size: 65, limit: 64 });
        assert_eq!(f.items("alice", items("incidents")).0.len(), 1);
    }

    #[test]
    fn publish_model_publishers_admits_owners_publishers_and_publish_only() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("mallory", "incidents");
        assert_eq!(f.err("mallory", publish("incidents", None, "x")), PubsubError::Forbidden);
        f.affiliate("alice", "incidents", "bob", Affiliation::Member);
        assert_eq!(f.err("bob", publish("incidents", None, "x")), PubsubError::Forbidden);
        f.affiliate("alice", "incidents", "bob", Affiliation::Publisher);
        f.publish("bob", "incidents", None);
        f.affiliate("alice", "incidents", "carol", Affiliation::PublishOnly);
        f.publish("carol", "incidents", None);
        f.publish("", "incidents", None);
    }

    #[test]
    fn publish_model_subscribers_admits_subscribed_platforms_only() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { publish_model: Some(PublishModel::Subscribers), ..patch() });
        assert_eq!(f.err("bob", publish("incidents", None, "x")), PubsubError::Forbidden);
        f.subscribe("bob", "incidents");
        f.publish("bob", "incidents", None);
    }

    #[test]
    fn publish_model_subscribers_does_not_admit_a_pending_subscription() {
        let mut f = fx();
        f.create(
            "alice",
            "incidents",
            ConfigPatch { publish_model: Some(PublishModel::Subscribers), access_model: Some(AccessModel::Authorize), ..patch() },
        );
        assert_eq!(f.subscribe("bob", "incidents").state, SubState::Pending);
        assert_eq!(f.err("bob", publish("incidents", None, "x")), PubsubError::Forbidden);
    }

    #[test]
    fn publish_model_open_admits_anyone_but_outcasts() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { publish_model: Some(PublishModel::Open), ..patch() });
        f.publish("bob", "incidents", None);
        f.affiliate("alice", "incidents", "mallory", Affiliation::Outcast);
        assert_eq!(f.err("mallory", publish("incidents", None, "x")), PubsubError::Forbidden);
    }

    #[test]
    fn publish_to_a_missing_node_is_node_not_found() {
        let mut f = fx();
        assert_eq!(f.err("alice", publish("nope", None, "x")), PubsubError::NodeNotFound);
    }

    #[test]
    fn publish_options_that_match_the_node_are_accepted() {
        let limits = Limits { max_items_per_node: 500, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        f.create(
            "alice",
            "incidents",
            ConfigPatch { access_model: Some(AccessModel::Whitelist), payload_type: Some("urn:t".into()), max_items: Some(u32::MAX), ..patch() },
        );
        let pre = ConfigPatch {
            access_model: Some(AccessModel::Whitelist),
            publish_model: Some(PublishModel::Publishers),
            payload_type: Some("urn:t".into()),
            // "max" means the service maximum, which the node has.
            max_items: Some(u32::MAX),
            persist_items: Some(true),
            ..patch()
        };
        f.ok("alice", Request::Publish { node: n("incidents"), item_id: None, payload: payload("x"), preconditions: pre });
        let pre = ConfigPatch { max_items: Some(500), ..patch() };
        f.ok("alice", Request::Publish { node: n("incidents"), item_id: None, payload: payload("x"), preconditions: pre });
    }

    #[test]
    fn publish_options_that_differ_fail_the_precondition_and_store_nothing() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { max_items: Some(10), ..patch() });
        let cases = [
            (ConfigPatch { access_model: Some(AccessModel::Whitelist), ..patch() }, "pubsub#access_model"),
            (ConfigPatch { publish_model: Some(PublishModel::Open), ..patch() }, "pubsub#publish_model"),
            (ConfigPatch { payload_type: Some("urn:other".into()), ..patch() }, "pubsub#type"),
            (ConfigPatch { max_items: Some(u32::MAX), ..patch() }, "pubsub#max_items"),
            (ConfigPatch { max_items: Some(9), ..patch() }, "pubsub#max_items"),
            (ConfigPatch { title: Some("other".into()), ..patch() }, "pubsub#title"),
            (ConfigPatch { send_last_published_item: Some(SendLast::OnSub), ..patch() }, "pubsub#send_last_published_item"),
            (ConfigPatch { persist_items: Some(false), ..patch() }, "pubsub#persist_items"),
        ];
        for (pre, field) in cases {
            let e = f.err("alice", Request::Publish { node: n("incidents"), item_id: None, payload: payload("x"), preconditions: pre });
            assert_eq!(e, PubsubError::PreconditionNotMet(field.into()));
        }
        assert!(f.items("alice", items("incidents")).0.is_empty());
    }

    #[test]
    fn publish_notifies_subscribed_but_not_pending_subscriptions() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: access(AccessModel::Authorize) });
        assert_eq!(f.subscribe("carol", "incidents").state, SubState::Pending);
        let o = f.ok("alice", publish("incidents", None, "x"));
        assert_eq!(recipients(&o, "items"), vec!["bob@grid.test"]);
    }

    // ---- retract ----------------------------------------------------------

    #[test]
    fn owners_and_publishers_retract_any_item() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.affiliate("alice", "incidents", "bob", Affiliation::Publisher);
        f.publish("alice", "incidents", Some("a"));
        f.publish("bob", "incidents", Some("b"));
        f.publish("alice", "incidents", Some("c"));
        f.ok("bob", Request::Retract { node: n("incidents"), item_ids: vec!["a".into()], notify: false });
        f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["b".into()], notify: false });
        assert_eq!(f.items("alice", items("incidents")).0, vec!["c"]);
        assert_eq!(
            f.err("alice", Request::Retract { node: n("incidents"), item_ids: vec!["a".into()], notify: false }),
            PubsubError::ItemNotFound
        );
        assert_eq!(f.err("alice", Request::Retract { node: n("incidents"), item_ids: vec![], notify: false }), PubsubError::ItemRequired);
    }

    #[test]
    fn publish_only_retracts_only_its_own_items_and_others_none() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.affiliate("alice", "incidents", "carol", Affiliation::PublishOnly);
        f.publish("alice", "incidents", Some("a"));
        f.publish("carol", "incidents", Some("c"));
        let retract = |id: &str| Request::Retract { node: n("incidents"), item_ids: vec![id.into()], notify: false };
        assert_eq!(f.err("carol", retract("a")), PubsubError::Forbidden);
        // All or nothing: one foreign id refuses the whole request.
        assert_eq!(
            f.err("carol", Request::Retract { node: n("incidents"), item_ids: vec!["c".into(), "a".into()], notify: false }),
            PubsubError::Forbidden
        );
        assert_eq!(f.items("alice", items("incidents")).0, vec!["a", "c"]);
        f.ok("carol", retract("c"));
        f.subscribe("bob", "incidents");
        assert_eq!(f.err("bob", retract("a")), PubsubError::Forbidden);
        f.affiliate("alice", "incidents", "bob", Affiliation::Member);
        assert_eq!(f.err("bob", retract("a")), PubsubError::Forbidden);
        assert_eq!(f.items("alice", items("incidents")).0, vec!["a"]);
    }

    #[test]
    fn retract_notifies_when_asked_or_configured() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { notify_retract: Some(false), ..patch() });
        f.subscribe("bob", "incidents");
        for id in ["a", "b", "c"] {
            f.publish("alice", "incidents", Some(id));
        }
        let o = f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["a".into()], notify: false });
        assert!(o.deliveries.is_empty(), "{o:?}");
        let o = f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["b".into()], notify: true });
        assert_eq!(o.deliveries[0].event, Event::Retract { node: n("incidents"), item_ids: vec!["b".into()] });
        assert_eq!(recipients(&o, "retract"), vec!["bob@grid.test"]);
        f.ok("alice", Request::ConfigureSet { node: n("incidents"), config: ConfigPatch { notify_retract: Some(true), ..patch() } });
        let o = f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["c".into()], notify: false });
        assert_eq!(recipients(&o, "retract"), vec!["bob@grid.test"]);
    }

    // ---- subscribe and unsubscribe -----------------------------------------

    #[test]
    fn subscribe_with_a_bare_or_a_full_jid() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let bare = f.subscribe("bob", "incidents");
        assert_eq!((bare.jid.as_str(), bare.state), ("bob@grid.test", SubState::Subscribed));
        let full = match f.ok("bob", subscribe("incidents", "bob@grid.test/desk")).reply {
            Reply::Subscription(s) => s,
            r => panic!("{r:?}"),
        };
        assert_eq!(full.jid, "bob@grid.test/desk");
        assert_ne!(full.subid, bare.subid);
        // Each address gets its own notification target.
        let o = f.ok("alice", publish("incidents", None, "x"));
        let mut to = recipients(&o, "items");
        to.sort();
        assert_eq!(to, vec!["bob@grid.test", "bob@grid.test/desk"]);
        f.ok("bob", Request::Unsubscribe { node: n("incidents"), jid: jid("bob@grid.test/desk"), subid: None });
        assert_eq!(f.my_subs("bob"), vec![bare]);
    }

    #[test]
    fn subscribing_someone_elses_jid_is_invalid_jid() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        assert_eq!(f.err("bob", subscribe("incidents", "carol@grid.test")), PubsubError::InvalidJid);
        assert_eq!(f.err("bob", subscribe("incidents", "carol@grid.test/r")), PubsubError::InvalidJid);
        assert!(f.my_subs("carol").is_empty());
        // The controller may subscribe a platform.
        f.ok("", subscribe("incidents", "carol@grid.test"));
        assert_eq!(f.my_subs("carol").len(), 1);
    }

    #[test]
    fn subscribing_twice_returns_the_existing_subscription() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let first = f.subscribe("bob", "incidents");
        let again = f.subscribe("bob", "incidents");
        assert_eq!(first, again);
        assert_eq!(f.my_subs("bob").len(), 1);
    }

    #[test]
    fn unsubscribe_names_the_subscription_by_subid_when_needed() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let s = f.subscribe("bob", "incidents");
        let unsub = |subid: Option<&str>| Request::Unsubscribe { node: n("incidents"), jid: jid("bob@grid.test"), subid: subid.map(str::to_owned) };
        assert_eq!(f.err("bob", unsub(Some("wrong"))), PubsubError::InvalidSubid);
        f.ok("bob", unsub(Some(&s.subid)));
        assert!(f.my_subs("bob").is_empty());
        assert_eq!(f.err("bob", unsub(None)), PubsubError::NotSubscribed);
        assert_eq!(f.err("bob", Request::Unsubscribe { node: n("nope"), jid: jid("bob@grid.test"), subid: None }), PubsubError::NodeNotFound);
    }

    #[test]
    fn unsubscribe_with_several_subscriptions_and_no_subid_is_subid_required() {
        // The service keeps one subscription per address; two can only come from the store.
        let mut store = MemStore::default();
        let rec = NodeRecord {
            id: n("incidents"),
            config: default_config(AccessModel::Open),
            creator: p("alice"),
            created: 0,
            affiliations: [(p("alice"), Affiliation::Owner)].into_iter().collect(),
            next_seq: 1,
        };
        store.put_node(&rec).unwrap();
        for subid in ["s1", "s2"] {
            let sub = SubRecord {
                node: n("incidents"),
                jid: "bob@grid.test".into(),
                subid: subid.into(),
                state: SubState::Subscribed,
                owner: p("bob"),
                delivered: 0,
                deliver: true,
            };
            store.put_sub(&sub).unwrap();
        }
        let svc = Service::open(store, Arc::new(Table::default()), Limits::default(), AccessModel::Open).unwrap();
        let mut f = Fx { svc, login: login(), now: T0 };
        let unsub = |subid: Option<&str>| Request::Unsubscribe { node: n("incidents"), jid: jid("bob@grid.test"), subid: subid.map(str::to_owned) };
        assert_eq!(f.err("bob", unsub(None)), PubsubError::SubidRequired);
        f.ok("bob", unsub(Some("s2")));
        f.ok("bob", unsub(None));
        assert!(f.my_subs("bob").is_empty());
    }

    #[test]
    fn unsubscribing_someone_else_is_forbidden_except_for_owners() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        let unsub = Request::Unsubscribe { node: n("incidents"), jid: jid("bob@grid.test"), subid: None };
        assert_eq!(f.err("carol", unsub.clone()), PubsubError::Forbidden);
        f.ok("alice", unsub);
        assert!(f.my_subs("bob").is_empty());
    }

    #[test]
    fn subscriptions_per_platform_are_limited() {
        let limits = Limits { max_subscriptions_per_platform: 2, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        for node in ["a", "b", "c"] {
            f.create("alice", node, patch());
        }
        f.subscribe("bob", "a");
        f.ok("bob", subscribe("b", "bob@grid.test/desk"));
        let e = f.err("bob", subscribe("c", "bob@grid.test"));
        assert!(matches!(e, PubsubError::LimitReached(_)), "{e:?}");
        // Asking again for one it holds is not a new subscription.
        f.subscribe("bob", "a");
        f.subscribe("carol", "c");
        f.ok("bob", Request::Unsubscribe { node: n("a"), jid: jid("bob@grid.test"), subid: None });
        f.subscribe("bob", "c");
    }

    #[test]
    fn options_show_the_subscription() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        let s = f.subscribe("bob", "incidents");
        let o = f.ok("bob", Request::OptionsGet { node: n("incidents"), jid: jid("bob@grid.test"), subid: None });
        assert_eq!(o.reply, Reply::Subscription(s));
        assert_eq!(
            f.err("carol", Request::OptionsGet { node: n("incidents"), jid: jid("carol@grid.test"), subid: None }),
            PubsubError::NotSubscribed
        );
    }

    #[test]
    fn delivery_switched_off_stops_notifications_and_on_resumes_without_replay() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        let set = |d: bool| Request::OptionsSet { node: n("incidents"), jid: jid("bob@grid.test"), subid: None, deliver: Some(d) };
        let pub_ = |id: &str| publish("incidents", Some(id), "x");
        assert_eq!(f.ok("bob", set(false)).reply, Reply::Empty);
        let o = f.ok("bob", Request::OptionsGet { node: n("incidents"), jid: jid("bob@grid.test"), subid: None });
        assert!(matches!(o.reply, Reply::Subscription(SubView { deliver: false, .. })), "{o:?}");
        let o = f.ok("alice", pub_("while-off"));
        assert!(recipients(&o, "items").is_empty(), "{o:?}");
        // Offline delivery would not start from it either.
        assert!(f.svc.subscriptions_of(&p("bob")).is_empty());
        f.ok("bob", set(true));
        let sub = f.svc.subscriptions_of(&p("bob")).pop().unwrap();
        assert_eq!(sub.delivered, f.svc.head(&n("incidents")), "what was switched off is not replayed");
        let o = f.ok("alice", pub_("after"));
        assert_eq!(recipients(&o, "items"), ["bob@grid.test"]);
        // Others may not change bob's options.
        assert_eq!(f.err("carol", set(false)), PubsubError::Forbidden);
        // Options at subscribe time (§6.3.7).
        let o = f.ok("carol", Request::Subscribe { node: n("incidents"), jid: jid("carol@grid.test"), deliver: Some(false) });
        assert!(matches!(o.reply, Reply::Subscription(SubView { deliver: false, .. })), "{o:?}");
        let o = f.ok("alice", pub_("later"));
        assert_eq!(recipients(&o, "items"), ["bob@grid.test"]);
    }

    // ---- access models ------------------------------------------------------

    #[test]
    fn open_node_admits_any_subscriber_and_reader() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Open));
        f.publish("alice", "incidents", Some("a"));
        assert_eq!(f.items("bob", items("incidents")).0, vec!["a"]);
        assert_eq!(f.subscribe("bob", "incidents").state, SubState::Subscribed);
    }

    #[test]
    fn pending_approvals_are_listed_for_owners_only() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Authorize));
        f.create("alice", "open", access(AccessModel::Open));
        let s = f.subscribe("bob", "incidents");
        f.subscribe("bob", "open");
        assert_eq!(
            f.svc.pending_approvals(&p("alice")),
            vec![Event::ApprovalRequest { node: n("incidents"), jid: "bob@grid.test".into(), subid: s.subid.clone() }]
        );
        assert!(f.svc.pending_approvals(&p("bob")).is_empty());
        let approve = Request::Approve { node: n("incidents"), jid: jid("bob@grid.test"), subid: Some(s.subid), allow: true };
        f.ok("alice", approve);
        assert!(f.svc.pending_approvals(&p("alice")).is_empty());
    }

    #[test]
    fn authorize_makes_a_pending_subscription_and_asks_every_owner() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Authorize));
        f.affiliate("alice", "incidents", "dave", Affiliation::Owner);
        let o = f.ok("bob", subscribe("incidents", "bob@grid.test"));
        let s = match &o.reply {
            Reply::Subscription(s) => s.clone(),
            r => panic!("{r:?}"),
        };
        assert_eq!(s.state, SubState::Pending);
        assert_eq!(o.deliveries.len(), 1);
        assert_eq!(o.deliveries[0].event, Event::ApprovalRequest { node: n("incidents"), jid: "bob@grid.test".into(), subid: s.subid });
        let mut to = recipients(&o, "approval");
        to.sort();
        assert_eq!(to, vec!["alice@grid.test", "dave@grid.test"]);
        // Pending: no items, neither retrieved nor notified.
        f.publish("alice", "incidents", Some("a"));
        assert_eq!(f.err("bob", items("incidents")), PubsubError::PendingSubscription);
        assert!(f.svc.subscriptions_of(&p("bob")).is_empty());
        // Members skip the approval.
        f.affiliate("alice", "incidents", "carol", Affiliation::Member);
        assert_eq!(f.subscribe("carol", "incidents").state, SubState::Subscribed);
    }

    #[test]
    fn authorize_refuses_items_to_platforms_that_are_not_subscribed() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Authorize));
        assert_eq!(f.err("bob", items("incidents")), PubsubError::NotSubscribed);
    }

    #[test]
    fn approving_a_pending_subscription_subscribes_it_and_tells_the_subscriber() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Authorize));
        let s = f.subscribe("bob", "incidents");
        f.publish("alice", "incidents", Some("before"));
        let approve = |allow| Request::Approve { node: n("incidents"), jid: jid("bob@grid.test"), subid: None, allow };
        assert_eq!(f.err("bob", approve(true)), PubsubError::Forbidden);
        let o = f.ok("alice", approve(true));
        assert_eq!(
            o.deliveries[0].event,
            Event::Subscription { node: n("incidents"), jid: "bob@grid.test".into(), subid: s.subid.clone(), state: Some(SubState::Subscribed) }
        );
        assert_eq!(recipients(&o, "subscription"), vec!["bob@grid.test"]);
        assert_eq!(f.my_subs("bob")[0].state, SubState::Subscribed);
        // Delivery starts after approval; retrieval is open to the subscriber.
        assert_eq!(f.svc.subscriptions_of(&p("bob"))[0].delivered, 1);
        assert_eq!(f.items("bob", items("incidents")).0, vec!["before"]);
        let o = f.ok("alice", publish("incidents", None, "x"));
        assert_eq!(recipients(&o, "items"), vec!["bob@grid.test"]);
        // Nothing is pending any more.
        assert_eq!(f.err("alice", approve(true)), PubsubError::NotSubscribed);
    }

    #[test]
    fn denying_a_pending_subscription_removes_it_and_tells_the_subscriber() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Authorize));
        let s = f.subscribe("bob", "incidents");
        let o = f.ok("alice", Request::Approve { node: n("incidents"), jid: jid("bob@grid.test"), subid: Some(s.subid.clone()), allow: false });
        assert_eq!(o.deliveries[0].event, Event::Subscription { node: n("incidents"), jid: "bob@grid.test".into(), subid: s.subid, state: None });
        assert!(f.my_subs("bob").is_empty());
        assert_eq!(f.err("bob", items("incidents")), PubsubError::NotSubscribed);
    }

    #[test]
    fn whitelist_rejects_unaffiliated_subscriber() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Whitelist));
        f.publish("alice", "incidents", Some("a"));
        assert_eq!(f.err("bob", subscribe("incidents", "bob@grid.test")), PubsubError::ClosedNode);
        assert_eq!(f.err("bob", items("incidents")), PubsubError::ClosedNode);
        assert!(f.my_subs("bob").is_empty());
    }

    #[test]
    fn whitelist_admits_members_and_publishers() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Whitelist));
        f.publish("alice", "incidents", Some("a"));
        f.affiliate("alice", "incidents", "bob", Affiliation::Member);
        f.affiliate("alice", "incidents", "carol", Affiliation::Publisher);
        for who in ["bob", "carol"] {
            assert_eq!(f.subscribe(who, "incidents").state, SubState::Subscribed);
            assert_eq!(f.items(who, items("incidents")).0, vec!["a"]);
        }
    }

    #[test]
    fn outcasts_may_neither_subscribe_nor_retrieve_on_an_open_node() {
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Open));
        f.affiliate("alice", "incidents", "mallory", Affiliation::Outcast);
        assert_eq!(f.err("mallory", subscribe("incidents", "mallory@grid.test")), PubsubError::Outcast);
        assert_eq!(f.err("mallory", items("incidents")), PubsubError::Outcast);
    }

    #[test]
    fn publish_only_platforms_may_neither_subscribe_nor_retrieve() {
        // XEP-0060 §4.1: publish-only may publish and retract its own items, nothing else.
        let mut f = fx();
        f.create("alice", "incidents", access(AccessModel::Open));
        f.affiliate("alice", "incidents", "sensor", Affiliation::PublishOnly);
        f.publish("sensor", "incidents", Some("a"));
        assert_eq!(f.err("sensor", subscribe("incidents", "sensor@grid.test")), PubsubError::Forbidden);
        assert_eq!(f.err("sensor", items("incidents")), PubsubError::Forbidden);
    }

    // ---- retrieve -----------------------------------------------------------

    fn with_items(count: usize) -> Fx<MemStore> {
        let limits = Limits { max_items_per_page: 5, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        f.create("alice", "incidents", patch());
        for i in 1..=count {
            f.publish("alice", "incidents", Some(&format!("i{i}")));
        }
        f
    }

    fn ids(r: std::ops::RangeInclusive<usize>) -> Vec<String> {
        r.map(|i| format!("i{i}")).collect()
    }

    #[test]
    fn items_returns_everything_in_publish_order() {
        let mut f = with_items(4);
        let (got, page) = f.items("bob", items("incidents"));
        assert_eq!(got, ids(1..=4));
        assert_eq!(page, None);
        match f.ok("bob", items("incidents")).reply {
            Reply::Items { node, items, .. } => {
                assert_eq!(node, n("incidents"));
                assert_eq!(items[0].payload, payload("i1"));
                assert_eq!(items[0].publisher, p("alice"));
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn max_items_returns_the_newest_n_in_publish_order() {
        let mut f = with_items(4);
        let req = |m| Request::Items { node: n("incidents"), max_items: Some(m), item_ids: vec![], page: None };
        assert_eq!(f.items("bob", req(2)).0, ids(3..=4));
        assert_eq!(f.items("bob", req(10)).0, ids(1..=4));
        assert_eq!(f.items("bob", req(1)).0, ids(4..=4));
    }

    #[test]
    fn items_by_id_returns_those_items_and_unknown_ids_are_item_not_found() {
        let mut f = with_items(4);
        let req = |v: &[&str]| Request::Items { node: n("incidents"), max_items: None, item_ids: v.iter().map(|s| s.to_string()).collect(), page: None };
        assert_eq!(f.items("bob", req(&["i3", "i1"])).0, vec!["i3", "i1"]);
        assert_eq!(f.err("bob", req(&["i3", "nope"])), PubsubError::ItemNotFound);
    }

    #[test]
    fn items_of_a_missing_node_is_node_not_found() {
        let mut f = fx();
        assert_eq!(f.err("bob", items("nope")), PubsubError::NodeNotFound);
    }

    #[test]
    fn rsm_pages_forward_with_after() {
        let mut f = with_items(7);
        let (got, info) = f.items("bob", page("incidents", Some(3), None, None));
        assert_eq!(got, ids(1..=3));
        let info = info.unwrap();
        assert_eq!((info.first.as_deref(), info.last.as_deref(), info.count), (Some("1"), Some("3"), 7));
        let (got, info) = f.items("bob", page("incidents", Some(3), info.last.as_deref(), None));
        assert_eq!(got, ids(4..=6));
        let (got, info) = f.items("bob", page("incidents", Some(3), info.unwrap().last.as_deref(), None));
        assert_eq!(got, ids(7..=7));
        let (got, info) = f.items("bob", page("incidents", Some(3), info.unwrap().last.as_deref(), None));
        assert!(got.is_empty());
        let info = info.unwrap();
        assert_eq!((info.first, info.last, info.count), (None, None, 7));
    }

    #[test]
    fn rsm_pages_backward_with_before_and_the_last_page_with_an_empty_before() {
        let mut f = with_items(7);
        let (got, info) = f.items("bob", page("incidents", Some(3), None, Some("")));
        assert_eq!(got, ids(5..=7));
        let (got, info) = f.items("bob", page("incidents", Some(3), None, info.unwrap().first.as_deref()));
        assert_eq!(got, ids(2..=4));
        let (got, _) = f.items("bob", page("incidents", Some(3), None, info.unwrap().first.as_deref()));
        assert_eq!(got, ids(1..=1));
    }

    #[test]
    fn rsm_max_zero_gives_only_the_count() {
        let mut f = with_items(3);
        let (got, info) = f.items("bob", page("incidents", Some(0), None, None));
        assert!(got.is_empty());
        assert_eq!(info.unwrap().count, 3);
    }

    #[test]
    fn rsm_cursors_stay_stable_while_items_arrive_and_go() {
        let mut f = with_items(4);
        let (got, info) = f.items("bob", page("incidents", Some(2), None, None));
        assert_eq!(got, ids(1..=2));
        let cursor = info.unwrap().last;
        // New items, a retraction before the cursor and one after it.
        f.publish("alice", "incidents", Some("i5"));
        f.publish("alice", "incidents", Some("i6"));
        f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["i1".into(), "i3".into()], notify: false });
        let (got, info) = f.items("bob", page("incidents", Some(2), cursor.as_deref(), None));
        assert_eq!(got, vec!["i4", "i5"]);
        let (got, _) = f.items("bob", page("incidents", Some(2), info.unwrap().last.as_deref(), None));
        assert_eq!(got, vec!["i6"]);
    }

    #[test]
    fn pages_are_capped_at_max_items_per_page() {
        let mut f = with_items(12);
        // No paging asked: the newest page, with RSM data to page back.
        let (got, info) = f.items("bob", items("incidents"));
        assert_eq!(got, ids(8..=12));
        let info = info.expect("a truncated reply says so");
        assert_eq!((info.first.as_deref(), info.count), (Some("8"), 12));
        let (got, _) = f.items("bob", page("incidents", None, None, info.first.as_deref()));
        assert_eq!(got, ids(3..=7));
        let (got, _) = f.items("bob", page("incidents", Some(1000), None, None));
        assert_eq!(got, ids(1..=5));
        let (got, _) = f.items("bob", Request::Items { node: n("incidents"), max_items: Some(1000), item_ids: vec![], page: None });
        assert_eq!(got, ids(8..=12));
    }

    #[test]
    fn a_malformed_rsm_cursor_is_refused() {
        let mut f = with_items(2);
        assert!(f.run("bob", page("incidents", Some(1), Some("x"), None)).is_err());
    }

    // ---- own subscriptions and affiliations --------------------------------

    #[test]
    fn platforms_list_only_their_own_subscriptions_and_affiliations() {
        let mut f = fx();
        f.create("alice", "a", patch());
        f.create("alice", "b", patch());
        f.create("carol", "c", patch());
        let sa = f.subscribe("bob", "a");
        let sb = f.subscribe("bob", "b");
        f.subscribe("carol", "a");
        let mut mine = f.my_subs("bob");
        mine.sort_by(|x, y| x.node.cmp(&y.node));
        assert_eq!(mine, vec![sa.clone(), sb]);
        match f.ok("bob", Request::Subscriptions { node: Some(n("a")) }).reply {
            Reply::Subscriptions { node, subs } => assert_eq!((node, subs), (Some(n("a")), vec![sa])),
            r => panic!("{r:?}"),
        }
        f.affiliate("carol", "c", "bob", Affiliation::Publisher);
        let affs = |f: &mut Fx<MemStore>, who: &str, node: Option<&str>| match f.ok(who, Request::Affiliations { node: node.map(n) }).reply {
            Reply::Affiliations { affs, .. } => affs,
            r => panic!("{r:?}"),
        };
        assert_eq!(
            affs(&mut f, "alice", None),
            vec![(n("a"), p("alice"), Affiliation::Owner), (n("b"), p("alice"), Affiliation::Owner)]
        );
        assert_eq!(affs(&mut f, "alice", Some("b")), vec![(n("b"), p("alice"), Affiliation::Owner)]);
        assert_eq!(affs(&mut f, "bob", None), vec![(n("c"), p("bob"), Affiliation::Publisher)]);
        assert!(affs(&mut f, "dave", None).is_empty());
    }

    // ---- owner management -------------------------------------------------

    #[test]
    fn owners_list_and_change_subscriptions() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        assert_eq!(f.err("bob", Request::OwnerSubscriptions { node: n("incidents") }), PubsubError::Forbidden);
        // Subscribe carol, make bob pending.
        let o = f.ok(
            "alice",
            Request::OwnerSubscriptionsSet {
                node: n("incidents"),
                changes: vec![(jid("carol@grid.test"), Some(SubState::Subscribed)), (jid("bob@grid.test"), Some(SubState::Pending))],
            },
        );
        let mut told = recipients(&o, "subscription");
        told.sort();
        assert_eq!(told, vec!["bob@grid.test", "carol@grid.test"]);
        let list = match f.ok("alice", Request::OwnerSubscriptions { node: n("incidents") }).reply {
            Reply::Subscriptions { subs, .. } => subs,
            r => panic!("{r:?}"),
        };
        let mut states: Vec<(String, SubState)> = list.into_iter().map(|s| (s.jid, s.state)).collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(states, vec![("bob@grid.test".into(), SubState::Pending), ("carol@grid.test".into(), SubState::Subscribed)]);
        // Removing one tells it.
        let o = f.ok("alice", Request::OwnerSubscriptionsSet { node: n("incidents"), changes: vec![(jid("carol@grid.test"), None)] });
        assert!(matches!(&o.deliveries[0].event, Event::Subscription { state: None, jid, .. } if jid == "carol@grid.test"));
        assert!(f.my_subs("carol").is_empty());
    }

    #[test]
    fn owners_set_affiliations_and_outcasts_lose_their_subscriptions() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        f.ok("bob", subscribe("incidents", "bob@grid.test/desk"));
        assert_eq!(
            f.err("bob", Request::OwnerAffiliationsSet { node: n("incidents"), changes: vec![(p("bob"), Affiliation::Owner)] }),
            PubsubError::Forbidden
        );
        f.affiliate("alice", "incidents", "bob", Affiliation::Outcast);
        assert!(f.my_subs("bob").is_empty());
        assert!(f.svc.subscriptions_of(&p("bob")).is_empty());
        assert_eq!(f.err("bob", subscribe("incidents", "bob@grid.test")), PubsubError::Outcast);
        // "none" removes the affiliation.
        f.affiliate("alice", "incidents", "bob", Affiliation::None);
        match f.ok("alice", Request::OwnerAffiliations { node: n("incidents") }).reply {
            Reply::Affiliations { affs, .. } => assert_eq!(affs, vec![(n("incidents"), p("alice"), Affiliation::Owner)]),
            r => panic!("{r:?}"),
        }
        f.subscribe("bob", "incidents");
    }

    #[test]
    fn the_last_owner_cannot_be_removed() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        for a in [Affiliation::None, Affiliation::Publisher, Affiliation::Outcast] {
            let e = f.err("alice", Request::OwnerAffiliationsSet { node: n("incidents"), changes: vec![(p("alice"), a)] });
            assert!(matches!(e, PubsubError::BadConfig(_)), "{e:?}");
        }
        // With a second owner, the first may step down.
        f.affiliate("alice", "incidents", "dave", Affiliation::Owner);
        f.affiliate("alice", "incidents", "alice", Affiliation::Publisher);
        assert_eq!(f.err("alice", Request::Delete { node: n("incidents") }), PubsubError::Forbidden);
        f.ok("dave", Request::Delete { node: n("incidents") });
    }

    // ---- send_last_published_item -------------------------------------------

    #[test]
    fn on_sub_sends_the_newest_item_to_a_new_subscriber_only() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { send_last_published_item: Some(SendLast::OnSub), ..patch() });
        // Nothing published yet: nothing to send.
        assert!(f.ok("carol", subscribe("incidents", "carol@grid.test")).deliveries.is_empty());
        f.publish("alice", "incidents", Some("a"));
        f.publish("alice", "incidents", Some("b"));
        let o = f.ok("bob", subscribe("incidents", "bob@grid.test"));
        let s = f.my_subs("bob")[0].clone();
        match &o.deliveries[..] {
            [Delivery { event: Event::Items { items, .. }, to }] => {
                assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["b"]);
                assert_eq!(&to[..], &[Target { jid: "bob@grid.test".into(), owner: p("bob"), subid: Some(s.subid) }]);
            }
            d => panic!("{d:?}"),
        }
        // The cursor is at the head: the last item is a courtesy, not a delivery.
        assert_eq!(f.svc.subscriptions_of(&p("bob"))[0].delivered, 2);
        // Asking again sends nothing new.
        assert!(f.ok("bob", subscribe("incidents", "bob@grid.test")).deliveries.is_empty());
    }

    #[test]
    fn never_sends_nothing_on_subscribe() {
        let mut f = fx();
        f.create("alice", "incidents", patch());
        f.publish("alice", "incidents", Some("a"));
        assert!(f.ok("bob", subscribe("incidents", "bob@grid.test")).deliveries.is_empty());
    }

    #[test]
    fn on_sub_waits_for_approval_on_authorize_nodes() {
        let mut f = fx();
        f.create(
            "alice",
            "incidents",
            ConfigPatch { send_last_published_item: Some(SendLast::OnSub), access_model: Some(AccessModel::Authorize), ..patch() },
        );
        f.publish("alice", "incidents", Some("a"));
        let o = f.ok("bob", subscribe("incidents", "bob@grid.test"));
        assert!(recipients(&o, "items").is_empty(), "{o:?}");
    }

    // ---- retention --------------------------------------------------------

    #[test]
    fn max_items_drops_the_oldest_on_publish() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { max_items: Some(3), ..patch() });
        for i in 1..=5 {
            f.publish("alice", "incidents", Some(&format!("i{i}")));
        }
        assert_eq!(f.items("bob", items("incidents")).0, ids(3..=5));
        let kept: Vec<u64> = f.svc.items_between(&n("incidents"), 0, u64::MAX, 100).unwrap().iter().map(|i| i.seq).collect();
        assert_eq!(kept, vec![3, 4, 5]);
        // A dropped id can be published again as a new item.
        f.publish("alice", "incidents", Some("i1"));
        assert_eq!(f.items("bob", items("incidents")).0, vec!["i4", "i5", "i1"]);
    }

    #[test]
    fn expire_drops_items_older_than_item_expire() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { item_expire_secs: Some(60), ..patch() });
        f.create("alice", "keep", patch());
        f.publish("alice", "incidents", Some("old"));
        f.publish("alice", "keep", Some("old"));
        f.now += 30_000;
        f.publish("alice", "incidents", Some("new"));
        // 60 s after "old": it goes, "new" (30 s old) stays; nodes without expiry keep everything.
        f.svc.expire(f.now + 30_000).unwrap();
        assert_eq!(f.items("bob", items("incidents")).0, vec!["new"]);
        assert_eq!(f.items("bob", items("keep")).0, vec!["old"]);
        f.svc.expire(f.now + 61_000).unwrap();
        assert!(f.items("bob", items("incidents")).0.is_empty());
        assert_eq!(f.items("bob", items("keep")).0, vec!["old"]);
    }

    #[test]
    fn publishing_also_drops_expired_items() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { item_expire_secs: Some(1), ..patch() });
        f.publish("alice", "incidents", Some("old"));
        f.now += 5_000;
        f.publish("alice", "incidents", Some("new"));
        assert_eq!(f.items("bob", items("incidents")).0, vec!["new"]);
    }

    // ---- the authorizer ---------------------------------------------------

    fn deny(rules: &[(&str, Action, &str)]) -> Fx<MemStore> {
        let table = Table(rules.iter().map(|(p, a, t)| (format!("{p}@grid.test"), *a, t.to_string())).collect());
        fx_with(Limits::default(), table, AccessModel::Open)
    }

    #[test]
    fn a_denied_action_on_a_visible_node_is_forbidden() {
        let mut f = deny(&[
            ("bob", Action::Publish, "incidents"),
            ("bob", Action::Subscribe, "incidents"),
            ("bob", Action::Retrieve, "incidents"),
            ("bob", Action::Create, "new"),
            ("alice", Action::Retract, "incidents"),
            ("alice", Action::Purge, "incidents"),
            ("alice", Action::Configure, "incidents"),
            ("alice", Action::Delete, "incidents"),
            ("alice", Action::ManageSubscriptions, "incidents"),
        ]);
        f.create("alice", "incidents", ConfigPatch { publish_model: Some(PublishModel::Open), ..patch() });
        f.publish("alice", "incidents", Some("a"));
        assert_eq!(f.err("bob", publish("incidents", None, "x")), PubsubError::Forbidden);
        assert_eq!(f.err("bob", subscribe("incidents", "bob@grid.test")), PubsubError::Forbidden);
        assert_eq!(f.err("bob", items("incidents")), PubsubError::Forbidden);
        assert_eq!(f.err("bob", Request::Create { node: Some(n("new")), config: patch() }), PubsubError::Forbidden);
        // Affiliations do not override a denial, not even the owner's.
        let node = || n("incidents");
        assert_eq!(f.err("alice", Request::Retract { node: node(), item_ids: vec!["a".into()], notify: false }), PubsubError::Forbidden);
        assert_eq!(f.err("alice", Request::Purge { node: node() }), PubsubError::Forbidden);
        assert_eq!(f.err("alice", Request::ConfigureGet { node: node() }), PubsubError::Forbidden);
        assert_eq!(f.err("alice", Request::Delete { node: node() }), PubsubError::Forbidden);
        assert_eq!(f.err("alice", Request::OwnerSubscriptions { node: node() }), PubsubError::Forbidden);
        assert_eq!(f.items("alice", items("incidents")).0, vec!["a"]);
        // The controller is not a platform and is never asked.
        f.publish("", "incidents", Some("c"));
    }

    #[test]
    fn a_platform_that_may_not_discover_a_node_is_told_it_does_not_exist() {
        let mut f = deny(&[
            ("bob", Action::Discover, "secret"),
            ("bob", Action::Publish, "secret"),
            ("bob", Action::Subscribe, "secret"),
            ("bob", Action::Retrieve, "secret"),
            ("bob", Action::Delete, "secret"),
        ]);
        f.create("alice", "secret", ConfigPatch { publish_model: Some(PublishModel::Open), ..patch() });
        f.create("alice", "public", patch());
        assert_eq!(f.err("bob", publish("secret", None, "x")), PubsubError::NodeNotFound);
        assert_eq!(f.err("bob", subscribe("secret", "bob@grid.test")), PubsubError::NodeNotFound);
        assert_eq!(f.err("bob", items("secret")), PubsubError::NodeNotFound);
        assert_eq!(f.err("bob", Request::Delete { node: n("secret") }), PubsubError::NodeNotFound);
        assert_eq!(f.err("bob", Request::DiscoInfo { node: Some(n("secret")) }), PubsubError::NodeNotFound);
        assert_eq!(f.err("bob", Request::DiscoItems { node: Some(n("secret")), page: None }), PubsubError::NodeNotFound);
        match f.ok("bob", Request::DiscoItems { node: None, page: None }).reply {
            Reply::NodeList { nodes, .. } => assert_eq!(nodes, vec![(n("public"), String::new())]),
            r => panic!("{r:?}"),
        }
        match f.ok("alice", Request::DiscoItems { node: None, page: None }).reply {
            Reply::NodeList { nodes, .. } => assert_eq!(nodes.len(), 2),
            r => panic!("{r:?}"),
        }
    }

    // ---- discovery ----------------------------------------------------------

    #[test]
    fn disco_info_of_a_node_gives_its_metadata() {
        let mut f = fx();
        f.create("alice", "incidents", ConfigPatch { title: Some("Incidents".into()), payload_type: Some("urn:t".into()), ..patch() });
        f.subscribe("bob", "incidents");
        match f.ok("carol", Request::DiscoInfo { node: Some(n("incidents")) }).reply {
            Reply::NodeInfo(i) => {
                assert_eq!(i.id, n("incidents"));
                assert_eq!((i.config.title.as_str(), i.config.payload_type.as_str()), ("Incidents", "urn:t"));
                assert_eq!((i.owners, i.creator, i.created, i.num_subscribers), (vec![p("alice")], p("alice"), (T0 + 1) / 1000, 1));
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(f.ok("carol", Request::DiscoInfo { node: None }).reply, Reply::ServiceInfo);
        assert_eq!(f.err("carol", Request::DiscoInfo { node: Some(n("nope")) }), PubsubError::NodeNotFound);
    }

    #[test]
    fn disco_items_on_a_topic_lists_its_item_ids_to_readers_only() {
        let mut f = fx();
        f.create("alice", "open", access(AccessModel::Open));
        f.create("alice", "closed", access(AccessModel::Whitelist));
        f.publish("alice", "open", Some("one"));
        f.publish("alice", "open", Some("two"));
        f.publish("alice", "closed", Some("secret"));
        let ids = |f: &mut Fx<MemStore>, who: &str, node: &str| match f.ok(who, Request::DiscoItems { node: Some(n(node)), page: None }).reply {
            Reply::ItemIds { ids, .. } => ids,
            r => panic!("{r:?}"),
        };
        assert_eq!(ids(&mut f, "bob", "open"), vec!["one", "two"]);
        assert_eq!(ids(&mut f, "alice", "closed"), vec!["secret"]);
        assert_eq!(f.err("bob", Request::DiscoItems { node: Some(n("closed")), page: None }), PubsubError::ClosedNode);
    }

    #[test]
    fn disco_items_pages_by_node_name() {
        let limits = Limits { max_items_per_page: 3, ..Limits::default() };
        let mut f = fx_with(limits, Table::default(), AccessModel::Open);
        for node in ["e", "a", "d", "b", "c"] {
            f.create("", node, ConfigPatch { title: Some(format!("T{node}")), ..patch() });
        }
        let list = |f: &mut Fx<MemStore>, page: Option<Page>| match f.ok("bob", Request::DiscoItems { node: None, page }).reply {
            Reply::NodeList { nodes, page } => (nodes.into_iter().map(|(id, _)| id.0).collect::<Vec<_>>(), page),
            r => panic!("{r:?}"),
        };
        let (all, none) = list(&mut f, None);
        assert_eq!((all, none), (vec!["a", "b", "c", "d", "e"].into_iter().map(String::from).collect(), None));
        let (first, info) = list(&mut f, Some(Page { max: Some(2), ..Page::default() }));
        assert_eq!(first, vec!["a", "b"]);
        let info = info.unwrap();
        assert_eq!((info.first.as_deref(), info.last.as_deref(), info.count), (Some("a"), Some("b"), 5));
        let (next, _) = list(&mut f, Some(Page { max: Some(2), after: info.last, before: None }));
        assert_eq!(next, vec!["c", "d"]);
        let (last, _) = list(&mut f, Some(Page { max: Some(2), after: None, before: Some(String::new()) }));
        assert_eq!(last, vec!["d", "e"]);
        let (before, _) = list(&mut f, Some(Page { max: Some(2), after: None, before: Some("d".into()) }));
        assert_eq!(before, vec!["b", "c"]);
        // The page cap applies here too.
        let (capped, _) = list(&mut f, Some(Page { max: Some(100), ..Page::default() }));
        assert_eq!(capped, vec!["a", "b", "c"]);
        // A title is the node's name.
        match f.ok("bob", Request::DiscoItems { node: None, page: Some(Page { max: Some(1), ..Page::default() }) }).reply {
            Reply::NodeList { nodes, .. } => assert_eq!(nodes, vec![(n("a"), "Ta".into())]),
            r => panic!("{r:?}"),
        }
    }

    // ---- delivery support -------------------------------------------------

    #[test]
    fn items_between_returns_retained_items_in_a_seq_range_up_to_a_limit() {
        let mut f = with_items(6);
        f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["i3".into()], notify: false });
        let seqs = |v: Vec<Item>| v.into_iter().map(|i| i.seq).collect::<Vec<_>>();
        assert_eq!(seqs(f.svc.items_between(&n("incidents"), 1, 5, 10).unwrap()), vec![2, 4, 5]);
        assert_eq!(seqs(f.svc.items_between(&n("incidents"), 1, 6, 2).unwrap()), vec![2, 4]);
        assert_eq!(seqs(f.svc.items_between(&n("incidents"), 6, 100, 10).unwrap()), Vec::<u64>::new());
        assert_eq!(seqs(f.svc.items_between(&n("nope"), 0, 100, 10).unwrap()), Vec::<u64>::new());
        let it = &f.svc.items_between(&n("incidents"), 0, 1, 10).unwrap()[0];
        assert_eq!((it.id.as_str(), it.payload.clone()), ("i1", payload("i1")));
    }

    #[test]
    fn set_delivered_only_moves_forward() {
        let mut f = with_items(3);
        let s = f.subscribe("bob", "incidents");
        assert_eq!(f.svc.subscription(&s.subid).unwrap().delivered, 3);
        f.publish("alice", "incidents", None);
        f.publish("alice", "incidents", None);
        f.svc.set_delivered(&s.subid, 5).unwrap();
        f.svc.set_delivered(&s.subid, 4).unwrap();
        assert_eq!(f.svc.subscription(&s.subid).unwrap().delivered, 5);
        assert_eq!(f.svc.subscriptions_of(&p("bob"))[0].delivered, 5);
        // Unknown subscriptions are ignored.
        f.svc.set_delivered("nope", 9).unwrap();
    }

    #[test]
    fn only_mutations_wait_for_durability() {
        type S = Service<MemStore>;
        assert!(S::is_mutation(&publish("a", None, "x")));
        assert!(S::is_mutation(&subscribe("a", "b@grid.test")));
        assert!(S::is_mutation(&Request::Approve { node: n("a"), jid: jid("b@grid.test"), subid: None, allow: true }));
        assert!(!S::is_mutation(&items("a")));
        assert!(!S::is_mutation(&Request::DiscoItems { node: None, page: None }));
    }

    // ---- restart ------------------------------------------------------------

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("xg-svc-{name}-{}-{k}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A service on a sled store in `dir`; its Db closes when the service is dropped.
    fn sled_fx(dir: &TempDir) -> Fx<SledStore> {
        // sled's flusher thread of a just-dropped handle may hold the file lock a
        // moment longer (seen on a loaded machine): retry briefly.
        let mut tries = 0;
        let db = loop {
            match sled::open(&dir.0) {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    let _ = e;
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening {}: {e}", dir.0.display()),
            }
        };
        let store = SledStore::new(&db).unwrap();
        let svc = Service::open(store, Arc::new(Table::default()), Limits::default(), AccessModel::Open).unwrap();
        Fx { svc, login: login(), now: T0 }
    }

    /// Flushes (as the broker does before acknowledging) and reopens.
    fn restart(f: Fx<SledStore>, dir: &TempDir) -> Fx<SledStore> {
        (f.svc.flusher())().unwrap();
        let now = f.now;
        drop(f);
        let mut g = sled_fx(dir);
        g.now = now;
        g
    }

    #[test]
    fn restart_keeps_nodes_items_subscriptions_affiliations_and_cursors() {
        let dir = TempDir::new("keeps");
        let mut f = sled_fx(&dir);
        f.create("alice", "incidents", ConfigPatch { title: Some("Incidents".into()), access_model: Some(AccessModel::Authorize), ..patch() });
        f.affiliate("alice", "incidents", "bob", Affiliation::Member);
        let bob = f.subscribe("bob", "incidents");
        let carol = f.subscribe("carol", "incidents");
        assert_eq!(carol.state, SubState::Pending);
        for id in ["a", "b", "c"] {
            f.publish("alice", "incidents", Some(id));
        }
        f.svc.set_delivered(&bob.subid, 2).unwrap();
        let mut f = restart(f, &dir);
        assert_eq!(f.config("incidents").title, "Incidents");
        assert_eq!(f.items("bob", items("incidents")).0, vec!["a", "b", "c"]);
        let mut subs = match f.ok("alice", Request::OwnerSubscriptions { node: n("incidents") }).reply {
            Reply::Subscriptions { subs, .. } => subs,
            r => panic!("{r:?}"),
        };
        subs.sort_by(|a, b| a.jid.cmp(&b.jid));
        assert_eq!(subs, vec![bob.clone(), carol]);
        assert_eq!(f.svc.subscription(&bob.subid).unwrap().delivered, 2);
        assert_eq!(f.svc.items_between(&n("incidents"), 2, u64::MAX, 10).unwrap()[0].id, "c");
        // Publishing carries on after the old seqs and still reaches bob.
        let o = f.ok("alice", publish("incidents", Some("d"), "d"));
        assert_eq!(recipients(&o, "items"), vec!["bob@grid.test"]);
        assert_eq!(f.svc.head(&n("incidents")), 4);
        // The pending request can still be answered.
        f.ok("alice", Request::Approve { node: n("incidents"), jid: jid("carol@grid.test"), subid: None, allow: true });
    }

    #[test]
    fn restart_after_purge_does_not_reuse_seqs() {
        let dir = TempDir::new("purge");
        let mut f = sled_fx(&dir);
        f.create("alice", "incidents", patch());
        for _ in 0..3 {
            f.publish("alice", "incidents", None);
        }
        f.ok("alice", Request::Purge { node: n("incidents") });
        let mut f = restart(f, &dir);
        assert_eq!(f.svc.head(&n("incidents")), 3);
        f.publish("alice", "incidents", Some("x"));
        assert_eq!(f.svc.items_between(&n("incidents"), 0, u64::MAX, 10).unwrap()[0].seq, 4);
    }

    #[test]
    fn restart_after_retracting_every_item_does_not_reuse_seqs() {
        let dir = TempDir::new("retract");
        let mut f = sled_fx(&dir);
        f.create("alice", "incidents", patch());
        f.publish("alice", "incidents", Some("a"));
        f.publish("alice", "incidents", Some("b"));
        f.ok("alice", Request::Retract { node: n("incidents"), item_ids: vec!["a".into(), "b".into()], notify: false });
        let mut f = restart(f, &dir);
        assert_eq!(f.svc.head(&n("incidents")), 2);
        f.publish("alice", "incidents", Some("c"));
        assert_eq!(f.svc.items_between(&n("incidents"), 0, u64::MAX, 10).unwrap()[0].seq, 3);
    }

    #[test]
    fn restart_after_every_item_expired_does_not_reuse_seqs() {
        let dir = TempDir::new("expire");
        let mut f = sled_fx(&dir);
        f.create("alice", "incidents", ConfigPatch { item_expire_secs: Some(1), ..patch() });
        f.publish("alice", "incidents", Some("a"));
        f.svc.expire(f.now + 10_000).unwrap();
        let f = restart(f, &dir);
        assert_eq!(f.svc.head(&n("incidents")), 1);
    }

    #[test]
    fn restart_forgets_deleted_nodes_and_their_subscriptions() {
        let dir = TempDir::new("deleted");
        let mut f = sled_fx(&dir);
        f.create("alice", "incidents", patch());
        f.subscribe("bob", "incidents");
        f.publish("alice", "incidents", Some("a"));
        f.ok("alice", Request::Delete { node: n("incidents") });
        let mut f = restart(f, &dir);
        assert_eq!(f.err("alice", items("incidents")), PubsubError::NodeNotFound);
        assert!(f.svc.subscriptions_of(&p("bob")).is_empty());
        f.create("alice", "incidents", patch());
        assert!(f.items("alice", items("incidents")).0.is_empty());
    }
}
