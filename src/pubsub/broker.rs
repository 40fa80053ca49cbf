//! The broker: owns the [`Service`], turns stanzas into requests and replies,
//! commits changes in groups, and fans out notifications.
//!
//! One state behind one lock, so every node's items are delivered in publish
//! order. A publish runs on the thread that brings it (the publisher's
//! session worker), straight through to the subscribers' queues: no hand-off
//! to another thread on the way from a publish to its notifications. The
//! broker thread (`xg-broker`) runs what may take long: retrievals,
//! configuration, presence (which starts offline delivery), the controller's
//! own requests, expiry and policy re-checks; a request that would overtake
//! one queued there is queued too, so each session's requests keep their order.
//!
//! A change is acknowledged only after the store has flushed it. The commit
//! thread (`xg-commit`) runs one flush at a time, each taking every change
//! made while the one before ran (group commit), so a slow disk delays
//! acknowledgements and nothing else. Fan-out serializes each notification
//! once and hands the same bytes to every subscriber's bounded queue; a
//! subscriber that cannot keep up is disconnected by its queue and catches up
//! from its cursor when it returns (RFC 8600 §6 offline delivery), so nothing
//! is lost.
//!
//! Payload plugins ([`super::payload`]): a publish that validators apply to
//! is checked (authorization, limits) here, validated on the validator
//! threads, and stored and fanned out from there (`Cmd::Checked`); while one
//! is out, later publishes to the same node follow the same path, so each node
//! keeps publish order. Transformers shape every item a subscriber receives:
//! live, replayed, or retrieved. Plugins never run on a session worker: a
//! publish that transformers apply to goes to the broker thread.

use super::model::*;
use super::payload::{self, Checked, Job, PluginEnv, PluginEvent, Validators, View, Views};
use super::protocol;
use super::service::{Ctx, Delivery, Outcome, Service, Target};
use super::store::BrokerStore;
use crate::error::{ErrorType, StanzaError};
use crate::jid::{BareJid, Jid};
use crate::ns;
use crate::router::Component;
use crate::session::{Ack, Outbound, SessionHandle, Sessions};
use crate::xml::Element;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Platforms' requests waiting for the broker thread before new ones are
/// refused (`resource-constraint`, type wait): a client cannot queue without bound.
const INBOX: usize = 4096;
/// Items replayed to one subscription per round of offline delivery.
const CATCHUP_BATCH: usize = 64;
/// How often catch-up rounds run while a subscription is catching up.
const RETRY: Duration = Duration::from_millis(10);
/// How often items expire and delivery cursors are saved.
const TICK: Duration = Duration::from_secs(1);
/// Subscriptions re-checked per hold of the broker (policy changes).
const RECHECK_BATCH: usize = 256;

/// Work for the broker, run by whoever brings it.
enum Cmd {
    Stanza(Arc<SessionHandle>, Element),
    Presence(Arc<SessionHandle>, bool),
    /// Work of the controller itself (e.g. its alerts topic), answered on `reply`.
    Internal(Request, tokio::sync::oneshot::Sender<Result<Reply, PubsubError>>),
    /// Saves delivery cursors and answers once everything before it is durable.
    Sync(tokio::sync::oneshot::Sender<Result<Reply, PubsubError>>),
    /// A publish back from its validators.
    Checked(Checked<Waiting>),
}

/// What validators are given: themselves in order, the topic, the publisher.
type Inputs = (Vec<Arc<crate::plugins::Plugin>>, crate::plugins::TopicInfo, crate::plugins::PublisherInfo);

/// A publish at the validators.
struct Waiting {
    session: Arc<SessionHandle>,
    stanza: Element,
    req: Request,
}

/// Payload plugins for the broker: validators and transformers from `host`.
pub struct Plugins {
    pub host: Arc<crate::plugins::Host>,
    pub env: Arc<dyn PluginEnv>,
    /// Validator threads (each node always uses the same one).
    pub threads: usize,
    /// Publishes waiting per validator thread before new ones get `wait`.
    pub queue: usize,
    /// The broker's payload limit (bounds rewritten payloads too).
    pub max_payload_bytes: usize,
}

struct PluginState {
    host: Arc<crate::plugins::Host>,
    env: Arc<dyn PluginEnv>,
    validators: Validators<Waiting>,
    /// Publishes at the validators, per node.
    inflight: HashMap<NodeId, usize>,
    views: Views,
}

/// The broker as the router sees it.
pub struct Broker {
    run: Arc<dyn Fn(Cmd) + Send + Sync>,
    bell: Arc<Bell>,
    commit: Arc<Bell>,
    jid: String,
}

/// The broker's state, and what its two threads need. A quick request runs on
/// the thread that brings it (a session's worker, a validator thread), holding
/// the state for the service and the fan-out: no hand-off to another thread on
/// the way from a publish to its notifications. The broker thread runs the
/// queued requests, offline delivery, expiry and policy re-checks; the commit
/// thread flushes, then sends the replies and notifications a flush held back.
struct Shared<S: BrokerStore> {
    task: Mutex<Task<S>>,
    /// Requests for the broker thread: those that may take long (retrievals
    /// through transformers, configuration, the controller's own), and any
    /// that would otherwise overtake one of them.
    queue: Mutex<VecDeque<Cmd>>,
    /// Requests queued and not yet done.
    queued: std::sync::atomic::AtomicUsize,
    /// The broker thread holds the state for a queued request: workers queue
    /// theirs instead of waiting behind it.
    slow: std::sync::atomic::AtomicBool,
    /// Wakes the broker thread.
    bell: Arc<Bell>,
    /// Wakes the commit thread.
    commit: Arc<Bell>,
    /// Least time from one flush's start to the next one's.
    commit_interval: Duration,
    /// The broker's address, for the errors it sends.
    jid: String,
    flusher: Arc<dyn Fn() -> Result<(), super::store::BrokerStoreError> + Send + Sync>,
}

/// Wakes one of the broker's threads.
#[derive(Default)]
struct Bell {
    rung: Mutex<Rung>,
    cv: Condvar,
}

#[derive(Default)]
struct Rung {
    /// Changes wait for a flush, or subscriptions for a catch-up round.
    work: bool,
    /// Policies or platforms changed.
    recheck: bool,
    stop: bool,
}

impl Bell {
    fn ring(&self, f: impl FnOnce(&mut Rung)) {
        f(&mut hold(&self.rung));
        self.cv.notify_one();
    }

    /// Waits until rung or `until`, and takes what was rung.
    fn wait(&self, until: Instant) -> Rung {
        let mut r = hold(&self.rung);
        while !(r.work || r.recheck || r.stop) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            r = self.cv.wait_timeout(r, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        std::mem::take(&mut *r)
    }
}

/// Locks `m`; a panic elsewhere while it was held does not stop the broker.
fn hold<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: BrokerStore + 'static> Shared<S> {
    /// The broker's state, its threads not started yet.
    fn new(
        service: Service<S>,
        sessions: Arc<Sessions>,
        jid: String,
        plugins: Option<Plugins>,
        commit_interval: Duration,
    ) -> std::io::Result<Arc<Shared<S>>> {
        // Validators hand their verdicts back through this, once it is set.
        let back: Arc<std::sync::OnceLock<Weak<Shared<S>>>> = Arc::default();
        let plugins = match plugins {
            None => None,
            Some(p) => {
                let back = back.clone();
                let done: Arc<dyn Fn(Checked<Waiting>) + Send + Sync> = Arc::new(move |c| {
                    if let Some(shared) = back.get().and_then(Weak::upgrade) {
                        shared.run(Cmd::Checked(c));
                    }
                });
                Some(PluginState {
                    validators: Validators::start(p.threads, p.queue, done)?,
                    views: Views::new(p.host.clone(), p.env.clone(), p.max_payload_bytes),
                    host: p.host,
                    env: p.env,
                    inflight: HashMap::new(),
                })
            }
        };
        let task = Task {
            plugins,
            svc: service,
            sessions,
            jid: jid.clone(),
            live: HashMap::new(),
            pending: Vec::new(),
            flushing: false,
            flush_needed: false,
            catchup: VecDeque::new(),
            jids: Default::default(),
        };
        let shared = Arc::new(Shared {
            flusher: Arc::from(task.svc.flusher()),
            task: Mutex::new(task),
            queue: Mutex::new(VecDeque::new()),
            queued: Default::default(),
            slow: Default::default(),
            bell: Arc::default(),
            commit: Arc::default(),
            commit_interval,
            jid,
        });
        let _ = back.set(Arc::downgrade(&shared));
        Ok(shared)
    }

    /// Runs `cmd` here and now if it is quick and nothing queued is before it;
    /// else queues it for the broker thread. Wakes the thread if it has work.
    fn run(&self, cmd: Cmd) {
        if !self.slow.load(Ordering::Acquire) {
            let mut t = hold(&self.task);
            if self.queued.load(Ordering::Acquire) == 0 && t.quick(&cmd) {
                t.command(cmd);
                self.wake(t);
                return;
            }
        }
        if let Cmd::Stanza(session, stanza) = &cmd
            && self.queued.load(Ordering::Acquire) >= INBOX
        {
            // Overloaded: say so instead of queueing without bound. Presence,
            // verdicts and the controller's own work are never refused.
            let e = StanzaError::new("resource-constraint").kind(ErrorType::Wait).text("the broker is busy; retry");
            return send_error(&self.jid, session, stanza, e);
        }
        {
            let mut q = hold(&self.queue);
            self.queued.fetch_add(1, Ordering::AcqRel);
            q.push_back(cmd);
        }
        self.bell.ring(|r| r.work = true);
    }

    /// Runs the queued requests in order, one per hold of the state.
    fn run_queued(&self) {
        loop {
            let Some(cmd) = hold(&self.queue).pop_front() else { return };
            let mut t = hold(&self.task);
            self.slow.store(true, Ordering::Release);
            t.command(cmd);
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.slow.store(false, Ordering::Release);
            self.commit_if_wanted(t);
        }
    }

    /// Lets go of the state, and wakes the commit thread if a flush is wanted.
    fn commit_if_wanted(&self, t: std::sync::MutexGuard<'_, Task<S>>) {
        let flush = t.wants_flush();
        drop(t);
        if flush {
            self.commit.ring(|r| r.work = true);
        }
    }

    /// Wakes the threads for what `t` left them.
    fn wake(&self, t: std::sync::MutexGuard<'_, Task<S>>) {
        let catch_up = t.catching_up();
        self.commit_if_wanted(t);
        if catch_up {
            self.bell.ring(|r| r.work = true);
        }
    }

    /// The broker thread: queued requests, offline delivery, expiry, re-checks.
    fn thread(&self) {
        let mut next_tick = Instant::now() + TICK;
        let mut next_retry = Instant::now();
        loop {
            let until = if hold(&self.task).catching_up() { next_tick.min(next_retry) } else { next_tick };
            let rung = self.bell.wait(until);
            if rung.stop {
                return;
            }
            if rung.recheck {
                self.recheck();
            }
            self.run_queued();
            let now = Instant::now();
            let mut t = hold(&self.task);
            if now >= next_tick {
                next_tick = now + TICK;
                t.tick();
            }
            if t.catching_up() && (rung.work || now >= next_retry) {
                next_retry = now + RETRY;
                t.catch_up_round();
            }
            self.commit_if_wanted(t);
        }
    }

    /// The commit thread: one flush at a time, each taking every change made
    /// while the one before ran (group commit); then their replies and notices.
    /// A slow disk delays acknowledgements, nothing else.
    fn committer(&self) {
        let mut last: Option<Instant> = None;
        loop {
            if self.commit.wait(Instant::now() + TICK).stop {
                return;
            }
            // Group commit: at most one flush per interval under load.
            if let Some(due) = last.map(|l| l + self.commit_interval)
                && let Some(wait) = due.checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
            let Some(batch) = hold(&self.task).begin_flush() else { continue };
            last = Some(Instant::now());
            let durable = match (self.flusher)() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("broker flush failed: {e}");
                    false
                }
            };
            let mut t = hold(&self.task);
            t.release(batch, durable);
            // What arrived during this flush rings for the next one.
            self.wake(t);
        }
    }

    /// Ends the subscriptions that policies no longer allow, a batch per hold.
    fn recheck(&self) {
        let ids = {
            let mut t = hold(&self.task);
            if let Some(p) = &mut t.plugins {
                p.views.forget_subscribers();
            }
            t.svc.subscription_ids()
        };
        let login = crate::authz::Context { authn: String::new(), tls_version: "", source: std::net::IpAddr::from([0, 0, 0, 0]) };
        let mut ended = 0;
        for chunk in ids.chunks(RECHECK_BATCH) {
            let mut t = hold(&self.task);
            let mut deliveries = Vec::new();
            for id in chunk {
                match t.svc.recheck_subscription(&login, id) {
                    Ok(Some(d)) => deliveries.push(d),
                    Ok(None) => {}
                    Err(e) => tracing::error!("re-checking subscription {id}: {e}"),
                }
            }
            ended += deliveries.len();
            if !deliveries.is_empty() {
                t.pending.push(Pending { reply: None, internal: None, deliveries });
                self.wake(t);
            }
        }
        if ended > 0 {
            tracing::info!(ended, "subscriptions ended by policy");
        }
    }
}

impl Broker {
    /// Starts the broker on `service`, without payload plugins, flushing back to back.
    pub fn start<S: BrokerStore + 'static>(service: Service<S>, sessions: Arc<Sessions>, jid: String) -> Arc<Broker> {
        match Self::start_with(service, sessions, jid, None, Duration::ZERO) {
            Ok(b) => b,
            // Without a thread nothing can run; the process cannot serve anyway.
            Err(e) => panic!("cannot start the broker thread: {e}"),
        }
    }

    /// Starts the broker on `service`, with `plugins`, and its threads; a
    /// flush starts at least `commit_interval` after the previous one.
    pub fn start_with<S: BrokerStore + 'static>(
        service: Service<S>,
        sessions: Arc<Sessions>,
        jid: String,
        plugins: Option<Plugins>,
        commit_interval: Duration,
    ) -> std::io::Result<Arc<Broker>> {
        let shared = Shared::new(service, sessions, jid.clone(), plugins, commit_interval)?;
        let (bell, commit) = (shared.bell.clone(), shared.commit.clone());
        let on_thread = shared.clone();
        std::thread::Builder::new().name("xg-broker".into()).spawn(move || on_thread.thread())?;
        let on_thread = shared.clone();
        std::thread::Builder::new().name("xg-commit".into()).spawn(move || on_thread.committer())?;
        Ok(Arc::new(Broker { run: Arc::new(move |cmd| shared.run(cmd)), bell, commit, jid }))
    }


    /// Saves delivery progress and waits until all accepted changes are durable
    /// (at shutdown, after the sessions have ended).
    pub async fn sync(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (self.run)(Cmd::Sync(tx));
        let _ = rx.await;
    }

    /// Re-checks every subscription against the current policies, on the
    /// broker thread (never blocks the caller).
    pub fn recheck(&self) {
        self.bell.ring(|r| r.recheck = true);
    }

    /// Runs a request as the controller itself (not a platform), e.g. to create
    /// and publish to the grid's own alerts topic.
    pub async fn internal(&self, req: Request) -> Result<Reply, PubsubError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (self.run)(Cmd::Internal(req, tx));
        rx.await.map_err(|_| PubsubError::Storage("broker stopped".into()))?
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.bell.ring(|r| r.stop = true);
        self.commit.ring(|r| r.stop = true);
    }
}

impl Component for Broker {
    fn handle(&self, session: &Arc<SessionHandle>, stanza: Element) {
        (self.run)(Cmd::Stanza(session.clone(), stanza));
    }

    fn presence(&self, session: &Arc<SessionHandle>, available: bool) {
        (self.run)(Cmd::Presence(session.clone(), available));
    }
}

/// Live delivery state of one subscription.
struct Live {
    mode: Mode,
    /// Highest seq handed to a session queue.
    enqueued: u64,
    /// Highest seq written to a socket (raised by the sessions).
    written: Arc<AtomicU64>,
    /// Highest seq recorded in the store.
    persisted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No available session: items wait in the store.
    Offline,
    /// Replaying stored items; new ones are picked up by the replay.
    CatchingUp,
    /// Up to date: new items go straight to the sessions.
    Live,
}

/// A reply and notifications held back until their changes are durable.
struct Pending {
    /// The session, the result to send, and the request's id (for an error reply instead).
    reply: Option<(Arc<SessionHandle>, Bytes, Option<String>)>,
    internal: Option<(tokio::sync::oneshot::Sender<Result<Reply, PubsubError>>, Reply)>,
    deliveries: Vec<Delivery>,
}

struct Task<S: BrokerStore> {
    svc: Service<S>,
    plugins: Option<PluginState>,
    sessions: Arc<Sessions>,
    jid: String,
    live: HashMap<String, Live>,
    /// Waiting for the flush after the one in progress.
    pending: Vec<Pending>,
    /// The commit thread is flushing (it takes `pending` again when done).
    flushing: bool,
    /// Cursor updates were written to the store and want a flush.
    flush_needed: bool,
    catchup: VecDeque<String>,
    /// Parsed subscription addresses (see `available_sessions`).
    jids: std::cell::RefCell<HashMap<String, Option<Jid>>>,
}

/// How one item is shaped for its subscribers, with each view's bytes.
struct Shaping {
    transformers: Vec<Arc<crate::plugins::Plugin>>,
    /// Set when transformers apply.
    topic: Option<crate::plugins::TopicInfo>,
    /// (view, delay-stamped) → the notification, or None if withheld. The
    /// view is its interned pointer (0: no transformer).
    memo: HashMap<(usize, bool), Option<Bytes>>,
}

/// Answers `stanza` with `e`, from the broker at `jid`.
fn send_error(jid: &str, session: &SessionHandle, stanza: &Element, e: StanzaError) {
    if let Some(mut r) = e.reply_to(stanza) {
        r.set_attr("from", jid);
        let _ = session.deliver(Bytes::from(r.to_bytes(ns::CLIENT)));
    }
}

/// The node and payload namespace of a publish request (XEP-0060 §7.1).
fn publish_of(stanza: &Element) -> Option<(&str, &str)> {
    if stanza.name != "iq" || stanza.attr("type") != Some("set") {
        return None;
    }
    let pubsub = stanza.elements().find(|e| e.name == "pubsub" && e.ns == protocol::NS_PUBSUB)?;
    let publish = pubsub.elements().find(|e| e.name == "publish")?;
    let payload = publish.elements().find(|e| e.name == "item").and_then(|i| i.elements().next());
    Some((publish.attr("node")?, payload.map_or("", |p| p.ns.as_str())))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl<S: BrokerStore + 'static> Task<S> {
    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Stanza(session, stanza) => self.stanza(session, stanza),
            Cmd::Presence(session, available) => self.presence(&session, available),
            Cmd::Checked(c) => self.checked(c),
            Cmd::Sync(tx) => {
                self.persist_cursors(true);
                self.pending.push(Pending { reply: None, internal: Some((tx, Reply::Empty)), deliveries: Vec::new() });
            }
            Cmd::Internal(req, reply) => {
                let mutation = Service::<S>::is_mutation(&req);
                let publish = matches!(req, Request::Publish { .. });
                let ctx = Ctx { actor: Actor::Controller, login: None, now_ms: now_ms() };
                match self.svc.handle(&ctx, req) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(out) if mutation => {
                        let later = self.fan_out_now(publish, out.deliveries);
                        self.pending.push(Pending { reply: None, internal: Some((reply, out.reply)), deliveries: later })
                    }
                    Ok(out) => {
                        let _ = reply.send(Ok(out.reply));
                        self.deliver_all(out.deliveries);
                    }
                }
            }
        }
    }

    /// Whether `cmd` is quick enough to run on the thread that brings it: a
    /// validator's verdict (on its validator thread), or a publish that no
    /// transformer applies to. Anything else may read many items (a presence
    /// starts offline delivery) or run plugins for each, and goes to the
    /// broker thread.
    fn quick(&self, cmd: &Cmd) -> bool {
        match cmd {
            Cmd::Checked(_) => true,
            Cmd::Presence(..) | Cmd::Internal(..) | Cmd::Sync(_) => false,
            Cmd::Stanza(_, stanza) => match publish_of(stanza) {
                None => false,
                Some((node, payload_ns)) => self.plugins.as_ref().is_none_or(|p| {
                    let set = p.host.current();
                    set.is_empty() || set.transformers(node, payload_ns).is_empty()
                }),
            },
        }
    }

    /// Whether a flush should start: changes wait, and none runs.
    fn wants_flush(&self) -> bool {
        !self.flushing && (!self.pending.is_empty() || self.flush_needed)
    }

    fn catching_up(&self) -> bool {
        !self.catchup.is_empty()
    }

    /// Takes the changes of the next group commit, unless a flush runs already.
    fn begin_flush(&mut self) -> Option<Vec<Pending>> {
        if self.flushing || (self.pending.is_empty() && !self.flush_needed) {
            return None;
        }
        self.flushing = true;
        self.flush_needed = false;
        Some(std::mem::take(&mut self.pending))
    }

    /// Periodic work: expiry, and saving delivery cursors.
    fn tick(&mut self) {
        if let Err(e) = self.svc.expire(now_ms()) {
            tracing::error!("item expiry: {e}");
        }
        self.persist_cursors(false);
    }

    fn stanza(&mut self, session: Arc<SessionHandle>, stanza: Element) {
        let parsed = match stanza.name.as_str() {
            "iq" if matches!(stanza.attr("type"), Some("get") | Some("set")) => protocol::parse_iq(&stanza),
            "message" if stanza.attr("type") != Some("error") => match protocol::parse_message(&stanza) {
                Some(r) => Ok(r),
                None => return, // messages to the broker carry nothing else we act on
            },
            "iq" | "message" | "presence" => return,
            _ => return,
        };
        let req = match parsed {
            Ok(r) => r,
            Err(e) => return self.send_error(&session, &stanza, e),
        };
        if let Request::Publish { node, payload, preconditions, .. } = &req
            && let Some(job) = self.validation(&session, node, payload, preconditions)
        {
            return match job {
                Ok(job) => self.submit(node.clone(), Waiting { session, stanza, req: req.clone() }, job),
                Err(e) => self.send_error(&session, &stanza, protocol::error_for(&req, &e)),
            };
        }
        self.execute(session, stanza, req);
    }

    /// Whether a publish must pass validators first: None if not, else the
    /// validators' inputs, or the error that refuses it before any plugin runs.
    fn validation(
        &mut self,
        session: &SessionHandle,
        node: &NodeId,
        payload: &Bytes,
        pre: &ConfigPatch,
    ) -> Option<Result<Inputs, PubsubError>> {
        let p = self.plugins.as_ref()?;
        let set = p.host.current();
        let validators =
            if set.is_empty() { Vec::new() } else { set.validators(node.as_str(), &payload::root_namespace(payload)) };
        let waiting = p.inflight.get(node).is_some_and(|n| *n > 0);
        if validators.is_empty() && !waiting {
            return None;
        }
        let platform = session.jid.bare().clone();
        let ctx = Ctx { actor: Actor::Platform(platform.clone()), login: Some(&session.context), now_ms: now_ms() };
        // Authorization and limits first: plugins never run for a publish that would be refused anyway.
        if let Err(e) = self.svc.admit_publish(&ctx, node, payload, pre) {
            return Some(Err(e));
        }
        let topic = self.topic(node);
        Some(Ok((validators, topic, p.env.publisher(&platform))))
    }

    fn topic(&self, node: &NodeId) -> crate::plugins::TopicInfo {
        let (payload_type, owner) = self.svc.topic_info(node).map(|(t, o)| (t.to_string(), o.to_string())).unwrap_or_default();
        crate::plugins::TopicInfo {
            name: node.as_str().to_string(),
            payload_type: (!payload_type.is_empty()).then_some(payload_type),
            owner,
        }
    }

    fn submit(
        &mut self,
        node: NodeId,
        w: Waiting,
        (validators, topic, publisher): Inputs,
    ) {
        let Some(p) = &mut self.plugins else { return };
        let Request::Publish { payload, .. } = &w.req else { return };
        let job = Job { validators, topic, publisher, payload: payload.clone(), tag: w };
        match p.validators.submit(node.as_str(), job) {
            Ok(()) => *p.inflight.entry(node).or_default() += 1,
            Err(job) => {
                let e = StanzaError::new("resource-constraint").kind(ErrorType::Wait).text("the payload validators are busy; retry");
                self.send_error(&job.tag.session, &job.tag.stanza, e);
            }
        }
    }

    /// A publish is back from its validators: store it, or refuse it.
    fn checked(&mut self, c: Checked<Waiting>) {
        let Waiting { session, stanza, req } = c.tag;
        let Request::Publish { node, .. } = &req else { return };
        if let Some(p) = &mut self.plugins
            && let Some(n) = p.inflight.get_mut(node)
        {
            *n -= 1;
            if *n == 0 {
                p.inflight.remove(node);
            }
        }
        match c.verdict {
            Ok(()) => self.execute(session, stanza, req),
            Err(rej) => {
                if let Some(p) = &self.plugins {
                    p.env.audit(PluginEvent::Rejected {
                        plugin: &rej.plugin,
                        publisher: session.jid.bare(),
                        node: node.as_str(),
                        text: &rej.text,
                    });
                }
                let e = PubsubError::InvalidPayload { plugin: rej.plugin, reason: rej.text };
                self.send_error(&session, &stanza, protocol::error_for(&req, &e));
            }
        }
    }

    /// Runs a parsed request from a platform and answers it.
    fn execute(&mut self, session: Arc<SessionHandle>, stanza: Element, req: Request) {
        let ctx = Ctx { actor: Actor::Platform(session.jid.bare().clone()), login: Some(&session.context), now_ms: now_ms() };
        let mutation = Service::<S>::is_mutation(&req);
        let rendered_req = req.clone();
        match self.svc.handle(&ctx, req) {
            Err(e) => {
                if matches!(e, PubsubError::Storage(_)) {
                    tracing::error!(from = %session.jid, "broker request failed: {e}");
                }
                self.send_error(&session, &stanza, protocol::error_for(&rendered_req, &e));
            }
            Ok(Outcome { reply, deliveries }) => {
                if let Request::OptionsSet { node, jid, .. } = &rendered_req {
                    // Delivery switched off or on: live state starts again from the
                    // stored cursor (switched-off notifications are not replayed).
                    let (svc, jid) = (&self.svc, jid.to_string());
                    self.live.retain(|id, _| svc.subscription(id).is_some_and(|s| !(s.node == *node && s.jid == jid)));
                }
                let reply = self.viewed(reply, session.jid.bare());
                let bytes = (stanza.name == "iq").then(|| self.result(&stanza, &session, &reply, &rendered_req));
                let reply = bytes.map(|b| (session.clone(), b, stanza.attr("id").map(str::to_owned)));
                if mutation {
                    let later = self.fan_out_now(matches!(rendered_req, Request::Publish { .. }), deliveries);
                    self.pending.push(Pending { reply, internal: None, deliveries: later });
                } else {
                    if let Some((s, b, _)) = reply {
                        let _ = s.deliver(b);
                    }
                    self.deliver_all(deliveries);
                }
            }
        }
    }

    fn result(&self, iq: &Element, session: &SessionHandle, reply: &Reply, req: &Request) -> Bytes {
        let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "result").with_attr("from", &self.jid);
        r.set_attr("to", session.jid.to_string());
        if let Some(id) = iq.attr("id") {
            r.set_attr("id", id);
        }
        if let Some(p) = protocol::render_reply(reply, req, &self.jid) {
            r.push(p);
        }
        Bytes::from(r.to_bytes(ns::CLIENT))
    }

    fn send_error(&self, session: &SessionHandle, stanza: &Element, e: StanzaError) {
        send_error(&self.jid, session, stanza, e)
    }

    /// A flush finished: acknowledge the batch and fan out its notifications.
    fn release(&mut self, batch: Vec<Pending>, durable: bool) {
        self.flushing = false;
        for p in batch {
            if !durable {
                // Nothing of this batch may be claimed stored. The error carries the
                // request's id and the session's address, or the client could not match it.
                if let Some((s, _, id)) = p.reply {
                    let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "error").with_attr("from", &self.jid);
                    r.set_attr("to", s.jid.to_string());
                    if let Some(id) = id {
                        r.set_attr("id", id);
                    }
                    r.push(StanzaError::from(&PubsubError::Storage("flush failed".into())).to_element());
                    let _ = s.deliver(Bytes::from(r.to_bytes(ns::CLIENT)));
                }
                if let Some((tx, _)) = p.internal {
                    let _ = tx.send(Err(PubsubError::Storage("flush failed".into())));
                }
                continue;
            }
            if let Some((s, b, _)) = p.reply {
                let _ = s.deliver(b);
            }
            if let Some((tx, r)) = p.internal {
                let _ = tx.send(Ok(r));
            }
            self.deliver_all(p.deliveries);
        }
    }

    /// New items go to live subscribers at once, while their publisher's ack
    /// waits for the flush: the sync stays out of the delivery latency. An item
    /// lost in a crash before its flush was never acknowledged; its seq may be
    /// given again, which is safe because a saved cursor past it implies the
    /// item was saved too (sled flushes all earlier writes). Everything else
    /// (retractions, deletions, state changes, last items) waits for the flush.
    /// Returns the deliveries that wait.
    fn fan_out_now(&mut self, publish: bool, deliveries: Vec<Delivery>) -> Vec<Delivery> {
        if !publish {
            return deliveries;
        }
        let (now, later): (Vec<Delivery>, Vec<Delivery>) =
            deliveries.into_iter().partition(|d| matches!(d.event, Event::Items { .. }));
        self.deliver_all(now);
        later
    }

    fn deliver_all(&mut self, deliveries: Vec<Delivery>) {
        for d in deliveries {
            match &d.event {
                Event::Items { node, items } => {
                    for item in items {
                        self.fan_out_item(node, item, &d.to);
                    }
                }
                _ => {
                    let rest = self.notification(&d.event, None);
                    for t in d.to.iter() {
                        for s in self.available_sessions(&t.jid) {
                            let _ = s.deliver(Outbound::ToSelf { rest: rest.clone(), ack: None });
                        }
                    }
                }
            }
        }
    }

    /// `<message to='…'` is written by each session; this is the rest, shared.
    fn notification(&self, event: &Event, delay_ms: Option<u64>) -> Bytes {
        let mut m = Element::new("message", ns::CLIENT).with_attr("from", &self.jid).with_attr("type", "headline");
        m.push(protocol::render_event(event, &self.jid));
        if let Some(ms) = delay_ms {
            m.push(protocol::delay(ms, &self.jid));
        }
        let full = Bytes::from(m.to_bytes(ns::CLIENT));
        full.slice(b"<message".len()..)
    }

    /// The sessions a subscription address reaches now: an available full JID, or
    /// every available session of a bare JID (RFC 6121 §8.5.2 for headlines).
    fn available_sessions(&self, jid: &str) -> Vec<Arc<SessionHandle>> {
        // Subscription addresses are few and repeat on every publish: parse (and
        // Unicode-normalise) each once, not once per delivery.
        let mut cache = self.jids.borrow_mut();
        if cache.len() > 100_000 {
            cache.clear();
        }
        if !cache.contains_key(jid) {
            cache.insert(jid.to_string(), Jid::parse(jid).ok());
        }
        match cache.get(jid).and_then(Option::as_ref) {
            Some(Jid::Full(f)) => self.sessions.get(f).filter(|s| s.is_available()).into_iter().collect(),
            Some(Jid::Bare(b)) => self.sessions.of(b).into_iter().filter(|s| s.is_available()).collect(),
            None => Vec::new(),
        }
    }

    fn live_entry(&mut self, subid: &str, jid: &str) -> Option<&mut Live> {
        if !self.live.contains_key(subid) {
            let sub = self.svc.subscription(subid)?;
            let online = !self.available_sessions(jid).is_empty();
            self.live.insert(
                subid.to_string(),
                Live {
                    mode: if online { Mode::Live } else { Mode::Offline },
                    enqueued: sub.delivered,
                    written: Arc::new(AtomicU64::new(sub.delivered)),
                    persisted: sub.delivered,
                },
            );
        }
        self.live.get_mut(subid)
    }

    /// The transformers that shape `item` of `node`, and the topic as they see it.
    fn shaping(&mut self, node: &NodeId, item: &Item) -> Shaping {
        let transformers = match &mut self.plugins {
            Some(p) => p.views.transformers(node, item),
            None => Vec::new(),
        };
        let topic = (!transformers.is_empty()).then(|| self.topic(node));
        Shaping { transformers, topic, memo: HashMap::new() }
    }

    /// The notification of `item` for a subscription of `platform` (None:
    /// withheld from it), delay-stamped if `delay_ms`. Serialized once per view.
    fn rendered(&mut self, sh: &mut Shaping, node: &NodeId, item: &Item, platform: &BareJid, delay_ms: Option<u64>) -> Option<Bytes> {
        let (key, view) = self.view_of(sh, node, item, platform);
        let memo_key = (key, delay_ms.is_some());
        if let Some(b) = sh.memo.get(&memo_key) {
            return b.clone();
        }
        let bytes = view.apply(item).map(|it| self.notification(&Event::Items { node: node.clone(), items: vec![it] }, delay_ms));
        sh.memo.insert(memo_key, bytes.clone());
        bytes
    }

    /// What `platform` sees of `item`, and the view's name: its interned
    /// pointer (views are interned), or 0 when no transformer applies.
    fn view_of(&mut self, sh: &Shaping, node: &NodeId, item: &Item, platform: &BareJid) -> (usize, View) {
        match (&sh.topic, &mut self.plugins) {
            (Some(topic), Some(p)) => {
                let (k, v) = p.views.view(&sh.transformers, topic, node, item, platform);
                (Arc::as_ptr(&k) as usize, v)
            }
            _ => (0, View::Whole),
        }
    }

    /// A reply's items as `platform` may see them (retrieval, RFC 8600 §9).
    fn viewed(&mut self, reply: Reply, platform: &BareJid) -> Reply {
        let Reply::Items { node, items, page } = reply else { return reply };
        if self.plugins.is_none() {
            return Reply::Items { node, items, page };
        }
        let mut shown = Vec::with_capacity(items.len());
        for item in items {
            let sh = self.shaping(&node, &item);
            let (_, view) = self.view_of(&sh, &node, &item, platform);
            shown.extend(view.apply(&item));
        }
        Reply::Items { node, items: shown, page }
    }

    fn fan_out_item(&mut self, node: &NodeId, item: &Item, targets: &[Target]) {
        let mut sh = self.shaping(node, item);
        for t in targets {
            let sessions = self.available_sessions(&t.jid);
            let Some(subid) = &t.subid else { continue };
            let Some(live) = self.live_entry(subid, &t.jid) else { continue };
            if item.seq <= live.enqueued {
                // An older item sent again (last published item on subscribe): stamped, no cursor.
                if let Some(bytes) = self.rendered(&mut sh, node, item, &t.owner, Some(item.published_ms)) {
                    for s in &sessions {
                        let _ = s.deliver(Outbound::ToSelf { rest: bytes.clone(), ack: None });
                    }
                }
                continue;
            }
            let Some(live) = self.live.get_mut(subid) else { continue };
            if live.mode != Mode::Live {
                continue; // the replay will read it from the store
            }
            if sessions.is_empty() {
                live.mode = Mode::Offline;
                continue;
            }
            // Retained items between the cursor and this one were never handed over
            // (live state began with a stale cursor, e.g. an item released before the
            // presence was seen): replay them, and this one after them, in order.
            if item.seq > live.enqueued + 1
                && self.svc.items_between(node, live.enqueued, item.seq - 1, 1).is_ok_and(|v| !v.is_empty())
            {
                live.mode = Mode::CatchingUp;
                self.catchup.push_back(subid.clone());
                continue;
            }
            live.enqueued = item.seq;
            let cursor = live.written.clone();
            // Withheld from this subscriber: its cursor moves on with the next item it gets.
            let Some(rest) = self.rendered(&mut sh, node, item, &t.owner, None) else { continue };
            for s in &sessions {
                let ack = Ack { cursor: cursor.clone(), seq: item.seq };
                let _ = s.deliver(Outbound::ToSelf { rest: rest.clone(), ack: Some(ack) });
            }
        }
    }

    /// A session came or went: start offline delivery, or stop live delivery.
    fn presence(&mut self, session: &Arc<SessionHandle>, available: bool) {
        let subs = self.svc.subscriptions_of(session.jid.bare());
        for sub in subs {
            let reaches = match Jid::parse(&sub.jid) {
                Ok(Jid::Full(f)) => f == session.jid,
                Ok(Jid::Bare(_)) => true,
                Err(_) => false,
            };
            if !reaches {
                continue;
            }
            let online = !self.available_sessions(&sub.jid).is_empty();
            // No live state yet (first presence since start): the stored cursor may
            // be behind, so replay as for a return from offline.
            let fresh = !self.live.contains_key(&sub.subid);
            let Some(live) = self.live_entry(&sub.subid, &sub.jid) else { continue };
            if available && (live.mode == Mode::Offline || fresh) {
                live.mode = Mode::CatchingUp;
                live.enqueued = live.written.load(Ordering::Relaxed).max(sub.delivered);
                self.catchup.push_back(sub.subid.clone());
            } else if !available && !online {
                // Whatever was queued but not written is lost with the session:
                // resume after what reached the socket.
                live.mode = Mode::Offline;
                live.enqueued = live.written.load(Ordering::Relaxed);
            }
        }
        if !available {
            self.persist_cursors(true);
        } else {
            // An owner back online gets the approval requests still waiting (§8.6).
            for event in self.svc.pending_approvals(session.jid.bare()) {
                let rest = self.notification(&event, None);
                let _ = session.deliver(Outbound::ToSelf { rest, ack: None });
            }
            self.catch_up_round();
        }
    }

    /// Replays stored items to catching-up subscriptions, a batch each, without
    /// overfilling their queues (a replay must never get a reader kicked).
    fn catch_up_round(&mut self) {
        for _ in 0..self.catchup.len() {
            let Some(subid) = self.catchup.pop_front() else { break };
            let Some(sub) = self.svc.subscription(&subid).cloned() else {
                self.live.remove(&subid);
                continue;
            };
            let sessions = self.available_sessions(&sub.jid);
            let Some(live) = self.live.get_mut(&subid) else { continue };
            if live.mode != Mode::CatchingUp {
                continue;
            }
            if sessions.is_empty() {
                live.mode = Mode::Offline;
                live.enqueued = live.written.load(Ordering::Relaxed);
                continue;
            }
            let room = sessions.iter().map(|s| s.free_slots()).min().unwrap_or(0) / 2;
            let want = room.min(CATCHUP_BATCH);
            if want == 0 {
                self.catchup.push_back(subid);
                continue;
            }
            let head = self.svc.head(&sub.node);
            let after = live.enqueued;
            let items = match self.svc.items_between(&sub.node, after, head, want) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!("offline delivery for {subid}: {e}");
                    self.catchup.push_back(subid);
                    continue;
                }
            };
            let done = items.len() < want;
            for item in &items {
                let mut sh = self.shaping(&sub.node, item);
                let rest = self.rendered(&mut sh, &sub.node, item, &sub.owner, Some(item.published_ms));
                let Some(live) = self.live.get_mut(&subid) else { break };
                live.enqueued = item.seq;
                let Some(rest) = rest else { continue };
                for s in &sessions {
                    let _ = s.deliver(Outbound::ToSelf {
                        rest: rest.clone(),
                        ack: Some(Ack { cursor: live.written.clone(), seq: item.seq }),
                    });
                }
            }
            if let Some(live) = self.live.get_mut(&subid) {
                if done {
                    live.mode = Mode::Live;
                } else {
                    self.catchup.push_back(subid);
                }
            }
        }
    }

    /// Records delivery progress in the store (flushed with the next group).
    fn persist_cursors(&mut self, force_flush: bool) {
        let mut gone = Vec::new();
        let updates: Vec<(String, u64)> = self
            .live
            .iter_mut()
            .filter_map(|(id, l)| {
                let w = l.written.load(Ordering::Relaxed);
                (w > l.persisted).then(|| {
                    l.persisted = w;
                    (id.clone(), w)
                })
            })
            .collect();
        for (id, w) in updates {
            if self.svc.subscription(&id).is_none() {
                gone.push(id);
                continue;
            }
            if let Err(e) = self.svc.set_delivered(&id, w) {
                tracing::error!("saving delivery cursor: {e}");
            }
            // The periodic save rides on the next group commit or sled's own
            // flush (at most 500 ms later): forcing a flush every second put a
            // sync in the way of publishes (p99 bursts). A crash may replay a few
            // items to a subscriber; it never loses one.
            self.flush_needed |= force_flush;
        }
        for id in gone {
            self.live.remove(&id);
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("jid", &self.jid).finish()
    }
}

/// The broker's address as a bare JID.
pub fn jid(cfg_jid: &str) -> Result<BareJid, crate::jid::JidError> {
    BareJid::domain(cfg_jid)
}

#[cfg(test)]
mod tests {
    //! The broker task with real sessions' queues but no sockets: a store whose
    //! flushes the test holds or fails, and acks raised as a session would after
    //! writing. Every wait is bounded.

    use super::*;
    use crate::authz::AllowAll;
    use crate::pubsub::service::{Limits, Service};
    use crate::pubsub::store::{BrokerStoreError, Loaded, MemStore};
    use crate::session::Sessions;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    /// Flush control shared with the test.
    #[derive(Default)]
    struct Gate {
        hold: AtomicBool,
        fail: AtomicBool,
    }

    struct GatedStore {
        inner: MemStore,
        gate: Arc<Gate>,
    }

    impl BrokerStore for GatedStore {
        fn load(&self) -> Result<Loaded, BrokerStoreError> {
            self.inner.load()
        }
        fn put_node(&mut self, rec: &NodeRecord) -> Result<(), BrokerStoreError> {
            self.inner.put_node(rec)
        }
        fn delete_node(&mut self, node: &NodeId) -> Result<(), BrokerStoreError> {
            self.inner.delete_node(node)
        }
        fn put_item(&mut self, node: &NodeId, item: &Item) -> Result<(), BrokerStoreError> {
            self.inner.put_item(node, item)
        }
        fn delete_item(&mut self, node: &NodeId, seq: u64) -> Result<(), BrokerStoreError> {
            self.inner.delete_item(node, seq)
        }
        fn get_item(&self, node: &NodeId, seq: u64) -> Result<Option<Item>, BrokerStoreError> {
            self.inner.get_item(node, seq)
        }
        fn put_sub(&mut self, sub: &SubRecord) -> Result<(), BrokerStoreError> {
            self.inner.put_sub(sub)
        }
        fn delete_sub(&mut self, subid: &str) -> Result<(), BrokerStoreError> {
            self.inner.delete_sub(subid)
        }
        fn flusher(&self) -> Box<dyn Fn() -> Result<(), BrokerStoreError> + Send + Sync> {
            let gate = self.gate.clone();
            Box::new(move || {
                let until = Instant::now() + Duration::from_secs(5);
                while gate.hold.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if gate.fail.load(Ordering::SeqCst) {
                    Err(BrokerStoreError::Corrupt { tree: "test", message: "flush failed".into() })
                } else {
                    Ok(())
                }
            })
        }
    }

    fn bare(s: &str) -> BareJid {
        BareJid::parse(s).unwrap()
    }

    fn login() -> crate::authz::Context {
        crate::authz::Context { authn: "PLAIN".into(), tls_version: "TLSv1.3", source: "127.0.0.1".parse().unwrap() }
    }

    fn publish(id: &str) -> Request {
        Request::Publish {
            node: NodeId("incidents".into()),
            item_id: Some(id.into()),
            payload: Bytes::from(format!("<x xmlns='urn:test'>{id}</x>")),
            preconditions: ConfigPatch::default(),
        }
    }

    /// A service where bob@grid.test subscribed to `incidents` and then missed
    /// `missed` items (as after a restart: the broker has no live state for him).
    fn service(gate: &Arc<Gate>, missed: usize) -> Service<GatedStore> {
        let store = GatedStore { inner: MemStore::default(), gate: gate.clone() };
        let mut svc = Service::open(store, Arc::new(AllowAll), Limits::default(), AccessModel::Open).unwrap();
        let ctx = Ctx { actor: Actor::Controller, login: None, now_ms: 1_700_000_000_000 };
        let create = ConfigPatch { publish_model: Some(PublishModel::Open), ..ConfigPatch::default() };
        svc.handle(&ctx, Request::Create { node: Some(NodeId("incidents".into())), config: create }).unwrap();
        svc.handle(&ctx, Request::Subscribe { node: NodeId("incidents".into()), jid: Jid::parse("bob@grid.test").unwrap(), deliver: None })
            .unwrap();
        for i in 1..=missed {
            svc.handle(&ctx, publish(&format!("i{i}"))).unwrap();
        }
        svc
    }

    struct Fx {
        broker: Arc<Broker>,
        sessions: Arc<Sessions>,
    }

    fn start(svc: Service<GatedStore>) -> Fx {
        let sessions = Arc::new(Sessions::default());
        let broker = Broker::start(svc, sessions.clone(), "broker.grid.test".into());
        Fx { broker, sessions }
    }

    impl Fx {
        fn bind(&self, full: &str, queue: usize) -> (Arc<SessionHandle>, crate::session::Outbox) {
            let (b, r) = full.split_once('/').unwrap();
            self.sessions.bind(bare(b).with_resource(r).unwrap(), queue, login())
        }
        fn available(&self, s: &Arc<SessionHandle>) {
            s.set_presence(true, 0);
            self.broker.presence(s, true);
        }
    }

    /// What arrives within `quiet` of the previous stanza, as text; acks are
    /// raised as the session does once it has written a stanza.
    async fn drain(rx: &mut crate::session::Outbox, quiet: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(o)) = tokio::time::timeout(quiet, rx.recv()).await {
            out.push(match o {
                Outbound::Stanza(b) => String::from_utf8_lossy(&b).into_owned(),
                Outbound::ToSelf { rest, ack } => {
                    if let Some(a) = ack {
                        a.cursor.fetch_max(a.seq, Ordering::SeqCst);
                    }
                    format!("<message to='…'{}", String::from_utf8_lossy(&rest))
                }
            });
        }
        out
    }

    /// The item ids of item notifications, in order, each marked "+delay" if stamped.
    fn items(stanzas: &[String]) -> Vec<String> {
        stanzas
            .iter()
            .filter_map(|s| {
                let at = s.find("<item id='")? + "<item id='".len();
                let id = &s[at..at + s[at..].find('\'')?];
                Some(if s.contains("urn:xmpp:delay") { format!("{id}+delay") } else { id.to_string() })
            })
            .collect()
    }

    fn stanza(xml: &str) -> Element {
        crate::stream::parser::test_stanza(xml)
    }

    const QUIET: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn presence_after_a_restart_replays_what_the_subscriber_missed() {
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 3));
        let (bob, mut rx) = f.bind("bob@grid.test/r", 64);
        f.available(&bob);
        assert_eq!(items(&drain(&mut rx, QUIET).await), vec!["i1+delay", "i2+delay", "i3+delay"]);
        // Then live, unstamped.
        f.broker.internal(publish("i4")).await.unwrap();
        assert_eq!(items(&drain(&mut rx, QUIET).await), vec!["i4"]);
    }

    #[tokio::test]
    async fn an_item_fanned_out_before_the_presence_is_seen_does_not_skip_missed_items() {
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 3));
        let (bob, mut rx) = f.bind("bob@grid.test/r", 64);
        // Available, but the broker has not processed the presence yet.
        bob.set_presence(true, 0);
        f.broker.internal(publish("i4")).await.unwrap();
        let got: Vec<String> = items(&drain(&mut rx, QUIET).await).into_iter().map(|s| s.replace("+delay", "")).collect();
        assert_eq!(got, vec!["i1", "i2", "i3", "i4"]);
    }

    #[tokio::test]
    async fn catch_up_includes_accepted_items_and_sends_nothing_twice() {
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 2));
        let (bob, mut rx) = f.bind("bob@grid.test/r", 64);
        gate.hold.store(true, Ordering::SeqCst);
        let b = f.broker.clone();
        let publishing = tokio::spawn(async move { b.internal(publish("i3")).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!publishing.is_finished(), "acknowledged before the flush");
        f.available(&bob);
        // i3 is accepted, not yet durable nor acknowledged: items reach subscribers
        // before the flush (only the publisher's ack waits), so the replay has it.
        assert_eq!(items(&drain(&mut rx, QUIET).await), vec!["i1+delay", "i2+delay", "i3+delay"]);
        gate.hold.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), publishing).await.unwrap().unwrap().unwrap();
        // The flush sends nothing again.
        let got = items(&drain(&mut rx, QUIET).await);
        assert!(got.is_empty(), "{got:?}");
    }

    #[tokio::test]
    async fn a_failed_flush_answers_the_request_with_an_error_it_can_match() {
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 0));
        let (alice, mut rx) = f.bind("alice@grid.test/r", 64);
        gate.fail.store(true, Ordering::SeqCst);
        f.broker.handle(
            &alice,
            stanza(
                "<iq type='set' id='c1' from='alice@grid.test/r' to='broker.grid.test'>\
                 <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='new'/></pubsub></iq>",
            ),
        );
        let got = drain(&mut rx, QUIET).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let e = &got[0];
        for part in ["type='error'", "id='c1'", "from='broker.grid.test'", "to='alice@grid.test/r'", "<internal-server-error"] {
            assert!(e.contains(part), "{part} missing: {e}");
        }
        // The controller's own requests are told too.
        let r = f.broker.internal(publish("x")).await;
        assert!(matches!(r, Err(PubsubError::Storage(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_publish_never_overtakes_an_earlier_request_of_its_session() {
        // Creating runs on the broker thread, publishing on the caller's: the
        // publish right behind a create must still find the topic.
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 0));
        let (alice, mut rx) = f.bind("alice@grid.test/r", 1024);
        let pairs: Vec<(Element, Element)> = (0..100)
            .map(|i| {
                let create = format!(
                    "<iq type='set' id='c{i}' from='alice@grid.test/r' to='broker.grid.test'>\
                     <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='n{i}'/></pubsub></iq>"
                );
                let publish = format!(
                    "<iq type='set' id='p{i}' from='alice@grid.test/r' to='broker.grid.test'>\
                     <pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='n{i}'>\
                     <item id='x'><x xmlns='urn:test'/></item></publish></pubsub></iq>"
                );
                (stanza(&create), stanza(&publish))
            })
            .collect();
        for (create, publish) in pairs {
            f.broker.handle(&alice, create);
            f.broker.handle(&alice, publish);
        }
        let got = drain(&mut rx, QUIET).await;
        let ids: Vec<&str> = got.iter().filter_map(|s| s.split("id='").nth(1)?.split('\'').next()).collect();
        let want: Vec<String> = (0..100).flat_map(|i| [format!("c{i}"), format!("p{i}")]).collect();
        assert_eq!(ids, want);
        assert!(got.iter().all(|s| s.contains("type='result'")), "{:?}", got.iter().find(|s| !s.contains("type='result'")));
    }

    #[tokio::test]
    async fn requests_beyond_the_inbox_are_refused_but_presence_never_is() {
        let gate = Arc::new(Gate::default());
        let sessions = Arc::new(Sessions::default());
        // No threads started: nothing drains the queue.
        let shared = Shared::new(service(&gate, 0), sessions.clone(), "broker.grid.test".into(), None, Duration::ZERO).unwrap();
        let (alice, mut rx) = sessions.bind(bare("alice@grid.test").with_resource("r").unwrap(), 16, login());
        for i in 0..=INBOX {
            let get = format!(
                "<iq type='get' id='g{i}' from='alice@grid.test/r' to='broker.grid.test'>\
                 <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='incidents'/></pubsub></iq>"
            );
            shared.run(Cmd::Stanza(alice.clone(), stanza(&get)));
        }
        assert_eq!(shared.queued.load(Ordering::SeqCst), INBOX);
        let got = drain(&mut rx, QUIET).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains(&format!("id='g{INBOX}'")) && got[0].contains("type='wait'"), "{}", got[0]);
        assert!(got[0].contains("<resource-constraint") && got[0].contains("from='broker.grid.test'"), "{}", got[0]);
        shared.run(Cmd::Presence(alice.clone(), true));
        assert_eq!(shared.queued.load(Ordering::SeqCst), INBOX + 1);
    }

    #[tokio::test]
    async fn under_load_flushes_are_spaced_by_the_group_commit_interval() {
        let gate = Arc::new(Gate::default());
        let sessions = Arc::new(Sessions::default());
        let interval = Duration::from_millis(100);
        let broker = Broker::start_with(service(&gate, 0), sessions, "broker.grid.test".into(), None, interval).unwrap();
        // Idle: the first change is flushed at once.
        let t0 = Instant::now();
        broker.internal(publish("a")).await.unwrap();
        let first = t0.elapsed();
        assert!(first < interval, "{first:?}");
        // Right behind it, the next flush waits for the interval.
        broker.internal(publish("b")).await.unwrap();
        assert!(t0.elapsed() >= interval, "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn a_subscriber_that_leaves_resumes_after_what_reached_its_socket() {
        let gate = Arc::new(Gate::default());
        let f = start(service(&gate, 0));
        let (bob, mut rx) = f.bind("bob@grid.test/r", 64);
        f.available(&bob);
        f.broker.internal(publish("i1")).await.unwrap();
        assert_eq!(items(&drain(&mut rx, QUIET).await), vec!["i1"]);
        // i2 is queued but never written (acks not raised), then the session ends.
        f.broker.internal(publish("i2")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(rx);
        f.sessions.unbind(&bob);
        bob.set_presence(false, 0);
        f.broker.presence(&bob, false);
        f.broker.internal(publish("i3")).await.unwrap();
        let (bob2, mut rx2) = f.bind("bob@grid.test/r", 64);
        f.available(&bob2);
        assert_eq!(items(&drain(&mut rx2, QUIET).await), vec!["i2+delay", "i3+delay"]);
    }
}
