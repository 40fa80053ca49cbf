//! Bound sessions: full JID → outbound queue. Bind, unbind, resource conflicts,
//! and closing a session from elsewhere (revocation, shutdown, slow consumer).
//!
//! Every queue is bounded: delivering never blocks the sender, and a session
//! whose queue is full is closed with a stream error instead of growing memory.

use crate::error::{StreamCondition, StreamError};
use crate::jid::{BareJid, FullJid};
use bytes::Bytes;
use std::collections::HashMap;
use crate::authz;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::collections::VecDeque;
use tokio::sync::Notify;

/// One entry of a session's outbound queue.
#[derive(Debug)]
pub enum Outbound {
    /// A complete serialized stanza.
    Stanza(Bytes),
    /// A message serialized once for many recipients, without its start:
    /// the session writes `<message to='its own JID'` and then `rest`. So a
    /// pubsub notification is serialized once per publish, not per subscriber.
    ToSelf { rest: Bytes, ack: Option<Ack> },
}

/// Raised once the stanza carrying it has been written to the socket: offline
/// delivery resumes after the highest such `seq` (pubsub cursor).
#[derive(Debug)]
pub struct Ack {
    pub cursor: Arc<AtomicU64>,
    pub seq: u64,
}

impl From<Bytes> for Outbound {
    fn from(b: Bytes) -> Self {
        Outbound::Stanza(b)
    }
}

/// The shared half of one bound session.
pub struct SessionHandle {
    pub id: u64,
    pub jid: FullJid,
    /// How the platform logged in (for authorization decisions on its requests).
    pub context: authz::Context,
    queue: Arc<Queue>,
    close_reason: Mutex<Option<StreamError>>,
    close_signal: Notify,
    /// Sent available presence (RFC 6121 §4.2); unavailable sessions get no bare-JID messages.
    available: AtomicBool,
    priority: AtomicI32,
}

/// Why a delivery did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum DeliverError {
    /// The session is gone.
    Closed,
    /// The session's queue was full; it is being closed as too slow.
    TooSlow,
}

impl SessionHandle {
    /// Queues a stanza without waiting.
    pub fn deliver(&self, stanza: impl Into<Outbound>) -> Result<(), DeliverError> {
        if !self.queue.open.load(Ordering::Acquire) {
            return Err(DeliverError::Closed);
        }
        let mut items = self.queue.items.lock().unwrap_or_else(|p| p.into_inner());
        if items.len() >= self.queue.cap {
            drop(items);
            self.close(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "outbound queue full: the client reads too slowly",
            ));
            return Err(DeliverError::TooSlow);
        }
        items.push_back(stanza.into());
        drop(items);
        self.queue.ready.notify_one();
        Ok(())
    }

    /// Asks the session's task to end the stream with `error`. The first reason wins.
    pub fn close(&self, error: StreamError) {
        let mut r = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(error);
        }
        drop(r);
        self.close_signal.notify_one();
    }

    /// Resolves when someone called [`close`](Self::close); returns the reason.
    pub async fn closed(&self) -> StreamError {
        loop {
            if let Some(e) = self.close_reason.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return e;
            }
            self.close_signal.notified().await;
        }
    }

    /// Free places in the outbound queue (catch-up pauses instead of overflowing it).
    pub fn free_slots(&self) -> usize {
        let len = self.queue.items.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.queue.cap.saturating_sub(len)
    }

    pub fn set_presence(&self, available: bool, priority: i32) {
        self.available.store(available, Ordering::Relaxed);
        self.priority.store(priority, Ordering::Relaxed);
    }

    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    pub fn priority(&self) -> i32 {
        self.priority.load(Ordering::Relaxed)
    }
}

/// A session's bounded outbound queue. Unlike a channel it allocates nothing
/// until something is queued, and gives its memory back when drained: idle
/// sessions must stay small.
struct Queue {
    items: Mutex<VecDeque<Outbound>>,
    cap: usize,
    ready: Notify,
    /// False once the session's task dropped its [`Outbox`].
    open: AtomicBool,
}

/// The receiving end of a session's queue, owned by its connection task.
pub struct Outbox {
    queue: Arc<Queue>,
}

/// Capacity kept by a drained queue; more is given back.
const QUEUE_KEEP: usize = 16;

impl Outbox {
    /// The next queued stanza. Cancel-safe: nothing is taken until it is returned.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if let Some(o) = self.try_recv() {
                return Some(o);
            }
            self.queue.ready.notified().await;
        }
    }

    /// A queued stanza, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let mut items = self.queue.items.lock().unwrap_or_else(|p| p.into_inner());
        let o = items.pop_front();
        if items.is_empty() && items.capacity() > QUEUE_KEEP {
            *items = VecDeque::new();
        }
        o
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.queue.open.store(false, Ordering::Release);
        self.queue.items.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// All bound sessions of the controller.
#[derive(Default)]
pub struct Sessions {
    by_bare: RwLock<HashMap<BareJid, Vec<Arc<SessionHandle>>>>,
    next_id: AtomicU64,
}

impl Sessions {
    /// Binds `jid`: a session already holding that resource is closed with
    /// `<conflict/>` (RFC 6120 §7.7.2.2, the override policy). Returns the handle and
    /// the receiving end of the new session's queue of `queue` stanzas.
    pub fn bind(&self, jid: FullJid, queue: usize, context: authz::Context) -> (Arc<SessionHandle>, Outbox) {
        let queue = Arc::new(Queue { items: Mutex::new(VecDeque::new()), cap: queue, ready: Notify::new(), open: AtomicBool::new(true) });
        let rx = Outbox { queue: queue.clone() };
        let handle = Arc::new(SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            jid,
            context,
            queue,
            close_reason: Mutex::new(None),
            close_signal: Notify::new(),
            available: AtomicBool::new(false),
            priority: AtomicI32::new(0),
        });
        let mut map = self.by_bare.write().unwrap_or_else(|p| p.into_inner());
        let list = map.entry(handle.jid.bare().clone()).or_default();
        if let Some(pos) = list.iter().position(|s| s.jid.resource() == handle.jid.resource()) {
            let old = list.swap_remove(pos);
            old.close(StreamError::with_text(StreamCondition::Conflict, "replaced by a new session"));
        }
        list.push(handle.clone());
        (handle, rx)
    }

    /// Removes a session (only that exact one, not a newer one with the same JID).
    pub fn unbind(&self, handle: &SessionHandle) {
        let mut map = self.by_bare.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(handle.jid.bare()) {
            list.retain(|s| s.id != handle.id);
            if list.is_empty() {
                map.remove(handle.jid.bare());
            }
        }
    }

    /// The session bound to exactly this full JID.
    pub fn get(&self, jid: &FullJid) -> Option<Arc<SessionHandle>> {
        let map = self.by_bare.read().unwrap_or_else(|p| p.into_inner());
        map.get(jid.bare())?.iter().find(|s| s.jid.resource() == jid.resource()).cloned()
    }

    /// Every session of a platform.
    pub fn of(&self, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
        let map = self.by_bare.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare).cloned().unwrap_or_default()
    }

    /// Closes every session of a platform (revocation); returns how many.
    pub fn close_platform(&self, bare: &BareJid, error: &StreamError) -> usize {
        let list = self.of(bare);
        list.iter().for_each(|s| s.close(error.clone()));
        list.len()
    }

    /// Closes every session (shutdown).
    pub fn close_all(&self, error: &StreamError) {
        let map = self.by_bare.read().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().for_each(|s| s.close(error.clone()));
    }

    /// Number of bound sessions.
    pub fn count(&self) -> usize {
        self.by_bare.read().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> authz::Context {
        authz::Context { authn: "PLAIN".into(), tls_version: "TLSv1.3", source: "127.0.0.1".parse().unwrap() }
    }

    fn full(s: &str) -> FullJid {
        match crate::jid::Jid::parse(s).unwrap() {
            crate::jid::Jid::Full(f) => f,
            crate::jid::Jid::Bare(_) => panic!("not full"),
        }
    }

    #[tokio::test]
    async fn binding_a_taken_resource_closes_the_old_session_with_conflict() {
        let s = Sessions::default();
        let (old, _rx1) = s.bind(full("a@x/r"), 8, ctx());
        let (new, _rx2) = s.bind(full("a@x/r"), 8, ctx());
        assert_eq!(old.closed().await.condition, StreamCondition::Conflict);
        assert_eq!(s.get(&full("a@x/r")).unwrap().id, new.id);
        // Unbinding the old one must not remove the new one.
        s.unbind(&old);
        assert_eq!(s.count(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_session_as_too_slow() {
        let s = Sessions::default();
        let (h, _rx) = s.bind(full("a@x/r"), 2, ctx());
        assert!(h.deliver(Bytes::from_static(b"1")).is_ok());
        assert!(h.deliver(Bytes::from_static(b"2")).is_ok());
        assert_eq!(h.deliver(Bytes::from_static(b"3")), Err(DeliverError::TooSlow));
        assert_eq!(h.closed().await.condition, StreamCondition::PolicyViolation);
    }

    #[tokio::test]
    async fn delivering_to_an_ended_session_says_closed() {
        let s = Sessions::default();
        let (h, rx) = s.bind(full("a@x/r"), 2, ctx());
        drop(rx);
        assert_eq!(h.deliver(Bytes::from_static(b"1")), Err(DeliverError::Closed));
    }
}
