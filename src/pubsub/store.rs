//! Where the broker's state lives: the [`BrokerStore`] seam, its sled
//! implementation and an in-memory one for tests.
//!
//! Writes are buffered; [`BrokerStore::flush`] makes everything written so far
//! durable, and the broker calls it (group commit) before acknowledging any
//! change. Items are kept in two trees: the payloads, and a small index
//! (id, time) that is all the broker loads at start.

use super::model::{Item, NodeId, NodeRecord, SubRecord};
use crate::jid::BareJid;
use bytes::Bytes;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum BrokerStoreError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record in {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
}

/// An item without its payload: what the broker keeps in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemMeta {
    pub seq: u64,
    pub id: String,
    pub publisher: BareJid,
    pub published_ms: u64,
}

/// Everything the broker loads at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub nodes: Vec<NodeRecord>,
    pub subs: Vec<SubRecord>,
    /// Per node, in seq order.
    pub items: BTreeMap<NodeId, Vec<ItemMeta>>,
}

/// The broker's persistence. Blocking; called from the broker task only.
pub trait BrokerStore: Send {
    fn load(&self) -> Result<Loaded, BrokerStoreError>;
    fn put_node(&mut self, rec: &NodeRecord) -> Result<(), BrokerStoreError>;
    fn delete_node(&mut self, node: &NodeId) -> Result<(), BrokerStoreError>;
    fn put_item(&mut self, node: &NodeId, item: &Item) -> Result<(), BrokerStoreError>;
    fn delete_item(&mut self, node: &NodeId, seq: u64) -> Result<(), BrokerStoreError>;
    fn get_item(&self, node: &NodeId, seq: u64) -> Result<Option<Item>, BrokerStoreError>;
    fn put_sub(&mut self, sub: &SubRecord) -> Result<(), BrokerStoreError>;
    fn delete_sub(&mut self, subid: &str) -> Result<(), BrokerStoreError>;
    /// A handle that makes all writes so far durable; run it off the async workers.
    fn flusher(&self) -> Box<dyn Fn() -> Result<(), BrokerStoreError> + Send + Sync>;
}

/// Key of an item: node, NUL, big-endian seq (sorts in publish order).
fn item_key(node: &NodeId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(node.0.len() + 9);
    k.extend_from_slice(node.0.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn node_prefix(node: &NodeId) -> Vec<u8> {
    let mut k = node.0.as_bytes().to_vec();
    k.push(0);
    k
}

/// Index value: published_ms (8) | id_len (2) | id | publisher.
fn encode_meta(item: &Item) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + item.id.len() + 32);
    v.extend_from_slice(&item.published_ms.to_be_bytes());
    v.extend_from_slice(&(item.id.len() as u16).to_be_bytes());
    v.extend_from_slice(item.id.as_bytes());
    v.extend_from_slice(item.publisher.to_string().as_bytes());
    v
}

fn decode_meta(seq: u64, v: &[u8]) -> Option<ItemMeta> {
    let ms = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let len = u16::from_be_bytes(v.get(8..10)?.try_into().ok()?) as usize;
    let id = std::str::from_utf8(v.get(10..10 + len)?).ok()?.to_string();
    let publisher = BareJid::parse(std::str::from_utf8(v.get(10 + len..)?).ok()?).ok()?;
    Some(ItemMeta { seq, id, publisher, published_ms: ms })
}

fn split_item_key(k: &[u8]) -> Option<(NodeId, u64)> {
    let cut = k.len().checked_sub(9)?;
    if k[cut] != 0 {
        return None;
    }
    let node = std::str::from_utf8(&k[..cut]).ok()?.to_string();
    let seq = u64::from_be_bytes(k[cut + 1..].try_into().ok()?);
    Some((NodeId(node), seq))
}

/// The broker's trees in the grid's sled database.
pub struct SledStore {
    db: sled::Db,
    nodes: sled::Tree,
    items: sled::Tree,
    index: sled::Tree,
    subs: sled::Tree,
}

impl SledStore {
    pub fn new(db: &sled::Db) -> Result<Self, BrokerStoreError> {
        Ok(SledStore {
            db: db.clone(),
            nodes: db.open_tree("pubsub.nodes")?,
            items: db.open_tree("pubsub.items")?,
            index: db.open_tree("pubsub.index")?,
            subs: db.open_tree("pubsub.subs")?,
        })
    }
}

fn corrupt(tree: &'static str, e: impl std::fmt::Display) -> BrokerStoreError {
    BrokerStoreError::Corrupt { tree, message: e.to_string() }
}

impl BrokerStore for SledStore {
    fn load(&self) -> Result<Loaded, BrokerStoreError> {
        let mut out = Loaded::default();
        for r in self.nodes.iter() {
            let (_, v) = r?;
            out.nodes.push(serde_json::from_slice(&v).map_err(|e| corrupt("pubsub.nodes", e))?);
        }
        for r in self.subs.iter() {
            let (_, v) = r?;
            out.subs.push(serde_json::from_slice(&v).map_err(|e| corrupt("pubsub.subs", e))?);
        }
        for r in self.index.iter() {
            let (k, v) = r?;
            let (node, seq) = split_item_key(&k).ok_or_else(|| corrupt("pubsub.index", "bad key"))?;
            let meta = decode_meta(seq, &v).ok_or_else(|| corrupt("pubsub.index", "bad value"))?;
            out.items.entry(node).or_default().push(meta);
        }
        Ok(out)
    }

    fn put_node(&mut self, rec: &NodeRecord) -> Result<(), BrokerStoreError> {
        let v = serde_json::to_vec(rec).map_err(|e| corrupt("pubsub.nodes", e))?;
        self.nodes.insert(rec.id.0.as_bytes(), v)?;
        Ok(())
    }

    fn delete_node(&mut self, node: &NodeId) -> Result<(), BrokerStoreError> {
        self.nodes.remove(node.0.as_bytes())?;
        // Index before payloads, as in `delete_item`.
        let prefix = node_prefix(node);
        for tree in [&self.index, &self.items] {
            for k in tree.scan_prefix(&prefix).keys() {
                tree.remove(k?)?;
            }
        }
        Ok(())
    }

    fn put_item(&mut self, node: &NodeId, item: &Item) -> Result<(), BrokerStoreError> {
        // Payload, then index: sled recovers a prefix of its log, so a crash
        // never leaves an index entry without its payload (a payload without
        // an index entry is never loaded, and is overwritten or removed with
        // its node). No sled transaction or batch (see `crate::store`).
        let k = item_key(node, item.seq);
        self.items.insert(k.as_slice(), item.payload.as_ref())?;
        self.index.insert(k.as_slice(), encode_meta(item))?;
        Ok(())
    }

    fn delete_item(&mut self, node: &NodeId, seq: u64) -> Result<(), BrokerStoreError> {
        let k = item_key(node, seq);
        self.index.remove(&k)?;
        self.items.remove(&k)?;
        Ok(())
    }

    fn get_item(&self, node: &NodeId, seq: u64) -> Result<Option<Item>, BrokerStoreError> {
        let k = item_key(node, seq);
        let (Some(meta), Some(payload)) = (self.index.get(&k)?, self.items.get(&k)?) else {
            return Ok(None);
        };
        let m = decode_meta(seq, &meta).ok_or_else(|| corrupt("pubsub.index", "bad value"))?;
        Ok(Some(Item {
            id: m.id,
            seq,
            publisher: m.publisher,
            published_ms: m.published_ms,
            payload: Bytes::copy_from_slice(&payload),
        }))
    }

    fn put_sub(&mut self, sub: &SubRecord) -> Result<(), BrokerStoreError> {
        let v = serde_json::to_vec(sub).map_err(|e| corrupt("pubsub.subs", e))?;
        self.subs.insert(sub.subid.as_bytes(), v)?;
        Ok(())
    }

    fn delete_sub(&mut self, subid: &str) -> Result<(), BrokerStoreError> {
        self.subs.remove(subid.as_bytes())?;
        Ok(())
    }

    fn flusher(&self) -> Box<dyn Fn() -> Result<(), BrokerStoreError> + Send + Sync> {
        let db = self.db.clone();
        Box::new(move || {
            db.flush()?;
            Ok(())
        })
    }
}

/// An in-memory store for unit tests and benchmarks; `flush` does nothing.
#[derive(Default)]
pub struct MemStore {
    nodes: BTreeMap<NodeId, NodeRecord>,
    items: BTreeMap<(NodeId, u64), Item>,
    subs: BTreeMap<String, SubRecord>,
}

impl BrokerStore for MemStore {
    fn load(&self) -> Result<Loaded, BrokerStoreError> {
        let mut out = Loaded {
            nodes: self.nodes.values().cloned().collect(),
            subs: self.subs.values().cloned().collect(),
            items: BTreeMap::new(),
        };
        for ((node, seq), it) in &self.items {
            out.items.entry(node.clone()).or_default().push(ItemMeta {
                seq: *seq,
                id: it.id.clone(),
                publisher: it.publisher.clone(),
                published_ms: it.published_ms,
            });
        }
        Ok(out)
    }
    fn put_node(&mut self, rec: &NodeRecord) -> Result<(), BrokerStoreError> {
        self.nodes.insert(rec.id.clone(), rec.clone());
        Ok(())
    }
    fn delete_node(&mut self, node: &NodeId) -> Result<(), BrokerStoreError> {
        self.nodes.remove(node);
        self.items.retain(|(n, _), _| n != node);
        Ok(())
    }
    fn put_item(&mut self, node: &NodeId, item: &Item) -> Result<(), BrokerStoreError> {
        self.items.insert((node.clone(), item.seq), item.clone());
        Ok(())
    }
    fn delete_item(&mut self, node: &NodeId, seq: u64) -> Result<(), BrokerStoreError> {
        self.items.remove(&(node.clone(), seq));
        Ok(())
    }
    fn get_item(&self, node: &NodeId, seq: u64) -> Result<Option<Item>, BrokerStoreError> {
        Ok(self.items.get(&(node.clone(), seq)).cloned())
    }
    fn put_sub(&mut self, sub: &SubRecord) -> Result<(), BrokerStoreError> {
        self.subs.insert(sub.subid.clone(), sub.clone());
        Ok(())
    }
    fn delete_sub(&mut self, subid: &str) -> Result<(), BrokerStoreError> {
        self.subs.remove(subid);
        Ok(())
    }
    fn flusher(&self) -> Box<dyn Fn() -> Result<(), BrokerStoreError> + Send + Sync> {
        Box::new(|| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, id: &str) -> Item {
        Item {
            id: id.into(),
            seq,
            publisher: BareJid::new("ids", "grid.test").unwrap(),
            published_ms: 1_700_000_000_000 + seq,
            payload: Bytes::from(format!("<x xmlns='urn:t'>{seq}</x>")),
        }
    }

    #[test]
    fn sled_items_nodes_and_subs_survive_reopen_in_order() {
        let dir = std::env::temp_dir().join(format!("xg-bstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = NodeId("incidents".into());
        {
            let db = sled::open(&dir).unwrap();
            let mut s = SledStore::new(&db).unwrap();
            // Seqs past 255 check the big-endian ordering.
            for seq in [1u64, 2, 300, 70_000] {
                s.put_item(&node, &item(seq, &format!("i{seq}"))).unwrap();
            }
            s.delete_item(&node, 2).unwrap();
            s.put_item(&NodeId("incidents2".into()), &item(1, "other")).unwrap();
            (s.flusher())().unwrap();
        }
        let db = sled::open(&dir).unwrap();
        let s = SledStore::new(&db).unwrap();
        let l = s.load().unwrap();
        let seqs: Vec<u64> = l.items[&node].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 300, 70_000]);
        assert_eq!(l.items[&NodeId("incidents2".into())].len(), 1);
        assert_eq!(s.get_item(&node, 300).unwrap().unwrap(), item(300, "i300"));
        assert!(s.get_item(&node, 2).unwrap().is_none());
        drop(s);
        drop(db);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn deleting_a_node_removes_only_its_items() {
        let dir = std::env::temp_dir().join(format!("xg-bstore2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = sled::open(&dir).unwrap();
        let mut s = SledStore::new(&db).unwrap();
        let (a, b) = (NodeId("a".into()), NodeId("a\u{1}".into()));
        s.put_item(&a, &item(1, "x")).unwrap();
        s.put_item(&b, &item(1, "y")).unwrap();
        s.delete_node(&a).unwrap();
        let l = s.load().unwrap();
        assert!(!l.items.contains_key(&a));
        assert_eq!(l.items[&b].len(), 1);
        drop(s);
        drop(db);
        std::fs::remove_dir_all(&dir).ok();
    }
}
