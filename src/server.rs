//! The running controller: shared state ([`Grid`]), listeners, connection
//! permits, and graceful shutdown (every stream closed with `system-shutdown`).
//!
//! Accept loops only accept: TLS handshakes and everything else run in the
//! connection's own task (STYLE §4).

use crate::authz::cedar::{self, CedarAuthorizer};
use crate::authz::entities::PlatformFacts;
use crate::authz::Authorize;
use crate::config::Config;
use crate::jid::{normalize_local, BareJid};
use crate::limits::{AuthThrottle, ConnectionCounter};
use crate::router::Router;
use crate::sasl::{AccountAuth, AccountLookup};
use crate::session::Sessions;
use crate::store::{Store, StoreError};
use crate::pubsub::broker::Broker;
use crate::pubsub::service::Service;
use crate::pubsub::store::SledStore;
use crate::{pki, tls};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("broker: {0}")]
    Broker(String),
    #[error("policies: {0}")]
    Policies(String),
}

/// The TLS configurations in force; replaced whole after a revocation.
pub struct TlsState {
    pub starttls: Arc<rustls::ServerConfig>,
    pub direct: Arc<rustls::ServerConfig>,
    /// Our leaf certificate, for tls-server-end-point channel binding.
    pub server_cert_der: Vec<u8>,
}

/// Everything the connections of one controller share.
pub struct Grid {
    pub cfg: Config,
    pub domain: BareJid,
    pub store: Store,
    pub router: Arc<Router>,
    /// Every decision goes through this (Cedar, audited).
    pub authz: Arc<dyn Authorize>,
    /// The Cedar engine itself, for reloads and platform changes.
    pub cedar: Arc<CedarAuthorizer>,
    /// Honeytoken alerts waiting for the alert task (taken by `start`).
    alerts: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::alerts::Alert>>>,
    /// Keeps the policies directory watched while the grid lives.
    watcher: std::sync::Mutex<Option<cedar::Watcher>>,
    /// Payload validators and transformers (built-in and from `plugins.dir`).
    pub plugins: Arc<crate::plugins::Host>,
    /// Keeps the plugins directory watched while the grid lives.
    plugin_watcher: std::sync::Mutex<Option<crate::plugins::Watcher>>,
    pub throttle: AuthThrottle,
    /// Key for the SCRAM decoy answers to unknown users.
    pub decoy_secret: [u8; 32],
    tls: RwLock<Arc<TlsState>>,
    pub conns: Arc<ConnectionCounter>,
    /// Per-platform rate limits, shared by each platform's sessions.
    pub rates: crate::limits::PlatformRates,
    /// The security audit log (logins, denials, revocations, alerts, rate limits).
    pub audit: crate::audit::AuditSink,
    pub shutdown: watch::Sender<bool>,
    /// The broker's state, loaded by `open`, handed to its task by `start`.
    broker_service: std::sync::Mutex<Option<Service<SledStore>>>,
    /// The running broker (for the controller's own requests).
    pub broker: std::sync::OnceLock<Arc<Broker>>,
}

/// Statistics of the default CRL lifetime: re-signed at every start and revocation.
const CRL_DAYS: u32 = 30;

impl Grid {
    /// Prepares a controller from its config: certificates (generated on first
    /// run), the database, TLS. Blocking: call before serving or on the blocking pool.
    pub fn open(cfg: Config) -> Result<Arc<Grid>, ServerError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|source| ServerError::Io { what: format!("create {}", cfg.data_dir.display()), source })?;
        let domain = BareJid::domain(&cfg.domain).map_err(|e| ServerError::Io {
            what: "domain".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let broker = BareJid::domain(&cfg.broker_jid()).map_err(|e| ServerError::Io {
            what: "broker.jid".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        pki::ensure_ca_and_server(&cfg.tls_dir(), &cfg.domain, &[cfg.broker_jid()])?;
        let store = Store::open(&cfg.db_dir())?;
        let decoy_secret = store.secret("scram-decoy")?;
        let audit_log = crate::audit::AuditLog::open(&store).map_err(|e| ServerError::Broker(format!("audit log: {e}")))?;
        audit_log.recover().map_err(|e| ServerError::Broker(format!("audit log: {e}")))?;
        pki::write_crl(&cfg.tls_dir(), &store.revoked_serials()?, CRL_DAYS)?;
        let tls = build_tls(&cfg)?;
        let sessions = Arc::new(Sessions::default());
        let router = Arc::new(Router::new(domain.clone(), sessions, vec![(broker, "XMPP-Grid Broker".into())]));
        let throttle = AuthThrottle::new(
            cfg.auth.failures_before_delay,
            Duration::from_millis(cfg.auth.max_failure_delay_ms),
            Duration::from_secs(cfg.auth.failure_window_secs),
        );
        let (shutdown, _) = watch::channel(false);
        // First start: the shipped policies; later the operator's own files.
        cedar::install_defaults(&cfg.policies.dir)
            .map_err(|source| ServerError::Io { what: format!("install policies in {}", cfg.policies.dir.display()), source })?;
        let mut platforms = Vec::new();
        for r in store.accounts() {
            let (name, a) = r?;
            platforms.push(PlatformFacts::from_account(&name, &a));
        }
        let cedar = Arc::new(CedarAuthorizer::load(&cfg.policies.dir, platforms).map_err(|e| ServerError::Policies(e.to_string()))?);
        let audit = crate::audit::AuditSink::spawn(audit_log, crate::audit::DEFAULT_CAPACITY);
        let (alerts_tx, alerts_rx) = tokio::sync::mpsc::channel(1024);
        let decider: Arc<dyn Authorize> = if cfg.policies.enforce {
            cedar.clone()
        } else {
            tracing::warn!("policies.enforce = false: every authenticated platform may do anything XEP-0060 allows");
            Arc::new(crate::authz::AllowAll)
        };
        let authz: Arc<dyn Authorize> =
            Arc::new(crate::alerts::Audited { inner: decider, audit: audit.clone(), alerts: alerts_tx });
        let plugins = open_plugins(&cfg)?;
        let bstore = SledStore::new(store.db()).map_err(|e| ServerError::Broker(e.to_string()))?;
        let service = Service::open(bstore, authz.clone(), cfg.broker.limits(), cfg.broker.access_model())
            .map_err(|e| ServerError::Broker(e.to_string()))?;
        Ok(Arc::new(Grid {
            broker_service: std::sync::Mutex::new(Some(service)),
            broker: std::sync::OnceLock::new(),
            conns: ConnectionCounter::new(cfg.limits.max_connections_per_ip),
            rates: Default::default(),
            audit,
            cedar,
            alerts: std::sync::Mutex::new(Some(alerts_rx)),
            watcher: std::sync::Mutex::new(None),
            plugins,
            plugin_watcher: std::sync::Mutex::new(None),
            cfg,
            domain,
            store,
            router,
            authz,
            throttle,
            decoy_secret,
            tls: RwLock::new(Arc::new(tls)),
            shutdown,
        }))
    }

    /// The TLS configurations for new connections.
    pub fn tls(&self) -> Arc<TlsState> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-signs the CRL from the store and rebuilds TLS with fresh session caches,
    /// so that neither a new handshake nor a resumed session admits a revoked
    /// certificate (network-stack notes, pitfall 6). Blocking.
    pub fn reload_tls(&self) -> Result<(), ServerError> {
        pki::write_crl(&self.cfg.tls_dir(), &self.store.revoked_serials()?, CRL_DAYS)?;
        let t = build_tls(&self.cfg)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
        Ok(())
    }

    /// Platforms were added or changed (revoked): the policies learn their new
    /// facts and live subscriptions are checked again.
    pub fn platforms_changed<'a>(&self, changed: impl Iterator<Item = (&'a str, &'a crate::store::Account)>) {
        self.cedar.update_platforms(changed.map(|(n, a)| PlatformFacts::from_account(n, a)).collect());
        if let Some(b) = self.broker.get() {
            b.recheck();
        }
    }

    /// The account of a localpart if it may log in (exists and is not revoked).
    pub fn lookup_account(&self, local: &str) -> Option<AccountAuth> {
        let local = normalize_local(local).ok()?;
        match self.store.account(&local) {
            Ok(Some(a)) if !a.revoked => Some(AccountAuth { localpart: local, credentials: a.credentials }),
            Ok(_) => None,
            Err(e) => {
                tracing::error!("account lookup for {local}: {e}");
                None
            }
        }
    }
}

impl AccountLookup for Grid {
    fn lookup(&self, localpart: &str) -> Option<AccountAuth> {
        self.lookup_account(localpart)
    }
}

fn build_tls(cfg: &Config) -> Result<TlsState, ServerError> {
    let dir = cfg.tls_dir();
    let mut client_ca = vec![dir.join("ca.pem")];
    client_ca.extend(cfg.tls.client_ca.iter().cloned());
    let mut crl = vec![dir.join("crl.pem")];
    crl.extend(cfg.tls.crl.iter().cloned());
    let settings = tls::TlsSettings {
        cert_chain_pem: cfg.tls.cert.clone().unwrap_or_else(|| dir.join("server.pem")),
        key_pem: cfg.tls.key.clone().unwrap_or_else(|| dir.join("server.key")),
        client_ca_pems: client_ca,
        crl_pems: crl,
    };
    let starttls = tls::server_tls(&settings, &[])?;
    Ok(TlsState {
        direct: tls::server_config(&settings, &[tls::ALPN_XMPP_CLIENT])?,
        server_cert_der: starttls.leaf_der.to_vec(),
        starttls: starttls.config,
    })
}

/// A controller that is serving.
pub struct Running {
    pub grid: Arc<Grid>,
    pub starttls_addr: Option<SocketAddr>,
    pub direct_tls_addr: Option<SocketAddr>,
    done: mpsc::Receiver<()>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens the listeners and starts serving.
pub async fn start(grid: Arc<Grid>) -> Result<Running, ServerError> {
    let service = grid.broker_service.lock().unwrap_or_else(|p| p.into_inner()).take();
    let service = service.ok_or_else(|| ServerError::Broker("already started".into()))?;
    let broker_jid = grid.cfg.broker_jid();
    let plugins = crate::pubsub::broker::Plugins {
        host: grid.plugins.clone(),
        env: Arc::new(PluginEnvironment {
            store: grid.store.clone(),
            cedar: grid.cedar.clone(),
            enforce: grid.cfg.policies.enforce,
            audit: grid.audit.clone(),
        }),
        threads: grid.cfg.plugins.threads,
        queue: grid.cfg.plugins.queue,
        max_payload_bytes: grid.cfg.broker.max_payload_bytes,
    };
    let commit = std::time::Duration::from_millis(grid.cfg.broker.group_commit_ms);
    let broker = Broker::start_with(service, grid.router.sessions().clone(), broker_jid.clone(), Some(plugins), commit)
        .map_err(|source| ServerError::Io { what: "start the broker".into(), source })?;
    let jid = BareJid::domain(&broker_jid).map_err(|e| ServerError::Broker(e.to_string()))?;
    grid.router.register(jid, broker.clone());
    let _ = grid.broker.set(broker.clone());
    grid.router.set_commands(crate::admin::Commands::new(&grid));
    start_policy_watch(&grid, broker.clone());
    start_plugin_watch(&grid);
    let alerts = grid.alerts.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(rx) = alerts {
        tokio::spawn(alert_task(grid.clone(), broker, rx));
    }
    let (done_tx, done) = mpsc::channel::<()>(1);
    let permits = Arc::new(Semaphore::new(grid.cfg.limits.max_connections));
    let mut accept_tasks = Vec::new();
    let mut addrs = [None, None];
    for (i, (addr, direct)) in [(&grid.cfg.listen.starttls, false), (&grid.cfg.listen.direct_tls, true)]
        .into_iter()
        .enumerate()
    {
        if addr.is_empty() {
            continue;
        }
        let listener = TcpListener::bind(addr.as_str())
            .await
            .map_err(|source| ServerError::Io { what: format!("listen on {addr}"), source })?;
        addrs[i] = listener.local_addr().ok();
        accept_tasks.push(tokio::spawn(accept_loop(grid.clone(), listener, direct, permits.clone(), done_tx.clone())));
    }
    accept_tasks.push(tokio::spawn(crate::admin::serve_socket(grid.clone(), done_tx.clone())));
    Ok(Running { grid, starttls_addr: addrs[0], direct_tls_addr: addrs[1], done, accept_tasks })
}

/// Hot reload: policy files are watched; a new set is validated and swapped
/// whole, a broken one keeps the last good set; both are audited.
fn start_policy_watch(grid: &Arc<Grid>, broker: Arc<Broker>) {
    let audit = grid.audit.clone();
    let watched = cedar::watch(&grid.cfg.policies.dir, grid.cedar.clone(), move |outcome| match outcome {
        Ok(report) => {
            tracing::info!("policies reloaded: {report:?}");
            audit.record(crate::audit::Kind::PolicyReload, crate::audit::CONTROLLER, crate::audit::fields([("result", "ok")]));
            broker.recheck();
        }
        Err(e) => {
            tracing::error!("policies not reloaded, the previous set stays in force:\n{e}");
            audit.record(
                crate::audit::Kind::PolicyReload,
                crate::audit::CONTROLLER,
                crate::audit::fields([("result", "rejected".to_string()), ("errors", e.to_string())]),
            );
        }
    });
    match watched {
        Ok(w) => *grid.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
        Err(e) => tracing::error!("cannot watch {}: {e}; policy changes need a restart", grid.cfg.policies.dir.display()),
    }
}

/// The plugin host with the built-in plugins and those of `plugins.dir`
/// (compiled once, cached under `DATA_DIR/plugin-cache`). Blocking.
fn open_plugins(cfg: &Config) -> Result<Arc<crate::plugins::Host>, ServerError> {
    // The directory is watched from the start, so an operator can drop files in later.
    if let Err(e) = std::fs::create_dir_all(&cfg.plugins.dir) {
        tracing::warn!("cannot create {}: {e}", cfg.plugins.dir.display());
    }
    let host = crate::plugins::Host::new(crate::plugins::HostOptions {
        cache_dir: Some(cfg.data_dir.join("plugin-cache")),
        builtins: crate::plugins::builtin::BUILTINS.to_vec(),
        use_builtins: cfg.plugins.builtin,
    })
    .map_err(|e| ServerError::Broker(format!("plugins: {e}")))?;
    let report = host.reload(&cfg.plugins.dir);
    for (file, error) in &report.errors {
        tracing::error!("plugin {file} not loaded: {error}");
    }
    let names: Vec<String> = host.current().plugins().iter().map(|p| format!("{} ({})", p.name, p.origin)).collect();
    tracing::info!("payload plugins: {}", if names.is_empty() { "none".to_string() } else { names.join(", ") });
    Ok(host)
}

/// Hot reload of `plugins.dir`: changes take effect within about a second; a
/// file that does not load keeps the previous version. Audited.
fn start_plugin_watch(grid: &Arc<Grid>) {
    let audit = grid.audit.clone();
    let watched = crate::plugins::watch(grid.plugins.clone(), grid.cfg.plugins.dir.clone(), move |report| {
        let mut fields = vec![("loaded", report.loaded.join(" ")), ("removed", report.removed.join(" "))];
        for (file, error) in &report.errors {
            tracing::error!("plugin {file} not loaded, its previous version (if any) stays: {error}");
            fields.push(("error", format!("{file}: {error}")));
        }
        if !report.loaded.is_empty() || !report.removed.is_empty() {
            tracing::info!(loaded = ?report.loaded, removed = ?report.removed, "plugins reloaded");
        }
        audit.record(crate::audit::Kind::PluginReload, crate::audit::CONTROLLER, crate::audit::fields(fields));
    });
    match watched {
        Ok(w) => *grid.plugin_watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
        Err(e) => tracing::error!("cannot watch {}: {e}; plugin changes need a restart", grid.cfg.plugins.dir.display()),
    }
}

/// What the broker's plugins learn about platforms: roles and templates from
/// the accounts, grants from the policies (never audited as denials: a
/// missing grant is an answer, not an attempt).
struct PluginEnvironment {
    store: Store,
    cedar: Arc<CedarAuthorizer>,
    enforce: bool,
    audit: crate::audit::AuditSink,
}

impl PluginEnvironment {
    fn account(&self, jid: &BareJid) -> Option<crate::store::Account> {
        let local = jid.local()?;
        self.store.account(local).ok().flatten()
    }
}

impl crate::pubsub::payload::PluginEnv for PluginEnvironment {
    fn publisher(&self, jid: &BareJid) -> crate::plugins::PublisherInfo {
        let (roles, templates) = self.account(jid).map(|a| (a.roles, a.templates)).unwrap_or_default();
        crate::plugins::PublisherInfo { jid: jid.to_string(), roles, templates }
    }

    fn subscriber(&self, jid: &BareJid, topic: &crate::plugins::TopicInfo, grants: &[String]) -> (Vec<String>, Vec<String>) {
        let roles = self.account(jid).map(|a| a.roles).unwrap_or_default();
        let owner = BareJid::parse(&topic.owner).ok();
        let context = crate::authz::Context {
            authn: String::new(),
            tls_version: "",
            source: std::net::IpAddr::from([0, 0, 0, 0]),
        };
        let granted = grants
            .iter()
            .filter(|g| {
                let Some(action) = crate::authz::Action::from_name(g) else { return false };
                if !self.enforce {
                    return true;
                }
                let request = crate::authz::Request {
                    principal: jid,
                    action,
                    topic: Some(crate::authz::Topic {
                        name: &topic.name,
                        payload_type: topic.payload_type.as_deref().unwrap_or(""),
                        owner: owner.as_ref(),
                    }),
                    context: &context,
                };
                self.cedar.authorize(&request).allowed
            })
            .cloned()
            .collect();
        (roles, granted)
    }

    fn audit(&self, event: crate::pubsub::payload::PluginEvent<'_>) {
        use crate::pubsub::payload::PluginEvent;
        match event {
            PluginEvent::Rejected { plugin, publisher, node, text } => self.audit.record(
                crate::audit::Kind::PluginRejected,
                publisher.to_string(),
                crate::audit::fields([("plugin", plugin), ("topic", node), ("stage", "validate"), ("reason", text)]),
            ),
            PluginEvent::TransformFailed { plugin, platform, node, error } => self.audit.record(
                crate::audit::Kind::PluginRejected,
                platform.to_string(),
                crate::audit::fields([("plugin", plugin), ("topic", node), ("stage", "transform"), ("reason", error)]),
            ),
        }
    }
}

/// Publishes honeytoken alerts on the grid's alerts topic and, when configured,
/// disables the offending platform.
async fn alert_task(grid: Arc<Grid>, broker: Arc<Broker>, mut rx: tokio::sync::mpsc::Receiver<crate::alerts::Alert>) {
    use crate::pubsub::model::{AccessModel, ConfigPatch, NodeId, Request};
    // The grid owns this task's sender: end with the shutdown, not with the channel.
    let mut shutdown = grid.shutdown.subscribe();
    let publish_alerts = !grid.cfg.policies.alerts_topic.is_empty();
    let topic = NodeId(grid.cfg.policies.alerts_topic.clone());
    let create = Request::Create {
        node: Some(topic.clone()),
        config: ConfigPatch {
            title: Some("xmpp-grid alerts".into()),
            description: Some("Honeytoken alerts raised by the controller (IODEF 2.0)".into()),
            payload_type: Some("urn:ietf:params:xml:ns:iodef-2.0".into()),
            // Who may read it is for the policies to say.
            access_model: Some(AccessModel::Open),
            ..ConfigPatch::default()
        },
    };
    if publish_alerts {
        match broker.internal(create).await {
            Ok(_) | Err(crate::pubsub::model::PubsubError::Conflict) => {}
            Err(e) => tracing::error!("creating the alerts topic: {e}"),
        }
    }
    // Honeytokens are bait: they must exist to be discovered.
    for name in honeytoken_names(&grid.cfg.policies.dir) {
        let bait = Request::Create {
            node: Some(NodeId(name.clone())),
            config: ConfigPatch {
                title: Some(name.replace('-', " ")),
                payload_type: Some("urn:ietf:params:xml:ns:iodef-2.0".into()),
                access_model: Some(AccessModel::Open),
                ..ConfigPatch::default()
            },
        };
        match broker.internal(bait).await {
            Ok(_) | Err(crate::pubsub::model::PubsubError::Conflict) => {}
            Err(e) => tracing::error!("creating honeytoken topic {name}: {e}"),
        }
    }
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = shutdown.changed() => return,
        };
        if publish_alerts {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let id = format!("alert-{}", crate::pubsub::service::random_id());
            let doc = crate::alerts::iodef(&alert, &grid.cfg.domain, &id, now);
            let publish = Request::Publish {
                node: topic.clone(),
                item_id: Some(id),
                payload: bytes::Bytes::from(doc),
                preconditions: ConfigPatch::default(),
            };
            if let Err(e) = broker.internal(publish).await {
                tracing::error!("publishing a honeytoken alert: {e}");
            }
        }
        if grid.cfg.policies.honeytoken_disables_platform {
            let Some(local) = alert.platform.split('@').next().map(str::to_string) else { continue };
            let g = grid.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::admin::apply(&g.cfg, &g.store, Some(&g), crate::admin::AdminRequest::Revoke { name: local })
            })
            .await;
            tracing::warn!(platform = %alert.platform, "platform disabled after touching a honeytoken: {r:?}");
        }
    }
}

/// The exact (non-prefix) honeytoken topic names of `policies/topics.toml`.
fn honeytoken_names(dir: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("topics.toml")).unwrap_or_default();
    match toml::from_str::<crate::authz::entities::TopicsFile>(&text) {
        Ok(t) => t.honeytokens.into_iter().filter(|n| !n.ends_with('*') && !n.is_empty()).collect(),
        Err(_) => Vec::new(), // the policy loader reports a broken file
    }
}

async fn accept_loop(grid: Arc<Grid>, listener: TcpListener, direct: bool, permits: Arc<Semaphore>, done: mpsc::Sender<()>) {
    let mut shutdown = grid.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning (mini-redis server.rs).
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: limits.max_connections reached");
            continue;
        };
        let Some(slot) = grid.conns.acquire(peer.ip()) else {
            tracing::warn!(%peer, "connection refused: limits.max_connections_per_ip reached");
            continue;
        };
        let grid = grid.clone();
        let done = done.clone();
        tokio::spawn(async move {
            crate::stream::negotiation::handle(grid, tcp, peer, direct, slot).await;
            drop(permit);
            drop(done);
        });
    }
}

impl Running {
    /// Stops accepting, ends every stream with `system-shutdown`, waits (bounded)
    /// for connections to finish, and makes the store durable.
    pub async fn shutdown(mut self) {
        let _ = self.grid.shutdown.send(true);
        for t in &self.accept_tasks {
            t.abort();
        }
        for t in self.accept_tasks.drain(..) {
            let _ = t.await;
        }
        // Every connection task holds a sender; recv() returns None once all are gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done.recv()).await;
        if let Some(b) = self.grid.broker.get() {
            let _ = tokio::time::timeout(Duration::from_secs(5), b.sync()).await;
        }
        if let Err(e) = self.grid.audit.flush().await {
            tracing::error!("audit log at shutdown: {e}");
        }
        let store = self.grid.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
}
