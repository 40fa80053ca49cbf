//! The `xmpp-grid` command line: parse arguments, load config, call the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use xmpp_grid::admin::{Admin, AdminRequest, AdminResponse};
use xmpp_grid::config::{self, Config};
use xmpp_grid::{pki, provision, server};

#[derive(Parser)]
#[command(name = "xmpp-grid", version, about = "XMPP-Grid Controller and Broker (RFC 8600)")]
struct Cli {
    /// Configuration file (default: ./grid.toml if present, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller; the first run creates what is missing.
    Serve,
    /// Write grid.toml and generate the CA and server certificate.
    Init {
        #[arg(long, default_value = "localhost")]
        domain: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Validate the configuration, TLS material, policies and plugins; exit non-zero on error.
    Check,
    /// Provision, list and revoke platforms.
    #[command(subcommand)]
    Platform(PlatformCmd),
    /// Inspect the authorization policies (policies/).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Verify or print the security audit log (works with or without a running server).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Try a payload plugin (Wasm component or wit-bindgen module) on a payload.
    #[command(subcommand)]
    Plugin(PluginCmd),
    // Act as a platform: topics, publish, subscribe, retrieve.
    #[command(flatten)]
    Client(xmpp_grid::client::cli::ClientCmd),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the decision for one request and the policies that made it.
    Explain {
        /// The platform (localpart or bare JID); its roles etc. come from the store.
        #[arg(long)]
        platform: String,
        /// connect, admin, discover, create, configure, delete, purge, publish,
        /// retract, subscribe, retrieve, manage-subscriptions.
        #[arg(long)]
        action: String,
        /// The topic (node name); needed for every action but connect and admin.
        #[arg(long)]
        topic: Option<String>,
        /// The topic's pubsub#type (payload namespace).
        #[arg(long, default_value = "")]
        payload_type: String,
        /// The platform that created the topic.
        #[arg(long)]
        owner: Option<String>,
        /// "cert" (SASL EXTERNAL) or a SASL mechanism.
        #[arg(long, default_value = "SCRAM-SHA-256")]
        authn: String,
        /// What if: extra roles, templates, read-only on top of the stored facts.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long = "template")]
        templates: Vec<String>,
        #[arg(long)]
        read_only: bool,
    },
}

#[derive(Subcommand)]
enum PlatformCmd {
    /// Add a platform (certificate-only unless --password-stdin).
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long = "template")]
        templates: Vec<String>,
        #[arg(long)]
        read_only: bool,
    },
    /// Bulk-provision from CSV: header `name,password,roles,templates`.
    Import { file: PathBuf },
    /// Issue a client certificate (xmppAddr SAN) signed by the grid CA.
    Cert {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Disable a platform, revoke its certificates and end its sessions now.
    Revoke { name: String },
    /// List platforms.
    List,
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Run FILE.wasm on a payload as the broker would. Validator: exit 0
    /// accepted, 1 rejected (violations on stdout), 2 plugin failed.
    /// Transformer: prints what the subscriber gets; exit 0 delivered,
    /// 1 withheld, 2 plugin failed.
    Run {
        /// The plugin: a component, or a core module built with wit-bindgen.
        file: PathBuf,
        /// The payload: one XML element.
        #[arg(long)]
        payload: PathBuf,
        /// Its manifest (default: FILE with .toml, if present).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The topic as the plugin sees it.
        #[arg(long, default_value = "incidents")]
        topic: String,
        /// The topic's pubsub#type (default: the payload's namespace).
        #[arg(long)]
        payload_type: Option<String>,
        /// The publisher (validators) or subscriber (transformers), a bare JID.
        #[arg(long, default_value = "platform@localhost")]
        platform: String,
        /// Roles of that platform.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Grants the subscriber holds (transformers), e.g. read-personal-data.
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain; exit 1 naming the first bad record.
    Verify,
    /// Print the newest records as JSON lines.
    Tail {
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        /// Keep printing new records as they are appended.
        #[arg(long)]
        follow: bool,
    },
}

fn main() {
    xmpp_grid::init_logging();
    if let Err(e) = run(Cli::parse()) {
        // Print the cause chain once: many errors already include their source's text.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg = format!("{msg}: {c}");
            }
        }
        eprintln!("xmpp-grid: {msg}");
        std::process::exit(1);
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    let default = Path::new("grid.toml");
    let path = path.or_else(|| default.exists().then_some(default));
    Ok(Config::load(path)?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { domain, dir } => init(&domain, &dir),
        Cmd::Serve => serve(load_config(cli.config.as_deref())?),
        Cmd::Check => {
            let cfg = load_config(cli.config.as_deref())?;
            check(&cfg)
        }
        Cmd::Client(c) => xmpp_grid::client::cli::run_blocking(c, &load_config(cli.config.as_deref())?),
        Cmd::Platform(p) => {
            let cfg = load_config(cli.config.as_deref())?;
            platform(&cfg, p)
        }
        Cmd::Policy(p) => policy(&load_config(cli.config.as_deref())?, p),
        Cmd::Audit(a) => audit(&load_config(cli.config.as_deref())?, a),
        Cmd::Plugin(p) => plugin(p),
    }
}

fn init(domain: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("grid.toml");
    if path.exists() {
        println!("{} exists; kept", path.display());
    } else {
        std::fs::write(&path, config::default_toml(domain)).with_context(|| format!("write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let cfg = Config::load(Some(&path))?;
    std::fs::create_dir_all(&cfg.policies.dir)?;
    std::fs::create_dir_all(&cfg.plugins.dir)?;
    pki::ensure_ca_and_server(&cfg.tls_dir(), &cfg.domain, &[cfg.broker_jid()])?;
    println!("grid CA: {}", cfg.tls_dir().join("ca.pem").display());
    println!("next: xmpp-grid --config {} serve", path.display());
    Ok(())
}

fn check(cfg: &Config) -> Result<()> {
    check_policies(cfg)?;
    check_plugins(cfg)?;
    // Building the grid validates certificates and keys without serving.
    let dir = cfg.tls_dir();
    if cfg.tls.cert.is_none() && !dir.join("server.pem").exists() {
        println!("config ok; certificates will be generated in {} on first start", dir.display());
        return Ok(());
    }
    let settings = xmpp_grid::tls::TlsSettings {
        cert_chain_pem: cfg.tls.cert.clone().unwrap_or_else(|| dir.join("server.pem")),
        key_pem: cfg.tls.key.clone().unwrap_or_else(|| dir.join("server.key")),
        client_ca_pems: std::iter::once(dir.join("ca.pem")).chain(cfg.tls.client_ca.iter().cloned()).collect(),
        crl_pems: std::iter::once(dir.join("crl.pem")).chain(cfg.tls.crl.iter().cloned()).collect(),
    };
    xmpp_grid::tls::server_config(&settings, &[])?;
    println!("config ok: domain {}, TLS material valid", cfg.domain);
    Ok(())
}

/// Validates schema, policies, topics.toml and links.toml; prints every problem as file:line:col.
fn check_policies(cfg: &Config) -> Result<()> {
    use xmpp_grid::authz::cedar;
    let dir = &cfg.policies.dir;
    if !cedar::has_policies(dir) {
        println!("policies: none in {}; the shipped defaults are installed there on first start", dir.display());
        return Ok(());
    }
    match cedar::CedarAuthorizer::load(dir, Vec::new()) {
        Ok(a) => {
            println!("policies ok: {}", a.report());
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            bail!("policies in {} are invalid ({} problem(s))", dir.display(), e.problems.len())
        }
    }
}

/// Loads the built-in plugins and every plugin file with its manifest, as the
/// server would, without swapping anything in; prints every problem.
fn check_plugins(cfg: &Config) -> Result<()> {
    use xmpp_grid::plugins::{builtin, Host, HostOptions};
    let host = Host::new(HostOptions {
        cache_dir: None,
        builtins: builtin::BUILTINS.to_vec(),
        use_builtins: cfg.plugins.builtin,
    })?;
    let report = host.check_dir(&cfg.plugins.dir);
    for (file, note) in &report.notes {
        println!("note: {file}: {note}");
    }
    for (file, error) in &report.errors {
        eprintln!("{file}: {error}");
    }
    if !report.errors.is_empty() {
        bail!("plugins in {} are invalid ({} problem(s))", cfg.plugins.dir.display(), report.errors.len());
    }
    println!("plugins ok: {}", if report.loaded.is_empty() { "none".to_string() } else { report.loaded.join(", ") });
    Ok(())
}

fn plugin(cmd: PluginCmd) -> Result<()> {
    use xmpp_grid::plugins::{Host, HostOptions, Kind, PublisherInfo, SubscriberInfo, TopicInfo, Transformed, Verdict};
    let PluginCmd::Run { file, payload, manifest, topic, payload_type, platform, roles, grants } = cmd;
    let payload = std::fs::read(&payload).with_context(|| format!("read {}", payload.display()))?;
    let host = Host::new(HostOptions { cache_dir: None, builtins: Vec::new(), use_builtins: false })?;
    let manifest = manifest.or_else(|| Some(file.with_extension("toml")).filter(|m| m.exists()));
    let plugin = match host.load_file(&file, manifest.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("xmpp-grid: {}: {e}", file.display());
            std::process::exit(2);
        }
    };
    let ns = xmpp_grid::pubsub::payload::root_namespace(&payload);
    let topic = TopicInfo { name: topic, payload_type: payload_type.or(Some(ns).filter(|n| !n.is_empty())), owner: platform.clone() };
    let started = std::time::Instant::now();
    let code = match plugin.kind {
        Kind::Validator => {
            let publisher = PublisherInfo { jid: platform, roles, templates: Vec::new() };
            match plugin.validate(&topic, &publisher, &payload) {
                Ok(Verdict::Accept) => {
                    println!("accepted");
                    0
                }
                Ok(Verdict::Reject(violations)) => {
                    println!("rejected: {} violation(s)", violations.len());
                    for v in &violations {
                        println!("{}: {}", if v.location.is_empty() { "/" } else { &v.location }, v.message);
                    }
                    1
                }
                Err(e) => {
                    println!("failed: {e}");
                    2
                }
            }
        }
        Kind::Transformer => {
            let subscriber = SubscriberInfo {
                jid: plugin.manifest.subscriber_jid.then(|| platform.clone()),
                roles,
                grants,
            };
            match plugin.transform(&topic, &subscriber, &payload) {
                Ok(Transformed::Unchanged) => {
                    println!("{}", String::from_utf8_lossy(&payload));
                    eprintln!("unchanged");
                    0
                }
                Ok(Transformed::Rewritten(out)) => {
                    println!("{}", String::from_utf8_lossy(&out));
                    eprintln!("rewritten ({} -> {} bytes)", payload.len(), out.len());
                    0
                }
                Ok(Transformed::Withhold) => {
                    println!("withheld");
                    1
                }
                Err(e) => {
                    println!("failed: {e}");
                    2
                }
            }
        }
    };
    eprintln!("{} ({:?}) in {:.2?}", plugin.name, plugin.kind, started.elapsed());
    std::process::exit(code);
}

fn policy(cfg: &Config, cmd: PolicyCmd) -> Result<()> {
    use xmpp_grid::authz::{cedar, Action, CedarAuthorizer, Context as Login, Request, Topic};
    let PolicyCmd::Explain { platform, action, topic, payload_type, owner, authn, roles, templates, read_only } = cmd;
    let action = Action::from_name(&action).with_context(|| {
        let all: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
        format!("unknown action {action:?}; one of: {}", all.join(", "))
    })?;
    if !action.on_controller() && topic.is_none() {
        bail!("--topic is needed for {}", action.name());
    }
    let local_of = |name: &str| -> Result<String> {
        Ok(xmpp_grid::jid::normalize_local(name.split('@').next().unwrap_or(name))?)
    };
    let local = local_of(&platform)?;
    let mut facts = stored_facts(cfg, &local);
    facts.roles.extend(roles);
    facts.templates.extend(templates);
    facts.read_only |= read_only;
    println!(
        "platform {local}: roles [{}], templates [{}]{}{}",
        facts.roles.join(", "),
        facts.templates.join(", "),
        if facts.read_only { ", read-only" } else { "" },
        if facts.revoked { ", revoked" } else { "" }
    );
    let authz = if cedar::has_policies(&cfg.policies.dir) {
        CedarAuthorizer::load(&cfg.policies.dir, vec![facts])?
    } else {
        println!("(no policies in {}: the shipped defaults)", cfg.policies.dir.display());
        CedarAuthorizer::load_defaults(vec![facts])?
    };
    let principal = xmpp_grid::jid::BareJid::new(&local, &cfg.domain)?;
    let owner = owner.map(|o| -> Result<_> { Ok(xmpp_grid::jid::BareJid::new(&local_of(&o)?, &cfg.domain)?) }).transpose()?;
    let context = Login { authn, tls_version: "TLSv1.3", source: std::net::Ipv4Addr::LOCALHOST.into() };
    let topic = topic.as_deref().filter(|_| !action.on_controller()).map(|name| Topic { name, payload_type: &payload_type, owner: owner.as_ref() });
    let e = authz.explain(&Request { principal: &principal, action, topic, context: &context });
    print!("{}", e);
    Ok(())
}

/// A platform's facts from the store (through the server if it runs); with no
/// such platform, or no store, a platform with no role.
fn stored_facts(cfg: &Config, local: &str) -> xmpp_grid::authz::PlatformFacts {
    let none = xmpp_grid::authz::PlatformFacts { name: local.to_string(), ..Default::default() };
    if !cfg.db_dir().exists() {
        println!("note: no database at {}: {local} has no role", cfg.db_dir().display());
        return none;
    }
    let found = Admin::connect(cfg).and_then(|mut a| a.call(cfg, AdminRequest::Platform { name: local.to_string() }));
    match found {
        Ok(AdminResponse::List { platforms }) => match platforms.into_iter().next() {
            Some(p) => xmpp_grid::authz::PlatformFacts {
                name: local.to_string(),
                roles: p.roles,
                templates: p.templates,
                read_only: p.read_only,
                revoked: p.revoked,
                org: String::new(),
            },
            None => none,
        },
        Ok(_) => none,
        Err(e) => {
            println!("note: {e}: {local} has no role");
            none
        }
    }
}

fn serve(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let grid = tokio::task::spawn_blocking(move || server::Grid::open(cfg)).await??;
        let running = server::start(grid.clone()).await?;
        print_welcome(&grid.cfg, &running);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    })
}

fn print_welcome(cfg: &Config, r: &server::Running) {
    let ca = cfg.tls_dir().join("ca.pem");
    let ca = std::fs::canonicalize(&ca).unwrap_or(ca);
    let show = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    println!("xmpp-grid controller for domain {} is running", cfg.domain);
    println!("  STARTTLS:   {}", show(r.starttls_addr));
    println!("  direct TLS: {}", show(r.direct_tls_addr));
    println!("  broker:     {}", cfg.broker_jid());
    println!("  grid CA:    {}  (clients must trust it)", ca.display());
    println!("add a platform (in another terminal):");
    println!("  echo 's3cret' | xmpp-grid platform add sensor1 --password-stdin");
    println!("  xmpp-grid platform cert sensor1 --out certs/   # for certificate (SASL EXTERNAL) login");
    println!("connect any XMPP client as sensor1@{} to {} (STARTTLS), trusting the grid CA", cfg.domain, show(r.starttls_addr));
    println!("stop with Ctrl-C");
}

fn platform(cfg: &Config, cmd: PlatformCmd) -> Result<()> {
    // The CA signs certificates and CRLs: make sure it exists even before the first `serve`.
    pki::ensure_ca_and_server(&cfg.tls_dir(), &cfg.domain, &[cfg.broker_jid()])?;
    let mut admin = Admin::connect(cfg)?;
    match cmd {
        PlatformCmd::Add { name, password_stdin, roles, templates, read_only } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                let p = line.trim_end_matches(['\r', '\n']).to_string();
                if p.is_empty() {
                    bail!("empty password on standard input");
                }
                p
            } else {
                String::new()
            };
            let row = provision::ImportRow { name: xmpp_grid::jid::normalize_local(&name)?, password, roles, templates };
            let accounts = provision::accounts(vec![row], read_only, cfg.auth.scram_iterations).map_err(anyhow::Error::msg)?;
            match admin.call(cfg, AdminRequest::AddPlatforms { platforms: accounts })? {
                AdminResponse::Added { existing, .. } if !existing.is_empty() => bail!("platform {name} already exists"),
                _ => println!("added {}@{}", name.to_lowercase(), cfg.domain),
            }
        }
        PlatformCmd::Import { file } => {
            let start = std::time::Instant::now();
            let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
            let rows = provision::parse_csv(&text)?;
            let total = rows.len();
            let accounts = provision::accounts(rows, false, cfg.auth.scram_iterations).map_err(anyhow::Error::msg)?;
            let (mut added, mut existing) = (0, Vec::new());
            for batch in accounts.chunks(5000) {
                if let AdminResponse::Added { added: a, existing: e } =
                    admin.call(cfg, AdminRequest::AddPlatforms { platforms: batch.to_vec() })?
                {
                    added += a;
                    existing.extend(e);
                }
            }
            println!("imported {added} of {total} platforms in {:.1} s", start.elapsed().as_secs_f64());
            if !existing.is_empty() {
                println!("{} already existed and were left unchanged: {}", existing.len(), existing.iter().take(10).cloned().collect::<Vec<_>>().join(", "));
            }
        }
        PlatformCmd::Cert { name, out, days } => {
            let local = xmpp_grid::jid::normalize_local(&name)?;
            let jid = format!("{local}@{}", cfg.domain);
            let issued = pki::issue_client_cert(&cfg.tls_dir(), &jid, days)?;
            admin.call(cfg, AdminRequest::RecordCert { name: local.clone(), serial_hex: issued.serial_hex.clone() })?;
            std::fs::create_dir_all(&out)?;
            let cert = out.join(format!("{local}.pem"));
            let key = out.join(format!("{local}.key"));
            std::fs::write(&cert, &issued.cert_pem)?;
            write_private(&key, issued.key_pem.as_bytes())?;
            std::fs::copy(cfg.tls_dir().join("ca.pem"), out.join("ca.pem"))?;
            println!("wrote {} and {} (serial {}, valid until {}) and ca.pem", cert.display(), key.display(), issued.serial_hex, issued.not_after);
        }
        PlatformCmd::Revoke { name } => {
            if let AdminResponse::Revoked { sessions_closed, certificates } = admin.call(cfg, AdminRequest::Revoke { name: name.clone() })? {
                println!("revoked {name}: {certificates} certificate(s) on the CRL, {sessions_closed} live session(s) ended");
            }
        }
        PlatformCmd::List => {
            if let AdminResponse::List { platforms } = admin.call(cfg, AdminRequest::List)? {
                for p in platforms {
                    let mut flags = Vec::new();
                    if p.revoked { flags.push("revoked"); }
                    if p.read_only { flags.push("read-only"); }
                    if p.password { flags.push("password"); }
                    println!("{}@{}\troles={}\ttemplates={}\tcerts={}\t{}", p.name, cfg.domain, p.roles.join(";"), p.templates.join(";"), p.certificates, flags.join(","));
                }
            }
        }
    }
    Ok(())
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    Ok(())
}

fn audit(cfg: &Config, cmd: AuditCmd) -> Result<()> {
    use std::io::Write;
    use xmpp_grid::audit::Verdict;
    match cmd {
        AuditCmd::Verify => match Admin::connect(cfg)?.call(cfg, AdminRequest::AuditVerify)? {
            AdminResponse::AuditVerdict { verdict: v @ Verdict::Intact { .. } } => println!("{v}"),
            AdminResponse::AuditVerdict { verdict } => bail!("{verdict}"),
            r => bail!("unexpected answer {r:?}"),
        },
        AuditCmd::Tail { n, follow } => {
            let records = |admin: &mut Admin, req| match admin.call(cfg, req)? {
                AdminResponse::AuditRecords { records } => Ok(records),
                r => bail!("unexpected answer {r:?}"),
            };
            // At least one record, to learn where --follow starts.
            let last = records(&mut Admin::connect(cfg)?, AdminRequest::AuditTail { n: n.max(1) })?;
            let mut next = last.last().map_or(1, |r| r.seq + 1);
            for r in last.iter().skip(last.len().saturating_sub(n)) {
                println!("{}", r.to_json_line());
            }
            if !follow {
                return Ok(());
            }
            // Poll, connecting afresh each time: an open store would keep the
            // server from starting, and the server may start or stop meanwhile.
            let mut caught_up = true;
            loop {
                if caught_up {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                let page = Admin::connect(cfg).map_err(anyhow::Error::from).and_then(|mut a| records(&mut a, AdminRequest::AuditSince { seq: next }));
                match page {
                    Ok(page) => {
                        caught_up = page.len() < xmpp_grid::admin::AUDIT_PAGE;
                        for r in page {
                            // A closed pipe (`| head`) ends the command quietly.
                            if writeln!(std::io::stdout(), "{}", r.to_json_line()).is_err() {
                                return Ok(());
                            }
                            next = r.seq + 1;
                        }
                    }
                    Err(e) => eprintln!("xmpp-grid: audit tail: {e} (retrying)"),
                }
            }
        }
    }
    Ok(())
}
