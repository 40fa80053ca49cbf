//! `xmpp-grid topics | publish | subscribe | retrieve`: act as a Platform from the
//! command line (DESIGN.md "Command line"), and the connection flags the examples share.
//!
//! Role: turn flags and the grid config into [`ClientOptions`], call the client, print
//! results for people and scripts: data on stdout, progress and notes on stderr.
//! `anyhow` is used here because this is CLI glue, like `main.rs`.
//!
//! Must not: print a password, or read two different things from standard input.

use super::doc::{parse_document, strip_indentation};
use super::{Client, ClientCert, ClientOptions, EventKind, Fingerprint, Item, Retrieve, TlsMode, Trust};
use crate::config::Config;
use crate::jid::Jid;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

/// How to reach and log in to the controller, and where its broker is.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The platform's JID, `name@domain` (a `/resource` is requested at bind time).
    #[arg(long)]
    pub jid: String,
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password_env")]
    pub password_stdin: bool,
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// Client certificate (PEM) for SASL EXTERNAL, e.g. from `xmpp-grid platform cert`.
    #[arg(long, requires = "key", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Server address. Default: the config's listener when the JID is in the grid's
    /// domain, 127.0.0.1 for localhost, else the JID's domain; port 5222 (5223 direct TLS).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Direct TLS (XEP-0368) instead of STARTTLS.
    #[arg(long)]
    pub direct_tls: bool,
    /// CA certificate(s) to trust (PEM). Default: the grid CA (<data_dir>/tls/ca.pem)
    /// if present and no --pin is given.
    #[arg(long, value_name = "PEM")]
    pub ca: Vec<PathBuf>,
    /// SHA-256 fingerprint of the controller's certificate (AB:CD:…); with it alone the
    /// certificate is accepted if and only if it matches (RFC 8600 §8.3.6).
    #[arg(long, value_name = "SHA256")]
    pub pin: Option<String>,
    /// The broker's JID. Default: the config's broker for the grid's domain, else
    /// broker.<domain of --jid>.
    #[arg(long, value_name = "JID")]
    pub broker: Option<String>,
}

impl ConnectArgs {
    fn parsed_jid(&self) -> Result<Jid> {
        Jid::parse(&self.jid).with_context(|| format!("--jid {:?}", self.jid))
    }

    /// True if the JID belongs to the grid that `cfg` describes (so its defaults apply).
    fn in_grid(&self, cfg: &Config) -> bool {
        self.parsed_jid().is_ok_and(|j| j.bare().domain_part() == cfg.domain)
    }

    /// The broker to talk to.
    pub fn broker_jid(&self, cfg: &Config) -> Result<String> {
        if let Some(b) = &self.broker {
            return Ok(Jid::parse(b).with_context(|| format!("--broker {b:?}"))?.to_string());
        }
        if self.in_grid(cfg) {
            return Ok(cfg.broker_jid());
        }
        Ok(format!("broker.{}", self.parsed_jid()?.bare().domain_part()))
    }

    /// Options for [`Client::connect`]. Reads the password (stdin or environment) now.
    pub fn options(&self, cfg: &Config) -> Result<ClientOptions> {
        let jid = self.parsed_jid()?;
        let mut o = ClientOptions::new(jid);
        o.password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("read password from stdin")?;
            let p = line.trim_end_matches(['\r', '\n']).to_owned();
            if p.is_empty() {
                bail!("empty password on standard input");
            }
            Some(p)
        } else if let Some(var) = &self.password_env {
            Some(std::env::var(var).with_context(|| format!("--password-env: ${var} is not set"))?)
        } else {
            None
        };
        o.client_cert = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(ClientCert { cert: cert.clone(), key: key.clone() }),
            _ => None,
        };
        if o.password.is_none() && o.client_cert.is_none() {
            bail!("no credentials: use --password-stdin, --password-env VAR, or --cert and --key");
        }
        o.tls = if self.direct_tls { TlsMode::Direct } else { TlsMode::StartTls };
        o.server = match &self.server {
            Some(s) => Some(s.clone()),
            None if self.in_grid(cfg) => listener_addr(cfg, o.tls),
            None => None,
        };
        let pin = match &self.pin {
            Some(p) => Some(Fingerprint::parse(p).map_err(anyhow::Error::msg).context("--pin")?),
            None => None,
        };
        let mut ca_files = self.ca.clone();
        let grid_ca = cfg.tls_dir().join("ca.pem");
        if ca_files.is_empty() && pin.is_none() && grid_ca.exists() {
            ca_files.push(grid_ca);
        }
        o.trust = Trust { ca_files, pin };
        Ok(o)
    }

    /// Connects with these options (`presence`: send initial presence).
    pub async fn connect(&self, cfg: &Config, presence: bool) -> Result<Client> {
        let mut o = self.options(cfg)?;
        o.presence = presence;
        let addr = o.server_addr();
        let c = Client::connect(o).await.with_context(|| format!("connect to {addr} as {}", self.jid))?;
        let i = c.session_info();
        tracing::info!(
            jid = %c.jid(), tls = i.tls_version, mechanism = %i.mechanism,
            channel_binding = i.channel_binding.unwrap_or("none"),
            server_cert_sha256 = %i.server_fingerprint.map(|f| f.to_string()).unwrap_or_default(),
            "connected"
        );
        Ok(c)
    }
}

/// The config's own listener for this mode, as an address to connect to (a wildcard
/// bind address becomes loopback).
fn listener_addr(cfg: &Config, mode: TlsMode) -> Option<String> {
    let s = match mode {
        TlsMode::StartTls => &cfg.listen.starttls,
        TlsMode::Direct => &cfg.listen.direct_tls,
    };
    let mut a: SocketAddr = s.parse().ok()?;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    Some(a.to_string())
}

/// The platform subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum ClientCmd {
    /// List the broker's topics: node, payload type (pubsub#type), title.
    Topics {
        /// Node names only (skips one disco#info query per topic).
        #[arg(long)]
        brief: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Publish one XML document (e.g. an IODEF report) to a topic; prints the item id.
    Publish {
        topic: String,
        /// The payload file; default: standard input.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Item id (default: the broker assigns one).
        #[arg(long)]
        id: Option<String>,
        /// Publish the document's indentation too (default: whitespace-only text
        /// between elements is dropped).
        #[arg(long)]
        keep_whitespace: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Subscribe to a topic and print each item as it arrives (Ctrl-C to stop).
    Subscribe {
        topic: String,
        /// Exit after this many items.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
        /// Remove the subscription on exit (by default it stays, so items published
        /// while away are delivered next time).
        #[arg(long)]
        unsubscribe: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print the items stored in a topic.
    Retrieve {
        topic: String,
        /// Only the most recent N items.
        #[arg(long, value_name = "N")]
        max: Option<u32>,
        /// Only the item with this id (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

impl ClientCmd {
    /// The connection flags of any subcommand.
    pub fn connect_args(&self) -> &ConnectArgs {
        match self {
            ClientCmd::Topics { connect, .. }
            | ClientCmd::Publish { connect, .. }
            | ClientCmd::Subscribe { connect, .. }
            | ClientCmd::Retrieve { connect, .. } => connect,
        }
    }
}

/// Runs a subcommand on a fresh single-threaded runtime (for a synchronous `main`).
pub fn run_blocking(cmd: ClientCmd, cfg: &Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(cmd, cfg))
}

/// Runs a subcommand.
pub async fn run(cmd: ClientCmd, cfg: &Config) -> Result<()> {
    let args = cmd.connect_args().clone();
    let broker = args.broker_jid(cfg)?;
    match cmd {
        ClientCmd::Topics { brief, .. } => {
            let mut c = args.connect(cfg, false).await?;
            let topics = c.topics(&broker).await.context("list topics")?;
            let mut out = std::io::stdout().lock();
            for t in topics {
                let Some(node) = t.node else { continue };
                if brief {
                    writeln!(out, "{node}")?;
                    continue;
                }
                // A topic we may list but not inspect is still shown.
                let (ty, title) = match c.topic_info(&broker, &node).await {
                    Ok(i) => (i.pubsub_type, i.title.or(t.name)),
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "disco#info failed");
                        (None, t.name)
                    }
                };
                writeln!(out, "{node}\t{}\t{}", ty.as_deref().unwrap_or("-"), title.as_deref().unwrap_or("-"))?;
            }
            drop(out);
            c.close().await?;
        }
        ClientCmd::Publish { topic, file, id, keep_whitespace, .. } => {
            let text = match &file {
                Some(f) => std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?,
                None if args.password_stdin => {
                    bail!("the password and the payload cannot both come from standard input: use --file or --password-env")
                }
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).context("read payload from stdin")?;
                    s
                }
            };
            let what = file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "stdin".into());
            let mut payload = parse_document(&text).with_context(|| format!("payload from {what}"))?;
            if !keep_whitespace {
                strip_indentation(&mut payload);
            }
            let mut c = args.connect(cfg, false).await?;
            let assigned = c.publish(&broker, &topic, payload, id.as_deref()).await.with_context(|| format!("publish to {topic}"))?;
            println!("{}", assigned.as_deref().unwrap_or("-"));
            c.close().await?;
        }
        ClientCmd::Subscribe { topic, count, unsubscribe, .. } => {
            if count == Some(0) {
                return Ok(());
            }
            // Presence: servers deliver bare-JID notifications to available resources.
            let mut c = args.connect(cfg, true).await?;
            let sub = c.subscribe(&broker, &topic, None).await.with_context(|| format!("subscribe to {topic}"))?;
            eprintln!(
                "subscribed to {topic} as {} ({}{})",
                sub.jid,
                sub.state.as_str(),
                sub.subid.as_deref().map(|s| format!(", subid {s}")).unwrap_or_default()
            );
            let result = receive(&mut c, &broker, &topic, count).await;
            if unsubscribe {
                c.unsubscribe(&broker, &topic, None, sub.subid.as_deref()).await.context("unsubscribe")?;
            }
            c.close().await?;
            result?;
        }
        ClientCmd::Retrieve { topic, max, ids, .. } => {
            let mut c = args.connect(cfg, false).await?;
            let items = c.items(&broker, &topic, &Retrieve { max_items: max, ids }).await.with_context(|| format!("retrieve {topic}"))?;
            let mut out = std::io::stdout().lock();
            for item in &items {
                print_item(&mut out, item, None)?;
            }
            drop(out);
            c.close().await?;
        }
    }
    Ok(())
}

/// Prints items of `topic` from `broker` until `count` items or Ctrl-C.
async fn receive(c: &mut Client, broker: &str, topic: &str, count: Option<usize>) -> Result<()> {
    let broker_jid = Jid::parse(broker).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seen = 0usize;
    loop {
        let ev = tokio::select! {
            ev = c.next_event() => ev?,
            _ = &mut ctrl_c => return Ok(()),
        };
        let Some(ev) = ev else { bail!("the server closed the stream") };
        // Only the broker may speak for its topics.
        let from_broker = ev.from.as_deref().and_then(|f| Jid::parse(f).ok()) == broker_jid;
        if !from_broker || ev.node != topic {
            continue;
        }
        match ev.kind {
            EventKind::Items { items, retracted } => {
                let mut out = std::io::stdout().lock();
                for item in &items {
                    print_item(&mut out, item, ev.delay.as_ref().map(|d| d.stamp.as_str()))?;
                    seen += 1;
                    if count.is_some_and(|n| seen >= n) {
                        return Ok(());
                    }
                }
                for id in retracted {
                    eprintln!("retracted id={id}");
                }
            }
            EventKind::Purge => eprintln!("topic {topic} was purged"),
            EventKind::Delete => bail!("topic {topic} was deleted"),
            EventKind::Configuration => eprintln!("topic {topic} was reconfigured"),
            EventKind::Subscription { jid, state } => eprintln!("subscription of {jid}: {}", state.as_str()),
        }
    }
}

/// One item: a header line (`id=… [delay=…] [publisher=…]`), then the payload as one
/// line of XML (or `-` for none), so that scripts can split items by line. Line feeds in
/// text are written as `&#10;`, which parses back to the same character. Flushed at
/// once so pipes see items as they arrive.
fn print_item(out: &mut impl Write, item: &Item, delay: Option<&str>) -> Result<()> {
    let mut header = format!("id={}", item.id.as_deref().unwrap_or("-"));
    if let Some(d) = delay {
        header.push_str(&format!(" delay={d}"));
    }
    if let Some(p) = &item.publisher {
        header.push_str(&format!(" publisher={p}"));
    }
    writeln!(out, "{header}")?;
    match &item.payload {
        Some(p) => {
            // The writer escapes LF in attributes and CR everywhere; only text LFs remain.
            let xml = p.to_bytes("");
            for (i, line) in xml.split(|b| *b == b'\n').enumerate() {
                if i > 0 {
                    out.write_all(b"&#10;")?;
                }
                out.write_all(line)?;
            }
        }
        None => out.write_all(b"-")?,
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::Element;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        cmd: ClientCmd,
    }

    fn parse(args: &[&str]) -> Result<ClientCmd, clap::Error> {
        TestCli::try_parse_from(std::iter::once("xmpp-grid").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn subcommands_parse_with_connection_flags_after_them() {
        let cmd = parse(&["publish", "incidents", "--file", "x.xml", "--id", "i1", "--jid", "p@grid.test", "--password-env", "PW", "--pin", "AB"])
            .unwrap_or_else(|e| panic!("{e}"));
        let ClientCmd::Publish { topic, file, id, connect, .. } = cmd else { panic!("not publish") };
        assert_eq!((topic.as_str(), id.as_deref()), ("incidents", Some("i1")));
        assert_eq!(file, Some(PathBuf::from("x.xml")));
        assert_eq!(connect.password_env.as_deref(), Some("PW"));
        assert!(parse(&["subscribe", "t", "--count", "3", "--jid", "p@x", "--direct-tls"]).is_ok());
        assert!(parse(&["retrieve", "t", "--max", "2", "--id", "a", "--id", "b", "--jid", "p@x"]).is_ok());
        assert!(parse(&["topics", "--jid", "p@x", "--cert", "c.pem"]).is_err(), "--cert needs --key");
        assert!(parse(&["topics", "--jid", "p@x", "--password-stdin", "--password-env", "X"]).is_err());
        assert!(parse(&["topics"]).is_err(), "--jid is required");
    }

    /// The wiring proposed for main.rs: the subcommands flattened beside the others.
    #[derive(Parser, Debug)]
    struct MainLike {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: MainCmd,
    }

    #[derive(Subcommand, Debug)]
    #[allow(clippy::large_enum_variant)] // a test's copy of the main command line
    enum MainCmd {
        Serve,
        // Act as a platform: topics, publish, subscribe, retrieve.
        #[command(flatten)]
        Client(ClientCmd),
    }

    #[test]
    fn subcommands_flatten_into_the_main_command_line() {
        let m = MainLike::try_parse_from(["xmpp-grid", "--config", "g.toml", "retrieve", "incidents", "--jid", "p@x"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(m.cmd, MainCmd::Client(ClientCmd::Retrieve { .. })));
        assert!(matches!(MainLike::try_parse_from(["xmpp-grid", "serve"]).map(|m| m.cmd), Ok(MainCmd::Serve)));
    }

    #[test]
    fn defaults_come_from_the_grid_config_for_its_own_domain() {
        let cfg = Config::default(); // domain localhost, listeners on 127.0.0.1:5222/5223
        let cmd = parse(&["topics", "--jid", "p@localhost", "--password-env", "XG_TEST_UNSET_VAR"]).unwrap_or_else(|e| panic!("{e}"));
        let a = cmd.connect_args();
        assert_eq!(a.broker_jid(&cfg).ok().as_deref(), Some("broker.localhost"));
        assert_eq!(listener_addr(&cfg, TlsMode::Direct).as_deref(), Some("127.0.0.1:5223"));
        assert!(a.options(&cfg).is_err(), "unset password variable is an error");

        let other = parse(&["topics", "--jid", "p@grid.test", "--broker", "PubSub.Grid.Test", "--password-env", "X"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(other.connect_args().broker_jid(&cfg).ok().as_deref(), Some("pubsub.grid.test"));
        let other = parse(&["topics", "--jid", "p@grid.test", "--password-env", "X"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(other.connect_args().broker_jid(&cfg).ok().as_deref(), Some("broker.grid.test"));

        let mut wild = Config::default();
        wild.listen.starttls = "0.0.0.0:15222".into();
        assert_eq!(listener_addr(&wild, TlsMode::StartTls).as_deref(), Some("127.0.0.1:15222"));
    }

    #[test]
    fn items_print_as_header_and_one_line_of_xml() {
        let item = Item {
            id: Some("i1".into()),
            publisher: None,
            payload: Some(Element::new("IODEF-Document", "urn:ietf:params:xml:ns:iodef-2.0").with_attr("version", "2.00")),
        };
        let mut out = Vec::new();
        print_item(&mut out, &item, Some("2024-01-01T00:00:00Z")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "id=i1 delay=2024-01-01T00:00:00Z\n<IODEF-Document xmlns='urn:ietf:params:xml:ns:iodef-2.0' version='2.00'/>\n"
        );
        let multi = Item {
            id: None,
            publisher: Some("p@x".into()),
            payload: Some(Element::new("d", "urn:a").with_attr("a", "1\n2").with_text("x\ny")),
        };
        let mut out = Vec::new();
        print_item(&mut out, &multi, None).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text, "id=- publisher=p@x\n<d xmlns='urn:a' a='1&#10;2'>x&#10;y</d>\n");
        let back = crate::client::doc::parse_document(text.lines().nth(1).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.text(), "x\ny");
    }
}
