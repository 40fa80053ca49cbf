//! Payload plugins in the broker (DESIGN.md, "Flow of a stanza"): validators
//! run before a publish is stored, transformers when an item reaches a
//! subscriber (live, offline delivery, retrieval).
//!
//! Validators run on threads of their own, so a slow or hostile component
//! never stalls the broker task: a publish that needs them goes to its node's
//! shard (one FIFO thread per shard keeps each node's publishes in order) and
//! comes back to the broker task with its verdict. Transformers run on the
//! broker's thread, bounded by their deadline, once per distinct view of an
//! item (subscribers with the same roles and grants share one), never once per
//! session. A failing transformer withholds the item from that subscriber: it
//! never leaks what it was meant to remove (RFC 8600 §9).
//!
//! Must not: decide access (Cedar does, through [`PluginEnv`]), touch the store.

use super::model::{Item, NodeId};
use crate::jid::BareJid;
use crate::plugins::{Host, Plugin, PluginSet, PublisherInfo, SubscriberInfo, TopicInfo, Transformed, Verdict, Violation};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// What the broker asks the controller about platforms for its plugins.
pub trait PluginEnv: Send + Sync {
    /// The publisher as validators see it (roles, templates).
    fn publisher(&self, jid: &BareJid) -> PublisherInfo;
    /// The roles of `jid`, and those of `grants` that the policies allow it on `topic`.
    fn subscriber(&self, jid: &BareJid, topic: &TopicInfo, grants: &[String]) -> (Vec<String>, Vec<String>);
    /// Records what plugins did to the audit log.
    fn audit(&self, event: PluginEvent<'_>);
}

/// An audit-worthy plugin outcome.
#[derive(Debug)]
pub enum PluginEvent<'a> {
    /// A validator refused a payload, or could not check it (fail closed).
    Rejected { plugin: &'a str, publisher: &'a BareJid, node: &'a str, text: &'a str },
    /// A transformer failed; the item was withheld from `platform`.
    TransformFailed { plugin: &'a str, platform: &'a BareJid, node: &'a str, error: &'a str },
}

/// The namespace of a payload's root element ("" if it has none or is not XML).
pub fn root_namespace(payload: &[u8]) -> String {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut r = quick_xml::NsReader::from_reader(payload);
    loop {
        match r.read_resolved_event() {
            Ok((ResolveResult::Bound(ns), Event::Start(_) | Event::Empty(_))) => {
                return ns.as_ref().to_string();
            }
            Ok((_, Event::Start(_) | Event::Empty(_))) | Ok((_, Event::Eof)) | Err(_) => return String::new(),
            Ok(_) => continue,
        }
    }
}

/// Most violations quoted to a publisher; the audit record has the same text.
const MAX_VIOLATIONS_SHOWN: usize = 20;
/// Longest error text sent back to a publisher.
const MAX_TEXT: usize = 4000;

/// The publisher-facing text for a list of violations: "location: message; …".
pub fn describe(plugin: &str, violations: &[Violation]) -> String {
    let mut text = format!("rejected by {plugin}: ");
    for (i, v) in violations.iter().take(MAX_VIOLATIONS_SHOWN).enumerate() {
        if i > 0 {
            text.push_str("; ");
        }
        if v.location.is_empty() {
            text.push_str(&v.message);
        } else {
            text.push_str(&format!("{}: {}", v.location, v.message));
        }
    }
    if violations.len() > MAX_VIOLATIONS_SHOWN {
        text.push_str(&format!("; and {} more", violations.len() - MAX_VIOLATIONS_SHOWN));
    }
    if violations.is_empty() {
        text.push_str("no reason given");
    }
    truncate(text, MAX_TEXT)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub plugin: String,
    /// For the publisher and the audit log.
    pub text: String,
}

/// Runs `validators` in order; the first rejection or failure wins (fail closed).
pub fn check(validators: &[Arc<Plugin>], topic: &TopicInfo, publisher: &PublisherInfo, payload: &[u8]) -> Result<(), Rejection> {
    for v in validators {
        match v.validate(topic, publisher, payload) {
            Ok(Verdict::Accept) => {}
            Ok(Verdict::Reject(violations)) => {
                return Err(Rejection { plugin: v.name.clone(), text: describe(&v.name, &violations) });
            }
            Err(e) => {
                return Err(Rejection {
                    plugin: v.name.clone(),
                    text: truncate(format!("the payload could not be checked: {e}"), MAX_TEXT),
                });
            }
        }
    }
    Ok(())
}

/// A publish waiting for its validators; `tag` is the broker's request.
pub struct Job<T> {
    pub validators: Vec<Arc<Plugin>>,
    pub topic: TopicInfo,
    pub publisher: PublisherInfo,
    pub payload: Bytes,
    pub tag: T,
}

/// A publish back from its validators.
pub struct Checked<T> {
    pub tag: T,
    pub verdict: Result<(), Rejection>,
}

/// The validator threads. Dropping it ends them once their queues are empty.
pub struct Validators<T> {
    shards: Vec<std::sync::mpsc::SyncSender<Job<T>>>,
}

impl<T: Send + 'static> Validators<T> {
    /// `threads` shards with `queue` waiting publishes each; `done` gets every verdict.
    pub fn start(threads: usize, queue: usize, done: Arc<dyn Fn(Checked<T>) + Send + Sync>) -> std::io::Result<Self> {
        let mut shards = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job<T>>(queue.max(1));
            let done = done.clone();
            std::thread::Builder::new().name(format!("xg-validate-{i}")).spawn(move || {
                while let Ok(job) = rx.recv() {
                    let verdict = check(&job.validators, &job.topic, &job.publisher, &job.payload);
                    done(Checked { tag: job.tag, verdict });
                }
            })?;
            shards.push(tx);
        }
        Ok(Validators { shards })
    }

    /// Queues `job` on the shard of `node`; gives it back if that queue is full.
    pub fn submit(&self, node: &str, job: Job<T>) -> Result<(), Box<Job<T>>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % self.shards.len()];
        shard.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(j) | std::sync::mpsc::TrySendError::Disconnected(j) => Box::new(j),
        })
    }
}

/// An item as one subscriber may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// As published.
    Whole,
    /// With this payload instead (re-serialized by us: always well-formed).
    Rewritten(Bytes),
    /// Not at all.
    Withheld,
}

impl View {
    /// The item to render, or None if withheld.
    pub fn apply(&self, item: &Item) -> Option<Item> {
        match self {
            View::Whole => Some(item.clone()),
            View::Rewritten(p) => Some(Item { payload: p.clone(), ..item.clone() }),
            View::Withheld => None,
        }
    }
}

/// Entries kept in the view caches before they are dropped wholesale.
const CACHE_MAX: usize = 20_000;

/// The views of one item met so far, with what each sees.
type Seen = Vec<(Arc<SubscriberInfo>, View)>;

/// Transformer results for the broker task: who sees what of which item.
/// Lookups on the fan-out path borrow their keys (no allocation per
/// subscriber); views are interned, so equal ones are one `Arc`.
pub struct Views {
    host: Arc<Host>,
    env: Arc<dyn PluginEnv>,
    /// The plugin set the caches were filled under.
    set: Arc<PluginSet>,
    /// Per node, per platform: the view it gets (roles, granted grants).
    who: HashMap<NodeId, HashMap<BareJid, Arc<SubscriberInfo>>>,
    /// Every distinct view, once.
    interned: std::collections::HashSet<Arc<SubscriberInfo>>,
    /// Per node, per item seq: the result for each view met so far.
    seen: HashMap<NodeId, HashMap<u64, Seen>>,
    entries: usize,
    /// Limits for re-parsing rewritten payloads.
    limits: crate::stream::parser::Limits,
}

impl Views {
    pub fn new(host: Arc<Host>, env: Arc<dyn PluginEnv>, max_payload_bytes: usize) -> Views {
        let set = host.current();
        Views {
            host,
            env,
            set,
            who: HashMap::new(),
            interned: Default::default(),
            seen: HashMap::new(),
            entries: 0,
            limits: crate::stream::parser::Limits { max_stanza_bytes: max_payload_bytes.max(1024), max_depth: 64 },
        }
    }

    /// Policies or platforms changed: grants must be asked again.
    pub fn forget_subscribers(&mut self) {
        self.who.clear();
        self.interned.clear();
        self.seen.clear();
        self.entries = 0;
    }

    fn refresh(&mut self) {
        let now = self.host.current();
        if !Arc::ptr_eq(&now, &self.set) {
            self.set = now;
            self.forget_subscribers();
        }
    }

    /// The transformers that apply to `item` of `node` (empty: everyone sees it whole).
    pub fn transformers(&mut self, node: &NodeId, item: &Item) -> Vec<Arc<Plugin>> {
        self.refresh();
        if self.set.is_empty() || item.payload.is_empty() {
            return Vec::new();
        }
        self.set.transformers(node.as_str(), &root_namespace(&item.payload))
    }

    /// What `platform` sees of `item`; `topic` describes `node`. Returns the
    /// view shared by every platform that sees the same, and the result.
    pub fn view(
        &mut self,
        transformers: &[Arc<Plugin>],
        topic: &TopicInfo,
        node: &NodeId,
        item: &Item,
        platform: &BareJid,
    ) -> (Arc<SubscriberInfo>, View) {
        let key = self.key(transformers, topic, node, platform);
        if let Some((_, v)) = self.seen.get(node).and_then(|n| n.get(&item.seq)).and_then(|l| l.iter().find(|(k, _)| Arc::ptr_eq(k, &key))) {
            return (key, v.clone());
        }
        let view = self.run(transformers, topic, node, item, platform, &key);
        if self.entries >= CACHE_MAX {
            self.seen.clear();
            self.entries = 0;
        }
        self.entries += 1;
        self.seen.entry(node.clone()).or_default().entry(item.seq).or_default().push((key.clone(), view.clone()));
        (key, view)
    }

    fn key(&mut self, transformers: &[Arc<Plugin>], topic: &TopicInfo, node: &NodeId, platform: &BareJid) -> Arc<SubscriberInfo> {
        if let Some(k) = self.who.get(node).and_then(|m| m.get(platform)) {
            return k.clone();
        }
        let mut wanted: Vec<String> = transformers.iter().flat_map(|t| t.manifest.grants.iter().cloned()).collect();
        wanted.sort();
        wanted.dedup();
        let (roles, grants) = self.env.subscriber(platform, topic, &wanted);
        let jid = transformers.iter().any(|t| t.manifest.subscriber_jid).then(|| platform.to_string());
        let info = SubscriberInfo { jid, roles, grants };
        if self.interned.len() >= CACHE_MAX {
            self.forget_subscribers();
        }
        let k = match self.interned.get(&info) {
            Some(k) => k.clone(),
            None => {
                let k = Arc::new(info);
                self.interned.insert(k.clone());
                k
            }
        };
        self.who.entry(node.clone()).or_default().insert(platform.clone(), k.clone());
        k
    }

    fn run(
        &self,
        transformers: &[Arc<Plugin>],
        topic: &TopicInfo,
        node: &NodeId,
        item: &Item,
        platform: &BareJid,
        key: &SubscriberInfo,
    ) -> View {
        let mut payload: Option<Bytes> = None;
        for t in transformers {
            // Each transformer sees only what its manifest asks for.
            let info = SubscriberInfo {
                jid: if t.manifest.subscriber_jid { key.jid.clone() } else { None },
                roles: key.roles.clone(),
                grants: key.grants.iter().filter(|g| t.manifest.grants.contains(g)).cloned().collect(),
            };
            let input = payload.as_ref().unwrap_or(&item.payload);
            let failed = |error: String| {
                self.env.audit(PluginEvent::TransformFailed { plugin: &t.name, platform, node: node.as_str(), error: &error });
                tracing::warn!(plugin = %t.name, node = %node.as_str(), %platform, "transformer failed, item withheld: {error}");
                View::Withheld
            };
            match t.transform(topic, &info, input) {
                Ok(Transformed::Unchanged) => {}
                Ok(Transformed::Withhold) => return View::Withheld,
                Ok(Transformed::Rewritten(bytes)) => match crate::stream::parser::parse_element(&bytes, self.limits) {
                    Ok(e) => payload = Some(Bytes::from(e.to_standalone_bytes())),
                    Err(e) => return failed(format!("plugin \"{}\" returned a payload that is not one XML element: {e}", t.name)),
                },
                Err(e) => return failed(e.to_string()),
            }
        }
        match payload {
            Some(p) => View::Rewritten(p),
            None => View::Whole,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_namespace_is_read_from_the_payload() {
        assert_eq!(root_namespace(b"<IODEF-Document xmlns='urn:ietf:params:xml:ns:iodef-2.0' version='2.00'/>"), "urn:ietf:params:xml:ns:iodef-2.0");
        assert_eq!(root_namespace(b"<i:IODEF-Document xmlns:i='urn:x'><i:Incident/></i:IODEF-Document>"), "urn:x");
        assert_eq!(root_namespace(b"<plain/>"), "");
        assert_eq!(root_namespace(b"not xml"), "");
    }

    #[test]
    fn violations_are_described_with_their_location_and_capped() {
        let v = |i: usize| Violation { location: format!("/a[{i}]"), message: "bad".into() };
        assert_eq!(describe("p", &[v(1), Violation { location: String::new(), message: "whole".into() }]), "rejected by p: /a[1]: bad; whole");
        let many: Vec<Violation> = (0..100).map(v).collect();
        let text = describe("p", &many);
        assert!(text.ends_with("; and 80 more"), "{text}");
        let huge = vec![Violation { location: String::new(), message: "x".repeat(10_000) }];
        assert!(describe("p", &huge).len() <= MAX_TEXT);
    }
}
