//! Durable state in sled, behind a small interface: platform accounts and
//! controller secrets (the broker's trees arrive with it).
//!
//! sled 0.34 `flush()` makes written data stable (see the notes: on Linux via
//! sync_file_range, with a periodic full sync). Every write that a caller will
//! acknowledge to a user is flushed before returning. All methods block: async
//! callers run them on the blocking pool.
//!
//! No code here uses sled's transactions or batches (`apply_batch`). In sled
//! 0.34 both take a process-wide write lock that waits for every flush in
//! progress, and the first one switches every later read and write of the
//! process to that lock, so any write can then wait a whole flush (measured:
//! publishes held up 5-12 ms behind each group commit). Multi-key writes are
//! ordered instead, relying on sled recovering a prefix of its log; the test
//! `no_code_uses_sled_transactions_or_batches` keeps it so.

use crate::sasl::Credentials;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record {key:?}: {message}")]
    Corrupt { key: String, message: String },
    #[error("the database at {0} is in use by another process (is the server running?)")]
    Locked(String),
}

/// A platform's account: how it authenticates and what it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    /// SCRAM keys; None for a certificate-only platform.
    pub credentials: Option<Credentials>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub templates: Vec<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Set by `platform revoke`: every later login fails.
    #[serde(default)]
    pub revoked: bool,
    /// Serial numbers (hex) of client certificates issued to this platform.
    #[serde(default)]
    pub cert_serials: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// The sled database of one grid.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    accounts: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked(dir.display().to_string())
            }
            sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked(dir.display().to_string()),
            e => StoreError::Db(e),
        })?;
        let accounts = db.open_tree("accounts")?;
        let meta = db.open_tree("meta")?;
        Ok(Store { db, accounts, meta })
    }

    /// The database, for the broker's own trees.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The account of a (normalised) localpart.
    pub fn account(&self, local: &str) -> Result<Option<Account>, StoreError> {
        match self.accounts.get(local.as_bytes())? {
            None => Ok(None),
            Some(v) => decode(local, &v).map(Some),
        }
    }

    /// Adds accounts that do not exist yet, durably; returns the names that
    /// already existed (left untouched).
    pub fn add_accounts(&self, accounts: &[(String, Account)]) -> Result<Vec<String>, StoreError> {
        let mut existing = Vec::new();
        for (name, acc) in accounts {
            if self.accounts.contains_key(name.as_bytes())? {
                existing.push(name.clone());
                continue;
            }
            self.accounts.insert(name.as_bytes(), encode(acc))?;
        }
        self.db.flush()?;
        Ok(existing)
    }

    /// Replaces an account record durably.
    pub fn put_account(&self, local: &str, account: &Account) -> Result<(), StoreError> {
        self.accounts.insert(local.as_bytes(), encode(account))?;
        self.db.flush()?;
        Ok(())
    }

    /// Every account, in name order.
    pub fn accounts(&self) -> impl Iterator<Item = Result<(String, Account), StoreError>> + '_ {
        self.accounts.iter().map(|r| {
            let (k, v) = r?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let acc = decode(&name, &v)?;
            Ok((name, acc))
        })
    }

    /// Serials of every revoked platform's certificates (for the CRL).
    pub fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for r in self.accounts() {
            let (_, a) = r?;
            if a.revoked {
                out.extend(a.cert_serials);
            }
        }
        Ok(out)
    }

    /// A 32-byte secret generated once per grid and kept (e.g. the SCRAM decoy key).
    pub fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let key = format!("secret:{name}");
        if let Some(v) = self.meta.get(key.as_bytes())?
            && let Ok(s) = <[u8; 32]>::try_from(v.as_ref()) {
                return Ok(s);
            }
        let mut s = [0u8; 32];
        aws_lc_rs::rand::fill(&mut s)
            .map_err(|_| StoreError::Corrupt { key: key.clone(), message: "no randomness".into() })?;
        // compare_and_swap so that two racing callers end up with the same secret.
        let _ = self.meta.compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(&s[..]))?;
        self.db.flush()?;
        match self.meta.get(key.as_bytes())? {
            Some(v) => <[u8; 32]>::try_from(v.as_ref())
                .map_err(|_| StoreError::Corrupt { key, message: "secret has the wrong length".into() }),
            None => Err(StoreError::Corrupt { key, message: "secret vanished".into() }),
        }
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn encode(a: &Account) -> Vec<u8> {
    // Serialising a plain struct of strings, numbers and byte vectors cannot fail.
    serde_json::to_vec(a).unwrap_or_default()
}

fn decode(key: &str, v: &[u8]) -> Result<Account, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt { key: key.into(), message: e.to_string() })
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("xg-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn acc() -> Account {
        Account {
            credentials: None,
            roles: vec!["publisher".into()],
            templates: vec![],
            read_only: false,
            revoked: false,
            cert_serials: vec!["0a0b".into()],
            created: 1,
        }
    }

    #[test]
    fn accounts_survive_reopen_and_existing_ones_are_not_replaced() {
        let d = tmp("reopen");
        {
            let s = Store::open(&d).unwrap();
            assert!(s.add_accounts(&[("a".into(), acc())]).unwrap().is_empty());
            let mut other = acc();
            other.read_only = true;
            assert_eq!(s.add_accounts(&[("a".into(), other)]).unwrap(), vec!["a".to_string()]);
        }
        // sled's flusher thread lets go of the files shortly after the last
        // handle is dropped; under load that can take a moment (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match Store::open(&d) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert_eq!(s.account("a").unwrap(), Some(acc()));
        assert_eq!(s.account("b").unwrap(), None);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn revoked_serials_come_from_revoked_accounts_only() {
        let d = tmp("revoked");
        let s = Store::open(&d).unwrap();
        let mut r = acc();
        r.revoked = true;
        r.cert_serials = vec!["ff".into()];
        s.add_accounts(&[("a".into(), acc()), ("b".into(), r)]).unwrap();
        assert_eq!(s.revoked_serials().unwrap(), vec!["ff".to_string()]);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn the_secret_is_stable() {
        let d = tmp("secret");
        let a = Store::open(&d).unwrap().secret("decoy").unwrap();
        let b = Store::open(&d).unwrap().secret("decoy").unwrap();
        assert_eq!(a, b);
        std::fs::remove_dir_all(&d).ok();
    }

    /// See the module doc: a sled transaction or batch anywhere in the server
    /// makes every write wait behind flushes.
    #[test]
    fn no_code_uses_sled_transactions_or_batches() {
        let banned = [[".apply_", "batch("].concat(), [".transact", "ion("].concat(), ["Transact", "ional"].concat()];
        let mut found = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        let code = line.trim_start();
                        if !code.starts_with("//") && banned.iter().any(|b| code.contains(b.as_str())) {
                            found.push(format!("{}:{}: {}", path.display(), n + 1, code));
                        }
                    }
                }
            }
        }
        assert!(found.is_empty(), "sled transactions or batches in the server:\n{}", found.join("\n"));
    }
}
