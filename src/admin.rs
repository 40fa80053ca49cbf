//! Provisioning and revocation of platforms, whether or not the server runs.
//!
//! A running server owns the sled database, so CLI commands reach it through a
//! Unix socket in the data directory (mode 0600: whoever can read the data
//! directory is the admin). With no server running, the CLI opens the store
//! itself. Both paths run the same [`apply`]; only a live server also ends
//! sessions and reloads TLS. Expensive work (PBKDF2) is done by the CLI before
//! the request is sent, so the server only stores.

use crate::audit::{self, AuditError, AuditLog, Kind, Record, Verdict};
use crate::config::Config;
use crate::error::{StreamCondition, StreamError};
use crate::jid::{normalize_local, BareJid};
use crate::ns;
use crate::server::Grid;
use crate::store::{Account, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// One admin operation.
#[derive(Debug, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Adds new platforms (names normalised, credentials already derived).
    AddPlatforms { platforms: Vec<(String, Account)> },
    /// Records a client certificate issued to a platform.
    RecordCert { name: String, serial_hex: String },
    /// Disables a platform: every later login fails, its certificates are
    /// revoked, its live sessions end now.
    Revoke { name: String },
    List,
    /// One platform's facts, as `List` shows them (for `policy explain`).
    Platform { name: String },
    /// The newest `n` audit records.
    AuditTail { n: usize },
    /// Audit records from sequence number `seq` on (a bounded page).
    AuditSince { seq: u64 },
    /// Walks the audit chain.
    AuditVerify,
}

/// A platform as `platform list` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlatformInfo {
    pub name: String,
    pub roles: Vec<String>,
    pub templates: Vec<String>,
    pub read_only: bool,
    pub revoked: bool,
    pub password: bool,
    pub certificates: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminResponse {
    Added { added: usize, existing: Vec<String> },
    Recorded,
    Revoked { sessions_closed: usize, certificates: usize },
    List { platforms: Vec<PlatformInfo> },
    AuditRecords { records: Vec<Record> },
    AuditVerdict { verdict: Verdict },
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("admin socket: {0}")]
    Socket(std::io::Error),
    #[error("admin socket: bad answer: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Audit(#[from] AuditError),
}

/// Most audit records one `AuditSince` answer carries (keeps socket lines small).
pub const AUDIT_PAGE: usize = 1000;

/// Largest request line accepted on the socket (an import batch).
const MAX_REQUEST: u64 = 256 << 20;

/// Carries out a request against `store`. With `live`, the running server also
/// reloads its TLS configuration and ends revoked sessions. Provisioning,
/// certificates and revocations append durable audit records. Blocking.
pub fn apply(cfg: &Config, store: &Store, live: Option<&Grid>, req: AdminRequest) -> AdminResponse {
    match apply_inner(cfg, store, live, req) {
        Ok(r) => r,
        Err(e) => AdminResponse::Error { message: e.to_string() },
    }
}

fn apply_inner(cfg: &Config, store: &Store, live: Option<&Grid>, req: AdminRequest) -> Result<AdminResponse, AdminError> {
    // Admin actions are audit events; `via` tells how the admin reached the store.
    let via = if live.is_some() { "admin-socket" } else { "local-store" };
    let jid = |name: &str| format!("{name}@{}", cfg.domain);
    match req {
        AdminRequest::AddPlatforms { platforms } => {
            let mut checked = Vec::with_capacity(platforms.len());
            for (name, acc) in platforms {
                let n = normalize_local(&name).map_err(|e| AdminError::Refused(format!("platform name {name:?}: {e}")))?;
                checked.push((n, acc));
            }
            let existing = store.add_accounts(&checked)?;
            let skip: std::collections::HashSet<&String> = existing.iter().collect();
            let added = checked.iter().filter(|(n, _)| !skip.contains(n)).map(|(n, a)| {
                let auth = if a.credentials.is_some() { "password" } else { "certificate" };
                let f = audit::fields([
                    ("action", "platform-add".to_string()),
                    ("roles", a.roles.join(";")),
                    ("templates", a.templates.join(";")),
                    ("read_only", a.read_only.to_string()),
                    ("auth", auth.to_string()),
                    ("via", via.to_string()),
                ]);
                audit::Entry::now(Kind::Admin, jid(n), f)
            });
            AuditLog::open(store)?.append_batch(added.collect())?;
            if let Some(grid) = live {
                grid.platforms_changed(checked.iter().filter(|(n, _)| !skip.contains(n)).map(|(n, a)| (n.as_str(), a)));
            }
            Ok(AdminResponse::Added { added: checked.len() - existing.len(), existing })
        }
        AdminRequest::RecordCert { name, serial_hex } => {
            let mut acc = account(store, &name)?;
            if acc.revoked {
                return Err(AdminError::Refused(format!("platform {name} is revoked")));
            }
            acc.cert_serials.push(serial_hex.clone());
            store.put_account(&name, &acc)?;
            let f = audit::fields([("action", "platform-cert"), ("serial", &serial_hex), ("via", via)]);
            AuditLog::open(store)?.append(Kind::Admin, jid(&name), f)?;
            Ok(AdminResponse::Recorded)
        }
        AdminRequest::Revoke { name } => {
            let mut acc = account(store, &name)?;
            acc.revoked = true;
            store.put_account(&name, &acc)?;
            let certificates = acc.cert_serials.len();
            let ended = end_sessions(cfg, store, live, &name);
            let mut f = audit::fields([("certificates", certificates.to_string()), ("via", via.to_string())]);
            match &ended {
                Ok(n) => f.insert("sessions_closed".into(), n.to_string()),
                Err(e) => f.insert("error".into(), e.to_string()),
            };
            AuditLog::open(store)?.append(Kind::Revocation, jid(&name), f)?;
            let sessions_closed = ended?;
            tracing::info!(platform = %name, sessions_closed, "platform revoked");
            Ok(AdminResponse::Revoked { sessions_closed, certificates })
        }
        AdminRequest::Platform { name } => {
            let a = account(store, &name)?;
            let name = normalize_local(&name).unwrap_or(name);
            Ok(AdminResponse::List { platforms: vec![platform_info(name, a)] })
        }
        AdminRequest::List => {
            let mut platforms = Vec::new();
            for r in store.accounts() {
                let (name, a) = r?;
                platforms.push(platform_info(name, a));
            }
            Ok(AdminResponse::List { platforms })
        }
        AdminRequest::AuditTail { n } => Ok(AdminResponse::AuditRecords { records: AuditLog::open(store)?.tail(n)? }),
        AdminRequest::AuditSince { seq } => {
            Ok(AdminResponse::AuditRecords { records: AuditLog::open(store)?.since(seq, AUDIT_PAGE)? })
        }
        AdminRequest::AuditVerify => Ok(AdminResponse::AuditVerdict { verdict: AuditLog::open(store)?.verify()? }),
    }
}

/// After a revocation: a live server reloads TLS (new CRL) and ends the
/// platform's sessions; offline, the CRL file is rewritten. Returns the
/// number of sessions ended.
fn end_sessions(cfg: &Config, store: &Store, live: Option<&Grid>, name: &str) -> Result<usize, AdminError> {
    Ok(match live {
        Some(grid) => {
            if let Ok(Some(acc)) = store.account(name) {
                // Policies see the platform revoked; its subscriptions end.
                grid.platforms_changed(std::iter::once((name, &acc)));
            }
            grid.reload_tls().map_err(|e| AdminError::Refused(e.to_string()))?;
            let jid = BareJid::new(name, &cfg.domain).map_err(|e| AdminError::Refused(e.to_string()))?;
            grid.router
                .sessions()
                .close_platform(&jid, &StreamError::with_text(StreamCondition::PolicyViolation, "platform revoked"))
        }
        None => {
            crate::pki::write_crl(&cfg.tls_dir(), &store.revoked_serials()?, 30)
                .map_err(|e| AdminError::Refused(e.to_string()))?;
            0
        }
    })
}

fn platform_info(name: String, a: Account) -> PlatformInfo {
    PlatformInfo {
        name,
        roles: a.roles,
        templates: a.templates,
        read_only: a.read_only,
        revoked: a.revoked,
        password: a.credentials.is_some(),
        certificates: a.cert_serials.len(),
    }
}

fn account(store: &Store, name: &str) -> Result<Account, AdminError> {
    let n = normalize_local(name).map_err(|e| AdminError::Refused(format!("platform name {name:?}: {e}")))?;
    store.account(&n)?.ok_or_else(|| AdminError::Refused(format!("no platform named {name}")))
}

/// Serves the admin socket until shutdown.
pub async fn serve_socket(grid: Arc<Grid>, _done: mpsc::Sender<()>) {
    let path = grid.cfg.admin_socket();
    let _ = std::fs::remove_file(&path); // a stale socket of a previous run (we hold the db lock)
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin socket {}: {e}; admin commands need the server stopped", path.display());
            return;
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let mut shutdown = grid.shutdown.subscribe();
    loop {
        let (sock, _) = tokio::select! {
            a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let grid = grid.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = tokio::io::BufReader::new(r.take(MAX_REQUEST));
            let mut line = String::new();
            while matches!(lines.read_line(&mut line).await, Ok(n) if n > 0) {
                let resp = match serde_json::from_str::<AdminRequest>(&line) {
                    Ok(req) => {
                        let g = grid.clone();
                        tokio::task::spawn_blocking(move || apply(&g.cfg, &g.store, Some(&g), req))
                            .await
                            .unwrap_or(AdminResponse::Error { message: "admin task failed".into() })
                    }
                    Err(e) => AdminResponse::Error { message: format!("bad request: {e}") },
                };
                line.clear();
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// How the CLI reaches the grid's state.
pub enum Admin {
    Server(BufReader<std::os::unix::net::UnixStream>),
    Local(Store),
}

impl Admin {
    /// Connects to the running server, or opens the store when none runs.
    pub fn connect(cfg: &Config) -> Result<Admin, AdminError> {
        match std::os::unix::net::UnixStream::connect(cfg.admin_socket()) {
            Ok(s) => Ok(Admin::Server(BufReader::new(s))),
            Err(_) => Ok(Admin::Local(Store::open(&cfg.db_dir())?)),
        }
    }

    /// Sends one request and returns the answer; an `Error` answer becomes `Err`.
    pub fn call(&mut self, cfg: &Config, req: AdminRequest) -> Result<AdminResponse, AdminError> {
        let resp = match self {
            Admin::Local(store) => apply(cfg, store, None, req),
            Admin::Server(s) => {
                let mut line = serde_json::to_vec(&req).map_err(|e| AdminError::Protocol(e.to_string()))?;
                line.push(b'\n');
                s.get_mut().write_all(&line).map_err(AdminError::Socket)?;
                let mut answer = String::new();
                s.read_line(&mut answer).map_err(AdminError::Socket)?;
                serde_json::from_str(&answer).map_err(|e| AdminError::Protocol(e.to_string()))?
            }
        };
        match resp {
            AdminResponse::Error { message } => Err(AdminError::Refused(message)),
            r => Ok(r),
        }
    }
}

/// XEP-0133 service administration over XEP-0050 ad-hoc commands: today
/// `disable-user`, the revocation of platforms in one step. Only what the
/// policies allow as `admin` (shipped: the admin role, certificate login only).
pub struct Commands {
    grid: std::sync::Weak<Grid>,
}

/// The XEP-0133 node of "Disable a User".
pub const DISABLE_USER: &str = "http://jabber.org/protocol/admin#disable-user";

impl Commands {
    pub fn new(grid: &Arc<Grid>) -> Arc<Commands> {
        Arc::new(Commands { grid: Arc::downgrade(grid) })
    }
}

impl crate::router::Commands for Commands {
    fn execute(&self, session: &Arc<crate::session::SessionHandle>, iq: crate::xml::Element) {
        use crate::error::StanzaError;
        use crate::xml::Element;
        let Some(grid) = self.grid.upgrade() else { return };
        let Some(cmd) = iq.child("command", ns::COMMANDS).cloned() else { return };
        let fail = |e: StanzaError| {
            if let Some(mut r) = e.reply_to(&iq) {
                r.set_attr("from", grid.domain.to_string());
                let _ = session.deliver(bytes::Bytes::from(r.to_bytes(ns::CLIENT)));
            }
        };
        let decision = grid.authz.authorize(&crate::authz::Request {
            principal: session.jid.bare(),
            action: crate::authz::Action::Admin,
            topic: None,
            context: &session.context,
        });
        if !decision.allowed {
            return fail(StanzaError::new("forbidden"));
        }
        if cmd.attr("node") != Some(DISABLE_USER) {
            return fail(StanzaError::new("item-not-found").text("unknown command"));
        }
        let reply = CommandReply {
            from: grid.domain.to_string(),
            to: session.jid.to_string(),
            id: iq.attr("id").map(str::to_string),
            sessionid: cmd.attr("sessionid").map(str::to_string).unwrap_or_else(crate::pubsub::service::random_id),
        };
        if cmd.attr("action") == Some("cancel") {
            let _ = session.deliver(reply.render("canceled", Vec::new()));
            return;
        }
        let Some(form) = cmd.child("x", ns::DATA).filter(|x| x.attr("type") == Some("submit")) else {
            // Stage one: the form (XEP-0133 §4.3).
            let actions = Element::new("actions", ns::COMMANDS)
                .with_attr("execute", "complete")
                .with_child(Element::new("complete", ns::COMMANDS));
            let x = Element::new("x", ns::DATA)
                .with_attr("type", "form")
                .with_child(Element::new("title", ns::DATA).with_text("Disabling a platform"))
                .with_child(
                    Element::new("field", ns::DATA)
                        .with_attr("type", "hidden")
                        .with_attr("var", "FORM_TYPE")
                        .with_child(Element::new("value", ns::DATA).with_text(ns::ADMIN)),
                )
                .with_child(
                    Element::new("field", ns::DATA)
                        .with_attr("type", "jid-multi")
                        .with_attr("var", "accountjids")
                        .with_attr("label", "The platforms to disable")
                        .with_child(Element::new("required", ns::DATA)),
                );
            let _ = session.deliver(reply.render("executing", vec![actions, x]));
            return;
        };
        let jids: Vec<String> = form
            .elements()
            .filter(|f| f.attr("var") == Some("accountjids"))
            .flat_map(|f| f.elements().filter(|v| v.name == "value").map(|v| v.text()))
            .collect();
        let mut names = Vec::new();
        for j in &jids {
            match BareJid::parse(j.trim()) {
                Ok(b) if b.domain_part() == grid.domain.domain_part() && b.local().is_some() => {
                    names.push(b.local().unwrap_or_default().to_string())
                }
                _ => return fail(StanzaError::new("bad-request").text(format!("not a platform of this grid: {j}"))),
            }
        }
        if names.is_empty() {
            return fail(StanzaError::new("bad-request").text("accountjids is required"));
        }
        let session = session.clone();
        tokio::spawn(async move {
            let g = grid.clone();
            let done = tokio::task::spawn_blocking(move || {
                names.into_iter().map(|n| (n.clone(), apply(&g.cfg, &g.store, Some(&g), AdminRequest::Revoke { name: n }))).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let failed: Vec<String> = done
                .iter()
                .filter_map(|(n, r)| match r {
                    AdminResponse::Error { message } => Some(format!("{n}: {message}")),
                    _ => None,
                })
                .collect();
            grid.audit.record(
                Kind::Admin,
                session.jid.bare().to_string(),
                audit::fields([("action", "xep-0133 disable-user".to_string()), ("platforms", jids.join(","))]),
            );
            let (kind, text) = if failed.is_empty() {
                ("info", format!("Disabled {} platform(s); their sessions have ended.", done.len()))
            } else {
                ("error", format!("Not all disabled: {}", failed.join("; ")))
            };
            let note = Element::new("note", ns::COMMANDS).with_attr("type", kind).with_text(text);
            let _ = session.deliver(reply.render("completed", vec![note]));
        });
    }
}

/// The addressing of one command's replies.
struct CommandReply {
    from: String,
    to: String,
    id: Option<String>,
    sessionid: String,
}

impl CommandReply {
    fn render(&self, status: &str, children: Vec<crate::xml::Element>) -> bytes::Bytes {
        use crate::xml::Element;
        let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "result").with_attr("from", &self.from);
        r.set_attr("to", &self.to);
        if let Some(id) = &self.id {
            r.set_attr("id", id);
        }
        let mut c = Element::new("command", ns::COMMANDS)
            .with_attr("node", DISABLE_USER)
            .with_attr("sessionid", &self.sessionid)
            .with_attr("status", status);
        for ch in children {
            c.push(ch);
        }
        r.push(c);
        bytes::Bytes::from(r.to_bytes(ns::CLIENT))
    }
}
