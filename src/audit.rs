//! The security audit log: logins, denials, admin actions, policy reloads,
//! alerts, revocations and rate-limit actions, append-only and hash-chained in
//! the `audit` tree of the grid's sled database. Separate from the `tracing`
//! logs, which are for operators and may be lost; this is evidence.
//!
//! # Records and the chain
//!
//! Record `n` (numbered from 1) holds its sequence number, a UTC timestamp
//! (when the event happened), a [`Kind`], a subject (a platform JID or
//! [`CONTROLLER`]), a small map of fields, the hash of record `n - 1` (32 zero
//! bytes for record 1) and its own hash
//! `SHA-256(prev_hash || canonical(record))`; [`canonical`] is a
//! length-prefixed encoding independent of JSON formatting. Records are keyed
//! `b"r" ++ seq (u64 big-endian)`; the chain head (last seq and its hash) is
//! kept under `b"h"` and written in the same atomic batch as the records, so a
//! crash leaves records and head consistent.
//!
//! [`AuditLog::verify`] walks the chain and names the first bad place: a record
//! altered (its hash no longer matches), removed (a gap), moved or swapped (key
//! and content disagree, or the link to the previous hash breaks), inserted
//! (the link breaks after it), or the newest records cut off or replaced (the
//! head disagrees with the last record).
//!
//! Appending never overwrites a record: if the head and the newest record
//! disagree (damage or tampering), the next records go after the further of
//! the two, preceded by a `chain-repair` record that states both, so a gap
//! stays visible to `verify` and a lost head stays on the record.
//!
//! # What it does not protect against
//!
//! The chain has no secret key. Whoever can write the whole database can
//! rewrite any suffix of the chain (or all of it) with fresh hashes and a
//! matching head, and `verify` will pass; they can also delete the whole tree.
//! The chain proves that records were not changed *since a head you saw*:
//! keep `audit verify`'s head (seq and hash) or a `audit tail --follow` export
//! somewhere the grid host cannot write, and compare. It does not make events
//! that were never recorded (a compromised server) visible either.
//!
//! # Appending without blocking
//!
//! [`AuditLog`] is the blocking store-level API (admin commands use it
//! directly). Async workers use an [`AuditSink`]: `record` never blocks (a
//! bounded channel to one writer task that batches appends and flushes sled on
//! the blocking pool, so records survive `kill -9` shortly after they are
//! made). When the channel is full the record is dropped and counted per kind;
//! the writer then appends an `audit-dropped` record with the counts, so the
//! fact that records were lost is itself recorded.

use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The subject of records about the controller itself.
pub const CONTROLLER: &str = "controller";

/// Name of the sled tree holding the log.
const TREE: &str = "audit";
const HEAD_KEY: &[u8] = b"h";
const RECORD_PREFIX: u8 = b'r';
/// Domain separator of the canonical encoding; change it only with a new format.
const CANONICAL_TAG: &[u8] = b"xmpp-grid-audit-v1\0";
/// At most this many fields per record, each key and value cut to `MAX_FIELD`
/// bytes: records carry peer-controlled text (reasons, addresses) and must
/// stay small.
const MAX_FIELDS: usize = 32;
const MAX_FIELD: usize = 1024;
/// Records appended (and flushed) at once by the sink's writer; the chain
/// head carries a copy of them (see [`StoredHead`]).
const MAX_BATCH: usize = 256;

/// Serialises appends within the process: appends read the head and write
/// the next records, and sled's file lock already keeps other processes out.
static APPEND: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What happened. Serialised in kebab-case (`login-ok`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    LoginOk,
    LoginFailed,
    /// An action refused by the authorizer (fields: action, topic, policies).
    Denial,
    /// An admin action: provisioning, certificates, configuration.
    Admin,
    /// Policies reloaded, or a broken set kept out (fields: result, error).
    PolicyReload,
    HoneytokenAlert,
    Revocation,
    /// A platform throttled or disabled for exceeding a rate limit.
    RateLimit,
    /// A platform disabled automatically (honeytoken, sustained abuse).
    PlatformDisabled,
    /// A payload rejected by a plugin, or a plugin failure.
    PluginRejected,
    /// A subscriber session closed because it could not keep up.
    SlowConsumer,
    /// Records the sink had to drop (fields: counts per kind).
    AuditDropped,
    /// An append found the chain head and the newest record disagreeing
    /// (tampering or damage) and carried on after the further one.
    ChainRepair,
    /// Payload plugins reloaded (fields: loaded, removed, errors).
    PluginReload,
}

/// How many kinds there are.
const KINDS: usize = 14;

impl Kind {
    /// Every kind, in declaration order (indexes the sink's drop counters).
    pub const ALL: [Kind; KINDS] = [
        Kind::LoginOk,
        Kind::LoginFailed,
        Kind::Denial,
        Kind::Admin,
        Kind::PolicyReload,
        Kind::HoneytokenAlert,
        Kind::Revocation,
        Kind::RateLimit,
        Kind::PlatformDisabled,
        Kind::PluginRejected,
        Kind::SlowConsumer,
        Kind::AuditDropped,
        Kind::ChainRepair,
        Kind::PluginReload,
    ];

    /// The kebab-case name, as in JSON and in the canonical encoding.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LoginOk => "login-ok",
            Kind::LoginFailed => "login-failed",
            Kind::Denial => "denial",
            Kind::Admin => "admin",
            Kind::PolicyReload => "policy-reload",
            Kind::HoneytokenAlert => "honeytoken-alert",
            Kind::Revocation => "revocation",
            Kind::RateLimit => "rate-limit",
            Kind::PlatformDisabled => "platform-disabled",
            Kind::PluginRejected => "plugin-rejected",
            Kind::SlowConsumer => "slow-consumer",
            Kind::AuditDropped => "audit-dropped",
            Kind::ChainRepair => "chain-repair",
            Kind::PluginReload => "plugin-reload",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Free-form details: source address, mechanism, action, topic, policy ids,
/// reason, ... Sorted, so the canonical form is unique.
pub type Fields = BTreeMap<String, String>;

/// Builds [`Fields`] from pairs, cutting them to the size limits.
pub fn fields<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Fields {
    pairs
        .into_iter()
        .take(MAX_FIELDS)
        .map(|(k, v)| (cut(k.into()), cut(v.into())))
        .collect()
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// An event before it is appended (sequence number and hashes not yet known).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Milliseconds since the Unix epoch, when the event happened.
    pub time_ms: u64,
    pub kind: Kind,
    pub subject: String,
    pub fields: Fields,
}

impl Entry {
    /// An event happening now.
    pub fn now(kind: Kind, subject: impl Into<String>, fields: Fields) -> Entry {
        Entry { time_ms: now_ms(), kind, subject: cut(subject.into()), fields }
    }
}

/// One stored record; printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// UTC, `YYYY-MM-DDThh:mm:ss.sssZ`.
    pub ts: String,
    pub kind: Kind,
    pub subject: String,
    #[serde(default)]
    pub fields: Fields,
    /// Hex SHA-256 of the previous record (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over the previous hash and [`canonical`] of this record.
    pub hash: String,
}

impl Record {
    /// The record as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // A struct of strings, numbers and a string map always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The hash this record should carry, given its previous hash.
    pub fn compute_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        chain_hash(prev, &canonical(self.seq, &self.ts, self.kind, &self.subject, &self.fields))
    }
}

/// The canonical bytes of a record: tag, seq (u64 BE), then ts, kind, subject,
/// field count (u32 BE) and each key and value, every string as u32 BE length
/// followed by its UTF-8 bytes.
pub fn canonical(seq: u64, ts: &str, kind: Kind, subject: &str, fields: &Fields) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(64 + ts.len() + subject.len());
    out.extend_from_slice(CANONICAL_TAG);
    out.extend_from_slice(&seq.to_be_bytes());
    put(&mut out, ts);
    put(&mut out, kind.as_str());
    put(&mut out, subject);
    out.extend_from_slice(&(fields.len() as u32).to_be_bytes());
    for (k, v) in fields {
        put(&mut out, k);
        put(&mut out, v);
    }
    out
}

fn chain_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev);
    ctx.update(canonical);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The last record: its sequence number and hash (seq 0 for an empty log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// The head as stored. An append writes it first, in one insert (atomic in
/// sled), with a copy of the records it adds in `batch`, and then the records.
/// sled recovers a prefix of its log, so a crash in between leaves the head
/// and a prefix of the batch; [`AuditLog::recover`] at start, or the next
/// append, writes the rest with a `chain-repair` record saying so. Appends
/// use no sled batch or transaction: those wait for every flush in progress,
/// and once used make every other write of the process wait behind them.
#[derive(Serialize, Deserialize)]
struct StoredHead {
    seq: u64,
    hash: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    batch: Vec<Record>,
}

/// The outcome of [`AuditLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Intact { records: u64, head: Head },
    /// The first bad place: a sequence number and what is wrong there.
    Broken { seq: u64, problem: String },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Intact { records, head } => {
                write!(f, "{records} records, chain intact (head: seq {}, sha256 {})", head.seq, head.hash)
            }
            Verdict::Broken { seq, problem } => write!(f, "audit chain broken at record {seq}: {problem}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database: {0}")]
    Db(#[from] sled::Error),
    #[error("audit record {seq} unreadable: {message}")]
    Corrupt { seq: u64, message: String },
    #[error("the audit writer has stopped")]
    WriterGone,
}

/// The audit log of one grid's database. Blocking; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    db: sled::Db,
    tree: sled::Tree,
}

fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RECORD_PREFIX;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_seq(k: &[u8]) -> Option<u64> {
    (k.len() == 9 && k[0] == RECORD_PREFIX).then(|| u64::from_be_bytes(k[1..].try_into().unwrap_or_default()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AuditLog {
    /// The log in `store`'s database (the tree is created on first use).
    pub fn open(store: &Store) -> Result<AuditLog, AuditError> {
        AuditLog::from_db(store.db())
    }

    /// The log in a sled database.
    pub fn from_db(db: &sled::Db) -> Result<AuditLog, AuditError> {
        Ok(AuditLog { db: db.clone(), tree: db.open_tree(TREE)? })
    }

    /// At start: writes the records of an append that a crash interrupted (see
    /// [`StoredHead`]), with a `chain-repair` record saying so, and returns it.
    /// Reading and `verify` never write: until then they show the gap.
    pub fn recover(&self) -> Result<Option<Record>, AuditError> {
        let mut recs = {
            let _guard = APPEND.lock().unwrap_or_else(|p| p.into_inner());
            let Some(note) = self.restore_from_head()? else { return Ok(None) };
            self.append_locked(vec![note])?
        };
        self.db.flush()?;
        Ok(recs.pop())
    }

    /// Writes the records of the newest append that are missing from their
    /// keys but kept in the head, and returns the `chain-repair` entry that
    /// says so. Only when a crash could have left it so: the records present
    /// end inside or just before that append. Any other gap is left for
    /// `verify` and `next_link` to report.
    fn restore_from_head(&self) -> Result<Option<Entry>, AuditError> {
        let Some(v) = self.tree.get(HEAD_KEY)? else { return Ok(None) };
        let Ok(head) = serde_json::from_slice::<StoredHead>(&v) else { return Ok(None) };
        let Some(first) = head.batch.first().map(|r| r.seq) else { return Ok(None) };
        let newest = self.newest()?.map_or(0, |(seq, _)| seq);
        if newest + 1 < first || newest >= head.seq {
            return Ok(None);
        }
        for r in head.batch.iter().filter(|r| r.seq > newest) {
            self.tree.insert(record_key(r.seq), serde_json::to_vec(r).unwrap_or_default())?;
        }
        let restored = format!("{}..{}", newest + 1, head.seq);
        tracing::warn!(%restored, "audit log: wrote records of the newest append from the chain head's copy");
        let f = fields([
            ("restored", restored),
            (
                "reason",
                "records of the newest append were missing and were written from the chain head's copy: an append interrupted by a crash, or records removed".to_string(),
            ),
        ]);
        Ok(Some(Entry::now(Kind::ChainRepair, CONTROLLER, f)))
    }

    /// The newest record's seq and hash, if any (an unreadable one gives a zero hash).
    fn newest(&self) -> Result<Option<(u64, [u8; 32])>, AuditError> {
        let Some(kv) = self.tree.scan_prefix([RECORD_PREFIX]).next_back() else { return Ok(None) };
        let (k, v) = kv?;
        let seq = key_seq(&k).unwrap_or(0);
        let hash = serde_json::from_slice::<Record>(&v).ok().and_then(|r| unhex32(&r.hash)).unwrap_or([0; 32]);
        Ok(Some((seq, hash)))
    }

    /// The chain head as stored (seq 0 and zero hash for an empty log).
    pub fn head(&self) -> Result<Head, AuditError> {
        match self.tree.get(HEAD_KEY)? {
            None => Ok(Head { seq: 0, hash: hex(&[0u8; 32]) }),
            Some(v) => serde_json::from_slice(&v).map_err(|e| AuditError::Corrupt { seq: 0, message: format!("chain head: {e}") }),
        }
    }

    /// Appends one event now and makes it durable; returns the record.
    pub fn append(&self, kind: Kind, subject: impl Into<String>, fields: Fields) -> Result<Record, AuditError> {
        let mut recs = self.append_batch(vec![Entry::now(kind, subject, fields)])?;
        recs.pop().ok_or(AuditError::WriterGone)
    }

    /// Appends entries in order (head first, see [`StoredHead`]), flushes, and
    /// returns the records as stored.
    pub fn append_batch(&self, entries: Vec<Entry>) -> Result<Vec<Record>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let records = {
            let _guard = APPEND.lock().unwrap_or_else(|p| p.into_inner());
            let note = self.restore_from_head()?;
            self.append_locked(note.into_iter().chain(entries).collect())?
        };
        // Outside the lock: concurrent appenders share sled's group flush.
        self.db.flush()?;
        Ok(records)
    }

    /// Writes `entries` after the chain's end, head first; the caller holds `APPEND`.
    fn append_locked(&self, entries: Vec<Entry>) -> Result<Vec<Record>, AuditError> {
        let (mut seq, mut prev, repair) = self.next_link()?;
        let mut records = Vec::with_capacity(entries.len() + 1);
        for e in repair.into_iter().chain(entries) {
            seq += 1;
            let ts = crate::pubsub::protocol::xep0082(e.time_ms, true);
            let mut r = Record { seq, ts, kind: e.kind, subject: e.subject, fields: e.fields, prev: hex(&prev), hash: String::new() };
            let h = r.compute_hash(&prev);
            r.hash = hex(&h);
            prev = h;
            records.push(r);
        }
        let head = StoredHead { seq, hash: hex(&prev), batch: records };
        self.tree.insert(HEAD_KEY, serde_json::to_vec(&head).unwrap_or_default())?;
        for r in &head.batch {
            self.tree.insert(record_key(r.seq), serde_json::to_vec(r).unwrap_or_default())?;
        }
        Ok(head.batch)
    }

    /// Where the next record goes: the last seq and hash to chain from, and a
    /// `chain-repair` entry when the head and the newest record disagree.
    /// Appending never overwrites a record and never hides a gap: it goes
    /// after whichever of the two is further, so `verify` still reports
    /// truncated records, and the repair record keeps the fact in the chain.
    fn next_link(&self) -> Result<(u64, [u8; 32], Option<Entry>), AuditError> {
        let head = self.tree.get(HEAD_KEY)?.map(|v| serde_json::from_slice::<Head>(&v).ok().and_then(|h| Some((h.seq, unhex32(&h.hash)?))));
        let last = self.newest()?;
        let (seq, prev) = match (head, last) {
            (None, None) => return Ok((0, [0; 32], None)),
            (Some(Some(h)), Some(l)) if h == l => return Ok((h.0, h.1, None)),
            (Some(Some(h)), Some(l)) if h.0 > l.0 => h,
            (Some(Some(h)), None) => h,
            (_, Some(l)) => l,
            (Some(None), None) => (0, [0; 32]),
        };
        let show = |x: Option<(u64, [u8; 32])>| x.map_or("none".to_string(), |(s, h)| format!("{s}:{}", hex(&h)));
        let f = fields([
            ("head", head.map_or("missing".to_string(), |h| h.map_or("unreadable".to_string(), |h| show(Some(h))))),
            ("newest_record", show(last)),
            ("reason", "the chain head did not match the newest record; appending after the further one".to_string()),
        ]);
        tracing::error!(head = %f["head"], newest = %f["newest_record"], "audit log: chain head and newest record disagree");
        Ok((seq, prev, Some(Entry::now(Kind::ChainRepair, CONTROLLER, f))))
    }

    /// The newest `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<Record>, AuditError> {
        let mut out = Vec::with_capacity(n.min(1024));
        for kv in self.tree.scan_prefix([RECORD_PREFIX]).rev().take(n) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        out.reverse();
        Ok(out)
    }

    /// At most `max` records with sequence numbers `>= seq`, oldest first.
    pub fn since(&self, seq: u64, max: usize) -> Result<Vec<Record>, AuditError> {
        let mut out = Vec::new();
        for kv in self.tree.range(record_key(seq)..=record_key(u64::MAX)).take(max) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Walks the whole chain; names the first bad record. `Err` only when the
    /// database cannot be read.
    pub fn verify(&self) -> Result<Verdict, AuditError> {
        let broken = |seq: u64, problem: String| Ok(Verdict::Broken { seq, problem });
        let mut expected = 1u64;
        let mut prev = [0u8; 32];
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if k.as_ref() == HEAD_KEY {
                continue;
            }
            let Some(seq) = key_seq(&k) else {
                return broken(expected, format!("unexpected key {} in the audit tree", hex(&k)));
            };
            if seq > expected {
                let what = if seq == expected + 1 { format!("record {expected} is") } else { format!("records {expected}..{} are", seq - 1) };
                return broken(expected, format!("{what} missing (removed); the next record present is {seq}"));
            }
            let rec = match serde_json::from_slice::<Record>(&v) {
                Ok(r) => r,
                Err(e) => return broken(seq, format!("unreadable ({e})")),
            };
            if rec.seq != seq {
                return broken(seq, format!("the record stored here says it is record {} (moved, swapped or reordered)", rec.seq));
            }
            if unhex32(&rec.prev) != Some(prev) {
                return broken(
                    seq,
                    format!(
                        "its previous-hash link does not match record {}: a record before it was altered, inserted, removed or reordered",
                        seq - 1
                    ),
                );
            }
            let h = rec.compute_hash(&prev);
            if unhex32(&rec.hash) != Some(h) {
                return broken(seq, "its content does not match its hash (altered)".into());
            }
            prev = h;
            expected += 1;
        }
        let last = expected - 1;
        let head = match self.tree.get(HEAD_KEY)? {
            Some(v) => match serde_json::from_slice::<Head>(&v) {
                Ok(h) => h,
                Err(e) => return broken(last, format!("the chain head is unreadable ({e})")),
            },
            None if last == 0 => Head { seq: 0, hash: hex(&[0u8; 32]) },
            None => return broken(last, "the chain head is missing (removed)".into()),
        };
        if head.seq > last {
            let what = if head.seq == last + 1 {
                format!("record {} is", last + 1)
            } else {
                format!("records {}..{} are", last + 1, head.seq)
            };
            return broken(last + 1, format!("{what} missing: the chain head says the log ends at {} (truncated)", head.seq));
        }
        if head.seq < last {
            return broken(head.seq + 1, format!("records after the chain head (seq {}) were added outside the log", head.seq));
        }
        if unhex32(&head.hash) != Some(prev) {
            return broken(last, "the newest record does not match the chain head's hash (replaced)".into());
        }
        Ok(Verdict::Intact { records: last, head })
    }
}

fn decode(k: &[u8], v: &[u8]) -> Result<Record, AuditError> {
    let seq = key_seq(k).unwrap_or(0);
    serde_json::from_slice(v).map_err(|e| AuditError::Corrupt { seq, message: e.to_string() })
}

enum Msg {
    Entry(Entry),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Default capacity of the sink's channel (records waiting for the writer).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The non-blocking front of the audit log for async code. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    /// Records dropped since the writer last reported, per [`Kind::index`].
    dropped: Arc<[AtomicU64; KINDS]>,
}

impl AuditSink {
    /// Starts the writer task on the current Tokio runtime; `capacity` bounds
    /// the records waiting for it.
    pub fn spawn(log: AuditLog, capacity: usize) -> AuditSink {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped: Arc<[AtomicU64; KINDS]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        tokio::spawn(writer(log, rx, dropped.clone()));
        AuditSink { tx, dropped }
    }

    /// Queues an event stamped now. Never blocks or awaits: if the writer is
    /// behind, the event is counted as dropped and an `audit-dropped` record
    /// reports the count later.
    pub fn record(&self, kind: Kind, subject: impl Into<String>, fields: Fields) {
        if let Err(e) = self.tx.try_send(Msg::Entry(Entry::now(kind, subject, fields))) {
            self.dropped[kind.index()].fetch_add(1, Ordering::Relaxed);
            if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                tracing::error!(%kind, "audit writer stopped; record lost");
            }
        }
    }

    /// Waits until every event recorded before this call (and the report of
    /// any dropped ones) is appended and durable. For shutdown and tests.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Flush(tx)).await.map_err(|_| AuditError::WriterGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AuditError::Corrupt { seq: 0, message }),
            Err(_) => Err(AuditError::WriterGone),
        }
    }
}

/// Takes the drop counts, as an `audit-dropped` entry if any.
fn dropped_entry(dropped: &[AtomicU64; KINDS]) -> Option<Entry> {
    let mut total = 0u64;
    let mut f = Fields::new();
    for (k, c) in Kind::ALL.iter().zip(dropped.iter()) {
        let n = c.swap(0, Ordering::Relaxed);
        if n > 0 {
            total += n;
            f.insert(k.as_str().to_string(), n.to_string());
        }
    }
    (total > 0).then(|| {
        f.insert("dropped".into(), total.to_string());
        f.insert("reason".into(), "audit queue full or write failed".into());
        Entry::now(Kind::AuditDropped, CONTROLLER, f)
    })
}

/// The single writer: waits for an event, takes whatever else is queued (up
/// to `MAX_BATCH`), appends it as one batch and flushes on the blocking pool.
/// Events arriving meanwhile form the next batch (group commit).
/// How long the writer waits for more records before one append and flush.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

async fn writer(log: AuditLog, mut rx: mpsc::Receiver<Msg>, dropped: Arc<[AtomicU64; KINDS]>) {
    let mut closed = false;
    while !closed {
        let mut entries = Vec::new();
        let mut waiters = Vec::new();
        match rx.recv().await {
            Some(Msg::Entry(e)) => {
                entries.push(e);
                // Group commit: gather what arrives within a few milliseconds into
                // one append and one flush (a login rate of thousands per second
                // must not mean thousands of flushes).
                tokio::time::sleep(COALESCE).await;
            }
            Some(Msg::Flush(w)) => waiters.push(w),
            None => closed = true,
        }
        while entries.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Entry(e)) => entries.push(e),
                Ok(Msg::Flush(w)) => {
                    waiters.push(w);
                    // Later events are not covered by this flush: stop here.
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Drops happen while the queue is full, i.e. after what was queued:
        // report them after this batch.
        if let Some(d) = dropped_entry(&dropped) {
            entries.push(d);
        }
        let result = if entries.is_empty() {
            Ok(())
        } else {
            let kinds: Vec<Kind> = entries.iter().map(|e| e.kind).collect();
            let l = log.clone();
            let r = match tokio::task::spawn_blocking(move || l.append_batch(entries)).await {
                Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(format!("audit writer task: {e}")),
            };
            if let Err(e) = &r {
                tracing::error!("audit append failed: {e}; {} record(s) lost", kinds.len());
                for k in kinds {
                    dropped[k.index()].fetch_add(1, Ordering::Relaxed);
                }
            }
            r
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "xg-audit-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A log with `n` records (subjects p1..pn) in a fresh store.
    fn log_with(name: &str, n: u64) -> (std::path::PathBuf, Store, AuditLog) {
        let d = tmp(name);
        let store = Store::open(&d).unwrap();
        let log = AuditLog::open(&store).unwrap();
        for i in 1..=n {
            let kind = if i % 2 == 0 { Kind::LoginFailed } else { Kind::LoginOk };
            let r = log
                .append(kind, format!("p{i}@grid.test"), fields([("source", "192.0.2.7:5000"), ("mechanism", "SCRAM-SHA-256")]))
                .unwrap();
            assert_eq!(r.seq, i);
        }
        (d, store, log)
    }

    fn raw(log: &AuditLog, seq: u64) -> Record {
        serde_json::from_slice(&log.tree.get(record_key(seq)).unwrap().unwrap()).unwrap()
    }

    fn put(log: &AuditLog, key_seq: u64, r: &Record) {
        log.tree.insert(record_key(key_seq), serde_json::to_vec(r).unwrap()).unwrap();
    }

    fn broken_at(log: &AuditLog) -> (u64, String) {
        match log.verify().unwrap() {
            Verdict::Broken { seq, problem } => (seq, problem),
            v => panic!("expected a broken chain, got {v}"),
        }
    }

    #[test]
    fn an_appended_log_verifies_and_its_head_is_the_last_record() {
        let (d, _s, log) = log_with("ok", 5);
        match log.verify().unwrap() {
            Verdict::Intact { records, head } => {
                assert_eq!(records, 5);
                assert_eq!(head, Head { seq: 5, hash: raw(&log, 5).hash });
            }
            v => panic!("{v}"),
        }
        assert_eq!(raw(&log, 1).prev, hex(&[0u8; 32]));
        assert_eq!(raw(&log, 2).prev, raw(&log, 1).hash);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn an_empty_log_is_intact() {
        let d = tmp("empty");
        let log = AuditLog::open(&Store::open(&d).unwrap()).unwrap();
        assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 0, .. }));
        assert!(log.tail(3).unwrap().is_empty());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn records_print_as_json_lines_with_kebab_case_kinds() {
        let (d, _s, log) = log_with("json", 1);
        let line = log.tail(1).unwrap()[0].to_json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["kind"], "login-ok");
        assert_eq!(v["subject"], "p1@grid.test");
        assert_eq!(v["fields"]["mechanism"], "SCRAM-SHA-256");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn an_altered_field_is_found() {
        let (d, _s, log) = log_with("alter", 5);
        let mut r = raw(&log, 3);
        r.fields.insert("source".into(), "203.0.113.9:1".into());
        put(&log, 3, &r);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 3);
        assert!(problem.contains("altered"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn an_altered_and_rehashed_record_breaks_the_next_link() {
        let (d, _s, log) = log_with("rehash", 5);
        let mut r = raw(&log, 3);
        r.kind = Kind::LoginOk;
        r.subject = "innocent@grid.test".into();
        r.hash = hex(&r.compute_hash(&unhex32(&r.prev).unwrap()));
        put(&log, 3, &r);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("record 3"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_record_removed_in_the_middle_is_found() {
        let (d, _s, log) = log_with("remove", 5);
        log.tree.remove(record_key(2)).unwrap();
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 2);
        assert!(problem.contains("missing"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn truncation_of_the_newest_records_is_found() {
        let (d, _s, log) = log_with("truncate", 5);
        log.tree.remove(record_key(5)).unwrap();
        log.tree.remove(record_key(4)).unwrap();
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("truncated") && problem.contains("4..5"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_removed_head_is_found() {
        let (d, _s, log) = log_with("nohead", 3);
        log.tree.remove(HEAD_KEY).unwrap();
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 3);
        assert!(problem.contains("head is missing"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn appending_after_truncation_keeps_the_gap_visible() {
        let (d, _s, log) = log_with("trunc-append", 5);
        log.tree.remove(record_key(5)).unwrap();
        log.tree.remove(record_key(4)).unwrap();
        let r = log.append(Kind::Admin, CONTROLLER, Fields::new()).unwrap();
        assert_eq!(r.seq, 7, "after a repair record at 6");
        assert_eq!(raw(&log, 6).kind, Kind::ChainRepair);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("4..5") && problem.contains("missing"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn appending_after_a_removed_head_overwrites_nothing_and_says_so() {
        let (d, _s, log) = log_with("nohead-append", 3);
        let third = raw(&log, 3);
        log.tree.remove(HEAD_KEY).unwrap();
        log.append(Kind::Admin, CONTROLLER, Fields::new()).unwrap();
        assert_eq!(raw(&log, 3), third);
        let repair = raw(&log, 4);
        assert_eq!(repair.kind, Kind::ChainRepair);
        assert_eq!(repair.fields["head"], "missing");
        assert_eq!(repair.fields["newest_record"], format!("3:{}", third.hash));
        assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 5, .. }));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn two_swapped_records_are_found() {
        let (d, _s, log) = log_with("swap", 5);
        let (a, b) = (raw(&log, 2), raw(&log, 4));
        put(&log, 2, &b);
        put(&log, 4, &a);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 2);
        assert!(problem.contains("record 4"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn two_swapped_and_renumbered_records_are_found() {
        let (d, _s, log) = log_with("swap2", 5);
        let (mut a, mut b) = (raw(&log, 2), raw(&log, 4));
        (a.seq, b.seq) = (4, 2);
        put(&log, 2, &b);
        put(&log, 4, &a);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 2);
        assert!(problem.contains("link"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn an_inserted_record_is_found() {
        // A forged, correctly chained record 3; the old 3..5 shifted to 4..6
        // and the head moved, as a careful attacker without a rewrite would.
        let (d, _s, log) = log_with("insert", 5);
        for seq in (3..=5).rev() {
            let mut r = raw(&log, seq);
            r.seq = seq + 1;
            put(&log, seq + 1, &r);
        }
        let prev = raw(&log, 2).hash;
        let mut forged = Record {
            seq: 3,
            ts: raw(&log, 2).ts,
            kind: Kind::LoginOk,
            subject: "forged@grid.test".into(),
            fields: Fields::new(),
            prev: prev.clone(),
            hash: String::new(),
        };
        forged.hash = hex(&forged.compute_hash(&unhex32(&prev).unwrap()));
        put(&log, 3, &forged);
        let last = raw(&log, 6);
        log.tree.insert(HEAD_KEY, serde_json::to_vec(&Head { seq: 6, hash: last.hash }).unwrap()).unwrap();
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("record 3"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_record_appended_outside_the_log_is_found() {
        let (d, _s, log) = log_with("append", 3);
        let last = raw(&log, 3);
        let mut extra = Record { seq: 4, prev: last.hash.clone(), hash: String::new(), ..last };
        extra.hash = hex(&extra.compute_hash(&unhex32(&extra.prev).unwrap()));
        put(&log, 4, &extra);
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("outside"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn records_survive_reopen_and_the_chain_continues() {
        let (d, store, log) = log_with("reopen", 3);
        drop((log, store));
        let store = Store::open(&d).unwrap();
        let log = AuditLog::open(&store).unwrap();
        assert_eq!(log.tail(10).unwrap().len(), 3);
        assert_eq!(log.append(Kind::Admin, CONTROLLER, Fields::new()).unwrap().seq, 4);
        assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 4, .. }));
        std::fs::remove_dir_all(&d).ok();
    }

    /// What a crash between an append's head and its records leaves (sled
    /// recovers a prefix of its log): the head and a prefix of the batch.
    #[test]
    fn recovery_completes_an_append_a_crash_interrupted_and_nothing_else() {
        for kept in 0..3u64 {
            let (d, store, log) = log_with(&format!("interrupted{kept}"), 2);
            let entries = (0..3).map(|i| Entry::now(Kind::Admin, CONTROLLER, fields([("n", i.to_string())]))).collect();
            let batch = log.append_batch(entries).unwrap();
            for r in &batch[kept as usize..] {
                log.tree.remove(record_key(r.seq)).unwrap();
            }
            let log = AuditLog::from_db(store.db()).unwrap();
            let (seq, problem) = broken_at(&log);
            assert_eq!(seq, 3 + kept, "until recovered, the gap shows: {problem}");
            let note = log.recover().unwrap().unwrap();
            assert_eq!((note.seq, note.kind), (6, Kind::ChainRepair));
            assert_eq!(note.fields["restored"], format!("{}..5", 3 + kept));
            for r in &batch {
                assert_eq!(&raw(&log, r.seq), r, "kept {kept}");
            }
            assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 6, .. }), "kept {kept}");
            assert!(log.recover().unwrap().is_none());
            assert_eq!(log.append(Kind::Admin, CONTROLLER, Fields::new()).unwrap().seq, 7);
            std::fs::remove_dir_all(&d).ok();
        }
        // Without a restart, the next append writes them too.
        let (d, _store, log) = log_with("interrupted-append", 2);
        let batch = log.append_batch(vec![Entry::now(Kind::Admin, CONTROLLER, Fields::new())]).unwrap();
        log.tree.remove(record_key(3)).unwrap();
        let r = log.append(Kind::Admin, CONTROLLER, Fields::new()).unwrap();
        assert_eq!(raw(&log, 3), batch[0]);
        assert_eq!((raw(&log, 4).kind, r.seq), (Kind::ChainRepair, 5));
        assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 5, .. }));
        std::fs::remove_dir_all(&d).ok();
        // Records missing before the newest append's are a truncation, not a crash.
        let (d, store, log) = log_with("interrupted-trunc", 5);
        log.tree.remove(record_key(5)).unwrap();
        log.tree.remove(record_key(4)).unwrap();
        let log = AuditLog::from_db(store.db()).unwrap();
        assert!(log.recover().unwrap().is_none());
        assert!(log.tree.get(record_key(5)).unwrap().is_none());
        let (seq, problem) = broken_at(&log);
        assert_eq!(seq, 4);
        assert!(problem.contains("truncated") && problem.contains("4..5"), "{problem}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn tail_and_since_return_records_in_order() {
        let (d, _s, log) = log_with("tail", 6);
        let seqs = |v: Vec<Record>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(log.tail(2).unwrap()), vec![5, 6]);
        assert_eq!(seqs(log.tail(100).unwrap()), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs(log.since(4, 100).unwrap()), vec![4, 5, 6]);
        assert_eq!(seqs(log.since(2, 2).unwrap()), vec![2, 3]);
        assert!(log.since(7, 100).unwrap().is_empty());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn fields_are_cut_to_size() {
        let f = fields((0..100).map(|i| (format!("k{i:03}"), "é".repeat(2000))));
        assert_eq!(f.len(), MAX_FIELDS);
        assert!(f.values().all(|v| v.len() <= MAX_FIELD + '…'.len_utf8()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sink_under_load_gives_a_contiguous_intact_chain() {
        let d = tmp("load");
        let store = Store::open(&d).unwrap();
        let log = AuditLog::open(&store).unwrap();
        let sink = AuditSink::spawn(log.clone(), 16_384);
        let tasks: Vec<_> = (0..50)
            .map(|t| {
                let sink = sink.clone();
                tokio::spawn(async move {
                    for i in 0..200 {
                        sink.record(Kind::Denial, format!("p{t}@grid.test"), fields([("n", i.to_string())]));
                        if i % 16 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        sink.flush().await.unwrap();
        assert_eq!(log.verify().unwrap(), Verdict::Intact { records: 10_000, head: log.head().unwrap() });
        let all = log.since(1, usize::MAX).unwrap();
        assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1 && r.kind == Kind::Denial));
        // Each task's records keep their order.
        let mut last = std::collections::HashMap::new();
        for r in &all {
            let n: i64 = r.fields["n"].parse().unwrap();
            let prev = last.insert(r.subject.clone(), n).unwrap_or(-1);
            assert_eq!(n, prev + 1);
        }
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn records_dropped_on_a_full_queue_are_reported() {
        let d = tmp("drops");
        let store = Store::open(&d).unwrap();
        let log = AuditLog::open(&store).unwrap();
        let sink = AuditSink::spawn(log.clone(), 8);
        // The writer cannot run until this task awaits: the queue fills.
        for i in 0..100 {
            let kind = if i < 90 { Kind::LoginFailed } else { Kind::RateLimit };
            sink.record(kind, "p@grid.test", Fields::new());
        }
        sink.flush().await.unwrap();
        let all = log.since(1, 1000).unwrap();
        assert_eq!(all.len(), 9, "8 queued and one report");
        let report = &all[8];
        assert_eq!(report.kind, Kind::AuditDropped);
        assert_eq!(report.subject, CONTROLLER);
        assert_eq!(report.fields["dropped"], "92");
        assert_eq!(report.fields["login-failed"], "82");
        assert_eq!(report.fields["rate-limit"], "10");
        // Counted once: later records bring no second report.
        sink.record(Kind::LoginOk, "p@grid.test", Fields::new());
        sink.flush().await.unwrap();
        let all = log.since(1, 1000).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[9].kind, Kind::LoginOk);
        assert!(matches!(log.verify().unwrap(), Verdict::Intact { records: 10, .. }));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(crate::pubsub::protocol::xep0082(1_700_000_000_123, true), "2023-11-14T22:13:20.123Z");
    }
}
