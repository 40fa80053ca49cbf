//! Typed configuration (`grid.toml`): defaults, units in key names, bounds, validation.
//!
//! Every key is optional; a grid with no file at all runs on `localhost`. Unknown keys
//! are errors (a typo must not silently fall back to a default). Relative paths are
//! relative to the directory of the config file (or the working directory when there
//! is no file). This module reads one file and does nothing else: no directories are
//! created here.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration error, with the offending key where known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole configuration, as loaded and resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The grid's XMPP domain: platforms are `name@domain`.
    pub domain: String,
    /// sled database, generated CA and certificates, admin socket.
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub broker: Broker,
    pub policies: Policies,
    pub plugins: Plugins,
    pub tls: Tls,
    pub auth: Auth,
    pub limits: Limits,
    pub rate_limits: RateLimitsCfg,
    /// Directory that relative paths were resolved against (not a config key).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// c2s with mandatory STARTTLS (RFC 6120 §5). Empty string disables it.
    pub starttls: String,
    /// Direct TLS (XEP-0368). Empty string disables it.
    pub direct_tls: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    /// The publish-subscribe service's JID; default `broker.<domain>`.
    pub jid: Option<String>,
    /// Access model of new topics unless their creator sets one:
    /// "authorize" or "whitelist" (RFC 8600 §8.3.4), or "open" (development).
    pub default_access_model: String,
    /// Largest payload one item may carry.
    pub max_payload_bytes: usize,
    /// Items in one retrieval reply; larger requests are paged (XEP-0059).
    pub max_items_per_page: u32,
    /// Upper bound of any topic's `pubsub#max_items` (retention).
    pub max_items_per_topic: u32,
    pub max_topics_per_platform: usize,
    pub max_subscriptions_per_platform: usize,
    /// Group commit: a flush starts at least this long after the previous one
    /// started (an idle broker flushes at once). Acknowledgements wait up to
    /// this much longer; notifications never wait for a flush. Under load,
    /// fewer flushes leave more CPU to the fan-out. 0 flushes back to back.
    pub group_commit_ms: u64,
}

impl Default for Broker {
    fn default() -> Self {
        let l = crate::pubsub::service::Limits::default();
        Broker {
            jid: None,
            default_access_model: "authorize".into(),
            max_payload_bytes: l.max_payload_bytes,
            max_items_per_page: l.max_items_per_page,
            max_items_per_topic: l.max_items_per_node,
            max_topics_per_platform: l.max_topics_per_platform,
            max_subscriptions_per_platform: l.max_subscriptions_per_platform,
            group_commit_ms: 2,
        }
    }
}

impl Broker {
    /// The broker limits in the service's terms.
    pub fn limits(&self) -> crate::pubsub::service::Limits {
        crate::pubsub::service::Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_items_per_page: self.max_items_per_page,
            max_items_per_node: self.max_items_per_topic,
            max_topics_per_platform: self.max_topics_per_platform,
            max_subscriptions_per_platform: self.max_subscriptions_per_platform,
        }
    }

    pub fn access_model(&self) -> crate::pubsub::model::AccessModel {
        crate::pubsub::model::AccessModel::from_name(&self.default_access_model)
            .unwrap_or(crate::pubsub::model::AccessModel::Open)
    }
}

/// `[policies]`: Cedar policies (hot-reloaded) and what a honeytoken alert does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policies {
    pub dir: PathBuf,
    /// The grid's own topic where alerts (honeytoken hits) are published as IODEF;
    /// "" publishes none (alerts are still audited).
    pub alerts_topic: String,
    /// Disable a platform at once when it touches a honeytoken (RFC 8600 §8.3.2).
    pub honeytoken_disables_platform: bool,
    /// false: every authenticated platform may do anything XEP-0060 allows
    /// (benchmarks and development only; a warning is logged).
    pub enforce: bool,
}

impl Default for Policies {
    fn default() -> Self {
        Policies { dir: "policies".into(), alerts_topic: "grid-alerts".into(), honeytoken_disables_platform: false, enforce: true }
    }
}

/// Payload plugins (Wasm validators and transformers, `wit/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Plugins {
    /// `NAME.wasm` (+ `NAME.toml` manifest) files, hot-reloaded.
    pub dir: PathBuf,
    /// Load the plugins built into the binary (IODEF validator, privacy
    /// redactor); a file in `dir` with the same name replaces one.
    pub builtin: bool,
    /// Threads running validators (a topic always uses the same one, keeping order).
    pub threads: usize,
    /// Publishes waiting per validator thread before new ones are told to wait.
    pub queue: usize,
}

impl Default for Plugins {
    fn default() -> Self {
        Plugins { dir: "plugins".into(), builtin: true, threads: 2, queue: 1024 }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Server certificate chain (PEM); default: generated `DATA_DIR/tls/server.pem`.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM); default: generated `DATA_DIR/tls/server.key`.
    pub key: Option<PathBuf>,
    /// Further CAs whose client certificates are accepted for SASL EXTERNAL
    /// (the grid CA `DATA_DIR/tls/ca.pem` always is).
    pub client_ca: Vec<PathBuf>,
    /// CRLs of those CAs (the grid CA's own CRL is maintained in `DATA_DIR/tls/crl.pem`).
    pub crl: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Offer SASL PLAIN (inside TLS only; the seed's "Basic Authentication").
    pub plain: bool,
    /// PBKDF2 iterations for newly stored SCRAM keys (RFC 7677 §4: at least 4096).
    pub scram_iterations: u32,
    /// Offer SCRAM-*-PLUS with tls-exporter / tls-server-end-point channel binding
    /// (and advertise them, XEP-0440). RFC 8600 prefers SCRAM-SHA-256-PLUS; turn it
    /// off only for clients that insist on tls-unique and give up on its failure.
    pub channel_binding: bool,
    /// Failed logins per account or source address before answers are delayed.
    pub failures_before_delay: u32,
    /// Upper bound of that delay, doubling per further failure.
    pub max_failure_delay_ms: u64,
    /// How long a failure is remembered.
    pub failure_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest stanza accepted; a larger one ends the stream with policy-violation.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting accepted inside a stanza.
    pub max_depth: usize,
    /// Sustained read rate per connection; reads pause above it.
    pub read_rate_bytes_per_sec: u64,
    /// Time allowed from TCP accept to a bound resource.
    pub negotiation_timeout_secs: u64,
    /// A connection silent this long is closed (clients send whitespace keepalives).
    pub idle_timeout_secs: u64,
    /// Concurrent connections from one source address.
    pub max_connections_per_ip: usize,
    /// Concurrent connections in all (bounded by the open-files limit).
    pub max_connections: usize,
    /// Stanzas queued towards one session before it is considered too slow and closed.
    pub outbound_queue_stanzas: usize,
}

/// Per-platform rate limits (`[rate_limits]`), with per-role overrides
/// (`[rate_limits.roles.ROLE]`; a platform with several roles gets the largest).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsCfg {
    pub stanzas_per_sec: u32,
    pub publishes_per_sec: u32,
    pub bytes_per_sec: u64,
    /// Disable (revoke) a platform throttled without pause this long; 0 never does.
    pub disable_after_secs: u64,
    pub roles: std::collections::BTreeMap<String, RoleRates>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRates {
    pub stanzas_per_sec: Option<u32>,
    pub publishes_per_sec: Option<u32>,
    pub bytes_per_sec: Option<u64>,
}

impl Default for RateLimitsCfg {
    fn default() -> Self {
        RateLimitsCfg {
            stanzas_per_sec: 2000,
            publishes_per_sec: 2000,
            bytes_per_sec: 8 << 20,
            disable_after_secs: 0,
            roles: Default::default(),
        }
    }
}

impl RateLimitsCfg {
    /// The limits of a platform with these roles.
    pub fn for_roles(&self, roles: &[String]) -> crate::limits::RateLimits {
        let mut l = crate::limits::RateLimits {
            stanzas_per_sec: self.stanzas_per_sec,
            publishes_per_sec: self.publishes_per_sec,
            bytes_per_sec: self.bytes_per_sec,
            disable_after_secs: self.disable_after_secs,
        };
        let overrides: Vec<&RoleRates> = roles.iter().filter_map(|r| self.roles.get(r)).collect();
        if let Some(v) = overrides.iter().filter_map(|o| o.stanzas_per_sec).max() {
            l.stanzas_per_sec = v;
        }
        if let Some(v) = overrides.iter().filter_map(|o| o.publishes_per_sec).max() {
            l.publishes_per_sec = v;
        }
        if let Some(v) = overrides.iter().filter_map(|o| o.bytes_per_sec).max() {
            l.bytes_per_sec = v;
        }
        l
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".into(),
            data_dir: "data".into(),
            listen: Listen::default(),
            broker: Broker::default(),
            policies: Policies::default(),
            plugins: Plugins::default(),
            tls: Tls::default(),
            auth: Auth::default(),
            limits: Limits::default(),
            rate_limits: RateLimitsCfg::default(),
            base_dir: PathBuf::from("."),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen { starttls: "127.0.0.1:5222".into(), direct_tls: "127.0.0.1:5223".into() }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            plain: true,
            scram_iterations: 4096,
            channel_binding: true,
            failures_before_delay: 5,
            max_failure_delay_ms: 30_000,
            failure_window_secs: 600,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 64,
            read_rate_bytes_per_sec: 1024 * 1024,
            negotiation_timeout_secs: 30,
            idle_timeout_secs: 900,
            max_connections_per_ip: 1000,
            max_connections: 19_000,
            outbound_queue_stanzas: 1024,
        }
    }
}

impl Config {
    /// Loads a config file, or the defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                let mut c: Config = toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { path: p.to_path_buf(), message: e.to_string() })?;
                c.base_dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                if c.base_dir.as_os_str().is_empty() {
                    c.base_dir = PathBuf::from(".");
                }
                c
            }
        };
        cfg.resolve();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Makes relative paths absolute against `base_dir`.
    fn resolve(&mut self) {
        let base = self.base_dir.clone();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.policies.dir);
        fix(&mut self.plugins.dir);
        self.tls.cert.as_mut().map(fix);
        self.tls.key.as_mut().map(fix);
        self.tls.client_ca.iter_mut().for_each(fix);
        self.tls.crl.iter_mut().for_each(fix);
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        self.domain = crate::jid::normalize_domain(&self.domain)
            .map_err(|e| ConfigError::Invalid { key: "domain", message: e.to_string() })?;
        if let Some(b) = &self.broker.jid {
            let n = crate::jid::normalize_domain(b)
                .map_err(|e| ConfigError::Invalid { key: "broker.jid", message: e.to_string() })?;
            if n == self.domain {
                return Err(ConfigError::Invalid { key: "broker.jid", message: "must differ from domain".into() });
            }
            self.broker.jid = Some(n);
        }
        for (key, addr) in [("listen.starttls", &self.listen.starttls), ("listen.direct_tls", &self.listen.direct_tls)] {
            if !addr.is_empty() {
                addr.parse::<SocketAddr>()
                    .map_err(|e| ConfigError::Invalid { key, message: format!("{addr:?}: {e}") })?;
            }
        }
        if self.listen.starttls.is_empty() && self.listen.direct_tls.is_empty() {
            return Err(ConfigError::Invalid { key: "listen", message: "no listener enabled".into() });
        }
        let l = &self.limits;
        bound("limits.max_stanza_bytes", l.max_stanza_bytes as u64, 4096, 64 << 20)?;
        bound("limits.max_depth", l.max_depth as u64, 8, 1024)?;
        bound("limits.read_rate_bytes_per_sec", l.read_rate_bytes_per_sec, 1024, 1 << 34)?;
        bound("limits.negotiation_timeout_secs", l.negotiation_timeout_secs, 1, 3600)?;
        bound("limits.idle_timeout_secs", l.idle_timeout_secs, 5, 86_400 * 7)?;
        bound("limits.max_connections_per_ip", l.max_connections_per_ip as u64, 1, 1_000_000)?;
        bound("limits.max_connections", l.max_connections as u64, 1, 1_000_000)?;
        bound("limits.outbound_queue_stanzas", l.outbound_queue_stanzas as u64, 8, 1_000_000)?;
        bound("auth.scram_iterations", self.auth.scram_iterations as u64, 4096, 10_000_000)?;
        bound("auth.failures_before_delay", self.auth.failures_before_delay as u64, 1, 1000)?;
        bound("auth.max_failure_delay_ms", self.auth.max_failure_delay_ms, 0, 600_000)?;
        bound("auth.failure_window_secs", self.auth.failure_window_secs, 1, 86_400)?;
        let r = &self.rate_limits;
        bound("rate_limits.stanzas_per_sec", r.stanzas_per_sec.into(), 1, 10_000_000)?;
        bound("rate_limits.publishes_per_sec", r.publishes_per_sec.into(), 1, 10_000_000)?;
        bound("rate_limits.bytes_per_sec", r.bytes_per_sec, 1024, 1 << 40)?;
        bound("rate_limits.disable_after_secs", r.disable_after_secs, 0, 86_400)?;
        if crate::pubsub::model::AccessModel::from_name(&self.broker.default_access_model).is_none() {
            return Err(ConfigError::Invalid {
                key: "broker.default_access_model",
                message: format!("{:?}: use authorize, whitelist or open", self.broker.default_access_model),
            });
        }
        let b = &self.broker;
        bound("broker.max_payload_bytes", b.max_payload_bytes as u64, 1, self.limits.max_stanza_bytes as u64)?;
        bound("broker.max_items_per_page", b.max_items_per_page as u64, 1, 10_000)?;
        bound("broker.max_items_per_topic", b.max_items_per_topic as u64, 1, 10_000_000)?;
        bound("broker.max_topics_per_platform", b.max_topics_per_platform as u64, 0, 10_000_000)?;
        bound("broker.max_subscriptions_per_platform", b.max_subscriptions_per_platform as u64, 0, 10_000_000)?;
        bound("broker.group_commit_ms", b.group_commit_ms, 0, 1000)?;
        bound("plugins.threads", self.plugins.threads as u64, 1, 64)?;
        bound("plugins.queue", self.plugins.queue as u64, 1, 1_000_000)?;
        Ok(())
    }

    /// The broker's JID (`broker.<domain>` unless configured).
    pub fn broker_jid(&self) -> String {
        self.broker.jid.clone().unwrap_or_else(|| format!("broker.{}", self.domain))
    }

    /// Where the generated CA, server certificate and CRL live.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The admin socket through which CLI commands reach a running server.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    /// The sled database directory.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }
}

fn bound(key: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::Invalid { key, message: format!("{v} is outside {min}..={max}") });
    }
    Ok(())
}

/// The commented default configuration that `xmpp-grid init` writes.
pub fn default_toml(domain: &str) -> String {
    format!(
        r#"# xmpp-grid configuration. Every key is optional; these are the defaults.
# Relative paths are relative to this file.

domain = "{domain}"
data_dir = "data"                   # sled database, generated CA (tls/ca.pem) and certificates

[listen]
starttls = "127.0.0.1:5222"         # RFC 6120 c2s, STARTTLS required; "" disables
direct_tls = "127.0.0.1:5223"       # XEP-0368 direct TLS; "" disables

[broker]
# jid = "broker.{domain}"           # the publish-subscribe service (default broker.<domain>)
default_access_model = "authorize"  # of new topics: "authorize" or "whitelist" (RFC 8600 §8.3.4), "open"
max_payload_bytes = 131072          # per item
max_items_per_page = 100            # per retrieval reply (larger requests are paged, XEP-0059)
max_items_per_topic = 10000         # cap on a topic's pubsub#max_items (retention)
max_topics_per_platform = 100
max_subscriptions_per_platform = 1000
group_commit_ms = 2                 # under load, a flush starts at least this long after the last one (acks wait; notifications do not)

[policies]
dir = "policies"                    # Cedar schema, policies, templates, topics.toml; hot-reloaded
alerts_topic = "grid-alerts"        # the grid's own IODEF alerts (honeytoken hits); "" for none
honeytoken_disables_platform = false
enforce = true                      # false: no policies at all (benchmarks, development)

[plugins]
dir = "plugins"                     # NAME.wasm + NAME.toml payload validators/transformers; hot-reloaded
builtin = true                      # the built-in IODEF validator and privacy redactor (a file of the same name replaces one)
threads = 2                         # validator threads
queue = 1024                        # publishes waiting per validator thread

[tls]
# cert = "server.pem"               # default: generated data/tls/server.pem, signed by the grid CA
# key = "server.key"
client_ca = []                      # further CAs accepted for certificate (SASL EXTERNAL) logins
crl = []                            # their CRLs (the grid CA's CRL is data/tls/crl.pem)

[auth]
plain = true                        # SASL PLAIN inside TLS ("Basic Authentication"); false disables
scram_iterations = 4096             # PBKDF2 iterations for stored SCRAM keys
channel_binding = true              # offer SCRAM-*-PLUS (tls-exporter, tls-server-end-point)
failures_before_delay = 5           # failed logins per account / address before answers slow down
max_failure_delay_ms = 30000
failure_window_secs = 600

[limits]
max_stanza_bytes = 262144
max_depth = 64
read_rate_bytes_per_sec = 1048576
negotiation_timeout_secs = 30
idle_timeout_secs = 900
max_connections_per_ip = 1000
max_connections = 19000
outbound_queue_stanzas = 1024

[rate_limits]                       # per platform, shared by its sessions; excess is delayed, not dropped
stanzas_per_sec = 2000
publishes_per_sec = 2000
bytes_per_sec = 8388608
disable_after_secs = 0              # disable a platform throttled this long without pause; 0 never
# [rate_limits.roles.ids-sensor]    # per-role overrides (the largest of a platform's roles wins)
# publishes_per_sec = 5000
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_gives_a_localhost_grid() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.broker_jid(), "broker.localhost");
        assert_eq!(c.listen.starttls, "127.0.0.1:5222");
    }

    #[test]
    fn the_written_default_file_loads_and_matches_the_defaults() {
        let dir = std::env::temp_dir().join(format!("xg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("grid.toml");
        std::fs::write(&p, default_toml("grid.example")).unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.domain, "grid.example");
        assert_eq!(c.data_dir, dir.join("data"));
        assert_eq!(c.limits.max_stanza_bytes, Limits::default().max_stanza_bytes);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_keys_and_out_of_range_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("xg-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("grid.toml");
        std::fs::write(&p, "domian = \"x\"\n").unwrap();
        assert!(matches!(Config::load(Some(&p)), Err(ConfigError::Parse { .. })));
        std::fs::write(&p, "[limits]\nmax_stanza_bytes = 10\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("limits.max_stanza_bytes"), "{e}");
        std::fs::write(&p, "[listen]\nstarttls = \"nonsense\"\n").unwrap();
        assert!(Config::load(Some(&p)).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
