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
    pub to: Vec<Target>,
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
                // next_seq is persisted on purge and delete; publishes advance it in memory only.
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
            Request::Subscribe { node, jid } => self.subscribe(ctx, node, jid),
            Request::Unsubscribe { node, jid, subid } => self.unsubscribe(ctx, node, jid, subid),
            Request::OptionsGet { node, jid, subid } => {
                // We keep no per-subscription options: show the subscription itself.
                let sub = self.find_sub(ctx, &node, &jid, subid.as_deref())?;
                Ok(Outcome::reply(Reply::Subscription(view(sub))))
            }
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
                // Leaf nodes have no children; their items are not listed here.
                self.node(&node)?;
                self.ask(ctx, Action::Discover, &node).map_err(|_| PubsubError::NodeNotFound)?;
                Ok(Outcome::reply(Reply::NodeList { nodes: Vec::new(), page: None }))
            }
            Request::DiscoItems { node: None, page } => self.list_nodes(ctx, page),
        }
    }

    // ---- access ---------------------------------------------------------

    /// Asks the authorizer; the controller itself is always allowed.
    fn ask(&self, ctx: &Ctx, action: Action, node: &NodeId) -> Result<(), PubsubError> {
        let (Actor::Platform(who), Some(login)) = (&ctx.actor, ctx.login) else {
            return Ok(());
        };
        let d = self.authz.authorize(&authz::Request { principal: who, action, topic: Some(&node.0), context: login });
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
        self.ask(ctx, Action::Create, &node)?;
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
        let n = self.node(&node)?;
        self.ask_visible(ctx, Action::Publish, &node)?;
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
        check_preconditions(&n.rec.config, &pre, self.limits.max_items_per_node)?;
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
                Self::trim(&mut self.store, n, max, now_ms.saturating_sub(e * 1000))?;
            }
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
                if let (true, Some(seq)) = (send_last, last) {
                    if let Some(item) = self.store.get_item(&node, seq).map_err(storage)? {
                        out.deliveries.push(Delivery {
                            event: Event::Items { node: node.clone(), items: vec![item] },
                            to: vec![target(&sub)],
                        });
                    }
                }
            }
        }
        self.subs.insert(sub.subid.clone(), sub);
        Ok(out)
    }

    /// The actor's subscription on `node` for `jid` (and `subid` when several could match).
    fn find_sub(&self, ctx: &Ctx, node: &NodeId, jid: &Jid, subid: Option<&str>) -> Result<&SubRecord, PubsubError> {
        let n = self.node(node)?;
        if let Actor::Platform(me) = &ctx.actor {
            if jid.bare() != me && self.affiliation(ctx, n) != Affiliation::Owner {
                return Err(PubsubError::Forbidden);
            }
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
        let want = p.max.map_or(self.limits.max_items_per_page as usize, |m| m as usize);
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
                            to: vec![Target { jid: s.jid, owner: s.owner, subid: None }],
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
                            to: vec![Target { jid: s.jid.clone(), owner: s.owner.clone(), subid: None }],
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
                    };
                    self.store.put_sub(&sub).map_err(storage)?;
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.subs.push(sub.subid.clone());
                    }
                    self.by_platform.entry(sub.owner.clone()).or_default().push(sub.subid.clone());
                    out.deliveries.push(Delivery {
                        event: Event::Subscription { node: node.clone(), jid: sub.jid.clone(), subid: sub.subid.clone(), state: Some(st) },
                        to: vec![Target { jid: sub.jid.clone(), owner: sub.owner.clone(), subid: None }],
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
            to: vec![Target { jid: jid_s, owner: jid.bare().clone(), subid: None }],
        });
        Ok(out)
    }

    // ---- delivery support for the broker task ---------------------------

    /// Active (subscribed) subscriptions of a node, as delivery targets.
    fn subscribed(&self, node: &NodeId) -> Vec<Target> {
        self.nodes
            .get(node)
            .map(|n| {
                n.subs.iter().filter_map(|id| self.subs.get(id)).filter(|s| s.state == SubState::Subscribed).map(target).collect()
            })
            .unwrap_or_default()
    }

    /// A platform's active subscriptions (offline delivery starts from these).
    pub fn subscriptions_of(&self, platform: &BareJid) -> Vec<SubRecord> {
        self.by_platform
            .get(platform)
            .map(|ids| ids.iter().filter_map(|id| self.subs.get(id)).filter(|s| s.state == SubState::Subscribed).cloned().collect())
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

    /// Records delivery progress of a subscription (persisted with the next flush).
    pub fn set_delivered(&mut self, subid: &str, seq: u64) -> Result<(), PubsubError> {
        if let Some(s) = self.subs.get_mut(subid) {
            if seq > s.delivered {
                s.delivered = seq;
                self.store.put_sub(s).map_err(storage)?;
            }
        }
        Ok(())
    }
}

fn target(s: &SubRecord) -> Target {
    Target { jid: s.jid.clone(), owner: s.owner.clone(), subid: Some(s.subid.clone()) }
}

fn view(s: &SubRecord) -> SubView {
    SubView { node: s.node.clone(), jid: s.jid.clone(), subid: s.subid.clone(), state: s.state }
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
